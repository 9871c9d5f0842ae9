"""Branch-aware attention and Mamba2 mixing for one packed row per context (a :class:`BranchLayout`).

A row is ``[prefix (P) | thought 1 (T) | ... | thought g (T)]``, S = P + g*T. The prefix is causal; a
thought token sees the whole prefix and, causally, its own thought, never another thought. With the
positions of the layout (every thought restarts at P) each query sees exactly the keys (same positions,
same RoPE rotations) it would see in its own replicated row ``[prefix | thought i]``, so every output
equals the replicated forward's, and the backward accumulates the g thoughts' gradients into one
prefix computation.

Attention (``layout.attention``):
- ``"sdpa"`` (the default): the prefix queries run causal SDPA over the prefix; the thought queries of
  thought i run ONE SDPA call over [prefix K/V ; thought i K/V] with the mask [all prefix keys | causal
  own keys], batched over (context, thought). A flash / memory-efficient kernel keeps no score tensor:
  the only extra memory is the per-thought key/value concatenation, (B*g, groups, P+T, d) for K and V
  (at g=16, P=T=2048, 8 KV groups / tp, d=128, bf16: 2 x 134 MB per layer, recomputed under
  ``model.recompute``), against the dense reference's (B, groups, g, heads/group, T, P) fp32 scores and
  their exp (4.3 GB each per layer for Qwen3-1.7B at the paper's shape).
- ``"dense"`` (reference): the thought queries of all g thoughts score the prefix keys in one matmul and
  their own keys causally, with one joint softmax:
      a_i = (exp(q K_p^T - m) V_p + exp(q K_i^T - m) V_i) / (sum exp(q K_p^T - m) + sum exp(q K_i^T - m))
  Kept as the parity reference and the memory benchmark's baseline.

Mamba2 (:func:`branch_mixer`): the prefix is scanned once (causal conv, SSD scan) and its final states
seed every thought: thought i's conv window starts from the prefix's last K-1 inputs and its SSD scan
from the prefix's final SSM state (fp32), g ways. Gradients flow back into the prefix through those
initial states. The in/out projections and the gated norm run per token over the packed row as in
megatron's forward (same modules, same TP collectives); conv and scan are ``rlp_kernels.dispatch`` ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlp_dist.models.layout import BranchLayout


def branch_attention(q, k, v, layout: BranchLayout, scale: float) -> torch.Tensor:
    """q: (S, B, heads, d), k and v: (S, B, groups, d) in megatron's layout, rotated.
    Returns (S, B, heads*d) like megatron's core attention."""
    p, group = layout.prefix_len, layout.group
    s, b, heads, d = q.shape
    qp, kp, vp = (x[:p].permute(1, 2, 0, 3) for x in (q, k, v))  # (B, h|g, P, d)
    out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    out_p = out_p.permute(2, 0, 1, 3).reshape(p, b, heads * d)  # (P, B, h*d)
    if layout.attention == "dense":
        out_t = _thoughts_dense(q[p:], k[p:], v[p:], kp, vp, group, scale)
    else:
        out_t = _thoughts_sdpa(q[p:], k[p:], v[p:], kp, vp, group, scale, layout.thought_mask(q.device))
    return torch.cat([out_p, out_t], dim=0)  # (S, B, h*d)


