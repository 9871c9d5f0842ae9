"""Preemption under torchrun (no SLURM): kill -USR1 / -TERM at a random step, or during start-up,
then restart the same command; the continuation must be bit-identical to an uninterrupted run
(metrics.jsonl except timing/memory keys, final student weights, every rank's EMA state).

Also: a crash in the middle of a checkpoint write leaves the previous checkpoint as the latest,
loadable, and the restarted run is again identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from ops_runs import (STEPS, assert_same_final_state, assert_same_metrics, handler_installed, metrics_rows,
                      tail, tiny_overrides, torchrun, wait, wait_for_step, worker_pids)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    log = run.parent / "log.txt"
    proc = torchrun(run, log, overrides=tiny_overrides(run, extra=["logging.sample_every=3"]))
    assert wait(proc, log) == 0, tail(log)
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, STEPS + 1))
    # The sample-thoughts table of the real loop (rank 0's last micro-batch: 2 contexts x G=4).
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [3] * 8 + [6] * 8
    assert all(s["thought"] and s["next_token"] and s["reward"] == s["reward"] for s in samples)
    return run


def _interrupt(run, log, sig: int, at_step: int, rank: int, crash_in: str = "") -> tuple[int, str]:
    """Start the tiny job (resuming whatever run holds), send ``sig`` to worker ``rank`` once it has
    logged ``at_step`` (0: during start-up, as soon as the handler is in place while torch still
    imports); return (the step it stopped after, this launch's log text). With ``crash_in`` (a tag
    folder name), rank 1 dies halfway through writing a DeepSpeed file into that folder."""
    start = log.stat().st_size if log.exists() else 0
    if crash_in:
        proc = torchrun(run, log, script="tests/ops/crash_during_save.py",
                        script_args=["--crash-in", crash_in, "--crash-rank", "1", "--"], overrides=tiny_overrides(run))
    else:
        proc = torchrun(run, log)
    pids = worker_pids(proc, 2)
    if at_step == 0:
        t0 = time.time()
        while not handler_installed(pids[rank], sig) and time.time() - t0 < 60:
            time.sleep(0.005)
    else:
        wait_for_step(run, at_step, proc, log)
    os.kill(pids[rank], sig)
    rc = wait(proc, log)
    text = log.read_text(errors="replace")[start:]
    name = signal.Signals(sig).name
    assert rc != 0, f"a run stopped by {name} must not report success:\n{tail(log)}"
    assert f"received {name}" in text, tail(log)
    steps = [r["step"] for r in metrics_rows(run)]
    stopped = steps[-1] if steps else 0
    assert stopped < STEPS, f"the {name} did not stop the run early: {steps}"
    return stopped, text


def _latest(run):
    from rlp_dist.checkpoint.manager import CheckpointManager

    return CheckpointManager(str(run), 0).latest_tag()


def test_preempt_and_crash_at_random_steps_resume_is_bit_identical(tmp_path, reference_run):
    """One run, stopped three times and restarted each time with the same command:
    1. SIGTERM during start-up (while torch imports): recorded, not fatal; exits without requeue;
    2. SIGUSR1 to a random rank after a random step: checkpoint of the step it stopped after;
    3. SIGTERM after a later random step, with rank 1 crashing halfway through writing that stop
       checkpoint: the previous checkpoint stays the latest and loads;
    then it runs to the end: metrics and final state equal the uninterrupted run's, bit for bit."""
    from rlp_dist.checkpoint.manager import tag_for

    run, log = tmp_path / "run", tmp_path / "log.txt"
    rng = random.Random()
    stopped, text = _interrupt(run, log, signal.SIGTERM, 0, rng.randint(0, 1))
    assert stopped == 0 and "SIGTERM: stopped after step 0" in text and "exiting without requeue" in text
    assert _latest(run) is None

    at, rank = rng.randint(1, 2), rng.randint(0, 1)
    print(f"SIGUSR1 to rank {rank} after step {at}")
    stopped, text = _interrupt(run, log, signal.SIGUSR1, at, rank)
    assert f"SIGUSR1: stopped after step {stopped}" in text
    assert "outside SLURM" in text  # no SLURM here: it says it cannot requeue, and how to resume
    assert _latest(run) == tag_for(stopped), "the stop checkpoint is not the step the run stopped after"
    previous = stopped

    at, rank = rng.randint(stopped + 1, STEPS - 2), rng.randint(0, 1)
    print(f"SIGTERM to rank {rank} after step {at}, crash while writing its checkpoint")
    # It stops after step `at` or `at + 1` (the signal may land during the next step): crash either save.
    stopped, text = _interrupt(run, log, signal.SIGTERM, at, rank,
                               crash_in=f"{tag_for(at)}.tmp,{tag_for(at + 1)}.tmp")
    assert "crash injected" in text, tail(log)
    assert _latest(run) == tag_for(previous), "a crash during a save must leave the previous checkpoint"
    assert not any((run / "checkpoints" / tag_for(s)).exists() for s in (at, at + 1))

    proc = torchrun(run, log)
    assert wait(proc, log) == 0, tail(log)
    assert_same_metrics(reference_run, run)
    assert_same_final_state(reference_run, run)
