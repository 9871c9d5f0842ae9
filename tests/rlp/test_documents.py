"""Packed documents (rlp_dist.models.documents): each document of a packed row gets exactly what it gets
on its own — block-diagonal causal attention, the Mamba mixer with its states reset at each start."""

import pytest
import torch
import torch.nn.functional as F

from rlp_dist.models.documents import DocumentLayout, _flex, document_attention, document_mixer

LENGTHS = [[4, 1, 7, 3], [15], [6, 9]]  # per row; S = 15
S = 15


def doc_ids(lengths=LENGTHS):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])  # (B, S)


def spans(lengths=LENGTHS):
    """(row, start, end) of every document."""
    out = []
    for i, r in enumerate(lengths):
        a = 0
        for n in r:
            out.append((i, a, a + n))
            a += n
    return out


def test_layout_positions_segments_and_errors():
    lay = DocumentLayout.from_doc_ids(doc_ids())
    assert lay.qkv_format is None and lay.max_seqlen_q == S
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert lay.positions[1].tolist() == list(range(S))
    assert lay.segments() == [[(0, 4), (4, 5), (5, 12), (12, 15)], [(0, 15)], [(0, 6), (6, 15)]]
    assert torch.equal(DocumentLayout.from_positions(lay.positions).doc_ids, lay.doc_ids)
    with pytest.raises(ValueError, match="non-decreasing"):
        DocumentLayout.from_doc_ids(torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        DocumentLayout.from_doc_ids(torch.zeros(3, dtype=torch.int32))


def _qkv(heads=4, groups=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    return [torch.randn(S, b, n, d, generator=gen, dtype=torch.float64, requires_grad=True)
            for n in (heads, groups, groups)]  # (S, B, h|g, d)


def _alone(q, k, v, scale):
    """Each document through plain causal SDPA on its own (GQA by explicit K/V repetition)."""
    heads, groups = q.shape[2], k.shape[2]
    rows = [[] for _ in LENGTHS]
    for i, a, e in spans():
        qd, kd, vd = (x[a:e, i].transpose(0, 1) for x in (q, k, v))  # (h|g, n, d)
        kd, vd = (x.repeat_interleave(heads // groups, 0) for x in (kd, vd))
        rows[i].append(F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale))  # (h, n, d)
    out = torch.stack([torch.cat(r, 1) for r in rows], 1)  # (h, B, S, d)
    return out.permute(2, 1, 0, 3).reshape(S, len(LENGTHS), -1)  # (S, B, h*d)


@pytest.mark.parametrize("path", ["segments", "flex"])
def test_document_attention_equals_each_document_alone(path):
    q, k, v = _qkv()
    lay = DocumentLayout.from_doc_ids(doc_ids())
    scale = 0.3
    if path == "segments":
        out = document_attention(q, k, v, lay, scale)
    else:  # the CUDA path's math (flex_attention with the layout's BlockMask), eager on CPU: forward only
        qb, kb, vb = (x.detach().permute(1, 2, 0, 3) for x in (q, k, v))  # flex has no CPU backward
        out = _flex(qb, kb, vb, lay, scale, compiled=False).permute(2, 0, 1, 3).reshape(S, len(LENGTHS), -1)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    ref = _alone(q2, k2, v2, scale)
    assert out.shape == (S, len(LENGTHS), 32)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    if path == "flex":
        return
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    g = torch.autograd.grad((out * gy).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * gy).sum(), (q2, k2, v2))
    for a, r in zip(g, g_ref):
        torch.testing.assert_close(a, r, atol=1e-12, rtol=1e-10)


def test_document_attention_rejects_a_layout_of_another_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="layout is for rows"):
        document_attention(q, k, v, DocumentLayout.from_doc_ids(doc_ids()[:2]), 0.3)


def test_document_mixer_equals_megatron_mixer_on_each_document(tiny_hybrid):
    mixer = next(m for m in tiny_hybrid.modules() if type(m).__name__ in ("MambaMixer", "LayoutMambaMixer"))
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(S, len(LENGTHS), mixer.d_model, generator=gen, requires_grad=True)  # (S, B, H)
    lay = DocumentLayout.from_doc_ids(doc_ids())
    params = [p for p in mixer.parameters() if p.requires_grad]
    mixer.train()
    out, bias = document_mixer(mixer, hidden, lay)
    assert bias is None and out.shape == hidden.shape
    gy = torch.randn(out.shape, generator=gen)
    g = torch.autograd.grad((out * gy).sum(), [hidden] + params)
    h2 = hidden.detach().clone().requires_grad_()
    rows = [[] for _ in LENGTHS]
    for i, a, e in spans():  # megatron's own forward, one document at a time
        rows[i].append(mixer(h2[a:e, i:i + 1])[0])  # (n, 1, H)
    ref = torch.cat([torch.cat(r, 0) for r in rows], 1)  # (S, B, H)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_ref = torch.autograd.grad((ref * gy).sum(), [h2] + params)
    for a, r in zip(g, g_ref):
        assert r.abs().max() > 0
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


# ---- model level: a packed row of documents == each document on its own --------------------------------
def packed_vs_alone(model, lengths, vocab_weights_seed=5):
    """Logits and parameter gradients of one packed forward with a DocumentLayout, and of every
    document run alone. Returns (logits, ref_logits, grads, ref_grads); logits (B, S, V/tp)."""
    b, s = len(lengths), sum(lengths[0])
    ids = torch.randint(0, 2000, (b, s), generator=torch.Generator().manual_seed(3))
    lay = DocumentLayout.from_doc_ids(doc_ids(lengths))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def loss_of(logits):  # a fixed random linear functional of every logit: every gradient path counts
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(vocab_weights_seed))
        return (logits.float() * w).sum()

    logits = model(ids, lay.positions, None, packed_seq_params=lay)  # (B, S, V/tp)
    grads = torch.autograd.grad(loss_of(logits), params)
    rows = [[] for _ in lengths]
    for i, a, e in spans(lengths):
        rows[i].append(model(ids[i:i + 1, a:e], torch.arange(e - a)[None], None))  # (1, n, V/tp)
    ref = torch.cat([torch.cat(r, 1) for r in rows], 0)  # (B, S, V/tp)
    ref_grads = torch.autograd.grad(loss_of(ref), params)
    return logits.detach(), ref.detach(), grads, ref_grads


