"""prepare-data at corpus scale and on hopeless input (issue 12, problem 7).

Every line bad -> one line on stderr, exit 2, the problems file lists each line, and no .bin/.idx/.json
exist (training never finds a 0-byte .bin). ``--workers 2`` writes byte-identical files to
``--workers 1``; ``.jsonl.gz`` and ``.jsonl.zst`` inputs give the same .bin/.idx as the plain .jsonl;
parquet is read when pyarrow is installed, else refused in one line naming the package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import pathlib

import pytest

from rlp_dist.cli import main as cli

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "rlp_dist" / "assets" / "corpus.jsonl"


def _prep(inp, out, *extra) -> int:
    return cli(["prepare-data", "--input", str(inp), "--tokenizer", "bundled", "--out", str(out), "--no-progress",
                *extra])


def test_all_bad_input_one_line_problems_file_no_outputs(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"body": "no text"}\nnot json\n{"text": "caf\xe9"}\n{"text": "  "}\n')
    out = tmp_path / "o" / "c"
    assert _prep(bad, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rlp-dist prepare-data: error: no usable documents") and \
        "4 problem(s)" in err[0], err
    problems = (tmp_path / "o" / "c.problems.txt").read_text().splitlines()
    assert [p.split(":")[1] for p in problems] == ["1", "2", "3", "4"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["c.problems.txt"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    text = " ".join(json.loads(x)["text"] for x in CORPUS.read_text().splitlines())
    lines = [json.dumps({"text": text[i:i + 400]}) for i in range(0, 400 * 700, 400)]  # 700 docs: > 2 CHUNKs
    lines.insert(300, "{broken")  # a problem in the middle keeps its line number in both modes
    src = d / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert _prep(src, d / "w1" / "c") in (0,)
    return d, src


def _files(prefix: pathlib.Path) -> dict:
    return {s: (prefix.parent / (prefix.name + s)).read_bytes() for s in (".bin", ".idx", ".problems.txt")}


def test_workers_output_byte_identical(sample):
    d, src = sample
    assert _prep(src, d / "w2" / "c", "--workers", "2") == 0
    one, two = _files(d / "w1" / "c"), _files(d / "w2" / "c")
    assert one == two and len(one[".bin"]) > 10_000
    assert b":301: not valid JSON" in one[".problems.txt"]


def test_gzip_and_zstd_inputs_same_as_plain(sample):
    d, src = sample
    gz = d / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    assert _prep(gz, d / "gz" / "c") == 0
    plain = _files(d / "w1" / "c")
    assert {k: v for k, v in _files(d / "gz" / "c").items() if k != ".problems.txt"} == \
        {k: v for k, v in plain.items() if k != ".problems.txt"}
    if importlib.util.find_spec("zstandard") is None:
        pytest.skip("zstandard not installed (optional: pip install zstandard)")
    import zstandard

    zst = d / "c.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    assert _prep(zst, d / "zst" / "c") == 0
    assert _files(d / "zst" / "c")[".bin"] == plain[".bin"] and _files(d / "zst" / "c")[".idx"] == plain[".idx"]


def test_parquet_input_or_one_line_refusal(tmp_path, capsys):
    texts = [json.loads(x)["text"] for x in CORPUS.read_text().splitlines()[:20]]
    if importlib.util.find_spec("pyarrow") is None:
        f = tmp_path / "c.parquet"
        f.write_bytes(b"PAR1")
        assert _prep(f, tmp_path / "o" / "c") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install pyarrow" in err[0]
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert _prep(tmp_path / "c.parquet", tmp_path / "p" / "c") == 0
    assert _prep(tmp_path / "c.jsonl", tmp_path / "j" / "c") == 0
    assert (tmp_path / "p" / "c.bin").read_bytes() == (tmp_path / "j" / "c.bin").read_bytes()
