"""The one place that chooses between mamba-ssm / causal-conv1d kernels and our PyTorch references.

Each op below has the signature of its fast counterpart. The fast kernel is used when the inputs
live on a CUDA device, the package providing it imports, and ``RLP_KERNELS_FORCE_REFERENCE`` is not
set to a true value ("1", "true", "yes"); otherwise the plain-PyTorch reference in
``kernels/<op>/reference.py`` runs. Callers (the Mamba mixer through
``rlp_dist.distributed.megatron_compat``, tests, benchmarks) never branch on the device.

    op                          fast path                                        reference
    mamba_chunk_scan_combined   mamba_ssm.ops.triton.ssd_combined                ssd/reference.py
    causal_conv1d_fn / _update  causal_conv1d                                    conv1d/reference.py
    rmsnorm_fn, RMSNormGated    mamba_ssm.ops.triton.layernorm_gated             gated_rmsnorm/reference.py
    selective_state_update      mamba_ssm.ops.triton.selective_state_update      state_update/reference.py
    linear_logprob              logprob/triton.py (our Triton kernels, cuBLAS)   logprob/reference.py
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Optional

import torch

from rlp_kernels.conv1d import reference as conv_ref
from rlp_kernels.gated_rmsnorm import reference as norm_ref
from rlp_kernels.logprob import reference as logprob_ref
from rlp_kernels.ssd import reference as ssd_ref
from rlp_kernels.state_update import reference as su_ref

FORCE_ENV = "RLP_KERNELS_FORCE_REFERENCE"

_FAST = {  # op -> (module, attribute)
    "mamba_chunk_scan_combined": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "causal_conv1d_fn": ("causal_conv1d", "causal_conv1d_fn"),
    "causal_conv1d_update": ("causal_conv1d", "causal_conv1d_update"),
    "rmsnorm_fn": ("mamba_ssm.ops.triton.layernorm_gated", "rmsnorm_fn"),
    "selective_state_update": ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update"),
    "linear_logprob": ("rlp_kernels.logprob.triton", "linear_logprob"),
}


def force_reference() -> bool:
    return os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes")


@functools.lru_cache(maxsize=None)
def _load_fast(op: str) -> Optional[Any]:
    mod_name, attr = _FAST[op]
    try:
        return getattr(importlib.import_module(mod_name), attr)
    except Exception:  # not installed, or installed without its compiled parts (CPU machines)
        pass
    if mod_name.startswith("mamba_ssm."):
        try:
            return getattr(_import_triton_only(mod_name), attr)
        except Exception:
            return None
    return None


def _import_triton_only(mod_name: str):
    """Import a mamba-ssm Triton module when the package itself does not import: a Python-only install
    (``MAMBA_SKIP_CUDA_BUILD=TRUE``) has the Triton kernels but its ``__init__`` imports the missing CUDA
    extension (selective_scan_cuda). The package is entered by its path without running that
    ``__init__``; nothing of mamba-ssm is modified."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is not None and spec.submodule_search_locations:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__spec__ = spec
        sys.modules["mamba_ssm"] = pkg
    return importlib.import_module(mod_name)


def fast_kernel(op: str, device: torch.device) -> Optional[Any]:
    """The fast implementation of ``op`` for tensors on ``device``, or None for the reference."""
    if device.type != "cuda" or force_reference():
        return None
    return _load_fast(op)


def backend(op: str, device: torch.device) -> str:
    """'fast' or 'reference': which implementation ``op`` runs for tensors on ``device``."""
    return "fast" if fast_kernel(op, device) is not None else "reference"


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **kw):
    fn = fast_kernel("mamba_chunk_scan_combined", x.device) or ssd_ref.mamba_chunk_scan_combined
    return fn(x, dt, A, B, C, chunk_size, **kw)


def causal_conv1d_fn(x, weight, bias=None, **kw):
    fn = fast_kernel("causal_conv1d_fn", x.device) or conv_ref.causal_conv1d_fn
    return fn(x, weight, bias, **kw)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, **kw):
    fn = fast_kernel("causal_conv1d_update", x.device) or conv_ref.causal_conv1d_update
    return fn(x, conv_state, weight, bias, activation, **kw)


def rmsnorm_fn(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    fn = fast_kernel("rmsnorm_fn", x.device) or norm_ref.rmsnorm_fn
    return fn(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None, **kw):
    fn = fast_kernel("selective_state_update", x.device) or su_ref.selective_state_update
    return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
              state_batch_indices=state_batch_indices, **kw)


def linear_logprob(hidden, weight, targets, temperature=1.0, tp_group=None, valid=None, return_entropy=False,
                   chunk_tokens=None):
    """log softmax(hidden @ weight.T / temperature)[targets] over the full TP-sharded vocabulary, fp32 (N,),
    chunked so no (N, V) logits exist; ``(logp, entropy)`` with return_entropy. See logprob/reference.py."""
    fn = fast_kernel("linear_logprob", hidden.device) or logprob_ref.linear_logprob
    return fn(hidden, weight, targets, temperature, tp_group, valid, return_entropy, chunk_tokens)


class RMSNormGated(torch.nn.Module):
    """Gated group RMSNorm module (the constructor of mamba-ssm's ``layernorm_gated.RMSNorm``)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)
