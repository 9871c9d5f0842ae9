"""The RLP training loop (RLP.md, Algorithm 1), readable top to bottom.

    for each step:
      1-2.  draw B contexts (x_<t, x_t) from the packed stream              (data.stream)
      3.    sample G thoughts per context from pi_theta_old = pi_theta      (rlp.rollout)
      4-5.  S_ema = log p_phi(x_t | x_<t)  (EMA teacher, lazy init step 1)  (rlp.ema)
      6.    S_pred = log p_theta(x_t | x_<t, c), read at the rollout         (rlp.rollout)
      7-8.  r = S_pred - S_ema;  A = G/(G-1) (r - mean_G r)                  (rlp.losses)
      9.    clipped surrogate over thought tokens, normalised per thought    (rlp.losses)
      10.   backward + optimizer step: DeepSpeed's own at PP=1; megatron's 1F1B schedule over the
            micro-batches and DeepSpeed's reduction/step with pipeline stages (PP > 1)
      11.   EMA update phi <- tau phi + (1 - tau) theta
      log, checkpoint

``objective=ntp`` runs plain next-token training on the same data and model (the CPT baseline).
Set-up (process groups, model, engine, teacher, data, resume) lives below the loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from rlp_dist.config.schema import ConfigError, RootConfig, to_dict, validate
from rlp_dist.data.stream import ContextSampler, make_sampler
from rlp_dist.data.tokenizer import ThoughtTokens
from rlp_dist.distributed.parallel import ParallelDims
from rlp_dist.models import head
from rlp_dist.models.documents import DocumentLayout
from rlp_dist.rlp.ema import EmaTeacher
from rlp_dist.rlp.losses import clipped_surrogate, group_advantages, ntp_loss, rewards
from rlp_dist.rlp.rollout import RolloutBatch, RolloutGroups, RolloutSettings, sample_thoughts
from rlp_dist.rlp.shared_prefix import policy_forward, policy_logprobs, supports, thought_logprobs_from


EXIT_NONFINITE = 3  # train.on_nonfinite=stop (ops.guard)


@dataclass
class Trainer:
    cfg: RootConfig
    dims: ParallelDims
    engine: Any  # deepspeed.DeepSpeedEngine around the student
    teacher: Optional[EmaTeacher]
    sampler: ContextSampler
    markers: ThoughtTokens
    tokenizer: Any
    metrics: Any
    ckpt: Any
    step: int = 0
    # (RolloutBatch, S_ema (b,) or None) of the step's last micro-batch, set by rlp_step: the
    # sample-thoughts table (logging.sample_every) reads it.
    last_rollout: Optional[tuple] = None
    flops: Any = None  # rlp_dist.perf.flops.FlopMeter: analytic FLOPs so far, all GPUs; checkpointed

    def __post_init__(self):
        if self.flops is None:
            from rlp_dist.perf.flops import FlopMeter

            cuda = self.dims.device.type == "cuda"
            self.flops = FlopMeter(self.cfg, self.dims.world_size,
                                   torch.cuda.get_device_name(self.dims.device) if cuda else None)

    def client_state(self) -> dict:
        """What the checkpoint's client state restores: step, data position, FLOP meter, config."""
        return {"step": self.step, "sampler": self.sampler.state_dict(), "flops": self.flops.state_dict(),
                "config": to_dict(self.cfg)}

    def load_client_state(self, client: dict) -> None:
        self.step = int(client["step"])
        self.sampler.load_state_dict(client["sampler"])
        if "flops" in client:  # checkpoints written before the FLOP meter start from 0
            self.flops.load_state_dict(client["flops"])


def train(cfg: RootConfig) -> Trainer:
    from rlp_dist.eval.loop import maybe_eval
    from rlp_dist.logging.samples import log_samples
    from rlp_dist.logging.system import system_metrics
    from rlp_dist.ops import preemption

    from rlp_dist.checkpoint.manager import preflight
    from rlp_dist.checkpoint.safe_load import INIT_FLAG, guarded_loads
    from rlp_dist.ops.guard import HeldTeacher, NonfiniteGuard, NonFiniteStop, Policy

    from rlp_dist.distributed.parallel import env_rank_info

    validate(cfg, env_rank_info()[1])  # tp x pp against the launched ranks (torchrun or srun), before any group
    preflight(cfg.run.dir, cfg.checkpoint.resume, cfg.checkpoint.overwrite, cfg.model.init_from, to_dict(cfg)["model"])
    # model.init_from's files are unpickled weights-only (checkpoint.safe_load) unless model.trust_checkpoint.
    with guarded_loads(INIT_FLAG, cfg.model.trust_checkpoint):
        tr = setup(cfg)
    step_fn = rlp_step if cfg.objective == "rlp" else ntp_step
    ck, lg = cfg.checkpoint, cfg.logging
    saved_at = tr.step  # a resumed step is already checkpointed
    # Non-finite steps (ops.guard): the engine's backward/step are wrapped so that a bad step's update is
    # discarded on every rank, and its EMA update is held; the policy then skips (counted) or stops.
    nonfinite = NonfiniteGuard(tr.engine, tr.dims.device, tr.dims.world_size > 1)
    if tr.teacher is not None:
        nonfinite.on_discard = lambda: setattr(tr, "teacher", HeldTeacher(tr.teacher))
    last_good = tr.ckpt.latest_tag
    policy = Policy(cfg, nonfinite, lambda: str(tr.ckpt.dir / last_good()) if last_good() else None,
                    tr.metrics.info if tr.dims.is_rank0 else (lambda msg: None))
    stop = None
    while tr.step < cfg.train.steps:
        # SIGUSR1/SIGTERM (ops.preemption): one MAX all-reduce so every rank stops after the same step,
        # also when only one rank was signalled or the signal came during start-up.
        stop = preemption.agreed_stop()
        if stop:
            break
        tr.step += 1
        t0 = time.perf_counter()
        m = step_fn(tr)
        m["perf/step_s"] = _elapsed(t0, tr.dims.device)
        if isinstance(tr.teacher, HeldTeacher):
            tr.teacher = tr.teacher._teacher  # the discarded step is over
        try:
            policy.after_step(tr.step, m)
        except NonFiniteStop as e:
            tr.metrics.log(tr.step, m)
            if tr.dims.is_rank0:
                print(f"error: {e}", file=sys.stderr, flush=True)
            tr.metrics.close()
            raise SystemExit(EXIT_NONFINITE) from None
        if tr.step % lg.log_every == 0 or tr.step == cfg.train.steps:
            m.update(system_metrics(tr.dims.device))
            tr.metrics.log(tr.step, m)
        maybe_eval(tr)  # eval.every: think vs no-think on eval.data, logs eval/* (rlp_dist.eval.loop)
        if lg.sample_every and tr.step % lg.sample_every == 0 and tr.last_rollout is not None:
            log_samples(tr.metrics, tr.step, tr.tokenizer, tr.markers, tr.last_rollout)
        if (ck.every and tr.step % ck.every == 0) or (ck.save_final and tr.step == cfg.train.steps):
            save(tr)
            saved_at = tr.step
    if stop:
        if tr.step > saved_at:
            save(tr)  # atomic: a crash during it leaves the previous checkpoint as latest
        tr.metrics.info(f"{stop}: stopped after step {tr.step} with a checkpoint; "
                        f"{'requeueing' if stop == 'SIGUSR1' else 'exiting without requeue'}")
        tr.metrics.close()
        preemption.finish(stop, tr.dims.rank, log=tr.metrics.info)  # raises SystemExit(128 + signal)
    tr.metrics.close()
    return tr


