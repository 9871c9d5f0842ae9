"""The fused linear log-prob at TP=2 (2 gloo ranks, each holding half of the output layer) equals the naive
full-vocabulary computation on one process: value, entropy, grad of the hidden states (all-reduced inside
the op, as megatron's column-parallel output layer does) and each rank's slice of the weight gradient;
and it makes 2 all-reduces in forward and 1 in backward for the whole call, however many chunks."""

import pytest
import torch

from helpers.spawn import run_ranks

H, V = 8, 38  # V_local = 19; chunks of 4 and 1 do not divide N
# (dtype, temperature, chunk_tokens, padded rows, N): N=11 < V_local runs backward by vocabulary blocks, N=25 by
# token chunks (reference.vocab_major)
CASES = [(torch.float32, 1.0, 4, False, 11), (torch.float32, 0.7, 4, True, 11), (torch.bfloat16, 0.7, 1, True, 11),
         (torch.float32, 0.7, 4, True, 25), (torch.bfloat16, 1.0, 7, True, 25)]


def _case_inputs(dtype, pad, seed, n):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, V, (n,), generator=g)
    valid = None
    if pad:
        valid = torch.rand(n, generator=g) > 0.3
        valid[0], valid[-1] = True, False
        y = torch.where(valid, y, torch.full_like(y, -7))
    return h, w, y, valid, torch.randn(n, generator=g)


def _grads(fn, h, w, y, valid, gout, temperature, **kw):
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = fn(hh, ww, y, temperature, valid=valid, return_entropy=True, **kw)
    (logp * gout).sum().backward()
    return logp.detach(), ent, hh.grad, ww.grad


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _tp2_body():
    import torch.distributed as dist

    from rlp_kernels import dispatch
    from rlp_kernels.logprob.reference import naive_linear_logprob

    dist.init_process_group("gloo")
    group, r = dist.group.WORLD, dist.get_rank()
    sl = slice(r * V // 2, (r + 1) * V // 2)
    out = []
    for i, (dtype, temperature, chunk, pad, n) in enumerate(CASES):
        h, w, y, valid, gout = _case_inputs(dtype, pad, i, n)
        full = _grads(naive_linear_logprob, h, w, y, valid, gout, temperature)  # one process, full vocabulary
        calls = []
        real = dist.all_reduce

        def counting(t, *a, **k):
            calls.append(tuple(t.shape))
            return real(t, *a, **k)

        dist.all_reduce = counting
        try:
            hh, ww = h.clone().requires_grad_(), w[sl].clone().requires_grad_()
            logp, ent = dispatch.linear_logprob(hh, ww, y, temperature, tp_group=group, valid=valid,
                                                return_entropy=True, chunk_tokens=chunk)
            n_fwd = len(calls)
            (logp * gout).sum().backward()
            n_bwd = len(calls) - n_fwd
        finally:
            dist.all_reduce = real
        naive_tp = _grads(naive_linear_logprob, h, w[sl], y, valid, gout, temperature, tp_group=group)
        fused = (logp.detach(), ent, hh.grad, ww.grad)
        errs = {
            "logp": _rel(fused[0], full[0]), "entropy": _rel(fused[1], full[1]),
            "grad_h": _rel(fused[2], full[2]), "grad_w": _rel(fused[3], full[3][sl]),
            # the naive TP path (token_logprobs + column-parallel backward) agrees too
            "naive_tp_grad_h": _rel(naive_tp[2], full[2]), "naive_tp_grad_w": _rel(naive_tp[3], full[3][sl]),
        }
        out.append(dict(dtype=str(dtype), n=n, errs=errs, n_fwd=n_fwd, n_bwd=n_bwd, calls=calls,
                        pad_zero=bool(valid is None or (logp[~valid] == 0).all() and (ent[~valid] == 0).all())))
    return out


@pytest.fixture(scope="module")
def tp2_results():
    return run_ranks(_tp2_body, 2)


TOL = {"torch.float32": dict(logp=1e-5, entropy=1e-5, grad_h=1e-5, grad_w=1e-5),
       "torch.bfloat16": dict(logp=5e-5, entropy=2e-4, grad_h=2e-2, grad_w=2e-2)}  # as in tests/kernels


@pytest.mark.distributed
def test_tp2_values_and_gradients_equal_full_vocabulary(tp2_results):
    for rank, results in enumerate(tp2_results):
        for res in results:
            tol = TOL[res["dtype"]]
            bad = {k: e for k, e in res["errs"].items() if not e <= tol[k.replace("naive_tp_", "")]}
            assert not bad, (rank, res)
            assert res["pad_zero"], (rank, res)


@pytest.mark.distributed
def test_tp2_all_reduces_per_call_not_per_chunk(tp2_results):
    for results in tp2_results:
        for res in results:
            # forward: the (N,) max and the packed (N, 3) sum-exp / target logit / entropy sum
            n = res["n"]
            assert res["calls"][:2] == [(n,), (n, 3)], res["calls"]
            # backward: grad_h over the TP group, once
            assert res["n_fwd"] == 2 and res["n_bwd"] == 1 and res["calls"][2] == (n, H), res
