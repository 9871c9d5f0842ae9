"""One metrics facade: console line + progress bar, ``<run.dir>/metrics.jsonl`` and wandb.

The metric set (rlp/*, ntp/*, ema/*, optim/*, perf/*, sys/*) and the sample-thoughts table are
documented in docs/operations.md ("Metrics and wandb").

Only global rank 0 writes. Keys are namespaced (``rlp/``, ``ema/``, ``perf/``, ``optim/``,
``sys/``). wandb runs offline when no API key is present (``logging.wandb_mode=auto``) with all its
files under the run dir; the run id is kept in ``<run.dir>/wandb_id`` so a resumed job continues
the same wandb run. The API key is never written anywhere by us.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import pathlib
import sys
import time
from typing import Any, Optional

CONSOLE_KEYS = (
    ("rlp/loss", "loss", "{:+.4f}"),
    ("ntp/loss", "loss", "{:.4f}"),
    ("rlp/reward_mean", "reward", "{:+.4f}"),
    ("rlp/s_pred_mean", "s_pred", "{:.3f}"),
    ("rlp/s_ema_mean", "s_ema", "{:.3f}"),
    ("rlp/thought_len_mean", "len", "{:.1f}"),
    ("rlp/clip_frac", "clip", "{:.3f}"),
    ("perf/step_s", "step_s", "{:.2f}"),
)


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Metrics:
    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_mode: str = "auto", project: str = "rlp-dist", entity: Optional[str] = None,
                 run_name: Optional[str] = None, config: Optional[dict] = None, progress: bool = True):
        self.enabled = enabled
        self.run_dir = pathlib.Path(run_dir)
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.jsonl = self.jsonl_path.open("a", buffering=1)
        mode = _wandb_mode(wandb_mode)
        if mode != "disabled":
            self.wandb = self._init_wandb(mode, project, entity, run_name, config)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, leave=True)

    def _truncate_after(self, start_step: int) -> None:
        """On resume drop lines of steps after the checkpoint (they will be recomputed), in
        metrics.jsonl and the sample-thoughts table alike."""
        for path in (self.jsonl_path, self.run_dir / "samples.jsonl"):
            if not path.exists():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
            path.write_text("".join(x + "\n" for x in keep))

    def _init_wandb(self, mode, project, entity, run_name, config):
        import wandb

        wdir = self.run_dir / "wandb_files"
        wdir.mkdir(exist_ok=True)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config"),
                         ("WANDB_DATA_DIR", "data")):
            os.environ.setdefault(var, str(wdir / sub))
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        return wandb.init(project=project, entity=entity, name=run_name, id=run_id, resume="allow",
                          mode=mode, dir=str(wdir), config=config or {})

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        row.update({k: (float(v) if not isinstance(v, (str, bool)) else v) for k, v in metrics.items()})
        # JSON has no NaN/Infinity: a non-finite value is written as null and its key listed in "nonfinite"
        # (wandb gets the float itself and plots the gap).
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        out = {k: (None if k in bad else v) for k, v in row.items()}
        if bad:
            out["nonfinite"] = bad
        self.jsonl.write(json.dumps(out, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        line = " ".join(
            f"{short} " + (fmt.format(row[k]) if math.isfinite(row[k]) else str(row[k]))
            for k, short, fmt in CONSOLE_KEYS if k in row and isinstance(row[k], float))
        msg = f"step {step:>6d} | {line}"
        if self.bar is not None:
            self.bar.write(msg)
            self.bar.n = step
            self.bar.refresh()
        else:
            print(msg, flush=True)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (e.g. sample thoughts) to wandb, and as JSON lines to <run.dir>/<name>.jsonl."""
        if not self.enabled:
            return
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for r in rows:  # non-finite floats as null: the file stays valid JSON
                row = {"step": step, **{c: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                        for c, v in zip(columns, r)}}
                f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
