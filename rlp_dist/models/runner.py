"""Teacher-forced scoring of token sequences through megatron-core's pipeline schedules.

For ids x_0..x_{L-1} the model's vocab-parallel logits z_t (this TP rank's vocabulary slice) give

    logp[t] = log softmax(z_t)[x_{t+1}],   t = 0..L-2

computed in fp32 by megatron's ``vocab_parallel_cross_entropy`` (max and sum-exp all-reduced over
the TP group, no vocabulary gather, and a backward that is correct under TP). The sequences run
through megatron's schedule (``get_forward_backward_func``: 1F1B with PP > 1, no pipelining at
PP=1), one micro-batch per row block; only the last stage produces log-probs. Used by ``rlp-dist score``, the parity tests and gradient checks.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch


def _is_last_stage() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage()


def run_schedule(model: torch.nn.Module, ids: torch.Tensor, micro_batch_size: int = 1,
                 forward_only: bool = True, loss_scale: float = 1.0) -> Optional[torch.Tensor]:
    """Run (B, L) token ids through the schedule. Returns the (B, L-1) fp32 log-probs on the last
    stage (None elsewhere). With ``forward_only=False`` it also backpropagates
    ``loss = -loss_scale * mean(logp)`` per micro-batch (the schedule divides by the micro-batch
    count), leaving gradients in ``p.grad``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    B, L = ids.shape
    if B % micro_batch_size:
        raise ValueError(f"batch of {B} rows is not divisible by micro_batch_size={micro_batch_size}")
    micro = list(ids.split(micro_batch_size, 0))
    collected: list[torch.Tensor] = []

    def loss_func(targets: torch.Tensor, logits: torch.Tensor):
        # clone: megatron's cross entropy shifts its input in place
        lp = -vocab_parallel_cross_entropy(logits[:, :-1].float().clone(), targets[:, 1:])  # (b, L-1)
        collected.append(lp.detach())
        return -loss_scale * lp.mean(), {"logprobs": lp.detach()}

    it = iter(micro)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        pos = torch.arange(L, device=batch.device).unsqueeze(0).expand_as(batch)  # (b, L)
        return model(batch, pos, None), partial(loss_func, batch)

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=it, model=[model], num_microbatches=len(micro),
        seq_length=L, micro_batch_size=micro_batch_size, forward_only=forward_only)
    return torch.cat(collected, 0) if _is_last_stage() else None


@torch.no_grad()
def score(model: torch.nn.Module, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """(B, L) ids -> (B, L-1) log-probs on the last pipeline stage (None on others); eval mode."""
    was = model.training
    model.eval()
    try:
        return run_schedule(model, ids, micro_batch_size=1, forward_only=True)
    finally:
        model.train(was)
