"""Mamba2 state-space duality (SSD) chunked scan, plain PyTorch.

Per head h (P channels, N state dims, group g(h) supplying B and C), with
dt_t = clamp(softplus(dt_raw_t + dt_bias), *dt_limit) and a_t = dt_t * A (A < 0):

    S_t = exp(a_t) * S_{t-1} + dt_t * x_t B_t^T        S: (P, N), S_{-1} = initial_states or 0
    y_t = S_t C_t + D * x_t                              (then y_t *= silu(z_t) if z is given)

The chunked form (Dao & Gu, "Transformers are SSMs", 2024) splits the sequence into chunks of
``chunk_size`` positions. Inside a chunk the output is a masked "attention" with decay
L[l, s] = exp(sum_{s<k<=l} a_k); across chunks only the (P, N) states are carried, by a scan over
chunk boundaries. This is mathematically equal to the recurrence above (tests check it against a
sequential loop) and has the signature of mamba-ssm's ``mamba_chunk_scan_combined``.

``seq_idx`` (b, L) int marks packed sequences with mamba-ssm's semantics: the state is reset where
the index changes, i.e. the scan equals one run per sequence, where the sequence with index 0 starts
from ``initial_states`` (any other from zeros) and the final state is that of the row's last sequence.
As in mamba-ssm's kernels: inside a chunk, position l reads source s only if seq_idx[l] == seq_idx[s];
a chunk's state holds the positions of the chunk's last sequence; the state entering chunk c is
carried only while the chunk-end indices stay equal (the one before chunk 0 counts as index 0). Everything is
computed in fp32 (fp64 for fp64 inputs) and returned in x's dtype; the final state stays in that precision.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlp_kernels._discretize import time_step


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[..., l, s] = sum_{s<k<=l} a[..., k] for l >= s, -inf above."""
    T = a.shape[-1]
    x = a[..., None].expand(*a.shape, T)  # (..., T, T): x[..., k, s] = a[..., k]
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def _chunk(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(b, L, ...) with L a multiple of chunk_size -> (b, L/chunk_size, chunk_size, ...)."""
    return t.reshape(t.shape[0], t.shape[1] // chunk_size, chunk_size, *t.shape[2:])


def _sequence_masks(seq_idx: Optional[torch.Tensor], L: int, pad: int, chunk_size: int):
    """The 0/1 masks (bool) that make the chunked scan restart at each change of ``seq_idx`` (b, L).

    within (b, c, l, s): seq[l] == seq[s] inside a chunk; to_end (b, c, l): seq[l] == seq at the
    chunk's last real position; carry (b, c+1, c+1): [z, c] no chunk-end index change in (c, z] (index
    0 is the entering state, index k the end of chunk k-1, which sits at index 0 before chunk 0);
    from_prev (b, c, l): seq[l] == the index at the end of the previous chunk (0 before chunk 0).
    """
    if seq_idx is None:
        return None
    seq = seq_idx.long()
    seq = torch.cat([seq, seq[:, -1:].expand(-1, pad)], dim=1)  # (b, L'): padding joins the last sequence
    sc = _chunk(seq, chunk_size)  # (b, c, l)
    last = sc[:, :, -1]  # (b, c): index at each chunk's end (padding repeats the last real one)
    ends = F.pad(last, (1, 0))  # (b, c+1): 0 for the state entering chunk 0
    breaks = torch.cumsum((ends[:, 1:] != ends[:, :-1]).long(), dim=1)  # (b, c)
    breaks = F.pad(breaks, (1, 0))  # (b, c+1): changes up to each index
    return {"within": sc[..., :, None] == sc[..., None, :],
            "to_end": sc == last[..., None],
            "carry": breaks[:, :, None] == breaks[:, None, :],
            "from_prev": sc == ends[:, :-1, None]}


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    **_unused,
):
    """x: (b, L, h, p); dt: (b, L, h); A: (h,); B, C: (b, L, g, n); D: (h,) or (h, p);
    z: (b, L, h, p); dt_bias: (h,); initial_states: (b, h, p, n).
    Returns y (b, L, h, p) in x.dtype, and the final state (b, h, p, n) in fp32/fp64 if asked."""
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "the reference SSD scan marks packed sequences with seq_idx only: cu_seqlens / "
            "return_varlen_states need mamba-ssm's kernel; pass seq_idx (b, L) instead")
    b, L, h, p = x.shape
    if seq_idx is not None and tuple(seq_idx.shape) != (b, L):
        raise ValueError(f"SSD scan: seq_idx has shape {tuple(seq_idx.shape)}, expected (batch, seqlen) = {(b, L)}")
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32  # compute dtype
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"SSD scan: {h} heads are not divisible into {g} groups of B/C")
    dt = time_step(dt, dt_bias, dt_softplus, dt_limit, cd)
    xf = x.to(cd)
    Bf = B.to(cd).repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    Cf = C.to(cd).repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    pad = (-L) % chunk_size
    xd = F.pad(xf * dt[..., None], (0, 0, 0, 0, 0, pad))  # (b, L', h, p): dt_t * x_t
    a = F.pad(dt * A.to(cd), (0, 0, 0, pad))  # (b, L', h): a_t = dt_t * A
    Bc, Cc = (_chunk(F.pad(t, (0, 0, 0, 0, 0, pad)), chunk_size) for t in (Bf, Cf))  # (b, c, l, h, n)
    xc = _chunk(xd, chunk_size)  # (b, c, l, h, p)
    ac = _chunk(a, chunk_size).permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cum = torch.cumsum(ac, dim=-1)  # (b, h, c, l)
    same = _sequence_masks(seq_idx, L, pad, chunk_size)  # None, or the seq_idx masks below

    # 1. within-chunk outputs: y[l] = sum_{s<=l} (C_l . B_s) exp(a_{s+1..l}) dt_s x_s
    decay = torch.exp(_segsum(ac))  # (b, h, c, l, s)
    if same is not None:
        decay = decay * same["within"][:, None]  # l reads s only inside one sequence
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xc)
    # 2. state contributed by each chunk at its end: sum_s exp(a_{s+1..end}) dt_s x_s B_s^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    if same is not None:
        to_end = to_end * same["to_end"][:, None]  # only the chunk's last sequence enters its state
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xc)
    # 3. scan over chunk boundaries, starting from the initial state
    s0 = (initial_states.to(cd) if initial_states is not None
          else x.new_zeros(b, h, p, n, dtype=cd))
    states = torch.cat([s0[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    if same is not None:
        chunk_decay = chunk_decay * same["carry"][:, None]  # no state carried across a sequence start
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # state at each chunk start
    prev, final = states[:, :-1], states[:, -1]  # (b, c, h, p, n), (b, h, p, n)
    # 4. output from the state entering each chunk: C_l exp(a_{start..l}) S_prev
    from_prev = torch.exp(a_cum) if same is None else torch.exp(a_cum) * same["from_prev"][:, None]  # (b, h, c, l)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev, from_prev)
    y = (y_diag + y_off).reshape(b, -1, h, p)[:, :L]  # (b, L, h, p)
    if D is not None:
        Df = D.to(cd)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(cd))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y
