"""In-loop evaluation: ``eval.every`` steps, the think vs no-think measurement of rlp_dist.eval.core on
``eval.data``, logged as ``eval/*`` (console line, metrics.jsonl, wandb: one curve per key).

The held-out stream is tokenized once per run (cached on the trainer); the positions are drawn with
``eval.seed`` and so are the same at every evaluation. Thoughts are sampled with the run's ``rlp``
settings (temperature, top-k/p, thought cap, context length) and contexts drawn as training draws them
(``data.document_boundaries``); ``eval.group_size`` (0: rlp.group_size)
thoughts per position. Every rank calls :func:`maybe_eval` (the evaluation is collective); it leaves
the training RNG streams alone (its own generators) and restores the model's train/eval mode.
"""

from __future__ import annotations

from typing import Optional


def options(cfg):
    from rlp_dist.eval.core import EvalOptions

    e, r = cfg.eval, cfg.rlp
    return EvalOptions(positions=e.positions, seed=e.seed, group_size=e.group_size or r.group_size,
                       thought_max_tokens=r.thought_max_tokens, temperature=r.temperature, top_k=r.top_k,
                       top_p=r.top_p, context_len=r.context_len, batch=e.batch, records=False,
                       document_boundaries=cfg.data.document_boundaries)


def maybe_eval(tr) -> Optional[dict[str, float]]:
    """Evaluate at steps divisible by ``eval.every`` (and the last step); returns the logged metrics."""
    from rlp_dist.eval.core import evaluate, load_eval_data

    e = tr.cfg.eval
    if not e.every or (tr.step % e.every and tr.step != tr.cfg.train.steps):
        return None
    data = getattr(tr, "_eval_data", None)
    if data is None:
        data = load_eval_data(e.data, tr.tokenizer, tr.markers.eos_id, tr.cfg.data.text_key, e.positions_key)
        tr._eval_data = data
    teacher = tr.teacher if tr.teacher is not None and tr.teacher.initialized else None
    summary = evaluate(tr.engine.module, teacher, tr.tokenizer, tr.markers, data, options(tr.cfg), tr.dims)["summary"]
    m = {f"eval/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
    tr.metrics.info(f"eval step {tr.step}: {summary['positions']} positions | no-think NLL {summary['nll_no_think']:.3f}"
                    f" | think NLL {summary['nll_think_per_thought']:.3f} per thought, {summary['nll_think']:.3f} log-mean-exp"
                    f" | gain {summary['gain_mean']:+.3f} nats, "
                    f"{100 * summary['gain_pos_frac']:.0f}% of thoughts help | len {summary['thought_len_mean']:.1f}")
    tr.metrics.log(tr.step, m)
    return m
