"""Checkpoints at any parallelism (issue 12, problem 10) through the real launcher (torchrun, gloo).

Runs, tiny presets, optim.lr=1e-3, 4 contexts per step (spawned once for the module):

    A   transformer TP=1            steps 1-4, checkpoints at 2 and 4   (uninterrupted reference)
    B   transformer TP=2            steps 1-2, checkpoint at 2
    R1  from B at TP=1              steps 3-4   (resharded: TP 2 -> 1, ZeRO-3)
    P   from B at PP=2, ZeRO-1      steps 3-4   (resharded: TP 2 ZeRO-3 -> PP 2 ZeRO-1)
    R2  from B at TP=1 x DP=2       step 3      (resharded: DP 1 -> 2)
    H1  hybrid TP=1                 steps 1-3, checkpoints at 2 and 3
    H2  hybrid from H1@2 at TP=2    step 3      (resharded: TP 1 -> 2, fused Mamba tensors)

The model is built with megatron's CPU initialisation (the full weight is drawn from the seed, then
sliced), so B and A start from the same weights; they then differ only by floating-point reduction
order. Tolerances: exported student weights 1e-3 absolute (2 AdamW steps at lr 1e-3 move a weight by
<= 2e-3; measured 3.0e-5 between TP=2 and TP=1; a swapped TP shard moves them by O(0.1)); EMA weights
1e-5 (measured 1.2e-7); metrics rel 1e-3 (measured <= 1.5e-5 on grad norm), S_ema 1e-5 absolute.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import shutil

import pytest
import torch
from helpers.spawn import run_ranks
from ops_runs import metrics_rows, tail, torchrun, wait

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL_STUDENT, TOL_EMA, REL = 1e-3, 1e-5, 1e-3
COMPARED = ("optim/grad_norm", "rlp/s_ema_mean", "rlp/reward_mean", "rlp/s_pred_mean", "ema/param_gap", "optim/lr")


def _overrides(run, model: str, steps: int, extra=()) -> list[str]:
    return [f"+model={model}", "rlp=tiny", f"train.steps={steps}", f"run.dir={run}", "logging.wandb_mode=disabled",
            "logging.progress=false", "checkpoint.every=2", "optim.lr=1e-3", *extra]


def _launch(run: pathlib.Path, nproc: int, model: str, steps: int, extra=()) -> str:
    log = run.parent / f"{run.name}.log"
    proc = torchrun(run, log, nproc=nproc, overrides=_overrides(run, model, steps, extra))
    assert wait(proc, log, timeout=400) == 0, tail(log)
    return log.read_text(errors="replace")


def _fork(src: pathlib.Path, dst: pathlib.Path, tag: str = None) -> pathlib.Path:
    """A copy of run ``src`` whose latest checkpoint is ``tag`` (later tags and metrics rows dropped)."""
    shutil.copytree(src, dst)
    if tag is not None:
        ck = dst / "checkpoints"
        for t in ck.glob("step_*"):
            if t.name > tag:
                shutil.rmtree(t)
        (ck / "latest").write_text(tag)
        step = int(tag.split("_")[1])
        rows = [r for r in metrics_rows(dst) if r["step"] <= step]
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallelism")
    r = {k: d / k for k in ("A", "B", "R1", "P", "R2", "H1", "H2")}
    _launch(r["A"], 1, "tiny_transformer", 4)
    _launch(r["B"], 2, "tiny_transformer", 2, ["parallel.tp=2"])
    logs = {"R1": _launch(_fork(r["B"], r["R1"]), 1, "tiny_transformer", 4),
            "P": _launch(_fork(r["B"], r["P"]), 2, "tiny_transformer", 4, ["parallel.pp=2", "parallel.zero_stage=1"]),
            "R2": _launch(_fork(r["B"], r["R2"]), 2, "tiny_transformer", 3)}
    _launch(r["H1"], 1, "tiny_hybrid", 3)
    logs["H2"] = _launch(_fork(r["H1"], r["H2"], "step_00000002"), 2, "tiny_hybrid", 3, ["parallel.tp=2"])
    return r, logs


def _rows(run) -> dict[int, dict]:
    return {row["step"]: row for row in metrics_rows(run)}


# --------------------------------------------------------------------------------------------------
# Export to transformers
# --------------------------------------------------------------------------------------------------


def _export_all(jobs, out_root: str):
    """One rank: export every (run, tag, which) and return the safetensors tensors; also check that
    consolidate.tp_rule agrees with the HF converter's layout table for both backbones."""
    from safetensors.torch import load_file

    from rlp_dist.checkpoint.consolidate import tp_rule
    from rlp_dist.config import compose
    from rlp_dist.models import hf
    from rlp_dist.models.convert import _meta_model, ckpt_to_hf

    out = {}
    for key, (run, tag, which) in jobs.items():
        path = ckpt_to_hf(run, f"{out_root}/{key}", which=which, tag=tag)  # preset: the saved one
        # numpy: plain pickles back to the parent (hundreds of shared-memory tensors stall the queue)
        out[key] = {k: v.numpy() for f in sorted(pathlib.Path(path).glob("*.safetensors"))
                    for k, v in load_file(str(f)).items()}
    bad = []
    for preset in ("tiny_transformer", "tiny_hybrid"):
        mcfg = compose([f"+model={preset}"]).model
        model = _meta_model(mcfg)
        shapes = {k: v.shape for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        for e in hf.entries(model, mcfg):
            rule, kind = tp_rule(e.mkey, mcfg), e.split
            want = {"rep": -1, "row": 1, "col": 0, "qkv": 0}[kind]
            pieces = rule.piece_sizes(shapes[e.mkey][0]) if rule.dim == 0 else []
            lengths = [pc.length for pc in e.pieces]
            same_pieces = (kind != "col" or len(pieces) == len(e.pieces) and
                           (lengths[0] is None or pieces == lengths))
            if rule.dim != want or not same_pieces or (kind == "qkv" and len(pieces) != 1):
                bad.append((preset, e.mkey, kind, lengths, rule))
    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(f"{out_root}/H2_ema")
    return out, bad, type(loaded).__name__


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    r, _ = runs
    jobs = {}
    for which in ("student", "ema"):
        jobs.update({f"A2_{which}": (str(r["A"]), "step_00000002", which),
                     f"B2_{which}": (str(r["B"]), "step_00000002", which),
                     f"A4_{which}": (str(r["A"]), "step_00000004", which),
                     f"P4_{which}": (str(r["P"]), "step_00000004", which),
                     f"H1_{which}": (str(r["H1"]), "step_00000003", which),
                     f"H2_{which}": (str(r["H2"]), "step_00000003", which)})
    out = str(tmp_path_factory.mktemp("exports"))
    return run_ranks(_export_all, 1, (jobs, out), timeout=600)[0]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:4]
    return max(float(abs(torch.as_tensor(a[k]).float() - torch.as_tensor(b[k]).float()).max()) for k in a)


