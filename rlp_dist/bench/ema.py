"""EMA teacher update: our shard-local update vs a gather-based one, on the same ZeRO-3 model at DP=2.

    python -m rlp_dist.bench ema --json OUT [--ranks 2] [--repeats 20] [--set model.hidden_size=512 ...]

Both variants update a ZeRO-3 partitioned teacher from a ZeRO-3 student (phi <- tau phi + (1-tau) theta):

- ``update``: :meth:`rlp_dist.rlp.ema.EmaTeacher.update` — lerp of the fp32 shard masters towards the
  student's fp32 shards, local arithmetic only.
- ``gather_update``: DeepSpeed-Chat / OpenRLHF ``moving_average`` style — per parameter, gather the
  student and teacher parameters with ``GatheredParameters`` and update the full teacher tensor. It
  uses ``modifier_rank=0`` so the update persists (without it ZeRO-3 discards the write on exit: the
  bug OpenRLHF shipped), which adds a broadcast per parameter.

Bytes are what this rank sends, counted at the ProcessGroup method level; times are the median
over ``repeats`` updates (each after a barrier). Ranks are spawned here (gloo on CPU).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.distributed as dist

DEFAULT_SET = ("model.hidden_size=256", "model.ffn_hidden_size=768", "model.num_layers=4",
               "model.num_attention_heads=8", "model.num_query_groups=4", "model.kv_channels=32")


def gather_update(student, teacher_module, tau: float) -> None:
    """The gather-based EMA (DeepSpeed-Chat ``moving_average``, with the write made to persist)."""
    import deepspeed

    sp = dict(student.named_parameters())
    with torch.no_grad():
        for name, t in teacher_module.named_parameters():
            s = sp[name]
            # Gathers both full tensors (all-gather over DP); on exit rank 0's teacher tensor is
            # broadcast and re-partitioned.
            with deepspeed.zero.GatheredParameters([s, t], modifier_rank=0):
                t.data.copy_(torch.lerp(s.data.float(), t.data.float(), tau).to(t.dtype))


def _timed(fn, repeats: int):
    from rlp_dist.rlp.ema import count_collectives

    times, counter = [], None
    for _ in range(repeats):
        dist.barrier()
        with count_collectives() as c:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        counter = c
    return statistics.median(times), counter


def _rank_main(overrides: list[str], repeats: int, tau: float, world: int, dtype: str) -> dict:
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.rlp.ema import EmaTeacher
    from rlp_dist.train import build_student, wrap_deepspeed

    dims = init_distributed(1, 1, "gloo")
    cfg = compose(["+model=tiny_transformer", "rlp=tiny", "objective=ntp", "parallel.zero_stage=3",
                   f"train.dtype={dtype}", "ntp.seq_len=16", f"ntp.sequences_per_step={world}",
                   "ntp.sequences_per_micro_batch=1", *overrides], world)
    vocab = cfg.model.vocab_size
    torch.manual_seed(cfg.train.seed)
    engine = wrap_deepspeed(build_student(cfg, vocab), cfg, dims)
    # One optimizer step so the student's fp32 masters exist and differ from the initial weights.
    ids = torch.randint(0, vocab, (1, 17))
    loss = engine(ids[:, :-1], torch.arange(16)[None], None).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()
    ours = EmaTeacher(build_student(cfg, vocab, load_weights=False), tau, 1, dims, dtype)
    ref = EmaTeacher(build_student(cfg, vocab, load_weights=False), tau, 1, dims, dtype)
    ours.initialize(engine.module)
    ref.initialize(engine.module)
    steps = iter(range(1, 1 << 30))
    update_s, c_ours = _timed(lambda: ours.update(engine.module, next(steps)), repeats)
    gather_s, c_gather = _timed(lambda: gather_update(engine.module, ref.module, tau), repeats)
    # Same number of updates from the same start: both teachers hold the same values.
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ours.shards, ref.shards) if a.numel())
    n_params = sum(p.ds_numel for p in ours.params)
    return {"update_s": update_s, "gather_update_s": gather_s, "update_bytes": c_ours.bytes,
            "gather_update_bytes": c_gather.bytes, "update_collectives": c_ours.calls,
            "gather_update_collectives": c_gather.calls, "teacher_max_abs_diff": diff, "params": n_params,
            "tensors": len(ours.params)}


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench ema")
    p.add_argument("--ranks", type=int, default=2, help="DP ranks (gloo processes)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tau", type=float, default=0.999)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--set", nargs="*", default=list(DEFAULT_SET), help="config overrides (model size)")
    a = p.parse_args(argv)
    from rlp_dist.bench._ranks import spawn_ranks

    results = spawn_ranks(_rank_main, a.ranks, a.set, a.repeats, a.tau, a.ranks, a.dtype)
    r0 = results[0]
    out = {k: max(r[k] for r in results.values()) if k.endswith("_s") else r0[k] for k in r0}
    out["update_bytes"] = sum(r["update_bytes"] for r in results.values())  # over all ranks
    out["gather_update_bytes"] = sum(r["gather_update_bytes"] for r in results.values())
    out["ratio"] = out["gather_update_s"] / max(out["update_s"], 1e-12)
    out.update({"dp": a.ranks, "dtype": a.dtype, "tau": a.tau, "repeats": a.repeats, "model_overrides": a.set,
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch "
                           f"{torch.__version__}, CPU gloo"})
    return out
