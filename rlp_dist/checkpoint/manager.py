"""Save and restore everything stateful through one path, atomically.

Layout under ``<run.dir>/checkpoints``::

    latest                      name of the newest complete tag (written last, atomically)
    step_00000010/              one tag per saved step
        (DeepSpeed files)       student weights + optimizer + LR scheduler (ZeRO shards),
                                client state (step, data sampler position, config)
        rank_00000.safetensors  per-rank: RNG states and the EMA teacher's local state (no pickle:
                                checkpoint.layout; checkpoint.consolidate reads any TP/PP/DP layout)

A save writes everything into ``step_XXXXXXXX.tmp/`` (per-rank file first, then DeepSpeed's files),
waits for every rank, and only then rank 0 renames the folder to its final name and replaces
``latest`` (write to ``latest.tmp``, fsync, ``os.replace``). A crash at any point of a save leaves
the previous tag and ``latest`` untouched; a stale ``*.tmp`` folder is removed by the next save.
A tag folder without the ``.tmp`` suffix is complete by construction.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlp_dist.checkpoint import layout
from rlp_dist.config.schema import ConfigError


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
MANIFEST = "manifest.json"  # {"files": {name: bytes}} of a tag, written last by rank 0
CONFIG = "config.json"  # the run's config at the save (preset checks read it without unpickling)


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


def _write_manifest(tag_dir: pathlib.Path, config: Optional[dict]) -> None:
    if config is not None:
        _write_atomic(tag_dir / CONFIG, json.dumps(config, indent=1, default=str))
    sizes = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    _write_atomic(tag_dir / MANIFEST, json.dumps({"files": sizes}, indent=1))


def saved_config(tag_dir: pathlib.Path) -> Optional[dict]:
    """The config a tag was saved with (its config.json), or None for older checkpoints."""
    try:
        return json.loads((pathlib.Path(tag_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return None


# Fields that decide the shapes of the weights: a checkpoint of another preset cannot load.
_SHAPE_FIELDS = ("arch", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "hybrid_pattern", "mamba_num_heads", "mamba_head_dim", "mamba_state_dim",
                 "mamba_num_groups", "activation", "qk_layernorm", "tie_embeddings")


def check_same_preset(tag_dir: pathlib.Path, model: dict, what: str) -> None:
    """One-line ConfigError when the checkpoint at ``tag_dir`` was saved with another model preset."""
    saved = (saved_config(tag_dir) or {}).get("model")
    if not saved:
        return
    diff = [k for k in _SHAPE_FIELDS if k in saved and saved[k] != model.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"{what}: {tag_dir} was saved with preset {saved.get('name')!r} ({k}={saved[k]!r}), this run "
                          f"uses {model.get('name')!r} ({k}={model.get(k)!r}); use +model={saved.get('name')} or a "
                          f"checkpoint of {model.get('name')}")


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

    def latest_tag(self, warn=None) -> Optional[str]:
        """The tag ``latest`` names; the newest complete tag when ``latest`` is missing, stale or
        garbage (not UTF-8, not a tag name: reported through ``warn`` when given)."""
        f = self.dir / "latest"
        tags = self.complete_tags()
        if f.exists():
            raw = f.read_bytes()
            try:
                tag = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                tag = None
            if tag in tags:
                return tag
            if warn is not None:
                warn(f"warning: {f} holds {raw[:40]!r}, not the name of a complete checkpoint; using the newest "
                     f"complete one, {tags[-1] if tags else 'none'}")
        return tags[-1] if tags else None

    def candidates(self, warn=None) -> list[str]:
        """Tags to try on resume: the one ``latest`` names, then the older complete ones, newest first."""
        first = self.latest_tag(warn)
        if first is None:
            return []
        return [first] + [t for t in reversed(self.complete_tags()) if t < first]

    def check_fresh_start(self, overwrite: bool) -> None:
        """``checkpoint.resume=false``: refuse to start over a run directory that holds checkpoints, unless
        ``checkpoint.overwrite=true`` (then the old tags and ``latest`` are deleted here, by rank 0,
        metrics.jsonl / samples.jsonl start empty and wandb starts a new run (``wandb_id`` removed): nothing
        of the old run is mixed into the new one)."""
        tags = self.complete_tags()
        if not tags:
            return
        if not overwrite:
            raise ConfigError(f"checkpoint.resume=false but {self.dir} holds checkpoints ({tags[0]}..{tags[-1]}) of an "
                              f"earlier run; pick a new run.dir, resume (checkpoint.resume=true) or set "
                              f"checkpoint.overwrite=true to delete them and start over")
        _barrier()  # every rank has seen the tags before rank 0 removes them
        if self.rank == 0:
            for t in tags:
                shutil.rmtree(self.dir / t)
            (self.dir / "latest").unlink(missing_ok=True)
            for name in ("metrics.jsonl", "samples.jsonl", "wandb_id"):  # a new wandb run too
                (self.dir.parent / name).unlink(missing_ok=True)
        _barrier()

    def rotate(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` complete tags (rank 0; 0 keeps all). The tag ``latest``
        names is never deleted. Returns the deleted tags."""
        if keep_last <= 0 or self.rank != 0:
            return []
        tags, named = self.complete_tags(), self.latest_tag()
        doomed = [t for t in tags[:-keep_last] if t != named]
        for t in doomed:
            shutil.rmtree(self.dir / t, ignore_errors=True)
        if doomed:
            _fsync_dir(self.dir)
        return doomed

    def verify(self, tag: str) -> Optional[str]:
        """Why ``tag`` cannot be loaded (one line: file, reason), or None. Checks the manifest rank 0
        wrote at save (every file's size: a truncated or missing file is caught before DeepSpeed reads
        anything, by stat calls only). Every rank checks the same files, so all ranks agree."""
        tdir = self.dir / tag
        mf = tdir / MANIFEST
        if not mf.exists():
            return None  # a checkpoint from before manifests: the load itself will tell
        try:
            sizes = json.loads(mf.read_text())["files"]
        except (ValueError, KeyError, UnicodeDecodeError) as e:
            return f"{mf}: unreadable manifest ({type(e).__name__})"
        for name, size in sizes.items():
            f = tdir / name
            if not f.exists():
                return f"{f}: missing"
            if f.stat().st_size != size:
                return f"{f}: {f.stat().st_size} bytes, {size} were written (truncated or overwritten)"
        return None

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
        # [parallelism] rank state as safetensors + JSON (checkpoint.layout): loading it runs no code
        layout.write_rank_state(tmp_dir, self.rank, {**rank_state, "rng": rng_state()})
        # DeepSpeed writes its shards into <dir>/<tmp_tag>/ and barriers at its end; no 'latest'.
        engine.save_checkpoint(str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False)
        _barrier()  # every rank's files are in tmp_dir
        if self.rank == 0:
            _write_manifest(tmp_dir, client_state.get("config"))
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

    def load(self, engine, tag: Optional[str] = None, warn=print,
             check=None) -> Optional[tuple[dict, dict]]:
        """Restore the engine from ``tag`` or the newest loadable tag; returns (client_state, rank_state)
        or None if there is nothing. A tag that fails :meth:`verify` (or, on one rank, fails to load)
        is reported in one line through ``warn`` (file, reason) and the previous complete tag is tried.
        ``check(tag_dir)`` (e.g. the preset check) may raise to refuse a tag outright. Loads run under
        ``safe_load.guarded_loads`` set up by the caller (train.resume)."""
        from rlp_dist.checkpoint.safe_load import CheckpointLoadError

        tags = [tag] if tag else self.candidates(warn)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for i, t in enumerate(tags):
            if check is not None:
                check(self.dir / t)
            problem = self.verify(t)
            if problem is None:
                try:
                    return self._load_tag(engine, t)
                except CheckpointLoadError as e:
                    if e.unsafe or world > 1:  # never fall back past a refused file; ranks must agree
                        raise
                    problem = str(e)
            if i + 1 == len(tags):
                raise CheckpointLoadError(f"checkpoint {self.dir / t} cannot be loaded: {problem}; no older "
                                          f"complete checkpoint is left to fall back to")
            warn(f"warning: checkpoint {t} cannot be loaded: {problem}; falling back to {tags[i + 1]}")
        return None

    def _load_tag(self, engine, tag: str) -> tuple[dict, dict]:
        """Restore the engine from one tag; returns (client_state, rank_state)."""
        rank_file = layout.rank_state_path(self.dir / tag, self.rank)  # [parallelism]
        if not layout.has_rank_state(self.dir / tag, self.rank):
            raise FileNotFoundError(
                f"checkpoint {self.dir / tag} has no {rank_file.name}: it was written with a different "
                f"number of ranks; resume with the same world size or start a new run.dir")
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag)
        if path is None:
            from rlp_dist.checkpoint.safe_load import CheckpointLoadError

            raise CheckpointLoadError(f"DeepSpeed could not load checkpoint {self.dir / tag} (files missing?); "
                                      f"remove that tag (and fix 'latest') to fall back to an earlier one")
        from rlp_dist.checkpoint.safe_load import RESUME_FLAG

        rank_state = layout.read_rank_state(self.dir / tag, self.rank, flag=RESUME_FLAG)  # [parallelism] no pickle
        set_rng_state(rank_state["rng"])
        return client_state, rank_state


