"""Save and restore everything stateful through one path, atomically.

Layout under ``<run.dir>/checkpoints``::

    latest                      name of the newest complete tag (written last, atomically)
    step_00000010/              one tag per saved step
        (DeepSpeed files)       student weights + optimizer + LR scheduler (ZeRO shards),
                                client state (step, data sampler position, config)
        rank_00000.pt           per-rank: RNG states and the EMA teacher's local state

A save writes everything into ``step_XXXXXXXX.tmp/`` (per-rank file first, then DeepSpeed's files),
waits for every rank, and only then rank 0 renames the folder to its final name and replaces
``latest`` (write to ``latest.tmp``, fsync, ``os.replace``). A crash at any point of a save leaves
the previous tag and ``latest`` untouched; a stale ``*.tmp`` folder is removed by the next save.
A tag folder without the ``.tmp`` suffix is complete by construction.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import shutil
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


TMP_SUFFIX = ".tmp"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on a directory
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, run_dir: str, rank: int):
        self.dir = pathlib.Path(run_dir) / "checkpoints"
        self.rank = rank

    def complete_tags(self) -> list[str]:
        """Complete tags (folders named step_XXXXXXXX, no .tmp suffix), oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d{8}", p.name))

    def latest_tag(self) -> Optional[str]:
        """The tag ``latest`` names; the newest complete tag when ``latest`` is missing or stale."""
        f = self.dir / "latest"
        if f.exists():
            tag = f.read_text().strip()
            if tag and (self.dir / tag).is_dir():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any]) -> str:
        """Write tag step_XXXXXXXX atomically (every rank calls it); returns the tag."""
        tag = tag_for(step)
        tmp_tag = tag + TMP_SUFFIX
        tmp_dir, final_dir = self.dir / tmp_tag, self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(f"step_*{TMP_SUFFIX}"):  # left by saves that crashed
                shutil.rmtree(stale, ignore_errors=True)
            tmp_dir.mkdir()
        _barrier()
        rank_file = tmp_dir / f"rank_{self.rank:05d}.pt"
        torch.save({**rank_state, "rng": rng_state()}, rank_file)
        # DeepSpeed writes its shards into <dir>/<tmp_tag>/ and barriers at its end; no 'latest'.
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        _barrier()  # every rank's files are in tmp_dir
        if self.rank == 0:
            if final_dir.exists():  # the same step saved again (e.g. a rerun): replace it
                old = self.dir / (tag + ".old")
                shutil.rmtree(old, ignore_errors=True)
                final_dir.rename(old)
                tmp_dir.rename(final_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp_dir.rename(final_dir)
            _fsync_dir(self.dir)
            _write_atomic(self.dir / "latest", tag)
            _fsync_dir(self.dir)
        _barrier()
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
        raise FileNotFoundError(f"{ckpt_dir!r}: no checkpoints/latest there; pass a run "
                                f"directory (or its checkpoints/ folder) that holds a saved checkpoint")
    tag = tag or (p / "latest").read_text().strip()
    tdir = p / tag
    if any(tdir.glob("zero_pp_rank_*optim_states.pt")) or any(tdir.glob("*zero*model_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(p), tag=tag)
    else:
        sd = torch.load(tdir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return {k: v.float() for k, v in sd.items() if isinstance(v, torch.Tensor)}
