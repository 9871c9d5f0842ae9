"""The policy-gradient forward of a RolloutBatch: log pi_theta of every thought token.

The naive training forward (``RolloutBatch.training_inputs``) replicates the prefix (context, prompt,
open marker; length P) G times: N = B*G rows of [prefix, l_1 .. l_{L-1}], and output position P-1+u
predicts l_{u+1}. The shared-prefix forward packs each context into one row

    [ prefix (P) | thought 1: l_1..l_{L-1} | ... | thought G: l_1..l_{L-1} ]     S = P + G(L-1)

with positions [0..P-1 | P..P+L-2 | ... | P..P+L-2] (every thought restarts right after the prefix),
passed to the model as a :class:`rlp_dist.models.layout.BranchLayout` through megatron's
``packed_seq_params``: the layer specs' own attention and Mamba-mixer submodules branch the thoughts
from the prefix (rlp_dist.models.branch), so every output of every thought equals the naive one and
the backward accumulates the G thoughts' gradients into one prefix computation. Outputs: l_1 of all G
thoughts is predicted at position P-1 (shared); l_u (u >= 2) of thought i at P + i(L-1) + u-2.

The hand-off from the model is its final-norm hidden states, never logits (rlp_dist.models.head): the
selected rows (N, L, H) go through the fused, token-chunked, vocab-parallel log-prob op. At G=16,
L=2048, H=2048 (Qwen3-1.7B), bf16, that selection is 134 MB per context, where the (N, L, V) fp32 logits
it replaces were 20 GB. :func:`policy_logits` (the full logits) stays as the reference for tests and
the memory benchmark's baseline.

Attention costs B*(P^2 + G(L-1)(P+L-1)) scores — the naive cost minus the G-1 repeated prefix blocks —
and the projections/MLP B*S tokens instead of N*(P+L-1). Prefixes of different lengths (several
contexts per document, ``ro.prefix_lengths``) run one packed forward per length; at PP > 1 the trainer
runs the replicated forward (one fixed shape per micro-batch through the schedule).
"""

from __future__ import annotations

import torch

from rlp_dist.models import head
from rlp_dist.models.layout import BranchLayout


def packed_inputs(prefix: torch.Tensor, thoughts: torch.Tensor, group: int, attention: str = "sdpa"):
    """(B, P) prefixes and (B*G, L) thoughts -> ids (B, S) and their BranchLayout; S = P + G*(L-1)."""
    b, p = prefix.shape
    t = thoughts.shape[1] - 1
    body = thoughts[:, :-1].reshape(b, group * t)  # (B, G*(L-1)): thought i at [i*t, (i+1)*t)
    return torch.cat([prefix, body], dim=1), BranchLayout.build(p, group, t, prefix.device, attention)


def _select(out: torch.Tensor, p: int, group: int, big_l: int) -> torch.Tensor:
    """(B, S, X) packed outputs -> (B*G, L, X): row (b, i), column u predicts thought token u."""
    b, x = out.shape[0], out.shape[-1]
    first = out[:, p - 1, None, None, :].expand(b, group, 1, x)  # (B, G, 1, X): the shared l_1 output
    rest = out[:, p:].reshape(b, group, big_l - 1, x)  # (B, G, L-1, X)
    return torch.cat([first, rest], dim=2).reshape(b * group, big_l, x)  # (B*G, L, X)


def _packed_forward(model, prefix, thoughts, group, forward, attention):
    ids, layout = packed_inputs(prefix, thoughts, group, attention)
    pos_ids = layout.positions[None].expand(ids.shape[0], -1)  # (B, S); RoPE reads the layout's positions
    return (forward or model)(ids, pos_ids, None, packed_seq_params=layout)  # (B, S, X) last stage


def supports(model: torch.nn.Module) -> bool:
    """Packed branching needs our layout-aware submodules (rlp_dist.models builds them for both
    backbones) and, for Mamba mixers, the gated-RMSNorm mixer with D per head."""
    from rlp_dist.models.attention import LayoutAttention
    from rlp_dist.models.mixer import LayoutMambaMixer

    from megatron.core.ssm.mamba_mixer import MambaMixer
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    mods = list(model.modules())
    attn_ok = all(isinstance(m, LayoutAttention) for m in mods if isinstance(m, DotProductAttention))
    mixers = [m for m in mods if isinstance(m, MambaMixer)]
    mix_ok = all(isinstance(m, LayoutMambaMixer) and m.supports_layouts for m in mixers)
    # a MambaModel derives RoPE from the sequence length (rlp_dist.models.hybrid): no layouts with RoPE
    return attn_ok and mix_ok and not (mixers and getattr(model, "position_embedding_type", "none") == "rope")


