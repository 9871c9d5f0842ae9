"""`rlp-dist plan +model=NAME [Hydra overrides] --gpu-mem 80 [--gpus 32] [--json OUT]`: will it fit?

Before launch, from the composed config alone (no model is built, nothing is allocated): per-GPU
memory by part (rlp_dist.perf.memory, worst pipeline stage), FLOPs per optimizer step by phase
(rlp_dist.perf.flops, with every thought at its cap L unless ``--thought-len``), and whether the peak
fits ``--gpu-mem`` GB less the margin (10% + 2 GB). If it does not, the knobs a Megatron user would turn
are turned — model.recompute, rlp.thoughts_per_micro_batch, rlp.contexts_per_micro_batch, parallel.tp,
parallel.pp — one step at a time, breadth first: the layouts that fit with the fewest turns are listed,
the largest (least recomputation and splitting) first. Every suggestion is a re-plan of the changed
layout and a validated config (``validate(cfg, world)``), printed as overrides.

``--gpus`` is the world size (default 32, the paper's 32 H100s); dp = gpus / (tp * pp).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Optional

from rlp_dist.perf import flops as F
from rlp_dist.perf import memory as M

DEFAULT_GPUS = 32
MAX_TP = 8  # one NVLink node


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="+", help="Hydra overrides, e.g. +model=qwen3_1_7b train.dtype=bf16")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB of memory per GPU (default 80)")
    p.add_argument("--gpus", type=int, default=DEFAULT_GPUS, help=f"world size (default {DEFAULT_GPUS})")
    p.add_argument("--thought-len", type=float, default=None,
                   help="mean thought tokens per rollout for the FLOP count (default: rlp.thought_max_tokens)")
    p.add_argument("--path", choices=("fused", "logits"), default="fused",
                   help="training path: fused (hidden states -> fused log-probs, default) or logits (reference)")
    p.add_argument("--json", dest="json_out", default=None, help="write the plan as JSON to this file")


def _knob_overrides(lay: M.Layout) -> dict[str, str]:
    return {"parallel.tp": str(lay.tp), "parallel.pp": str(lay.pp), "parallel.zero_stage": str(lay.zero_stage),
            "model.recompute": lay.recompute, "rlp.contexts_per_micro_batch": str(lay.contexts_per_micro_batch),
            "rlp.thoughts_per_micro_batch": str(lay.thoughts_per_micro_batch)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg, lay: M.Layout) -> list[tuple[str, M.Layout]]:
    """One-step changes of the layout that lower memory, each still a valid layout for cfg."""
    m, r = cfg.model, cfg.rlp
    out = []
    nxt = {"none": "selective", "selective": "full"}.get(lay.recompute)
    if nxt:
        out.append(("model.recompute", replace(lay, recompute=nxt)))
    if cfg.objective == "rlp":
        g = lay.thoughts_per_micro_batch or r.group_size
        smaller = [d for d in _divisors(r.group_size) if d < g]
        if smaller:
            out.append(("rlp.thoughts_per_micro_batch", replace(lay, thoughts_per_micro_batch=smaller[-1])))
        local = r.contexts_per_step // lay.dp
        k = r.contexts_per_document
        cpm = [d for d in _divisors(local) if d < lay.contexts_per_micro_batch and d % k == 0]
        if cpm:
            out.append(("rlp.contexts_per_micro_batch", replace(lay, contexts_per_micro_batch=cpm[-1])))
    heads = [m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size] + (
        [m.mamba_num_heads] if m.arch == "hybrid" else [])
    tp2 = lay.tp * 2
    if tp2 <= MAX_TP and all(h % tp2 == 0 for h in heads) and lay.world % (tp2 * lay.pp) == 0:
        out.append(("parallel.tp", _fit_batch(cfg, replace(lay, tp=tp2))))
    pp2 = lay.pp * 2
    if pp2 <= m.num_layers and lay.world % (lay.tp * pp2) == 0:
        out.append(("parallel.pp", _fit_batch(cfg, replace(lay, pp=pp2, zero_stage=min(lay.zero_stage, 1)))))
    return [(k, v) for k, v in out if v is not None]


def _fit_batch(cfg, lay: M.Layout) -> Optional[M.Layout]:
    """A smaller dp may leave contexts_per_micro_batch not dividing the contexts per rank: keep it valid."""
    if cfg.objective != "rlp":
        return lay
    local = cfg.rlp.contexts_per_step // lay.dp
    if cfg.rlp.contexts_per_step % lay.dp or local < 1:
        return None
    if local % lay.contexts_per_micro_batch:
        ok = [d for d in _divisors(local) if d <= lay.contexts_per_micro_batch]
        lay = replace(lay, contexts_per_micro_batch=ok[-1])
    return lay


def search(cfg, lay: M.Layout, budget: float, prompt_tokens: int = 0, max_depth: int = 4, keep: int = 4):
    """Fitting layouts reachable with the fewest knob turns (breadth first, up to ``max_depth``), the
    ``keep`` largest first (the most memory used: the least recomputation and splitting, so the fastest).
    Each entry: (knobs turned, layout, peak bytes)."""
    frontier, seen = [([], lay)], {lay}
    for _ in range(max_depth):
        nxt, fits = [], []
        for knobs, cur, *_ in frontier:
            for k, x in candidates(cfg, cur):
                if x in seen:
                    continue
                seen.add(x)
                pk = M.plan_memory(cfg, x, prompt_tokens)["peak"]
                (fits if pk <= budget else nxt).append((knobs + [k], x, pk))
        if fits:
            return sorted(fits, key=lambda f: -f[2])[:keep]
        frontier = nxt
    return []


def plan(overrides: list[str], gpu_mem: float = 80.0, gpus: int = DEFAULT_GPUS, thought_len: Optional[float] = None,
         path: str = "fused", prompt_tokens: int = 0) -> dict:
    """The plan of a composed config (Hydra overrides) as a dict, see :func:`plan_config`."""
    from rlp_dist.config import compose

    return plan_config(compose(overrides, world_size=gpus), gpu_mem, gpus, thought_len, path, prompt_tokens)


def plan_config(cfg, gpu_mem: float = 80.0, gpus: int = DEFAULT_GPUS, thought_len: Optional[float] = None,
                path: str = "fused", prompt_tokens: int = 0, dtype_bytes: Optional[int] = None) -> dict:
    """The plan of a RootConfig: fits, total_gb, parts (GB), phases (GB), flops_per_step, suggestions.
    dtype_bytes overrides train.dtype's size (e.g. 4 for an fp32 run on CPU)."""
    lay = replace(M.layout_from_config(cfg, gpus, dtype_bytes), path=path)
    mem = M.plan_memory(cfg, lay, prompt_tokens)
    budget = M.budget_bytes(gpu_mem)
    lt = thought_len if thought_len is not None else cfg.rlp.thought_max_tokens
    fl = F.step_flops(cfg, thought_len_mean=lt) if cfg.objective == "rlp" else F.step_flops(cfg)
    out = {
        "model": cfg.model.name, "objective": cfg.objective, "gpus": gpus, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp,
        "zero_stage": lay.zero_stage, "dtype_bytes": lay.dtype_bytes, "recompute": lay.recompute, "path": path,
        "gpu_mem_gb": gpu_mem, "budget_gb": budget / M.GB, "fits": mem["peak"] <= budget,
        "total_gb": mem["peak"] / M.GB, "worst_stage": mem["stage"],
        "parts": {k: v / M.GB for k, v in mem["parts"].items()},
        "phases": {k: mem[k] / M.GB for k in ("persistent", "rollout", "training")},
        "flops_per_step": fl, "tflop_per_gpu_per_step": fl["total"] / gpus / 1e12,
        "thought_len_for_flops": lt,
    }
    if cfg.objective == "rlp":
        out["cpt_equivalent_tokens_per_step"] = F.cpt_equivalent_tokens_of(cfg, 1)
    if not out["fits"]:
        out["suggestions"] = [{"knobs": knobs, "overrides": _validated(cfg, _changed(lay, x), gpus), "total_gb": pk / M.GB}
                              for knobs, x, pk in search(cfg, lay, budget, prompt_tokens)]
    return out


