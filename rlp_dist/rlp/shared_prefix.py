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

The hybrid (Nemotron-H MambaModel) packs the same row; its attention layers branch as above and each
Mamba mixer branches its recurrence (:func:`branch_mixer`): the prefix is scanned once (causal conv, SSD
scan) and its final states seed every thought: thought i's conv window starts from the prefix's last
K-1 inputs and its SSD scan from the prefix's final SSM state (fp32), G ways, so thought i never sees
thought i-1. Gradients flow back into the prefix through those initial states. The in/out projections
and the gated norm run per token over the packed row as in megatron's forward (same modules, same TP
collectives); the conv and the scan are the ``rlp_kernels.dispatch`` ops megatron's mixer calls.
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


def branch_mixer(mixer, hidden: torch.Tensor, p: int, group: int) -> tuple[torch.Tensor, None]:
    """A Mamba2 mixer over one packed row per context: the prefix scanned once, G thoughts continuing
    from its final conv and SSM states. hidden: (S, B, H) megatron's layout, S = P + G*T.

    The math of megatron's ``MambaMixer`` forward (non-fused path, rmsnorm gate, D per head), split at
    the prefix: returns (out (S, B, H), None) like the mixer (the out-projection has no bias).
    """
    from rlp_kernels import dispatch

    m = mixer
    s, b, _ = hidden.shape
    t = (s - p) // group
    inner, ng, n, heads, hd = m.d_inner_local_tp, m.ngroups_local_tp, m.d_state, m.nheads_local_tp, m.headdim
    zxbcdt, _ = m.in_proj(hidden)  # (S, B, D_in) this rank's [z | x B C | dt]
    zxbcdt = zxbcdt.transpose(0, 1).contiguous()  # (B, S, D_in)
    z, xbc, dt = zxbcdt.split([inner, inner + 2 * ng * n, heads], dim=-1)
    conv_w, k = m.conv1d.weight[:, 0], m.conv1d.weight.shape[-1]  # (C, K)
    a = -torch.exp(m.A_log.float())  # (heads,)
    kw = dict(D=m.D, dt_bias=m.dt_bias.float(), dt_softplus=True)

    def ssm_inputs(xbc_act: torch.Tensor, rows: int, length: int):
        x, bb, cc = xbc_act.split([inner, ng * n, ng * n], dim=-1)
        return (x.reshape(rows, length, heads, hd), bb.reshape(rows, length, ng, n),
                cc.reshape(rows, length, ng, n))

    # prefix: causal conv from zeros, SSD scan from zeros; keep the final states
    xp = xbc[:, :p].transpose(1, 2).contiguous()  # (B, C, P)
    conv_init = F.pad(xp[..., -(k - 1):], (k - 1 - min(p, k - 1), 0))  # (B, C, K-1): last prefix inputs
    xp = dispatch.causal_conv1d_fn(xp, conv_w, m.conv1d.bias, activation="silu").transpose(1, 2)  # (B, P, C)
    x_, b_, c_ = ssm_inputs(xp, b, p)
    yp, state = dispatch.mamba_chunk_scan_combined(x_, dt[:, :p], a, b_, c_, m.chunk_size,
                                                   return_final_states=True, **kw)  # (B, P, h, hd), (B, h, hd, n)
    # thoughts: G rows per context, each continuing from the prefix's states (channel-last conv input,
    # as causal-conv1d requires with initial states)
    xt = xbc[:, p:].reshape(b * group, t, -1).transpose(1, 2)  # (B*G, C, T), channel-last strides
    init = conv_init.repeat_interleave(group, 0)  # (B*G, C, K-1)
    init = init.transpose(1, 2).contiguous().transpose(1, 2)  # the same, channel-last strides
    xt = dispatch.causal_conv1d_fn(xt, conv_w, m.conv1d.bias, activation="silu", initial_states=init).transpose(1, 2)
    x_, b_, c_ = ssm_inputs(xt, b * group, t)  # (B*G, T, ...)
    yt = dispatch.mamba_chunk_scan_combined(x_, dt[:, p:].reshape(b * group, t, heads), a, b_, c_, m.chunk_size,
                                            initial_states=state.repeat_interleave(group, 0), **kw)
    y = torch.cat([yp.reshape(b, p, inner), yt.reshape(b, group * t, inner)], dim=1)  # (B, S, inner)
    y = m.norm(y.transpose(0, 1), z.transpose(0, 1))  # (S, B, inner): gated group RMSNorm
    return m.out_proj(y)