def test_tp_rule_matches_hf_converter_layout(exports):
    _, bad, _ = exports
    assert not bad, bad


@pytest.mark.parametrize("which,tol", [("student", TOL_STUDENT), ("ema", TOL_EMA)])
def test_tp2_and_pp2_checkpoints_export_same_weights_as_tp1(exports, which, tol):
    out, _, _ = exports
    # TP=2 transformer (tied embedding, QKV groups, SwiGLU halves) vs TP=1, same step
    tp_diff = _max_diff(out[f"B2_{which}"], out[f"A2_{which}"])
    assert tp_diff < tol
    # PP=2 (ZeRO-1, saved after resuming B at PP=2) vs the uninterrupted TP=1 run, step 4
    assert _max_diff(out[f"P4_{which}"], out[f"A4_{which}"]) < tol
    # hybrid at TP=2 (fused Mamba in_proj / conv1d sliced per piece) vs TP=1, step 3
    assert _max_diff(out[f"H2_{which}"], out[f"H1_{which}"]) < tol
    # not trivially equal: two more steps moved the weights 10x more than the layouts differ
    # (measured: student 2.0e-3 vs 3.0e-5, EMA 7.0e-6 vs 6.1e-8)
    assert _max_diff(out[f"A4_{which}"], out[f"A2_{which}"]) > 10 * tp_diff


def test_ema_and_student_exports_differ_and_load_in_transformers(exports):
    out, _, loaded = exports
    assert loaded == "NemotronHForCausalLM"
    assert _max_diff(out["H2_student"], out["H2_ema"]) > 1e-3  # the teacher lags the student


def _init_from_tp2(run_dir: str, vocab: int):
    """TP=2 ranks: build the hybrid student with model.init_from=RUN_DIR (each rank slices its own TP
    shard from the global tensors) and gather it back with the HF exporter's TP all-gather."""
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models import hf
    from rlp_dist.train import build_student

    init_distributed(2, 1, "gloo")
    cfg = compose(["+model=tiny_hybrid", f"model.init_from={run_dir}"], 2)
    model = build_student(cfg, vocab)  # the run's vocabulary (tokenizer + thought tokens)
    return {k: v.numpy() for k, v in hf.hf_state_dict(model, cfg.model, prefix="backbone").items()}


def test_init_from_at_tp2_slices_fused_tensors(runs, exports):
    """model.init_from of a TP=2 hybrid checkpoint into a TP=2 run: reassembled by models.hf (an
    independent TP merge), the weights equal the checkpoint's own export exactly."""
    r, _ = runs
    out, _, _ = exports
    vocab = out["H2_student"]["backbone.embeddings.weight"].shape[0]
    got = run_ranks(_init_from_tp2, 2, (str(r["H2"]), vocab), timeout=300)[0]
    assert got.keys() == out["H2_student"].keys()
    assert _max_diff(got, out["H2_student"]) == 0.0


# --------------------------------------------------------------------------------------------------
# Resume at another layout
# --------------------------------------------------------------------------------------------------


