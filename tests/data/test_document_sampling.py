"""Document-aware sampling (data.document_boundaries=respect): document starts from the EOS scan and from
megatron's .idx document index; no RLP context holds a token of another document (property test over
random streams); NTP windows carry their doc_ids; the exact data order survives a resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlp_dist.config import compose
from rlp_dist.config.schema import ConfigError
from rlp_dist.data.stream import ContextSampler, MemmapStream, document_starts, make_sampler

EOS = 1


def random_stream(seed: int, n_docs: int, max_len: int):
    """Documents of random lengths (>= 1, EOS last) -> (stream, document index of every token)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, max_len + 1, size=n_docs)
    docs = [np.append(rng.integers(2, 50, size=n - 1), EOS) for n in lens]
    owner = np.concatenate([np.full(n, i) for i, n in enumerate(lens)])
    return np.concatenate(docs).astype(np.int32), owner


def test_document_starts_from_eos_scan():
    stream = np.array([5, 6, EOS, 7, EOS, 8, 9, 9], dtype=np.int32)
    assert document_starts(stream, EOS).tolist() == [0, 3, 5]
    assert document_starts(np.array([5, EOS], dtype=np.int32), EOS).tolist() == [0]  # final EOS: no new start


def test_document_starts_from_the_idx_document_index(tmp_path):
    """megatron's own tools may store several sequences (sentences) per document: the starts come from
    the document index, not from sequence boundaries, and no EOS is needed."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "c.bin"), dtype=np.int32)
    for doc in ([[3, 4, 5], [6, 7]], [[8, 9, 10, 11]], [[12], [13], [14]]):
        for sentence in doc:
            builder.add_item(torch.tensor(sentence))
        builder.end_document()
    builder.finalize(str(tmp_path / "c.idx"))
    one = MemmapStream.open([tmp_path / "c.bin"], 100, EOS)
    assert one.doc_starts.tolist() == [0, 5, 9]
    two = MemmapStream.open([tmp_path / "c.bin", tmp_path / "c.bin"], 100, EOS)  # files concatenated
    assert two.doc_starts.tolist() == [0, 5, 9, 12, 17, 21]
    assert document_starts(two, None).tolist() == [0, 5, 9, 12, 17, 21]


@pytest.mark.parametrize("seed", range(6))
def test_no_context_holds_a_token_of_another_document(seed):
    rng = np.random.default_rng(100 + seed)
    context_len, min_context = int(rng.integers(2, 12)), int(rng.integers(1, 4))
    stream, owner = random_stream(seed, n_docs=int(rng.integers(3, 40)), max_len=int(rng.integers(4, 30)))
    sampler = ContextSampler(stream, seed, doc_starts=document_starts(stream, EOS))
    # fixed-length contexts inside their document; tokens must be the stream's, owner the same
    try:
        ctx, nxt = sampler.next_contexts(64, context_len, respect=True)
    except ConfigError:
        ctx = None  # no document is longer than context_len: refused with a clear error
    # recover the drawn positions by re-drawing from a copy of the generator state
    probe = ContextSampler(stream, seed, doc_starts=sampler.starts)
    if ctx is not None:
        t = probe._in_documents(64, context_len, 0, "x")
        assert np.all(owner[t[:, None] + np.arange(-context_len, 0)] == owner[t][:, None])
        assert torch.equal(ctx, torch.from_numpy(stream[t[:, None] + np.arange(-context_len, 0)].astype(np.int64)))
        assert torch.equal(nxt, torch.from_numpy(stream[t].astype(np.int64)))
    else:
        assert (np.bincount(owner) <= context_len).all()
        probe.rng = np.random.default_rng(seed)
    state = sampler.state_dict()
    ctx, lengths, nxt = sampler.next_prefix_contexts(64, context_len, min_context, pad_id=-1)
    probe.load_state_dict(state)
    t = probe._in_documents(64, min_context, 0, "x")
    start = sampler.starts[owner[t]]
    assert np.all(t - start >= min_context), "a position closer than min_context to its document start"
    assert torch.equal(torch.from_numpy(np.minimum(t - start, context_len)), lengths)
    for row in range(64):  # the document's prefix before t, its last <= C tokens, then padding
        n = int(lengths[row])
        assert ctx[row, :n].tolist() == stream[t[row] - n:t[row]].tolist()
        assert set(owner[t[row] - n:t[row]]) == {owner[t[row]]}
        assert (ctx[row, n:] == -1).all()
    assert torch.equal(nxt, torch.from_numpy(stream[t].astype(np.int64)))


def test_document_windows_and_ntp_doc_ids():
    stream, owner = random_stream(7, n_docs=30, max_len=25)
    sampler = ContextSampler(stream, 3, doc_starts=document_starts(stream, EOS))
    w = sampler.next_document_windows(50, 9)  # (50, 10), inside one document each
    probe = ContextSampler(stream, 3, doc_starts=sampler.starts)
    start = probe._in_documents(50, 0, 9, "x")
    assert torch.equal(w, torch.from_numpy(stream[start[:, None] + np.arange(10)].astype(np.int64)))
    assert all(len(set(owner[s:s + 10])) == 1 for s in start)
    w = sampler.next_document_windows(50, 9, offset=4)  # starting at least 4 tokens into the document
    start = probe._in_documents(50, 4, 9, "x")
    assert torch.equal(w, torch.from_numpy(stream[start[:, None] + np.arange(10)].astype(np.int64)))
    assert np.all(start - sampler.starts[owner[start]] >= 4) and all(len(set(owner[s:s + 10])) == 1 for s in start)
    # NTP: the same windows as without documents (same draw), plus doc_ids of the inputs
    a = ContextSampler(stream, 5, doc_starts=sampler.starts)
    b = ContextSampler(stream, 5)
    windows, doc_ids = a.next_windows(8, 16, documents=True)
    assert torch.equal(windows, b.next_windows(8, 16))
    c = ContextSampler(stream, 5)
    first = c._positions(8, 0, len(stream) - 16)
    for row in range(8):
        o = owner[first[row]:first[row] + 16]
        assert doc_ids[row].tolist() == (o - o[0]).tolist()
    assert doc_ids.dtype == torch.int32 and int(doc_ids.max()) > 0


def test_resume_keeps_the_exact_data_order():
    stream, _ = random_stream(11, n_docs=40, max_len=30)
    starts = document_starts(stream, EOS)

    def draws(s, n):
        out = []
        for _ in range(n):
            out.append(s.next_prefix_contexts(4, 6, 2)[0])
            out.append(s.next_contexts(4, 6, respect=True)[0])
            out.append(s.next_windows(4, 8, documents=True)[1])
        return out

    full = draws(ContextSampler(stream, 9, dp_rank=1, dp=2, doc_starts=starts), 6)
    first = ContextSampler(stream, 9, dp_rank=1, dp=2, doc_starts=starts)
    head = draws(first, 3)
    resumed = ContextSampler(stream, 0, dp_rank=1, dp=2, doc_starts=starts)
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(full, head + draws(resumed, 3)):
        assert torch.equal(x, y)


def test_config_and_sampler_errors():
    with pytest.raises(ConfigError, match="document_boundaries"):
        compose(["+model=tiny_transformer", "data.document_boundaries=maybe"])
    with pytest.raises(ConfigError, match="min_context"):
        compose(["+model=tiny_transformer", "rlp.min_context=0"])
    cfg = compose(["+model=tiny_transformer", "data.append_eos=false"])
    assert cfg.data.document_boundaries == "respect" and cfg.data.eod_mask_loss is False
    with pytest.raises(ConfigError, match="append_eos"):
        make_sampler(np.array([2, 3, 4], dtype=np.int32), cfg, 0, 1, EOS)
    short = ContextSampler(np.array([2, EOS, 3, EOS], dtype=np.int32), 0, doc_starts=np.array([0, 2]))
    with pytest.raises(ConfigError, match="long enough"):
        short.next_contexts(2, 4, respect=True)
    assert make_sampler(np.array([2, EOS, 3], dtype=np.int32), compose(["+model=tiny_transformer", "data.document_boundaries=ignore"]),
                        0, 1, EOS).starts.tolist() == [0]
