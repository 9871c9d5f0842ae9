"""Rebuild the small bundled corpus and tokenizer (rlp_dist/assets/) from the Python standard library.

Nothing is downloaded: the corpus is the docstrings of stdlib modules (PSF licence), one document
per module, and the tokenizer is a byte-level BPE trained on it with the `tokenizers` library. The
thought markers ``<think>`` / ``</think>`` are single special tokens, as in Qwen3's tokenizer.

    python tools/build_assets.py
"""

import importlib
import inspect
import json
import pathlib
import pkgutil
import sys
import warnings

ASSETS = pathlib.Path(__file__).resolve().parents[1] / "rlp_dist" / "assets"
MODULES = [
    "json", "argparse", "collections", "functools", "itertools", "pathlib", "os", "re", "string",
    "textwrap", "datetime", "calendar", "decimal", "fractions", "statistics", "random", "math",
    "heapq", "bisect", "queue", "threading", "subprocess", "shutil", "tempfile", "glob", "csv",
    "configparser", "logging", "unittest", "doctest", "inspect", "typing", "dataclasses", "enum",
    "contextlib", "abc", "copy", "pprint", "difflib", "html", "email", "http.client", "urllib.parse",
    "xml.dom.minidom", "sqlite3", "zipfile", "tarfile", "gzip", "hashlib", "hmac", "secrets", "base64",
    "struct", "codecs", "io", "pickle", "shelve", "socket", "selectors", "asyncio", "concurrent.futures",
    "multiprocessing", "sched", "timeit", "trace", "pdb", "cProfile", "ast", "dis", "tokenize",
    "operator", "weakref", "types", "numbers", "array", "graphlib", "zoneinfo", "locale", "gettext",
]


def collect() -> list[str]:
    docs = []
    warnings.simplefilter("ignore")
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40:
                parts.append(f"{attr}: {doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) > 200:
            docs.append(text)
    return docs


def main() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    ASSETS.mkdir(parents=True, exist_ok=True)
    docs = collect()
    corpus = ASSETS / "corpus.jsonl"
    with corpus.open("w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<think>", "</think>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    out = ASSETS / "tokenizer"
    out.mkdir(exist_ok=True)
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(str(out))
    print(f"{len(docs)} documents, {sum(map(len, docs))} chars -> {corpus}; vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    sys.exit(main())
