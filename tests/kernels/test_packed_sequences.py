"""Packed sequences in the Mamba kernel references (``seq_idx``, mamba-ssm / causal-conv1d semantics):
a row holding several documents gives, forward and backward, exactly what each document gives on its own
(the first from the initial state, the final state that of the last document)."""

import pytest
import torch

from rlp_kernels import dispatch
from rlp_kernels.conv1d.reference import causal_conv1d_fn
from rlp_kernels.ssd.reference import mamba_chunk_scan_combined

# documents per row: lengths cross chunk ends, start exactly on them, and are shorter than the conv width
ROWS = [[5, 1, 9, 3], [8, 8, 2, 0], [18]]  # chunk 4 / 8 below; 0 pads nothing
L = 18


def _seq_idx(rows):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).int()  # (b, L)


def _docs(rows):
    """(row, start, end) of every document."""
    out = []
    for i, r in enumerate(rows):
        start = 0
        for n in r:
            if n:
                out.append((i, start, start + n))
            start += n
    return out


def _close(a, b, tol=2e-5):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max |diff| {err:.3g}"


@pytest.mark.parametrize("chunk", [4, 8])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_seq_idx_equals_documents_run_separately(chunk, with_init):
    gen = torch.Generator().manual_seed(chunk)
    b, h, p, g, n = 3, 4, 3, 2, 5
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    inp = dict(x=r(b, L, h, p), dt=r(b, L, h) * 0.5, B=r(b, L, g, n), C=r(b, L, g, n), z=r(b, L, h, p),
               A=-torch.rand(h, generator=gen, dtype=torch.float64) - 0.2, D=r(h), dt_bias=r(h) * 0.3,
               s0=r(b, h, p, n))
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    ref = {k: v.clone().requires_grad_() for k, v in inp.items()}
    kw = lambda t: dict(D=t["D"], dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True)  # noqa: E731
    seq = _seq_idx(ROWS)
    y, fin = mamba_chunk_scan_combined(*(leaves[k] for k in ("x", "dt", "A", "B", "C")), chunk, z=leaves["z"],
                                       initial_states=leaves["s0"] if with_init else None, seq_idx=seq,
                                       **kw(leaves))
    per_row, fins = [[] for _ in ROWS], {}
    for i, s, e in _docs(ROWS):
        cut = {k: ref[k][i:i + 1, s:e] for k in ("x", "dt", "B", "C", "z")}
        init = ref["s0"][i:i + 1] if with_init and s == 0 else None  # only document 0 continues the state
        yd, fd = mamba_chunk_scan_combined(cut["x"], cut["dt"], ref["A"], cut["B"], cut["C"], chunk, z=cut["z"],
                                           initial_states=init, **kw(ref))
        per_row[i].append(yd)
        fins[i] = fd[0]  # the last document of the row wins
    ys = torch.cat([torch.cat(parts, 1) for parts in per_row], 0)  # (b, L, h, p)
    _close(y, ys, 1e-10)
    _close(fin, torch.stack([fins[i] for i in range(b)]), 1e-10)
    gy, gf = r(*y.shape), r(*fin.shape)
    (y * gy).sum().add((fin * gf).sum()).backward()
    (ys * gy).sum().add((torch.stack([fins[i] for i in range(b)]) * gf).sum()).backward()
    for k in inp:
        if k == "s0" and not with_init:
            continue
        _close(leaves[k].grad, ref[k].grad, 1e-10)


def test_ssd_seq_idx_fp32_and_a_single_sequence_is_the_plain_scan():
    gen = torch.Generator().manual_seed(3)
    b, h, p, g, n = 1, 2, 4, 1, 3
    x, dt = torch.randn(b, 13, h, p, generator=gen), torch.randn(b, 13, h, generator=gen)
    B, C = torch.randn(b, 13, g, n, generator=gen), torch.randn(b, 13, g, n, generator=gen)
    A = -torch.rand(h, generator=gen) - 0.1
    plain = mamba_chunk_scan_combined(x, dt, A, B, C, 4, dt_softplus=True)
    same = mamba_chunk_scan_combined(x, dt, A, B, C, 4, dt_softplus=True, seq_idx=torch.zeros(b, 13, dtype=torch.int32))
    torch.testing.assert_close(same, plain)
    with pytest.raises(ValueError, match="seq_idx has shape"):
        mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=torch.zeros(b, 12, dtype=torch.int32))


@pytest.mark.parametrize("W", [4, 2])
def test_conv_seq_idx_equals_documents_run_separately(W):
    gen = torch.Generator().manual_seed(W)
    b, d = 3, 5
    x_bld = torch.randn(b, L, d, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, W, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
    y = causal_conv1d_fn(x_bld.transpose(1, 2), w, bias, seq_idx=_seq_idx(ROWS), activation="silu")  # channel-last
    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x_bld, w, bias))
    per_row = [[] for _ in ROWS]
    for i, s, e in _docs(ROWS):
        per_row[i].append(causal_conv1d_fn(x_ref[i:i + 1, s:e].transpose(1, 2), w_ref, b_ref, activation="silu"))
    ys = torch.cat([torch.cat(parts, -1) for parts in per_row], 0)  # (b, d, L)
    _close(y, ys, 1e-12)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    g1 = torch.autograd.grad((y * gy).sum(), (x_bld, w, bias))
    g2 = torch.autograd.grad((ys * gy).sum(), (x_ref, w_ref, b_ref))
    for a, r in zip(g1, g2):
        _close(a, r, 1e-12)


def test_conv_seq_idx_padding_and_the_kernels_constraints():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=gen).transpose(1, 2)  # (b, d, L) channel-last
    w, bias = torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen)
    seq = torch.tensor([[0, 0, 0, 0, 0, -1, -1], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.int32)
    y = causal_conv1d_fn(x, w, bias, seq_idx=seq, activation="silu")
    assert not y[0, :, 5:].any(), "padding positions (seq_idx < 0) output 0, as causal-conv1d does"
    _close(y[0, :, :5], causal_conv1d_fn(x[:1, :, :5], w, bias, activation="silu")[0])
    with pytest.raises(ValueError, match="channel-last"):
        causal_conv1d_fn(x.contiguous(), w, bias, seq_idx=seq)
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d_fn(x, w, bias, seq_idx=seq, initial_states=torch.zeros(2, 3, 3))
    # the dispatcher passes seq_idx through by keyword, as the fast kernel takes it
    torch.testing.assert_close(dispatch.causal_conv1d_fn(x, w, bias, seq_idx=seq, activation="silu"), y)
