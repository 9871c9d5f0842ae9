"""On-disk formats of a checkpoint tag, read and written without running code.

A tag folder (``checkpoints/step_XXXXXXXX``) holds DeepSpeed's files and one rank-state file per
global rank::

    mp_rank_MM_model_states.pt                  ZeRO-0/1/2: module weights + client state (step,
    zero_pp_rank_D_mp_rank_MM_model_states.pt   sampler, config), ZeRO-3: client state only
    [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   fp32 masters + AdamW moments, DP-partitioned
    rank_RRRRR.safetensors                      ours: RNG states, the EMA teacher's fp32 masters

Rank layout (megatron's ``tp-cp-ep-dp-pp`` order, ``distributed.parallel``): global rank
``r = tp_rank + tp * (dp_rank + dp * pp_rank)``; DeepSpeed's model-parallel rank (its rank in the
TP x PP group) is ``mm = tp_rank + tp * pp_rank``.

Rank-state file: one safetensors file; every tensor of the state tree is a safetensors tensor and
the tree itself (dicts, lists, tuples, numbers, strings, numpy arrays by reference) is JSON in the
header metadata (``__metadata__["tree"]``). Reading it runs no code (no pickle). Files written by
earlier versions (``rank_RRRRR.pt``, a pickle) are read with ``torch.load(weights_only=True)`` and
numpy's array reconstruction allow-listed, or refused with one line.

DeepSpeed's own ``*.pt`` files are pickles; :func:`safe_torch_load` reads them through
``checkpoint.safe_load`` (``weights_only=True``, DeepSpeed's plain-data classes allow-listed); anything
else is refused with one line naming the file and the flag that trusts it.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from rlp_dist.checkpoint.safe_load import INIT_FLAG, CheckpointLoadError, guarded_loads

RANK_STATE_FORMAT = "rlp_dist.rank_state.v2"
PathLike = Union[str, pathlib.Path]


CheckpointError = CheckpointLoadError  # one line: file, reason, fix (rlp_dist.checkpoint.safe_load)


def safe_torch_load(path: PathLike, trust: bool = False, flag: str = INIT_FLAG, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU with DeepSpeed's plain-data classes
    allowed (``safe_load.load``); ``trust`` unpickles anything (the user's ``flag``). ``mmap`` maps the
    tensor storages instead of reading them (only the slices used are read)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the file is missing from the checkpoint", str(path))
    with guarded_loads(flag, trust):
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=mmap)


# --------------------------------------------------------------------------------------------------
# Rank-state files: a tree of tensors + JSON in one safetensors file.
# --------------------------------------------------------------------------------------------------


def rank_state_path(tag_dir: PathLike, rank: int) -> pathlib.Path:
    return pathlib.Path(tag_dir) / f"rank_{rank:05d}.safetensors"


def legacy_rank_state_path(tag_dir: PathLike, rank: int) -> pathlib.Path:
    return pathlib.Path(tag_dir) / f"rank_{rank:05d}.pt"


def has_rank_state(tag_dir: PathLike, rank: int) -> bool:
    return rank_state_path(tag_dir, rank).is_file() or legacy_rank_state_path(tag_dir, rank).is_file()


def rank_state_files(tag_dir: PathLike) -> list[pathlib.Path]:
    """Every rank file of a tag (new format, else the legacy .pt ones), in rank order."""
    tag_dir = pathlib.Path(tag_dir)
    return sorted(tag_dir.glob("rank_*.safetensors")) or sorted(tag_dir.glob("rank_*.pt"))


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able form of ``obj``; tensors and numpy arrays go to ``tensors`` under their tree path."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            t = t.contiguous().clone()  # a view into a larger buffer: safetensors stores owned tensors
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj).astype(np.int64) if obj.dtype.kind in "ui"
                                         else np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": path, "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):  # incl. torch.Size
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}/k{i}"), _encode(v, tensors, f"{path}/{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"rank state {path}: {type(obj).__name__} cannot be stored without pickle; "
                    f"use tensors, numpy arrays, numbers, strings, lists, tuples and dicts")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def write_rank_state(tag_dir: PathLike, rank: int, state: dict) -> pathlib.Path:
    """Write one rank's state tree as ``rank_RRRRR.safetensors`` (no pickle anywhere)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "")
    path = rank_state_path(tag_dir, rank)
    save_file(tensors, str(path), metadata={"format": RANK_STATE_FORMAT, "tree": json.dumps(tree)})
    return path


def read_rank_state(tag_dir: PathLike, rank: int, trust: bool = False, flag: str = INIT_FLAG) -> dict:
    """One rank's state tree; the legacy ``rank_RRRRR.pt`` pickle only through weights_only."""
    path = rank_state_path(tag_dir, rank)
    if path.is_file():
        return read_rank_state_file(path)
    legacy = legacy_rank_state_path(tag_dir, rank)
    if legacy.is_file():
        return safe_torch_load(legacy, trust=trust, flag=flag)
    raise CheckpointError(f"checkpoint {tag_dir} has no {path.name}: it was written by a run with fewer "
                          f"ranks, or the save did not finish; use another tag")