def rlp_step(tr: Trainer) -> dict[str, float]:
    """One optimizer step of Algorithm 1 over this rank's share of B contexts."""
    cfg, r, dims, engine = tr.cfg, tr.cfg.rlp, tr.dims, tr.engine
    t_step = time.perf_counter()
    b_local = r.contexts_per_step // dims.dp
    mb = min(r.contexts_per_micro_batch, b_local)
    k = r.contexts_per_document
    # 4. Lazy init of the EMA teacher on the first step: phi <- theta.
    if not tr.teacher.initialized:
        tr.teacher.initialize(engine.module)
    # 2. Draw B contexts (x_<t, x_t) — or, with rlp.positions=entropy, B/keep candidates of which the
    # teacher keeps those it is least sure about (already scored: S_ema comes with them).
    drawn = draw_by_entropy(tr, mb) if r.positions == "entropy" else draw_contexts(tr, r.contexts_per_step)
    contexts, next_tokens, lengths, branches = drawn.contexts, drawn.next_tokens, drawn.lengths, drawn.branches
    gen = step_generator(cfg.train.seed, tr.step, dims.dp_rank, dims.device)
    score_teacher = r.teacher_scoring == "every_step" or tr.step % r.teacher_scoring_k == 0 or tr.step == 1
    acc = StepStats()
    # 1, 3, 6. theta_old = theta (no update inside a step): G thoughts per context with their
    # behaviour log-probs, and S_pred read where the closing marker is consumed. With PP > 1 the
    # rollout is pipelined and every stage returns the same RolloutBatch.
    t0 = time.perf_counter()
    rows = mb // k  # contexts (k = 1) or documents per micro-batch
    settings, groups = RolloutSettings.from_config(r), RolloutGroups.from_dims(dims)
    rollouts = [sample_thoughts(engine.module, contexts[i:i + rows],
                                None if next_tokens is None else next_tokens[i:i + rows], tr.markers, settings, gen,
                                groups, branches, None if lengths is None else lengths[i:i + rows])
                for i in range(0, contexts.shape[0], rows)]
    acc.rollout_s = _elapsed(t0, dims.device)
    # 5. S_ema with no thought, from the EMA teacher (no grad), on every pipeline stage.
    s_ema = drawn.s_ema
    if s_ema is None and score_teacher:
        s_ema = teacher_scores(tr.teacher, contexts, next_tokens, branches, rows, lengths)  # (b_local,)
    scored = []
    for ro, i in zip(rollouts, range(0, b_local, mb)):
        s_pred = ro.s_pred.view(-1, r.group_size)  # (b, G)
        s_ema_b = s_ema[i:i + mb] if s_ema is not None else None  # (b,)
        # 7-8. Information-gain reward and group-relative advantage. S_ema is constant within a
        # group, so it cancels in A: on steps without teacher scoring A comes from S_pred alone.
        reward = rewards(s_pred, s_ema_b) if s_ema_b is not None else None
        adv = group_advantages(reward if reward is not None else s_pred).reshape(-1)  # (b*G,)
        scored.append(ScoredBatch(ro, s_pred, s_ema_b, reward, adv))
    if r.shuffle_advantages:  # the control experiment: same advantages, assigned to random thoughts
        scored = shuffled_advantages(scored, gen)
    # 9-11. Clipped surrogate over the thought tokens (gradients flow only through them), backward
    # over the step's micro-batches, optimizer step, EMA update (see policy_updates).
    t0 = time.perf_counter()
    pg = PolicyGradient(r, dims.tp_group if dims.tp > 1 else None, engine.module, varied_prefixes=lengths is not None)
    outs, updated = policy_updates(tr, scored, pg)
    acc.train_s = _elapsed(t0, dims.device)
    for sb, out in zip(scored, outs):
        acc.add(sb, out)
    tr.last_rollout = (scored[-1].rollout, scored[-1].s_ema)  # the sample-thoughts table (logging.sample_every)
    m = acc.reduce(dims)
    m.update(drawn.metrics)
    m.update({"ema/updated": float(updated), "optim/lr": engine.get_lr()[0], "optim/grad_norm": _grad_norm(engine)})
    m.update(flop_metrics(tr, t_step, thought_len_mean=m["rlp/thought_len_mean"], score_teacher=score_teacher))
    if updated:
        m.update(tr.teacher.metrics())  # ema/update_s, ema/update_collectives (counted)
    if score_teacher:
        m["ema/param_gap"] = float(tr.teacher.param_gap(engine.module))
    return m


