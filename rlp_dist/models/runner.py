"""Forward (and backward) over micro-batches through megatron-core's pipeline schedules.

:func:`run_pipeline` is the one driver: megatron's ``get_forward_backward_func`` (1F1B with PP > 1,
a plain loop at PP=1) over a list of micro-batches, with the caller's ``forward(model, mb)`` (the
stage's part of the model call: logits on the last stage, hidden states sent on elsewhere) and
``loss(mb, logits) -> (loss, metrics)`` evaluated on the last stage only. Used by the training loop
(policy-gradient and NTP updates at PP > 1), the EMA teacher's scoring, ``rlp-dist score`` and the
gradient parity tests.

Schedule facts the callers rely on:
- the loss returned by ``loss`` is divided by the number of micro-batches, *in place*, before the
  backward (so gradients are the micro-batch mean); metrics must hold copies, not that tensor;
- with ``forward_only=False`` the backward leaves gradients in ``p.grad`` (torch autograd on the raw
  module; no DeepSpeed hooks run);
- tensors sent between stages are ``(seq_length, micro_batch_size, hidden)`` in
  ``config.pipeline_dtype``: every micro-batch of one call has the same shape.

:func:`run_schedule` (teacher-forced log-probs of token ids) is the special case used by scoring: for
ids x_0..x_{L-1} and this TP rank's vocab-parallel logits z_t,

    logp[t] = log softmax(z_t)[x_{t+1}],   t = 0..L-2

in fp32 from the last stage's final-norm hidden states by the fused vocab-parallel log-prob op
(``rlp_dist.models.head``: max and sum-exp all-reduced over the TP group, no vocabulary gather, no
(B, L, V) logits, a backward that is correct under TP).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch

LossFn = Callable[[Any, torch.Tensor], tuple[torch.Tensor, dict]]


def _is_last_stage() -> bool:
    from rlp_dist.distributed.parallel import megatron_layout

    return megatron_layout().is_last_stage


def run_pipeline(model: torch.nn.Module, micro_batches: Sequence[Any],
                 forward: Callable[[torch.nn.Module, Any], torch.Tensor], loss: LossFn, seq_length: int,
                 micro_batch_size: int, forward_only: bool) -> list[dict]:
    """Run ``micro_batches`` through this rank's stage ``model`` (the raw megatron module, not a
    DeepSpeed engine). Returns the metrics dict of ``loss`` per micro-batch on the last stage, ``[]``
    on the others. seq_length, micro_batch_size: the sequence and batch dims of the hidden states
    ``forward`` produces (megatron's (S, B, H) layout), the same for every micro-batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    # Receive buffers are allocated in config.pipeline_dtype. DeepSpeed (bf16) and the teacher's
    # partitioning cast the module after it was built, so state the dtype the stages really send.
    config.pipeline_dtype = next(model.parameters()).dtype

    def forward_step(data_iterator, stage):
        mb = next(data_iterator)
        return forward(stage, mb), partial(loss, mb)

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)


def run_schedule(model: torch.nn.Module, ids: torch.Tensor, micro_batch_size: int = 1,
                 forward_only: bool = True, loss_scale: float = 1.0) -> Optional[torch.Tensor]:
    """Run (B, L) token ids through the schedule. Returns the (B, L-1) fp32 log-probs on the last
    stage (None elsewhere). With ``forward_only=False`` it also backpropagates
    ``loss = -loss_scale * mean(logp)`` per micro-batch (the schedule divides by the micro-batch
    count), leaving gradients in ``p.grad``."""
    from rlp_dist.distributed.parallel import megatron_layout
    from rlp_dist.models import head

    B, L = ids.shape
    if B % micro_batch_size:
        raise ValueError(f"batch of {B} rows is not divisible by micro_batch_size={micro_batch_size}")
    layout = megatron_layout()
    tp_group = layout.tp_group if layout.tp > 1 else None

    def forward(stage, batch):
        pos = torch.arange(L, device=batch.device).unsqueeze(0).expand_as(batch)  # (b, L)
        with head.hidden_output(stage):
            return stage(batch, pos, None)  # last stage: final-norm hidden (b, L, H)

    def loss(batch, hidden):
        # the fused vocab-parallel log-prob op: no (b, L, V) logits
        lp = head.token_logprobs(model, hidden[:, :-1], batch[:, 1:], 1.0, tp_group)  # (b, L-1) fp32
        return -loss_scale * lp.mean(), {"logprobs": lp.detach()}

    out = run_pipeline(model, list(ids.split(micro_batch_size, 0)), forward, loss, L, micro_batch_size,
                       forward_only)
    return torch.cat([o["logprobs"] for o in out], 0) if _is_last_stage() else None


@torch.no_grad()
def score(model: torch.nn.Module, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, L) ids -> (B, L-1) log-probs on the last pipeline stage (None on others); eval mode."""
    was = model.training
    model.eval()
    try:
        return run_schedule(model, ids, micro_batch_size=1, forward_only=True)
    finally:
        model.train(was)
