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

A tied weight also gets a :class:`TiedEmbedding` (a VocabParallelEmbedding subclass): its lookup's
backward emits a *sparse* gradient (the looked-up rows only) instead of a dense (V/tp, H) one, and the output
layer's dense gradient reaches the weight after it, so autograd adds the rows into the dense gradient in
place: one dense (V/tp, H) gradient is alive at the end of the backward instead of two (1.24 GB less at
Qwen3-1.7B, V=151936, H=2048, in fp32; 0.62 GB in bf16). The order matters because autograd's input buffer
adds a sparse gradient into a dense one in place only when the sparse one came first (a dense buffer plus
a late sparse gradient is summed out of place). The output layer is the last op of the forward, so its
gradient would arrive first; the lookup therefore opens a route for it (:class:`_Route`, an identity on
the weight created *before* the lookup) that the head sends its weight gradient through. Autograd runs
ready nodes latest-created first, so the route's node runs after the lookup's backward: sparse rows first,
then the dense gradient, added in place. Routing is an identity, so gradients are the same whatever the
order (only the memory depends on it); it is skipped for ZeRO-3 partitioned weights (the route would keep
a gathered copy alive), where the lookup's gradient is summed out of place as megatron's dense one is.
A post-accumulate hook on the weight densifies a sparse gradient that arrives alone (a backward that did
not reach the output layer), so ZeRO's and the optimizer's gradient hooks always see a dense tensor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


@dataclass
class LogprobRequest:
    targets: torch.Tensor  # (M,) global token ids
    temperature: float = 1.0
    tp_group: Any = None  # the TP group (None or a group of one: plain log-softmax)
    valid: Optional[torch.Tensor] = None  # (M,) bool: False rows give 0 and no gradient
    return_entropy: bool = False


class _Route(torch.autograd.Function):
    """An identity edge into the tied weight, opened by the lookup (see the module docstring).

    ``_Route.open(weight)`` -> a storage-less (V/tp, H) handle whose node is created now;
    ``_Route.through(weight, handle)`` -> the weight's values, with their gradient sent to the handle."""

    @staticmethod
    def forward(ctx, weight, handle=None):
        ctx.opens = handle is None
        if handle is None:  # open: a zero-stride (V/tp, H) expand of one element, no storage of its own
            return weight.new_zeros(()).expand(weight.shape)
        return weight.view_as(weight)  # through: the current values (weight is detached)

    @staticmethod
    def backward(ctx, grad):
        # open: the gradient goes to the weight; through: to the handle, none to the detached weight
        return (grad, None) if ctx.opens else (None, grad)

    @staticmethod
    def open(weight):
        return _Route.apply(weight)

    @staticmethod
    def through(weight, handle):
        return _Route.apply(weight.detach(), handle)


class OutputHead(ColumnParallelLinear):
    emit_hidden = False  # set per call by hidden_output()
    tied_weight = None  # the model's shared_embedding_or_output_weight, when the weight is tied
    tied_lookup = None  # (tied, on this stage) the TiedEmbedding's bound ``route``

    def forward(self, input_, weight=None, runtime_gather_output=None, *, logprob: Optional[LogprobRequest] = None):
        if logprob is not None:
            from rlp_kernels import dispatch

            if weight is None:
                weight = self.weight if self.weight is not None else self.tied_weight()
            weight = self._routed(weight)
            return dispatch.linear_logprob(input_, weight, logprob.targets, temperature=logprob.temperature,
                                           tp_group=logprob.tp_group, valid=logprob.valid,
                                           return_entropy=logprob.return_entropy)
        if self.emit_hidden:
            # megatron then returns input_.transpose(0, 1).contiguous(): a (B, S, H) copy of the final-norm
            # states, P + G L = 34816 rows x H = 2048 in bf16 = 143 MB per context at the paper's shape,
            # alive with the (S, B, H) original until the loss's backward (budgeted by plan's activations)
            return input_, None
        return super().forward(input_, weight=self._routed(weight), runtime_gather_output=runtime_gather_output)

    def _routed(self, weight):
        if self.tied_lookup is None or weight is None or not torch.is_grad_enabled():
            return weight
        handle = self.tied_lookup(weight)
        return weight if handle is None else _Route.through(weight, handle)