def _thoughts_sdpa(qt, kt, vt, kp, vp, group: int, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """Thought queries, one SDPA call per (context, thought) over [prefix; own thought] keys.
    qt: (g*T, B, heads, d); kt, vt: (g*T, B, groups, d); kp, vp: (B, groups, P, d). -> (g*T, B, heads*d)."""
    gt, b, heads, d = qt.shape
    groups, p = kp.shape[1], kp.shape[2]
    t = gt // group
    qt = qt.view(group, t, b, heads, d).permute(2, 0, 3, 1, 4).reshape(b * group, heads, t, d)  # (B*g, h, T, d)

    def keys(xt, xp):  # [prefix ; own thought] per thought: (B*g, groups, P+T, d), one copy
        own = xt.view(group, t, b, groups, d).permute(2, 0, 3, 1, 4)  # (B, g, groups, T, d)
        pre = xp[:, None].expand(b, group, groups, p, d)  # (B, g, groups, P, d), a view
        return torch.cat([pre, own], dim=3).reshape(b * group, groups, p + t, d)

    # mask (T, P+T), the layout's (built once per forward): every prefix key, own keys causally
    out = F.scaled_dot_product_attention(qt, keys(kt, kp), keys(vt, vp), attn_mask=mask, scale=scale,
                                         enable_gqa=True)  # (B*g, h, T, d)
    return out.view(b, group, heads, t, d).permute(1, 3, 0, 2, 4).reshape(group * t, b, heads * d)


def _thoughts_dense(qt, kt, vt, kp, vp, group: int, scale: float) -> torch.Tensor:
    """The dense reference (module docstring): one joint softmax over prefix and own-thought scores."""
    gt, b, heads, d = qt.shape
    groups, p = kp.shape[1], kp.shape[2]
    hpg, t = heads // groups, gt // group
    qt = qt.view(group, t, b, groups, hpg, d).permute(2, 3, 0, 4, 1, 5)  # (B, g, G, hpg, T, d)
    kt = kt.view(group, t, b, groups, d).permute(2, 3, 0, 1, 4)  # (B, g, G, T, d)
    vt = vt.view(group, t, b, groups, d).permute(2, 3, 0, 1, 4)
    sp = torch.matmul(qt.reshape(b, groups, group * hpg * t, d), kp.transpose(-1, -2)) * scale
    sp = sp.view(b, groups, group, hpg, t, p)  # (B, g, G, hpg, T, P)
    st = torch.matmul(qt, kt[:, :, :, None].transpose(-1, -2)) * scale  # (B, g, G, hpg, T, T)
    causal = torch.ones(t, t, dtype=torch.bool, device=qt.device).tril()
    st = st.masked_fill(~causal, float("-inf"))
    m = torch.maximum(sp.amax(-1), st.amax(-1)).detach()[..., None]  # shift only: no gradient needed
    ep, et = torch.exp(sp - m), torch.exp(st - m)
    denom = ep.sum(-1, keepdim=True) + et.sum(-1, keepdim=True)  # (B, g, G, hpg, T, 1)
    out = torch.matmul(ep.view(b, groups, group * hpg * t, p), vp).view(b, groups, group, hpg, t, d)
    out = (out + torch.matmul(et, vt[:, :, :, None])) / denom  # (B, g, G, hpg, T, d)
    return out.permute(2, 4, 0, 1, 3, 5).reshape(group * t, b, heads * d)  # (G*T, B, h*d)


def branch_mixer(mixer, hidden: torch.Tensor, layout: BranchLayout) -> tuple[torch.Tensor, None]:
    """A Mamba2 mixer (megatron's ``MambaMixer``, non-fused path, rmsnorm gate, D per head) over one
    packed row per context. hidden: (S, B, H) -> (out (S, B, H), None) like the mixer."""
    from rlp_kernels import dispatch

    m, p, group = mixer, layout.prefix_len, layout.group
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
    # thoughts: g rows per context, each continuing from the prefix's states (channel-last conv input,
    # as causal-conv1d requires with initial states)
    xt = xbc[:, p:].reshape(b * group, t, -1).transpose(1, 2)  # (B*g, C, T), channel-last strides
    init = conv_init.repeat_interleave(group, 0)  # (B*g, C, K-1)
    init = init.transpose(1, 2).contiguous().transpose(1, 2)  # the same, channel-last strides
    xt = dispatch.causal_conv1d_fn(xt, conv_w, m.conv1d.bias, activation="silu", initial_states=init).transpose(1, 2)
    x_, b_, c_ = ssm_inputs(xt, b * group, t)  # (B*g, T, ...)
    yt = dispatch.mamba_chunk_scan_combined(x_, dt[:, p:].reshape(b * group, t, heads), a, b_, c_, m.chunk_size,
                                            initial_states=state.repeat_interleave(group, 0), **kw)
    y = torch.cat([yp.reshape(b, p, inner), yt.reshape(b, group * t, inner)], dim=1)  # (B, S, inner)
    y = m.norm(y.transpose(0, 1), z.transpose(0, 1))  # (S, B, inner): gated group RMSNorm
    return m.out_proj(y)
