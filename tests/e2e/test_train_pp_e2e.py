"""End to end at pipeline parallelism: the real launcher under torchrun with ``parallel.pp=2``.

The student is a ZeRO-1 DeepSpeed engine per stage driven by megatron's 1F1B schedule, rollouts are
pipelined, the EMA teacher is ZeRO-3 per stage scored through the schedule. The parity of one step
with PP=1 is tests/distributed/test_train_pp.py; here: the user's command trains, logs finite metrics
on rank 0 (first stage) that come from the last stage, and a checkpoint resumes exactly.
"""

import math
import subprocess
import sys

import pytest

from test_train_e2e import BIN, REQUIRED, ROOT, _env, _metrics, _run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BASE = ["launch/pretrain.py", "+model=tiny_transformer", "parallel.pp=2", "parallel.zero_stage=1",
        "logging.wandb_mode=disabled", "logging.progress=false"]
PP2 = BASE + ["optim.lr=1e-3"]
TIMED = ("step", "perf/step_s", "perf/thought_tok_per_s", "perf/tflops_per_s")  # wall-clock dependent
COMPARED = [k for k in REQUIRED if k not in TIMED] + [
    "optim/grad_norm", "ema/param_gap"]


def _torchrun(n: int, args: list[str]) -> str:
    return _run([str(BIN / "torchrun"), "--nproc_per_node", str(n)] + args)


def _check_rows(rows, steps):
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {r['step']} has non-finite metrics {bad}"
        # on-policy: the pipelined rollout's behaviour log-probs equal the scheduled training forward's
        assert r["rlp/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["ema/update_collectives"] == 0
        assert r["optim/grad_norm"] > 0
    assert rows[-1]["ema/param_gap"] > 0  # the student moved and the teacher lags it


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    """Four uninterrupted steps at PP=2 x DP=1, checkpoints at 2 and 4."""
    run = tmp_path_factory.mktemp("pp2") / "run"
    out = _torchrun(2, PP2 + [f"run.dir={run}", "train.steps=4", "checkpoint.every=2"])
    assert "world 2 (tp 1 pp 2 dp 1) zero 1" in out
    return run


def test_rlp_pp2_trains_and_checkpoints(pp2_run):
    _check_rows(_metrics(pp2_run), 4)
    ckpt = pp2_run / "checkpoints" / "step_00000004"
    names = sorted(p.name for p in ckpt.iterdir())
    # one model-state file per stage (DeepSpeed's mp rank = rank in the TP x PP group), per-rank teacher
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "rank_00000.safetensors",
            "rank_00001.safetensors"} <= set(names)


def test_rlp_pp2_resume_is_exact(pp2_run, tmp_path):
    """Two steps, then a resumed run to four: steps 3-4 equal the uninterrupted run's (student and
    optimizer per stage, EMA teacher per rank, data sampler, keyed rollout randomness)."""
    run = tmp_path / "run"
    _torchrun(2, PP2 + [f"run.dir={run}", "train.steps=2", "checkpoint.every=2"])
    out = _torchrun(2, PP2 + [f"run.dir={run}", "train.steps=4", "checkpoint.every=2"])
    assert "start step 2" in out
    ref, got = _metrics(pp2_run), _metrics(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref[2:], got[2:]):
        diff = {k: (a[k], b[k]) for k in COMPARED if a[k] != pytest.approx(b[k], rel=1e-6, abs=1e-9)}
        assert not diff, f"step {a['step']}: resumed run differs {diff}"


def test_rlp_pp2_dp2_four_ranks(pp2_run, tmp_path):
    """PP=2 x DP=2: the ZeRO-3 teacher partitioned over DP=2 inside each stage. Step 1 draws the same
    contexts and starts from the same weights as PP=2 x DP=1, so its S_ema is the same number."""
    out = _torchrun(4, PP2 + [f"run.dir={tmp_path}", "train.steps=3", "checkpoint.every=0"])
    assert "world 4 (tp 1 pp 2 dp 2) zero 1" in out
    rows = _metrics(tmp_path)
    _check_rows(rows, 3)
    assert rows[0]["rlp/s_ema_mean"] == pytest.approx(_metrics(pp2_run)[0]["rlp/s_ema_mean"], abs=1e-5)


def test_rlp_tp2_pp2_matches_pp2(pp2_run, tmp_path):
    """TP=2 x PP=2 on 4 ranks against PP=2 x TP=1 (same initial weights, same rollouts: the TP ranks of a
    replica sample alike): the same metrics, and the clipping norm over DeepSpeed's model-parallel group
    (TP x PP; replicated parameters counted once, QK-norm gradients summed over TP) is the same number."""
    out = _torchrun(4, PP2 + [f"run.dir={tmp_path}", "train.steps=3", "checkpoint.every=0", "parallel.tp=2"])
    assert "world 4 (tp 2 pp 2 dp 1) zero 1" in out
    rows, ref = _metrics(tmp_path), _metrics(pp2_run)[:3]
    _check_rows(rows, 3)
    for a, b in zip(ref, rows):
        for k in ("rlp/s_ema_mean", "rlp/s_pred_mean", "rlp/reward_mean", "rlp/thought_len_mean", "optim/grad_norm",
                  "ema/param_gap"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the stages send bf16 activations
def test_ntp_pp2_loss_falls(tmp_path, dtype):
    _torchrun(2, BASE + ["objective=ntp", "optim.lr=3e-3", f"run.dir={tmp_path}", "train.steps=6", "ntp.seq_len=64",
                         "ntp.sequences_per_step=4", "checkpoint.every=0", f"train.dtype={dtype}"])
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(math.isfinite(r["ntp/loss"]) and math.isfinite(r["optim/grad_norm"]) for r in rows)
    assert rows[-1]["ntp/loss"] < rows[0]["ntp/loss"] - 0.2, [r["ntp/loss"] for r in rows]


def test_pp2_with_zero3_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", "parallel.pp=2",
                        f"run.dir={tmp_path}", "logging.wandb_mode=disabled"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "parallel.zero_stage=3 with parallel.pp=2" in p.stderr and "use parallel.zero_stage=1" in p.stderr
    assert "Traceback" not in p.stderr
