"""Typed run configuration: the schema of every Hydra YAML under conf/.

The dataclasses here are registered with Hydra's ConfigStore (see ``rlp_dist.config.load``); YAML
files carry the values. Each dataclass validates its own fields in ``__post_init__`` and
:func:`validate` checks the relations between sections (tensor parallel size against head counts,
ZeRO stage against pipeline parallelism, ...). Every error names the field, the bad value and a
value that would work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """A user-facing configuration error (one line: field, value, fix)."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _divisors(n: int) -> str:
    ds = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, ds[:-1])) + f" or {ds[-1]}" if len(ds) > 1 else str(ds[0])


@dataclass
class ModelConfig:
    """Backbone architecture. ``arch`` picks the megatron-core model class."""

    name: str = MISSING
    arch: str = "transformer"  # transformer (GPTModel) | hybrid (MambaModel, pattern below)
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING
    kv_channels: int = MISSING
    vocab_size: int = MISSING
    max_position_embeddings: int = 4096
    position_embedding: str = "rope"  # rope | none
    rope_base: float = 1_000_000.0
    norm_eps: float = 1e-6
    qk_layernorm: bool = True
    activation: str = "swiglu"  # swiglu | squared_relu
    tie_embeddings: bool = True
    init_method_std: float = 0.02
    # hybrid (Nemotron-H) only: M = Mamba2 mixer, * = attention, - = MLP
    hybrid_pattern: Optional[str] = None
    mamba_num_heads: Optional[int] = None
    mamba_head_dim: Optional[int] = None
    mamba_state_dim: Optional[int] = None
    mamba_num_groups: Optional[int] = None
    mamba_conv_kernel: int = 4
    # activation recomputation in training forwards (megatron-core's options): none | selective | full
    recompute: str = "none"
    # start from another run's checkpoint directory (e.g. RLP from an NTP run), weights only
    init_from: Optional[str] = None
    # a transformers-format directory to import weights from (backbones issue)
    hf_dir: Optional[str] = None
    # unpickle init_from's files in full (they can run code); default: tensors + DeepSpeed's classes only
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        _check(self.arch in ("transformer", "hybrid"),
               f"model.arch={self.arch!r} is unknown; use 'transformer' or 'hybrid'")
        _check(self.activation in ("swiglu", "squared_relu"),
               f"model.activation={self.activation!r} is unknown; use 'swiglu' or 'squared_relu'")
        _check(self.position_embedding in ("rope", "none"),
               f"model.position_embedding={self.position_embedding!r}; use 'rope' or 'none'")
        _check(self.recompute in ("none", "selective", "full"),
               f"model.recompute={self.recompute!r} is unknown; use 'none', 'selective' (core attention) "
               f"or 'full' (every layer)")
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"model.{name}={v!r} must be a positive integer")
        _check(self.num_attention_heads % self.num_query_groups == 0,
               f"model.num_query_groups={self.num_query_groups} must divide "
               f"model.num_attention_heads={self.num_attention_heads}; use one of "
               f"{_divisors(self.num_attention_heads)}")
        if self.arch == "hybrid":
            _check(bool(self.hybrid_pattern) and set(self.hybrid_pattern) <= set("M*-"),
                   f"model.hybrid_pattern={self.hybrid_pattern!r} must be a non-empty string of "
                   f"'M' (Mamba2), '*' (attention) and '-' (MLP)")
            _check(len(self.hybrid_pattern) == self.num_layers,
                   f"model.num_layers={self.num_layers} must equal len(model.hybrid_pattern)="
                   f"{len(self.hybrid_pattern)}")
            for name in ("mamba_num_heads", "mamba_head_dim", "mamba_state_dim", "mamba_num_groups"):
                v = getattr(self, name)
                _check(isinstance(v, int) and v >= 1,
                       f"model.{name}={v!r} must be a positive integer for arch=hybrid")


