"""Small reliability units (issue 12): safe unpickling, checkpoint bookkeeping, metrics with NaN, one-line errors.

No process groups or engines here: the same paths on real runs are in tests/ops/test_faults.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rlp_dist.config import ConfigError, compose


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_refused_in_one_line_and_never_runs(tmp_path):
    from rlp_dist.checkpoint.safe_load import INIT_FLAG, CheckpointLoadError, guarded_loads, load

    marker, f = tmp_path / "MARKER", tmp_path / "mp_rank_00_model_states.pt"
    for zipfile in (True, False):  # DeepSpeed writes the legacy (non-zip) format
        torch.save({"module": _Evil(marker)}, f, _use_new_zipfile_serialization=zipfile)
        with pytest.raises(CheckpointLoadError) as e:
            load(f, INIT_FLAG)
        assert e.value.unsafe and "\n" not in str(e.value) and str(f) in str(e.value)
        assert "posix.system" in str(e.value) and INIT_FLAG in str(e.value)
        with guarded_loads(INIT_FLAG), pytest.raises(CheckpointLoadError):  # DeepSpeed's own explicit call
            torch.load(f, weights_only=False)
    assert not marker.exists()
    from rlp_dist.checkpoint import safe_load

    assert torch.load is safe_load._TORCH_LOAD  # the guard is undone on exit


def test_deepspeed_classes_allowed_and_truncation_named(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rlp_dist.checkpoint.safe_load import RESUME_FLAG, CheckpointLoadError, load

    f = tmp_path / "optim_states.pt"
    torch.save({"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(3), "t": torch.arange(3)}, f,
               _use_new_zipfile_serialization=False)
    sd = load(f, RESUME_FLAG)
    assert torch.equal(sd["t"], torch.arange(3)) and sd["zero_stage"] == ZeroStageEnum(3)
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointLoadError, match="truncated or corrupt") as e:
        load(f, RESUME_FLAG)
    assert not e.value.unsafe and str(f) in str(e.value)


def _tags(ckdir, *steps):
    from rlp_dist.checkpoint.manager import _write_manifest

    for s in steps:
        d = ckdir / f"step_{s:08d}"
        d.mkdir(parents=True)
        (d / "model_states.pt").write_bytes(b"x" * 100)
        _write_manifest(d, {"model": {"name": "tiny_transformer", "num_layers": 2}})


def test_latest_garbage_rotation_and_manifest(tmp_path):
    from rlp_dist.checkpoint.manager import CheckpointManager

    ck = CheckpointManager(str(tmp_path), 0)
    _tags(ck.dir, 1, 2, 3, 4)
    (ck.dir / "latest").write_bytes(b"\xff\xfe garbage")
    warns: list[str] = []
    assert ck.latest_tag(warns.append) == "step_00000004" and len(warns) == 1 and "\n" not in warns[0]
    assert ck.candidates() == ["step_00000004", "step_00000003", "step_00000002", "step_00000001"]
    # rotation keeps the newest N, and never the tag `latest` names (here an older one)
    (ck.dir / "latest").write_text("step_00000002")
    assert ck.rotate(2) == ["step_00000001"]
    assert ck.complete_tags() == ["step_00000002", "step_00000003", "step_00000004"]
    assert CheckpointManager(str(tmp_path), 1).rotate(1) == []  # only rank 0 deletes
    # a truncated file is caught by the manifest, by size
    assert ck.verify("step_00000004") is None
    (ck.dir / "step_00000004" / "model_states.pt").write_bytes(b"x" * 10)
    assert "10 bytes, 100 were written" in ck.verify("step_00000004")


def test_resume_false_refuses_then_overwrite_starts_over(tmp_path):
    from rlp_dist.checkpoint.manager import CheckpointManager, check_same_preset

    ck = CheckpointManager(str(tmp_path), 0)
    _tags(ck.dir, 5)
    (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n')
    (tmp_path / "wandb_id").write_text("abcd1234")
    with pytest.raises(ConfigError, match="checkpoint.overwrite=true") as e:
        ck.check_fresh_start(overwrite=False)
    assert "\n" not in str(e.value) and ck.complete_tags() == ["step_00000005"]
    with pytest.raises(ConfigError, match=r"saved with preset 'tiny_transformer' \(num_layers=2\)"):
        check_same_preset(ck.dir / "step_00000005", {"name": "tiny_hybrid", "num_layers": 3}, "resume")
    ck.check_fresh_start(overwrite=True)
    assert ck.complete_tags() == [] and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "wandb_id").exists()


def test_metrics_nonfinite_valid_json_and_console_nan(tmp_path, capsys):
    from rlp_dist.logging.metrics import Metrics

    m = Metrics(str(tmp_path), True, 2, wandb_mode="disabled", progress=False)
    m.log(1, {"rlp/loss": float("nan"), "rlp/reward_mean": float("inf"), "rlp/s_ema_mean": -7.5})
    m.log_table(1, "samples", ["thought", "s_pred"], [["a", float("nan")], ["b", -1.5]])
    m.close()
    table = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["s_pred"] for r in table] == [None, -1.5]
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert row["rlp/loss"] is None and row["nonfinite"] == ["rlp/loss", "rlp/reward_mean"]
    out = capsys.readouterr().out
    assert "loss nan" in out and "reward inf" in out and "s_ema -7.500" in out


@pytest.mark.parametrize("override, close", [("+rlp.grup_size=4", "rlp.group_size"),
                                             ("+train.on_nonfinit=skip", "train.on_nonfinite"),
                                             ("+checkpoint.keep=2", "checkpoint.keep_last")])
def test_unknown_key_added_with_plus_is_refused(override, close):
    with pytest.raises(ConfigError, match=f"did you mean {close}") as e:
        compose(["+model=tiny_transformer", override])
    assert "\n" not in str(e.value)
    compose(["+model=tiny_hybrid", "train.on_nonfinite=skip", "checkpoint.keep_last=2"])  # known keys still fine


def test_plot_on_empty_metrics_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    p = subprocess.run([sys.executable, "-m", "rlp_dist.cli", "plot", str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("rlp-dist plot: error:")


def test_tp_pp_not_dividing_world_is_one_line(tmp_path):
    p = subprocess.run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", "parallel.tp=2",
                        f"run.dir={tmp_path}", "logging.wandb_mode=disabled"], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "RANK": "0", "WORLD_SIZE": "3"})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errs = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errs) == 1 and "world size 3 is not divisible by parallel.tp*parallel.pp=2" in errs[0]


def test_nonfinite_config_validated():
    with pytest.raises(ConfigError, match=r"train\.on_nonfinite='ignore'; use 'stop'"):
        compose(["+model=tiny_transformer", "train.on_nonfinite=ignore"])
    with pytest.raises(ConfigError, match=r"checkpoint\.keep_last=-1 must be >= 0"):
        compose(["+model=tiny_transformer", "checkpoint.keep_last=-1"])
