"""Tokenizer loading and the thought markers.

``data.tokenizer=bundled`` is the small byte-level BPE shipped in ``rlp_dist/assets/tokenizer``
(built by tools/build_assets.py; it has ``<think>``/``</think>`` as single tokens, like Qwen3's);
anything else is a local Hugging Face tokenizer directory. Nothing is downloaded.
"""

from __future__ import annotations

from rlp_dist.config.schema import ConfigError
import os
import pathlib
from dataclasses import dataclass

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "assets"


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = ASSETS / "tokenizer" if spec == "bundled" else pathlib.Path(spec)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise ConfigError(f"data.tokenizer={spec!r}: no tokenizer.json or tokenizer_config.json in {path}; "
                         f"pass a local Hugging Face tokenizer directory or 'bundled'")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(path))


@dataclass(frozen=True)
class ThoughtTokens:
    """Token ids wrapping a thought: context + prompt + [open] + thought + [close] + x_t."""

    open_id: int
    close_id: int
    prompt_ids: tuple[int, ...]
    eos_id: int
    pad_id: int

    @property
    def prefix_ids(self) -> tuple[int, ...]:
        """Tokens appended after the context, before the thought is sampled."""
        return self.prompt_ids + (self.open_id,)


def _single_token_id(tok, text: str):
    ids = tok.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def thought_tokens(tok, open_marker: str, close_marker: str, prompt: str, add_tokens: bool) -> ThoughtTokens:
    """Resolve the marker strings to single token ids, adding them to the tokenizer if allowed.

    Raises ValueError when a marker is not a single token and ``rlp.add_thought_tokens`` is false.
    """
    ids = {m: _single_token_id(tok, m) for m in (open_marker, close_marker)}
    missing = [m for m, i in ids.items() if i is None]
    if missing:
        if not add_tokens:
            raise ConfigError(
                f"the tokenizer has no single token for thought marker(s) {missing}; set "
                f"rlp.add_thought_tokens=true to add them (the embedding and output layers are resized), "
                f"or choose markers it has via rlp.thought_open / rlp.thought_close")
        tok.add_special_tokens({"additional_special_tokens": missing})
        ids = {m: _single_token_id(tok, m) for m in (open_marker, close_marker)}
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer defines no eos_token; documents cannot be separated when packing")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    prompt_ids = tuple(tok.encode(prompt, add_special_tokens=False)) if prompt else ()
    return ThoughtTokens(ids[open_marker], ids[close_marker], prompt_ids, eos, pad)
