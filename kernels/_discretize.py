"""The Mamba2 time-step preprocessing shared by the SSD scan and the single-step state update."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def time_step(dt: torch.Tensor, dt_bias: Optional[torch.Tensor], dt_softplus: bool,
              dt_limit: tuple[float, float], dtype: torch.dtype) -> torch.Tensor:
    """dt <- clamp(softplus(dt + dt_bias)), in the compute dtype (shape unchanged)."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])