def startup_line(cfg, gpus: int, dtype_bytes: Optional[int] = None) -> str:
    """One line for the training start-up log: the plan's per-GPU peak by phase and the step's FLOPs."""
    p = plan_config(cfg, gpu_mem=float("inf"), gpus=gpus, dtype_bytes=dtype_bytes)
    ph = p["phases"]
    return (f"plan: {p['total_gb']:.2f} GB per GPU at peak (persistent {ph['persistent']:.2f} + max(rollout "
            f"{ph['rollout']:.2f}, training {ph['training']:.2f})), {p['flops_per_step']['total']:.3g} FLOPs per step "
            f"at full-length thoughts ({p['tflop_per_gpu_per_step']:.1f} TFLOP per GPU)")


def _validated(cfg, overrides: dict[str, str], gpus: int) -> dict[str, str]:
    """Apply the overrides to a copy of cfg (re-running each section's checks) and validate(cfg, world)."""
    from dataclasses import fields

    from rlp_dist.config.schema import validate

    sections = {}
    for key, value in overrides.items():
        sec, name = key.split(".")
        sections.setdefault(sec, {})[name] = value
    new = cfg
    for sec, kv in sections.items():
        old = getattr(new, sec)
        types = {f.name: type(getattr(old, f.name)) for f in fields(old)}
        new = replace(new, **{sec: replace(old, **{k: types[k](v) for k, v in kv.items()})})
    validate(new, gpus)
    return overrides


