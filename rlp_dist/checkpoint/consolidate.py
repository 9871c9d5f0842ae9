"""A checkpoint saved at any TP x PP x DP (ZeRO 0-3) as full tensors, and back onto any other layout.

Global state: every tensor under its TP=PP=1 megatron name (``decoder.layers.<global index>...``), the
tied output layer dropped. From a tag saved at (tp, pp, dp, zero):

    DP    ZeRO-3: parameter p (numel n) is a slice of k = ceil(n / dp) elements on each DP rank,
              full(p) = cat_r flat_r[o_p : o_p + k] [:n]        (o_p: p's offset in rank r's flat)
          ZeRO-1/2: each parameter group g is one flat vector cut into dp equal partitions,
              full(g) = cat_r part_r(g),  p = full(g)[o_p : o_p + n]
          ZeRO-0: the module's own tensors (fp32), the optimizer's per-parameter state.
          The AdamW moments (exp_avg, exp_avg_sq) live in flats of the same layout as the fp32
          masters and are merged the same way.
    TP    a tensor split over TP is the concatenation of its tp slices along its partition dim
          (:func:`tp_rule`). A fused tensor is split piecewise: each TP rank holds its slice of every
          piece, ``W_r = [P1_r; P2_r; ...]`` (SwiGLU fc1 = [gate_r; up_r]; Mamba in_proj =
          [z_r; x_r; B_r; C_r; dt_r], conv1d = [x_r; B_r; C_r]), so
              full = [cat_r P1_r; cat_r P2_r; ...]
          and slicing for rank r at another TP is the inverse. QKV is megatron's grouped layout
          ([q_g; k_g; v_g] per KV group, groups split contiguously over TP): a plain row concat.
    PP    stage s holds layers [off_s, off_{s+1}) numbered from 0 (``layout.stage_layer_offsets``).

EMA teacher: each rank's rank-state file holds the fp32 master slices of its (TP, PP) shard
(``flat(p)[start : start + n]``, the ZeRO-3 formula above over the DP group): concatenated over DP,
then merged over TP and PP like the student.

Resume at another layout (:func:`resume_resharded`): each rank builds, per local parameter, its full
TP-sliced tensor from the global one and writes it with DeepSpeed's ``safe_set_full_fp32_param`` /
``safe_set_full_optimizer_state`` (ZeRO-1/2/3; ZeRO-0 directly): weights, fp32 masters, exp_avg,
exp_avg_sq; then the optimizer step count, the LR scheduler, the EMA masters, the data sampler and
the step. Tensors are read one parameter at a time from memory-mapped files, so a rank holds one full
parameter (plus its slices) at a time, not the model: at 12B the largest (the 151936 x 5120 fp32
embedding) is 3.1 GB.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from rlp_dist.checkpoint.layout import (INIT_FLAG, CheckpointError, PathLike, Topology, read_rank_state_file,
                                        read_topology, resolve_tag, safe_torch_load, stage_layer_offsets)
from rlp_dist.config.schema import ModelConfig

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
KINDS = ("fp32", "exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------------------------------
# Tensor-parallel layout of each parameter
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """How TP splits a tensor: dim -1 replicated, 0 rows, 1 columns; ``sizes``: the full sizes of
    the fused pieces along dim 0 (each split over TP); ``parts``: that many equal pieces."""

    dim: int
    sizes: Optional[tuple[int, ...]] = None
    parts: int = 1

    def piece_sizes(self, rows: int) -> list[int]:
        return list(self.sizes) if self.sizes else [rows // self.parts] * self.parts


def tp_rule(name: str, mcfg: ModelConfig) -> Rule:
    """The TP split of the parameter ``name`` (local or global megatron name) of preset ``mcfg``.
    Must agree with ``models.hf.entries`` (checked in tests/ops/test_checkpoint_parallelism.py)."""
    if re.search(r"(layernorm|layer_norm|final_norm)\.weight$", name) or re.search(r"layers\.\d+\.norm\.weight$", name):
        return Rule(-1)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight", "mixer.out_proj.weight")):
        return Rule(1)
    if name.endswith("mlp.linear_fc1.weight"):
        return Rule(0, parts=2 if mcfg.activation == "swiglu" else 1)
    if name.endswith(("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias")):
        d_inner = mcfg.mamba_num_heads * mcfg.mamba_head_dim
        gn = mcfg.mamba_num_groups * mcfg.mamba_state_dim
        xbc = (d_inner, gn, gn)
        return Rule(0, sizes=(d_inner, *xbc, mcfg.mamba_num_heads) if "in_proj" in name else xbc)
    if name.endswith(("linear_qkv.weight", "mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight")) \
            or name in (EMBED, OUTPUT):
        return Rule(0)
    raise CheckpointError(f"no tensor-parallel layout known for parameter {name!r}; the layer spec changed "
                          f"without updating rlp_dist/checkpoint/consolidate.py tp_rule")


def merge_tp(shards: Sequence[torch.Tensor], rule: Rule) -> torch.Tensor:
    """The full tensor from its TP slices (rank order)."""
    if rule.dim < 0 or len(shards) == 1:
        return shards[0]
    if rule.dim == 1:
        return torch.cat(list(shards), 1)
    tp = len(shards)
    sizes = [s // tp for s in rule.piece_sizes(shards[0].shape[0] * tp)]
    per_rank = [s.split(sizes, 0) for s in shards]  # per rank: its slice of each piece
    return torch.cat([per_rank[r][i] for i in range(len(sizes)) for r in range(tp)], 0)


def split_tp(full: torch.Tensor, rule: Rule, tp: int, tp_rank: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s slice of a full tensor (the inverse of :func:`merge_tp`)."""
    if rule.dim < 0 or tp == 1:
        return full
    if rule.dim == 1:
        return full.chunk(tp, 1)[tp_rank]
    pieces = full.split(rule.piece_sizes(full.shape[0]), 0)
    for p in pieces:
        if p.shape[0] % tp:
            raise CheckpointError(f"a fused piece of {p.shape[0]} rows does not split over tensor parallel size {tp}")
    return torch.cat([p.chunk(tp, 0)[tp_rank] for p in pieces], 0)


