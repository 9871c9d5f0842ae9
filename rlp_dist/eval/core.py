"""Think vs no-think on held-out text: the measurement behind ``rlp-dist eval`` and in-loop eval.

At each evaluated position t of the packed held-out stream with real next token x_t and context x_<t
drawn as training draws it (``document_boundaries``, data.document_boundaries): ``respect`` (default)
the prefix of t's own document, its last ``context_len`` tokens at most (right-padded, per-row lengths
through the rollout and the scoring; t at least one token into its document); ``ignore`` the
``context_len`` tokens of the stream before t (t >= context_len):

    S_no  = log p_theta(x_t | x_<t)                      no-think, the evaluated model
    S_ema = log p_phi(x_t | x_<t)                        no-think, the EMA teacher (when given)
    S_i   = log p_theta(x_t | x_<t, c_i),  c_i ~ pi_theta(. | x_<t),  i = 1..G   (rlp.rollout, tempered)
    LME   = log (1/G) sum_i exp(S_i)                     the thought-marginalised predictor (a Monte
                                                         Carlo estimate of log E_c p(x_t | x_<t, c))

Summary (means over positions P and thoughts G; nats, natural log):

    nll_no_think          -mean_t S_no
    nll_think             -mean_t LME
    nll_think_per_thought -mean_{t,i} S_i
    gain_mean             mean_{t,i} (S_i - S_no)     = nll_no_think - nll_think_per_thought
    gain_lme_mean         mean_t (LME - S_no)         = nll_no_think - nll_think
    gain_pos_frac         share of thoughts with S_i > S_no
    gain_ctx_pos_frac     share of positions with LME > S_no
    thought_len_mean      sampled thought tokens (closing marker included when sampled)
    closed_frac           share of thoughts that sampled the closing marker
    with a teacher:       nll_no_think_ema, reward_mean = mean (S_i - S_ema) (the training reward)

By Jensen, E_c S_i <= log E_c p(x_t | .): gain_lme_mean >= gain_mean up to sampling noise.

Parallelism: positions are cut into chunks of ``batch`` contexts; chunk j runs on data-parallel rank
j mod dp (padded with repeats of chunk 0, dropped afterwards, so every DP rank issues the same
collectives: ZeRO-3 gathers parameters inside each forward). The TP ranks of a replica sample with
identical generators keyed by (seed, chunk), so results do not depend on dp. With PP > 1 every stage
runs the rollout and the scoring schedule; S_no is broadcast from the last stage. The per-position
records are gathered over DP; every rank returns the same summary.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

SUMMARY_KEYS = ("positions", "nll_no_think", "nll_think", "nll_think_per_thought", "gain_mean", "gain_lme_mean",
                "gain_pos_frac", "gain_ctx_pos_frac", "thought_len_mean", "closed_frac")


@dataclass
class EvalOptions:
    """What to evaluate and how thoughts are sampled (defaults: the run's rlp section)."""

    positions: int = 256  # positions drawn with ``seed``; 0 = every eligible position
    seed: int = 0
    group_size: int = 8  # G thoughts per position
    thought_max_tokens: int = 64
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    context_len: int = 2048
    batch: int = 16  # contexts per rollout call (per DP rank)
    score_micro_batch: int = 4  # rows per no-think forward: logits (rows, C, V/tp); 4 x 2048 x 151936 fp32 = 5 GB
    records: bool = True  # keep the per-position records (positions.jsonl)
    document_boundaries: str = "respect"  # respect: contexts stay in t's document | ignore: stream windows

    def __post_init__(self) -> None:
        from rlp_dist.config.schema import ConfigError

        for name, low in (("positions", 0), ("group_size", 1), ("thought_max_tokens", 1), ("context_len", 1),
                          ("batch", 1), ("score_micro_batch", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"eval {name}={getattr(self, name)} must be >= {low}")
        if self.document_boundaries not in ("respect", "ignore"):
            raise ConfigError(f"eval document_boundaries={self.document_boundaries!r}; use 'respect' or 'ignore'")
        if self.temperature <= 0:
            raise ConfigError(f"eval temperature={self.temperature} must be > 0; training samples at 0.7")


@dataclass
class EvalData:
    """A packed held-out stream, where its documents start, and (optionally) the candidate positions."""

    tokens: Any  # (T,) int array: documents separated by EOS (np.ndarray or data.stream.MemmapStream)
    doc_starts: np.ndarray  # (D,) stream index of each document's first token
    candidates: Optional[np.ndarray] = None  # stream positions to draw from; None: every position

    def eligible(self, context_len: int, respect: bool = False) -> np.ndarray:
        """Stream positions t with a context: at least one token of t's own document before it
        (``respect``), or a full window (t >= context_len)."""
        c = (np.asarray(self.candidates, dtype=np.int64) if self.candidates is not None
             else np.arange(len(self.tokens), dtype=np.int64))
        if respect:
            return c[self.locate(c)[1] >= 1]
        return c[c >= context_len]

    def locate(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(document index, position inside the document) of stream positions t."""
        d = np.searchsorted(self.doc_starts, t, side="right") - 1
        return d, t - self.doc_starts[d]


def load_eval_data(path: str, tokenizer, eos_id: int, text_key: str = "text",
                   positions_key: Optional[str] = None) -> EvalData:
    """Text (.txt/.jsonl, via rlp_dist.data.stream) or an indexed dataset, packed with EOS between
    documents. ``positions_key``: a JSONL field listing, per document, the token indices (in the
    document's own tokens) to evaluate; only those positions are candidates."""
    import json
    import pathlib

    from rlp_dist.config.schema import ConfigError
    from rlp_dist.data.stream import build_stream, resolve_files

    files = resolve_files(path)
    if positions_key is None:
        tokens = build_stream(files, tokenizer, eos_id, text_key, append_eos=True)
        arr = np.asarray(tokens[np.arange(len(tokens))]) if not isinstance(tokens, np.ndarray) else tokens
        ends = np.flatnonzero(arr == eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(1, dtype=np.int64)
        return EvalData(tokens, starts.astype(np.int64))
    chunks, starts, cands, offset = [], [], [], 0
    for f in files:
        if pathlib.Path(f).suffix not in (".jsonl", ".json"):
            raise ConfigError(f"--positions-key {positions_key!r} needs JSONL documents, but {f} is not .jsonl")
        for lineno, line in enumerate(pathlib.Path(f).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if text_key not in obj or not isinstance(obj.get(positions_key), list):
                raise ConfigError(f"{f}:{lineno}: needs a {text_key!r} string and a {positions_key!r} list of "
                                  f"token indices")
            ids = tokenizer.encode(obj[text_key], add_special_tokens=False)
            bad = [p for p in obj[positions_key] if not 0 <= int(p) < len(ids)]
            if bad:
                raise ConfigError(f"{f}:{lineno}: {positions_key} {bad[:3]} outside the document's {len(ids)} "
                                  f"tokens; positions index the document's tokens (this tokenizer)")
            starts.append(offset)
            cands.extend(offset + int(p) for p in obj[positions_key])
            chunks.append(np.asarray(ids + [eos_id], dtype=np.int32))
            offset += len(ids) + 1
    if not chunks:
        raise ConfigError(f"{path}: no documents")
    return EvalData(np.concatenate(chunks), np.asarray(starts, dtype=np.int64), np.asarray(cands, dtype=np.int64))


def draw_positions(data: EvalData, n: int, context_len: int, seed: int, respect: bool = False) -> np.ndarray:
    """n eligible stream positions drawn without replacement with ``seed`` (sorted); n=0: all."""
    from rlp_dist.config.schema import ConfigError

    pool = data.eligible(context_len, respect)
    if pool.size == 0:
        raise ConfigError(f"eval data: no position has a context ({'a token of its own document before it' if respect else f'{context_len} tokens before it'}); "
                          f"use more text" + ("" if respect else " or a shorter --context-len"))
    if n == 0 or n >= pool.size:
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def _generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    h = hashlib.sha256(f"eval:{seed}:{chunk}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


@torch.no_grad()
def no_think_logp(model: torch.nn.Module, contexts: torch.Tensor, next_tokens: torch.Tensor, dims,
                  micro_batch: int = 4, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p(x_t | x_<t) (fp32, vocab-parallel over TP) of a plain megatron model or pipeline stage,
    forward-only through megatron's schedule; (b,) on every stage (broadcast from the last).
    lengths (b,): right-padded contexts, read at position lengths - 1 (causal: padding after it is unseen)."""
    from rlp_dist.models.runner import run_pipeline
    from rlp_dist.rlp.logprobs import token_logprobs

    b, c = contexts.shape
    mbs = math.gcd(b, micro_batch)
    tp_group = dims.tp_group if dims.tp > 1 else None

    at = (lengths if lengths is not None else torch.full((b,), c, device=contexts.device)) - 1  # (b,)

    def forward(stage, mb):
        pos = torch.arange(c, device=mb[0].device).expand_as(mb[0])  # (mbs, C)
        return stage(mb[0], pos, None)  # last stage: (mbs, C, V/tp); others: hidden (C, mbs, H)

    def loss(mb, logits):
        rows = torch.arange(logits.shape[0], device=logits.device)
        s = token_logprobs(logits[rows, mb[2]], mb[1], tp_group=tp_group)  # (mbs,) fp32
        return s.new_zeros(()), {"s": s}

    was = model.training
    model.eval()
    try:
        micro = list(zip(contexts.split(mbs), next_tokens.split(mbs), at.split(mbs)))
        out = run_pipeline(model, micro, forward, loss, c, mbs, forward_only=True)
    finally:
        model.train(was)
    if dims.pp == 1:
        return torch.cat([o["s"] for o in out])
    s = torch.cat([o["s"] for o in out]) if dims.is_last_stage else torch.empty(b, device=contexts.device)
    dist.broadcast(s, src=dist.get_global_rank(dims.pp_group, dims.pp - 1), group=dims.pp_group)
    return s


def _teacher_logp(teacher, contexts, next_tokens, dims, micro_batch, lengths=None) -> torch.Tensor:
    """S_ema from an EmaTeacher (in-loop: ZeRO-3 shards) or a plain module (``rlp-dist eval``)."""
    if hasattr(teacher, "score") and hasattr(teacher, "initialized"):
        mbs = math.gcd(contexts.shape[0], micro_batch)
        return (teacher.score(contexts, next_tokens, mbs) if lengths is None
                else teacher.score(contexts, next_tokens, mbs, lengths=lengths))
    return no_think_logp(teacher, contexts, next_tokens, dims, micro_batch, lengths)


@dataclass
class _Chunk:
    t: np.ndarray  # (b,) stream positions
    no: torch.Tensor  # (b,)
    ema: Optional[torch.Tensor]  # (b,)
    s_pred: torch.Tensor  # (b, G)
    lengths: torch.Tensor  # (b, G)
    closed: torch.Tensor  # (b, G) bool
    thoughts: list = field(default_factory=list)  # (b, G) decoded thought texts


def contexts_at(data: EvalData, t: np.ndarray, context_len: int, respect: bool, pad_id: int):
    """Contexts of stream positions t: (ids (b, C'), lengths (b,) or None). ``respect``: the last <=
    context_len tokens of t's own document, right-padded with ``pad_id`` to the longest (C'); when they
    all have the full length, plain windows (lengths None). ``ignore``: the context_len stream tokens
    before t."""
    if respect:
        _, inside = data.locate(t)
        n = np.minimum(inside, context_len)  # (b,) >= 1 (eligible positions)
        if not (n == context_len).all():
            width = int(n.max())
            idx = t[:, None] - n[:, None] + np.arange(width)[None, :]  # (b, C') from each context's start
            ids = np.where(np.arange(width)[None, :] < n[:, None], np.asarray(data.tokens[np.minimum(idx, t[:, None] - 1)]),
                           pad_id)
            return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(n.astype(np.int64))
    idx = t[:, None] + np.arange(-context_len, 0)[None, :]  # (b, C)
    return torch.from_numpy(np.asarray(data.tokens[idx]).astype(np.int64)), None


def _run_chunk(model, teacher, tokenizer, markers, data, t, opts, dims, chunk) -> _Chunk:
    from rlp_dist.rlp.rollout import RolloutGroups, RolloutSettings, sample_thoughts

    ctx, lengths = contexts_at(data, t, opts.context_len, opts.document_boundaries == "respect", markers.pad_id)
    ctx = ctx.to(dims.device)  # (b, C') ids; right-padded when lengths is not None
    lengths = None if lengths is None else lengths.to(dims.device)  # (b,)
    nxt = torch.from_numpy(np.asarray(data.tokens[t]).astype(np.int64)).to(dims.device)  # (b,)
    no = no_think_logp(model, ctx, nxt, dims, opts.score_micro_batch, lengths)
    ema = (_teacher_logp(teacher, ctx, nxt, dims, opts.score_micro_batch, lengths) if teacher is not None
           else None)
    settings = RolloutSettings(opts.group_size, opts.thought_max_tokens, opts.temperature, opts.top_k, opts.top_p)
    ro = sample_thoughts(model, ctx, nxt, markers, settings, _generator(opts.seed, chunk, dims.device),
                         RolloutGroups.from_dims(dims), context_lengths=lengths)
    g = opts.group_size
    lengths = ro.lengths.long()
    texts = []
    if opts.records:
        for i in range(ro.thoughts.shape[0]):
            ids = ro.thoughts[i, : int(lengths[i])].tolist()
            if ids and bool(ro.closed[i]) and ids[-1] == markers.close_id:
                ids = ids[:-1]
            texts.append(tokenizer.decode(ids))
    return _Chunk(t, no.float().cpu(), None if ema is None else ema.float().cpu(),
                  ro.s_pred.view(-1, g).float().cpu(), lengths.view(-1, g).cpu(), ro.closed.view(-1, g).cpu(),
                  [texts[i * g:(i + 1) * g] for i in range(len(t))] if texts else [])


def evaluate(model: torch.nn.Module, teacher, tokenizer, markers, data: EvalData, opts: EvalOptions,
             dims) -> dict:
    """Think vs no-think at ``opts.positions`` positions of ``data``. Collective: every rank calls it.

    model: this rank's (TP/PP shard of the) model that thinks (a plain megatron module, or a DeepSpeed
    engine's ``.module``); teacher: an ``EmaTeacher``, a plain module of the same shard, or None.
    Returns {"summary": {...}, "records": [per-position dicts] or []} (the same on every rank)."""
    t_all = draw_positions(data, opts.positions, opts.context_len, opts.seed, opts.document_boundaries == "respect")
    chunks = [t_all[i:i + opts.batch] for i in range(0, t_all.size, opts.batch)]
    n_real = len(chunks)
    while len(chunks) % dims.dp:  # equal collective counts on every DP rank (ZeRO-3 gathers per forward)
        chunks.append(chunks[0])
    mine = []
    for j in range(dims.dp_rank, len(chunks), dims.dp):
        out = _run_chunk(model, teacher, tokenizer, markers, data, chunks[j], opts, dims, j)
        if j < n_real:
            mine.append((j, out))
    if dims.dp > 1:
        parts: list = [None] * dims.dp
        dist.all_gather_object(parts, mine, group=dims.dp_group)
        mine = [x for p in parts for x in p]
    done = [c for _, c in sorted(mine, key=lambda jc: jc[0])]
    return {"summary": summarize(done, opts.group_size), "records": _records(done, data, tokenizer) if opts.records
            else []}


def summarize(chunks: list[_Chunk], group_size: int) -> dict:
    no = torch.cat([c.no for c in chunks])  # (P,)
    s = torch.cat([c.s_pred for c in chunks])  # (P, G)
    lme = torch.logsumexp(s, dim=1) - math.log(group_size)  # (P,)
    gain = s - no[:, None]  # (P, G)
    out = {
        "positions": int(no.numel()), "group_size": group_size,
        "nll_no_think": float(-no.mean()), "nll_think": float(-lme.mean()),
        "nll_think_per_thought": float(-s.mean()), "gain_mean": float(gain.mean()),
        "gain_lme_mean": float((lme - no).mean()), "gain_pos_frac": float((gain > 0).float().mean()),
        "gain_ctx_pos_frac": float((lme > no).float().mean()),
        "thought_len_mean": float(torch.cat([c.lengths for c in chunks]).float().mean()),
        "closed_frac": float(torch.cat([c.closed for c in chunks]).float().mean()),
    }
    if chunks and chunks[0].ema is not None:
        ema = torch.cat([c.ema for c in chunks])
        out.update({"nll_no_think_ema": float(-ema.mean()), "reward_mean": float((s - ema[:, None]).mean()),
                    "reward_pos_frac": float((s > ema[:, None]).float().mean())})
    return out


def _records(chunks: list[_Chunk], data: EvalData, tokenizer) -> list[dict]:
    out = []
    for c in chunks:
        docs, inside = data.locate(c.t)
        for r in range(len(c.t)):
            tok = int(data.tokens[int(c.t[r])])
            s = c.s_pred[r]
            rec = {"document": int(docs[r]), "position": int(inside[r]), "stream_position": int(c.t[r]),
                   "token": tok, "token_text": tokenizer.decode([tok]), "logp_no_think": float(c.no[r]),
                   "logp_no_think_ema": None if c.ema is None else float(c.ema[r]),
                   "s_pred": [float(v) for v in s], "s_pred_mean": float(s.mean()),
                   "s_pred_lme": float(torch.logsumexp(s, 0) - math.log(s.numel())),
                   "thought_lens": [int(v) for v in c.lengths[r]], "closed": [bool(v) for v in c.closed[r]],
                   "thoughts": c.thoughts[r] if c.thoughts else []}
            out.append(rec)
    return out
