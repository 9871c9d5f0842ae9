"""Gradient reductions megatron's ``finalize_model_grads`` would do, for loops that do not call it.

With tensor parallelism every parameter is either sharded (its gradient is complete on its rank) or
replicated with identical inputs on all TP ranks (identical gradients) — except the per-head QK-norm
weights (``q_layernorm``/``k_layernorm``): each TP rank normalises only its own heads, so the true
gradient is the SUM over the TP group. The Mamba mixer has no such parameter: in_proj, conv1d, A_log,
D, dt_bias and the gated norm are all sharded over heads/groups.

With pipeline parallelism and tied embeddings the first stage's word embedding and the last stage's
output weight are one parameter held twice: the true gradient is their sum over the embedding group
(first and last stage). The training loop (``train.update``, PP > 1) calls :func:`reduce_grads` after
megatron's schedule and before DeepSpeed's ``allreduce_gradients``: with the ZeRO-0/1 student used
under PP (no ``overlap_comm``/``contiguous_gradients``) DeepSpeed installs no gradient hooks, so the
schedule's backward leaves every gradient in ``p.grad`` until that call takes them over. It is not
a gradient hook: the two stages finish their backward at different moments of the 1F1B schedule,
and an all-reduce issued from inside it would pair up with the other stage's pipeline traffic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def tp_summed_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters replicated over TP whose gradients must be summed over the TP group."""
    return [(n, p) for n, p in model.named_parameters() if "q_layernorm" in n or "k_layernorm" in n]


def reduce_grads(model: torch.nn.Module, tp_group=None, tp: int = 1, tied_pp: bool = False) -> None:
    """In-place: sum QK-norm gradients over ``tp_group`` (tp > 1), and the tied embedding/output
    gradients over megatron's embedding group (``tied_pp``: tied embeddings with PP > 1)."""
    if tp > 1:
        for _, p in tp_summed_params(model):
            if p.grad is not None:
                dist.all_reduce(p.grad, group=tp_group)  # per-head norms: each rank saw only its heads
    if tied_pp:
        from rlp_dist.distributed.parallel import megatron_layout

        # A middle stage holds no copy (None). Asking the model as well as parallel_state: megatron-core
        # 0.16.1's destroy_model_parallel leaves the embedding ranks set, so after a re-initialisation
        # (tests switch layouts in one process) a middle stage can still count itself a member.
        w = model.shared_embedding_or_output_weight()
        group = megatron_layout().embedding_group
        if w is not None and w.grad is not None and group is not None:
            dist.all_reduce(w.grad, group=group)