def ntp_step(tr: Trainer) -> dict[str, float]:
    """Plain next-token training on the same stream (the compute-matched CPT baseline)."""
    n, dims, engine = tr.cfg.ntp, tr.dims, tr.engine
    t_step = time.perf_counter()
    local = n.sequences_per_step // dims.dp
    mb = min(n.sequences_per_micro_batch, local)
    # data.document_boundaries=respect: each window comes with the document index of its input tokens
    # (B, S); a DocumentLayout confines attention, RoPE positions and the Mamba states to each document.
    respect = tr.cfg.data.document_boundaries == "respect"
    windows, doc_ids = tr.sampler.next_windows(n.sequences_per_step, n.seq_len, documents=True)  # (local, S+1), (local, S)
    windows, doc_ids = windows.to(dims.device), doc_ids.to(dims.device)
    eos = tr.markers.eos_id if tr.markers is not None else None

    tp_group = dims.tp_group if dims.tp > 1 else None

    def forward(model, batch):
        w, d = batch
        ids = w[:, :-1]  # (mb, S)
        with head.hidden_output(engine.module):  # the last stage returns final-norm hidden (mb, S, H)
            if not respect:
                return model(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids), None)
            layout = DocumentLayout.from_doc_ids(d)
            return model(ids, layout.positions, None, packed_seq_params=layout)

    def loss(batch, hidden):
        w = batch[0]
        logp = head.token_logprobs(engine.module, hidden, w[:, 1:], 1.0, tp_group)  # (mb, S) fp32, fused
        # data.eod_mask_loss (Megatron's): no loss where the input is the EOS (its target opens the next document)
        keep = (w[:, :-1] != eos) if tr.cfg.data.eod_mask_loss and eos is not None else torch.ones_like(logp)
        value = ntp_loss(logp, keep)
        return value, {"loss": value.detach().clone()}  # clone: the schedule divides `value` in place

    batches = list(zip(windows.split(mb), doc_ids.split(mb)))
    outs = update(tr, batches, forward, loss, lambda b: (n.seq_len, b[0].shape[0]))
    loss_v = _last_stage_mean([o["loss"] if o is not None else None for o in outs], dims)
    m = {"ntp/loss": loss_v, "optim/lr": engine.get_lr()[0], "optim/grad_norm": _grad_norm(engine),
         "perf/tokens_per_step": float(n.sequences_per_step * n.seq_len)}
    m.update(flop_metrics(tr, t_step))
    return m


def flop_metrics(tr: Trainer, t0: float, **step_args) -> dict[str, float]:
    """perf/flops_step and the running perf/flops_total (analytic, all GPUs: rlp_dist.perf.flops), the
    achieved perf/tflops_per_s per GPU over the step's wall time, perf/mfu on a GPU of known peak
    (logging.peak_tflops overrides), and perf/cpt_equivalent_tokens (the paper's T_flop) for RLP."""
    return tr.flops.step(_elapsed(t0, tr.dims.device), **step_args)


@dataclass
class ScoredBatch:
    """One micro-batch after steps 3-8: its rollouts, scores, rewards and advantages (b contexts)."""

    rollout: RolloutBatch
    s_pred: torch.Tensor  # (b, G) log p_theta(x_t | x_<t, c)
    s_ema: Optional[torch.Tensor]  # (b,) log p_phi(x_t | x_<t); None on steps without teacher scoring
    reward: Optional[torch.Tensor]  # (b, G) S_pred - S_ema; None without S_ema
    advantages: torch.Tensor  # (b*G,) group-relative, detached


@dataclass
class DrawnContexts:
    """Step 2's output: this rank's contexts in rollout order."""

    contexts: torch.Tensor  # (b_local, C) contexts, or (b_local/k, C+1) document windows with branches
    next_tokens: Optional[torch.Tensor]  # (b_local,) x_t; None with branches (x_t = document[t_j])
    lengths: Optional[torch.Tensor] = None  # (b_local,) context lengths when they differ (right-padded)
    branches: Optional[tuple[int, ...]] = None  # t_0 < .. < t_{k-1}: k contexts per document window
    s_ema: Optional[torch.Tensor] = None  # (b_local,) when already scored (rlp.positions=entropy)
    metrics: dict = dataclasses.field(default_factory=dict)


