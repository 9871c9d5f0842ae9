"""Peak memory and time of the log-prob of N target tokens from hidden states, forward + backward:
the naive full-logits path vs the fused chunked op (:func:`rlp_kernels.dispatch.linear_logprob`).

    python -m rlp_dist.bench logprob --json OUT [--n 2048] [--hidden 256] [--vocab 151936]
                                     [--dtype float32] [--device cpu] [--chunk N] [--forward-only]

Each variant runs in a fresh (spawned) process on the same seeded inputs: hidden (N, H) and weight (V, H),
both requiring grad, targets (N,), loss = sum(logp * g). ``peak_extra_gb``: on CPU the process's peak RSS
(``ru_maxrss``) minus its RSS once the inputs exist; on CUDA ``max_memory_allocated`` minus the allocated
bytes before the op. Either includes the gradients themselves (``grads_gb``: grad_W (V, H) + grad_h (N, H)),
which both variants must produce. The naive path's logits workspace is several (N, V) tensors: at G=16,
L=2048 (N=32768) and V=151936 one fp32 copy is 20 GB; the fused op's is O(chunk x V).
``time_*_s``: forward + backward, wall time on CUDA; on CPU the process's CPU time (user + sys, one thread),
which other jobs on a shared machine disturb far less than wall time.
``max_abs_diff_logp``: fused vs naive log-probs (the bench checks what it times).
The CPU default shape takes ~15 s of CPU time in all; bf16 is for CUDA (CPU bf16 matmuls are ~10x slower
than fp32 here).
"""

from __future__ import annotations

import argparse
import time

VARIANTS = ("naive", "fused")


def _variant_main(variant: str, n: int, h: int, v: int, dtype_name: str, device: str, chunk, forward_only: bool,
                  queue) -> None:
    import os
    import resource

    import psutil
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from rlp_kernels import dispatch
    from rlp_kernels.logprob.reference import naive_linear_logprob

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    # Created directly in their dtype on their device: no transient copy that would raise the baseline peak.
    hidden = torch.randn(n, h, generator=g, dtype=dtype, device=device).requires_grad_(not forward_only)
    weight = torch.randn(v, h, generator=g, dtype=dtype, device=device).mul_(h ** -0.5)  # in place: no transient copy
    weight.requires_grad_(not forward_only)
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    gout = torch.randn(n, generator=g, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    fn = naive_linear_logprob if variant == "naive" else dispatch.linear_logprob
    clock = time.perf_counter if cuda else time.process_time  # CPU: this process's CPU seconds (shared machines)
    t0 = clock()
    logp = fn(hidden, weight, targets, 1.0, chunk_tokens=chunk)
    if not forward_only:
        (logp * gout).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    elapsed = clock() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(dict(variant=variant, seconds=elapsed, peak_extra_gb=(peak - base) / 1e9,
                   backend=dispatch.backend("linear_logprob", hidden.device),
                   logp=logp.detach().cpu().tolist()))  # a list: a tensor would be shared by a file descriptor


def _run_fresh(*args) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_variant_main, args=(*args, queue))
    proc.start()
    try:
        out = queue.get(timeout=900)
    finally:
        proc.join(timeout=60)
    if proc.exitcode not in (0, None):
        raise RuntimeError(f"bench logprob: the {args[0]} process exited with code {proc.exitcode}")
    return out


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench logprob")
    p.add_argument("--n", type=int, default=2048, help="target tokens (rows)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--chunk", type=int, default=None, help="chunk_tokens of the fused op (default: its own)")
    p.add_argument("--forward-only", action="store_true",
                   help="no gradients (the EMA teacher's and the rollout's scoring)")
    a = p.parse_args(argv)
    if min(a.n, a.hidden, a.vocab) < 1:
        raise SystemExit(f"bench logprob: --n, --hidden and --vocab must be >= 1, got {a.n}, {a.hidden}, {a.vocab}")
    from rlp_kernels.logprob.reference import default_chunk_tokens

    res = {v: _run_fresh(v, a.n, a.hidden, a.vocab, a.dtype, a.device, a.chunk, a.forward_only) for v in VARIANTS}
    itemsize = 2 if a.dtype == "bfloat16" else 4
    naive, fused = res["naive"], res["fused"]
    return dict(
        n=a.n, hidden=a.hidden, vocab=a.vocab, dtype=a.dtype, device=a.device, forward_only=a.forward_only,
        chunk_tokens=a.chunk or default_chunk_tokens(a.vocab), fused_backend=fused["backend"],
        logits_fp32_gb=a.n * a.vocab * 4 / 1e9,
        grads_gb=0.0 if a.forward_only else (a.vocab + a.n) * a.hidden * itemsize / 1e9,
        peak_naive_gb=naive["peak_extra_gb"], peak_fused_gb=fused["peak_extra_gb"],
        peak_ratio=fused["peak_extra_gb"] / max(naive["peak_extra_gb"], 1e-12),
        time_naive_s=naive["seconds"], time_fused_s=fused["seconds"],
        time_ratio=naive["seconds"] / max(fused["seconds"], 1e-12),
        max_abs_diff_logp=max(abs(x - y) for x, y in zip(naive["logp"], fused["logp"])),
    )
