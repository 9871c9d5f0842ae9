"""Helpers for the preemption / resume / SLURM tests: launch the tiny RLP job, watch it, compare runs.

A "run" is a real ``launch/pretrain.py`` process tree (torchrun or srun) writing to a run dir; two
runs are compared on ``metrics.jsonl`` (every key except wall-clock and memory readings) and on
the final checkpoint (consolidated student weights and every rank's EMA-teacher state), exactly.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import torch

from rlp_dist.distributed.parallel import free_port  # noqa: F401 (re-exported for tests)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PY = sys.executable
STEPS = 6
# Wall-clock and memory readings differ between any two runs; everything else must be identical.
VOLATILE_PREFIXES = ("perf/", "sys/")
VOLATILE_KEYS = ("ema/update_s",)


def tiny_overrides(run_dir, steps: int = STEPS, extra=()) -> list[str]:
    return ["+model=tiny_transformer", "rlp=tiny", f"train.steps={steps}", f"run.dir={run_dir}",
            "logging.wandb_mode=disabled", "logging.progress=false", "checkpoint.every=100",
            "optim.lr=1e-3", *extra]


def run_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(pathlib.Path.home() / ".cache/rlp-dist/torch_extensions")))
    env.update(extra)
    return env


def torchrun(run_dir, log_path, nproc: int = 2, script: str = "launch/pretrain.py", script_args=(),
             overrides=None) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node N script ...`` (non-blocking), output to log_path."""
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), script, *script_args,
           *(overrides if overrides is not None else tiny_overrides(run_dir))]
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=log, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, log_path, timeout: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"run did not finish in {timeout:.0f} s; log tail:\n{tail(log_path)}") from None


def tail(log_path, n: int = 40) -> str:
    lines = pathlib.Path(log_path).read_text(errors="replace").splitlines()
    keep = [x for x in lines if "Warning" not in x and "warnings.warn" not in x and "return func" not in x]
    return "\n".join(keep[-n:])


def metrics_rows(run_dir) -> list[dict]:
    p = pathlib.Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return rows


def wait_for_step(run_dir, step: int, proc, log_path, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = metrics_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited ({proc.returncode}) before step {step}:\n{tail(log_path)}")
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {step} in {timeout:.0f} s:\n{tail(log_path)}")


def worker_pids(proc, n: int, timeout: float = 60) -> list[int]:
    """PIDs of the n launch/pretrain.py workers under a torchrun process."""
    import psutil

    t0 = time.time()
    while time.time() - t0 < timeout:
        kids = [c for c in psutil.Process(proc.pid).children(recursive=True)
                if _is_worker(_cmdline(c))]
        if len(kids) == n:
            return sorted(k.pid for k in kids)
        time.sleep(0.02)
    raise AssertionError(f"{n} workers did not appear in {timeout:.0f} s")


def _is_worker(cmd: list[str]) -> bool:
    """A worker after exec: names the script, and is not torchrun's forked agent (whose argv names the
    script too) in the instant between fork and exec."""
    return (any(a.endswith(("pretrain.py", "crash_during_save.py")) for a in cmd)
            and "torch.distributed.run" not in cmd)


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - the process may have exited
        return []


def handler_installed(pid: int, sig: int = signal.SIGUSR1) -> bool:
    """Whether the process catches ``sig`` (SigCgt bitmask in /proc/PID/status).

    Only after the worker has exec'd python: between fork and exec a torchrun child still carries
    the agent's own SIGTERM handler in SigCgt, and a signal sent then kills the fresh interpreter."""
    try:
        if b"torch.distributed.run" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
            return False  # still the forked agent (its argv names the script too), not yet exec'd
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    except OSError:
        pass
    return False


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items()
            if not k.startswith(VOLATILE_PREFIXES) and k not in VOLATILE_KEYS}


def assert_same_metrics(run_a, run_b) -> None:
    a, b = metrics_rows(run_a), metrics_rows(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b], (
        f"steps logged differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    for ra, rb in zip(a, b):
        ca, cb = comparable(ra), comparable(rb)
        diff = {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)}
        assert not diff, f"step {ra['step']}: metrics differ (uninterrupted, resumed): {diff}"


def final_state(run_dir) -> tuple[dict, list]:
    """(consolidated student weights, every rank's EMA-teacher state) of the latest checkpoint."""
    from rlp_dist.checkpoint.layout import rank_state_files, read_rank_state_file
    from rlp_dist.checkpoint.manager import CheckpointManager, consolidated_state_dict

    ck = CheckpointManager(str(run_dir), 0)
    tag = ck.latest_tag()
    assert tag is not None, f"{run_dir}: no complete checkpoint"
    weights = consolidated_state_dict(str(run_dir))
    teachers = [read_rank_state_file(f)["teacher"] for f in rank_state_files(ck.dir / tag)]
    assert teachers, f"{run_dir}: no rank-state files in {tag}"
    return weights, teachers


def _assert_equal_nested(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ (max abs {float((a - b).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final_state(run_a, run_b) -> None:
    wa, ta = final_state(run_a)
    wb, tb = final_state(run_b)
    _assert_equal_nested(wa, wb, "student")
    _assert_equal_nested(ta, tb, "teacher")
