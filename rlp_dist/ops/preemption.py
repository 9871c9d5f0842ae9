"""Preemption-safe stopping: record SIGUSR1/SIGTERM, finish the step, checkpoint, requeue or exit.

Protocol (SLURM: ``sbatch --requeue --signal=USR1@<lead>``; the same under torchrun or plain python):

    launch/pretrain.py   install() before any heavy import: a signal that lands while torch is
                         still importing is recorded, not fatal (the default action would kill).
    train() loop         agreed_stop() once per step: one all-reduce (MAX) of this rank's flag, so
                         every rank stops after the same step even when only one was signalled.
    after the loop       an atomic checkpoint of that step, then finish():
                           SIGUSR1 -> rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (under SLURM),
                                      every rank exits with 128+SIGUSR1
                           SIGTERM -> exit with 128+SIGTERM, no requeue: a plain ``scancel`` (which
                                      sends SIGTERM) stays cancelled.

USR1 outranks TERM: requeueing makes SLURM send SIGTERM to the job, which must not turn a requeue
into a cancel. This module imports only the standard library at import time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Optional

# Stop codes, ordered so that MAX over ranks picks the strongest request.
NONE, TERM, USR1 = 0, 1, 2
_NAMES = {NONE: None, TERM: "SIGTERM", USR1: "SIGUSR1"}
_SIGNUM = {TERM: signal.SIGTERM, USR1: signal.SIGUSR1}

_state = {"code": NONE, "at": None, "installed": False}


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    code = USR1 if signum == signal.SIGUSR1 else TERM
    if code > _state["code"]:
        _state["code"], _state["at"] = code, time.time()
    # A line on stderr so the job log shows when the request arrived (async-signal-unsafe printing
    # is avoided: os.write is a single syscall).
    os.write(2, f"[rlp-dist pid {os.getpid()}] received {signal.Signals(signum).name}: will stop after "
                f"the current step and checkpoint\n".encode())


def install() -> None:
    """Install the SIGUSR1/SIGTERM handlers (idempotent; main thread only)."""
    if _state["installed"]:
        return
    signal.signal(signal.SIGUSR1, _handler)
    signal.signal(signal.SIGTERM, _handler)
    _state["installed"] = True


def requested() -> Optional[str]:
    """The strongest signal this process has received so far ('SIGUSR1', 'SIGTERM' or None)."""
    return _NAMES[_state["code"]]


def agreed_stop(group=None) -> Optional[str]:
    """Whether any rank was asked to stop, agreed by all ranks (one MAX all-reduce of one int).

    Every rank must call it at the same point of the loop; a single process needs no collective.
    """
    import torch
    import torch.distributed as dist

    code = _state["code"]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # NCCL reduces device tensors only; gloo host tensors. One int either way.
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        t = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        code = int(t.item())
    # Adopt the agreed request locally, so finish() acts the same on every rank.
    if code > _state["code"]:
        _state["code"] = code
    return _NAMES[code]


def exit_code(reason: Optional[str]) -> int:
    """128 + the signal number, what a shell reports for a process ended by that signal."""
    code = {v: k for k, v in _NAMES.items()}[reason]
    return 128 + int(_SIGNUM[code]) if code else 0


def requeue_slurm_job(log=print) -> bool:
    """``scontrol requeue $SLURM_JOB_ID``; False (with the reason logged) when it cannot."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log("preemption: SIGUSR1 outside SLURM (no SLURM_JOB_ID): checkpoint written, not requeued; "
            "restart the same command to resume")
        return False
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"preemption: scontrol requeue {job} failed ({e}); resubmit the job to resume")
        return False
    if out.returncode != 0:
        log(f"preemption: scontrol requeue {job} failed: {out.stderr.strip()}; submit with --requeue "
            f"(or resubmit the job) to resume")
        return False
    log(f"preemption: job {job} requeued; it resumes from the checkpoint")
    return True


def finish(reason: str, rank: int, log=print) -> None:
    """After the checkpoint of a stopped run: requeue (SIGUSR1, rank 0, under SLURM), then exit.

    Call on every rank after the checkpoint is complete; it tears down the process group and
    raises SystemExit(128 + signal).
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.barrier()  # the checkpoint is complete on every rank before anyone requeues
    if reason == "SIGUSR1" and rank == 0:
        requeue_slurm_job(log)
    if distributed:
        # Nobody exits before the requeue went through: srun --kill-on-bad-exit would kill rank 0
        # (and its scontrol call) as soon as another rank exits with 128+signal.
        dist.barrier()
    try:
        from rlp_dist.distributed.parallel import destroy_distributed

        destroy_distributed()
    except Exception:  # noqa: BLE001 - exiting anyway; a torn-down group must not mask the exit code
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    raise SystemExit(exit_code(reason))


def reset() -> None:
    """Forget a recorded request (for tests running several trainings in one process)."""
    _state["code"], _state["at"] = NONE, None