_SPARSE_OK: dict = {}  # (device type, dtype) -> whether this build runs the sparse lookup's backward


def sparse_rows_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a sparse embedding gradient and its in-place add into a dense one run on this device and
    dtype (checked once on a (4, 2) weight; never run on CUDA bf16 by us yet). False: megatron's dense
    lookup is used, with a one-time warning."""
    key = (torch.device(device).type, dtype)
    if key not in _SPARSE_OK:
        try:
            w = torch.zeros(4, 2, dtype=dtype, device=device, requires_grad=True)
            idx = torch.tensor([[1, 3, 1]], device=device)
            rows = torch.autograd.grad(F.embedding(idx, w, sparse=True).sum(), w)[0]
            dense = torch.zeros(4, 2, dtype=dtype, device=device).add_(rows)
            _SPARSE_OK[key] = bool(dense[1, 0] == 2 and dense[3, 0] == 1 and dense[0, 0] == 0)
        except RuntimeError:
            _SPARSE_OK[key] = False
        if not _SPARSE_OK[key]:
            import warnings

            warnings.warn(f"rlp-dist: sparse embedding gradients do not work on {key[0]} {dtype}; the tied lookup "
                          f"uses megatron's dense gradient (one more V/tp x H gradient at the end of the backward)")
    return _SPARSE_OK[key]


class TiedEmbedding(VocabParallelEmbedding):
    """megatron's vocab-parallel lookup with a sparse weight gradient (see the module docstring).

    Sizes at the paper's shape (one context: P + G L = 2048 + 16 x 2048 = 34816 rows, H = 2048, bf16): the
    sparse gradient is 34816 x 2048 x 2 B = 143 MB of values + 0.3 MB of int64 row ids, instead of a dense
    V/tp x H = 151936 x 2048 x 2 B = 622 MB (TP=1); the route handle is one element (zero-stride)."""

    _handle = None  # the route opened by the latest lookup with gradients

    def route(self, weight):
        """The handle for the output layer's gradient, when ``weight`` is this lookup's weight."""
        return self._handle if weight is self.weight else None

    def forward(self, input_):
        self._handle = None  # a handle from an earlier forward would still be exact (an identity), not ordered
        if (self.deterministic_mode or self.reduce_scatter_embeddings
                or not sparse_rows_supported(self.weight.device, self.weight.dtype)):
            return super().forward(input_)  # megatron's dense paths (index backward; sequence parallel)
        if torch.is_grad_enabled() and self.weight.requires_grad and not hasattr(self.weight, "ds_id"):
            self._handle = _Route.open(self.weight)  # before the lookup: its node runs after the lookup's backward
        tp = self.tp_group.size()
        if tp > 1:
            input_mask = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)  # (B, S) not ours
            masked = (input_ - self.vocab_start_index).masked_fill(input_mask, 0)
        else:
            masked = input_
        out = F.embedding(masked, self.weight, sparse=True)  # (B, S, H); backward: (B*S) rows, not V/tp x H
        if tp > 1:
            out.masked_fill_(input_mask.unsqueeze(-1), 0.0)  # in place, as megatron
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)


def _dense_grad(weight: torch.Tensor) -> None:
    # Runs inside the weight's AccumulateGrad, before the hooks DeepSpeed registers later (ZeRO's reduce,
    # the optimizers' accumulation); a tensor pre-hook may not change the gradient's layout, this may.
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()


def _install_tied_embedding(model: torch.nn.Module) -> Optional[TiedEmbedding]:
    emb = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if emb is None or type(emb) is not VocabParallelEmbedding:
        return None
    emb.__class__ = TiedEmbedding  # behaviour only: same parameter, same state
    emb.weight.register_post_accumulate_grad_hook(_dense_grad)
    return emb


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
        if getattr(model, "pre_process", True):  # the embedding on this stage is the output weight
            emb = _install_tied_embedding(model)
            layer.tied_lookup = None if emb is None else emb.route
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
