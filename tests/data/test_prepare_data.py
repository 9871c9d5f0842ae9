"""`rlp-dist prepare-data` -> megatron-core indexed dataset -> memory-mapped training stream.

Round trip: every document read back from .bin/.idx equals the tokenizer's output (+ EOS), the
memory-mapped stream equals the in-memory stream built from the same text, and the sampler draws
the same contexts from both and resumes from a saved state. Bad input (invalid UTF-8, broken JSON,
missing field, empty documents, token ids >= vocabulary) is reported with file and line, counted,
and left out — never silently.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlp_dist.cli import main as cli
from rlp_dist.data.stream import ContextSampler, MemmapStream, build_stream, resolve_files
from rlp_dist.data.tokenizer import load_tokenizer

DOCS = ["The first document. It has two sentences.", "Second one: numbers 123 and symbols ?!",
        "A third document\nwith a newline and unicode: café, naïve, 東京."]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("bundled")


def _write_corpus(d):
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:2]))
    (d / "b.txt").write_text(DOCS[2])
    return [d / "a.jsonl", d / "b.txt"]


def test_prepare_data_round_trip_equals_tokenizer_and_text_stream(tmp_path, tok, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    files = _write_corpus(tmp_path)
    prefix = str(tmp_path / "out" / "corpus")
    assert cli(["prepare-data", "--input", str(files[0]), str(tmp_path / "*.txt"), "--tokenizer", "bundled",
                "--out", prefix, "--strict"]) == 0
    assert "3 documents" in capsys.readouterr().out
    ds = IndexedDataset(prefix, mmap=True)
    expected = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in DOCS]
    assert len(ds) == 3 and list(ds.document_indices) == [0, 1, 2, 3]  # one sequence per document
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert ds[0].dtype == np.uint16  # vocabulary 2048 fits
    meta = json.loads((tmp_path / "out" / "corpus.json").read_text())
    assert meta["documents"] == 3 and meta["problems"] == 0 and meta["eos_id"] == tok.eos_token_id

    # Training reads it memory-mapped, and it is the same stream as tokenizing the text in memory.
    for spec in (prefix, prefix + ".bin", str(tmp_path / "out"), str(tmp_path / "out" / "corpus.*")):
        assert resolve_files(spec) == [tmp_path / "out" / "corpus.bin"], spec
    mm = build_stream(resolve_files(prefix), tok, tok.eos_token_id)
    text = build_stream(files, tok, tok.eos_token_id)
    assert isinstance(mm, MemmapStream) and len(mm) == len(text) and mm.max() == int(text.max())
    assert np.array_equal(mm[np.arange(len(mm))], text)

    # The sampler draws the same contexts from both, and resumes from its state mid-stream.
    a, b = ContextSampler(mm, seed=7), ContextSampler(text, seed=7)
    for _ in range(3):
        (ca, na), (cb, nb) = a.next_contexts(4, 8), b.next_contexts(4, 8)
        assert torch.equal(ca, cb) and torch.equal(na, nb)
    state = a.state_dict()
    want = a.next_contexts(4, 8)
    c = ContextSampler(build_stream(resolve_files(prefix), tok, tok.eos_token_id), seed=0)
    c.load_state_dict(state)
    got = c.next_contexts(4, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_prepare_data_reports_bad_inputs_with_file_and_line(tmp_path, tok, capsys):
    good_text = "a good document"
    vocab = max(tok.encode(good_text, add_special_tokens=False)) + 1  # --vocab-size: the good text fits
    high = next(t for t in range(len(tok) - 1, vocab, -1)
                if tok.encode(tok.decode([t]), add_special_tokens=False) == [t])
    good = json.dumps({"text": good_text})
    lines = [good.encode(),                                   # 1 ok
             b'{"text": "bad byte \xff here"}',               # 2 invalid UTF-8
             b'{"text": "unterminated',                        # 3 not JSON
             json.dumps({"body": "x"}).encode(),              # 4 no 'text'
             json.dumps({"text": "   "}).encode(),            # 5 empty document
             b"",                                              # 6 blank line (counted, not a document)
             json.dumps({"text": tok.decode([high])}).encode(),  # 7 token id >= --vocab-size
             good.encode()]                                    # 8 ok
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    prefix = str(tmp_path / "out" / "bad")
    rc = cli(["prepare-data", "--input", str(tmp_path), "--tokenizer", "bundled", "--out", prefix,
              "--vocab-size", str(vocab), "--show", "100"])
    err = capsys.readouterr().err
    mixed, empty, latin = tmp_path / "mixed.jsonl", tmp_path / "empty.txt", tmp_path / "latin1.txt"
    expected = {f"{mixed}:2: invalid UTF-8", f"{mixed}:3: not valid JSON", f"{mixed}:4: no 'text' string",
                f"{mixed}:5: empty document", f"{mixed}:7: token id {high} >= vocabulary size {vocab}",
                f"{empty}:1: empty document", f"{latin}:3: invalid UTF-8"}
    for e in expected:
        assert e in err, f"missing report {e!r} in:\n{err}"
    assert rc == 0
    meta = json.loads((tmp_path / "out" / "bad.json").read_text())
    assert meta["documents"] == 2 and meta["problems"] == 7 and meta["blank_lines"] == 1
    listed = (tmp_path / "out" / "bad.problems.txt").read_text().splitlines()
    assert len(listed) == 7 and all(any(line.startswith(e.split(": ")[0] + ":") for line in listed) for e in expected)
    # --strict turns any problem into a failing exit code.
    assert cli(["prepare-data", "--input", str(mixed), "--tokenizer", "bundled", "--out", prefix + "2",
                "--vocab-size", str(vocab), "--strict"]) == 1
