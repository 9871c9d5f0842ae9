"""`rlp-dist compare RUN...`: the eval metrics of several runs against cumulative training FLOPs.

    rlp-dist compare RUN_A RUN_B ... [--metrics eval/gain_mean,eval/nll_no_think] [--out DIR]

Each run directory's ``metrics.jsonl`` holds the in-loop eval rows (``eval/*``, written every
``eval.every`` steps, see rlp_dist.eval.loop) and, per step, ``perf/flops_total`` (the cumulative
analytic FLOPs of rlp_dist.perf.flops). Each eval point is placed at the cumulative FLOPs of its step:
the paper's compute-matched view (RLP and the CPT baseline ``objective=ntp`` on one axis). A run
without ``perf/flops_total`` falls back to its step number, and the plot and table say so.

Writes DIR/compare.png (one panel per metric) and DIR/compare.md (the last value of each metric per run,
with the run's final FLOPs; default DIR: the current directory) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

DEFAULT_METRICS = ("eval/gain_mean", "eval/nll_no_think", "eval/nll_think", "eval/gain_pos_frac",
                   "eval/thought_len_mean", "eval/closed_frac")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories holding metrics.jsonl")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma-separated metric names")
    p.add_argument("--labels", default=None, help="comma-separated labels (default: run directory names)")
    p.add_argument("--out", default=".", help="directory for compare.png and compare.md")


def run_series(run: str, metrics: list[str]) -> dict:
    """{"x": "flops"|"step", "points": {metric: [(x, value), ...]}, "final": {metric: value},
    "flops_final": float|None} of one run directory."""
    from rlp_dist.config.schema import ConfigError

    path = pathlib.Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run}: no metrics.jsonl; pass run directories of rlp-dist training runs")
    flops_at: dict[int, float] = {}
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        rows.append(row)
        if "perf/flops_total" in row and "step" in row:
            flops_at[int(row["step"])] = float(row["perf/flops_total"])
    use_flops = bool(flops_at)
    points: dict[str, list] = {m: [] for m in metrics}
    for row in rows:
        step = int(row.get("step", 0))
        for m in metrics:
            v = row.get(m)
            if isinstance(v, (int, float)) and math.isfinite(v):
                x = _flops_at(flops_at, step) if use_flops else float(step)
                if x is not None:
                    points[m].append((x, float(v)))
    return {"x": "flops" if use_flops else "step", "points": points,
            "final": {m: pts[-1][1] for m, pts in points.items() if pts},
            "flops_final": max(flops_at.values()) if flops_at else None}


def _flops_at(flops_at: dict[int, float], step: int):
    """Cumulative FLOPs at ``step`` (the latest logged step <= step when that step was not logged)."""
    if step in flops_at:
        return flops_at[step]
    earlier = [s for s in flops_at if s <= step]
    return flops_at[max(earlier)] if earlier else 0.0


def markdown_table(labels: list[str], series: list[dict], metrics: list[str]) -> str:
    head = "| run | x axis | final FLOPs | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (3 + len(metrics))]
    for label, s in zip(labels, series):
        flops = f"{s['flops_final']:.3e}" if s["flops_final"] is not None else "n/a"
        vals = [f"{s['final'][m]:.4f}" if m in s["final"] else "-" for m in metrics]
        lines.append(f"| {label} | {s['x']} | {flops} | " + " | ".join(vals) + " |")
    if any(s["x"] == "step" for s in series):
        lines.append("")
        lines.append("Note: runs with x axis 'step' have no perf/flops_total in metrics.jsonl; their points are "
                     "placed at their step number, not comparable with FLOPs.")
    return "\n".join(lines) + "\n"


def plot(labels: list[str], series: list[dict], metrics: list[str], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(s["points"][m] for s in series)] or metrics[:1]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    mixed = len({s["x"] for s in series}) > 1
    for ax, m in zip(axes.flat, shown):
        for label, s in zip(labels, series):
            pts = s["points"][m]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=label + (" (x = step)" if mixed and s["x"] == "step" else ""))
        ax.set_title(m)
        ax.set_xlabel("cumulative training FLOPs" if all(s["x"] == "flops" for s in series) else
                      "cumulative FLOPs (runs marked 'x = step': step)" if mixed else "step (no perf/flops_total)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from rlp_dist.config.schema import ConfigError

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    labels = args.labels.split(",") if args.labels else [pathlib.Path(r).resolve().name for r in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels has {len(labels)} names for {len(args.runs)} runs; give one per run")
    series = [run_series(r, metrics) for r in args.runs]
    if not any(pts for s in series for pts in s["points"].values()):
        raise ConfigError(f"none of the runs logged {', '.join(metrics)}; train with eval.every=N eval.data=PATH "
                          f"(in-loop eval) or pass --metrics naming logged keys")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(labels, series, metrics)
    (out / "compare.md").write_text(table)
    plot(labels, series, metrics, out / "compare.png")
    print(table, end="")
    print(f"wrote {out / 'compare.png'} and {out / 'compare.md'}")
    return 0
