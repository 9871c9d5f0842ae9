"""Causal depthwise 1-D convolution (Mamba's short conv), plain PyTorch.

Per channel d with kernel w_d of width W and the W-1 inputs before the sequence
(``initial_states``, zeros by default):

    y[d, t] = act( bias[d] + sum_{k=0}^{W-1} w_d[k] * x[d, t - (W-1) + k] )

``seq_idx`` (b, L) int32 marks packed sequences as in causal-conv1d: tap k counts only if
seq_idx[t - (W-1) + k] == seq_idx[t] (the window restarts at each sequence start), and positions
with seq_idx < 0 (padding) output 0. As in causal-conv1d, seq_idx needs channel-last x
(x.stride(1) == 1, e.g. ``x_bld.transpose(1, 2)``), and cannot be combined with initial or final states.

``causal_conv1d_update`` is the decoding step: the rolling state holds the last W inputs
(state_len >= W-1), the new input is shifted in and the same sum is taken over the newest W.
Signatures follow the causal-conv1d package (``causal_conv1d_fn``, ``causal_conv1d_update``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _act(y: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    if activation in (None, "identity"):
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"causal conv1d: activation={activation!r} is unsupported; use None, 'silu' or 'swish'")


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    seq_idx: Optional[torch.Tensor] = None,
):
    """x: (b, d, L); weight: (d, W); bias: (d,); initial_states: (b, d, W-1); seq_idx: (b, L).
    Returns y (b, d, L) in x.dtype [and the last W-1 inputs (b, d, W-1)]."""
    b, d, L = x.shape
    W = weight.shape[-1]
    if seq_idx is not None:
        return _conv_packed(x, weight, bias, seq_idx, initial_states, return_final_states, activation)
    prev = (initial_states.to(x.dtype) if initial_states is not None
            else x.new_zeros(b, d, W - 1))
    xp = torch.cat([prev, x], dim=-1)  # (b, d, W-1+L)
    y = F.conv1d(xp.to(weight.dtype), weight.unsqueeze(1), bias, groups=d)  # (b, d, L)
    y = _act(y, activation).to(x.dtype)
    if not return_final_states:
        return y
    final = xp[..., -(W - 1):] if W > 1 else xp[..., :0]
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return y, final


def _conv_packed(x, weight, bias, seq_idx, initial_states, return_final_states, activation):
    """causal_conv1d_fn with seq_idx, under causal-conv1d's constraints (channel-last x, no states)."""
    b, d, L = x.shape
    W = weight.shape[-1]
    if x.stride(1) != 1 and d > 1:
        raise ValueError("causal_conv1d_fn: seq_idx needs channel-last x (x.stride(1) == 1), as causal-conv1d "
                         "requires; pass x_bld.transpose(1, 2) of a contiguous (b, L, d) tensor")
    if initial_states is not None or return_final_states:
        raise ValueError("causal_conv1d_fn: seq_idx cannot be combined with initial_states or "
                         "return_final_states (causal-conv1d refuses it too)")
    if tuple(seq_idx.shape) != (b, L):
        raise ValueError(f"causal_conv1d_fn: seq_idx has shape {tuple(seq_idx.shape)}, expected {(b, L)}")
    seq = seq_idx.long()
    seq_p = F.pad(seq, (W - 1, 0), value=-1)  # (b, W-1+L): nothing before the row
    taps = seq_p.unfold(-1, W, 1) == seq[..., None]  # (b, L, W): tap k reads the same sequence
    xp = F.pad(x.to(weight.dtype), (W - 1, 0))  # (b, d, W-1+L)
    win = xp.unfold(-1, W, 1)  # (b, d, L, W): x[t - (W-1) + k]
    y = (win * (weight[:, None, :] * taps[:, None].to(weight.dtype))).sum(-1)  # (b, d, L)
    y = y + bias[:, None] if bias is not None else y
    y = _act(y, activation).masked_fill((seq < 0)[:, None], 0.0)  # padding tokens give 0
    return y.to(x.dtype)


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One or a few decode steps. x: (b, d) or (b, d, l); conv_state: (B_cache, d, S), S >= W-1,
    updated in place (rows ``conv_state_indices`` if given, else rows 0..b-1). Returns x's shape."""
    if cache_seqlens is not None:
        raise NotImplementedError("the reference conv update keeps a shifting state (no circular "
                                  "cache_seqlens); pass cache_seqlens=None")
    squeeze = x.dim() == 2
    xs = x.unsqueeze(-1) if squeeze else x  # (b, d, l)
    W, S, l = weight.shape[-1], conv_state.shape[-1], xs.shape[-1]
    if conv_state_indices is None:  # rows 0..b-1: a slice, no gather/scatter
        rows = conv_state[: xs.shape[0]]
        full = torch.cat([rows.to(xs.dtype), xs], dim=-1)  # (b, d, S+l)
        rows.copy_(full[..., -S:])
    else:
        idx = conv_state_indices.long()
        full = torch.cat([conv_state[idx].to(xs.dtype), xs], dim=-1)  # (b, d, S+l)
        conv_state[idx] = full[..., -S:].to(conv_state.dtype)
    window = full[..., -(W - 1 + l):]  # (b, d, W-1+l)
    if l == 1:  # one decode step: a dot product per channel (a conv call costs ~10x more on CPU)
        y = (window.to(weight.dtype) * weight).sum(-1, keepdim=True)  # (b, d, 1)
        y = y + bias[:, None] if bias is not None else y
    else:
        y = F.conv1d(window.to(weight.dtype), weight.unsqueeze(1), bias, groups=xs.shape[1])  # (b, d, l)
    y = _act(y, activation).to(x.dtype)
    return y.squeeze(-1) if squeeze else y
