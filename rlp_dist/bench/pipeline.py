"""Pipelined rollouts: decode tokens/s at PP=2 with the step's rows fed through the stages in M slices.

    python -m rlp_dist.bench pipeline --json OUT [--micro-batches 1,2,4] [--repeats 3]

Two gloo processes (one pipeline stage each, one thread each), per backbone preset widened to hidden
256 / FFN 768 / 4 layers, B = 4 contexts x G = 8 thoughts, context 128, up to 64 thought tokens at
T = 0.7: ``sample_thoughts(..., pp_group=, pipeline_micro_batches=M)``. M = 1 is the default engine;
M > 1 overlaps stage s on slice c with stage s+1 on slice c-1 but runs every stage's layers M times
per step. Best of ``repeats`` interleaved rounds; ``ratio_vs_1`` = tokens/s relative to M = 1.
"""

from __future__ import annotations

import argparse
import time

import torch

PRESETS = {"tiny_transformer": [], "tiny_hybrid": ["model.hybrid_pattern=M*M-"]}
WIDEN = ["model.hidden_size=256", "model.ffn_hidden_size=768", "model.num_layers=4"]


def _rank_main(micro_batches: list[int], repeats: int) -> list[dict]:
    from rlp_dist.config import compose
    from rlp_dist.data.tokenizer import ThoughtTokens
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.rollout import RolloutGroups, RolloutSettings, sample_thoughts

    dims = init_distributed(tp=1, pp=2)
    mk = ThoughtTokens(open_id=5, close_id=6, prompt_ids=(), eos_id=0, pad_id=0)
    out = []
    for preset, extra in PRESETS.items():
        cfg = compose([f"+model={preset}", *WIDEN, *extra])
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()  # this rank's stage
        gen = torch.Generator().manual_seed(1)
        ctx = torch.randint(8, cfg.model.vocab_size, (4, 128), generator=gen)
        nxt = torch.randint(8, cfg.model.vocab_size, (4,), generator=gen)
        best: dict[int, float] = {}
        tokens = 0.0
        for _ in range(repeats + 1):  # the first round warms up
            for m in micro_batches:
                t0 = time.perf_counter()
                ro = sample_thoughts(model, ctx, nxt, mk, RolloutSettings(8, 64, 0.7, pipeline_micro_batches=m),
                                     generator=torch.Generator().manual_seed(2),
                                     groups=RolloutGroups(pp=dims.pp_group))
                best[m] = min(best.get(m, float("inf")), time.perf_counter() - t0)
                tokens = float(ro.mask.sum())  # the same seed: the same thoughts for every M
        base = tokens / best[micro_batches[0]]
        for m in micro_batches:
            out.append({"model": preset, "pp": 2, "micro_batches": m, "decode_tok_per_s": tokens / best[m],
                        "ratio_vs_1": tokens / best[m] / base})
    return out


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench pipeline")
    p.add_argument("--micro-batches", default="1,2,4", help="comma-separated M values; the first is the baseline")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (best of)")
    a = p.parse_args(argv)
    try:
        ms = [int(x) for x in a.micro_batches.split(",")]
    except ValueError:
        raise SystemExit(f"bench pipeline: --micro-batches={a.micro_batches!r}; use integers like 1,2,4") from None
    if not ms or min(ms) < 1:
        raise SystemExit(f"bench pipeline: --micro-batches={a.micro_batches!r}; use integers >= 1 like 1,2,4")
    from rlp_dist.bench._ranks import spawn_ranks

    results = spawn_ranks(_rank_main, 2, ms, a.repeats)
    return results[1]  # the last stage samples; both stages time the same rollouts
