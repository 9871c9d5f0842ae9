"""The no-think EMA teacher p_phi, sharded like the student (RLP.md, Algorithm 1, steps 4, 5, 11).

    phi_0   <- theta_1                                 lazy init at step 1 (before the first scoring)
    phi_s   <- tau * phi_{s-1} + (1 - tau) * theta_s   after every ``update_every``-th optimizer step

Layout. The teacher is a second megatron-core model of the student's preset, built for the same
TP/PP rank, then partitioned by DeepSpeed ZeRO-3 over the *data-parallel* group (explicit
``data_parallel_group`` and ``mpu``: ``zero.Init(mpu=...)`` alone would partition over the WORLD,
STACK.md trap 2) and wrapped in an optimizer-free DeepSpeed engine that only runs forward under
``no_grad``. Each parameter ``p`` of ``numel`` elements is a contiguous slice on DP rank ``r``:

    k = ceil(numel / dp);  local = flat(p)[r*k : r*k + n],  n = clamp(numel - r*k, 0, k)

(``p.ds_tensor`` holds k elements; the tail beyond n on the last rank is uninitialised padding and
is never read or written here.) The student's ZeRO-3 partition uses the same formula over the same
group, so its fp32 master shard (``safe_get_local_fp32_param``) lines up element for element. A
ZeRO-0/1/2 student holds full parameters: the same slice is cut from them, and where the
optimizer's fp32 master fragment for those elements lives on this rank (``p._hp_mapping``) it is
used instead of the bf16 value.

Update. Every local shard has an fp32 master (in fp32 compute the shard is its own master; in bf16
a separate flat fp32 buffer, because a bf16 EMA with tau=0.999 stalls: most updates round away).
The update is ``master.lerp_(student_shard, 1 - tau)`` followed by a cast-copy into the bf16 compute
shard: local arithmetic only, zero collectives (counted at the ProcessGroup method level and
reported as ``ema/update_collectives``).

Departures from the plain fp32 recursion: one, for bf16 ZeRO-0/1/2 students only. Their fp32 masters
are partitioned by flat parameter group, not per parameter, so for the part of a teacher slice whose
master lives on another DP rank the update reads the student's bf16 value (reading the master would
cost a collective): the teacher then follows theta to bf16 rounding there (relative 2^-9). ZeRO-3
students (the PP=1 default) and fp32 students are followed exactly.

``param_gap`` is computed from local shards with one all-reduce of two scalars; TP-replicated
parameters are counted on tp rank 0 only and the tied output-layer copy of the embedding (PP>1) is
skipped, so the number equals the gap of the full model. With PP > 1 the teacher is one stage like the
student: the update, the masters and the checkpointing are per stage and need no communication;
scoring runs forward-only through megatron's pipeline schedule (:meth:`EmaTeacher.score`).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from rlp_dist.models import head

# --------------------------------------------------------------------------------------------------
# Counting communication at the torch.distributed.ProcessGroup method level (DeepSpeed calls the
# process-group methods directly, so wrapping torch.distributed.* functions would miss them).
# --------------------------------------------------------------------------------------------------

# method -> index of the positional argument holding the tensors this rank sends
_PG_SEND_ARG = {
    "allreduce": 0, "allreduce_coalesced": 0, "broadcast": 0, "reduce": 0, "send": 0,
    "allgather": 1, "_allgather_base": 1, "allgather_coalesced": 1, "allgather_into_tensor_coalesced": 1,
    "all_gather_single": 1, "all_gather_single_coalesced": 1,  # torch >= 2.13 all_gather_into_tensor
    "reduce_scatter": 1, "_reduce_scatter_base": 1, "reduce_scatter_tensor_coalesced": 1,
    "reduce_scatter_single": 1, "reduce_scatter_single_coalesced": 1,
    "alltoall": 1, "alltoall_base": 1, "all_to_all_single": 1, "gather": 1, "scatter": 1,
    "recv": None, "recv_anysource": None, "barrier": None, "monitored_barrier": None,
}


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


class CommCounter:
    """Number of collective calls and bytes sent by this rank while active."""

    def __init__(self):
        self.calls = 0
        self.bytes = 0
        self.by_method: dict[str, int] = {}


@contextlib.contextmanager
def count_collectives() -> Iterator[CommCounter]:
    """Count every ProcessGroup collective issued inside the block (restored on exit)."""
    pg = dist.ProcessGroup
    counter, saved = CommCounter(), {}
    for name, arg in _PG_SEND_ARG.items():
        orig = getattr(pg, name, None)
        if orig is None or name not in pg.__dict__:
            continue
        # Keep the raw class attribute: a pybind method fetched with getattr would not rebind.
        saved[name] = pg.__dict__[name]

        def wrapped(self, *args, _orig=orig, _name=name, _arg=arg, **kw):
            counter.calls += 1
            counter.by_method[_name] = counter.by_method.get(_name, 0) + 1
            if _arg is not None and len(args) > _arg:
                counter.bytes += _nbytes(args[_arg])
            return _orig(self, *args, **kw)

        setattr(pg, name, wrapped)
    try:
        yield counter
    finally:
        for name, orig in saved.items():
            setattr(pg, name, orig)


# --------------------------------------------------------------------------------------------------
# The teacher.
# --------------------------------------------------------------------------------------------------


def _shard_range(numel: int, dp: int, dp_rank: int) -> tuple[int, int, int]:
    """(k, start, n): partition size, first element and valid length of this rank's slice."""
    k = math.ceil(numel / dp)
    start = dp_rank * k
    return k, start, max(0, min(k, numel - start))


