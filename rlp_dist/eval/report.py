"""Human-readable outputs of ``rlp-dist eval``: the gain histogram (PNG) and sample thoughts (markdown).

gain of a thought = S_pred - S_no = log p(x_t | x_<t, c) - log p(x_t | x_<t), in nats; per position the
log-mean-exp over its G thoughts minus S_no (see rlp_dist.eval.core).
"""

from __future__ import annotations

import math
import pathlib


def gain_histogram(records: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_thought = [s - r["logp_no_think"] for r in records for s in r["s_pred"]]
    per_position = [r["s_pred_lme"] - r["logp_no_think"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    if per_thought:
        lo, hi = min(per_thought + per_position), max(per_thought + per_position)
        bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
        ax.hist(per_thought, bins=bins, alpha=0.6, label=f"per thought (mean {sum(per_thought) / len(per_thought):+.3f})")
        ax.hist(per_position, bins=bins, alpha=0.6,
                label=f"per position, log-mean-exp (mean {sum(per_position) / len(per_position):+.3f})")
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("gain = log p(x_t | x_<t, thought) - log p(x_t | x_<t)  [nats]")
    ax.set_ylabel("count")
    ax.set_title(f"think vs no-think, {len(records)} positions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def samples_markdown(records: list[dict], thoughts_per_position: int = 4) -> str:
    lines = ["# Sample thoughts", "",
             "gain = S_pred - S_no (nats); S_no = log p(x_t | x_<t) without a thought.", ""]
    for r in records:
        lines.append(f"## document {r['document']}, position {r['position']}: next token {r['token_text']!r} "
                     f"(S_no {r['logp_no_think']:.3f}" + (f", S_ema {r['logp_no_think_ema']:.3f}"
                                                          if r.get("logp_no_think_ema") is not None else "") + ")")
        lines.append("")
        lines.append("| thought | S_pred | gain | closed |")
        lines.append("|---|---|---|---|")
        for text, s, closed in list(zip(r["thoughts"] or [""] * len(r["s_pred"]), r["s_pred"], r["closed"]))[
                :thoughts_per_position]:
            shown = text.replace("|", "\\|").replace("\n", "\\n")
            gain = s - r["logp_no_think"] if math.isfinite(s) else float("nan")
            lines.append(f"| `{shown}` | {s:.3f} | {gain:+.3f} | {closed} |")
        lines.append("")
    return "\n".join(lines)
