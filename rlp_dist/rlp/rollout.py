"""Thought rollouts in the training model itself (RLP.md, Algorithm 1, steps 3 and 6).

For each context x_<t we sample G thoughts from pi_theta_old inside thought markers:

    sequence = x_<t + prompt + <think> + l_1 .. l_n + </think> + x_t

A thought is 1..L *sampled* tokens (the policy's actions). The closing marker is one of them when
the policy samples it; a thought that reaches L tokens without closing gets the marker appended,
which is not a policy action. Sampling is at temperature T (optionally restricted to top-k/top-p);
the behaviour log-probs recorded are those of the tempered policy (see ``logprobs.sample``).

Engines (``engine=``), both driven by one decode loop (:func:`_decode_loop`): prefill each context
once, fork the cache G ways, decode the live rows in one batch, and drop rows whose S_pred has been
read once a quarter of the batch has finished, so finished sequences stop costing compute.
- ``"cached"`` (the default for both backbones): our decode programs over the live shard,
  :class:`rlp_dist.rlp.decode.CachedDecoder` (GPTModel: a preallocated cache of already-rotated keys)
  and :class:`rlp_dist.rlp.decode_hybrid.HybridDecoder` (MambaModel: attention KV, Mamba conv and fp32
  SSM states). ZeRO-3 parameters are gathered once per rollout, so the data-parallel ranks need no
  agreement per step; the TP ranks of a replica see identical all-reduced hidden states and sample
  identical tokens from identically seeded generators, so they stop together.
- ``"megatron"`` (:class:`MegatronStepper`, the reference engine): megatron-core's
  ``StaticInferenceContext`` with our fork of its attention KV and Mamba conv/SSM states (the SSM
  state in fp32). ZeRO-3 gathers parameters inside each forward, so every rank of ``sync_group`` runs
  the same number of forward calls, agreed by one all-reduce of a flag per decode step.
Sampling is ``logprobs.sample_vocab_parallel`` (inverse CDF, one uniform per row) over this TP rank's
vocabulary slice: a few numbers per row cross the TP group, never the vocabulary, except for top-p
without top-k (which needs the sorted full distribution and gathers it).

Pipeline parallelism (``pp_group`` with more than one rank; the cached engine only): every stage runs
the same loop around a :class:`rlp_dist.rlp.pipeline_decode.PipelineDecoder` over its stage of the
cached program; hidden states flow stage to stage, the last stage reads S_pred and samples, and
broadcasts the sampled tokens over the PP group each step, so every stage ends with the same
:class:`RolloutBatch` (the first stage feeds training with the thoughts, the last scores them).

Both: S_pred = log p_theta(x_t | x_<t, c) is read from the decode step that consumes the closing
marker: those logits are exactly the teacher-forced prediction of x_t, so no extra forward. Sampling
randomness comes from a generator seeded by (seed, step, dp_rank): identical on the TP ranks of one
replica (they must sample the same tokens), reproducible on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rlp_dist.data.tokenizer import ThoughtTokens
from rlp_dist.rlp.logprobs import sample_vocab_parallel, token_logprobs
from rlp_dist.rlp.pipeline_decode import PipelineDecoder


@dataclass
class RolloutBatch:
    """Hand-off from the rollout engine to scoring and the loss (N = B*G thoughts)."""

    prefix: torch.Tensor  # (B, P) context + prompt + open marker
    next_tokens: torch.Tensor  # (B,) x_t
    thoughts: torch.Tensor  # (N, L) sampled tokens, pad after the thought
    mask: torch.Tensor  # (N, L) 1.0 on sampled (policy) tokens
    behaviour_logp: torch.Tensor  # (N, L) log pi_theta_old of sampled tokens (0 on padding)
    closed: torch.Tensor  # (N,) bool: the policy sampled the closing marker
    s_pred: torch.Tensor  # (N,) log p_theta(x_t | x_<t, c), read at the rollout
    group_size: int
    decode_steps: int = 0
    # (B,) real length of each prefix row when they differ (several contexts of one document,
    # ``branches``): prefix rows are then right-padded to P. None: every row is P long.
    prefix_lengths: Optional[torch.Tensor] = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=-1)

    def row_prefix_lengths(self) -> torch.Tensor:
        """(N,) prefix length of each thought's row."""
        b, p = self.prefix.shape
        lengths = self.prefix_lengths if self.prefix_lengths is not None else torch.full(
            (b,), p, dtype=torch.long, device=self.prefix.device)
        return lengths.repeat_interleave(self.group_size)

    def _after_prefix(self, body: torch.Tensor, pad_id: int) -> torch.Tensor:
        """Rows prefix_r[:P_r] + body_r, right-padded to P + body length. body: (N, M) -> (N, P+M)."""
        n, m = body.shape
        prefix = self.prefix.repeat_interleave(self.group_size, dim=0)  # (N, P)
        if self.prefix_lengths is None:
            return torch.cat([prefix, body], dim=1)
        p_r = self.row_prefix_lengths()[:, None]  # (N, 1)
        u = torch.arange(prefix.shape[1] + m, device=body.device)[None]  # (1, P+M)
        from_body = body.gather(1, (u - p_r).clamp(0, m - 1))  # (N, P+M)
        from_prefix = prefix.gather(1, u.clamp(max=prefix.shape[1] - 1).expand(n, -1))
        out = torch.where(u < p_r, from_prefix, from_body)
        return out.masked_fill(u >= p_r + m, pad_id)

    def training_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids for the policy-gradient forward and where each row's first thought logit is.

        Returns (ids (N, P+L-1), offsets (N,)): logits[r, offsets[r] + u] predict thoughts[r, u];
        offsets = P_r - 1 (P - 1 for every row unless prefix lengths differ; rows right-padded).
        """
        ids = self._after_prefix(self.thoughts[:, :-1], 0)  # right padding: causal, its logits never read
        return ids, self.row_prefix_lengths() - 1

    def scored_sequences(self, markers: ThoughtTokens) -> torch.Tensor:
        """Full teacher-forcing sequences prefix + thought + close + x_t, right-padded. (N, P+L+2).

        Used to check S_pred against a separate forward; the loop reads S_pred from the rollout.
        """
        n, l = self.thoughts.shape
        nxt = self.next_tokens.repeat_interleave(self.group_size)
        body = torch.full((n, l + 2), markers.pad_id, dtype=torch.long)
        lengths = self.lengths.long()
        for i in range(n):
            k = int(lengths[i])
            body[i, :k] = self.thoughts[i, :k]
            if not bool(self.closed[i]):
                body[i, k] = markers.close_id
                k += 1
            body[i, k] = nxt[i]
        return self._after_prefix(body, markers.pad_id)

    def close_positions(self) -> torch.Tensor:
        """Index (in scored_sequences) of the closing marker, whose logits predict x_t. (N,)"""
        return self.row_prefix_lengths() + self.lengths.long() - self.closed.long()


LogitsFn = Callable[..., torch.Tensor]


def fork_kv_cache(inference_context, batch: int, group: int, length: int, model=None) -> None:
    """Replicate rows [0, batch) of every cached layer state G ways into [0, batch*G).

    Row b*G + i of the fork is a copy of prefilled row b (matching ``repeat_interleave``).
    Attention KV memory is (seq, max_batch, groups, dim), allocated for all B*G rows: the prefix
    rows are copied in place. Mamba mixers (found in ``model``) keep (conv_state, ssm_state), each
    (batch, ...), allocated by the prefill at its batch B: they are replaced by G-way copies and the
    mixer's ``cached_batch_size`` is set to B*G (otherwise the first decode step re-allocates them
    as zeros).
    """
    from megatron.core.ssm.mamba_mixer import MambaMixer

    mixers = {m.layer_number: m for m in (model.modules() if model is not None else ())
              if isinstance(m, MambaMixer)}
    memory = inference_context.key_value_memory_dict
    for key, tensors in memory.items():
        if key in mixers:  # (conv_state (B, C, K), ssm_state (B, H, P, N)) -> (B*G, ...)
            memory[key] = tuple(t.repeat_interleave(group, dim=0) for t in tensors)
            mixers[key].cached_batch_size = batch * group
            continue
        forked = []
        for mem in tensors:
            src = mem[:length, :batch].repeat_interleave(group, dim=1)  # (len, B*G, ...)
            mem[:length, : batch * group] = src
            forked.append(mem)
        memory[key] = tuple(forked)
    for fork in getattr(inference_context, "extra_state_forks", ()):
        fork(batch, group)


def preallocate_mamba_states(model, inference_context, batch: int) -> None:
    """Allocate every Mamba mixer's decode state before the prefill, the SSM state in fp32.

    megatron-core allocates (conv_state, ssm_state) lazily in the parameters' dtype; with bf16
    weights the recurrent state h_t = exp(dt A) h_{t-1} + dt B x_t would then be rounded to bf16 at
    every token (NVIDIA's Nemotron-H recipes keep it in fp32). The mixer accepts a preallocated pair:
    its prefill ``copy_``s the final scan state into it, its decode step updates it in place with
    fp32 arithmetic and reads y from ``ssm_state.to(dtype)``. The conv state (the last K inputs)
    stays in the parameters' dtype: it holds inputs, not an accumulation.
    """
    from megatron.core.ssm.mamba_mixer import MambaMixer

    for m in model.modules():
        if not isinstance(m, MambaMixer):
            continue
        _, ssm_shape = m.mamba_state_shapes_per_request()
        w = m.conv1d.weight
        channels = tuple(getattr(w, "ds_shape", w.shape))[0]  # ZeRO-3: w.shape is the empty partition's
        conv = torch.zeros(batch, channels, m.d_conv, dtype=w.dtype, device=w.device)
        ssm = torch.zeros(batch, *ssm_shape, dtype=torch.float32, device=w.device)
        inference_context.key_value_memory_dict[m.layer_number] = (conv, ssm)
        m.cached_batch_size = batch


def _any_across(flag: torch.Tensor, group) -> bool:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return bool(flag.any())
    t = flag.any().to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def cached_decoder_class(model: torch.nn.Module):
    """The cached decode program for this model: :class:`rlp_dist.rlp.decode.CachedDecoder` for the
    Transformer, :class:`rlp_dist.rlp.decode_hybrid.HybridDecoder` for the hybrid, None otherwise."""
    from rlp_dist.rlp import decode, decode_hybrid

    if decode.supports(model):
        return decode.CachedDecoder
    if decode_hybrid.supports(model):
        return decode_hybrid.HybridDecoder
    return None


@dataclass(frozen=True)
class RolloutSettings:
    """How thoughts are sampled: one record from the config (``rlp.*``) to the engine."""

    group_size: int  # G thoughts per context
    max_tokens: int  # L sampled thought tokens at most
    temperature: float  # the policy is softmax(z / T)
    top_k: int = 0  # 0: off (restricts what can be drawn; log-probs stay under the full tempered softmax)
    top_p: float = 1.0  # 1: off
    engine: str = "auto"  # auto | cached | megatron (see sample_thoughts)
    pipeline_micro_batches: Optional[int] = None  # PP decode: row slices per step through the stages

    @classmethod
    def from_config(cls, r) -> "RolloutSettings":
        """From an RLPConfig (rlp_dist.config.schema)."""
        return cls(r.group_size, r.thought_max_tokens, r.temperature, r.top_k, r.top_p)


@dataclass(frozen=True)
class RolloutGroups:
    """The process groups a rollout needs (from ``ParallelDims``, built once): ``sync`` — the ranks that
    must run equally many forwards (engine="megatron" under ZeRO-3; None on one rank), ``tp`` — this
    replica's TP group (vocab-parallel sampling), ``pp`` — the pipeline group (None or one rank: no PP)."""

    sync: Any = None
    tp: Any = None
    pp: Any = None

    @classmethod
    def from_dims(cls, dims) -> "RolloutGroups":
        return cls(None if dims.world_size == 1 else dist.group.WORLD, dims.tp_group,
                   dims.pp_group if dims.pp > 1 else None)


def sample_thoughts(model: torch.nn.Module, contexts: torch.Tensor, next_tokens: Optional[torch.Tensor],
                    markers: ThoughtTokens, settings: RolloutSettings, generator: Optional[torch.Generator] = None,
                    groups: RolloutGroups = RolloutGroups(), branches: Optional[Sequence[int]] = None,
                    context_lengths: Optional[torch.Tensor] = None) -> "RolloutBatch":
    """Sample ``settings.group_size`` thoughts per context; see :func:`_sample_cached` for the arguments.

    settings.engine: ``"cached"`` (:mod:`rlp_dist.rlp.decode`), ``"megatron"`` (stock
    StaticInferenceContext), or ``"auto"``: cached where the decode program supports the model, else
    megatron. The model runs in eval mode (megatron-core's cached attention path requires it); the
    training flag is restored after. groups.pp: this rank's pipeline group; with more than one rank the
    model is this rank's stage and the rollout is pipelined (cached engine); every stage returns the
    same RolloutBatch.
    """
    s, engine, pp_group = settings, settings.engine, groups.pp
    pp = 1 if pp_group is None else dist.get_world_size(pp_group)
    if engine == "auto":
        engine = "cached" if cached_decoder_class(model) is not None else "megatron"
    if engine not in ("cached", "megatron"):
        raise ValueError(f"rollout engine {engine!r}; use 'auto', 'cached' or 'megatron'")
    if engine == "megatron" and pp > 1:
        raise ValueError(f"rollout engine 'megatron' runs unpipelined models only, but pp_group has "
                         f"{pp} ranks; use engine='cached' (a model decode.supports) or parallel.pp=1")
    if pp == 1 and not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError(f"the model is one pipeline stage (pre_process={model.pre_process}, "
                         f"post_process={model.post_process}) but no pipeline group was given; "
                         f"pass pp_group=dims.pp_group")
    was_training = model.training
    model.eval()
    try:
        return _sample_cached(model, contexts, next_tokens, markers, s.group_size, s.max_tokens, s.temperature,
                              s.top_k, s.top_p, generator, sync_group=groups.sync, tp_group=groups.tp, engine=engine,
                              pp_group=pp_group, branches=branches, pipeline_micro_batches=s.pipeline_micro_batches,
                              context_lengths=context_lengths)
    finally:
        model.train(was_training)


class MegatronStepper:
    """The stock megatron-core cached forward (``StaticInferenceContext``) behind the interface of
    :class:`rlp_dist.rlp.decode.CachedDecoder`: ``prefill``, ``step``, ``keep``. Serves any megatron LM
    (the hybrid: attention KV plus Mamba conv/SSM states). Returns full-vocabulary logits."""

    vocab_parallel = False

    def __init__(self, model: torch.nn.Module, max_len: int, rows: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.ctx = model, StaticInferenceContext(rows, max_len)

    def prefill(self, ids: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        b, p = ids.shape
        preallocate_mamba_states(self.model, self.ctx, b)
        pos = torch.arange(p, device=ids.device).expand(b, -1)
        logits = self.model(ids, pos, None, inference_context=self.ctx, runtime_gather_output=True)[:, -1]
        fork_kv_cache(self.ctx, b, repeats, p, self.model)
        self.ctx.sequence_len_offset = p
        self.ctx.enable_decode_mode()
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.full((tokens.shape[0], 1), self.ctx.sequence_len_offset, dtype=torch.long,
                         device=tokens.device)
        logits = self.model(tokens[:, None], pos, None, inference_context=self.ctx,
                            runtime_gather_output=True)[:, -1]
        self.ctx.sequence_len_offset += 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Move the kept rows to the front of every cache; later steps run on those rows only
        (megatron reads and writes KV rows [0, batch) of the current call's batch)."""
        from megatron.core.ssm.mamba_mixer import MambaMixer

        k = rows.numel()
        mixers = {m.layer_number: m for m in self.model.modules() if isinstance(m, MambaMixer)}
        memory = self.ctx.key_value_memory_dict
        for key, tensors in memory.items():
            if key in mixers:  # (batch, ...) states, exactly as many rows as the call's batch
                memory[key] = tuple(t.index_select(0, rows) for t in tensors)
                mixers[key].cached_batch_size = k
            else:
                for mem in tensors:  # (seq, max_batch, ...); the gather copies before the write
                    mem[:, :k] = mem.index_select(1, rows)


@torch.no_grad()
def _sample_cached(
    model: torch.nn.Module,
    contexts: torch.Tensor,
    next_tokens: torch.Tensor,
    markers: ThoughtTokens,
    group_size: int,
    max_tokens: int,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    sync_group=None,
    tp_group=None,
    engine: str = "cached",
    pp_group=None,
    branches: Optional[Sequence[int]] = None,
    pipeline_micro_batches: Optional[int] = None,
    context_lengths: Optional[torch.Tensor] = None,
) -> RolloutBatch:
    """Sample G thoughts per context with a cached decoder; read S_pred on the way.

    model: this rank's shard; contexts: (B, C) token ids; next_tokens: (B,) x_t (the same on every
    pipeline stage). With ``branches`` (t_0 < .. < t_{k-1}; cached engine) ``contexts`` are D
    documents (D, T > t_{k-1}) holding k contexts each, x_<t_j with x_t = document[t_j]
    (``next_tokens`` must be None): every document is prefilled once up to t_{k-1} and the D*k
    contexts (order d*k + j) branch from it (attention: a prefix of its KV; Mamba: the states captured
    at t_j during the one scan); the prompt and open marker are then fed to each branch. The
    RolloutBatch's prefixes are right-padded, with ``prefix_lengths``. With ``context_lengths`` (B,)
    (cached engine; contexts of different lengths, e.g. document prefixes) ``contexts`` are right-padded
    and context b is its first context_lengths[b] tokens: the prompt and open marker follow each
    context's last token, each row decodes on from its own length, and the RolloutBatch's prefixes are
    right-padded the same way, with ``prefix_lengths``.

    engine "cached": parameters are gathered once and ranks need no per-step agreement
    (``sync_group`` unused); with a ``pp_group`` of more than one rank the model is this rank's stage
    and the decode is pipelined (``pipeline_micro_batches``: row slices per decode step through the
    stages, default 1; see ``PipelineDecoder``). engine "megatron": every rank of ``sync_group`` runs
    the same number of forward calls (ZeRO-3 gathers parameters inside each forward).
    """
    from rlp_dist.rlp.decode import gathered

    b = contexts.shape[0]
    extra = torch.tensor(markers.prefix_ids, dtype=torch.long, device=contexts.device)
    forced: tuple[int, ...] = ()
    if branches is not None:
        if context_lengths is not None:
            raise ValueError("sample_thoughts: pass branches (several contexts per document) or context_lengths, "
                             "not both")
        prefix, next_tokens, lengths, branches = _branch_prefixes(contexts, next_tokens, extra, branches)
        prefill, forced = contexts[:, : branches[-1]], tuple(markers.prefix_ids)  # (D, t_{k-1})
        if engine != "cached":
            raise ValueError("several contexts per document (branches) need the cached engine; use engine='auto'")
    elif context_lengths is not None:
        if engine != "cached":
            raise ValueError("contexts of different lengths (context_lengths) need the cached engine; use engine='auto'")
        prefix, lengths = _padded_prefixes(contexts, context_lengths, extra)  # (B, C+e), (B,)
        prefill = prefix
    else:
        prefix = prefill = torch.cat([contexts, extra.expand(b, -1)], dim=1)  # (B, P)
        lengths = None
    max_len = prefix.shape[1] + max_tokens + 2
    if engine == "cached":
        with gathered(model):
            cls = cached_decoder_class(model)
            if cls is None:
                raise ValueError(f"rollout engine 'cached' has no decode program for {type(model).__name__} "
                                 f"with this config; use engine='megatron' (or 'auto')")
            dec = cls(model, max_len, tp_group)
            if pp_group is not None and dist.get_world_size(pp_group) > 1:
                dtype = next(model.parameters()).dtype  # of the hidden states sent between stages
                dec = PipelineDecoder(dec, pp_group, model.config.hidden_size, dtype, contexts.device,
                                      pipeline_micro_batches)
            ro = _decode_loop(dec, prefill, next_tokens, markers, group_size, max_tokens, temperature,
                              top_k, top_p, generator, None, tp_group, branches, forced,
                              lengths if context_lengths is not None else None)
            ro.prefix, ro.prefix_lengths = prefix, lengths
            return ro
    dec = MegatronStepper(model, max_len, b * group_size)
    return _decode_loop(dec, prefix, next_tokens, markers, group_size, max_tokens, temperature, top_k,
                        top_p, generator, sync_group, tp_group)


def _padded_prefixes(contexts: torch.Tensor, context_lengths: torch.Tensor, extra: torch.Tensor):
    """Right-padded contexts (B, C) of lengths (B,) -> prefixes context_b[:len_b] + prompt + open marker,
    right-padded with 0 ((B, C+e)), and their lengths len_b + e (B,)."""
    b, c = contexts.shape
    lengths = context_lengths.to(device=contexts.device, dtype=torch.long)
    if lengths.shape != (b,) or bool(((lengths < 1) | (lengths > c)).any()):
        raise ValueError(f"context_lengths must be (B,) = ({b},) in [1, {c}], got {lengths.tolist()}")
    e = extra.numel()
    u = torch.arange(c + e, device=contexts.device)[None]  # (1, C+e)
    prefix = torch.where(u < lengths[:, None], F.pad(contexts, (0, e)), 0)  # (B, C+e): the context, then 0
    at = lengths[:, None] + torch.arange(e, device=contexts.device)  # (B, e): prompt + marker after the context
    return prefix.scatter(1, at, extra.expand(b, -1)), lengths + e


def _branch_prefixes(docs: torch.Tensor, next_tokens, extra: torch.Tensor, branches: Sequence[int]):
    """D documents with k branch points -> the D*k prefixes x_<t_j + prompt + open marker, right-padded
    to t_{k-1} + len(extra) ((D*k, P), order d*k + j), x_t (D*k,), prefix lengths (D*k,), branches."""
    ends = [int(t) for t in branches]
    d, length = docs.shape
    if next_tokens is not None:
        raise ValueError("with branches the next tokens are the documents' own (x_t = document[t_j]); "
                         "pass next_tokens=None")
    if not all(a < c for a, c in zip(ends, ends[1:])) or ends[0] < 1 or ends[-1] >= length:
        raise ValueError(f"branch points {ends} must increase from >= 1 and stay below the document "
                         f"length {length} (x_t = document[t_j] is read)")
    e = extra.numel()
    p = ends[-1] + e
    prefix = torch.zeros(d, len(ends), p, dtype=torch.long, device=docs.device)  # pad 0 after each prefix
    for j, t in enumerate(ends):
        prefix[:, j, :t] = docs[:, :t]
        prefix[:, j, t:t + e] = extra
    lengths = torch.tensor([t + e for t in ends], device=docs.device).repeat(d)  # (D*k,)
    x_t = docs[:, ends].reshape(-1)  # (D*k,)
    return prefix.reshape(d * len(ends), p), x_t, lengths, ends


def _decode_loop(dec, prefix, next_tokens, markers, g, big_l, temperature, top_k, top_p, generator,
                 sync_group, tp_group, branches=None, forced=(), lengths=None) -> RolloutBatch:
    """Prefill once, fork G ways, decode the live rows; rows whose S_pred was read are dropped once a
    quarter of the batch has finished (they stop costing compute).

    ``prefix``: (B, P) ids to prefill; with ``branches`` (k points) they are documents holding k
    contexts each, and ``forced`` tokens (the prompt and open marker) are then fed to every branch
    before sampling; next_tokens: (B*k,) x_t of each context.

    Pipelined (``dec`` a :class:`PipelineDecoder`), on every stage: only the last stage has logits; it
    reads S_pred, samples, and broadcasts the sampled tokens over the PP group each step. Every stage
    then does the same bookkeeping with those tokens (thoughts, mask, closed, live rows, compaction,
    stop), and the float records (behaviour log-probs, S_pred) reach the others once, at the end.
    """
    device = prefix.device
    pipe = dec if isinstance(dec, PipelineDecoder) else None
    samples = pipe is None or pipe.is_last  # this rank has the logits: it reads S_pred and samples
    n = next_tokens.shape[0] * g  # contexts x G
    x_t = next_tokens.repeat_interleave(g)  # (N,)
    thoughts = torch.full((n, big_l), markers.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(n, big_l, device=device)
    blogp = torch.zeros(n, big_l, device=device)
    s_pred = torch.zeros(n, device=device)
    closed = torch.zeros(n, dtype=torch.bool, device=device)
    vocab_group = tp_group if getattr(dec, "vocab_parallel", True) else None  # None: dec returns all of V
    if lengths is not None:  # right-padded prefixes of their own lengths (B,)
        logits = dec.prefill(prefix, repeats=g, lengths=lengths)  # (B, V/tp) at each row's last position
    elif branches is None:
        logits = dec.prefill(prefix, repeats=g)  # (B, V or V/tp); None before the last pipeline stage
    else:
        logits = dec.prefill(prefix, repeats=g, branches=branches)  # (B*k, V/tp)
    logits = logits.repeat_interleave(g, dim=0) if samples else None  # (N, V or V/tp)
    for tok in forced:  # the prompt and open marker after each branch's context
        logits = dec.step(torch.full((n,), tok, dtype=torch.long, device=device))
    rows = torch.arange(n, device=device)  # original index of each live row
    active = torch.ones(n, dtype=torch.bool, device=device)  # still sampling
    awaiting = torch.zeros(n, dtype=torch.bool, device=device)  # close fed, S_pred not yet read
    steps = 0
    for step in range(big_l + 2):
        # The one device->host sync of a decode step: how many rows still sample / await S_pred.
        n_active, n_awaiting = torch.stack([active.sum(), awaiting.sum()]).tolist()
        if n_awaiting and samples:
            idx = rows[awaiting]  # untempered: the predictor, not the policy
            s_pred[idx] = token_logprobs(logits[awaiting], x_t[idx], tp_group=vocab_group)
        # With sync_group (stock engine under ZeRO-3) the loop runs until every rank is done.
        if not (_any_across(active, sync_group) if sync_group is not None else n_active):
            break
        if (active.numel() - n_active) * 4 >= active.numel():  # compact: finished rows stop costing compute
            keep = active.nonzero().squeeze(-1)
            keep = keep if keep.numel() else torch.zeros(1, dtype=torch.long, device=device)  # a placeholder
            dec.keep(keep)
            rows, active = rows[keep], active[keep]
            logits = logits[keep] if samples else None
        if step < big_l:
            if samples:
                tok, lp = sample_vocab_parallel(logits, temperature, top_k, top_p, generator, vocab_group)
            else:
                tok = torch.empty_like(rows)  # filled by the broadcast below
            if pipe is not None:  # a pipelined step's one broadcast: the last stage's tokens (n_live,)
                pipe.from_last_stage(tok)
            idx = rows[active]
            thoughts[idx, step] = tok[active]
            mask[idx, step] = 1.0
            if samples:
                blogp[idx, step] = lp[active]
            just_closed = active & (tok == markers.close_id)
            closed[rows[just_closed]] = True
        else:  # L sampled tokens without a close: append the marker (not a policy action)
            tok = torch.full_like(rows, markers.close_id)
            just_closed = active.clone()
        tok = torch.where(active, tok, torch.full_like(tok, markers.pad_id))
        awaiting = just_closed
        active = active & ~just_closed
        logits = dec.step(tok)
        steps += 1
    if pipe is not None:  # the float records exist on the last stage only: one broadcast of (N, L+1)
        records = pipe.from_last_stage(torch.cat([blogp, s_pred[:, None]], dim=1))
        blogp, s_pred = records[:, :big_l], records[:, big_l]
    return RolloutBatch(prefix=prefix, next_tokens=next_tokens, thoughts=thoughts, mask=mask,
                        behaviour_logp=blogp, closed=closed, s_pred=s_pred, group_size=g,
                        decode_steps=steps)
