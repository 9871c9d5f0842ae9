"""The packed token stream and the resumable context sampler.

Documents (text or JSONL) are tokenized and concatenated with an end-of-document token between
them into one int32 stream. RLP draws contexts at random positions: a position t of the stream
gives the context x_<t (the ``context_len`` tokens before t) and the real next token x_t. NTP draws
windows of ``seq_len + 1`` tokens.

Every data-parallel rank draws the same global batch of positions from one seeded generator and
keeps its own slice, so the sampler state is a single generator state: saved in checkpoints, it
restores the exact data order on any number of ranks.
"""

from __future__ import annotations

from rlp_dist.config.schema import ConfigError
import glob
import json
import os
import pathlib
from typing import Iterator, Optional

import numpy as np
import torch

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"


def resolve_files(path: str) -> list[pathlib.Path]:
    if path == "bundled":
        return [ASSETS / "corpus.jsonl"]
    p = pathlib.Path(path)
    if p.is_dir():
        files = sorted(x for x in p.rglob("*") if x.suffix in (".txt", ".jsonl", ".json"))
    elif any(c in path for c in "*?["):
        files = sorted(pathlib.Path(x) for x in glob.glob(path))
    else:
        files = [p] if p.exists() else []
    if not files:
        raise ConfigError(f"data.path={path!r}: no such file, or no .txt/.jsonl files there; "
                         f"pass an existing file, directory or glob, or 'bundled'")
    return files


def iter_documents(files: list[pathlib.Path], text_key: str = "text") -> Iterator[str]:
    """A .jsonl line is one document (field ``text_key``); a .txt file is one document."""
    for f in files:
        if f.suffix in (".jsonl", ".json"):
            with f.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
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
            text = f.read_text(encoding="utf-8")
            if text.strip():
                yield text


def build_stream(files: list[pathlib.Path], tokenizer, eos_id: int, text_key: str = "text",
                 append_eos: bool = True) -> np.ndarray:
    """Tokenize and pack documents into one int32 array."""
    chunks = []
    for doc in iter_documents(files, text_key):
        ids = tokenizer.encode(doc, add_special_tokens=False)
        chunks.append(np.asarray(ids, dtype=np.int32))
        if append_eos:
            chunks.append(np.asarray([eos_id], dtype=np.int32))
    if not chunks:
        raise ConfigError(f"data.path: the files {[str(f) for f in files]} hold no documents")
    return np.concatenate(chunks)


class ContextSampler:
    """Random contexts (x_<t, x_t) or NTP windows from a packed stream, resumable.

    ``next_contexts(B)`` returns this rank's slice of a global batch of B positions:
    (contexts (B_local, C) int64, next tokens (B_local,) int64).
    """

    def __init__(self, stream: np.ndarray, seed: int, dp_rank: int = 0, dp: int = 1):
        self.stream = stream
        self.dp_rank, self.dp = dp_rank, dp
        self.rng = np.random.default_rng(seed)

    def _positions(self, n_global: int, low: int, high: int) -> np.ndarray:
        if high <= low:
            raise ConfigError(f"the token stream has {len(self.stream)} tokens, too few for windows of "
                             f"{low} tokens; use more data or a shorter rlp.context_len / ntp.seq_len")
        pos = self.rng.integers(low, high, size=n_global)
        per = n_global // self.dp
        return pos[self.dp_rank * per:(self.dp_rank + 1) * per]

    def next_contexts(self, n_global: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._positions(n_global, context_len, len(self.stream))
        idx = t[:, None] + np.arange(-context_len, 0)[None, :]  # (B_local, C)
        ctx = torch.from_numpy(self.stream[idx].astype(np.int64))
        nxt = torch.from_numpy(self.stream[t].astype(np.int64))
        return ctx, nxt

    def next_windows(self, n_global: int, seq_len: int) -> torch.Tensor:
        start = self._positions(n_global, 0, len(self.stream) - seq_len)
        idx = start[:, None] + np.arange(seq_len + 1)[None, :]  # (B_local, S+1)
        return torch.from_numpy(self.stream[idx].astype(np.int64))

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
