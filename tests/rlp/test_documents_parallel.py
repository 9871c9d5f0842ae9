"""Packed documents at TP=2 (both backbones) and PP=2 (the transformer): a packed row with a
DocumentLayout gives the logits and gradients of each document run on its own. One spawn of 2 ranks:
TP=2 first, then the same ranks at PP=1 (the per-document reference, full model) and PP=2 (the packed
row through megatron's 1F1B schedule), weights drawn per global parameter name in both layouts."""

from __future__ import annotations

import zlib

import pytest
import torch

from helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed

LENGTHS = [[4, 1, 7, 3], [6, 9]]  # per row; S = 15


def _set_weights(model):
    from rlp_dist.rlp.ema import global_param_names

    names = global_param_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(names[n].encode())))
            p.copy_(0.2 * noise if p.dim() > 1 else 1.0 + 0.3 * noise)
    return names


def _weights(shape, tp_rank=0, tp=1):
    """The loss's fixed random weights over (B, S, V); this TP rank's vocabulary shard."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    return w.chunk(tp, dim=-1)[tp_rank]


def _worker():
    from rlp_test_models import build
    from test_documents import doc_ids, max_rel, packed_vs_alone, spans

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.models.documents import DocumentLayout
    from rlp_dist.models.runner import run_pipeline

    out = {}
    init_distributed(tp=2, pp=1, backend="gloo")
    for preset in ("tiny_transformer", "tiny_hybrid"):
        logits, ref, grads, ref_grads = packed_vs_alone(build(preset), [[4, 1, 7, 3], [15], [6, 9]])
        out[preset] = [max_rel(logits, ref)] + [max_rel(a, r) for a, r in zip(grads, ref_grads)]

    mcfg = compose(["+model=tiny_transformer", "model.tie_embeddings=false"]).model
    b, s = len(LENGTHS), sum(LENGTHS[0])
    ids = torch.randint(0, 2000, (b, s), generator=torch.Generator().manual_seed(3))
    init_distributed(tp=1, pp=1, backend="gloo")  # PP=1 x DP=2: the per-document reference
    full = build_model(mcfg)
    names = _set_weights(full)
    rows = [[] for _ in LENGTHS]
    for i, a, e in spans(LENGTHS):
        rows[i].append(full(ids[i:i + 1, a:e], torch.arange(e - a)[None], None))  # (1, n, V)
    ref = torch.cat([torch.cat(r, 1) for r in rows], 0)  # (B, S, V)
    (ref.float() * _weights(ref.shape)).sum().backward()
    ref_grads = {names[n]: p.grad.clone() for n, p in full.named_parameters()}

    dims = init_distributed(tp=1, pp=2, backend="gloo")
    stage = build_model(mcfg)
    names = _set_weights(stage)
    lay = DocumentLayout.from_doc_ids(doc_ids(LENGTHS))
    got = {}

    def forward(model, mb):
        return model(mb, lay.positions, None, packed_seq_params=lay)

    def loss(mb, logits):
        got["logits"] = logits.detach().clone()
        value = (logits.float() * _weights(logits.shape)).sum()
        return value, {}

    run_pipeline(stage, [ids], forward, loss, s, b, forward_only=False)
    errs = [max_rel(p.grad, ref_grads[names[n]]) for n, p in stage.named_parameters()]
    if dims.pp_rank == 1:
        errs.append(max_rel(got["logits"], ref.detach()))
    out["pp2"] = errs
    out["pp2_params"] = len(errs)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2)


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_tp2_packed_documents_equal_each_document_alone(results, preset):
    for r in results:
        assert max(r[preset]) < 1e-5, r[preset]


def test_pp2_packed_documents_equal_each_document_alone(results):
    for r in results:
        assert r["pp2_params"] > 3 and max(r["pp2"]) < 1e-5, r["pp2"]
