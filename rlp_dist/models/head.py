"""The last stage's output layer as the model's one vocabulary seam: hidden states out, log-probs in one op.

megatron's output layer turns final-norm hidden states (S, B, H) into vocab-parallel logits
(S, B, V/tp). At the paper's shape that hand-off is the memory: the G=16 thoughts of L=2048 tokens of
ONE context are 32768 rows, whose fp32 logits at V=151936 are 20 GB (before their bf16 copy and their
gradient). So the builder gives both backbones an :class:`OutputHead` (a ColumnParallelLinear subclass:
megatron's logits by default) with two more behaviours:

- inside :func:`hidden_output`, the model's forward returns the final-norm hidden states (B, S, H)
  instead of logits (megatron transposes the output layer's result to batch-first);
- :func:`token_logprobs` calls the head *as a module* on selected hidden rows with the targets:
  ``log softmax(h W^T / T)[target]`` in fp32 (and optionally the entropy) by the fused, token-chunked,
  vocab-parallel op ``rlp_kernels.dispatch.linear_logprob``: extra memory O(chunk x V/tp) in forward and
  backward, the vocabulary never gathered (its backward all-reduces the input gradient over TP, as
  ColumnParallelLinear's input copy does).

Calling the head as a module (not a bare function on its weight) matters under ZeRO-3: its pre-forward
hook gathers the output weight and its backward hook gathers it again for the backward. A tied weight
belongs to the embedding: :func:`install` registers it as an external parameter of the head, so the
head's hooks gather it too (DeepSpeed discovers external parameters by itself only inside the engine's
own forward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear


@dataclass
class LogprobRequest:
    targets: torch.Tensor  # (M,) global token ids
    temperature: float = 1.0
    tp_group: Any = None  # the TP group (None or a group of one: plain log-softmax)
    valid: Optional[torch.Tensor] = None  # (M,) bool: False rows give 0 and no gradient
    return_entropy: bool = False


class OutputHead(ColumnParallelLinear):
    emit_hidden = False  # set per call by hidden_output()
    tied_weight = None  # the model's shared_embedding_or_output_weight, when the weight is tied

    def forward(self, input_, weight=None, runtime_gather_output=None, *, logprob: Optional[LogprobRequest] = None):
        if logprob is not None:
            from rlp_kernels import dispatch

            if weight is None:
                weight = self.weight if self.weight is not None else self.tied_weight()
            return dispatch.linear_logprob(input_, weight, logprob.targets, temperature=logprob.temperature,
                                           tp_group=logprob.tp_group, valid=logprob.valid,
                                           return_entropy=logprob.return_entropy)
        if self.emit_hidden:
            return input_, None  # megatron then returns input_.transpose(0, 1): (B, S, H)
        return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)


def install(model: torch.nn.Module) -> torch.nn.Module:
    """Give a built GPTModel/MambaModel stage its OutputHead (the last stage; others have none)."""
    layer = getattr(model, "output_layer", None)
    if layer is None or not getattr(model, "post_process", True):
        return model
    if type(layer) is not ColumnParallelLinear:
        raise TypeError(f"output layer is a {type(layer).__name__}; the OutputHead extends ColumnParallelLinear")
    layer.__class__ = OutputHead  # a subclass adding behaviour only: same parameters, same state
    if layer.weight is None:  # tied: megatron passes the embedding weight at call time
        layer.tied_weight = model.shared_embedding_or_output_weight
        # ZeRO-3 gathers a module's own and its registered external parameters in its pre-forward (and
        # pre-backward) hooks. Its automatic discovery of external parameters runs only inside the
        # engine's forward; the head is also called as a module after it (token_logprobs). A no-op
        # without ZeRO-3.
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(layer, model.shared_embedding_or_output_weight())
    return model


def head_of(model: torch.nn.Module) -> OutputHead:
    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, OutputHead):
        raise TypeError(f"{type(model).__name__} has no OutputHead (built outside rlp_dist.models.builder?, "
                        f"or not the last pipeline stage)")
    return layer


@contextlib.contextmanager
def hidden_output(model: torch.nn.Module):
    """Within: ``model(...)`` returns final-norm hidden states (B, S, H) instead of logits (the last
    stage; other stages return their (S, B, H) output as always)."""
    layer = getattr(model, "output_layer", None)
    if not getattr(model, "post_process", True) or layer is None:
        yield
        return
    head = head_of(model)
    head.emit_hidden = True
    try:
        yield
    finally:
        head.emit_hidden = False


def token_logprobs(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   tp_group=None, valid: Optional[torch.Tensor] = None, return_entropy: bool = False):
    """log p(target) under softmax(h W^T / temperature) in fp32 from hidden states, by the fused op.

    hidden: (..., H) rows of final-norm hidden states (any view: a selection is fine); targets: (...)
    global ids; valid: (...) bool or None. Returns (...) fp32 (and the entropy (...) if asked)."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])  # (M, H)
    req = LogprobRequest(targets.reshape(-1), temperature, tp_group,
                         None if valid is None else valid.reshape(-1).bool(), return_entropy)
    out = head_of(model)(h, logprob=req)
    if return_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)