def draw_contexts(tr: Trainer, n: int) -> DrawnContexts:
    """``n`` contexts (global); every DP rank draws the same global batch and keeps its slice. With k
    contexts per document: n/k document windows, contexts x_<t_j branching from each (rows d*k + j).
    data.document_boundaries=respect: a context is the prefix of x_t's own document (its last <= C
    tokens, t at least rlp.min_context into it): right-padded, with per-row lengths through the rollout,
    S_ema and the training forward. With k per document the window lies inside one document."""
    r, dev = tr.cfg.rlp, tr.dims.device
    k, branches = r.contexts_per_document, (r.branch_points() if r.contexts_per_document > 1 else None)
    respect = tr.cfg.data.document_boundaries == "respect"
    if branches is not None:
        windows = (tr.sampler.next_document_windows(n // k, r.context_len, max(0, r.min_context - branches[0]))
                   if respect else tr.sampler.next_windows(n // k, r.context_len))  # respect: x_{t_0} >= min_context in
        return DrawnContexts(windows.to(dev), None, branches=branches)  # (b/k, C+1)
    if respect:
        contexts, lengths, next_tokens = tr.sampler.next_prefix_contexts(n, r.context_len, r.min_context)
        return DrawnContexts(contexts.to(dev), next_tokens.to(dev), lengths.to(dev))
    contexts, next_tokens = tr.sampler.next_contexts(n, r.context_len)
    return DrawnContexts(contexts.to(dev), next_tokens.to(dev))  # (b_local, C), (b_local,)


def draw_by_entropy(tr: Trainer, mb: int) -> DrawnContexts:
    """``rlp.positions=entropy``: think where the next token is hard. Draw about B / entropy_keep candidate
    contexts (a multiple of the micro-batch per rank), score them all with the EMA teacher — S_ema and the
    entropy of p_phi(. | x_<t) in one fused pass — and keep this rank's b_local of highest entropy, with
    their S_ema (as RPT filters tokens). Logged: mean entropy of the kept and of the dropped candidates.
    The teacher then runs on every step (its forward over the candidates is the selection)."""
    import math

    r, dims = tr.cfg.rlp, tr.dims
    b_local = r.contexts_per_step // dims.dp
    per_rank = math.ceil(b_local / r.entropy_keep / mb) * mb  # candidates, whole teacher micro-batches
    cand = draw_contexts(tr, per_rank * dims.dp)
    s_ema, ent = tr.teacher.score(cand.contexts, cand.next_tokens, mb, lengths=cand.lengths, return_entropy=True)
    keep = torch.topk(ent, b_local).indices.sort().values  # (b_local,): identical on the TP/PP ranks
    dropped = torch.ones_like(ent, dtype=torch.bool).index_fill_(0, keep, False)
    # per_rank > b_local <=> some candidate was dropped: known on the host, no device sync to ask
    kept_mean, drop_mean = ent[keep].mean(), (ent[dropped].mean() if per_rank > b_local else ent.new_zeros(()))
    stats = torch.stack([kept_mean, drop_mean])
    if dims.dp > 1:
        dist.all_reduce(stats, group=dims.dp_group)
        stats /= dims.dp
    kept_mean, drop_mean = stats.tolist()
    pick = (lambda t: None if t is None else t[keep])
    return DrawnContexts(cand.contexts[keep], pick(cand.next_tokens), pick(cand.lengths), s_ema=s_ema[keep],
                         metrics={"rlp/entropy_kept_mean": kept_mean, "rlp/entropy_dropped_mean": drop_mean})


def teacher_scores(teacher: EmaTeacher, contexts: torch.Tensor, next_tokens: Optional[torch.Tensor],
                   branches: Optional[tuple[int, ...]], rows: int,
                   lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """S_ema of the step's contexts (b_local,), in rollout order. Without branches: contexts (b, C)
    and x_t (b,); with ``lengths`` (b,) the contexts are right-padded document prefixes of those
    lengths. With branches: documents (D, C+1) holding k contexts each, row d*k + j = context
    x_<t_j with x_t = document[t_j], all k scored by one teacher forward over the document (``rows``
    documents per micro-batch)."""
    return teacher.score(contexts, next_tokens, rows, positions=branches, lengths=lengths)  # (b,) or (D*k,)


def policy_updates(tr: Trainer, scored: list[ScoredBatch], pg: "PolicyGradient") -> tuple[list, bool]:
    """Steps 9-11 over one rollout batch: ``rlp.update_epochs`` passes over the step's micro-batches, each
    cut into ``rlp.mini_batches_per_epoch`` optimizer steps; the EMA update follows every optimizer step
    (local arithmetic on ZeRO-3 shards, 0 collectives). The defaults (1, 1) are Algorithm 1: one on-policy
    step, importance ratios exactly 1. Later updates reuse the rollout's behaviour log-probs, so the ratios
    move away from 1 and the clipping acts (PPO/GRPO-style reuse).

    Each context's G thoughts are split over ``rlp.thought_splits()`` micro-batches (exact: the advantages
    are fixed before any backward). Returns the last epoch's loss metrics per ScoredBatch and whether the
    EMA teacher was updated."""
    r = tr.cfg.rlp
    parts = [split_thoughts(sb, r.thoughts_per_micro_batch) for sb in scored]
    flat = [p for ps in parts for p in ps]
    per_update = len(flat) // r.mini_batches_per_epoch
    if per_update * r.mini_batches_per_epoch != len(flat):
        raise ConfigError(f"rlp.mini_batches_per_epoch={r.mini_batches_per_epoch} does not divide this rank's "
                          f"{len(flat)} micro-batches per step; use a divisor of {len(flat)}")
    updated, outs = False, []
    for _ in range(r.update_epochs):
        outs = []
        for i in range(0, len(flat), per_update):
            outs += update(tr, flat[i:i + per_update], pg.forward, pg.loss, pg.shape)
            updated = tr.teacher.update(tr.engine.module, tr.step) or updated  # 11. after every optimizer step
    return _merge_parts(outs, [len(ps) for ps in parts]), updated


def split_thoughts(sb: ScoredBatch, per: int) -> list[ScoredBatch]:
    """One ScoredBatch as G/per micro-batches of ``per`` thoughts of every context (same prefixes). The
    loss of each is the mean over its thoughts and DeepSpeed averages over the (equal-sized) micro-batches,
    so the step's gradient is the unsplit one; activations no longer grow with G."""
    ro = sb.rollout
    g = ro.group_size
    if not per or per == g:
        return [sb]
    b = ro.prefix.shape[0]
    parts = []
    for j in range(0, g, per):
        rows = (torch.arange(b, device=ro.thoughts.device)[:, None] * g + j
                + torch.arange(per, device=ro.thoughts.device)).reshape(-1)  # (b*per,)
        part = dataclasses.replace(ro, thoughts=ro.thoughts[rows], mask=ro.mask[rows],
                                   behaviour_logp=ro.behaviour_logp[rows], closed=ro.closed[rows],
                                   s_pred=ro.s_pred[rows], group_size=per)
        parts.append(ScoredBatch(part, sb.s_pred[:, j:j + per], sb.s_ema,
                                 None if sb.reward is None else sb.reward[:, j:j + per],
                                 sb.advantages.view(b, g)[:, j:j + per].reshape(-1)))
    return parts


def _merge_parts(outs: list, sizes: list[int]) -> list:
    """Per-split loss metrics -> per-ScoredBatch means (None stays None: other pipeline stages)."""
    merged, i = [], 0
    for n in sizes:
        chunk = outs[i:i + n]
        i += n
        merged.append(None if chunk[0] is None else {k: torch.stack([o[k] for o in chunk]).mean() for k in chunk[0]})
    return merged


def shuffled_advantages(scored: list[ScoredBatch], gen: torch.Generator) -> list[ScoredBatch]:
    """``rlp.shuffle_advantages``: the step's advantages permuted over its thoughts (keyed generator:
    identical on the TP ranks of a replica)."""
    adv = torch.cat([sb.advantages for sb in scored])  # (b_local*G,)
    perm = torch.randperm(adv.numel(), generator=gen, device=gen.device)
    out = adv[perm].split([sb.advantages.numel() for sb in scored])
    return [dataclasses.replace(sb, advantages=a) for sb, a in zip(scored, out)]


class PolicyGradient:
    """Step 9 on one ScoredBatch, split at the pipeline boundary:
    :meth:`forward` is the model call every stage runs (its stage's part), :meth:`loss` the last
    stage's log-probs (fp32, tempered, vocab-parallel, by the fused op from hidden states) and the
    clipped surrogate.

    With ``rlp.shared_prefix`` (where ``shared_prefix.supports`` the model) each context is one packed
    row [prefix | its thoughts] whose thoughts branch from one prefix computation (a BranchLayout through
    the layer specs' own attention and Mamba mixers); otherwise the prefix is replicated per thought.
    The model hands on final-norm hidden states, never logits.
    """

    def __init__(self, r, tp_group, module: torch.nn.Module, varied_prefixes: bool = False):
        self.r, self.tp_group, self.module = r, tp_group, module
        self.last_stage = getattr(module, "post_process", True)
        self.staged = not (getattr(module, "pre_process", True) and self.last_stage)  # PP > 1
        # Prefixes of k lengths (several contexts per document; document prefixes of their own lengths,
        # ``varied_prefixes``) pack as one forward per length; a pipeline
        # schedule runs one forward of one shape per micro-batch, so PP > 1 replicates them instead.
        self.packed = r.shared_prefix and supports(module) and not (self.staged and (r.contexts_per_document > 1
                                                                                      or varied_prefixes))

    def shape(self, sb: ScoredBatch) -> tuple[int, int]:
        """(seq, batch) of one micro-batch's activations: the shape sent between stages."""
        ro = sb.rollout
        big_l, p = ro.thoughts.shape[1], ro.prefix.shape[1]
        if self.packed:
            return p + ro.group_size * (big_l - 1), ro.prefix.shape[0]
        return p + big_l - 1, ro.thoughts.shape[0]

    def forward(self, call, sb: ScoredBatch) -> torch.Tensor:
        """call: the raw module (PP > 1, under the schedule) or the DeepSpeed engine (PP=1).
        PP=1: the thought log-probs (N, L) fp32. PP > 1: the stage's output (hidden states; the last
        stage's are final-norm (rows, S, H), turned into log-probs in :meth:`loss`)."""
        if self.staged:
            return policy_forward(sb.rollout, self.module, call, self.packed)
        return policy_logprobs(sb.rollout, self.module, call, self.packed, self.r.temperature, self.tp_group)

    def loss(self, sb: ScoredBatch, out) -> tuple[torch.Tensor, dict]:
        ro = sb.rollout
        logp = (thought_logprobs_from(ro, self.module, out, self.packed, self.r.temperature, self.tp_group)
                if self.staged else out)  # (N, L) fp32
        value, lm = clipped_surrogate(logp, ro.behaviour_logp, sb.advantages, ro.mask, self.r.clip_eps_low,
                                      self.r.clip_eps_high)
        return value, {"loss": value.detach().clone(), **lm}  # clone: the schedule divides `value` in place


def update(tr: Trainer, batches: list, forward, loss, shape) -> list[Optional[dict]]:
    """Step 10: backward over the step's micro-batches and one optimizer step. Returns each
    micro-batch's loss metrics (None on stages other than the last).

    PP=1: DeepSpeed's own backward per micro-batch through the engine (ZeRO-3 needs it); the engine
    averages over its gradient-accumulation steps and steps at the boundary. PP > 1 (ZeRO-0/1):
    megatron's 1F1B schedule over all micro-batches on the raw module (it averages over them),
    gradients left in ``p.grad``; then the tied embedding copies are summed over the first and last
    stage, and DeepSpeed reduces over DP, clips on the global norm (mpu: TP x PP group) and steps —
    the pattern measured in STACK.md. shape(batch) -> (S, B): the dims of the activations a micro-batch
    sends between stages, one shape for the whole schedule.
    """
    engine, dims = tr.engine, tr.dims
    if dims.pp == 1:
        outs = []
        for batch in batches:
            value, metrics = loss(batch, forward(engine, batch))
            engine.backward(value)
            engine.step()
            outs.append(metrics)
        return outs
    from rlp_dist.models.grads import reduce_grads
    from rlp_dist.models.runner import run_pipeline

    shapes = {shape(b) for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"pipeline stages exchange activations of one shape per schedule, but this step's "
                         f"micro-batches have (seq, rows) {sorted(shapes)}: every micro-batch of a step needs the "
                         f"same number of rows and the same prefix length and thought cap")
    (seq, rows), = shapes
    engine.set_gradient_accumulation_boundary(False)
    outs = run_pipeline(engine.module, batches, forward, loss, seq, rows, forward_only=False)
    engine.set_gradient_accumulation_boundary(True)
    # Not a gradient hook: the two stages finish their backward at different moments.
    reduce_grads(engine.module, tied_pp=bool(getattr(engine.module, "share_embeddings_and_output_weights", False)))
    engine.allreduce_gradients()
    engine.step()
    return outs if dims.is_last_stage else [None] * len(batches)


def _last_stage_mean(values: list, dims: ParallelDims) -> float:
    """Mean of per-micro-batch scalars held by the last pipeline stage, over micro-batches and DP:
    one broadcast over PP (from the last stage) and one all-reduce over DP."""
    v = (torch.stack(values).float().mean() if values[0] is not None
         else torch.zeros((), dtype=torch.float32, device=dims.device))
    if dims.pp > 1:
        dist.broadcast(v, src=dist.get_global_rank(dims.pp_group, dims.pp - 1), group=dims.pp_group)
    if dims.dp > 1:
        dist.all_reduce(v, group=dims.dp_group)
        v /= dims.dp
    return float(v)


class StepStats:
    """Per-micro-batch means accumulated over a step, averaged over micro-batches and DP ranks."""

    KEYS = ("rlp/loss", "rlp/s_pred_mean", "rlp/s_ema_mean", "rlp/reward_mean", "rlp/reward_std",
            "rlp/gain_pos_frac", "rlp/adv_abs_mean", "rlp/clip_frac", "rlp/ratio_mean", "rlp/approx_kl",
            "rlp/thought_len_mean", "rlp/closed_frac")

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.tokens = 0.0
        self.rollout_s = 0.0
        self.train_s = 0.0
        self.has_ema = True

    def add(self, sb: ScoredBatch, out: Optional[dict]) -> None:
        """out: the micro-batch's loss metrics; None on pipeline stages other than the last."""
        # Everything stays on the device: no host sync per micro-batch (one at reduce()).
        ro, s_pred, s_ema, reward = sb.rollout, sb.s_pred, sb.s_ema, sb.reward
        nan = torch.full((), float("nan"), device=s_pred.device)
        self.has_ema = self.has_ema and s_ema is not None
        lengths = ro.lengths
        self.tokens = self.tokens + lengths.sum().float()
        out = out or {k: nan for k in ("loss", "clip_frac", "ratio_mean", "approx_kl")}
        vals = [out["loss"], s_pred.mean(),
                s_ema.mean() if s_ema is not None else nan,
                reward.mean() if reward is not None else nan,
                reward.std() if reward is not None else nan,
                (reward > 0).float().mean() if reward is not None else nan,
                sb.advantages.abs().mean(), out["clip_frac"], out["ratio_mean"], out["approx_kl"],
                lengths.float().mean(), ro.closed.float().mean()]
        self.rows.append(torch.stack([v.detach().float().reshape(()) for v in vals]))

    def reduce(self, dims: ParallelDims) -> dict[str, float]:
        # One all-reduce per step carries every metric plus the token count (ranks in a TP group
        # hold identical values; reducing over DP only is exact). The vector lives on the device:
        # NCCL reduces CUDA tensors only.
        local = torch.stack(self.rows).mean(0)
        extra = torch.stack([torch.as_tensor(self.tokens, dtype=torch.float32, device=local.device),
                             torch.tensor(self.rollout_s, dtype=torch.float32, device=local.device)])
        vec = torch.cat([local, extra])
        if dims.pp > 1:
            # The loss metrics exist on the last stage; everything else is identical on all stages
            # (same rollouts, S_ema broadcast by the teacher): take the last stage's vector.
            dist.broadcast(vec, src=dist.get_global_rank(dims.pp_group, dims.pp - 1), group=dims.pp_group)
        if dims.dp > 1:
            dist.all_reduce(vec, group=dims.dp_group)
            vec[: len(self.KEYS)] /= dims.dp
            vec[-1] /= dims.dp
        vals = vec.tolist()  # the step's one host sync for metrics
        m = dict(zip(self.KEYS, vals[: len(self.KEYS)]))
        if not self.has_ema:
            for k in ("rlp/s_ema_mean", "rlp/reward_mean", "rlp/reward_std", "rlp/gain_pos_frac"):
                m.pop(k)
        tokens, rollout_s = vals[-2], vals[-1]
        m.update({"perf/thought_tok_per_s": tokens / max(rollout_s, 1e-9), "perf/rollout_s": rollout_s,
                  "perf/train_s": self.train_s, "perf/thought_tokens": tokens})
        return m


def step_generator(seed: int, step: int, dp_rank: int, device: torch.device) -> torch.Generator:
    """Sampling randomness keyed by (seed, step, dp_rank): the TP ranks of one replica draw the same
    tokens, and a resumed run samples exactly what the uninterrupted one would have."""
    h = hashlib.sha256(f"{seed}:{step}:{dp_rank}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
    return g


def _elapsed(t0: float, device: torch.device) -> float:
    """Seconds since ``t0`` once the device has finished the queued work (CUDA runs asynchronously;
    without the sync a timer reads the launch time, not the compute time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _grad_norm(engine) -> float:
    gn = engine.get_global_grad_norm()
    return float(gn) if gn is not None else float("nan")


# --------------------------------------------------------------------------------------------------
# Set-up: process groups -> tokenizer and data -> student (+ DeepSpeed) -> EMA teacher -> resume.
# --------------------------------------------------------------------------------------------------


def setup(cfg: RootConfig) -> Trainer:
    from rlp_dist.checkpoint.manager import CheckpointManager
    from rlp_dist.data.stream import build_stream, resolve_files
    from rlp_dist.data.tokenizer import load_tokenizer, thought_tokens
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.logging.metrics import Metrics

    # Cheap checks first, so a bad config or path fails before process groups and models exist.
    apply_flops_budget(cfg)
    files = resolve_files(cfg.data.path)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    r = cfg.rlp
    markers = thought_tokens(tokenizer, r.thought_open, r.thought_close, r.thought_prompt, r.add_thought_tokens)
    dims = init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.backend, cfg.train.seed,
                            cfg.parallel.init_timeout_s)
    validate(cfg, dims.world_size)
    torch.manual_seed(cfg.train.seed)
    vocab = max(cfg.model.vocab_size, len(tokenizer))
    stream = build_stream(files, tokenizer, markers.eos_id, cfg.data.text_key, cfg.data.append_eos)
    if int(stream.max()) >= vocab:
        raise ConfigError(f"data: token id {int(stream.max())} >= vocabulary size {vocab}; "
                         f"the tokenizer does not match model.vocab_size")
    sampler = make_sampler(stream, cfg, dims.dp_rank, dims.dp, markers.eos_id)  # document starts: .idx or EOS scan

    student = build_student(cfg, vocab)
    engine = wrap_deepspeed(student, cfg, dims)
    teacher = None
    if cfg.objective == "rlp":
        # Same preset and TP/PP shard as the student, ZeRO-3 partitioned over DP (rlp.ema).
        teacher = EmaTeacher(build_student(cfg, vocab, load_weights=False), r.ema_decay, r.ema_update_every,
                             dims, cfg.train.dtype)
    ckpt = CheckpointManager(cfg.run.dir, dims.rank)
    tr = Trainer(cfg, dims, engine, teacher, sampler, markers, tokenizer, None, ckpt)
    if cfg.checkpoint.resume:
        resume(tr)
    tr.metrics = Metrics(cfg.run.dir, dims.is_rank0, cfg.train.steps, tr.step, cfg.logging.wandb_mode,
                         cfg.logging.wandb_project, cfg.logging.wandb_entity, cfg.run.name, to_dict(cfg),
                         cfg.logging.progress)
    tr.metrics.info(f"rlp-dist: {cfg.objective} on {cfg.model.name} | world {dims.world_size} "
                    f"(tp {dims.tp} pp {dims.pp} dp {dims.dp}) zero {cfg.parallel.zero_stage} | "
                    f"vocab {vocab} | stream {len(stream):,} tokens | start step {tr.step}")
    from rlp_dist.perf.plan import startup_line

    tr.metrics.info(startup_line(cfg, dims.world_size))  # rlp-dist plan's prediction for this job
    return tr


def apply_flops_budget(cfg: RootConfig) -> None:
    """``train.flops_budget`` (objective=ntp): the compute-matched CPT baseline. An NTP step's FLOPs are
    fixed by the config (rlp_dist.perf.flops), so the budget — a number, or an RLP run directory's last
    ``perf/flops_total`` — becomes ``train.steps = ceil(budget / flops per step)``; the run stops there
    with its final checkpoint and resumes like any other."""
    import json
    import math
    import pathlib

    from rlp_dist.perf import flops

    budget = cfg.train.flops_budget
    if budget in (None, ""):
        return
    if cfg.objective != "ntp":
        raise ConfigError(f"train.flops_budget={budget!r} is for the CPT baseline (objective=ntp); an RLP run "
                          f"reports its own perf/flops_total")
    text = str(budget)
    try:
        total = float(text)
    except ValueError:
        metrics = pathlib.Path(text) / "metrics.jsonl"
        lines, totals = (metrics.read_text().splitlines() if metrics.is_file() else []), []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except ValueError:  # a torn last line of a killed run is skipped; damage elsewhere is an error
                if n == len(lines):
                    continue
                raise ConfigError(f"train.flops_budget={text!r}: {metrics} line {n} is not JSON; repair the "
                                  f"file or pass the FLOPs as a number (e.g. 3.2e18)") from None
            value = row.get("perf/flops_total") if isinstance(row, dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                totals.append(value)
        if not totals:
            raise ConfigError(f"train.flops_budget={text!r}: neither a number nor a run directory with "
                              f"perf/flops_total in metrics.jsonl; pass the FLOPs (e.g. 3.2e18) or the RLP run's "
                              f"run.dir") from None
        total = float(totals[-1])
    if not (total > 0 and math.isfinite(total)):
        raise ConfigError(f"train.flops_budget={text!r} must be a positive, finite number of FLOPs (e.g. 3.2e18)")
    per_step = flops.step_flops(cfg)["total"]
    cfg.train.steps = max(1, math.ceil(total / per_step))
    print(f"rlp-dist: train.flops_budget {total:.4g} FLOPs / {per_step:.4g} per NTP step -> train.steps="
          f"{cfg.train.steps}", file=sys.stderr, flush=True)


def build_student(cfg: RootConfig, vocab: int, load_weights: bool = True) -> torch.nn.Module:
    """This rank's shard of the backbone, with weights from model.init_from / model.hf_dir if set."""
    import dataclasses

    from rlp_dist.models.builder import build_model

    mcfg = dataclasses.replace(cfg.model, vocab_size=vocab)
    model = build_model(mcfg)
    if not load_weights:
        return model
    if cfg.model.init_from:  # [parallelism] a checkpoint saved at any TP/PP/DP, sliced for this rank
        from rlp_dist.checkpoint.manager import consolidated_state_dict
        from rlp_dist.models.hf import _ranks

        tp_rank, tp, _ = _ranks()
        load_resized(model, consolidated_state_dict(cfg.model.init_from, trust=cfg.model.trust_checkpoint),
                     mcfg, tp, tp_rank)
    if cfg.model.hf_dir:
        from rlp_dist.models import hf  # the backbones issue's importer

        hf.load_into(model, cfg.model.hf_dir, mcfg)
    return model


def load_resized(model: torch.nn.Module, sd: dict[str, torch.Tensor], mcfg=None, tp: int = 1,
                 tp_rank: int = 0) -> None:
    """Load full-model weights (global names) into this rank's model or pipeline stage, growing
    vocabulary-sized tensors when thought tokens were added (new rows get the mean embedding). Any
    other mismatch is an error naming the tensor.

    A PP stage numbers its layers from 0: names are mapped to the global layer index first, and the
    last stage's copy of a tied embedding (``output_layer.weight``) is loaded from the embedding.
    With tp > 1 (``mcfg`` given) each full tensor is cut to this TP rank's slice
    (``checkpoint.consolidate.split_tp``: fused tensors piecewise)."""
    from rlp_dist.checkpoint.consolidate import split_tp, tp_rule
    from rlp_dist.rlp.ema import global_param_names

    own = model.state_dict()
    names = global_param_names(model, own.keys())
    if getattr(model, "share_embeddings_and_output_weights", False) and "output_layer.weight" not in sd:
        names = {k: "embedding.word_embeddings.weight" if g == "output_layer.weight" else g for k, g in names.items()}
    missing = [names[k] for k in own if names[k] not in sd and not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"model.init_from: checkpoint lacks {missing[:3]}...; it is not a {type(model).__name__} "
                         f"of this preset")
    for k, v in own.items():
        if k.endswith("_extra_state"):
            continue
        src = sd[names[k]]
        rule = tp_rule(names[k], mcfg) if tp > 1 else None
        rows = v.shape[0] * (tp if rule is not None and rule.dim == 0 else 1)  # the full tensor's rows
        if src.shape[0] != rows and src.shape[1:] == v.shape[1:] and src.shape[0] < rows:
            grown = src.mean(0, keepdim=True).expand(rows - src.shape[0], *src.shape[1:])  # new vocab rows
            src = torch.cat([src, grown], 0)
        if rule is not None:
            src = split_tp(src, rule, tp, tp_rank)
        if src.shape != v.shape:
            raise ConfigError(f"model.init_from: {names[k]} has shape {tuple(src.shape)}, the model needs "
                              f"{tuple(v.shape)}; use a checkpoint of the same preset")
        v.copy_(src.to(v.dtype))


def wrap_deepspeed(model: torch.nn.Module, cfg: RootConfig, dims: ParallelDims):
    import deepspeed

    from rlp_dist.distributed.parallel import DeepSpeedMPU

    o = cfg.optim
    splits = 1
    if cfg.objective == "rlp":
        local = cfg.rlp.contexts_per_step // dims.dp
        mb = min(cfg.rlp.contexts_per_micro_batch, local)
        # each micro-batch of contexts trains as `splits` backward passes; a step is mini_batches optimizer steps
        splits = cfg.rlp.thought_splits()
        if (local // mb * splits) % cfg.rlp.mini_batches_per_epoch:
            raise ConfigError(f"rlp.mini_batches_per_epoch={cfg.rlp.mini_batches_per_epoch} must divide the "
                              f"{local // mb * splits} micro-batches per step and rank (contexts_per_step/dp / "
                              f"contexts_per_micro_batch x thought splits)")
        splits = splits / cfg.rlp.mini_batches_per_epoch
    else:
        local = cfg.ntp.sequences_per_step // dims.dp
        mb = min(cfg.ntp.sequences_per_micro_batch, local)
    ds_config = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": int(local // mb * splits),
        "train_batch_size": int(local * splits * dims.dp),
        "gradient_clipping": o.grad_clip,
        "bf16": {"enabled": cfg.train.dtype == "bf16"},
        "zero_optimization": {
            "stage": cfg.parallel.zero_stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "stage3_param_persistence_threshold": 0 if dims.device.type == "cpu" else 1e5,
            "stage3_prefetch_bucket_size": 0 if dims.device.type == "cpu" else 5e7,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.parallel.tp > 1:
        _reduce_replicated_grads_over_tp(model, dims)
    if (dims.pp > 1 and getattr(model, "share_embeddings_and_output_weights", False)
            and model.post_process and not model.pre_process):
        # The last stage's output weight is a copy of the first stage's embedding (same gradient after
        # grads.reduce_grads): DeepSpeed's norm skips parameters it is told are pipeline-replicated,
        # so the clipping norm counts the tied weight once, as at PP=1.
        model.shared_embedding_or_output_weight().ds_pipe_replicated = True

    def optimizer(params):
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 weight_decay=o.weight_decay)

    # the schedule is per training step: with rlp.update_epochs x rlp.mini_batches_per_epoch optimizer
    # steps per training step, the scheduler (stepped per optimizer step) advances that much slower
    per_step = cfg.rlp.update_epochs * cfg.rlp.mini_batches_per_epoch if cfg.objective == "rlp" else 1

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s // per_step, o.warmup_steps,
                                                                         cfg.train.steps, o.schedule))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad],
                                      optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
                                      mpu=DeepSpeedMPU(dims), dist_init_required=False)
    return engine


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    import math

    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return 1.0


def _reduce_replicated_grads_over_tp(model: torch.nn.Module, dims: ParallelDims) -> None:
    """Sum the gradients of the parameters ``models.grads.tp_summed_params`` names (per-head QK-norm
    weights) over the TP group, as megatron's finalize_model_grads would; DeepSpeed does not (STACK.md,
    trap 1). A hook, not ``grads.reduce_grads``: at ZeRO >= 1 ``p.grad`` is gone after backward.
    Systems note: one small all-reduce per QK-norm tensor per backward (2 per layer)."""
    from rlp_dist.models.grads import tp_summed_params

    def hook(grad, group=dims.tp_group):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    for _, p in tp_summed_params(model):
        p.register_hook(hook)


def save(tr: Trainer) -> None:
    client = tr.client_state()
    rank_state = {"teacher": tr.teacher.state_dict() if tr.teacher is not None else None}
    tag = tr.ckpt.save(tr.engine, tr.step, client, rank_state)
    tr.metrics.info(f"saved checkpoint {tr.ckpt.dir / tag}")
    deleted = tr.ckpt.rotate(tr.cfg.checkpoint.keep_last)  # rank 0; never the tag `latest` names
    if deleted:
        tr.metrics.info(f"checkpoint.keep_last={tr.cfg.checkpoint.keep_last}: deleted {', '.join(deleted)}")


def resume(tr: Trainer) -> None:
    from rlp_dist.checkpoint.consolidate import resume_resharded

    if resume_resharded(tr):  # [parallelism] saved at another TP/PP/DP/ZeRO: rebuilt from global tensors
        return
    from rlp_dist.checkpoint.manager import check_same_preset
    from rlp_dist.checkpoint.safe_load import RESUME_FLAG, guarded_loads

    # Weights-only unpickling unless checkpoint.trust; a tag that fails to load falls back to the previous
    # one with a warning (rank 0 prints: Metrics does not exist yet); another preset's checkpoint is refused.
    model = to_dict(tr.cfg)["model"]
    warn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if tr.dims.is_rank0 else (lambda msg: None)
    with guarded_loads(RESUME_FLAG, tr.cfg.checkpoint.trust):
        loaded = tr.ckpt.load(tr.engine, warn=warn, check=lambda d: check_same_preset(d, model, "resume"))
    if loaded is None:
        return
    client, rank_state = loaded
    tr.load_client_state(client)
    if tr.teacher is not None and rank_state.get("teacher") is not None:
        tr.teacher.load_state_dict(rank_state["teacher"])


def main(cfg: RootConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(cfg)
    from rlp_dist.distributed.parallel import destroy_distributed

    destroy_distributed()
