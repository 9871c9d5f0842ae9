"""Peak memory of one policy-gradient micro-batch: the hidden-state seam vs the pre-seam path.

    python -m rlp_dist.bench memory --json OUT [--layers 2] [--shapes 8x512x512,4x1024x1024]
        [--contexts 1] [--recompute none] [--thoughts-per-micro-batch 0]

One micro-batch = ``contexts`` contexts of P prefix tokens with G thoughts of L tokens each, at
Qwen3-1.7B width (hidden 2048, 16/8 heads of 128, SwiGLU 6144, tied V=151936) with ``layers`` layers:
the shared-prefix forward, the clipped surrogate and the backward, as the trainer runs it.

- ``old``: today's path before the seam: the packed forward with the dense branch attention (the
  (B, groups, G, heads/group, T, P) score tensor and its exp kept for backward) returning full logits,
  the (N, L, V) thought logits selected, ``token_logprobs`` over them;
- ``new``: the seam: the packed forward with the memory-bounded branch attention (one masked SDPA per
  thought) returning final-norm hidden states, the fused chunked log-prob op on the selected rows
  (``rlp.shared_prefix.policy_logprobs``), with ``model.recompute`` and the thoughts split over
  ``G / thoughts_per_micro_batch`` backward passes when asked.

Each (shape, variant) runs in a fresh process: a warm-up step allocates the parameter gradients (the
trainer's gradient buffers exist before any micro-batch), then the measured step. Peak = the highest
resident set size seen during the measured step (sampled every millisecond, and the kernel's ru_maxrss)
minus the RSS before it (CPU), or ``max_memory_allocated`` minus the allocated bytes before it (CUDA,
bf16). Rows: ``peak_new_gb``, ``peak_old_gb``, ``peak_ratio`` = new/old (goal <= 0.25), ``time_new_s``,
``time_old_s``, ``time_ratio`` = old/new step time (goal >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Optional

SHAPES = "8x512x512,4x1024x1024"  # G x L x P: 4096 thought tokens, the most the old path fits in 24 GB on CPU


def measure_policy_peak(shape: dict, variant: str, timeout: float = 1800.0) -> dict:
    """Run one (shape, variant) in a fresh process. shape: {G, L, P, contexts, layers, recompute,
    thoughts_per_micro_batch, hidden?, ffn?, heads?, groups?, vocab?}. Returns {peak_gb, base_gb,
    time_s, device}."""
    spec = json.dumps({"shape": shape, "variant": variant})
    # glibc keeps freed small blocks in its heap after the warm-up step, so a later step's activations
    # reuse them without raising the RSS; serving every block of 64 kB and more by mmap makes the RSS
    # follow the live tensors (measured: 0.44 GB seen instead of 0.75 GB without it).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536"))
    r = subprocess.run([sys.executable, "-m", "rlp_dist.bench.memory", "--worker", spec], capture_output=True,
                       text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"bench memory worker ({variant}, {shape}) failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _model_overrides(shape: dict) -> list[str]:
    o = [f"model.num_layers={shape.get('layers', 2)}", f"model.recompute={shape.get('recompute', 'none')}"]
    for key, field in (("hidden", "hidden_size"), ("ffn", "ffn_hidden_size"), ("heads", "num_attention_heads"),
                       ("groups", "num_query_groups"), ("kv", "kv_channels"), ("vocab", "vocab_size")):
        if key in shape:
            o.append(f"model.{field}={shape[key]}")
    return o


class _PeakRSS:
    """The highest RSS of this process while active (a 1 ms sampling thread, plus ru_maxrss)."""

    def __enter__(self):
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        import resource

        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _worker(spec: dict) -> dict:
    import torch

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import free_port, init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.logprobs import token_logprobs
    from rlp_dist.rlp.losses import clipped_surrogate
    from rlp_dist.rlp.rollout import RolloutBatch
    from rlp_dist.rlp.shared_prefix import policy_logits, policy_logprobs
    from rlp_dist.train import split_thoughts, ScoredBatch

    shape, variant = spec["shape"], spec["variant"]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed(1, 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    mcfg = compose(["+model=qwen3_1_7b", *_model_overrides(shape)]).model
    torch.manual_seed(0)
    model = build_model(mcfg, dtype).to(device)
    model.train()
    g, big_l, p, b = shape["G"], shape["L"], shape["P"], shape.get("contexts", 1)
    n, v = b * g, mcfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    lengths = torch.full((n,), big_l)  # every thought at the cap: the worst case the plan budgets for
    mask = (torch.arange(big_l) < lengths[:, None]).float()
    ro = RolloutBatch(prefix=torch.randint(8, v, (b, p), generator=gen), next_tokens=torch.randint(8, v, (b,)),
                      thoughts=torch.randint(8, v, (n, big_l), generator=gen), mask=mask,
                      behaviour_logp=-5.0 + 0.3 * torch.randn(n, big_l, generator=gen) * mask,
                      closed=torch.ones(n, dtype=torch.bool), s_pred=torch.zeros(n), group_size=g)
    ro = RolloutBatch(**{k: (x.to(device) if torch.is_tensor(x) else x) for k, x in vars(ro).items()})
    adv = torch.randn(n, generator=gen).to(device)
    per = shape.get("thoughts_per_micro_batch", 0) or g

    def step():
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: they exist before a micro-batch
        if variant == "old":
            logits = policy_logits(ro, model, shared=True, attention="dense")  # (N, L, V)
            logp = token_logprobs(logits, ro.thoughts, 0.7)
            loss, _ = clipped_surrogate(logp, ro.behaviour_logp, adv, ro.mask, 0.2, 0.2)
            loss.backward()
            return
        sb = ScoredBatch(ro, ro.s_pred.view(b, g), None, None, adv)
        for part in split_thoughts(sb, per):  # backward passes of `per` thoughts (DeepSpeed averages)
            logp = policy_logprobs(part.rollout, model, shared=True, temperature=0.7)  # (b*per, L) fp32
            loss, _ = clipped_surrogate(logp, part.rollout.behaviour_logp, part.advantages, part.rollout.mask,
                                        0.2, 0.2)
            (loss / (g // per)).backward()

    step()  # warm-up: allocates .grad, first-touch costs
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with _PeakRSS() as m:
            t0 = time.perf_counter()
            step()
            t = time.perf_counter() - t0
        base, peak = m.base, m.peak - m.base
    return {"peak_gb": peak / 1e9, "base_gb": base / 1e9, "time_s": t, "device": device.type}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m rlp_dist.bench memory")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated GxLxP (thoughts x thought length x prefix)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--contexts", type=int, default=1)
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ap.add_argument("--thoughts-per-micro-batch", type=int, default=0)
    args = ap.parse_args(argv)
    rows = []
    for text in args.shapes.split(","):
        try:
            g, big_l, p = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise SystemExit(f"bench memory: --shapes entry {text!r} is not GxLxP (e.g. 4x256x256)") from None
        shape = {"G": g, "L": big_l, "P": p, "contexts": args.contexts, "layers": args.layers,
                 "recompute": args.recompute, "thoughts_per_micro_batch": args.thoughts_per_micro_batch}
        old = measure_policy_peak({**shape, "recompute": "none", "thoughts_per_micro_batch": 0}, "old")
        new = measure_policy_peak(shape, "new")
        rows.append({**shape, "device": new["device"], "peak_new_gb": round(new["peak_gb"], 3),
                     "peak_old_gb": round(old["peak_gb"], 3), "peak_ratio": round(new["peak_gb"] / old["peak_gb"], 3),
                     "time_new_s": round(new["time_s"], 2), "time_old_s": round(old["time_s"], 2),
                     "time_ratio": round(old["time_s"] / new["time_s"], 3)})
    return {"benchmark": "memory", "model": "qwen3_1_7b width", "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(main(sys.argv[1:]), indent=2))