def _changed(old: M.Layout, new: M.Layout) -> dict[str, str]:
    a, b = _knob_overrides(old), _knob_overrides(new)
    return {k: v for k, v in b.items() if a[k] != v}


def format_plan(p: dict) -> str:
    lines = [f"{p['model']} ({p['objective']}) on {p['gpus']} GPUs x {p['gpu_mem_gb']:g} GB: tp={p['tp']} pp={p['pp']} "
             f"dp={p['dp']} zero={p['zero_stage']} {'bf16' if p['dtype_bytes'] == 2 else 'fp32'} "
             f"recompute={p['recompute']} path={p['path']}",
             f"memory per GPU (worst pipeline stage {p['worst_stage']}), GB:"]
    for k, v in p["parts"].items():
        lines.append(f"  {k:<18} {v:8.2f}")
    ph = p["phases"]
    lines.append(f"  {'= persistent':<18} {ph['persistent']:8.2f}   rollout {ph['rollout']:.2f}   "
                 f"training {ph['training']:.2f}   (peak = persistent + max of the two phases)")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"peak {p['total_gb']:.2f} GB vs budget {p['budget_gb']:.2f} GB "
                 f"({p['gpu_mem_gb']:g} GB less 10% and 2 GB): {verdict}")
    fl = p["flops_per_step"]
    lines.append(f"FLOPs per step (all GPUs; thoughts of {p['thought_len_for_flops']:g} tokens): "
                 + ", ".join(f"{k} {v:.3g}" for k, v in fl.items())
                 + f"; {p['tflop_per_gpu_per_step']:.1f} TFLOP per GPU")
    if "cpt_equivalent_tokens_per_step" in p:
        lines.append(f"paper's T_flop per step: {p['cpt_equivalent_tokens_per_step']:.3g} CPT-equivalent tokens")
    if p["dtype_bytes"] == 4:
        lines.append("note: train.dtype=fp32 (4-byte weights and activations); GPU runs normally set train.dtype=bf16")
    for s in p.get("suggestions", []):
        ov = " ".join(f"{k}={v}" for k, v in s["overrides"].items())
        lines.append(f"  try: {ov}   -> {s['total_gb']:.2f} GB (re-planned, fits)")
    if not p["fits"] and not p.get("suggestions"):
        lines.append("  no knob combination fits: use more GPUs (--gpus), a larger GPU, or shorter thoughts/contexts")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.gpu_mem <= 0 or args.gpus < 1:
        from rlp_dist.config.schema import ConfigError

        raise ConfigError(f"--gpu-mem={args.gpu_mem} and --gpus={args.gpus} must be positive; e.g. --gpu-mem 80 --gpus 32")
    if M.budget_bytes(args.gpu_mem) <= 0:
        from rlp_dist.config.schema import ConfigError

        raise ConfigError(f"--gpu-mem={args.gpu_mem} GB leaves nothing after the margin ({M.MARGIN_FRAC:.0%} + "
                          f"{M.MARGIN_GB:g} GB); give the GPU's memory, e.g. --gpu-mem 80")
    p = plan(args.overrides, args.gpu_mem, args.gpus, args.thought_len, args.path)
    print(format_plan(p))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(p, f, indent=1)
    return 0 if p["fits"] else 1
