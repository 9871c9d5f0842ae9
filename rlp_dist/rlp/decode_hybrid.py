"""A fast cached forward for the megatron-core hybrid MambaModel (Nemotron-H) that trains.

The hybrid counterpart of :class:`rlp_dist.rlp.decode.CachedDecoder`: the same parameters of this
rank's live shard, evaluated by a lean program instead of megatron's per-token ``MambaModel`` forward
(which rebuilds its inference bookkeeping, rearranges and repeats B/C/dt/A per head every token).
Nothing is copied to a separate engine, so an optimizer step is seen by the next rollout.

Per layer kind, for hidden x (N, S, H), pre-norm residual x <- x + f(RMSNorm(x)):

    M  [z, xBC, dt] = h W_in                                   this rank's [z | x B C | dt] rows
       xBC = silu(causal_conv1d(xBC))      conv state: the last K-1 inputs  (N, C, K-1)
       S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T              SSM state (N, heads, P, N_s), fp32
       y = S_t C_t + D x_t;  out = gated_rmsnorm(y, z) W_out  (+ all-reduce over tp)
    *  GQA attention over a preallocated (N, groups, T, d) KV cache, no position embedding
    -  squared-ReLU MLP

The prefill runs the chunked SSD scan and the causal conv over the whole prefix (the same
``rlp_kernels.dispatch`` ops megatron's mixer calls: mamba-ssm on GPU, PyTorch references on CPU) and
keeps the final states; a decode step runs ``causal_conv1d_update`` and ``selective_state_update``.
The SSM state is fp32 whatever the weights' dtype (NVIDIA's Nemotron-H recipes); the conv state holds
inputs and stays in the weights' dtype. Checked against the stock no-cache forward by
tests/rlp/test_rollout.py (greedy decoding, forked caches, S_pred and behaviour log-probs).

Tensor parallelism: every Mamba parameter is sharded over heads/groups (no replicated state); the
out-projection, attention projection, MLP fc2 and the vocab-parallel embedding are all-reduced over
the TP group, as megatron does. Logits stay vocab-parallel (N, V/tp).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from rlp_dist.rlp.decode import CachedDecoder
from rlp_kernels import dispatch


def _is_mixer(module) -> bool:
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return isinstance(module, MambaMixer)


@dataclass
class _Mamba:
    norm: torch.Tensor
    norm_eps: float
    w_in: torch.Tensor  # (2*d_inner + 2*groups*n + heads, H) local rows [z | x B C | dt]
    conv_w: torch.Tensor  # (C, K), C = d_inner + 2*groups*n
    conv_b: Optional[torch.Tensor]
    a: torch.Tensor  # (heads,) fp32: A = -exp(A_log)
    d_skip: torch.Tensor  # (heads,)
    dt_bias: torch.Tensor  # (heads,) fp32
    gate_w: torch.Tensor  # (d_inner,) gated RMSNorm weight
    gate_eps: float
    w_out: torch.Tensor  # (H, d_inner)
    chunk: int


@dataclass
class _Attention:
    ln1: torch.Tensor
    w_qkv: torch.Tensor
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    w_proj: torch.Tensor


@dataclass
class _Mlp:
    ln2: torch.Tensor
    w_fc1: torch.Tensor
    w_fc2: torch.Tensor


def supports(model: torch.nn.Module) -> bool:
    """True for the local-spec MambaModel built by ``rlp_dist.models.hybrid`` (RMSNorm, no biases in
    the linears, no position embedding, whole KV groups per TP rank, gated RMSNorm in the mixer), on any
    pipeline stage."""
    from megatron.core.models.mamba import MambaModel

    if not isinstance(model, MambaModel):
        return False
    c = model.config
    mixers = [m for m in model.modules() if _is_mixer(m)]
    return (not c.add_bias_linear and model.position_embedding_type == "none"
            and c.num_query_groups >= c.tensor_model_parallel_size
            and all(m.rmsnorm and not m.D_has_hdim and not m.norm_before_gate for m in mixers))


class HybridDecoder(CachedDecoder):
    """Prefill + one-token decode for this rank's MambaModel shard: KV caches for the attention
    layers, (conv, SSM) states for the Mamba layers; rows can be dropped (``keep``)."""

    def __init__(self, model: torch.nn.Module, max_len: int, tp_group=None):
        super().__init__(model, max_len, tp_group)  # attention dims, embedding, output; no RoPE (Nemotron-H)
        mixer = next((m for m in model.modules() if _is_mixer(m)), None)
        if mixer is not None:  # a pipeline stage may hold attention/MLP layers only
            self.m_heads, self.m_p = mixer.nheads_local_tp, mixer.headdim  # heads and channels per head
            self.m_groups, self.m_n = mixer.ngroups_local_tp, mixer.d_state
            self.m_inner = mixer.d_inner_local_tp
        self.conv: list[Optional[torch.Tensor]] = []  # (N, C, K-1) per Mamba layer
        self.ssm: list[Optional[torch.Tensor]] = []  # (N, heads, P, N_s) fp32 per Mamba layer

    @staticmethod
    def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
        return model.decoder.final_norm

    @staticmethod
    def _collect(layer):
        from megatron.core.ssm.mamba_layer import MambaLayer
        from megatron.core.ssm.mlp_layer import MLPLayer
        from megatron.core.transformer.transformer_layer import TransformerLayer

        kind = type(layer).__name__
        if isinstance(layer, MambaLayer):
            m = layer.mixer
            return _Mamba(layer.norm.weight, layer.norm.eps, m.in_proj.weight, m.conv1d.weight[:, 0],
                          m.conv1d.bias, -torch.exp(m.A_log.float()), m.D, m.dt_bias.float(),
                          m.norm.weight, m.norm.eps, m.out_proj.weight, m.chunk_size)
        if isinstance(layer, MLPLayer):  # an MLPLayer is a TransformerLayer: test it first
            return _Mlp(layer.pre_mlp_layernorm.weight, layer.mlp.linear_fc1.weight, layer.mlp.linear_fc2.weight)
        if isinstance(layer, TransformerLayer):
            att = layer.self_attention
            return _Attention(layer.input_layernorm.weight, att.linear_qkv.weight,
                              att.q_layernorm.weight if att.q_layernorm is not None else None,
                              att.k_layernorm.weight if att.k_layernorm is not None else None,
                              att.linear_proj.weight)
        raise ValueError(f"hybrid cached decode: unknown layer type {kind}; use engine='megatron'")

    # ---- layer kinds --------------------------------------------------------------------------------
    def _split(self, zxbcdt: torch.Tensor):
        """(..., 2*d_inner + 2*g*n + heads) -> z (..., d_inner), xBC (..., C), dt (..., heads)."""
        conv_ch = self.m_inner + 2 * self.m_groups * self.m_n
        return zxbcdt.split([self.m_inner, conv_ch, self.m_heads], dim=-1)

    def _mamba_out(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, lw: _Mamba) -> torch.Tensor:
        """Gated group RMSNorm, out-projection (+ all-reduce), residual. y, z: (N, S, d_inner)."""
        y = dispatch.rmsnorm_fn(y, lw.gate_w, None, z=z, eps=lw.gate_eps,
                                group_size=self.m_inner // self.m_groups, norm_before_gate=False)
        return x + self._all_reduce(F.linear(y, lw.w_out))

    def _mamba_prefill(self, x: torch.Tensor, lw: _Mamba):
        """(B, P, H) -> (B, P, H); returns the conv and SSM states at each branch point t_j (the whole
        prefix without branches), one per cache row: (N, C, K-1) and (N, heads, P_h, N_s) fp32."""
        b, p, _ = x.shape
        h = F.rms_norm(x, (x.shape[-1],), lw.norm, lw.norm_eps)
        z, xbc, dt = self._split(F.linear(h, lw.w_in))
        xbc = xbc.transpose(1, 2).contiguous()  # (B, C, P), channel-first as megatron passes it
        k = lw.conv_w.shape[-1]
        if self.row_ends is not None:
            return self._mamba_prefill_rows(x, z, xbc, dt, lw)
        ends = self.ends_list
        # conv state at t: the K-1 inputs before t (zeros before the sequence)
        conv = torch.stack([F.pad(xbc[..., max(0, t - k + 1):t], (k - 1 - min(t, k - 1), 0)) for t in ends], 1)
        xbc = dispatch.causal_conv1d_fn(xbc, lw.conv_w, lw.conv_b, activation="silu").transpose(1, 2)  # (B, P, C)
        xs, bs, cs = xbc.split([self.m_inner, self.m_groups * self.m_n, self.m_groups * self.m_n], dim=-1)
        xs = xs.reshape(b, p, self.m_heads, self.m_p)
        bs, cs = bs.reshape(b, p, self.m_groups, self.m_n), cs.reshape(b, p, self.m_groups, self.m_n)
        # the SSD scan in segments [t_{j-1}, t_j), each from the previous one's final state: the
        # outputs are the whole scan's, and the state at every branch point comes for free
        ys, states, state, start = [], [], None, 0
        for t in ends:
            seg = slice(start, t)
            y, state = dispatch.mamba_chunk_scan_combined(
                xs[:, seg], dt[:, seg], lw.a, bs[:, seg], cs[:, seg], lw.chunk, D=lw.d_skip, dt_bias=lw.dt_bias,
                dt_softplus=True, initial_states=state, return_final_states=True)  # (B, t-start, heads, P_h)
            ys.append(y)
            states.append(state.float())  # (B, heads, P_h, N_s)
            start = t
        y = torch.cat(ys, 1).reshape(b, p, self.m_inner)
        out = self._mamba_out(x, y, z, lw)
        rows = self.context_of_row  # (N,): index into the (B*k) contexts
        conv = conv.reshape(b * len(ends), *conv.shape[2:]).index_select(0, rows)  # (N, C, K-1)
        ssm = torch.stack(states, 1).reshape(b * len(ends), *states[0].shape[1:]).index_select(0, rows)
        return out, conv, ssm

    def _mamba_prefill_rows(self, x, z, xbc, dt, lw: _Mamba):
        """:meth:`_mamba_prefill` for right-padded rows of their own lengths (``prefill(lengths=)``): one
        scan over the padded rows with dt = 0 on the padding (exp(0 * A) = 1 carries the state unchanged,
        dt * x B^T = 0 adds nothing), so each row's final SSM state is its state at lengths[b]; the conv
        state is each row's last K-1 inputs before lengths[b]. The outputs at real positions are the
        causal scan's; those at padding positions are never read (their keys are masked, then overwritten)."""
        b, c, p = xbc.shape  # (B, C, P) channel-first
        k = lw.conv_w.shape[-1]
        ends = self.row_ends  # (B,)
        j = ends[:, None] - (k - 1) + torch.arange(k - 1, device=x.device)  # (B, K-1): positions before the end
        conv = xbc.gather(2, j.clamp(min=0)[:, None].expand(b, c, k - 1))  # (B, C, K-1)
        conv = conv.masked_fill((j < 0)[:, None], 0.0)  # zeros before the sequence
        xbc = dispatch.causal_conv1d_fn(xbc, lw.conv_w, lw.conv_b, activation="silu").transpose(1, 2)  # (B, P, C)
        xs, bs, cs = xbc.split([self.m_inner, self.m_groups * self.m_n, self.m_groups * self.m_n], dim=-1)
        dt = F.softplus(dt.float() + lw.dt_bias)  # (B, P, heads): the scan's own time step ...
        dt = dt.masked_fill(torch.arange(p, device=x.device)[None, :, None] >= ends[:, None, None], 0.0)  # ... 0 on padding
        y, state = dispatch.mamba_chunk_scan_combined(
            xs.reshape(b, p, self.m_heads, self.m_p), dt, lw.a, bs.reshape(b, p, self.m_groups, self.m_n),
            cs.reshape(b, p, self.m_groups, self.m_n), lw.chunk, D=lw.d_skip, return_final_states=True)
        out = self._mamba_out(x, y.reshape(b, p, self.m_inner), z, lw)
        rows = self.context_of_row  # (N,): the source row of each cache row
        return out, conv.index_select(0, rows), state.float().index_select(0, rows)

    def _mamba_step(self, x: torch.Tensor, lw: _Mamba, i: int, rows: slice) -> torch.Tensor:
        """(n, 1, H) -> (n, 1, H) for cache rows ``rows``, updating layer i's conv and SSM states in place."""
        n = x.shape[0]
        h = F.rms_norm(x[:, 0], (x.shape[-1],), lw.norm, lw.norm_eps)
        z, xbc, dt = self._split(F.linear(h, lw.w_in))  # (N, d_inner), (N, C), (N, heads)
        xbc = dispatch.causal_conv1d_update(xbc, self.conv[i][rows], lw.conv_w, lw.conv_b, "silu")  # (n, C)
        xs, bs, cs = xbc.split([self.m_inner, self.m_groups * self.m_n, self.m_groups * self.m_n], dim=-1)
        hp = (self.m_heads, self.m_p)
        y = dispatch.selective_state_update(
            self.ssm[i][rows], xs.view(n, *hp), dt[..., None].expand(n, *hp),
            lw.a[:, None, None].expand(*hp, self.m_n), bs.view(n, self.m_groups, self.m_n),
            cs.view(n, self.m_groups, self.m_n), D=lw.d_skip[:, None].expand(hp),
            dt_bias=lw.dt_bias[:, None].expand(hp), dt_softplus=True)  # (N, heads, P_h)
        return self._mamba_out(x, y.reshape(n, 1, self.m_inner), z[:, None], lw)

    # ---- cache ------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, repeats: int = 1, branches=None, lengths=None) -> torch.Tensor:
        """Run B prompts of P tokens (ids (B, P) on the first stage, else hidden (B, P, H)), keep every
        layer's state forked ``repeats`` ways (row b*repeats + i is a copy of prompt b); return (B, V/tp)
        logits of the last position on the last stage, else hidden (B, P, H). With ``branches``
        (t_0 < .. < t_{k-1} = P; see :meth:`CachedDecoder.prefill`) row (b*k + j)*repeats + i continues
        context [0, t_j) of sequence b: KV up to t_j, and the conv/SSM states captured at t_j during
        the one scan. With ``lengths`` (B,) the prompts are right-padded: row b continues from
        position lengths[b] (its conv and SSM states taken there)."""
        b, p = x.shape[:2]
        x = self.stage_input(x, p)  # (B, P, H)
        src = self._fork(b, p, repeats, branches, x.device, lengths)  # (N,) source sequence of each row
        n_layers = len(self.layers)
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.conv, self.ssm = [None] * n_layers, [None] * n_layers
        for i, lw in enumerate(self.layers):
            if isinstance(lw, _Mamba):
                x, self.conv[i], self.ssm[i] = self._mamba_prefill(x, lw)
            elif isinstance(lw, _Attention):
                self.k[i], self.v[i] = self._cache(src.numel(), x), self._cache(src.numel(), x)
                x = self._attention_prefill(x, lw, i, src)
            else:
                x = self._mlp(x, lw)  # squared-ReLU MLP: the Transformer's, ungated
        return self.stage_output(x, None if branches is None else self.ends, self.row_ends)  # (B[*k], V/tp) | (B, P, H)

    def step_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Feed one position to cache rows ``rows`` (tokens (n,) on the first stage, else hidden
        (n, 1, H)); return (n, V/tp) logits on the last stage, else hidden (n, 1, H). ``step`` (all rows,
        then ``advance``) is inherited."""
        if self.length >= self.max_len:
            raise ValueError(f"decode past the preallocated cache length {self.max_len}")
        x = self.stage_input(x, 1)  # (n, 1, H)
        at = self._row_positions(rows, x.shape[0], x.device)
        for i, lw in enumerate(self.layers):
            if isinstance(lw, _Mamba):
                x = self._mamba_step(x, lw, i, rows)
            elif isinstance(lw, _Attention):
                x = self._attention_step(x, lw, i, rows, at)
            else:
                x = self._mlp(x, lw)
        return self.stage_output(x)  # (n, V/tp) or (n, 1, H)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every cached row not in ``rows`` (N_kept,): KV caches, conv and SSM states."""
        def pick(states):
            return [s.index_select(0, rows) if s is not None else None for s in states]

        self.k, self.v, self.conv, self.ssm = pick(self.k), pick(self.v), pick(self.conv), pick(self.ssm)
        self.pos = self.pos.index_select(0, rows)
