"""Single-token Mamba2 state update for decoding, plain PyTorch.

With dt = clamp(softplus(dt + dt_bias)) (softplus if asked), per head, channel p and state n:

    S[p, n] <- exp(dt[p] * A[p, n]) * S[p, n] + dt[p] * B[n] * x[p]      (in place)
    y[p]     = sum_n S[p, n] * C[n] + D[p] * x[p]            (then * silu(z[p]) if z is given)

B and C are per group and shared by the h/g heads of a group. This is one step of the recurrence
the SSD scan computes in chunks. Signature of mamba-ssm's ``selective_state_update``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlp_kernels._discretize import time_step


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    **_unused,
) -> torch.Tensor:
    """state: (B_cache, h, p, n) updated in place (rows ``state_batch_indices`` or 0..b-1);
    x, dt, z: (b, h, p); A: (h, p, n); B, C: (b, g, n); D, dt_bias: (h, p).
    The head-less layout (state (b, d, n), x (b, d), A (d, n), B (b, n)) is accepted too."""
    if x.dim() == 2:  # head-less: one "head" of d channels
        out = selective_state_update(
            state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), B.unsqueeze(1),
            C.unsqueeze(1), None if D is None else D.unsqueeze(0), None if z is None else z.unsqueeze(1),
            None if dt_bias is None else dt_bias.unsqueeze(0), dt_softplus, state_batch_indices, dt_limit)
        return out.squeeze(1)
    b, h, p = x.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32  # compute dtype
    g = B.shape[1]
    # dt, dt_bias and A tied across the head dim (expanded views, as Mamba2 passes them): the time
    # step and decay are computed once per (row, head) and broadcast, as mamba-ssm's kernel does
    tied = (dt.stride(-1) == 0 and A.stride(-1) == 0 and A.stride(-2) == 0
            and (dt_bias is None or dt_bias.stride(-1) == 0))
    if tied:
        dt, A = dt[..., :1], A[:, :1, :1]  # (b, h, 1), (h, 1, 1)
        dt_bias = dt_bias[:, :1] if dt_bias is not None else None
    dt = time_step(dt, dt_bias, dt_softplus, dt_limit, cd)  # (b, h, p) or (b, h, 1)
    Bh = B.to(cd).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C.to(cd).repeat_interleave(h // g, dim=1)  # (b, h, n)
    decay = torch.exp(dt[..., None] * A.to(cd))  # (b, h, p, n), or (b, h, 1, 1) when tied
    inject = (dt * x.to(cd))[..., None] * Bh[:, :, None, :]  # (b, h, p, n)
    if state_batch_indices is None and state.dtype == cd:  # rows 0..b-1, updated in place (no copies)
        S = state[:b]
        S.mul_(decay).add_(inject)
    else:
        idx = (state_batch_indices.long().reshape(-1) if state_batch_indices is not None
               else torch.arange(b, device=x.device))
        S = decay * state[idx].to(cd) + inject
        state[idx] = S.to(state.dtype)
    y = torch.einsum("bhpn,bhn->bhp", S, Ch)
    if D is not None:
        y = y + D.to(cd) * x.to(cd)
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)
