"""The packed token stream and the resumable context sampler.

Documents (text or JSONL) are tokenized and concatenated with an end-of-document token between
them into one int32 stream. RLP draws contexts at random positions: a position t of the stream
gives the context x_<t (the ``context_len`` tokens before t) and the real next token x_t. NTP draws
windows of ``seq_len + 1`` tokens.

Every data-parallel rank draws the same global batch of positions from one seeded generator and
keeps its own slice, so the sampler state is a single generator state: saved in checkpoints, it
restores the exact data order on any number of ranks.

``data.path`` may also name megatron-core indexed datasets (``rlp-dist prepare-data`` output, or
``PREFIX.bin``/``PREFIX.idx`` from megatron's own tools): a prefix, a ``.bin``/``.idx`` file, or a
directory/glob holding such pairs. They are read memory-mapped, never loaded: the stream is the
concatenation of the ``.bin`` token arrays (documents already end with EOS when prepared here), and
the sampler draws positions exactly as for text, so its state stays one generator state.

Document boundaries (``data.document_boundaries=respect``): the sampler knows where each document
starts — for text, after each EOS of the stream (the EOS closes its own document); for indexed
datasets, from megatron's document index in the ``.idx`` (no scan). Then
- an NTP window comes with ``doc_ids`` (B, S): per row, the document index of each input token,
  counted from 0 at the window's first token (the model's ``DocumentLayout``);
- an RLP context x_<t holds only tokens of t's own document: :meth:`ContextSampler.next_contexts`
  with ``respect`` draws t uniformly over the positions with at least ``context_len`` tokens of their
  document before them (contexts of one length); :meth:`ContextSampler.next_prefix_contexts` draws t
  over the positions at least ``min_context`` tokens into their document and returns the document's
  prefix, the last ``context_len`` tokens of it at most, right-padded with per-row lengths;
- several contexts per document branch from a window lying inside one document
  (:meth:`ContextSampler.next_document_windows`).
Positions are drawn uniformly over the admissible positions of the whole stream (one integer per
draw, mapped through the per-document counts), so the sampler state is still one generator state.
"""

from __future__ import annotations

from rlp_dist.config.schema import ConfigError
import glob
import json
import pathlib
from typing import Iterator, Optional

import numpy as np
import torch

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"


def _indexed_bin(p: pathlib.Path) -> Optional[pathlib.Path]:
    """PREFIX.bin when ``p`` is an indexed-dataset prefix or one of its two files, else None."""
    prefix = p.with_suffix("") if p.suffix in (".bin", ".idx") else p
    b, i = pathlib.Path(str(prefix) + ".bin"), pathlib.Path(str(prefix) + ".idx")
    return b if b.is_file() and i.is_file() else None


def _is_sidecar(x: pathlib.Path) -> bool:
    """PREFIX.json / PREFIX.problems.txt written by prepare-data next to PREFIX.bin: not text data."""
    name = x.name
    for suffix in (".problems.txt", ".json"):
        if name.endswith(suffix) and _indexed_bin(x.with_name(name[: -len(suffix)])):
            return True
    return False


def resolve_files(path: str) -> list[pathlib.Path]:
    if path == "bundled":
        return [ASSETS / "corpus.jsonl"]
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if (x.suffix in (".txt", ".jsonl", ".json") and not _is_sidecar(x))
                       or (x.suffix == ".bin" and _indexed_bin(x)))
    elif any(c in path for c in "*?["):
        found = set()
        for x in map(pathlib.Path, glob.glob(path)):
            if x.suffix in (".bin", ".idx"):
                found.add(_indexed_bin(x))  # both halves of a pair name the same .bin
            elif not _is_sidecar(x):
                found.add(x)
        files = sorted(found - {None})
    elif _indexed_bin(p):
        files = [_indexed_bin(p)]
    else:
        files = [p] if p.exists() else []
    if not files:
        raise ConfigError(f"data.path={path!r}: no such file, or no .txt/.jsonl files or indexed dataset "
                         f"(PREFIX.bin + PREFIX.idx) there; pass an existing file, directory, glob, "
                         f"dataset prefix, or 'bundled'")
    return files


