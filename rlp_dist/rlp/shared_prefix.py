"""Shared-prefix policy-gradient forward: each context runs once, its G thoughts branch from it.

The naive training forward (``RolloutBatch.training_inputs``) replicates the prefix (context, prompt,
open marker; length P) G times: N = B*G rows of [prefix, l_1 .. l_{L-1}], and logits[:, P-1+u]
predict l_{u+1}. Here each context is one packed row

    [ prefix (P) | thought 1: l_1..l_{L-1} | ... | thought G: l_1..l_{L-1} ]     S = P + G(L-1)

with positions [0..P-1 | P..P+L-2 | ... | P..P+L-2] (every thought restarts right after the prefix)
and a block mask: the prefix is causal; a thought token attends to the whole prefix and causally to
its own thought, never to another thought. Every query then sees exactly the keys (same positions,
same RoPE rotations) it sees in its naive row, so every logit of every thought is the naive one, and
the backward accumulates the G thoughts' gradients into one prefix computation (equal to the sum over
the G replicas in the naive graph). Logits: l_1 of all G thoughts is predicted at position P-1
(shared); l_u (u >= 2) of thought i at P + i(L-1) + u-2.

It runs through the model's own forward (DeepSpeed engine, ZeRO-3 hooks, TP collectives unchanged).
Two things are passed from outside: the attention mask (megatron's local attention takes an explicit
(b, 1, s, s) mask, True = masked), and the RoPE positions, which megatron's GPTModel derives from the
sequence length alone — :func:`rope_positions` overrides its rotary module's ``forward`` on this
instance for the duration of the call (``position_ids`` only feeds learned absolute embeddings).

Departures and limits: the mask is dense, so attention costs B*S^2 instead of the block-sparse
B*(P^2 + G(L-1)(P+L)); the projections/MLP cost B*S tokens instead of N*(P+L-1). At the tiny presets
both are a win; at the paper's P=L=2048, G=16 the dense mask would cost more attention than it saves
(a block-structured core attention, e.g. flex-attention on GPU, is the fix). Transformers only: a Mamba
layer scans the packed row in order, so thought i would see thought i-1's state; the hybrid keeps the
replicated forward.
"""

from __future__ import annotations

import contextlib

import torch


def packed_inputs(prefix: torch.Tensor, thoughts: torch.Tensor, group: int):
    """(B, P) prefixes and (B*G, L) thoughts -> ids (B, S), positions (S,), mask (1, 1, S, S) bool.

    S = P + G*(L-1); mask True where attention is NOT allowed (megatron's convention).
    """
    b, p = prefix.shape
    n, big_l = thoughts.shape
    t = big_l - 1
    body = thoughts[:, :-1].reshape(b, group * t)  # (B, G*(L-1)): thought i at [i*t, (i+1)*t)
    ids = torch.cat([prefix, body], dim=1)  # (B, S)
    s = ids.shape[1]
    u = torch.arange(t, device=prefix.device)
    positions = torch.cat([torch.arange(p, device=prefix.device), (p + u).repeat(group)])  # (S,)
    # segment -1 = prefix, i = thought i; causal order inside the packed row
    seg = torch.cat([torch.full((p,), -1, device=prefix.device),
                     torch.arange(group, device=prefix.device).repeat_interleave(t)])
    idx = torch.arange(s, device=prefix.device)
    causal = idx[None, :] <= idx[:, None]  # (S, S) key <= query
    visible = causal & ((seg[None, :] == -1) | (seg[None, :] == seg[:, None]))
    return ids, positions, ~visible[None, None]


@contextlib.contextmanager
def rope_positions(model: torch.nn.Module, positions: torch.Tensor):
    """Make ``model``'s RoPE module return the rotations of ``positions`` (S,) instead of 0..S-1."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or getattr(model, "position_embedding_type", "rope") != "rope":
        yield  # no rotary embedding (e.g. position_embedding: none): positions act only through the mask
        return
    table_len = int(positions.max()) + 1

    def forward(*_args, **_kwargs):
        return rope.get_emb(table_len)[positions]  # (S, 1, 1, d)

    rope.forward = forward  # instance attribute: shadows the class method, removed on exit
    try:
        yield
    finally:
        del rope.forward


def thought_logits(model: torch.nn.Module, prefix: torch.Tensor, thoughts: torch.Tensor, group: int,
                   forward=None) -> torch.Tensor:
    """Logits that predict every thought token, computing each prefix once. -> (B*G, L, V/tp).

    model: the GPTModel (this rank's shard) whose rotary module is overridden; forward: the callable
    that runs it (the DeepSpeed engine in training; defaults to ``model``).
    """
    b, p = prefix.shape
    n, big_l = thoughts.shape
    ids, positions, mask = packed_inputs(prefix, thoughts, group)
    pos_ids = positions[None].expand(b, -1)
    with rope_positions(model, positions):
        logits = (forward or model)(ids, pos_ids, mask)  # (B, S, V/tp)
    v = logits.shape[-1]
    first = logits[:, p - 1, None, None, :].expand(b, group, 1, v)  # (B, G, 1, V): shared l_1 logits
    rest = logits[:, p:].reshape(b, group, big_l - 1, v)  # (B, G, L-1, V)
    return torch.cat([first, rest], dim=2).reshape(n, big_l, v)  # (B*G, L, V)


def supports(model: torch.nn.Module) -> bool:
    """Packed branching is exact for attention-only stacks (no sequential state across the row)."""
    from megatron.core.models.gpt import GPTModel

    return isinstance(model, GPTModel)


def policy_logits(ro, model: torch.nn.Module, forward=None, shared: bool = True) -> torch.Tensor:
    """The policy-gradient forward of a RolloutBatch: logits predicting each thought token. (N, L, V/tp).

    shared: branch the G thoughts from one prefix computation where the model allows it (transformer);
    otherwise (or for the hybrid) the replicated forward over ``ro.training_inputs()``.
    """
    forward = forward or model
    if shared and supports(model):
        return thought_logits(model, ro.prefix, ro.thoughts, ro.group_size, forward)
    ids, offset = ro.training_inputs()  # (N, P+L-1)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return forward(ids, pos, None)[:, offset:]  # (N, L, V/tp)
