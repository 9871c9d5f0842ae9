"""Gated group RMSNorm (Mamba2's output norm), plain PyTorch.

For x, gate z and weight w, with the last dim split into groups of ``group_size``:

    norm_before_gate=False:  u = x * silu(z);  y = u / sqrt(mean_group(u^2) + eps) * w (+ b)
    norm_before_gate=True:   y = (x / sqrt(mean_group(x^2) + eps) * w (+ b)) * silu(z)

Without z it is a plain (group) RMSNorm. Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype. Signature of
mamba-ssm's ``ops.triton.layernorm_gated.rmsnorm_fn``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def rmsnorm_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """x, z: (..., d); weight, bias: (d,). Returns (..., d) in x.dtype."""
    d = x.shape[-1]
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32  # compute dtype
    gs = d if group_size is None else group_size
    if d % gs:
        raise ValueError(f"gated RMSNorm: group_size={gs} does not divide the last dim {d}")
    u = x.to(cd)
    if z is not None and not norm_before_gate:
        u = u * F.silu(z.to(cd))
    ug = u.reshape(*u.shape[:-1], d // gs, gs)  # (..., groups, gs)
    ug = ug * torch.rsqrt(ug.pow(2).mean(-1, keepdim=True) + eps)
    y = ug.reshape(u.shape) * weight.to(cd)  # (..., d)
    if bias is not None:
        y = y + bias.to(cd)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(cd))
    return y.to(x.dtype)