def iter_documents(files: list[pathlib.Path], text_key: str = "text") -> Iterator[str]:
    """A .jsonl line is one document (field ``text_key``); a .txt file is one document."""
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            with f.open("rb") as fh:
                for lineno, raw in enumerate(fh, 1):
                    line = _decode(raw, f, lineno)
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)[text_key]
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ConfigError(f"{f}:{lineno}: not a JSON object with a {text_key!r} string "
                                         f"({type(e).__name__}); fix the line or set data.text_key") from None
                    if doc:
                        yield doc
        else:
            text = _decode(f.read_bytes(), f, None)
            if text.strip():
                yield text


def _decode(raw: bytes, f: pathlib.Path, lineno) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{f}:{lineno}" if lineno else f"{f} (byte {e.start})"
        raise ConfigError(f"{where}: invalid UTF-8; fix the file, or run `rlp-dist prepare-data` which reports "
                          f"and skips bad lines, and train on its output") from None


def build_stream(files: list[pathlib.Path], tokenizer, eos_id: int, text_key: str = "text",
                 append_eos: bool = True):
    """Tokenize and pack documents into one int32 array; indexed datasets (.bin) are memory-mapped."""
    bins = [f for f in files if f.suffix == ".bin"]
    if bins:
        if len(bins) != len(files):
            raise ConfigError(f"data.path mixes indexed datasets {[str(f) for f in bins][:2]} with text files; "
                             f"convert the text with `rlp-dist prepare-data` or point data.path at one kind")
        return MemmapStream.open(bins, len(tokenizer), eos_id)
    chunks = []
    for doc in iter_documents(files, text_key):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        chunks.append(np.asarray(ids, dtype=np.int32))
        if append_eos:
            chunks.append(np.asarray([eos_id], dtype=np.int32))
    if not chunks:
        raise ConfigError(f"data.path: the files {[str(f) for f in files]} hold no documents")
    return np.concatenate(chunks)