@dataclass
class RLPConfig:
    """The paper's recipe (Algorithm 1). Defaults in conf/rlp/default.yaml."""

    group_size: int = 16  # G thoughts per context
    thought_max_tokens: int = 2048  # L, thought content tokens (the closing marker excluded)
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    ema_decay: float = 0.999  # tau
    ema_update_every: int = 1
    teacher_scoring: str = "every_step"  # every_step | log_every_k
    teacher_scoring_k: int = 10
    contexts_per_step: int = 512  # B, global over data-parallel ranks
    contexts_per_micro_batch: int = 4  # per rank, bounds rollout and training memory
    context_len: int = 2048  # tokens of x_<t (a window of the packed stream ending before x_t)
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # the paper uses none; only 0 is implemented
    thought_open: str = "<think>"
    thought_close: str = "</think>"
    thought_prompt: str = ""  # text inserted after the context, before the opening marker
    add_thought_tokens: bool = False
    shared_prefix: bool = True  # training forward: one prefix computation per context, G thoughts branch
    # k contexts drawn from each document window of context_len + 1 tokens, ending at
    # t_j = context_len - (k-1-j) * context_stride (the longest is context_len): one prefill per
    # document, the k contexts branch from it (rlp.rollout ``branches``). 1 = independent windows.
    contexts_per_document: int = 1
    context_stride: int = 0  # distance between a document's contexts; 0: context_len // contexts_per_document
    # data.document_boundaries=respect: positions t closer than this to their document's start are never drawn
    min_context: int = 1
    # thoughts of one context per policy-gradient micro-batch (0: all G). The group's advantages are
    # computed before any backward, so splitting is exact; memory then no longer grows with G (the
    # prefix is recomputed once per split).
    thoughts_per_micro_batch: int = 0
    # a control experiment: permute the advantages within each step (breaks the thought-reward link;
    # RLP must beat it). Never for real training.
    shuffle_advantages: bool = False
    # PPO-style reuse of a rollout: epochs over it, each cut into mini-batches (one optimizer step each).
    # 1 and 1: the paper's on-policy step (every importance ratio is exactly 1).
    update_epochs: int = 1
    mini_batches_per_epoch: int = 1
    # where to think: uniform (the paper: any position) | entropy (draw contexts_per_step / entropy_keep
    # candidates, keep the entropy_keep fraction where the EMA teacher's next-token entropy is highest)
    positions: str = "uniform"
    entropy_keep: float = 0.25

    def thought_splits(self) -> int:
        """Micro-batches each context's G thoughts are split into."""
        return self.group_size // (self.thoughts_per_micro_batch or self.group_size)

    def branch_points(self) -> tuple[int, ...]:
        """(t_0 < .. < t_{k-1} = context_len): where a document's k contexts end."""
        k = self.contexts_per_document
        stride = self.context_stride or self.context_len // k
        return tuple(self.context_len - (k - 1 - j) * stride for j in range(k))

    def __post_init__(self) -> None:
        _check(self.group_size >= 2,
               f"rlp.group_size={self.group_size} must be >= 2 (the group-relative advantage "
               f"G/(G-1)*(r - mean r) needs two thoughts); the paper uses 16")
        _check(self.thought_max_tokens >= 1,
               f"rlp.thought_max_tokens={self.thought_max_tokens} must be >= 1; the paper uses 2048")
        _check(self.temperature > 0,
               f"rlp.temperature={self.temperature} must be > 0; the paper samples at 0.7")
        _check(0 < self.top_p <= 1, f"rlp.top_p={self.top_p} must be in (0, 1]; 1.0 disables it")
        _check(self.top_k >= 0, f"rlp.top_k={self.top_k} must be >= 0; 0 disables it")
        _check(0.0 <= self.ema_decay < 1.0,
               f"rlp.ema_decay={self.ema_decay} must be in [0, 1); the paper uses 0.999")
        _check(self.ema_update_every >= 1, f"rlp.ema_update_every={self.ema_update_every} must be >= 1")
        _check(self.teacher_scoring in ("every_step", "log_every_k"),
               f"rlp.teacher_scoring={self.teacher_scoring!r}; use 'every_step' or 'log_every_k'")
        _check(self.teacher_scoring_k >= 1, f"rlp.teacher_scoring_k={self.teacher_scoring_k} must be >= 1")
        _check(self.contexts_per_step >= 1, f"rlp.contexts_per_step={self.contexts_per_step} must be >= 1")
        _check(self.contexts_per_micro_batch >= 1,
               f"rlp.contexts_per_micro_batch={self.contexts_per_micro_batch} must be >= 1")
        _check(self.context_len >= 1, f"rlp.context_len={self.context_len} must be >= 1")
        _check(1 <= self.min_context <= self.context_len,
               f"rlp.min_context={self.min_context} must be in [1, rlp.context_len={self.context_len}]")
        _check(0 <= self.clip_eps_low < 1, f"rlp.clip_eps_low={self.clip_eps_low} must be in [0, 1)")
        _check(self.clip_eps_high >= 0, f"rlp.clip_eps_high={self.clip_eps_high} must be >= 0")
        _check(self.kl_coef == 0.0,
               f"rlp.kl_coef={self.kl_coef}: only 0 is implemented (the paper found KL 1e-4/1e-3 "
               f"slightly worse than none); set rlp.kl_coef=0")
        _check(bool(self.thought_open) and bool(self.thought_close),
               "rlp.thought_open and rlp.thought_close must be non-empty strings")
        _check(self.positions in ("uniform", "entropy"),
               f"rlp.positions={self.positions!r}; use 'uniform' (the paper) or 'entropy' (think where the "
               f"teacher is unsure)")
        _check(0 < self.entropy_keep <= 1, f"rlp.entropy_keep={self.entropy_keep} must be in (0, 1] (the kept fraction; e.g. rlp.entropy_keep=0.25)")
        _check(self.positions == "uniform" or self.contexts_per_document == 1,
               f"rlp.positions=entropy picks single contexts; set rlp.contexts_per_document=1 "
               f"(got {self.contexts_per_document})")
        _check(self.update_epochs >= 1, f"rlp.update_epochs={self.update_epochs} must be >= 1 (1: the paper's step)")
        _check(self.mini_batches_per_epoch >= 1,
               f"rlp.mini_batches_per_epoch={self.mini_batches_per_epoch} must be >= 1 (1: one optimizer step)")
        g = self.thoughts_per_micro_batch
        _check(g >= 0 and (g == 0 or self.group_size % g == 0),
               f"rlp.thoughts_per_micro_batch={g} must divide rlp.group_size={self.group_size} (0: all); use one "
               f"of {_divisors(self.group_size)}")
        k = self.contexts_per_document
        _check(k >= 1, f"rlp.contexts_per_document={k} must be >= 1")
        _check(self.context_stride >= 0, f"rlp.context_stride={self.context_stride} must be >= 0 (0: automatic)")
        if k > 1:
            _check(self.branch_points()[0] >= 1,
                   f"rlp.contexts_per_document={k} x rlp.context_stride={self.context_stride} does not fit in "
                   f"rlp.context_len={self.context_len}; use a stride below {self.context_len // (k - 1)}")
            _check(self.contexts_per_step % k == 0 and self.contexts_per_micro_batch % k == 0,
                   f"rlp.contexts_per_document={k} must divide rlp.contexts_per_step={self.contexts_per_step} "
                   f"and rlp.contexts_per_micro_batch={self.contexts_per_micro_batch}; use multiples of {k}")


