"""End to end: the real launcher, real DeepSpeed engine, real megatron-core model, tiny preset.

These run the user's commands as subprocesses (a minute or so each on 2 CPU cores).
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(sys.executable).parent
REQUIRED = ["step", "rlp/reward_mean", "rlp/s_pred_mean", "rlp/s_ema_mean", "rlp/gain_pos_frac",
            "rlp/adv_abs_mean", "rlp/clip_frac", "rlp/ratio_mean", "rlp/thought_len_mean", "rlp/loss",
            "perf/step_s", "perf/thought_tok_per_s", "perf/flops_step", "perf/flops_total", "perf/tflops_per_s",
            "perf/cpt_equivalent_tokens"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd, timeout=900):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_two_ranks_then_resume(tmp_path):
    run = tmp_path / "run"
    common = [str(BIN / "deepspeed"), "--num_gpus", "2", "launch/pretrain.py", "+model=tiny_transformer",
              f"run.dir={run}", "checkpoint.every=5", "logging.wandb_mode=offline", "optim.lr=1e-4"]
    out = _run(common + ["train.steps=10"])
    assert "start step 0" in out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 11))
    for r in rows:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, f"step {r['step']} lacks {missing}"
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"step {r['step']} has non-finite metrics {bad}"
        assert 1 <= r["rlp/thought_len_mean"] <= 8
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in (ckpt / "step_00000010").glob("rank_*")) == ["rank_00000.safetensors",
                                                                              "rank_00001.safetensors"]
    assert list((run / "wandb_files").rglob("offline-run-*")), "wandb offline run files missing"

    # More steps resume from the latest checkpoint; torchrun is as good a launcher as deepspeed.
    out = _run([str(BIN / "torchrun"), "--nproc_per_node", "2"] + common[3:] + ["train.steps=12"])
    assert "start step 10" in out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))


@pytest.mark.slow
def test_ntp_then_rlp_from_it_with_added_thought_tokens(tmp_path):
    """objective=ntp (the CPT baseline) trains and its loss falls; an RLP run starts from its checkpoint
    with new thought markers added to the tokenizer (embedding/output grown by 2 rows)."""
    ntp = tmp_path / "ntp"
    _run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", "objective=ntp", f"run.dir={ntp}",
          "train.steps=8", "ntp.seq_len=64", "ntp.sequences_per_step=4", "optim.lr=3e-3",
          "logging.wandb_mode=disabled", "logging.progress=false"])
    rows = _metrics(ntp)
    assert len(rows) == 8 and all(math.isfinite(r["ntp/loss"]) for r in rows)
    assert rows[-1]["ntp/loss"] < rows[0]["ntp/loss"] - 0.3, [r["ntp/loss"] for r in rows]

    rlp = tmp_path / "rlp"
    out = _run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", f"run.dir={rlp}",
                f"model.init_from={ntp}", "rlp.thought_open='<reason>'", "rlp.thought_close='</reason>'",
                "rlp.add_thought_tokens=true", "train.steps=2", "logging.wandb_mode=disabled",
                "logging.progress=false"])
    assert "vocab 2050" in out
    rows = _metrics(rlp)
    assert len(rows) == 2 and all(math.isfinite(r["rlp/loss"]) for r in rows)
    # The student starts from the NTP weights: its no-think score beats a random init's ~log(1/2048)=-7.6.
    assert rows[0]["rlp/s_ema_mean"] > -7.0


def test_markers_missing_without_add_flag_is_a_one_line_error(tmp_path):
    p = subprocess.run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", f"run.dir={tmp_path}",
                        "rlp.thought_open='<reason>'", "logging.wandb_mode=disabled"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "no single token for thought marker(s) ['<reason>']; set rlp.add_thought_tokens=true" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model, launcher, extra", [
    ("tiny_hybrid", "python", []),  # Mamba2 + attention + MLP: HybridDecoder, shared-prefix Mamba branching
    ("tiny_transformer", "torchrun", ["parallel.tp=2"]),  # TP=2: vocab-parallel log-probs, QK-norm grads
    # two contexts per document: one prefill per document window; packed forward per prefix length
    ("tiny_transformer", "python", ["rlp.contexts_per_document=2"]),
    # the hybrid pipelined (PP=2, ZeRO-1) with two contexts per document (replicated training forward)
    ("tiny_hybrid", "torchrun", ["parallel.pp=2", "parallel.zero_stage=1", "rlp.contexts_per_document=2"]),
])
def test_loop_trains_backbone_and_tp(tmp_path, model, launcher, extra):
    cmd = ([sys.executable] if launcher == "python" else [str(BIN / "torchrun"), "--nproc_per_node", "2"])
    _run(cmd + ["launch/pretrain.py", f"+model={model}", f"run.dir={tmp_path}", "train.steps=3",
                "optim.lr=1e-3", "logging.wandb_mode=disabled", "logging.progress=false"] + extra)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in REQUIRED), r
        assert r["rlp/ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # on-policy: behaviour == training log-probs
        assert r["ema/update_collectives"] == 0
    assert rows[-1]["ema/param_gap"] > 0  # the student moved and the teacher lags it


@pytest.mark.slow
def test_update_epochs_reuse_the_rollout_so_clipping_acts(tmp_path):
    """rlp.update_epochs=2 x rlp.mini_batches_per_epoch=2: four optimizer steps per rollout; from the second
    on the policy has moved, so the importance ratios leave 1 and (at a large lr) the clipping acts. FLOP
    accounting: perf/flops_total is the running sum of perf/flops_step; T_flop grows linearly in steps."""
    _run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", f"run.dir={tmp_path}", "train.steps=3",
          "optim.lr=1e-2", "rlp.update_epochs=2", "rlp.mini_batches_per_epoch=2", "logging.wandb_mode=disabled",
          "logging.progress=false", "checkpoint.save_final=false"])
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert abs(r["rlp/ratio_mean"] - 1.0) > 1e-3, r  # the last epoch is off-policy
        assert r["rlp/clip_frac"] > 0, r
        assert r["ema/updated"] == 1.0 and r["ema/update_collectives"] == 0
    total = 0.0
    for r in rows:
        total += r["perf/flops_step"]
        assert r["perf/flops_step"] > 0 and r["perf/flops_total"] == pytest.approx(total, rel=1e-9)
        assert r["perf/cpt_equivalent_tokens"] == pytest.approx(r["step"] * rows[0]["perf/cpt_equivalent_tokens"])


@pytest.mark.slow
def test_entropy_positions_keep_the_uncertain_candidates(tmp_path):
    """rlp.positions=entropy: B / keep candidates scored by the teacher (S_ema and entropy in one pass),
    the kept ones are those of highest entropy (so their mean is at least the dropped ones')."""
    _run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", f"run.dir={tmp_path}", "train.steps=2",
          "rlp.positions=entropy", "rlp.entropy_keep=0.5", "logging.wandb_mode=disabled", "logging.progress=false",
          "checkpoint.save_final=false"])
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in REQUIRED), r
        assert r["rlp/entropy_kept_mean"] >= r["rlp/entropy_dropped_mean"] > 0, r
