"""Save and restore everything stateful through one path.

Layout under ``<run.dir>/checkpoints``::

    latest                      DeepSpeed's pointer to the newest complete tag (written last)
    step_00000010/              one tag per saved step
        (DeepSpeed files)       student weights + optimizer + LR scheduler (ZeRO shards)
        rank_00000.pt           per-rank: RNG states and the EMA teacher's local state

The client state (step, data sampler position, config) rides in DeepSpeed's own files. The
per-rank file is written *before* DeepSpeed's save, and DeepSpeed writes ``latest`` only after its
own files: a tag that ``latest`` points at is complete.
"""

from __future__ import annotations

import pathlib
import random
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    def __init__(self, run_dir: str, rank: int):
        self.dir = pathlib.Path(run_dir) / "checkpoints"
        self.rank = rank

    def latest_tag(self) -> Optional[str]:
        f = self.dir / "latest"
        if not f.exists():
            return None
        tag = f.read_text().strip()
        return tag if (self.dir / tag).is_dir() else None

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        rank_file = tag_dir / f"rank_{self.rank:05d}.pt"
        tmp = rank_file.with_suffix(".pt.tmp")
        torch.save({**rank_state, "rng": rng_state()}, tmp)
        tmp.replace(rank_file)
        if dist.is_initialized():
            dist.barrier()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=True)
        return tag

    def load(self, engine, tag: Optional[str] = None) -> Optional[tuple[dict, dict]]:
        """Restore the engine; returns (client_state, rank_state) or None if there is nothing."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        rank_file = self.dir / tag / f"rank_{self.rank:05d}.pt"
        if not rank_file.exists():
            raise FileNotFoundError(
                f"checkpoint {self.dir / tag} has no {rank_file.name}: it was written with a different "
                f"number of ranks; resume with the same world size or start a new run.dir")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}; "
                               f"remove that tag (and fix 'latest') to fall back to an earlier one")
        rank_state = torch.load(rank_file, weights_only=False)
        set_rng_state(rank_state["rng"])
        return client_state, rank_state


def consolidated_state_dict(ckpt_dir: str, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The student's full fp32 weights from a checkpoint (any ZeRO stage), for ``model.init_from``.

    Single model-parallel rank checkpoints only (TP=PP=1); sharded ones go through dist checkpoints.
    """
    p = pathlib.Path(ckpt_dir)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not (p / "latest").exists() and tag is None:
        raise FileNotFoundError(f"model.init_from={ckpt_dir!r}: no checkpoints/latest there; pass a run "
                                f"directory (or its checkpoints/ folder) that holds a saved checkpoint")
    tag = tag or (p / "latest").read_text().strip()
    tdir = p / tag
    if any(tdir.glob("zero_pp_rank_*optim_states.pt")) or any(tdir.glob("*zero*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(p), tag=tag)
    else:
        sd = torch.load(tdir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