@dataclass
class NTPConfig:
    """Plain next-token training (the continued-pretraining baseline)."""

    seq_len: int = 2048
    sequences_per_step: int = 64  # global
    sequences_per_micro_batch: int = 4  # per rank

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2, f"ntp.seq_len={self.seq_len} must be >= 2")
        _check(self.sequences_per_step >= 1, f"ntp.sequences_per_step={self.sequences_per_step} must be >= 1")
        _check(self.sequences_per_micro_batch >= 1,
               f"ntp.sequences_per_micro_batch={self.sequences_per_micro_batch} must be >= 1")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0; the paper uses 1e-6")
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _check(self.grad_clip >= 0, f"optim.grad_clip={self.grad_clip} must be >= 0 (0 disables it)")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.schedule in ("constant", "cosine"),
               f"optim.schedule={self.schedule!r}; use 'constant' or 'cosine'")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    init_timeout_s: int = 600

    def __post_init__(self) -> None:
        _check(self.tp >= 1, f"parallel.tp={self.tp} must be >= 1")
        _check(self.pp >= 1, f"parallel.pp={self.pp} must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={self.zero_stage}; use 0, 1, 2 or 3")
        _check(self.backend in ("auto", "nccl", "gloo"),
               f"parallel.backend={self.backend!r}; use 'auto', 'nccl' or 'gloo'")


@dataclass
class DataConfig:
    path: str = "bundled"  # 'bundled', or a .txt / .jsonl file, a directory of them, or a glob
    tokenizer: str = "bundled"  # 'bundled' or a local Hugging Face tokenizer directory
    text_key: str = "text"  # JSONL field holding the document text
    append_eos: bool = True  # an end-of-document token between packed documents
    # respect: NTP windows attend only within their documents (positions and Mamba states restart at
    # each start) and RLP contexts never reach into an earlier document; ignore: one long stream
    document_boundaries: str = "respect"
    eod_mask_loss: bool = False  # as Megatron: no NTP loss where the input token is the EOS (x_t of the next document)

    def __post_init__(self) -> None:
        _check(self.document_boundaries in ("respect", "ignore"),
               f"data.document_boundaries={self.document_boundaries!r}; use 'respect' or 'ignore'")