def model_config(saved: dict) -> ModelConfig:
    """The ModelConfig of a saved config's ``model`` section (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in names})


def _to_global(local: str, offset: int) -> str:
    return re.sub(r"^decoder\.layers\.(\d+)\.", lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", local)


# --------------------------------------------------------------------------------------------------
# DeepSpeed's files of one model-parallel rank
# --------------------------------------------------------------------------------------------------


class _MpRank:
    """Per local parameter of one (TP, PP) shard: its fp32 value and AdamW moments, merged over DP.
    Files are memory-mapped: a tensor is read when asked for."""

    def __init__(self, tag_dir: pathlib.Path, mp_rank: int, topo: Topology, trust: bool, flag: str):
        from rlp_dist.checkpoint.layout import model_states_file

        self.where = f"{tag_dir} (model-parallel rank {mp_rank})"
        self.states = safe_torch_load(model_states_file(tag_dir, mp_rank), trust, flag, mmap=True)
        self.module = self.states.get("module") or {}
        files = []
        for d in range(topo.dp):
            found = sorted(tag_dir.glob(f"*zero_pp_rank_{d}_mp_rank_{mp_rank:02d}_optim_states.pt"))
            files += found[:1]
        if files and len(files) != topo.dp:
            raise CheckpointError(f"{self.where}: {len(files)} of {topo.dp} ZeRO optimizer files; the checkpoint is "
                                  f"incomplete, use another tag")
        self.optim = [safe_torch_load(f, trust, flag, mmap=True)["optimizer_state_dict"] for f in files]
        shapes = self.states.get("param_shapes")
        if self.optim and not shapes:
            raise CheckpointError(f"{self.where}: no param_shapes in the model states; not a DeepSpeed ZeRO checkpoint")
        self.index: dict[str, tuple] = {}
        self.stage3 = bool(self.optim) and int(self.optim[0].get("zero_stage", 0)) == 3
        if self.stage3:
            self._index_stage3(shapes)
        elif self.optim:
            self._index_flat(shapes)
        else:  # ZeRO-0: the module holds full tensors, the optimizer one state per parameter
            buffers = set(self.states.get("buffer_names") or [])
            names = [k for k, v in self.module.items() if isinstance(v, torch.Tensor) and k not in buffers]
            self.index = {n: ("module", i) for i, n in enumerate(names)}

    def _index_stage3(self, shapes) -> None:
        sizes = [g.numel() for g in self.optim[0]["fp32_flat_groups"]]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        dp, off = len(self.optim), 0
        for group in shapes:
            for name, shape in group.items():
                n = math.prod(shape)
                k = math.ceil(n / dp)
                j = max(i for i, s in enumerate(starts) if s <= off)
                self.index[name] = ("z3", j, off - starts[j], k, n, tuple(shape))
                off += k

    def _index_flat(self, shapes) -> None:
        pads = self.optim[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            off = 0
            for i, (name, shape) in enumerate(group.items()):
                n = math.prod(shape)
                self.index[name] = ("flat", g, off, n, tuple(shape))
                off += n + (pads[g][i] if pads is not None else 0)

    def names(self) -> list[str]:
        return list(self.index)

    def _flats(self, kind: str, rank: int) -> list[torch.Tensor]:
        o = self.optim[rank]
        if kind == "fp32":
            return list(o["fp32_flat_groups"] if self.stage3 else o["single_partition_of_fp32_groups"])
        state = (o["optimizer_state_dict"] if self.stage3 else o["base_optimizer_state"])
        state = state["state"] if isinstance(state, dict) else state[0]["state"]
        return [state[j][kind] for j in sorted(state)]

    def step(self) -> Optional[torch.Tensor]:
        """The optimizer's step count (a 0-d tensor), None before the first step."""
        if self.optim:
            o = self.optim[0]
            state = o["optimizer_state_dict"] if self.stage3 else o["base_optimizer_state"]
            state = state["state"] if isinstance(state, dict) else state[0]["state"]
        else:
            state = (self.states.get("optimizer") or {}).get("state", {})
        first = state[min(state)] if state else {}
        return first.get("step")

    def get(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """Full (this TP/PP shard) fp32 tensor ``kind`` of local parameter ``name``."""
        if name not in self.index:
            raise CheckpointError(f"{self.where}: no parameter {name!r}")
        entry = self.index[name]
        if entry[0] == "module":
            if kind == "fp32":
                return self.module[name].float().clone()
            st = (self.states.get("optimizer") or {}).get("state", {})
            if entry[1] not in st:
                raise CheckpointError(f"{self.where}: no optimizer state for {name!r}")
            return st[entry[1]][kind].float().clone()
        if entry[0] == "z3":
            _, j, o, k, n, shape = entry
            parts = [self._flats(kind, r)[j].narrow(0, o, k) for r in range(len(self.optim))]
            return torch.cat(parts)[:n].float().view(shape).clone()
        _, g, o, n, shape = entry
        pieces = []
        for r in range(len(self.optim)):
            part = self._flats(kind, r)[g]
            lo, hi = r * part.numel(), (r + 1) * part.numel()  # this partition's range of the group vector
            a, b = max(o, lo), min(o + n, hi)
            if a < b:
                pieces.append(part.narrow(0, a - lo, b - a))
        return torch.cat(pieces).float().view(shape).clone()


# --------------------------------------------------------------------------------------------------
# A saved tag, read as global tensors
# --------------------------------------------------------------------------------------------------


class SavedCheckpoint:
    """Global (TP=PP=1) tensors of a tag saved at any layout; files opened on first use."""

    def __init__(self, run_dir: PathLike, tag: Optional[str] = None, trust: bool = False, flag: str = INIT_FLAG):
        """trust: unpickle DeepSpeed's files in full; flag: the setting named in a refusal."""
        self.tag_dir = resolve_tag(run_dir, tag)
        self.trust, self.flag = trust, flag
        self._mp: dict[int, _MpRank] = {}
        self._ema: Optional[dict] = None
        try:
            self.topo, self.cfg = read_topology(self.tag_dir, trust, flag)
        except CheckpointError as e:  # saved without a config (library use): the teacher states tell
            self.cfg, self.no_config = None, str(e)
            self.topo = self._topology_from_teacher()
            self.mcfg, self.offsets = None, None
            return
        self.mcfg = model_config(self.cfg["model"])
        self.offsets = stage_layer_offsets(self.mcfg.num_layers, self.topo.pp)

    def _topology_from_teacher(self) -> Topology:
        from rlp_dist.checkpoint.layout import rank_state_files

        files = rank_state_files(self.tag_dir)
        t = _lazy_teacher(files[0], self.trust, self.flag) if files else None
        if t is None:
            raise CheckpointError(self.no_config)
        r = t["ranks"]
        return Topology(r["tp"], r["pp"], r["dp"], -1)

    def _rule(self, gname: str, teacher: Optional[dict] = None, local: str = "") -> Rule:
        if self.mcfg is not None:
            return tp_rule(gname, self.mcfg)
        # No saved config: the teacher's own record (partition dim, SwiGLU halves); fused Mamba
        # tensors need the preset's sizes.
        dim = int(teacher["tp_dims"][local])
        if dim >= 0 and self.topo.tp > 1 and re.search(r"mixer\.(in_proj|conv1d)\.", gname):
            raise CheckpointError(f"{self.tag_dir}: no config.json to tell the Mamba sizes of {gname} saved at "
                                  f"tp={self.topo.tp}; the checkpoint was not written by train.save")
        glu = bool(teacher["glu"]) and local.endswith("mlp.linear_fc1.weight")
        return Rule(dim, parts=2 if glu else 1)

    # ---- names ---------------------------------------------------------------------------------
    def stage_of(self, gname: str) -> tuple[int, str]:
        """(pipeline stage, local name) of a global parameter name."""
        m = re.match(r"^decoder\.layers\.(\d+)\.", gname)
        if m:
            g = int(m.group(1))
            s = max(i for i, off in enumerate(self.offsets) if off <= g)
            return s, f"decoder.layers.{g - self.offsets[s]}." + gname[m.end():]
        return (0 if gname == EMBED else self.topo.pp - 1), gname

    def _tied(self) -> bool:
        self._need_config()
        return bool(self.mcfg.tie_embeddings)

    def _need_config(self) -> None:
        if self.mcfg is None:
            raise CheckpointError(self.no_config)

    def _mp_rank(self, tp_rank: int, pp_rank: int) -> _MpRank:
        mp = self.topo.mp_rank(tp_rank, pp_rank)
        if mp not in self._mp:
            self._mp[mp] = _MpRank(self.tag_dir, mp, self.topo, self.trust, self.flag)
        return self._mp[mp]

    def student_names(self) -> list[str]:
        self._need_config()
        out = []
        for s in range(self.topo.pp):
            for local in self._mp_rank(0, s).names():
                g = _to_global(local, self.offsets[s])
                if not (g == OUTPUT and self._tied()) and not local.endswith("_extra_state"):
                    out.append(g)
        return out

    # ---- student -------------------------------------------------------------------------------
    def student(self, gname: str, kind: str = "fp32") -> torch.Tensor:
        """The full fp32 tensor ``kind`` (fp32 | exp_avg | exp_avg_sq) of global parameter ``gname``."""
        self._need_config()
        if gname == OUTPUT and self._tied():
            gname = EMBED
        s, local = self.stage_of(gname)
        rule = tp_rule(gname, self.mcfg)
        tps = range(self.topo.tp) if rule.dim >= 0 else range(1)
        return merge_tp([self._mp_rank(t, s).get(local, kind) for t in tps], rule)

    def student_step(self) -> Optional[torch.Tensor]:
        return self._mp_rank(0, 0).step()

    def model_states(self) -> dict:
        """DeepSpeed's model states of mp rank 0: client state, lr_scheduler, global_steps, ..."""
        return self._mp_rank(0, 0).states

    # ---- EMA teacher ---------------------------------------------------------------------------
    def _teacher_files(self) -> dict:
        """(tp_rank, pp_rank) -> [(dp_rank, layout entries, master getter)] from every rank file."""
        if self._ema is not None:
            return self._ema
        from rlp_dist.checkpoint.layout import rank_state_files

        out: dict[tuple[int, int], list] = {}
        for f in rank_state_files(self.tag_dir):
            teacher = _lazy_teacher(f, self.trust, self.flag)
            if teacher is None:
                raise CheckpointError(f"{f}: no EMA teacher state (an objective=ntp run?); export --which student")
            r = teacher["ranks"]
            out.setdefault((r["tp_rank"], r["pp_rank"]), []).append((r["dp_rank"], teacher))
        for key, group in out.items():
            group.sort(key=lambda x: x[0])
            if len(group) != self.topo.dp:
                raise CheckpointError(f"{self.tag_dir}: tp rank {key[0]} pp rank {key[1]} has {len(group)} of "
                                      f"{self.topo.dp} DP rank files")
        self._ema = out
        return out

    def _teacher_index(self) -> dict[str, tuple[int, str]]:
        """Global name -> (pipeline stage, local name), from the teachers' own name maps."""
        out = {}
        for (tp_rank, pp_rank), group in self._teacher_files().items():
            if tp_rank == 0:
                for local, g in group[0][1]["global_names"].items():
                    out[g] = (pp_rank, local)
        return out

    def _teacher_local(self, tp_rank: int, pp_rank: int, local: str) -> torch.Tensor:
        group = self._teacher_files()[(tp_rank, pp_rank)]
        entry = next((e for e in group[0][1]["layout"] if e[0] == local), None)
        if entry is None:
            raise CheckpointError(f"{self.tag_dir}: the EMA teacher has no parameter {local!r}")
        shape = tuple(entry[1])
        flat = torch.cat([t["master"](local) for _, t in group])  # (numel,): DP slices in rank order
        return flat.view(shape)

    def _ema_tied(self) -> bool:
        return self._tied() if self.mcfg is not None else bool(self._teacher_files()[(0, 0)][0][1]["tied"])

    def ema_names(self) -> list[str]:
        return [g for g in self._teacher_index() if not (g == OUTPUT and self._ema_tied())]

    def ema(self, gname: str) -> torch.Tensor:
        """The EMA teacher's full fp32 master of global parameter ``gname``."""
        if gname == OUTPUT and self._ema_tied():
            gname = EMBED
        index = self._teacher_index()
        if gname not in index:
            raise CheckpointError(f"{self.tag_dir}: the EMA teacher has no parameter {gname!r}")
        s, local = index[gname]
        rule = self._rule(gname, self._teacher_files()[(0, s)][0][1], local)
        tps = range(self.topo.tp) if rule.dim >= 0 else range(1)
        return merge_tp([self._teacher_local(t, s, local) for t in tps], rule)

    def ema_meta(self) -> dict:
        """initialized / num_updates of the teacher (equal on every rank)."""
        t = self._teacher_files()[(0, 0)][0][1]
        return {"initialized": bool(t["initialized"]), "num_updates": int(t["num_updates"])}

    def state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        if which == "student":
            return {g: self.student(g) for g in self.student_names()}
        if which == "ema":
            return {g: self.ema(g) for g in self.ema_names()}
        raise ValueError(f"which={which!r}: use 'student' or 'ema'")


def _lazy_teacher(path: pathlib.Path, trust: bool = False, flag: str = INIT_FLAG) -> Optional[dict]:
    """The teacher section of a rank file with ``master(name)`` reading one tensor on demand."""
    if path.suffix == ".pt":  # an earlier version's pickle (weights-only)
        teacher = read_rank_state_file(path, trust, flag).get("teacher")
        if teacher is not None:
            teacher = {**teacher, "master": lambda n, m=teacher["masters"]: m[n].float()}
        return teacher
    import json

    from safetensors import safe_open

    from rlp_dist.checkpoint.layout import _decode

    with safe_open(str(path), framework="pt") as f:
        tree = json.loads((f.metadata() or {}).get("tree", "{}"))
    teacher = tree.get("teacher")
    if teacher is None:
        return None
    refs = teacher.pop("masters")
    out = _decode(teacher, {})

    def master(name: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(refs[name]["__tensor__"]).float()

    out["master"] = master
    return out


def load_full_state(run_dir: PathLike, which: str = "student", tag: Optional[str] = None,
                    trust: bool = False, flag: str = INIT_FLAG) -> dict[str, torch.Tensor]:
    """Global (TP=PP=1 names, fp32) weights of the student or the EMA teacher of a checkpoint saved
    at any TP/PP/DP/ZeRO. ``run_dir``: a run directory or its checkpoints/ folder; ``tag``: default
    the one ``latest`` names. Also reads ``convert hf-to-ckpt`` imports (``hf_import``, student only).
    DeepSpeed's files are read weights-only unless ``trust``; a refusal names ``flag``."""
    from rlp_dist.checkpoint.layout import checkpoint_root

    root = checkpoint_root(run_dir)
    tdir = resolve_tag(root, tag)
    imported = tdir / "model.safetensors"
    if imported.is_file() and not any(tdir.glob("*model_states.pt")):
        if which != "student":
            raise CheckpointError(f"{tdir}: an imported transformers checkpoint has no EMA teacher; use --which student")
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(imported)).items()}
    if not (tdir / "config.json").is_file() and (tdir / "mp_rank_00_model_states.pt").is_file() \
            and not any(tdir.glob("rank_*")):
        # a single-file import from an earlier version (convert hf-to-ckpt): {"module": state dict}
        sd = safe_torch_load(tdir / "mp_rank_00_model_states.pt", trust, flag)["module"]
        return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return SavedCheckpoint(root, tdir.name, trust, flag).state_dict(which)


