"""``python -m rlp_dist.bench documents [--steps N] [--presets ...] [--json OUT]``: document boundaries in NTP.

1. Evidence. A synthetic in-context lookup corpus: each document binds K names to values
   (" name is value." K times), then asks Q of them (" name? value."); names and values (one token
   each) come from small shared pools, re-bound in every document, so the text of earlier documents in a packed window
   is pure interference. The same model (a tiny preset, same initial weights) trains for the same
   steps on the same windows (the same sampler draws) with ``data.document_boundaries=ignore`` (one
   causal stream) and ``respect`` (``DocumentLayout``: block-diagonal causal attention, per-document
   positions, Mamba states reset), through the NTP forward of ``train.ntp_step``. Held-out score: the
   NLL of the answer tokens (nats per answer), every held-out document scored alone from position 0,
   as it is used; a uniform guess over the value pool scores log(len(VALUES)).
2. Cost of the mask: forward + backward time of one NTP micro-batch with and without the layout on
   the bundled corpus (long documents: ~1 boundary per window) and on the synthetic one (many).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch

def word_tokens(tok, n: int, skip: int = 0) -> list[int]:
    """n single-token words " xyz" (letters only, 3-6 characters) of the tokenizer's vocabulary, in id
    order after the first ``skip`` of them: names and values are disjoint slices."""
    found = []
    for i in range(len(tok)):
        text = tok.decode([i])
        if text.startswith(" ") and text[1:].isalpha() and text[1:].islower() and 3 <= len(text) - 1 <= 6:
            found.append(i)
    if len(found) < skip + n:
        raise ValueError(f"the tokenizer has only {len(found)} single-token words; need {skip + n}")
    return found[skip:skip + n]


def synthetic_corpus(tok, n_docs: int, k: int, q: int, seed: int, n_names: int = 24, n_values: int = 16):
    """-> stream (int32, EOS after each document), the documents as (ids, answer positions), and the
    size of the value pool. Each document binds k distinct names to values (" name is value.") and
    asks q of them (" name? value."); answers are one token."""
    rng = np.random.default_rng(seed)
    names, values = word_tokens(tok, n_names), word_tokens(tok, n_values, skip=n_names)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    is_, dot, ask = enc(" is"), enc("."), enc("?")
    docs = []
    for _ in range(n_docs):
        chosen = rng.choice(len(names), size=k, replace=False)
        bound = {names[i]: values[j] for i, j in zip(chosen, rng.integers(0, len(values), size=k))}
        ids, answers = [], []
        for n, v in bound.items():
            ids += [n] + is_ + [v] + dot
        for n in rng.choice(list(bound), size=q, replace=True):
            ids += [int(n)] + ask
            answers.append(len(ids))
            ids += [bound[int(n)]] + dot
        docs.append((ids + [tok.eos_token_id], answers))
    stream = np.concatenate([np.asarray(d, dtype=np.int32) for d, _ in docs])
    return stream, docs, len(values)


def _model(preset: str, seed: int):
    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model

    torch.manual_seed(seed)
    return build_model(compose([f"+model={preset}"]).model)


def _forward(model, w, d, respect: bool):
    from rlp_dist.models.documents import DocumentLayout

    ids = w[:, :-1]  # (B, S)
    if not respect:
        return model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    lay = DocumentLayout.from_doc_ids(d)
    return model(ids, lay.positions, None, packed_seq_params=lay)


def _nll(logits, targets):
    return -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)  # (B, S) fp32


def train_and_score(preset, stream, starts, held_out, steps, seq_len, batch, lr, respect, seed=0):
    from rlp_dist.data.stream import ContextSampler

    model = _model(preset, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sampler = ContextSampler(stream, seed, doc_starts=starts)
    model.train()
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        w, d = sampler.next_windows(batch, seq_len, documents=True)
        loss = _nll(_forward(model, w, d, respect), w[:, 1:]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, answers in held_out:
            x = torch.tensor(ids)[None]  # (1, n): the document alone
            nll = _nll(model(x[:, :-1], torch.arange(x.shape[1] - 1)[None], None), x[:, 1:])[0]
            total += float(nll[[a - 1 for a in answers]].sum())  # logits at a-1 predict the answer at a
            count += len(answers)
    return {"answer_nll": total / count, "final_train_loss": statistics.mean(losses[-20:]), "train_s": train_s}


def step_time(preset, stream, starts, seq_len, batch, reps=8):
    """Median forward + backward seconds of one micro-batch, ignore and respect alternating on the same
    windows (a loaded machine drifts; alternation keeps the two comparable). -> (ignore, respect, docs/row)."""
    from rlp_dist.data.stream import ContextSampler

    model = _model(preset, 0)
    sampler = ContextSampler(stream, 1, doc_starts=starts)
    times, docs = {False: [], True: []}, []
    for i in range(reps + 2):
        w, d = sampler.next_windows(batch, seq_len, documents=True)
        for respect in (False, True):
            t0 = time.perf_counter()
            _nll(_forward(model, w, d, respect), w[:, 1:]).mean().backward()
            if i >= 2:  # warm-up: first calls allocate
                times[respect].append(time.perf_counter() - t0)
        docs.append(float(d.max(1).values.float().mean()) + 1)
    return statistics.median(times[False]), statistics.median(times[True]), statistics.mean(docs)


def main(argv) -> dict:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench documents")
    p.add_argument("--presets", nargs="+", default=["tiny_transformer"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cost-presets", nargs="*", default=["tiny_transformer", "tiny_hybrid"])
    p.add_argument("--names", type=int, default=8, help="name pool (re-bound in every document)")
    p.add_argument("--values", type=int, default=8, help="value pool: a uniform guess scores log(values)")
    p.add_argument("--bindings", type=int, default=3, help="names bound per document")
    p.add_argument("--queries", type=int, default=3, help="questions per document")
    args = p.parse_args(argv)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from rlp_dist.data.stream import build_stream, document_starts, resolve_files
    from rlp_dist.data.tokenizer import load_tokenizer
    from rlp_dist.distributed.parallel import free_port, init_distributed

    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed(1, 1, "gloo")
    tok = load_tokenizer("bundled")
    shape = dict(k=args.bindings, q=args.queries, n_names=args.names, n_values=args.values)
    stream, docs, n_values = synthetic_corpus(tok, 4000, seed=0, **shape)
    _, held_out, _ = synthetic_corpus(tok, 300, seed=1, **shape)
    starts = document_starts(stream, tok.eos_token_id)
    out = {"corpus": {"docs": len(docs), "tokens": int(len(stream)), "mean_doc_tokens": len(stream) / len(docs),
                      "uniform_answer_nll": math.log(n_values)},
           "settings": vars(args), "evidence": {}, "cost": {}}
    for preset in args.presets:
        out["evidence"][preset] = {mode: train_and_score(preset, stream, starts, held_out, args.steps, args.seq_len,
                                                         args.batch, args.lr, mode == "respect")
                                   for mode in ("ignore", "respect")}
    bundled = build_stream(resolve_files("bundled"), tok, tok.eos_token_id)
    for name, (s, st) in {"bundled": (bundled, document_starts(bundled, tok.eos_token_id)),
                          "synthetic": (stream, starts)}.items():
        for preset in args.cost_presets:
            t_ign, t_res, n_docs = step_time(preset, s, st, 512, 4)
            out["cost"][f"{preset}/{name}"] = {"ignore_s": t_ign, "respect_s": t_res, "ratio": t_res / t_ign,
                                               "docs_per_window": n_docs, "seq_len": 512, "batch": 4}
    return out
