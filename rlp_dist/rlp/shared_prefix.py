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
Two pieces of megatron's GPTModel are overridden on this model instance for the duration of the call
(instance attributes shadowing ``forward``, removed on exit; nothing in the library is patched):
- the rotary module returns the rotations of the packed positions (GPTModel derives RoPE from the
  sequence length alone; ``position_ids`` only feeds learned absolute embeddings);
- each layer's core attention computes the block structure directly instead of a dense S x S mask:
  the prefix is causal SDPA; the thought queries score the prefix keys with ONE matmul for all G
  thoughts (grouped-query heads folded into the query rows, no K/V replication) and their own keys
  causally, and the two parts share one softmax (a joint max and denominator):

      a_i = (exp(q K_p^T - m) V_p + exp(q K_i^T - m) V_i) / (sum exp(q K_p^T - m) + sum exp(q K_i^T - m))

  Attention costs B*(P^2 + G(L-1)(P+L-1)) scores — the naive cost minus the G-1 repeated prefix
  blocks — and the projections/MLP B*S tokens instead of N*(P+L-1).

Limits: transformers only. A Mamba layer scans the packed row in order, so thought i would see
thought i-1's state; the hybrid keeps the replicated forward (see :func:`supports`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def packed_inputs(prefix: torch.Tensor, thoughts: torch.Tensor, group: int):
    """(B, P) prefixes and (B*G, L) thoughts -> ids (B, S), positions (S,); S = P + G*(L-1)."""
    b, p = prefix.shape
    t = thoughts.shape[1] - 1
    body = thoughts[:, :-1].reshape(b, group * t)  # (B, G*(L-1)): thought i at [i*t, (i+1)*t)
    u = torch.arange(t, device=prefix.device)
    positions = torch.cat([torch.arange(p, device=prefix.device), (p + u).repeat(group)])  # (S,)
    return torch.cat([prefix, body], dim=1), positions


def branch_attention(q, k, v, p: int, group: int, scale: float) -> torch.Tensor:
    """Attention over one packed row per context: causal prefix, G thoughts branching from it.

    q: (S, B, heads, d), k and v: (S, B, groups, d) in megatron's layout, S = P + G*T, rotated.
    Returns (S, B, heads*d) like megatron's core attention.
    """
    s, b, heads, d = q.shape
    groups = k.shape[2]
    hpg, t = heads // groups, (s - p) // group
    qp, kp, vp = (x[:p].permute(1, 2, 0, 3) for x in (q, k, v))  # (B, h|g, P, d)
    out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    out_p = out_p.permute(2, 0, 1, 3).reshape(p, b, heads * d)  # (P, B, h*d)
    qt = q[p:].view(group, t, b, groups, hpg, d).permute(2, 3, 0, 4, 1, 5)  # (B, g, G, hpg, T, d)
    kt = k[p:].view(group, t, b, groups, d).permute(2, 3, 0, 1, 4)  # (B, g, G, T, d)
    vt = v[p:].view(group, t, b, groups, d).permute(2, 3, 0, 1, 4)
    # scores against the shared prefix: all thoughts and heads of a KV group in one matmul
    sp = torch.matmul(qt.reshape(b, groups, group * hpg * t, d), kp.transpose(-1, -2)) * scale
    sp = sp.view(b, groups, group, hpg, t, p)  # (B, g, G, hpg, T, P)
    st = torch.matmul(qt, kt[:, :, :, None].transpose(-1, -2)) * scale  # (B, g, G, hpg, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    st = st.masked_fill(~causal, float("-inf"))
    m = torch.maximum(sp.amax(-1), st.amax(-1)).detach()[..., None]  # shift only: no gradient needed
    ep, et = torch.exp(sp - m), torch.exp(st - m)
    denom = ep.sum(-1, keepdim=True) + et.sum(-1, keepdim=True)  # (B, g, G, hpg, T, 1)
    out = torch.matmul(ep.view(b, groups, group * hpg * t, p), vp).view(b, groups, group, hpg, t, d)
    out = (out + torch.matmul(et, vt[:, :, :, None])) / denom  # (B, g, G, hpg, T, d)
    out = out.permute(2, 4, 0, 1, 3, 5).reshape(group * t, b, heads * d)  # (G*T, B, h*d)
    return torch.cat([out_p, out], dim=0)  # (S, B, h*d)


@contextlib.contextmanager
def branched_attention(model: torch.nn.Module, p: int, group: int):
    """Make every layer's core attention compute :func:`branch_attention` for this packed layout."""
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]

    def make_forward(scale: float):
        def forward(query, key, value, *_args, **_kwargs):
            return branch_attention(query, key, value, p, group, scale)
        return forward

    for core in cores:  # instance attribute: shadows the class method, removed on exit
        core.forward = make_forward(core.softmax_scale)  # megatron's own 1/sqrt(d) (and any coefficient)
    try:
        yield
    finally:
        for core in cores:
            del core.forward


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
    ids, positions = packed_inputs(prefix, thoughts, group)
    pos_ids = positions[None].expand(b, -1)
    with rope_positions(model, positions), branched_attention(model, p, group):
        logits = (forward or model)(ids, pos_ids, None)  # (B, S, V/tp)
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
