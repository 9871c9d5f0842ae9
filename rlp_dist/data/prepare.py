"""`rlp-dist prepare-data`: tokenize .jsonl / .txt into megatron-core's indexed dataset (.bin/.idx).

    rlp-dist prepare-data --input data/*.jsonl --tokenizer bundled --out data/corpus

writes ``corpus.bin`` / ``corpus.idx`` (``megatron.core.datasets.indexed_dataset``: one sequence per
document, document boundaries in the index; uint16 tokens when the vocabulary fits, else int32)
and ``corpus.json`` (tokenizer, EOS id, vocabulary size, counts, largest token id). Documents are
tokenized exactly as the in-memory stream does (``data.stream``): a .jsonl line is one document
(field ``--text-key``), a .txt file is one document, and each document ends with the tokenizer's
EOS token (``--no-eos`` to omit it). Training reads the result memory-mapped: ``data.path=PREFIX``.

Bad input is never dropped silently. Each problem — invalid UTF-8, a line that is not a JSON
object with the text field, an empty document, a token id >= the vocabulary size — is printed as
``FILE:LINE: what`` (the first ``--show`` of them), written in full to ``PREFIX.problems.txt`` and
counted in the summary; the document is left out. ``--strict`` makes any problem exit with 1.
The problems file is always written (empty when there were none). When no document survives, the
command fails with one line and writes no .bin/.idx/.json (a 0-byte .bin would fail training's mmap).

Inputs: ``.jsonl`` / ``.json`` / ``.txt``, gzip'd ``.jsonl.gz``, zstandard ``.jsonl.zst`` (needs
``pip install zstandard``, a 5.5 MB wheel) and ``.parquet`` (one row a document, column
``--text-key``; needs ``pip install pyarrow``, a 55 MB wheel — both optional, a missing one is a
one-line error naming it). ``--workers N`` tokenizes in N processes: documents are read in order by
the main process, tokenized in chunks of ``CHUNK`` documents by a pool (``imap``, ordered) and
written in input order, so the output is byte-identical to ``--workers 1``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import pathlib
import sys
from typing import Iterator, Optional

SUFFIXES = (".jsonl", ".json", ".txt", ".jsonl.gz", ".jsonl.zst", ".parquet")
CHUNK = 256  # documents per tokenization task (--workers > 1)


def _accepted(p: pathlib.Path) -> bool:
    return p.name.endswith(SUFFIXES)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, help=".jsonl/.txt files, directories or globs")
    p.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory, or 'bundled'")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document text (default: text)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="reject token ids >= this (default: the tokenizer's size; use model.vocab_size)")
    p.add_argument("--no-eos", action="store_true", help="do not end each document with the EOS token")
    p.add_argument("--strict", action="store_true", help="exit with 1 when any input problem was found")
    p.add_argument("--show", type=int, default=20, help="problems printed to stderr (all go to PREFIX.problems.txt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output identical to 1)")


def input_files(specs: list[str]) -> list[pathlib.Path]:
    files: list[pathlib.Path] = []
    for spec in specs:
        p = pathlib.Path(spec)
        if p.is_dir():
            found = sorted(x for x in p.rglob("*") if _accepted(x) and x.is_file())
        elif any(c in spec for c in "*?["):
            found = sorted(pathlib.Path(x) for x in glob.glob(spec) if _accepted(pathlib.Path(x)))
        else:
            found = [p] if p.is_file() else []
        if not found:
            raise FileNotFoundError(f"--input {spec!r}: no such file, or no {'/'.join(SUFFIXES)} files there; "
                                    f"pass existing files, directories or globs")
        files.extend(found)
    return files


def documents(path: pathlib.Path, text_key: str, problems: list, counts) -> Iterator[tuple[int, str, int]]:
    """(line, text, bytes read) per document of one file; problems are appended as (file, line, msg)."""
    if path.name.endswith(".parquet"):
        yield from _parquet_documents(path, text_key, problems)
        return
    if path.name.endswith((".jsonl", ".json", ".jsonl.gz", ".jsonl.zst")):
        with _open_lines(path) as fh:
            for lineno, raw in enumerate(fh, 1):
                text = _jsonl_text(path, lineno, raw, text_key, problems, counts)
                yield lineno, text, len(raw)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append((path, line, f"invalid UTF-8 at byte {e.start} ({e.reason}); re-encode the file as UTF-8"))
        yield line, None, len(raw)
        return
    if not text.strip():
        problems.append((path, 1, "empty document (the file holds no text)"))
        text = None
    yield 1, text, len(raw)


def _open_lines(path: pathlib.Path):
    """A binary line iterator over a plain, gzip'd or zstandard-compressed file."""
    import io

    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        zstandard = _optional("zstandard", path)
        fh = path.open("rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh, closefd=True))
    return path.open("rb")


def _optional(module: str, path: pathlib.Path):
    import importlib

    from rlp_dist.config.schema import ConfigError

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        raise ConfigError(f"{path}: reading this format needs the {module} package; pip install {module}") from None


def _parquet_documents(path: pathlib.Path, text_key: str, problems: list) -> Iterator[tuple[int, Optional[str], int]]:
    """One row of column ``text_key`` a document (row number as the line)."""
    pq = _optional("pyarrow", path) and __import__("pyarrow.parquet", fromlist=["parquet"])
    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        problems.append((path, 0, f"no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                  f"pass --text-key"))
        return
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str) or not text.strip():
                problems.append((path, row, f"empty or non-string {text_key!r} in this row"))
                text = None
            yield row, text, len(text.encode()) if text else 0


def _jsonl_text(path, lineno: int, raw: bytes, text_key: str, problems: list, counts) -> Optional[str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append((path, lineno, f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                                       f"re-encode the file as UTF-8"))
        return None
    if not line.strip():
        counts["blank_lines"] += 1  # not a document: counted in the summary
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append((path, lineno, f"not valid JSON ({e.msg} at column {e.colno})"))
        return None
    text = obj.get(text_key) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        problems.append((path, lineno, f"no {text_key!r} string in this JSON line; fix it or pass --text-key"))
        return None
    if not text.strip():
        problems.append((path, lineno, f"empty document ({text_key!r} is empty or whitespace)"))
        return None
    return text


_TOKENIZER = None  # a worker's tokenizer (--workers > 1)


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _encode(texts: list[str], tokenizer=None) -> list[list[int]]:
    """Token ids of a chunk of documents (no special tokens): the same call for 1 and N workers."""
    tok = tokenizer if tokenizer is not None else _TOKENIZER
    return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def _chunks(files, text_key: str, problems: list, counts, bar) -> Iterator[tuple[list, list[str]]]:
    """(positions (file, line), texts) of up to CHUNK documents, in input order."""
    where, texts = [], []
    for f in files:
        for lineno, text, nbytes in documents(f, text_key, problems, counts):
            bar.update(nbytes)
            if text is None:
                continue
            where.append((f, lineno))
            texts.append(text)
            if len(texts) == CHUNK:
                yield where, texts
                where, texts = [], []
    if texts:
        yield where, texts


def _tokenized(chunks, tokenizer, workers: int) -> Iterator[tuple[list, list[list[int]]]]:
    if workers <= 1:
        for where, texts in chunks:
            yield where, _encode(texts, tokenizer)
        return
    import multiprocessing as mp

    # spawn: no fork of a process holding torch / tqdm threads. imap keeps the input order.
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_chunk, chunks, chunksize=1)


def _encode_chunk(chunk: tuple[list, list[str]]) -> tuple[list, list[list[int]]]:
    where, texts = chunk
    return where, _encode(texts)


def prepare(files: list[pathlib.Path], tokenizer, out: str, text_key: str = "text",
            vocab_size: Optional[int] = None, append_eos: bool = True, progress: bool = True,
            workers: int = 1) -> dict:
    """Write PREFIX.bin/.idx/.json and PREFIX.problems.txt; returns the summary (also in PREFIX.json)
    with the problem list. Raises ConfigError (one line) when no document survives: then only the
    problems file is written."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    from rlp_dist.config.schema import ConfigError

    vocab = vocab_size or len(tokenizer)
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise ConfigError("the tokenizer defines no eos_token; pass --no-eos or use a tokenizer with one")
    dtype = DType.optimal_dtype(vocab)
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".bin", ".idx", ".json"):  # never leave a previous run's files next to this run's problems
        pathlib.Path(out + suffix).unlink(missing_ok=True)
    builder = None  # created with the first surviving document: no 0-byte .bin
    problems: list = []
    counts = collections.Counter()
    max_id = -1
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare-data",
               disable=not progress, file=sys.stderr)
    try:
        for where, chunk in _tokenized(_chunks(files, text_key, problems, counts, bar), tokenizer, workers):
            for (f, lineno), ids in zip(where, chunk):
                bad = [i for i in ids if i >= vocab or i < 0]
                if bad:
                    problems.append((f, lineno, f"token id {max(bad)} >= vocabulary size {vocab} "
                                                f"({len(bad)} such tokens); use the model's tokenizer or --vocab-size"))
                    continue
                if not ids and not append_eos:
                    problems.append((f, lineno, "the document tokenizes to no tokens"))
                    continue
                if append_eos:
                    ids = ids + [eos]
                if builder is None:
                    builder = IndexedDatasetBuilder(out + ".bin", dtype=dtype)
                builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                counts["documents"] += 1
                counts["tokens"] += len(ids)
                max_id = max(max_id, max(ids))
    finally:
        bar.close()
        with open(out + ".problems.txt", "w") as fh:
            for f, line, msg in problems:
                fh.write(f"{f}:{line}: {msg}\n")
    if builder is None:
        first = f" (first: {problems[0][0]}:{problems[0][1]}: {problems[0][2]})" if problems else ""
        raise ConfigError(f"no usable documents in {len(files)} file(s): {len(problems)} problem(s){first}; "
                          f"all are listed in {out}.problems.txt; no .bin/.idx written")
    builder.finalize(out + ".idx")
    summary = {"format": "rlp_dist.indexed.v1", "files": [str(f) for f in files],
               "tokenizer": getattr(tokenizer, "name_or_path", ""), "vocab_size": vocab, "eos_id": eos,
               "append_eos": append_eos, "dtype": np.dtype(dtype).name, "text_key": text_key,
               "documents": counts["documents"], "tokens": counts["tokens"], "max_token_id": max_id,
               "blank_lines": counts["blank_lines"], "problems": len(problems)}
    with open(out + ".json", "w") as fh:
        json.dump(summary, fh, indent=1)
    summary["problem_list"] = problems
    return summary


def run(args: argparse.Namespace) -> int:
    from rlp_dist.data.tokenizer import load_tokenizer

    files = input_files(args.input)
    tok = load_tokenizer(args.tokenizer)
    if args.workers < 1:
        from rlp_dist.config.schema import ConfigError

        raise ConfigError(f"--workers={args.workers} must be >= 1")
    s = prepare(files, tok, args.out, args.text_key, args.vocab_size, not args.no_eos,
                progress=not args.no_progress, workers=args.workers)
    for f, line, msg in s["problem_list"][: args.show]:
        print(f"{f}:{line}: {msg}", file=sys.stderr)
    more = len(s["problem_list"]) - args.show
    if more > 0:
        print(f"... {more} more problems", file=sys.stderr)
    print(f"prepare-data: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}) from "
          f"{len(files)} file(s) -> {args.out}.bin/.idx | {s['problems']} problem(s) left out"
          + (f" (list: {args.out}.problems.txt)" if s["problems"] else "")
          + (f" | {s['blank_lines']} blank line(s)" if s["blank_lines"] else ""))
    return 1 if args.strict and s["problems"] else 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="rlp-dist prepare-data")
    add_arguments(_p)
    sys.exit(run(_p.parse_args()))
