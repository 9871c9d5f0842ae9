"""Pipeline-parallel decoding: one stage decoder per PP rank behind the single-decoder interface.

:class:`PipelineDecoder` wraps this rank's stage decoder (the contract in :mod:`rlp_dist.rlp.decode`:
the first stage takes ids/tokens, later stages take batch-first hidden states, the last stage returns
vocab-parallel logits, the others hidden states) and presents ``prefill``/``step``/``keep`` to
:func:`rlp_dist.rlp.rollout._decode_loop` on every PP rank. Per call, stage s

    receives the hidden (N, S, H) from stage s-1   (stage 0: embeds the ids/tokens it was given)
    runs its layers on its own KV cache
    sends the hidden (N, S, H) to stage s+1        (the last stage: returns the (N, V/tp) logits)

so only the last stage has logits, and ``prefill``/``step`` return None on the others. Only the last
stage samples; :meth:`PipelineDecoder.from_last_stage` broadcasts what it decided over the PP group
(the sampled tokens, one (N_live,) int64 tensor per step; the float records once at the end), and
every stage applies the same bookkeeping, so all stages agree on the live rows, the compaction and
the stop without another message. Shapes are known on both sides (the loop's live-row count, P, H),
so no shape is exchanged. Each TP rank talks to the same TP rank of the next stage (the PP group is
megatron's: one per TP x DP position).

The bubble: within a decode step the stages run one after another, so each is busy 1/pp of the
step. ``micro_batches`` = M > 1 feeds the step's rows through the stages in M slices (stage s runs
slice c while stage s+1 runs slice c-1), which overlaps stages only when a stage's step is
compute-bound: a decode step is usually bound by reading the stage's weights, and M slices read them
M times. Measured (``python -m rlp_dist.bench pipeline``; CPU, 2 gloo stages, hidden 256, 32 rows):
M=2 0.82-0.95x and M=4 0.61-0.71x the tokens/s of M=1, so the default is 1. PP serves rollouts by
capacity (a model that does not fit one rank), not speed; throughput comes from more rows per step.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class PipelineDecoder:
    """This rank's stage of a pipelined decoder; the same interface on every stage.

    stage: a stage decoder (``prefill``/``step``/``keep``, ``pre_process``/``post_process``);
    pp_group: this rank's pipeline group (``ParallelDims.pp_group``); hidden_size, dtype: the hidden
    states exchanged between stages (the model's hidden size and parameter dtype, equal on all stages).
    """

    def __init__(self, stage, pp_group, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 micro_batches: Optional[int] = None):
        self.stage, self.group = stage, pp_group
        self.micro_batches = micro_batches
        self.pp, self.rank = dist.get_world_size(pp_group), dist.get_rank(pp_group)
        self.is_first, self.is_last = self.rank == 0, self.rank == self.pp - 1
        if (stage.pre_process, stage.post_process) != (self.is_first, self.is_last):
            raise ValueError(f"PP rank {self.rank} of {self.pp} holds a stage with pre_process="
                             f"{stage.pre_process}, post_process={stage.post_process}; build this rank's "
                             f"stage (rlp_dist.models.build_model after init_distributed(tp, pp))")
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.vocab_parallel = getattr(stage, "vocab_parallel", True)

    def prefill(self, ids: torch.Tensor, repeats: int = 1, branches=None, lengths=None) -> Optional[torch.Tensor]:
        """(B, P) ids (the same on every stage) -> (B, V/tp) logits on the last stage, None elsewhere
        ((B*k, V/tp) with k ``branches``; right-padded rows with ``lengths``: see
        :meth:`rlp_dist.rlp.decode.CachedDecoder.prefill`)."""
        b, p = ids.shape
        return self._run(self.stage.prefill, ids, (b, p), repeats, branches, lengths)

    def step(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        """(N,) tokens (read by the first stage only) -> (N, V/tp) logits on the last stage, else None.

        The N rows go through the stages in ``micro_batches`` contiguous slices (default 1; see the
        module docstring for when more pay off): stage s runs slice c while stage s+1 runs slice c-1.
        Rows are independent within a step, so the result is that of one call over all rows."""
        n = tokens.shape[0]
        m = max(1, min(self.micro_batches or 1, n))
        bounds = [n * c // m for c in range(m + 1)]
        outs = []
        for a, b in zip(bounds, bounds[1:]):  # blocking send/recv: slice c+1 overlaps slice c downstream
            rows = slice(a, b)
            outs.append(self._run(lambda x, rows=rows: self.stage.step_rows(x, rows), tokens[rows], (b - a, 1)))
        self.stage.advance()
        return torch.cat(outs, dim=0) if self.is_last else None  # (N, V/tp)

    def keep(self, rows: torch.Tensor) -> None:
        self.stage.keep(rows)

    def from_last_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Broadcast ``t`` in place from the last stage to every stage of the pipeline (same shape and
        dtype everywhere; its contents are ignored off the last stage). Returns ``t``."""
        dist.broadcast(t, group=self.group, group_src=self.pp - 1)
        return t

    def _run(self, fn, x: torch.Tensor, rows_seq: tuple[int, int], *args) -> Optional[torch.Tensor]:
        if not self.is_first:
            x = torch.empty(*rows_seq, self.hidden_size, dtype=self.dtype, device=self.device)  # (N, S, H)
            dist.recv(x, group=self.group, group_src=self.rank - 1)
        y = fn(x, *args)
        if self.is_last:
            return y  # (N, V/tp)
        if y.shape != (*rows_seq, self.hidden_size) or y.dtype != self.dtype:
            raise ValueError(f"stage {self.rank} returned {tuple(y.shape)} {y.dtype}; the next stage expects "
                             f"hidden {(*rows_seq, self.hidden_size)} {self.dtype}")
        dist.send(y.contiguous(), group=self.group, group_dst=self.rank + 1)
        return None
