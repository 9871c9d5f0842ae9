"""The fused chunked linear log-prob (rlp_kernels.logprob) equals the naive full-logits computation at TP=1:
value, entropy and the gradients of hidden states and weight, fp32 and bf16, temperature 1 and 0.7, padded
rows, chunk sizes from 1 to > N (N and V are not multiples of the chunk). The Triton kernels run in
interpreter mode on CPU when triton is installed; on CUDA against the naive computation (gpu marker).

Tolerances are relative to the largest reference magnitude; measured over 30 seeds of this grid (N=13
and 50, H=16, V=37): fp32 <= 1.1e-6 for every quantity; bf16 logp 7.3e-6 and entropy 6.0e-5 (the bf16
GEMM of a chunk of rows can round a logit one ulp away from the full GEMM's: CPU and cuBLAS pick kernels by
shape; with identical logits both agree to 1e-7), and for the gradient that the op accumulates over chunks
(grad_W by token chunks, grad_h by vocabulary blocks) 7.6e-3 (it sums one bf16 partial product per chunk
in fp32, where the naive computation rounds one product once); the other gradient is bit-equal.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rlp_kernels import dispatch
from rlp_kernels.logprob import reference as ref

# quantity -> max |fused - naive| / max |naive|
TOL = {
    torch.float32: dict(logp=1e-5, entropy=1e-5, grad_h=1e-5, grad_w=1e-5),
    torch.bfloat16: dict(logp=5e-5, entropy=2e-4, grad_h=2e-2, grad_w=2e-2),
}
N, H, V = 13, 16, 37


def _inputs(dtype, seed=0, n=N, v=V, pad=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(dtype)
    w = (torch.randn(v, H, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    valid = None
    if pad:
        valid = torch.rand(n, generator=g) > 0.3
        valid[0], valid[-1] = True, False
        y = torch.where(valid, y, torch.full_like(y, 10**9))  # out-of-range ids on padded rows
    gout = torch.randn(n, generator=g)  # a weighted loss, as the policy-gradient surrogate is
    return h, w, y, valid, gout


def _run(fn, h, w, y, valid, gout, temperature, chunk, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fn(hh, ww, y, temperature, valid=valid, return_entropy=True, chunk_tokens=chunk, **kw)
    (logp * gout).sum().backward()
    return dict(logp=logp.detach(), entropy=ent, grad_h=hh.grad, grad_w=ww.grad)


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _check(got, want, dtype):
    errs = {k: _rel(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if not e <= TOL[dtype][k]}
    assert not bad, (bad, errs)
    for k in ("logp", "entropy"):
        assert got[k].dtype == torch.float32
    assert got["grad_h"].dtype == dtype and got["grad_w"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 4, 13, 64, None])
@pytest.mark.parametrize("n", [N, 50])  # backward by vocabulary blocks (N < V) and by token chunks (N > V)
def test_fused_equals_naive(dtype, temperature, chunk, n):
    h, w, y, valid, gout = _inputs(dtype, seed=chunk or 0, n=n)
    want = _run(ref.naive_linear_logprob, h, w, y, valid, gout, temperature, None)
    got = _run(dispatch.linear_logprob, h, w, y, valid, gout, temperature, chunk)
    _check(got, want, dtype)
    pad = ~valid
    assert torch.all(got["logp"][pad] == 0) and torch.all(got["entropy"][pad] == 0)
    assert torch.isfinite(got["grad_w"]).all() and torch.isfinite(got["grad_h"]).all()
    assert torch.all(got["grad_h"][pad] == 0)  # padded rows contribute no gradient


def test_both_backward_orders_are_in_the_grid():
    assert ref.vocab_major(N, V, 4) and ref.vocab_major(N, V, 1)
    assert not ref.vocab_major(50, V, 4) and not ref.vocab_major(N, V, 13)  # N > V; one chunk


def test_entropy_is_the_tempered_distributions_and_detached():
    h, w, y, _, _ = _inputs(torch.float32, pad=False)
    hh = h.clone().requires_grad_()
    logp, ent = ref.linear_logprob(hh, w, y, 0.7, return_entropy=True, chunk_tokens=5)
    logq = torch.log_softmax((h @ w.T) / 0.7, dim=-1)  # (N, V)
    assert torch.allclose(ent, -(logq.exp() * logq).sum(-1), atol=1e-5)
    assert torch.allclose(logp, logq.gather(-1, y[:, None]).squeeze(-1), atol=1e-5)
    assert logp.requires_grad and not ent.requires_grad
    assert isinstance(ref.linear_logprob(h, w, y), torch.Tensor)  # without entropy: one tensor


def test_non_contiguous_hidden_and_no_valid_mask():
    h, w, y, _, gout = _inputs(torch.float32, n=9, pad=False)
    base = torch.randn(H, 2 * 9)  # hidden = a transposed, strided view of it: (9, H), neither stride is 1
    base[:, ::2] = h.T
    for fn in (ref.naive_linear_logprob, dispatch.linear_logprob):
        b = base.clone().requires_grad_()
        hv = b.t()[::2]  # (9, H) view
        assert not hv.is_contiguous()
        ww = w.clone().requires_grad_()
        (fn(hv, ww, y, 0.7, chunk_tokens=4) * gout).sum().backward()
        if fn is ref.naive_linear_logprob:
            want = (b.grad, ww.grad)
        else:
            assert _rel(b.grad, want[0]) < 1e-5 and _rel(ww.grad, want[1]) < 1e-5
            assert torch.all(b.grad[:, 1::2] == 0)


def test_only_weight_or_only_hidden_requires_grad_and_no_grad_mode():
    h, w, y, valid, gout = _inputs(torch.float32)
    want = _run(ref.naive_linear_logprob, h, w, y, valid, gout, 1.0, None)
    ww = w.clone().requires_grad_()
    (ref.linear_logprob(h, ww, y, valid=valid, chunk_tokens=3) * gout).sum().backward()
    assert _rel(ww.grad, want["grad_w"]) < 1e-5
    hh = h.clone().requires_grad_()
    (ref.linear_logprob(hh, w, y, valid=valid, chunk_tokens=3) * gout).sum().backward()
    assert _rel(hh.grad, want["grad_h"]) < 1e-5
    with torch.no_grad():  # the EMA teacher / rollout scoring: forward only
        lp = ref.linear_logprob(h.requires_grad_(), w, y, valid=valid)
    assert not lp.requires_grad and _rel(lp, want["logp"]) < 1e-5


def test_default_chunk_is_about_256_mb_of_fp32_logits():
    c = ref.default_chunk_tokens(151936)
    assert c % 16 == 0 and 0.8 * 2**28 < c * 151936 * 4 <= 2**28
    assert ref.default_chunk_tokens(151936 // 8) > 7 * c  # the budget, not the row count, is fixed


def test_bad_inputs_say_what_is_wrong():
    h, w, y, valid, _ = _inputs(torch.float32)
    cases = [
        (dict(hidden=h[None]), "hidden \\(N, H\\)"),
        (dict(weight=w.double()), "cast one"),
        (dict(targets=y.int()), "targets must be int64"),
        (dict(valid=valid.float()), "valid must be bool"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
    ]
    for bad, msg in cases:
        args = dict(hidden=h, weight=w, targets=y, valid=valid, temperature=1.0, chunk_tokens=None) | bad
        with pytest.raises(ValueError, match=msg):
            dispatch.linear_logprob(**args)


def test_cpu_runs_the_reference_even_with_a_fast_kernel_importable(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("the fast kernel must not run on CPU tensors")

    monkeypatch.setattr(dispatch, "_load_fast", lambda op: broken)
    assert dispatch.backend("linear_logprob", torch.device("cpu")) == "reference"
    h, w, y, valid, _ = _inputs(torch.float32)
    assert _rel(dispatch.linear_logprob(h, w, y, valid=valid), ref.naive_linear_logprob(h, w, y, valid=valid)) < 1e-5


# ---- the Triton kernels -----------------------------------------------------------------------------
_INTERPRET = textwrap.dedent("""
    import json, torch
    from rlp_kernels.logprob import reference as ref, triton as tk
    from test_logprob import _inputs, _run, _rel
    tk.MAX_BLOCK = 32  # several tiles per row, so the running max and its rescaling are exercised
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        # V=300 > N: backward by vocabulary blocks; N=40 > V=37: by token chunks; V not a multiple of the tile
        for temperature, chunk, n, v in ((1.0, 4, 13, 300), (0.7, 5, 13, 300), (0.7, 7, 40, 37)):
            h, w, y, valid, gout = _inputs(dtype, seed=chunk, n=n, v=v)
            want = _run(ref.naive_linear_logprob, h, w, y, valid, gout, temperature, None)
            got = _run(tk.linear_logprob, h, w, y, valid, gout, temperature, chunk)
            out.append((str(dtype), {k: _rel(got[k], want[k]) for k in want}))
    print(json.dumps(out))
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install triton runs its kernels here in interpreter mode)")
def test_triton_kernels_in_interpreter_mode_equal_naive():
    # A fresh process: TRITON_INTERPRET must be set before the kernels are decorated at import.
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", _INTERPRET], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for dtype, errs in json.loads(res.stdout.strip().splitlines()[-1]):
        tol = TOL[getattr(torch, dtype.split(".")[1])]
        assert all(errs[k] <= tol[k] for k in errs), (dtype, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_naive(dtype):
    assert dispatch.backend("linear_logprob", torch.device("cuda")) == "fast", "triton did not import"
    n, h_dim, v = 1000, 256, 50000  # several chunks, several 4096-wide tiles, V not a multiple of either
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, h_dim, generator=g).to(dtype).cuda()
    w = (torch.randn(v, h_dim, generator=g) * 0.1).to(dtype).cuda()
    y = torch.randint(0, v, (n,), generator=g).cuda()
    valid = (torch.rand(n, generator=g) > 0.2).cuda()
    gout = torch.randn(n, generator=g).cuda()
    for temperature in (1.0, 0.7):
        want = _run(ref.naive_linear_logprob, h, w, y, valid, gout, temperature, None)
        got = _run(dispatch.linear_logprob, h, w, y, valid, gout, temperature, 300)
        errs = {k: _rel(got[k], want[k]) for k in want}
        # on CUDA the matmuls' accumulation order differs between chunked and full GEMMs (TF32 off)
        assert all(errs[k] <= 5 * TOL[dtype][k] for k in errs), errs