def _assert_metrics_match(run, ref, steps) -> None:
    got, want = _rows(run), _rows(ref)
    for s in steps:
        for k in COMPARED:
            a, b = got[s][k], want[s][k]
            assert a == pytest.approx(b, rel=REL, abs=1e-6), f"step {s} {k}: resumed {a}, uninterrupted {b}"
        assert got[s]["rlp/s_ema_mean"] == pytest.approx(want[s]["rlp/s_ema_mean"], abs=1e-5)
        assert abs(got[s]["rlp/loss"] - want[s]["rlp/loss"]) < 1e-6


def test_resume_tp2_at_tp1_and_pp2_matches_uninterrupted_tp1(runs):
    r, logs = runs
    for name, layout in (("R1", "into tp=1 pp=1 dp=1 zero=3"), ("P", "into tp=1 pp=2 dp=1 zero=1")):
        assert "saved at tp=2 pp=1 dp=1 zero=3 " + layout in logs[name], tail(r[name].parent / f"{name}.log")
        assert sorted(_rows(r[name])) == [1, 2, 3, 4]
        _assert_metrics_match(r[name], r["A"], (3, 4))


def test_resume_tp2_dp1_at_tp1_dp2(runs):
    """The student, the EMA teacher's masters and the sampler are resharded over DP=2: S_ema of the
    next step (the teacher on the next contexts, before any sampling) equals the uninterrupted run's;
    the thoughts themselves are drawn per DP rank (seed, step, dp_rank), so loss and reward follow the
    new layout (docs/operations.md)."""
    r, logs = runs
    assert "saved at tp=2 pp=1 dp=1 zero=3 into tp=1 pp=1 dp=2 zero=3" in logs["R2"]
    got, want = _rows(r["R2"])[3], _rows(r["A"])[3]
    assert got["rlp/s_ema_mean"] == pytest.approx(want["rlp/s_ema_mean"], abs=1e-5)
    assert got["optim/lr"] == want["optim/lr"] and got["optim/grad_norm"] > 0


def test_resume_hybrid_tp1_at_tp2(runs):
    r, logs = runs
    assert "saved at tp=1 pp=1 dp=1 zero=3 into tp=2 pp=1 dp=1 zero=3" in logs["H2"]
    _assert_metrics_match(r["H2"], r["H1"], (3,))


# --------------------------------------------------------------------------------------------------
# Nothing we read unpickles code (no launcher)
# --------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_crafted_pickle_in_rank_state_does_not_run(tmp_path):
    from rlp_dist.checkpoint.consolidate import load_full_state
    from rlp_dist.checkpoint.layout import read_rank_state
    from rlp_dist.checkpoint.safe_load import CheckpointLoadError

    marker = tmp_path / "pwned"
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text(tag.name)
    payload = {"teacher": _Evil(str(marker)), "rng": {}}
    with open(tag / "rank_00000.pt", "wb") as f:  # an earlier version's rank file, crafted
        pickle.dump(payload, f)
    torch.save({"module": {}, "x": _Evil(str(marker))}, tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    from rlp_dist.config import compose
    from rlp_dist.config.schema import to_dict

    (tag / "config.json").write_text(json.dumps(to_dict(compose(["+model=tiny_transformer"]))))
    with pytest.raises(CheckpointLoadError, match="rank_00000.pt"):
        read_rank_state(tag, 0)
    with pytest.raises(CheckpointLoadError, match="trust"):
        load_full_state(tmp_path / "run", "ema")
    with pytest.raises(CheckpointLoadError, match="model_states.pt"):
        load_full_state(tmp_path / "run", "student")
    assert not marker.exists(), "loading a crafted checkpoint ran code"


def test_rank_state_round_trip_without_pickle(tmp_path):
    import numpy as np
    from safetensors import safe_open

    from rlp_dist.checkpoint.layout import read_rank_state, write_rank_state
    from rlp_dist.checkpoint.manager import rng_state

    state = {"teacher": {"format": "rlp_dist.ema.v1", "masters": {"w": torch.randn(5)},
                         "layout": [("w", (5,), 3, 0, 3)], "ranks": {"dp": 2}, "initialized": True},
             "by_int": {0: [1.5, None, "x"]}, "rng": rng_state()}
    write_rank_state(tmp_path, 3, state)
    with safe_open(str(tmp_path / "rank_00003.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == "rlp_dist.rank_state.v2"
    back = read_rank_state(tmp_path, 3)
    assert back["teacher"]["layout"] == [("w", (5,), 3, 0, 3)] and back["by_int"] == {0: [1.5, None, "x"]}
    assert torch.equal(back["teacher"]["masters"]["w"], state["teacher"]["masters"]["w"])
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    np_a, np_b = back["rng"]["numpy"], state["rng"]["numpy"]
    assert np_a[0] == np_b[0] and np.array_equal(np_a[1], np_b[1]) and np_a[1].dtype == np_b[1].dtype
    assert tuple(np_a[2:]) == tuple(np_b[2:]) and back["rng"]["python"] == state["rng"]["python"]
    # a rank file of an earlier version (torch.save pickle with numpy's RNG state) still loads, weights-only
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(state, legacy / "rank_00000.pt")
    old = read_rank_state(legacy, 0)
    assert torch.equal(old["teacher"]["masters"]["w"], state["teacher"]["masters"]["w"])
    assert np.array_equal(old["rng"]["numpy"][1], np_b[1])