def max_rel(a, r) -> float:
    """max |a - r| relative to max |r| (fp32 sums of ~1e3 terms: ~1e-6)."""
    return float((a - r).abs().max() / r.abs().max().clamp_min(1e-30))


def check_packed(model, lengths=LENGTHS):
    logits, ref, grads, ref_grads = packed_vs_alone(model, lengths)
    assert max_rel(logits, ref) < 1e-5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, a, r in zip(names, grads, ref_grads):
        assert r.abs().max() > 0, n
        assert max_rel(a, r) < 1e-5, (n, max_rel(a, r))


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_packed_documents_equal_each_document_alone(preset, request):
    check_packed(request.getfixturevalue(preset))


@pytest.mark.parametrize("eod_mask_loss", [False, True])
def test_ntp_step_loss_is_the_document_forward_with_megatrons_eod_mask(dims, eod_mask_loss):
    """train.ntp_step with respect: the logged loss (before the update) is the mean NLL of the packed
    windows through a DocumentLayout, without the positions whose input is the EOS when
    data.eod_mask_loss (Megatron's --eod-mask-loss)."""
    import numpy as np

    from rlp_dist.config import compose
    from rlp_dist.data.stream import make_sampler
    from rlp_dist.data.tokenizer import load_tokenizer, thought_tokens
    from rlp_dist.train import Trainer, build_student, ntp_step, wrap_deepspeed

    cfg = compose(["+model=tiny_transformer", "objective=ntp", "ntp.seq_len=24", "ntp.sequences_per_step=3",
                   "ntp.sequences_per_micro_batch=3", "parallel.zero_stage=0", "optim.lr=1e-3",
                   f"data.eod_mask_loss={str(eod_mask_loss).lower()}"], 1)
    tok = load_tokenizer("bundled")
    mk = thought_tokens(tok, cfg.rlp.thought_open, cfg.rlp.thought_close, "", False)
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(8, 2000, size=n), mk.eos_id) for n in rng.integers(2, 9, size=40)]
    stream = np.concatenate(docs).astype(np.int32)  # short documents: several per window
    torch.manual_seed(0)
    engine = wrap_deepspeed(build_student(cfg, cfg.model.vocab_size), cfg, dims)
    tr = Trainer(cfg, dims, engine, None, make_sampler(stream, cfg, 0, 1, mk.eos_id), mk, tok, None, None)
    from rlp_dist.perf.flops import FlopMeter

    tr.flops = FlopMeter(cfg, 1, None)
    probe = make_sampler(stream, cfg, 0, 1, mk.eos_id)
    probe.load_state_dict(tr.sampler.state_dict())
    w, d = probe.next_windows(3, 24, documents=True)
    assert int(d[:, -1].min()) >= 1  # every window crosses a boundary
    with torch.no_grad():
        lay = DocumentLayout.from_doc_ids(d)
        logits = engine.module(w[:, :-1], lay.positions, None, packed_seq_params=lay)  # (3, 24, V)
        nll = -torch.log_softmax(logits.float(), -1).gather(-1, w[:, 1:, None]).squeeze(-1)  # (3, 24)
    keep = (w[:, :-1] != mk.eos_id).float() if eod_mask_loss else torch.ones_like(nll)
    assert keep.min() == 0 or not eod_mask_loss
    want = float((nll * keep).sum() / keep.sum())
    got = ntp_step(tr)["ntp/loss"]
    assert abs(got - want) < 1e-5, (got, want)
