"""A table of sample thoughts (every ``logging.sample_every`` steps): what the policy thinks.

One row per thought of the step's last micro-batch on rank 0 (at most ``max_rows``):

    context_tail   the last ``tail_tokens`` tokens of x_<t, decoded
    thought        the sampled thought (between the markers), decoded
    next_token     x_t, decoded
    reward         S_pred - S_ema in nats (NaN on steps without teacher scoring)
    s_pred         log p_theta(x_t | x_<t, c)
    closed         whether the policy closed the thought itself

Goes to wandb as a ``wandb.Table`` and to ``<run.dir>/samples.jsonl``.
"""

from __future__ import annotations

from typing import Any, Optional

COLUMNS = ["context_tail", "thought", "next_token", "reward", "s_pred", "closed"]


def sample_rows(tokenizer, markers, ro, s_ema: Optional[Any], max_rows: int = 16,
                tail_tokens: int = 24) -> list[list[Any]]:
    """Rows of the sample table from a RolloutBatch (``ro``) and the step's S_ema (b,) or None."""
    g = ro.group_size
    p_extra = len(markers.prefix_ids)  # prompt + open marker appended after the context
    ends = (ro.prefix_lengths.tolist() if ro.prefix_lengths is not None  # right-padded (several per document)
            else [ro.prefix.shape[1]] * ro.prefix.shape[0])
    lengths = ro.lengths.long()
    rows = []
    for i in range(min(ro.thoughts.shape[0], max_rows)):
        b = i // g
        end = ends[b] - p_extra  # the context x_<t of row b
        tail = tokenizer.decode(ro.prefix[b, max(0, end - tail_tokens):end].tolist())
        ids = ro.thoughts[i, : int(lengths[i])].tolist()
        if ids and bool(ro.closed[i]) and ids[-1] == markers.close_id:
            ids = ids[:-1]  # the sampled closing marker is shown by the 'closed' column
        s_pred = float(ro.s_pred[i])
        reward = s_pred - float(s_ema[b]) if s_ema is not None else float("nan")
        rows.append([tail, tokenizer.decode(ids), tokenizer.decode([int(ro.next_tokens[b])]), reward,
                     s_pred, bool(ro.closed[i])])
    return rows


def log_samples(metrics, step: int, tokenizer, markers, last_rollout, max_rows: int = 16) -> None:
    """Log the table named ``samples`` for ``last_rollout`` = (RolloutBatch, S_ema or None)."""
    ro, s_ema = last_rollout
    metrics.log_table(step, "samples", COLUMNS, sample_rows(tokenizer, markers, ro, s_ema, max_rows))