def policy_forward(ro, model: torch.nn.Module, forward=None, shared: bool = True, attention: str = "sdpa"):
    """The model call of the policy-gradient forward (one forward; shared and prefixes of one length, or
    replicated). On the last stage it returns final-norm hidden states, (B, S, H) packed or (N, P+L-1, H)
    replicated; on other pipeline stages their (S, rows, H) output."""
    forward = forward or model
    with head.hidden_output(model):
        if shared:
            return _packed_forward(model, ro.prefix, ro.thoughts, ro.group_size, forward, attention)
        ids, _ = ro.training_inputs()  # (N, P+L-1)
        return forward(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None)


def select_thought_outputs(ro, out: torch.Tensor, shared: bool) -> torch.Tensor:
    """The rows of a :func:`policy_forward` (or logits) output that predict each thought token. -> (N, L, X)."""
    big_l = ro.thoughts.shape[1]
    if shared:
        return _select(out, ro.prefix.shape[1], ro.group_size, big_l)
    if ro.prefix_lengths is None:  # one offset for every row: a view, no copy
        return out[:, ro.prefix.shape[1] - 1:]
    _, offsets = ro.training_inputs()
    at = offsets[:, None] + torch.arange(big_l, device=out.device)  # (N, L): row r's thought outputs
    return out.gather(1, at[..., None].expand(-1, -1, out.shape[-1]))  # (N, L, X)


def thought_logprobs_from(ro, model: torch.nn.Module, out: torch.Tensor, shared: bool, temperature: float,
                          tp_group=None) -> torch.Tensor:
    """log pi_theta(l_u | prefix, l_<u) under softmax(z / T), fp32 (N, L), from the last stage's hidden
    states by the fused op; padding positions give 0 and no gradient."""
    h = select_thought_outputs(ro, out, shared)  # (N, L, H)
    return head.token_logprobs(model, h, ro.thoughts, temperature, tp_group, valid=ro.mask > 0)


def policy_logprobs(ro, model: torch.nn.Module, forward=None, shared: bool = True, temperature: float = 1.0,
                    tp_group=None, attention: str = "sdpa") -> torch.Tensor:
    """log pi_theta of every thought token, (N, L) fp32, computing each prefix once where ``shared``
    (prefixes of several lengths: one packed forward per length). The single-stage path; the trainer's
    pipeline path calls :func:`policy_forward` and :func:`thought_logprobs_from` on their stages."""
    shared = shared and supports(model)
    if not (shared and ro.prefix_lengths is not None):
        out = policy_forward(ro, model, forward, shared, attention)
        return thought_logprobs_from(ro, model, out, shared, temperature, tp_group)
    out = None
    for part, rows in _by_prefix_length(ro):
        lp = policy_logprobs(part, model, forward, True, temperature, tp_group, attention)  # (b_p*G, L)
        out = lp.new_zeros(ro.thoughts.shape) if out is None else out
        out = out.index_copy(0, rows, lp)
    return out


def policy_logits(ro, model: torch.nn.Module, forward=None, shared: bool = True, select: bool = True,
                  attention: str = "sdpa") -> torch.Tensor:
    """The reference: full logits predicting each thought token, (N, L, V/tp) (the pre-seam hand-off;
    tests and the memory benchmark's baseline). select=False returns the forward's own output."""
    forward = forward or model
    shared = shared and supports(model)
    if shared and ro.prefix_lengths is not None:
        if not select:
            raise ValueError("prefixes of several lengths run one packed forward per length; a pipeline stage "
                             "needs one forward per micro-batch: use shared=False (right-padded, replicated)")
        out = None
        for part, rows in _by_prefix_length(ro):
            lg = policy_logits(part, model, forward, True, True, attention)  # (b_p*G, L, V)
            out = lg.new_empty(*ro.thoughts.shape, lg.shape[-1]) if out is None else out
            out = out.index_copy(0, rows, lg)
        return out
    if shared:
        logits = _packed_forward(model, ro.prefix, ro.thoughts, ro.group_size, forward, attention)  # (B, S, V/tp)
    else:
        ids, _ = ro.training_inputs()  # (N, P+L-1)
        logits = forward(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None)
    return select_thought_outputs(ro, logits, shared) if select else logits


def _by_prefix_length(ro):
    """Sub-batches of the contexts of each prefix length (rectangular), with their thought rows."""
    from dataclasses import replace

    g = ro.group_size
    for p in ro.prefix_lengths.unique().tolist():  # one host sync per micro-batch
        ctx = (ro.prefix_lengths == p).nonzero().squeeze(-1)  # (b_p,)
        rows = (ctx[:, None] * g + torch.arange(g, device=ctx.device)).reshape(-1)  # (b_p*G,)
        part = replace(ro, prefix=ro.prefix[ctx, :p], next_tokens=ro.next_tokens[ctx], thoughts=ro.thoughts[rows],
                       mask=ro.mask[rows], behaviour_logp=ro.behaviour_logp[rows], closed=ro.closed[rows],
                       s_pred=ro.s_pred[rows], prefix_lengths=None)
        yield part, rows