@dataclass
class LoggingConfig:
    wandb_mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    wandb_project: str = "rlp-dist"
    wandb_entity: Optional[str] = None
    log_every: int = 1
    progress: bool = True
    sample_every: int = 0  # log a table of sample thoughts every N steps (0 = never)
    # peak dense bf16 TFLOP/s per GPU for perf/mfu; null: looked up by device name (rlp_dist.perf.flops)
    peak_tflops: Optional[float] = None

    def __post_init__(self) -> None:
        _check(self.wandb_mode in ("auto", "online", "offline", "disabled"),
               f"logging.wandb_mode={self.wandb_mode!r}; use online, offline, disabled or auto")
        _check(self.log_every >= 1, f"logging.log_every={self.log_every} must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (0 = only at the end)
    save_final: bool = True
    resume: bool = True  # resume from <run.dir>/checkpoints/latest when present
    # resume=false over a run.dir with checkpoints: delete them (and metrics.jsonl) instead of refusing
    overwrite: bool = False
    keep_last: int = 0  # keep only the newest N checkpoints (0 = all); the one `latest` names is never deleted
    trust: bool = False  # unpickle the resumed checkpoint's files in full (they can run code)

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every={self.every} must be >= 0")
        _check(self.keep_last >= 0, f"checkpoint.keep_last={self.keep_last} must be >= 0 (0 keeps every checkpoint)")


@dataclass
class GuardConfig:
    """Divergence watchdog (ops.guard): warnings on the console and as guard/* metrics, no action."""

    enabled: bool = True
    zero_grad_steps: int = 3  # warn when optim/grad_norm is exactly 0 this many steps in a row (0 = off)
    max_abs_s_ema: float = 1000.0  # warn when |rlp/s_ema_mean| (nats) exceeds this (0 = off)
    max_abs_reward: float = 1000.0  # warn when |rlp/reward_mean| (nats) exceeds this (0 = off)
    loss_spike: float = 0.0  # warn when |loss - running mean| > this x running std (0 = off)

    def __post_init__(self) -> None:
        for k in ("zero_grad_steps", "max_abs_s_ema", "max_abs_reward", "loss_spike"):
            _check(getattr(self, k) >= 0, f"train.guard.{k}={getattr(self, k)} must be >= 0 (0 turns it off)")


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 1234
    dtype: str = "fp32"  # fp32 | bf16 (compute and student params; EMA masters are always fp32)
    # a non-finite loss, reward or grad norm: stop (exit 3, no checkpoint of that state) | skip the update
    on_nonfinite: str = "stop"
    skip_limit: int = 20  # on_nonfinite=skip: this many skipped steps in a row stop the run
    guard: GuardConfig = field(default_factory=GuardConfig)
    # objective=ntp only: train until this many FLOPs are spent (a number, or an RLP run directory whose
    # metrics.jsonl holds perf/flops_total): the compute-matched CPT baseline. Sets train.steps.
    flops_budget: Optional[str] = None

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps={self.steps} must be >= 1")
        _check(self.on_nonfinite in ("stop", "skip"),
               f"train.on_nonfinite={self.on_nonfinite!r}; use 'stop' (exit with an error) or 'skip' (skip the update)")
        _check(self.skip_limit >= 1, f"train.skip_limit={self.skip_limit} must be >= 1")
        _check(self.dtype in ("fp32", "bf16"),
               f"train.dtype={self.dtype!r}; use 'fp32' or 'bf16' (fp16 is refused by DeepSpeed on CPU)")


@dataclass
class EvalConfig:
    """In-loop think vs no-think evaluation on held-out text (rlp_dist.eval.loop.maybe_eval runs the same
    code as ``rlp-dist eval``; logs eval/* to the console, metrics.jsonl and wandb)."""

    every: int = 0  # steps between evaluations (0 = off)
    data: Optional[str] = None  # held-out .txt / .jsonl / indexed dataset
    positions: int = 256  # positions drawn with eval.seed (the same ones every time); 0 = every position
    positions_key: Optional[str] = None  # JSONL field listing each document's token indices to evaluate
    seed: int = 0
    group_size: int = 0  # thoughts per position (0: rlp.group_size)
    batch: int = 16  # contexts per rollout call and data-parallel rank

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"eval.every={self.every} must be >= 0 (0 disables in-loop eval)")
        _check(self.every == 0 or bool(self.data),
               f"eval.every={self.every} needs eval.data=PATH (held-out .txt/.jsonl or an indexed dataset)")
        _check(self.positions >= 0, f"eval.positions={self.positions} must be >= 0 (0: every position)")
        _check(self.group_size >= 0, f"eval.group_size={self.group_size} must be >= 0 (0: rlp.group_size)")
        _check(self.batch >= 1, f"eval.batch={self.batch} must be >= 1")


