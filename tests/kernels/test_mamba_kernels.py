"""CPU references of the Mamba2 kernels against slow, obviously-correct PyTorch loops, forward and
backward, over a grid of shapes and dtypes; carried state across a split sequence equals one run."""

import pytest
import torch
import torch.nn.functional as F

from rlp_kernels import dispatch
from rlp_kernels.conv1d.reference import causal_conv1d_fn, causal_conv1d_update
from rlp_kernels.gated_rmsnorm.reference import rmsnorm_fn
from rlp_kernels.ssd.reference import mamba_chunk_scan_combined
from rlp_kernels.state_update.reference import selective_state_update

TOL = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2}


# ---- slow formulations -------------------------------------------------------------------------
def ssd_loop(x, dt, A, B, C, D, z, dt_bias, s0=None):
    """Sequential recurrence S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T; y_t = S_t C_t + D x_t."""
    b, L, h, p = x.shape
    g, n = B.shape[2:]
    dt = F.softplus(dt.double() + dt_bias.double())
    S = torch.zeros(b, h, p, n, dtype=torch.float64) if s0 is None else s0.double()
    ys = []
    for t in range(L):
        Bt = B[:, t].double().repeat_interleave(h // g, 1)  # (b, h, n)
        Ct = C[:, t].double().repeat_interleave(h // g, 1)
        dA = torch.exp(dt[:, t] * A.double())  # (b, h)
        S = dA[..., None, None] * S + (dt[:, t, :, None] * x[:, t].double())[..., None] * Bt[:, :, None]
        y = torch.einsum("bhpn,bhn->bhp", S, Ct) + D.double()[:, None] * x[:, t].double()
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, 1), S


def conv_loop(x, w, bias, act):
    b, d, L = x.shape
    W = w.shape[1]
    y = torch.zeros(b, d, L, dtype=torch.float64)
    for t in range(L):
        for k in range(W):
            src = t - (W - 1) + k
            if src >= 0:
                y[:, :, t] += w[:, k].double() * x[:, :, src].double()
    y = y + bias.double()[:, None]
    return F.silu(y) if act else y


def norm_loop(x, w, z, eps, gs, before):
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(x.shape[-1] // gs):
        sl = slice(i * gs, (i + 1) * gs)
        u = x[..., sl].double()
        if not before:
            u = u * F.silu(z[..., sl].double())
        y = u / torch.sqrt(u.pow(2).mean(-1, keepdim=True) + eps) * w[sl].double()
        if before:
            y = y * F.silu(z[..., sl].double())
        out[..., sl] = y
    return out


def _ssd_inputs(b, L, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(x=r(b, L, h, p).to(dtype), dt=(r(b, L, h) * 0.5).to(dtype), A=-torch.rand(h, generator=gen) * 2 - 0.2,
                B=r(b, L, g, n).to(dtype), C=r(b, L, g, n).to(dtype), D=r(h), z=r(b, L, h, p).to(dtype),
                dt_bias=r(h) * 0.3)


def _close(a, b, dtype):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(1.0, b.double().abs().max().item())
    assert err <= TOL[dtype] * scale, f"max |diff| {err:.3g} > {TOL[dtype] * scale:.3g}"


# ---- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("b,L,h,p,g,n,chunk", [(2, 13, 4, 3, 2, 5, 4), (1, 16, 2, 4, 1, 3, 16), (2, 7, 6, 2, 3, 4, 8)])
def test_ssd_scan_matches_recurrence_fwd_bwd(dtype, b, L, h, p, g, n, chunk):
    inp = _ssd_inputs(b, L, h, p, g, n, dtype)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inp.items()}
    y, fin = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], chunk,
                                       D=leaves["D"], z=leaves["z"], dt_bias=leaves["dt_bias"], dt_softplus=True,
                                       return_final_states=True)
    ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    y_ref, fin_ref = ssd_loop(*(ref_leaves[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")))
    assert y.dtype == dtype
    _close(y, y_ref, dtype)
    _close(fin, fin_ref, torch.float32 if dtype == torch.bfloat16 else dtype)
    if dtype == torch.bfloat16:
        return
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (y * gy).sum().backward()
    (y_ref * gy.double()).sum().backward()
    for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias"):
        _close(leaves[k].grad, ref_leaves[k].grad, leaves[k].dtype)  # A, D, dt_bias stay fp32


def test_ssd_state_carried_across_split_equals_full_run():
    inp = _ssd_inputs(2, 20, 4, 3, 2, 5, torch.float32, seed=3)
    kw = dict(D=inp["D"], dt_bias=inp["dt_bias"], dt_softplus=True, return_final_states=True)
    args = lambda s: [inp[k][:, s] for k in ("x", "dt")] + [inp["A"]] + [inp[k][:, s] for k in ("B", "C")]  # noqa: E731
    y_full, s_full = mamba_chunk_scan_combined(*args(slice(None)), 8, z=inp["z"], **kw)
    y1, s1 = mamba_chunk_scan_combined(*args(slice(0, 11)), 8, z=inp["z"][:, :11], **kw)
    y2, s2 = mamba_chunk_scan_combined(*args(slice(11, None)), 8, z=inp["z"][:, 11:], initial_states=s1, **kw)
    _close(torch.cat([y1, y2], 1), y_full, torch.float32)
    _close(s2, s_full, torch.float32)
    # decoding the tail one token at a time with the state-update reference gives the same outputs
    state = s1.clone()
    A = inp["A"][:, None, None].expand(4, 3, 5)
    for t in range(11, 20):
        yt = selective_state_update(state, inp["x"][:, t], inp["dt"][:, t, :, None].expand(2, 4, 3), A,
                                    inp["B"][:, t], inp["C"][:, t], D=inp["D"][:, None].expand(4, 3),
                                    z=inp["z"][:, t], dt_bias=inp["dt_bias"][:, None].expand(4, 3), dt_softplus=True)
        _close(yt, y_full[:, t], torch.float32)
    _close(state, s_full, torch.float32)


def test_decode_references_tied_and_indexed_layouts_agree():
    """The state update's fast paths (dt/A tied across the head dim as expanded views; rows 0..b-1
    updated in place) equal the general path (materialised per-channel dt/A; rows picked by
    ``state_batch_indices``), and the conv update's slice path equals its indexed path."""
    gen = torch.Generator().manual_seed(11)
    b, h, p, g, n = 3, 4, 3, 2, 5
    x, z = torch.randn(b, h, p, generator=gen), torch.randn(b, h, p, generator=gen)
    dt, dt_bias = torch.randn(b, h, generator=gen), torch.randn(h, generator=gen)
    A, D = -torch.rand(h, generator=gen), torch.randn(h, generator=gen)
    B, C = torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    tied = dict(dt=dt[..., None].expand(b, h, p), A=A[:, None, None].expand(h, p, n),
                D=D[:, None].expand(h, p), dt_bias=dt_bias[:, None].expand(h, p))
    untied = {k: v.contiguous() for k, v in tied.items()}
    s_tied, s_general = s0.clone(), torch.cat([torch.zeros(2, h, p, n), s0])  # rows 2..4 of a bigger cache
    y1 = selective_state_update(s_tied, x, tied["dt"], tied["A"], B, C, D=tied["D"], z=z,
                                dt_bias=tied["dt_bias"], dt_softplus=True)
    y2 = selective_state_update(s_general, x, untied["dt"], untied["A"], B, C, D=untied["D"], z=z,
                                dt_bias=untied["dt_bias"], dt_softplus=True,
                                state_batch_indices=torch.arange(2, 2 + b))
    _close(y1, y2, torch.float32)
    _close(s_tied, s_general[2:], torch.float32)
    assert not s_general[:2].any(), "rows outside state_batch_indices must not change"
    xc, w, bias = torch.randn(b, 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    c0 = torch.randn(b, 6, 3, generator=gen)
    c_slice, c_idx = c0.clone(), torch.cat([c0, torch.zeros(1, 6, 3)])[[3, 0, 1, 2]]
    out1 = causal_conv1d_update(xc, c_slice, w, bias, "silu")
    out2 = causal_conv1d_update(xc, c_idx, w, bias, "silu", conv_state_indices=torch.tensor([1, 2, 3]))
    _close(out1, out2, torch.float32)
    _close(c_slice, c_idx[1:], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,d,L,W,act", [(2, 5, 9, 4, "silu"), (1, 3, 2, 4, None), (3, 4, 6, 2, "silu")])
def test_causal_conv1d_matches_loop_fwd_bwd(dtype, b, d, L, W, act):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, L, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(d, W, generator=gen, dtype=dtype, requires_grad=True)
    bias = torch.randn(d, generator=gen, dtype=dtype, requires_grad=True)
    y = causal_conv1d_fn(x, w, bias, activation=act)
    y_ref = conv_loop(x, w, bias, act)
    _close(y, y_ref, dtype)
    g1 = torch.autograd.grad(y.sum() + (y ** 2).sum(), (x, w, bias))
    g2 = torch.autograd.grad(y_ref.sum() + (y_ref ** 2).sum(), (x, w, bias))
    for a, r in zip(g1, g2):
        _close(a, r, dtype)


def test_causal_conv1d_split_and_decode_steps_equal_full_run():
    gen = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(2, 6, 11, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    y_full = causal_conv1d_fn(x, w, bias, activation="silu")
    y1, st = causal_conv1d_fn(x[..., :5], w, bias, activation="silu", return_final_states=True)
    y2 = causal_conv1d_fn(x[..., 5:], w, bias, activation="silu", initial_states=st)
    _close(torch.cat([y1, y2], -1), y_full, torch.float32)
    state = torch.nn.functional.pad(x[..., :5], (4 - 5, 0))  # megatron keeps the last W inputs
    for t in range(5, 11):
        _close(causal_conv1d_update(x[..., t], state, w, bias, "silu"), y_full[..., t], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("gs", [4, 12])
def test_gated_rmsnorm_matches_loop_fwd_bwd(dtype, before, gs):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 12, generator=gen).to(dtype).requires_grad_()
    z = torch.randn(3, 5, 12, generator=gen).to(dtype).requires_grad_()
    w = (torch.rand(12, generator=gen) + 0.5).requires_grad_()
    y = rmsnorm_fn(x, w, z=z, eps=1e-5, group_size=gs, norm_before_gate=before)
    y_ref = norm_loop(x, w, z, 1e-5, gs, before)
    _close(y, y_ref, dtype)
    if dtype != torch.float32:
        return
    g1 = torch.autograd.grad((y * y_ref.detach().float()).sum(), (x, z, w))
    g2 = torch.autograd.grad((y_ref * y_ref.detach()).sum(), (x, z, w))
    for a, r in zip(g1, g2):
        _close(a, r, dtype)


def test_dispatcher_uses_reference_on_cpu_and_honours_override(monkeypatch):
    cpu = torch.device("cpu")
    assert dispatch.backend("mamba_chunk_scan_combined", cpu) == "reference"
    monkeypatch.setenv(dispatch.FORCE_ENV, "1")
    assert dispatch.force_reference()
    assert dispatch.backend("selective_state_update", torch.device("cuda")) == "reference"
    inp = _ssd_inputs(1, 6, 2, 2, 1, 3, torch.float32)
    y = dispatch.mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 4, D=inp["D"],
                                           dt_bias=inp["dt_bias"], dt_softplus=True)
    y_ref, _ = ssd_loop(*(inp[k] for k in ("x", "dt", "A", "B", "C", "D")), None, inp["dt_bias"])
    _close(y, y_ref, torch.float32)


@pytest.mark.gpu
def test_fast_kernels_match_reference_on_gpu():
    pytest.importorskip("mamba_ssm")
    inp = {k: v.cuda() for k, v in _ssd_inputs(2, 64, 4, 16, 2, 16, torch.float32).items()}
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    kw = dict(D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], dt_softplus=True)
    assert dispatch.backend("mamba_chunk_scan_combined", inp["x"].device) == "fast"
    y = dispatch.mamba_chunk_scan_combined(*args, 16, **kw)
    y_ref = mamba_chunk_scan_combined(*args, 16, **kw)
    assert (y - y_ref).abs().max().item() < 1e-3