def consolidated_state_dict(ckpt_dir: str, tag: Optional[str] = None, trust: bool = False,
                            which: str = "student", flag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The student's (or EMA teacher's) full fp32 weights under global TP=PP=1 names, from a checkpoint
    saved at any TP/PP/DP and ZeRO stage, without unpickling (``checkpoint.consolidate``)."""
    from rlp_dist.checkpoint.consolidate import load_full_state  # [parallelism]

    from rlp_dist.checkpoint.safe_load import INIT_FLAG

    return load_full_state(ckpt_dir, which, tag, trust, flag or INIT_FLAG)


def preflight(run_dir: str, resume: bool, overwrite: bool, init_from: Optional[str], model: dict) -> None:
    """Checks before any process group or model exists (train() calls it on every rank):
    ``checkpoint.resume=false`` over existing checkpoints (:meth:`CheckpointManager.check_fresh_start`;
    only rank 0 deletes under ``overwrite``), resuming or ``model.init_from`` of another preset (config.json)."""
    from rlp_dist.distributed.parallel import env_rank_info

    ck = CheckpointManager(run_dir, env_rank_info()[0])  # torchrun or srun variables
    if not resume:
        ck.check_fresh_start(overwrite)
    elif ck.latest_tag() is not None:  # before minutes of set-up: resuming another preset's run
        check_same_preset(ck.dir / ck.latest_tag(), model, "resume")
    if init_from:
        p = pathlib.Path(init_from)
        p = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        tag = CheckpointManager(str(p.parent), 0).latest_tag() if p.name == "checkpoints" else None
        if tag is not None:
            check_same_preset(p / tag, model, "model.init_from")