# --------------------------------------------------------------------------------------------------
# Resume at another TP / PP / DP / ZeRO stage
# --------------------------------------------------------------------------------------------------


def layouts_differ(saved: Topology, dims, zero_stage: int) -> bool:
    return (saved.tp, saved.pp, saved.dp, saved.zero_stage) != (dims.tp, dims.pp, dims.dp, zero_stage)


def resume_resharded(tr, tag: Optional[str] = None) -> bool:
    """Restore ``tr`` (a train.Trainer) from a tag saved at another (tp, pp, dp, zero_stage).

    Returns False (nothing done) when there is no checkpoint or the layouts match: DeepSpeed's own
    exact load then runs. Otherwise every rank rebuilds its shards from the global tensors: the
    student's weights, fp32 masters and AdamW moments, the optimizer step count, the LR scheduler,
    DeepSpeed's step counters, the EMA teacher's masters, the data sampler and the step. The per-rank
    RNG states are not carried over (the sampling RNG is keyed by (seed, step, dp_rank), not by them)."""
    from rlp_dist.checkpoint.manager import check_same_preset
    from rlp_dist.config.schema import to_dict

    tag = tag or tr.ckpt.latest_tag()
    if tag is None:
        return False
    from rlp_dist.checkpoint.safe_load import RESUME_FLAG

    trust = bool(getattr(tr.cfg.checkpoint, "trust", False))
    saved, _ = read_topology(tr.ckpt.dir / tag, trust, RESUME_FLAG)
    if not layouts_differ(saved, tr.dims, tr.cfg.parallel.zero_stage):
        return False
    check_same_preset(tr.ckpt.dir / tag, to_dict(tr.cfg)["model"], "checkpoint.resume")
    ck = SavedCheckpoint(tr.ckpt.dir, tag, trust, RESUME_FLAG)
    mcfg = model_config(to_dict(tr.cfg)["model"])
    _load_student(tr.engine, ck, tr.dims, mcfg)
    _load_engine_counters(tr.engine, ck)
    if tr.teacher is not None:
        _load_teacher(tr.teacher, ck, tr.dims, mcfg)
    client = ck.model_states()
    tr.load_client_state(client)  # step, sampler, FLOP meter
    if tr.dims.is_rank0:
        print(f"resumed {ck.tag_dir} saved at {saved.short()} into tp={tr.dims.tp} pp={tr.dims.pp} "
              f"dp={tr.dims.dp} zero={tr.cfg.parallel.zero_stage} (resharded from global tensors)", flush=True)
    return True


