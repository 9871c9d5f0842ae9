"""Faults and bad inputs on real tiny runs (1 rank, launch/pretrain.py), issue 12 problems 1-6 and 9.

One 4-step run (checkpoint every step, ``checkpoint.keep_last=2``) is shared by the module: rotation
keeps step 3 and 4; then, on copies of it, a resume over a truncated newest checkpoint plus a non-UTF-8
``latest`` falls back to step 3 with one warning each; a crafted pickle (``__reduce__`` -> touch a
marker) as resume's model states, as ``model.init_from`` and under ``rlp-dist convert ckpt-to-hf``
is refused in one line and the marker never appears; ``checkpoint.resume=false`` refuses, and with
``checkpoint.overwrite=true`` starts over (old tags and metrics gone). ``optim.lr=1e20`` stops at the
first non-finite step with exit 3 naming the last good checkpoint, writes no checkpoint of it, and
metrics.jsonl stays valid JSON (null + "nonfinite"); with ``train.on_nonfinite=skip`` the skipped
steps leave student and EMA teacher exactly as they were and ``train/skipped_steps`` counts them.
``optim.lr=1e4`` (finite divergence) raises the guard/* warnings.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess

import pytest
import torch
from ops_runs import PY, ROOT, run_env, tiny_overrides

pytestmark = pytest.mark.e2e


def _run(run_dir, steps: int, extra=(), timeout: float = 240) -> tuple[int, str]:
    args = tiny_overrides(run_dir, steps, extra)
    if any(x.startswith("+model=") for x in extra):  # another preset replaces the tiny transformer
        args.remove("+model=tiny_transformer")
    cmd = [PY, "launch/pretrain.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr


def _errors(out: str) -> list[str]:
    return [x for x in out.splitlines() if x.startswith("error:") or "error: " in x[:40]]


def _evil(path: pathlib.Path, marker: pathlib.Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": Evil()}, path)


def _refresh_manifest(tag_dir: pathlib.Path) -> None:
    """An attacker who swaps a file can rewrite the manifest too: the refusal must not rely on it."""
    mf = tag_dir / "manifest.json"
    sizes = {p.name: p.stat().st_size for p in tag_dir.iterdir() if p.is_file() and p.name != "manifest.json"}
    mf.write_text(json.dumps({"files": sizes}))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "base"
    rc, out = _run(run, 4, ["checkpoint.every=1", "checkpoint.keep_last=2"])
    assert rc == 0, out[-3000:]
    return run


def test_keep_last_rotates_and_keeps_latest(base):
    ck = base / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert (ck / "latest").read_text() == "step_00000004"
    assert json.loads((ck / "step_00000004" / "config.json").read_text())["model"]["name"] == "tiny_transformer"


def test_damaged_latest_falls_back_to_previous(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    ck = run / "checkpoints"
    f = next((ck / "step_00000004").glob("*model_states.pt"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated newest
    (ck / "latest").write_bytes(b"\xff\xfe\x00garbage")  # not UTF-8
    rc, out = _run(run, 5)
    assert rc == 0, out[-3000:]
    warns = [x for x in out.splitlines() if x.startswith("warning:")]
    assert any("latest" in w and "step_00000004" in w for w in warns), warns
    assert any(f.name in w and "falling back to step_00000003" in w for w in warns), warns
    assert "start step 3" in out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_crafted_pickle_never_runs(base, tmp_path):
    marker = tmp_path / "MARKER"
    # 1. resume: the newest checkpoint's model states replaced (manifest rewritten to match).
    run = tmp_path / "run"
    shutil.copytree(base, run)
    tag = run / "checkpoints" / "step_00000004"
    _evil(next(tag.glob("*model_states.pt")), marker)
    _refresh_manifest(tag)
    rc, out = _run(run, 5)
    errs = _errors(out)
    assert rc == 2 and len(errs) == 1 and "checkpoint.trust=true" in errs[0] and "posix.system" in errs[0], out[-2000:]
    assert "Traceback" not in out
    # 2. model.init_from: a directory whose checkpoint is a crafted pickle.
    src = tmp_path / "evil_src" / "checkpoints"
    (src / "step_00000001").mkdir(parents=True)
    (src / "latest").write_text("step_00000001")
    _evil(src / "step_00000001" / "mp_rank_00_model_states.pt", marker)
    rc, out = _run(tmp_path / "run2", 1, [f"model.init_from={src.parent}"])
    errs = _errors(out)
    assert rc == 2 and len(errs) == 1 and "model.trust_checkpoint=true" in errs[0], out[-2000:]
    # 3. rlp-dist convert ckpt-to-hf on it.
    p = subprocess.run([PY, "-m", "rlp_dist.cli", "convert", "ckpt-to-hf", "--ckpt", str(src.parent), "--out",
                        str(tmp_path / "hf"), "--preset", "tiny_transformer"], cwd=ROOT, env=run_env(),
                       capture_output=True, text=True, timeout=240)
    errs = [x for x in p.stderr.splitlines() if "error:" in x]
    assert p.returncode == 2 and len(errs) == 1 and "posix.system" in errs[0] and "trust" in errs[0], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not marker.exists(), "a crafted checkpoint ran code"


def test_refusals_resume_false_and_other_preset(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    rc, out = _run(run, 2, ["checkpoint.resume=false"])
    errs = _errors(out)
    assert rc == 2 and len(errs) == 1 and "checkpoint.overwrite=true" in errs[0], out[-2000:]
    assert (run / "checkpoints" / "step_00000004").is_dir(), "a refused start deleted checkpoints"
    rc, out = _run(run, 5, ["+model=tiny_hybrid"])
    errs = _errors(out)
    assert rc == 2 and len(errs) == 1 and "tiny_transformer" in errs[0] and "Traceback" not in out, out[-2000:]
    rc, out = _run(tmp_path / "run3", 1, [f"model.init_from={base}", "+model=tiny_hybrid"])
    errs = _errors(out)
    assert rc == 2 and len(errs) == 1 and "model.init_from" in errs[0], out[-2000:]


def test_lr_1e20_stops_without_checkpoint_then_overwrite(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base, run)
    rc, out = _run(run, 4, ["checkpoint.resume=false", "checkpoint.overwrite=true", "checkpoint.every=1",
                            "optim.lr=1e20"])
    errs = _errors(out)
    assert rc == 3 and len(errs) == 1, out[-3000:]
    assert "step 2" in errs[0] and "step_00000001" in errs[0], errs
    tags = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert tags == ["step_00000001"], tags  # old tags 3, 4 gone; nothing from the NaN step
    text = (run / "metrics.jsonl").read_text()
    rows = [json.loads(x) for x in text.splitlines()]  # valid JSON: no NaN / Infinity tokens
    assert [r["step"] for r in rows] == [1, 2] and "NaN" not in text and "Infinity" not in text
    assert rows[1]["rlp/loss"] is None and "rlp/loss" in rows[1]["nonfinite"]
    assert "loss nan" in out


def test_lr_1e20_skip_leaves_student_and_teacher_unchanged(tmp_path):
    from ops_runs import final_state

    run = tmp_path / "run"
    rc, out = _run(run, 3, ["checkpoint.every=1", "optim.lr=1e20", "train.on_nonfinite=skip"])
    assert rc == 0, out[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows] == [0.0, 1.0, 2.0]
    (run / "checkpoints" / "latest").write_text("step_00000001")
    w1, t1 = final_state(run)
    (run / "checkpoints" / "latest").write_text("step_00000003")
    w3, t3 = final_state(run)
    assert all(torch.equal(w1[k], w3[k]) for k in w1), "a skipped step changed the student"
    from ops_runs import _assert_equal_nested

    _assert_equal_nested(t1, t3, "teacher")


def test_lr_1e4_divergence_warns(tmp_path):
    """Problem 2: lr=1e4 diverges with finite numbers (grad norm 0, s_ema -> -1e3..-1e5): the watchdog warns."""
    run = tmp_path / "run"
    rc, out = _run(run, 3, ["optim.lr=1e4", "checkpoint.save_final=false", "train.guard.zero_grad_steps=2"])
    assert rc == 0, out[-3000:]
    warns = [x for x in out.splitlines() if x.startswith("warning: step")]
    assert any("guard/s_ema" in w for w in warns) and any("guard/zero_grad" in w for w in warns), warns
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["guard/s_ema"] == 1.0 and rows[-1]["guard/reward"] == 1.0 and rows[-1]["guard/zero_grad"] == 1.0
