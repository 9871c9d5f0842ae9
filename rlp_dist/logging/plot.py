"""`rlp-dist plot RUN_DIR`: the main curves of a run from ``<run.dir>/metrics.jsonl``, as one PNG.

For people without wandb. Panels (those with data in the file): RLP loss, reward (information gain)
with S_pred and S_ema, share of positive gains, thought length and closed fraction, clip fraction
and approximate KL, EMA parameter gap, NTP loss, learning rate and gradient norm, step time and
thought tokens/s, memory (sys/*). Writes ``RUN_DIR/curves.png`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

PANELS = [
    ("RLP loss", ["rlp/loss"]),
    ("reward / log-probs (nats)", ["rlp/reward_mean", "rlp/s_pred_mean", "rlp/s_ema_mean"]),
    ("gain > 0 share", ["rlp/gain_pos_frac"]),
    ("thought length", ["rlp/thought_len_mean"]),
    ("thoughts closed", ["rlp/closed_frac"]),
    ("clip fraction / approx KL", ["rlp/clip_frac", "rlp/approx_kl"]),
    ("EMA param gap", ["ema/param_gap"]),
    ("NTP loss", ["ntp/loss"]),
    ("learning rate", ["optim/lr"]),
    ("grad norm", ["optim/grad_norm"]),
    ("step time (s)", ["perf/step_s"]),
    ("thought tokens/s", ["perf/thought_tok_per_s"]),
    ("memory (GiB)", ["sys/rss_gb", "sys/cuda_max_allocated_gb"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")


def read_metrics(path: pathlib.Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(run_dir: str, out: str | None = None) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    src = pathlib.Path(run_dir) / "metrics.jsonl"
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass the run.dir of a training run")
    rows = read_metrics(src)
    panels = [(t, [k for k in keys if series(rows, k)[0]]) for t, keys in PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        from rlp_dist.config.schema import ConfigError

        raise ConfigError(f"{src} holds no known metrics ({len(rows)} readable rows); plot a run that has logged "
                          f"at least one step (an rlp-dist metrics.jsonl)")
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            x, y = series(rows, k)
            ax.plot(x, y, label=k, marker="." if len(x) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{pathlib.Path(run_dir).resolve().name}: {len(rows)} logged steps")
    fig.tight_layout()
    dest = pathlib.Path(out) if out else pathlib.Path(run_dir) / "curves.png"
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def run(args: argparse.Namespace) -> int:
    dest = plot(args.run_dir, args.out)
    print(f"rlp-dist plot: wrote {dest}")
    return 0