@dataclass
class RunSection:
    dir: str = "runs/default"
    name: Optional[str] = None


@dataclass
class RootConfig:
    objective: str = "rlp"  # rlp | ntp
    model: ModelConfig = MISSING
    rlp: RLPConfig = field(default_factory=RLPConfig)
    ntp: NTPConfig = field(default_factory=NTPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        _check(self.objective in ("rlp", "ntp"),
               f"objective={self.objective!r}; use 'rlp' or 'ntp' (plain next-token training)")


def validate(cfg: RootConfig, world_size: Optional[int] = None) -> RootConfig:
    """Cross-section checks that need more than one field. Raises ConfigError."""
    m, par = cfg.model, cfg.parallel
    _check(m.num_attention_heads % par.tp == 0,
           f"parallel.tp={par.tp} does not divide model.num_attention_heads={m.num_attention_heads}; "
           f"use {_divisors(m.num_attention_heads)}")
    _check(m.num_query_groups % par.tp == 0,
           f"parallel.tp={par.tp} does not divide model.num_query_groups={m.num_query_groups}; "
           f"use {_divisors(m.num_query_groups)}")
    _check(m.ffn_hidden_size % par.tp == 0,
           f"parallel.tp={par.tp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
    if m.arch == "hybrid":
        _check(m.mamba_num_heads % par.tp == 0,
               f"parallel.tp={par.tp} does not divide model.mamba_num_heads={m.mamba_num_heads}; "
               f"use {_divisors(m.mamba_num_heads)}")
    _check(m.num_layers >= par.pp,
           f"parallel.pp={par.pp} exceeds model.num_layers={m.num_layers}; use at most {m.num_layers}")
    if par.pp > 1:
        _check(par.zero_stage <= 1,
               f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: ZeRO-2/3 training does "
               f"not work under pipeline parallelism; use parallel.zero_stage=1 (or 0)")
    if world_size is not None:
        _check(world_size % (par.tp * par.pp) == 0,
               f"world size {world_size} is not divisible by parallel.tp*parallel.pp={par.tp * par.pp}; "
               f"launch a multiple of {par.tp * par.pp} ranks")
        dp = world_size // (par.tp * par.pp)
        if cfg.objective == "rlp":
            r = cfg.rlp
            _check(r.contexts_per_step % (dp * r.contexts_per_document) == 0,
                   f"rlp.contexts_per_step={r.contexts_per_step} is not divisible by the data-parallel "
                   f"size {dp} x rlp.contexts_per_document={r.contexts_per_document}; use a multiple of "
                   f"{dp * r.contexts_per_document}")
            local = r.contexts_per_step // dp
            _check(local % min(r.contexts_per_micro_batch, local) == 0,
                   f"rlp.contexts_per_micro_batch={r.contexts_per_micro_batch} does not divide the "
                   f"{local} contexts per rank; use a divisor of {local}")
        else:
            n = cfg.ntp
            _check(n.sequences_per_step % dp == 0,
                   f"ntp.sequences_per_step={n.sequences_per_step} is not divisible by the "
                   f"data-parallel size {dp}; use a multiple of {dp}")
            local = n.sequences_per_step // dp
            _check(local % min(n.sequences_per_micro_batch, local) == 0,
                   f"ntp.sequences_per_micro_batch={n.sequences_per_micro_batch} does not divide the "
                   f"{local} sequences per rank; use a divisor of {local}")
    if cfg.objective == "rlp":
        need = cfg.rlp.context_len + cfg.rlp.thought_max_tokens + 8
        _check(need <= m.max_position_embeddings,
               f"rlp.context_len + rlp.thought_max_tokens (+ markers) = {need} exceeds "
               f"model.max_position_embeddings={m.max_position_embeddings}; shorten one of them")
    else:
        _check(cfg.ntp.seq_len <= m.max_position_embeddings,
               f"ntp.seq_len={cfg.ntp.seq_len} exceeds model.max_position_embeddings="
               f"{m.max_position_embeddings}")
    return cfg


def to_dict(cfg: Any) -> dict:
    """A plain dict of a RootConfig (for logging and checkpoints)."""
    import dataclasses

    return dataclasses.asdict(cfg)