@contextlib.contextmanager
def branched_mixers(model: torch.nn.Module, p: int, group: int):
    """Make every Mamba mixer compute :func:`branch_mixer` for this packed layout (none in a GPTModel)."""
    mixers = [mod for mod in model.modules() if type(mod).__name__ == "MambaMixer"]

    def make_forward(mixer):
        def forward(hidden_states, *_args, **_kwargs):
            return branch_mixer(mixer, hidden_states, p, group)
        return forward

    for mixer in mixers:  # instance attribute: shadows the class method, removed on exit
        mixer.forward = make_forward(mixer)
    try:
        yield
    finally:
        for mixer in mixers:
            del mixer.forward


@contextlib.contextmanager
def branched_attention(model: torch.nn.Module, p: int, group: int):
    """Make every layer's core attention compute :func:`branch_attention` for this packed layout."""
    from megatron.core.transformer.attention import Attention

    cores = [layer.self_attention.core_attention for layer in model.decoder.layers
             if isinstance(getattr(layer, "self_attention", None), Attention)]  # hybrid: '*' layers only

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
                   forward=None, select: bool = True) -> torch.Tensor:
    """Logits that predict every thought token, computing each prefix once. -> (B*G, L, V/tp).

    model: the GPTModel or MambaModel (this rank's shard) whose modules are overridden for the call;
    forward: the callable that runs it (the DeepSpeed engine in training; defaults to ``model``).
    select=False returns the forward's own output instead: a pipeline stage before the last hands
    its hidden states on, and the last stage selects.
    """
    b, p = prefix.shape
    n, big_l = thoughts.shape
    ids, positions = packed_inputs(prefix, thoughts, group)
    pos_ids = positions[None].expand(b, -1)
    with rope_positions(model, positions), branched_attention(model, p, group), branched_mixers(model, p, group):
        logits = (forward or model)(ids, pos_ids, None)  # (B, S, V/tp)
    if not select:
        return logits
    v = logits.shape[-1]
    first = logits[:, p - 1, None, None, :].expand(b, group, 1, v)  # (B, G, 1, V): shared l_1 logits
    rest = logits[:, p:].reshape(b, group, big_l - 1, v)  # (B, G, L-1, V)
    return torch.cat([first, rest], dim=2).reshape(n, big_l, v)  # (B*G, L, V)


def supports(model: torch.nn.Module) -> bool:
    """Packed branching is implemented for GPTModel and for the hybrid MambaModel (mixers with the
    gated RMSNorm and D per head, as ``rlp_dist.models.hybrid`` builds them)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.mamba import MambaModel

    if isinstance(model, GPTModel):
        return True
    mixers = [m for m in model.modules() if type(m).__name__ == "MambaMixer"]
    return isinstance(model, MambaModel) and all(
        m.rmsnorm and not m.D_has_hdim and m.cp.cp_size == 1 for m in mixers)


def policy_logits(ro, model: torch.nn.Module, forward=None, shared: bool = True, select: bool = True) -> torch.Tensor:
    """The policy-gradient forward of a RolloutBatch: logits predicting each thought token. (N, L, V/tp).

    shared: branch the G thoughts from one prefix computation where the model allows it (see
    :func:`supports`); otherwise the replicated forward over ``ro.training_inputs()``. Prefixes of
    different lengths (several contexts per document, ``ro.prefix_lengths``) run as one packed forward
    per length (shared) or right-padded (replicated). select=False: return the (one) forward's own
    output, unselected (pipeline stages before the last).
    """
    forward = forward or model
    n, big_l = ro.thoughts.shape
    g = ro.group_size
    if shared and supports(model):
        if ro.prefix_lengths is None:
            return thought_logits(model, ro.prefix, ro.thoughts, g, forward, select)
        if not select:
            raise ValueError("prefixes of several lengths run one packed forward per length; a pipeline stage "
                             "needs one forward per micro-batch: use shared=False (right-padded, replicated)")
        out = None
        for p in ro.prefix_lengths.unique().tolist():  # contexts of one length: a rectangular batch
            ctx = (ro.prefix_lengths == p).nonzero().squeeze(-1)  # (b_p,)
            rows = (ctx[:, None] * g + torch.arange(g, device=ctx.device)).reshape(-1)  # (b_p*G,)
            part = thought_logits(model, ro.prefix[ctx, :p], ro.thoughts[rows], g, forward)  # (b_p*G, L, V)
            out = part.new_empty(n, big_l, part.shape[-1]) if out is None else out
            out = out.index_copy(0, rows, part)
        return out
    ids, offsets = ro.training_inputs()  # (N, P+L-1), (N,)
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = forward(ids, pos, None)  # (N, P+L-1, V/tp)
    if not select:
        return logits
    if ro.prefix_lengths is None:  # one offset for every row: a view, no (N, L, V) copy
        return logits[:, ro.prefix.shape[1] - 1:]
    at = offsets[:, None] + torch.arange(big_l, device=ids.device)  # (N, L): row r's thought logits
    return logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))  # (N, L, V/tp)