def _local_rule(model, mcfg):
    from rlp_dist.rlp.ema import global_param_names

    names = global_param_names(model)
    return names, {n: tp_rule(g, mcfg) for n, g in names.items()}


def _full_shape(p: torch.nn.Parameter) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


@torch.no_grad()
def _load_student(engine, ck: SavedCheckpoint, dims, mcfg: ModelConfig) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model = engine.module
    names, rules = _local_rule(model, mcfg)
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch AdamW inside ZeRO
    step = ck.student_step()
    _ensure_adam_state(engine.optimizer, base)
    for local, p in model.named_parameters():
        if not p.requires_grad:
            continue
        vals = {k: split_tp(ck.student(names[local], k), rules[local], dims.tp, dims.tp_rank) for k in KINDS}
        if tuple(vals["fp32"].shape) != _full_shape(p):
            raise CheckpointError(f"{ck.tag_dir}: {names[local]} gives shape {tuple(vals['fp32'].shape)} at tp rank "
                                  f"{dims.tp_rank}/{dims.tp}, the model needs {_full_shape(p)}; not this preset/vocab")
        if hasattr(p, "ds_id"):  # ZeRO-3: the fp32 partition and moments, and the compute shard
            safe_set_full_fp32_param(p, vals["fp32"].to(p.ds_tensor.device))
            k = math.ceil(p.ds_numel / dims.dp)
            n = max(0, min(k, p.ds_numel - dims.dp_rank * k))
            p.ds_tensor.narrow(0, 0, n).copy_(vals["fp32"].reshape(-1).narrow(0, dims.dp_rank * k, n))
        else:
            p.data.copy_(vals["fp32"].to(p.dtype))
            if getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: the fp32 master fragment
                safe_set_full_fp32_param(p, vals["fp32"].to(p.device))
        for kind in ("exp_avg", "exp_avg_sq"):
            if hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
                safe_set_full_optimizer_state(p, vals[kind].to(p.device), kind)
            else:  # ZeRO-0: the torch optimizer's own per-parameter state
                base.state[p][kind] = vals[kind].to(p.device, p.dtype).clone()
    if step is not None:
        for st in base.state.values():
            if "step" in st:
                st["step"] = step.clone() if isinstance(st["step"], torch.Tensor) else int(step)
            else:
                st["step"] = step.clone()