def global_param_names(module: torch.nn.Module, keys: Optional[Iterable[str]] = None) -> dict[str, str]:
    """Local name -> name with the global layer index (PP stages number their layers from 0).

    keys: the local names to map (parameter names by default; state-dict keys work too).
    """
    remap = {}
    for name, mod in module.named_modules():
        m = re.fullmatch(r"(.*layers)\.(\d+)", name)
        if m and hasattr(mod, "layer_number"):
            remap[name + "."] = f"{m.group(1)}.{int(mod.layer_number) - 1}."
    out = {}
    for name in (keys if keys is not None else (n for n, _ in module.named_parameters())):
        g = name
        for local, glob in remap.items():
            if name.startswith(local):
                g = glob + name[len(local):]
                break
        out[name] = g
    return out


_global_names = global_param_names  # the earlier private name (tests import it)


def teacher_ds_config(dtype: str, device_type: str) -> dict:
    """Optimizer-free ZeRO-3 config: every parameter partitioned (persistence threshold 0)."""
    cpu = device_type == "cpu"
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": False,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0 if cpu else 5e7,
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class EmaTeacher:
    """EMA of the student, ZeRO-3 partitioned over DP, with fp32 shard masters.

    module: this rank's (TP/PP) shard of a freshly built model of the student's preset (its values
    are overwritten at ``initialize``). dims: the run's ParallelDims. dtype: 'fp32' | 'bf16' compute.
    """

    def __init__(self, module: torch.nn.Module, decay: float, update_every: int, dims, dtype: str = "fp32"):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1); the paper uses 0.999")
        self.decay, self.update_every, self.dims, self.dtype = decay, update_every, dims, dtype
        self.initialized = False
        self.num_updates = 0
        self.last_update_s = 0.0
        self.last_update_collectives = 0
        self.last_update_bytes = 0
        self.engine = _partition(module, dims, dtype)
        self.module = self.engine.module
        named = list(self.module.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.global_names = global_param_names(self.module)
        self.ranges = [_shard_range(p.ds_numel, dims.dp, dims.dp_rank) for p in self.params]
        for (name, p), (k, _, _) in zip(named, self.ranges):
            if p.ds_tensor.numel() != k:
                raise RuntimeError(f"teacher {name}: ZeRO-3 shard has {p.ds_tensor.numel()} elements, expected "
                                   f"ceil({p.ds_numel}/dp={dims.dp})={k}; it is not partitioned over the DP group")
        # Compute shards (valid part only) and their fp32 masters. In fp32 the shard is its own master
        # (no extra memory); in bf16 the masters are views into one flat fp32 buffer.
        self.shards = [p.ds_tensor.narrow(0, 0, n) for p, (_, _, n) in zip(self.params, self.ranges)]
        if self.shards and self.shards[0].dtype == torch.float32:
            self.flat_master = None
            self.masters = self.shards
        else:
            total = sum(n for _, _, n in self.ranges)
            self.flat_master = torch.zeros(total, dtype=torch.float32, device=dims.device)
            self.masters = list(self.flat_master.split([n for _, _, n in self.ranges]))
        self._counted = self._gap_weights()

    def _gap_weights(self) -> list[bool]:
        """Which local shards count towards the global gap (each full-model element exactly once)."""
        out = []
        for name, p in zip(self.names, self.params):
            tp_split = bool(getattr(p, "tensor_model_parallel", False))
            tied_copy = name.endswith("output_layer.weight") and getattr(p, "shared_embedding", False)
            out.append((tp_split or self.dims.tp_rank == 0) and not tied_copy)
        return out

    # ---------------------------------------------------------------------------------------------
    # Reading the student's shards (no communication).
    # ---------------------------------------------------------------------------------------------

    def _student_shards(self, student: torch.nn.Module) -> list[torch.Tensor]:
        """The student's fp32 values for exactly this rank's teacher slices, in teacher order."""
        sp = dict(student.named_parameters())
        missing = [n for n in self.names if n not in sp]
        if missing:
            raise ValueError(f"student lacks teacher parameters {missing[:3]}: not a model of the same preset/shard")
        out = []
        for name, (k, start, n) in zip(self.names, self.ranges):
            out.append(_local_fp32_slice(sp[name], start, n, name))
        return out

    @torch.no_grad()
    def initialize(self, student: torch.nn.Module) -> None:
        """Lazy init (step 1, before the first scoring): phi <- theta."""
        src = self._student_shards(student)
        torch._foreach_copy_(self.masters, src)
        self._write_compute_shards()
        self.initialized = True

    @torch.no_grad()
    def update(self, student: torch.nn.Module, step: int) -> bool:
        """phi <- tau phi + (1 - tau) theta on local shards after the optimizer step. True if it ran."""
        if not self.initialized:
            raise RuntimeError("EmaTeacher.update before initialize(student): call initialize at step 1")
        if step % self.update_every != 0:
            return False
        t0 = time.perf_counter()
        with count_collectives() as c:
            src = self._student_shards(student)
            # lerp: m + w (s - m) = (1 - w) m + w s with w = 1 - tau; one fused pass per tensor list.
            torch._foreach_lerp_(self.masters, src, 1.0 - self.decay)
            self._write_compute_shards()
        self.last_update_s = time.perf_counter() - t0
        self.last_update_collectives, self.last_update_bytes = c.calls, c.bytes
        self.num_updates += 1
        return True

    def _write_compute_shards(self) -> None:
        if self.flat_master is not None:  # bf16 compute: cast the fp32 masters into the shards
            torch._foreach_copy_(self.shards, self.masters)

    def metrics(self) -> dict[str, float]:
        """ema/update_s and ema/update_collectives of the last update (0 collectives by design)."""
        return {"ema/update_s": self.last_update_s,
                "ema/update_collectives": float(self.last_update_collectives)}

    # ---------------------------------------------------------------------------------------------
    # Scoring and monitoring.
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, contexts: torch.Tensor, next_tokens: Optional[torch.Tensor],
              micro_batch_size: Optional[int] = None, positions: Optional[Sequence[int]] = None,
              lengths: Optional[torch.Tensor] = None, return_entropy: bool = False):
        """S_ema = log p_phi(x_t | x_<t) in fp32. contexts (B, C), next_tokens (B,) -> (B,) on every stage.
        With ``return_entropy``: (S_ema, H) with H the entropy of p_phi(. | x_<t) at the same positions
        (the fused op computes it in the same pass; ``rlp.positions=entropy`` ranks candidates by it).

        With ``lengths`` (B,) the contexts are right-padded (document prefixes of different lengths):
        context b is its first lengths[b] tokens and S_ema is read at position lengths[b] - 1 (causal:
        the padding after it is never seen).

        With ``positions`` (t_0 < .. < t_{k-1}; several contexts per document) ``contexts`` are B
        documents (B, T > t_{k-1}) and next_tokens None: one forward over each document's first t_{k-1}
        tokens scores all k contexts x_<t_j (x_t = document[t_j]) -> (B*k,), row b*k + j.

        Runs forward-only through megatron's schedule (``models.runner.run_pipeline``) in micro-batches
        of ``micro_batch_size`` rows (default: all B): 1F1B over the stages with PP > 1, a plain loop at
        PP=1. The last stage computes S_ema (fp32, vocab-parallel over TP); one broadcast of the (B,)
        scores over the pipeline group then gives it to every stage: the last needs it for the loss, the
        first (rank 0) logs it, and every stage then holds the same rewards and advantages.

        Collective: ZeRO-3 all-gathers each layer's parameters over DP, so every DP rank must call
        this together (with the same number of micro-batches). ZeRO-3's trace checks run over the DP
        group (``deepspeed_compat.trace_checks_over``): over the WORLD they would pair up different
        stages' checks.
        """
        from rlp_dist.distributed.deepspeed_compat import trace_checks_over
        from rlp_dist.models.runner import run_pipeline

        if not self.initialized:
            raise RuntimeError("EMA teacher scored before initialize(student) (lazy init at step 1)")
        d = self.dims
        if positions is not None:
            ends = torch.tensor([int(t) for t in positions], device=contexts.device)  # (k,)
            next_tokens = contexts[:, ends]  # (B, k)
            contexts = contexts[:, : int(ends[-1])]  # (B, t_{k-1}): logits at t_j - 1 predict x_{t_j}
            at = ends - 1
        else:
            at = torch.tensor([contexts.shape[1] - 1], device=contexts.device)  # the last position
            next_tokens = next_tokens[:, None]  # (B, 1)
        b, c = contexts.shape
        k = at.numel()
        # where each row is read: (B, k) — the k shared positions, or each row's own last position
        read = (lengths.to(device=contexts.device, dtype=torch.long)[:, None] - 1 if lengths is not None
                else at[None].expand(b, -1))
        mbs = micro_batch_size or b
        if b % mbs:
            raise ValueError(f"{b} contexts are not divisible by micro_batch_size={mbs}")
        tp_group = d.tp_group if d.tp > 1 else None

        def forward(stage, mb):
            ctx = mb[0]
            pos = torch.arange(c, device=ctx.device).expand_as(ctx)  # (b, C)
            with head.hidden_output(stage):
                return stage(ctx, pos, None)  # last stage: final-norm hidden (b, C, H); others (C, b, H)

        def loss(mb, hidden):
            # only the k scored positions meet the output layer (fused op): no (b, C, V) logits
            rows = torch.arange(hidden.shape[0], device=hidden.device)[:, None]  # (b, 1)
            out = head.token_logprobs(self.module, hidden[rows, mb[2]], mb[1], tp_group=tp_group,
                                      return_entropy=return_entropy)  # (b, k) [, entropy (b, k)]
            s, ent = out if return_entropy else (out, torch.zeros_like(out))
            return s.new_zeros(()), {"s_ema": torch.stack([s.reshape(-1), ent.reshape(-1)])}  # (2, b*k)

        micro = list(zip(contexts.split(mbs), next_tokens.split(mbs), read.split(mbs)))
        with trace_checks_over(d.dp_group, d.device):
            out = run_pipeline(self.module, micro, forward, loss, c, mbs, forward_only=True)
        if d.pp == 1 or d.is_last_stage:
            both = torch.cat([o["s_ema"] for o in out], dim=1)  # (2, B*k): S_ema, entropy
        else:
            both = torch.empty(2, b * k, dtype=torch.float32, device=contexts.device)
        if d.pp > 1:
            dist.broadcast(both, src=dist.get_global_rank(d.pp_group, d.pp - 1), group=d.pp_group)
        return (both[0], both[1]) if return_entropy else both[0]

    @torch.no_grad()
    def param_gap(self, student: torch.nn.Module) -> float:
        """||phi - theta|| / ||theta|| over the full model, from local shards: one all-reduce of 2 scalars."""
        src = self._student_shards(student)
        acc = torch.zeros(2, dtype=torch.float64, device=self.dims.device)
        for m, s, counted in zip(self.masters, src, self._counted):
            if counted and m.numel():
                acc[0] += (m - s).double().pow(2).sum()
                acc[1] += s.double().pow(2).sum()
        if self.dims.world_size > 1:
            dist.all_reduce(acc)  # (2,) over every rank: DP shards x TP slices x PP stages
        return float((acc[0] / acc[1].clamp(min=1e-30)).sqrt())

    # ---------------------------------------------------------------------------------------------
    # Checkpointing: masters per rank (DeepSpeed cannot save an optimizer-free engine).
    # ---------------------------------------------------------------------------------------------

    def _layout(self) -> list[tuple]:
        return [(n, tuple(p.ds_shape), k, start, m) for n, p, (k, start, m) in zip(self.names, self.params, self.ranges)]

    def state_dict(self) -> dict:
        d = self.dims
        return {
            "format": "rlp_dist.ema.v1",
            "masters": {n: m.detach().clone().float() for n, m in zip(self.names, self.masters)},
            "layout": self._layout(),
            "global_names": dict(self.global_names),
            "tp_dims": {n: (int(getattr(p, "partition_dim", -1)) if getattr(p, "tensor_model_parallel", False)
                            else -1) for n, p in zip(self.names, self.params)},
            "glu": bool(getattr(getattr(self.module, "config", None), "gated_linear_unit", False)),
            "tied": bool(getattr(self.module, "share_embeddings_and_output_weights", False)),
            "ranks": {"dp": d.dp, "dp_rank": d.dp_rank, "tp": d.tp, "tp_rank": d.tp_rank, "pp": d.pp,
                      "pp_rank": d.pp_rank},
            "initialized": self.initialized, "num_updates": self.num_updates, "decay": self.decay,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != "rlp_dist.ema.v1":
            raise ValueError("teacher state is not an rlp_dist.ema.v1 checkpoint (saved by an older EmaTeacher?)")
        # Rank-state files keep tuples (checkpoint.layout); compare as lists so either form matches.
        if _as_lists(state["layout"]) != _as_lists(self._layout()):
            raise ValueError("teacher checkpoint was saved with a different model or TP/PP/DP layout; resume "
                             "with the same preset (a different tp/pp/dp goes through checkpoint.consolidate)")
        torch._foreach_copy_(self.masters, [state["masters"][n].to(self.dims.device) for n in self.names])
        self._write_compute_shards()
        self.initialized = bool(state["initialized"])
        self.num_updates = int(state["num_updates"])

    @torch.no_grad()
    def load_full_state(self, full, initialized: bool, num_updates: int) -> None:
        """Masters from full tensors of this rank's TP/PP shard (resume at another TP/PP/DP).

        full(local_name) -> tensor shaped like the parameter (``ds_shape``); this rank keeps its DP
        slice ``flat[start : start + n]`` (module docstring)."""
        for name, p, (_, start, n), m in zip(self.names, self.params, self.ranges, self.masters):
            t = full(name).reshape(-1)  # (numel,)
            if t.numel() != p.ds_numel:
                raise ValueError(f"teacher {name}: the checkpoint gives {t.numel()} elements, the shard has "
                                 f"{p.ds_numel}; not a checkpoint of this preset")
            m.copy_(t.narrow(0, start, n).to(m.device))
        self._write_compute_shards()
        self.initialized = bool(initialized)
        self.num_updates = int(num_updates)


def _as_lists(x):
    return [_as_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _local_fp32_slice(p: torch.nn.Parameter, start: int, n: int, name: str) -> torch.Tensor:
    """fp32 values of flat(p)[start:start+n] from what this rank holds (no communication)."""
    if hasattr(p, "ds_id"):  # ZeRO-3 student: its fp32 master partition, aligned with ds_tensor
        from deepspeed.utils import safe_get_local_fp32_param

        src = safe_get_local_fp32_param(p) if p.requires_grad else None
        src = p.ds_tensor if src is None else src  # frozen parameters have no optimizer master
        return src.narrow(0, 0, n).float()
    flat = p.detach().reshape(-1)
    out = flat.narrow(0, start, n)
    hp = getattr(p, "_hp_mapping", None)
    if p.dtype == torch.float32 or hp is None:
        return out.float()
    # ZeRO-1/2 or bf16-optimizer student: its fp32 master is partitioned by flat group, not per
    # parameter. Use the fp32 fragment where it overlaps this slice; the rest is the bf16 value
    # (the master of those elements lives on another rank: reading it would cost a collective).
    out = out.float()
    a, m = hp.lp_fragment_address.start, hp.lp_fragment_address.numel
    lo, hi = max(a, start), min(a + m, start + n)
    if lo < hi:
        out[lo - start:hi - start] = hp.get_hp_fragment().reshape(-1)[lo - a:hi - a]
    return out


def _partition(module: torch.nn.Module, dims, dtype: str):
    """ZeRO-3 partition over the DP group and an optimizer-free DeepSpeed engine around it."""
    import deepspeed

    from rlp_dist.distributed.parallel import DeepSpeedMPU

    module = module.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    for p in module.parameters():
        p.requires_grad_(False)
    config = teacher_ds_config(dtype, dims.device.type)
    mpu = DeepSpeedMPU(dims)
    # Explicit DP group: with mpu alone zero.Init partitions each TP shard over the WORLD.
    deepspeed.zero.Init(module=module, data_parallel_group=dims.dp_group, mpu=mpu, config_dict_or_path=config)
    engine, *_ = deepspeed.initialize(model=module, config=config, mpu=mpu, dist_init_required=False)
    engine.eval()
    return engine


# --------------------------------------------------------------------------------------------------
# Export: the teacher's full weights from a checkpoint directory (for `rlp-dist convert --which ema`).
# --------------------------------------------------------------------------------------------------


def consolidated_teacher_state_dict(ckpt_dir: str, tag: Optional[str] = None,
                                    trust: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 teacher weights (global megatron names, TP=PP=1) from a run/checkpoint dir saved at
    any TP/PP/DP, both backbones: ``checkpoint.consolidate`` (DP slices concatenated, TP slices merged
    piecewise for fused tensors, PP stages renumbered, the tied output-layer copy dropped)."""
    from rlp_dist.checkpoint.consolidate import SavedCheckpoint

    return SavedCheckpoint(ckpt_dir, tag, trust).state_dict("ema")