class MemmapStream:
    """Memory-mapped token arrays of indexed datasets, read as one stream without copying.

    Supports what the sampler needs: ``len``, fancy indexing with integer arrays, ``max()`` (from
    ``PREFIX.json`` when prepare-data wrote it, else one pass over the files).
    """

    def __init__(self, arrays: list[np.ndarray], max_ids: list[Optional[int]], indices: Optional[list] = None):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self._max_ids = max_ids
        self._indices = indices or []  # megatron's _IndexReader per file (sequence lengths, document index)
        self._doc_starts: Optional[np.ndarray] = None

    @classmethod
    def open(cls, bins: list[pathlib.Path], vocab: int, eos_id: int) -> "MemmapStream":
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        arrays, max_ids, indices = [], [], []
        for b in bins:
            prefix = str(b.with_suffix(""))
            index = IndexedDataset(prefix, mmap=True).index  # validates the .idx header and version
            meta_path = pathlib.Path(prefix + ".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            if meta.get("eos_id") is not None and meta["eos_id"] != eos_id:
                raise ConfigError(f"data.path: {prefix} was prepared with EOS id {meta['eos_id']} but data.tokenizer "
                                 f"has {eos_id}; use the tokenizer it was prepared with ({meta.get('tokenizer')!r})")
            if meta.get("vocab_size", 0) > vocab:
                raise ConfigError(f"data.path: {prefix} was prepared for vocabulary size {meta['vocab_size']} > "
                                 f"{vocab} of data.tokenizer; use the tokenizer it was prepared with")
            arrays.append(np.memmap(prefix + ".bin", dtype=index.dtype, mode="r"))
            max_ids.append(meta.get("max_token_id"))
            indices.append(index)
        return cls(arrays, max_ids, indices)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        if len(self.arrays) == 1:
            return np.asarray(self.arrays[0][idx])
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        out = np.empty(idx.shape, dtype=np.int64)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.arrays[k][idx[sel] - self.offsets[k]]
        return out

    def max(self) -> int:
        return max(int(m) if m is not None else int(a.max()) for a, m in zip(self.arrays, self._max_ids))

    @property
    def doc_starts(self) -> np.ndarray:
        """Stream offsets of every document start, from each ``.idx``'s document index (sequence
        lengths summed up to each document's first sequence); no pass over the tokens."""
        if self._doc_starts is None:
            parts = []
            for idx, off in zip(self._indices, self.offsets[:-1]):
                seq_start = np.concatenate([[0], np.cumsum(idx.sequence_lengths, dtype=np.int64)])
                parts.append(seq_start[np.asarray(idx.document_indices[:-1], dtype=np.int64)] + off)
            starts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            self._doc_starts = np.unique(np.concatenate([[0], starts[starts < len(self)]])).astype(np.int64)
        return self._doc_starts


def document_starts(stream, eos_id: Optional[int]) -> np.ndarray:
    """Sorted stream offsets of the document starts (0 first): from the .idx for indexed datasets,
    else one position after each ``eos_id`` (the EOS ends its own document)."""
    if isinstance(stream, MemmapStream):
        return stream.doc_starts
    if eos_id is None:
        return np.zeros(1, dtype=np.int64)
    ends = np.flatnonzero(np.asarray(stream) == eos_id) + 1
    return np.concatenate([[0], ends[ends < len(stream)]]).astype(np.int64)


class ContextSampler:
    """Random contexts (x_<t, x_t) or NTP windows from a packed stream, resumable.

    ``next_contexts(B)`` returns this rank's slice of a global batch of B positions:
    (contexts (B_local, C) int64, next tokens (B_local,) int64). ``doc_starts`` (sorted stream offsets,
    0 first; :func:`document_starts`) enables the document-aware draws; None: the stream is one document.
    """

    def __init__(self, stream: np.ndarray, seed: int, dp_rank: int = 0, dp: int = 1,
                 doc_starts: Optional[np.ndarray] = None):
        self.stream = stream
        self.dp_rank, self.dp = dp_rank, dp
        self.rng = np.random.default_rng(seed)
        self.starts = np.zeros(1, dtype=np.int64) if doc_starts is None else np.asarray(doc_starts, dtype=np.int64)
        if self.starts.size == 0 or self.starts[0] != 0 or np.any(np.diff(self.starts) <= 0):
            raise ValueError("ContextSampler: doc_starts must increase strictly from 0")
        self.ends = np.append(self.starts[1:], len(stream))  # (n_docs,) one past each document's last token
        self._counts: dict = {}

    def _local(self, pos: np.ndarray) -> np.ndarray:
        per = len(pos) // self.dp
        return pos[self.dp_rank * per:(self.dp_rank + 1) * per]

    def _positions(self, n_global: int, low: int, high: int) -> np.ndarray:
        if high <= low:
            raise ConfigError(f"the token stream has {len(self.stream)} tokens, too few for windows of "
                             f"{low} tokens; use more data or a shorter rlp.context_len / ntp.seq_len")
        return self._local(self.rng.integers(low, high, size=n_global))

    def _in_documents(self, n_global: int, lo: int, tail: int, what: str) -> np.ndarray:
        """Positions p drawn uniformly over all p with start_d + lo <= p < end_d - tail in some document d
        (one generator draw per position), this rank's slice."""
        key = (lo, tail)
        if key not in self._counts:
            count = np.maximum(0, (self.ends - tail) - (self.starts + lo))  # (n_docs,) admissible positions
            self._counts[key] = (count, np.cumsum(count))
        count, cum = self._counts[key]
        if cum[-1] == 0:
            raise ConfigError(f"no document of the stream ({len(self.starts)} documents, longest "
                             f"{int((self.ends - self.starts).max())} tokens) is long enough for {what}; use "
                             f"longer documents, shorter lengths, or data.document_boundaries=ignore")
        u = self.rng.integers(0, cum[-1], size=n_global)
        d = np.searchsorted(cum, u, side="right")  # (n,) the document of each draw
        return self._local(self.starts[d] + lo + (u - (cum[d] - count[d])))

    def document_of(self, pos: np.ndarray) -> np.ndarray:
        """The document index of stream positions (any shape)."""
        return np.searchsorted(self.starts, pos, side="right") - 1

    def next_contexts(self, n_global: int, context_len: int, respect: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_<t (B_local, C), x_t (B_local,)). respect: t has at least C tokens of its own document
        before it, so the context never reaches into an earlier document."""
        if respect:
            t = self._in_documents(n_global, context_len, 0, f"contexts of rlp.context_len={context_len} tokens")
        else:
            t = self._positions(n_global, context_len, len(self.stream))
        idx = t[:, None] + np.arange(-context_len, 0)[None, :]  # (B_local, C)
        ctx = torch.from_numpy(self.stream[idx].astype(np.int64))
        nxt = torch.from_numpy(self.stream[t].astype(np.int64))
        return ctx, nxt

    def next_prefix_contexts(self, n_global: int, context_len: int, min_context: int = 1, pad_id: int = 0):
        """Contexts that are the prefix of t's own document: t at least ``min_context`` tokens into its
        document, x_<t = its last <= C tokens before t. -> contexts (B_local, C) right-padded with
        ``pad_id``, lengths (B_local,), x_t (B_local,), all int64."""
        t = self._in_documents(n_global, min_context, 0, f"rlp.min_context={min_context}")
        first = np.maximum(self.starts[self.document_of(t)], t - context_len)  # (B_local,)
        lengths = t - first
        idx = first[:, None] + np.arange(context_len)[None, :]  # (B_local, C)
        valid = idx < t[:, None]
        ctx = np.where(valid, self.stream[np.minimum(idx, t[:, None] - 1)], pad_id)
        return (torch.from_numpy(ctx.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)),
                torch.from_numpy(self.stream[t].astype(np.int64)))

    def next_windows(self, n_global: int, seq_len: int, documents: bool = False):
        """NTP windows (B_local, S+1). documents: also their inputs' doc_ids (B_local, S) int32 (0 at each
        row's first token, +1 at each document start inside the window)."""
        start = self._positions(n_global, 0, len(self.stream) - seq_len)
        idx = start[:, None] + np.arange(seq_len + 1)[None, :]  # (B_local, S+1)
        windows = torch.from_numpy(self.stream[idx].astype(np.int64))
        if not documents:
            return windows
        doc = self.document_of(idx[:, :-1])  # (B_local, S)
        return windows, torch.from_numpy((doc - doc[:, :1]).astype(np.int32))

    def next_document_windows(self, n_global: int, length: int, offset: int = 0) -> torch.Tensor:
        """Windows of ``length`` + 1 tokens lying inside one document, starting at least ``offset`` tokens
        into it (several contexts per document with ``respect``: offset = min_context - t_0 keeps the
        shortest context's x_t min_context into its document): (B_local, length+1) int64."""
        start = self._in_documents(n_global, offset, length, f"document windows of {length + 1} tokens")
        idx = start[:, None] + np.arange(length + 1)[None, :]  # (B_local, length+1)
        return torch.from_numpy(self.stream[idx].astype(np.int64))

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


def make_sampler(stream, cfg, dp_rank: int, dp: int, eos_id: int) -> ContextSampler:
    """The run's sampler (cfg: RootConfig): document starts from the .idx or the EOS scan when
    ``data.document_boundaries=respect``, none (one stream) with ``ignore``."""
    starts = None
    if cfg.data.document_boundaries == "respect":
        if not isinstance(stream, MemmapStream) and not cfg.data.append_eos:
            raise ConfigError("data.document_boundaries=respect finds the documents of text data by their EOS, "
                             "but data.append_eos=false packs them without one; set data.append_eos=true, "
                             "prepare an indexed dataset (rlp-dist prepare-data), or use document_boundaries=ignore")
        starts = document_starts(stream, eos_id)
    return ContextSampler(stream, cfg.train.seed, dp_rank, dp, doc_starts=starts)