def read_rank_state_file(path: PathLike, trust: bool = False, flag: str = INIT_FLAG) -> dict:
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if path.suffix == ".pt":
        return safe_torch_load(path, trust, flag)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot be read ({str(e)[:200]}); the file is damaged or incomplete: "
                              f"use an earlier checkpoint tag") from None
    if meta.get("format") != RANK_STATE_FORMAT:
        raise CheckpointError(f"{path}: not an rlp-dist rank-state file (format {meta.get('format')!r}, "
                              f"want {RANK_STATE_FORMAT!r})")
    return _decode(json.loads(meta["tree"]), tensors)


# --------------------------------------------------------------------------------------------------
# Topology of a saved tag
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    tp: int
    pp: int
    dp: int
    zero_stage: int
    dtype: str = "fp32"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def mp_rank(self, tp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * pp_rank

    def short(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero_stage}"


def checkpoint_root(run_or_ckpt_dir: PathLike) -> pathlib.Path:
    p = pathlib.Path(run_or_ckpt_dir)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def resolve_tag(run_or_ckpt_dir: PathLike, tag: Optional[str] = None) -> pathlib.Path:
    """The tag folder: ``tag`` or the one ``latest`` names (one-line error when there is none)."""
    root = checkpoint_root(run_or_ckpt_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{run_or_ckpt_dir}: no checkpoints/latest there; pass a run directory "
                                  f"(or its checkpoints/ folder) that holds a saved checkpoint")
        try:
            tag = latest.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise CheckpointError(f"{latest}: not a tag name (binary data); write the tag folder's name "
                                  f"into it, or pass --tag") from None
    tdir = root / tag
    if not tdir.is_dir():
        raise CheckpointError(f"{root}: no checkpoint tag folder {tag!r}")
    return tdir


def model_states_file(tag_dir: PathLike, mp_rank: int = 0) -> pathlib.Path:
    """DeepSpeed's model-state file of an mp rank (ZeRO-0/1/2 name, else ZeRO-3's DP rank 0 one)."""
    tag_dir = pathlib.Path(tag_dir)
    for name in (f"mp_rank_{mp_rank:02d}_model_states.pt", f"zero_pp_rank_0_mp_rank_{mp_rank:02d}_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no DeepSpeed model-state file for model-parallel rank {mp_rank} "
                          f"(mp_rank_{mp_rank:02d}_model_states.pt); not a complete rlp-dist checkpoint")


def read_topology(tag_dir: PathLike, trust: bool = False, flag: str = INIT_FLAG) -> tuple[Topology, dict]:
    """(saved topology, saved config) of a tag. The config comes from the tag's ``config.json``
    (written at save, ``manager.saved_config``) or else from DeepSpeed's client state; the DP size is
    the number of rank-state files (one per global rank) / (tp * pp)."""
    tag_dir = pathlib.Path(tag_dir)
    try:
        cfg = json.loads((tag_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = safe_torch_load(model_states_file(tag_dir, 0), trust=trust, flag=flag).get("config") or {}
    par = cfg.get("parallel") or {}
    if not cfg.get("model") or not par:
        raise CheckpointError(f"{tag_dir}: the checkpoint does not record its config (model, parallel); "
                              f"it was not written by rlp-dist")
    tp, pp = int(par.get("tp", 1)), int(par.get("pp", 1))
    world = len(rank_state_files(tag_dir))
    if world == 0 or world % (tp * pp):
        raise CheckpointError(f"{tag_dir}: {world} rank-state files do not fit the saved tp={tp} x pp={pp}; "
                              f"the checkpoint is incomplete, use another tag")
    dtype = (cfg.get("train") or {}).get("dtype", "fp32")
    return Topology(tp, pp, world // (tp * pp), int(par.get("zero_stage", 0)), dtype), cfg


def stage_layer_offsets(num_layers: int, pp: int) -> list[int]:
    """First global layer index of each pipeline stage (``models.builder.pipeline_split``)."""
    from rlp_dist.models.builder import pipeline_split

    split = pipeline_split(num_layers, pp)
    if not split:
        counts = [num_layers // pp] * pp
    else:
        first, last = split["num_layers_in_first_pipeline_stage"], split["num_layers_in_last_pipeline_stage"]
        middle = (num_layers - first - last) // max(1, pp - 2)
        counts = [first] + [middle] * (pp - 2) + [last]
    return [sum(counts[:i]) for i in range(pp)]


def has_teacher_state(tag_dir: PathLike) -> bool:
    """Whether a tag's rank files hold an EMA teacher (objective=rlp), reading only rank 0's header."""
    files = rank_state_files(tag_dir)
    if not files:
        return False
    if files[0].suffix == ".pt":
        return read_rank_state_file(files[0]).get("teacher") is not None
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("tree", "{}")).get("teacher") is not None
