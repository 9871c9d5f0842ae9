"""End to end on a real SLURM (munged + slurmctld + two slurmd on this machine, tests/ops/slurm_cluster.py).

1. The README's command: ``sbatch --nodes=2 --ntasks-per-node=1 launch/slurm/pretrain.sbatch +model=tiny_transformer
   rlp=tiny ...`` — two emulated nodes, one rank each (rendezvous on the first node's NodeAddr) — completes.
2. The same job sent ``scancel --signal=USR1`` mid-run: it checkpoints, requeues itself
   (``scontrol requeue``), restarts (Restarts=1), resumes and finishes with metrics.jsonl and final
   weights/EMA identical to job 1's.
3. A plain ``scancel`` (SIGTERM) after a step: it checkpoints and stays cancelled (no requeue).
4. A rendezvous address that does not resolve (``RLP_MASTER_ADDR=n1``) fails within RLP_INIT_TIMEOUT.

The tests add ``logging.wandb_mode=disabled logging.progress=false checkpoint.every=100 optim.lr=1e-3`` to
the README's tiny command (ops_runs.tiny_overrides); the sbatch options and script are the README's.

Skipped, with the reason, only when the SLURM packages are missing and cannot be apt-installed.
"""

from __future__ import annotations

import time

import pytest
from ops_runs import (ROOT, PY, STEPS, assert_same_final_state, assert_same_metrics, metrics_rows, run_env,
                      tiny_overrides)
from slurm_cluster import LocalSlurm, ensure_installed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = ensure_installed()
    if why:
        pytest.skip(f"real SLURM unavailable: {why}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


def _submit(slurm, run_dir, extra=()):
    env = run_env(RLP_PYTHON=PY, RLP_ROOT=str(ROOT), RLP_INIT_TIMEOUT="120")
    out = run_dir.parent / f"{run_dir.name}.out"
    job = slurm.sbatch([*SBATCH, f"--output={out}", f"--chdir={ROOT}", *extra,
                        "launch/slurm/pretrain.sbatch", *tiny_overrides(run_dir)], env=env, cwd=ROOT)
    return job, out


def _wait_for_step(slurm, job, run_dir, out, step: int, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = metrics_rows(run_dir)
        if rows and rows[-1]["step"] >= step:
            return
        if slurm.job(job).get("JobState") in ("FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not reach step {step}: {slurm.job(job)}\n{_text(out)}")


def _text(out) -> str:
    try:
        lines = out.read_text(errors="replace").splitlines()
    except OSError:
        return "(no job output)"
    return "\n".join(x for x in lines if "arn" not in x and "return func" not in x)[-4000:]


def test_slurm_two_nodes_completes_then_usr1_requeue_resume_is_bit_identical(slurm, tmp_path):
    ref_dir = tmp_path / "reference"
    job, out = _submit(slurm, ref_dir)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})
    assert info["JobState"] == "COMPLETED", f"{info}\n{_text(out)}"
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert [r["step"] for r in metrics_rows(ref_dir)] == list(range(1, STEPS + 1))
    assert "rendezvous 127.0.0.1:" in out.read_text()  # the first node's NodeAddr, not the name n1

    run_dir = tmp_path / "preempted"
    job, out = _submit(slurm, run_dir)
    _wait_for_step(slurm, job, run_dir, out, 2)
    r = slurm._run(["scancel", "--signal=USR1", job])
    assert r.returncode == 0, r.stderr
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=400)
    text = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED", f"{info}\n{_text(out)}"
    assert info.get("Restarts") == "1", f"the job was not requeued exactly once: {info}\n{_text(out)}"
    assert "SIGUSR1: stopped after step" in text and f"job {job} requeued" in text, _text(out)
    assert "restart 1" in text and "start step 0" not in text.split("restart 1", 1)[1], _text(out)
    assert_same_metrics(ref_dir, run_dir)
    assert_same_final_state(ref_dir, run_dir)


def test_slurm_plain_scancel_checkpoints_and_stays_cancelled(slurm, tmp_path):
    run_dir = tmp_path / "cancelled"
    job, out = _submit(slurm, run_dir)
    _wait_for_step(slurm, job, run_dir, out, 1)
    assert slurm._run(["scancel", job]).returncode == 0
    info = slurm.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120)
    assert info["JobState"] == "CANCELLED", info
    time.sleep(8)  # longer than a requeue takes here (cred_expire=5, sched_interval=2)
    info = slurm.job(job)
    assert info["JobState"] == "CANCELLED" and info.get("Restarts") == "0", f"a cancel was undone: {info}"
    text = out.read_text(errors="replace")
    assert "SIGTERM: stopped after step" in text and "exiting without requeue" in text, _text(out)
    from rlp_dist.checkpoint.manager import CheckpointManager, tag_for

    steps = [r["step"] for r in metrics_rows(run_dir)]
    assert CheckpointManager(str(run_dir), 0).latest_tag() == tag_for(steps[-1]), _text(out)


def test_slurm_bad_rendezvous_address_fails_fast(slurm, tmp_path):
    """RLP_MASTER_ADDR=n1 (a node *name* that does not resolve here: STACK.md's 10-minute hang) with
    RLP_INIT_TIMEOUT=5: the job must fail with the rendezvous error, not hang."""
    run_dir = tmp_path / "badaddr"
    env = run_env(RLP_PYTHON=PY, RLP_ROOT=str(ROOT), RLP_INIT_TIMEOUT="5", RLP_MASTER_ADDR="n1")
    out = tmp_path / "badaddr.out"
    t0 = time.time()
    job = slurm.sbatch([*SBATCH, f"--output={out}", f"--chdir={ROOT}", "launch/slurm/pretrain.sbatch",
                        *tiny_overrides(run_dir)], env=env, cwd=ROOT)
    info = slurm.wait_state(job, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"}, timeout=240)
    assert info["JobState"] == "FAILED", f"{info}\n{_text(out)}"
    text = out.read_text(errors="replace")
    assert "rendezvous n1:" in text and "timed out" in text, _text(out)
    print(f"bad rendezvous address: job failed after {time.time() - t0:.0f} s")
