"""`prepare-data` throughput: tokens/s at 1 and 2 tokenizer workers, and that the outputs are identical.

    python -m rlp_dist.bench prepare --json OUT [--docs 4000] [--chars 2000] [--workers 1 2]

The corpus is the bundled text (rlp_dist/assets/corpus.jsonl) cut into ``--docs`` JSONL documents of
``--chars`` characters (cycled), tokenized with the bundled tokenizer into a temporary directory.
``tokens_per_s`` = tokens written / wall seconds of :func:`rlp_dist.data.prepare.prepare` (reading,
tokenizing, writing .bin/.idx; the worker pool's start-up included). ``identical``: every worker
count wrote the same .bin/.idx bytes as the first. Megatron's ``tools/preprocess_data.py`` ships
with the Megatron-LM repository, not with the megatron-core wheel, so it is not compared here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench prepare")
    p.add_argument("--docs", type=int, default=4000)
    p.add_argument("--chars", type=int, default=2000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    a = p.parse_args(argv)
    from rlp_dist.data.prepare import prepare
    from rlp_dist.data.tokenizer import load_tokenizer

    src = pathlib.Path(__file__).resolve().parents[1] / "assets" / "corpus.jsonl"
    text = " ".join(json.loads(x)["text"] for x in src.read_text().splitlines())
    tok = load_tokenizer("bundled")
    out: dict = {"docs": a.docs, "chars_per_doc": a.chars, "runs": []}
    with tempfile.TemporaryDirectory() as d:
        corpus = pathlib.Path(d) / "corpus.jsonl"
        with corpus.open("w") as fh:
            for i in range(a.docs):
                start = (i * a.chars) % max(1, len(text) - a.chars)
                fh.write(json.dumps({"text": text[start:start + a.chars]}) + "\n")
        out["input_mb"] = corpus.stat().st_size / 1e6
        first = None
        for w in a.workers:
            prefix = str(pathlib.Path(d) / f"w{w}")
            t0 = time.perf_counter()
            s = prepare([corpus], tok, prefix, progress=False, workers=w)
            dt = time.perf_counter() - t0
            files = tuple(pathlib.Path(prefix + x).read_bytes() for x in (".bin", ".idx"))
            first = first or files
            out["runs"].append({"workers": w, "seconds": dt, "tokens": s["tokens"],
                                "tokens_per_s": s["tokens"] / dt, "identical": files == first})
    return out
