"""CUDA path of the fused linear log-prob: Triton kernels for the two per-chunk steps of reference.py.

The chunk loop, the matmuls (cuBLAS through torch: z = h_c @ W^T, grad_h = grad_z @ W,
grad_W += grad_z^T @ h_c), the TP all-reduces and the autograd function are reference.py's
:class:`~rlp_kernels.logprob.reference.LinearLogprob`; only the element-wise passes over a chunk's
(C, V_local) logits differ:

- ``_stats_kernel``: one program per row streams the row once in BLOCK-wide tiles with an online
  (running-max) softmax: m = max z/T, s = sum e^{z/T - m}, a = sum e^{z/T - m}(z/T - m), and reads the
  target logit. Writes four fp32 numbers per row: no fp32 copy of the chunk (the torch reference makes two).
- ``_grad_kernel``: grad_z = (g/T)(onehot(y) - e^{z/T - lse}) written in the input dtype IN PLACE over the
  recomputed logits (each element is read, then written, by the same program), so backward also holds one
  input-dtype chunk. At bf16, C = 432, V_local = 151936 that chunk is 131 MB.

Chosen by :func:`rlp_kernels.dispatch.linear_logprob` only for CUDA tensors. With TRITON_INTERPRET=1 set
before this module is imported, the same kernels run on CPU tensors (the CPU test does that on tiny shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlp_kernels.logprob import reference


@triton.jit
def _stats_kernel(z_ptr, stride_z, local_ptr, m_ptr, s_ptr, t_ptr, a_ptr, V, temperature,
                  ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK)
    # Start the running max at the first tile's max, so the first update rescales by e^0 (no -inf - -inf).
    x0 = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
    m = tl.max(x0, axis=0)
    s = 0.0
    a = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = m - m_new  # <= 0
        rescale = tl.exp(shift)
        d = tl.where(mask, x - m_new, 0.0)
        e = tl.where(mask, tl.exp(d), 0.0)
        if ENTROPY:
            a = (a + shift * s) * rescale + tl.sum(e * d, axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    loc = tl.load(local_ptr + row)
    t = tl.load(base + tl.maximum(loc, 0)).to(tl.float32) / temperature
    t = tl.where(loc >= 0, t, 0.0)
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(t_ptr + row, t)
    if ENTROPY:
        tl.store(a_ptr + row, a)


@triton.jit
def _grad_kernel(z_ptr, stride_z, local_ptr, lse_ptr, scale_ptr, V, temperature, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = z_ptr + row.to(tl.int64) * stride_z
    lse = tl.load(lse_ptr + row)
    sc = tl.load(scale_ptr + row)
    loc = tl.load(local_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32) / temperature
        onehot = tl.where(offs == loc, 1.0, 0.0)  # loc = -1 where this rank does not own the target
        g = sc * (onehot - tl.exp(x - lse))
        tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


MAX_BLOCK = 4096  # tile width along the vocabulary (the CPU test lowers it to run the online max over tiles)


def _launch_cfg(v: int) -> tuple[int, int]:
    block = min(MAX_BLOCK, triton.next_power_of_2(v))
    return block, (8 if block >= 2048 else 4)


def chunk_stats(z: torch.Tensor, local: torch.Tensor, temperature: float, entropy: bool, work=None):
    """Triton version of :func:`reference.chunk_stats` (same contract; needs no fp32 workspace)."""
    c, v = z.shape
    if z.stride(1) != 1:
        z = z.contiguous()
    local = local.contiguous()
    m, s, t = (torch.empty(c, dtype=torch.float32, device=z.device) for _ in range(3))
    a = torch.empty(c, dtype=torch.float32, device=z.device) if entropy else m  # m: an unused placeholder
    block, warps = _launch_cfg(v)
    _stats_kernel[(c,)](z, z.stride(0), local, m, s, t, a, v, float(temperature),
                        ENTROPY=entropy, BLOCK=block, num_warps=warps)
    return m, s, t, (a if entropy else None)


def chunk_grad_logits(z: torch.Tensor, lse: torch.Tensor, local: torch.Tensor, scale: torch.Tensor,
                      temperature: float, work=None) -> torch.Tensor:
    """Triton version of :func:`reference.chunk_grad_logits`: overwrites z with the gradient and returns it."""
    c, v = z.shape
    assert z.stride(1) == 1, "the logits chunk is written in place: it must have unit column stride"
    block, warps = _launch_cfg(v)
    _grad_kernel[(c,)](z, z.stride(0), local.contiguous(), lse.contiguous(), scale.contiguous(), v,
                       float(temperature), BLOCK=block, num_warps=warps)
    return z


TRITON_OPS = (chunk_stats, chunk_grad_logits)


def linear_logprob(hidden, weight, targets, temperature=1.0, tp_group=None, valid=None,
                   return_entropy=False, chunk_tokens=None):
    """:func:`reference.linear_logprob` with the Triton chunk kernels."""
    return reference.linear_logprob(hidden, weight, targets, temperature, tp_group, valid, return_entropy,
                                    chunk_tokens, ops=TRITON_OPS)
