"""One decode step's sampling from vocab-parallel logits: gather + ``sample`` vs ``sample_vocab_parallel``.

    python -m rlp_dist.bench sampling --json OUT [--tp 2] [--repeats 3]

TP ranks are spawned here (gloo on CPU). Each holds its (N, V/tp) slice of the same fp32 logits
(randn * 3) and draws one token per row at T=1.0 (no top-k/top-p: the paper's recipe) with identically
seeded generators, two ways:

- ``gather_sample_s``: all-gather the vocabulary, then :func:`rlp_dist.rlp.logprobs.sample` on (N, V)
  (what ``rollout._decode_loop`` does today);
- ``vocab_parallel_s``: :func:`rlp_dist.rlp.logprobs.sample_vocab_parallel` on the slice.

``ratio`` = gather_sample_s / vocab_parallel_s. ``tokens_equal``: both drew the same tokens.
``bytes_gathered_per_step_old``: the (N, V) fp32 tensor each rank receives (N * V * 4);
``bytes_moved_per_step_new``: the results of the new path's three collectives on one rank: the max
all-reduce (N fp32), the all-gathered masses (N * tp fp64), the token/logit all-reduce (N * 2 fp64).
Times are the best of ``repeats`` rounds after a warm-up, the two variants interleaved in each round
(the machines are shared: both see the same background load), the slower rank's time.
"""

from __future__ import annotations

import argparse
import time

import torch

SIZES = [(n, v) for n in (64, 256) for v in (32768, 151936)]


def _rank_main(tp: int, repeats: int) -> list[dict]:
    import torch.distributed as dist

    from rlp_dist.rlp.logprobs import gather_vocab, sample, sample_vocab_parallel

    dist.init_process_group("gloo")
    group, rank = dist.group.WORLD, dist.get_rank()
    out = []
    for n, v in SIZES:
        v_local = v // tp
        full = torch.randn(n, v, generator=torch.Generator().manual_seed(n + v)) * 3
        z = full[:, rank * v_local:(rank + 1) * v_local].contiguous()  # (N, V/tp)
        del full
        g_old, g_new = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
        best_old = best_new = float("inf")
        equal = True
        for _ in range(repeats + 1):  # the first round warms up
            dist.barrier()
            t0 = time.perf_counter()
            tok_old, _ = sample(gather_vocab(z, group), 1.0, generator=g_old)
            t1 = time.perf_counter()
            dist.barrier()
            t2 = time.perf_counter()
            tok_new, _ = sample_vocab_parallel(z, 1.0, generator=g_new, tp_group=group)
            t3 = time.perf_counter()
            best_old, best_new = min(best_old, t1 - t0), min(best_new, t3 - t2)
            equal = equal and torch.equal(tok_old, tok_new)
        out.append(dict(n=n, vocab=v, tp=tp, gather_sample_s=best_old, vocab_parallel_s=best_new,
                        tokens_equal=equal, bytes_gathered_per_step_old=n * v * 4,
                        bytes_moved_per_step_new=n * 4 + n * tp * 8 + n * 2 * 8))
    return out


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench sampling")
    p.add_argument("--tp", type=int, default=2, help="TP ranks (gloo processes)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (best of)")
    a = p.parse_args(argv)
    if a.tp < 2 or any(v % a.tp for _, v in SIZES):
        raise SystemExit(f"bench sampling: --tp={a.tp} must be >= 2 and divide the vocabularies "
                         f"{sorted({v for _, v in SIZES})}; use 2, 4 or 8")
    from rlp_dist.bench._ranks import spawn_ranks

    results = spawn_ranks(_rank_main, a.tp, a.tp, a.repeats)
    out = []
    for rows in zip(*(results[r] for r in range(a.tp))):  # one row per size, from every rank
        row = dict(rows[0])
        for key in ("gather_sample_s", "vocab_parallel_s"):  # the slower rank sets the step time
            row[key] = max(r[key] for r in rows)
        row["tokens_equal"] = all(r["tokens_equal"] for r in rows)
        row["ratio"] = row["gather_sample_s"] / max(row["vocab_parallel_s"], 1e-12)
        out.append(row)
    return out