def _ensure_adam_state(zero_opt, opt) -> None:
    """AdamW creates its state at the first step; a resume before it needs the slots to write into.
    ZeRO keys them by its flat fp32 partitions (ZeRO-3 puts them into the param groups only during
    its step), ZeRO-0 by the parameters."""
    keys = None
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if getattr(zero_opt, attr, None) is not None and zero_opt is not opt:
            keys = list(getattr(zero_opt, attr))
            break
    if keys is None:
        keys = [p for group in opt.param_groups for p in group["params"]]
    for p in keys:
        st = opt.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(zero_opt, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2, bf16: point each parameter's fragment at the new state
        link()


def _load_engine_counters(engine, ck: SavedCheckpoint) -> None:
    """LR scheduler (its lr pushed into the optimizer's groups) and DeepSpeed's step counters."""
    states = ck.model_states()
    sched = engine.lr_scheduler
    if sched is not None and states.get("lr_scheduler"):
        sched.load_state_dict(states["lr_scheduler"])
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(states.get("global_steps", engine.global_steps))
    engine.global_samples = int(states.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(states.get("skipped_steps", engine.skipped_steps))


def _load_teacher(teacher, ck: SavedCheckpoint, dims, mcfg: ModelConfig) -> None:
    names, rules = _local_rule(teacher.module, mcfg)
    meta = ck.ema_meta()

    def full(local: str) -> torch.Tensor:  # this rank's TP shard of the global master
        return split_tp(ck.ema(names[local]), rules[local], dims.tp, dims.tp_rank)

    teacher.load_full_state(full, meta["initialized"], meta["num_updates"])
