"""`rlp-dist plan`: the memory model against measured peaks, the paper's recipe fitting on 80 GB, the CLI.

Calibration: each shape is measured by the memory benchmark's own worker (``rlp_dist.bench.memory.
measure_policy_peak``, a fresh process: Qwen3-1.7B width H=2048, 16/8 heads, F=6144, fp32 on CPU; a
warm-up step allocates the gradients, then the peak RSS of one policy-gradient forward + backward of the
seam's path ``shared_prefix.policy_logprobs`` + the clipped surrogate, minus the RSS before it). Shapes:
one layer at the real V=151936 (bound by the log-prob op and the output/embedding gradients), and four
layers at a small V so that the layer activations dominate, without and with full recompute. The plan's
prediction for the shape — the training phase's ``activations`` + ``logprob`` parts
(``memory.policy_peak_parts``, 4-byte dtype) — must be within 25% of the measurement. glibc's malloc
keeps freed blocks below its (adaptive) mmap threshold, so after the benchmark's warm-up step the RSS
would not rise for the activations at all: the workers run with ``MALLOC_MMAP_THRESHOLD_=65536``, which
returns every block of 64 KB or more to the kernel when it is freed.
"""

import json

import pytest

SHAPES = [  # bench.memory shapes: G thoughts of L tokens after P, layers, vocabulary, recompute
    {"G": 4, "L": 16, "P": 256, "layers": 1, "vocab": 151936, "recompute": "none"},
    {"G": 4, "L": 16, "P": 512, "layers": 4, "vocab": 8192, "recompute": "none"},
    {"G": 4, "L": 16, "P": 512, "layers": 4, "vocab": 8192, "recompute": "full"},
]


def predicted_gb(shape: dict) -> dict:
    """The plan's activation + log-prob prediction (GB) for one benchmark shape."""
    from rlp_dist.bench.memory import _model_overrides
    from rlp_dist.config import compose
    from rlp_dist.perf import memory as M

    m = compose(["+model=qwen3_1_7b", *_model_overrides(shape)]).model
    g, big_l, p = shape["G"], shape["L"], shape["P"]
    lay = M.Layout(world=1, zero_stage=0, dtype_bytes=4, recompute=shape["recompute"], contexts_per_micro_batch=1)  # no ZeRO, as measured
    layers = M.stage_layers(m, 1)[0]
    act, lp = M.policy_peak_parts(m, lay, layers, p, g, big_l, last_stage=True, stage=0)
    return {"activations": act / 1e9, "logprob": lp / 1e9, "total": (act + lp) / 1e9}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "G{G}-L{L}-P{P}-layers{layers}-V{vocab}-{recompute}".format(**s))
def test_activation_and_logprob_prediction_within_25pct_of_measured(shape, monkeypatch):
    from rlp_dist.bench.memory import measure_policy_peak

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the worker process
    got = measure_policy_peak({**shape, "contexts": 1, "thoughts_per_micro_batch": 0}, "new", timeout=600)
    pred = predicted_gb(shape)
    print(f"{shape}: measured {got['peak_gb']:.3f} GB, predicted {pred['total']:.3f} GB "
          f"(activations {pred['activations']:.3f}, log-prob {pred['logprob']:.3f}), step {got['time_s']:.1f} s")
    assert abs(pred["total"] - got["peak_gb"]) <= 0.25 * got["peak_gb"]


# ---- the model's arithmetic and the plan, no process needed ------------------------------------------
def _cfg(*overrides):
    from rlp_dist.config import compose

    return compose(list(overrides))


def _count(names):
    from rlp_dist.models import params

    return {n: params.count([f"+model={n}"])["total"] for n in names}


PRESETS = ["tiny_transformer", "tiny_hybrid", "qwen3_1_7b", "nemotron_nano_12b"]


def test_parameter_count_equals_the_built_models():
    from helpers.spawn import run_ranks
    from rlp_dist.perf import memory as M

    built = run_ranks(_count, 1, (PRESETS,))[0]  # megatron-core models on the meta device
    for name in PRESETS:
        m = _cfg(f"+model={name}").model
        assert M.total_params(m) == built[name], name
        # two PP stages hold the model once, plus the last stage's copy of a tied embedding
        stages = M.stage_params(m, 1, 2, 0) + M.stage_params(m, 1, 2, 1)
        assert stages == built[name] + (m.vocab_size * m.hidden_size if m.tie_embeddings else 0), name
        # a TP=2 shard holds half of every matrix and all of each norm
        assert built[name] / 2 < M.stage_params(m, 2, 1, 0) < built[name] / 2 * 1.01, name


def test_persistent_parts_follow_the_zero_stage():
    from rlp_dist.perf import memory as M

    m = _cfg("+model=qwen3_1_7b").model
    psi = M.total_params(m)
    z3 = M.persistent(m, M.Layout(world=32, zero_stage=3, dtype_bytes=2), 0)
    assert z3["weights"] == pytest.approx(2 * psi / 32) and z3["optimizer"] == pytest.approx(12 * psi / 32)
    assert z3["ema_teacher"] == pytest.approx(6 * psi / 32)  # bf16 shard + fp32 master, over DP
    z1 = M.persistent(m, M.Layout(world=32, zero_stage=1, dtype_bytes=2), 0)
    assert z1["weights"] == pytest.approx(2 * psi) and z1["gradients"] == pytest.approx(6 * psi)
    assert z1["optimizer"] == z3["optimizer"]
    fp32 = M.persistent(m, M.Layout(world=32, zero_stage=3, dtype_bytes=4), 0)
    assert fp32["ema_teacher"] == pytest.approx(4 * psi / 32)  # the fp32 shard is its own master


def test_rollout_state_sizes_by_hand():
    from rlp_dist.perf import memory as M

    cfg = _cfg("+model=qwen3_1_7b", "rlp=default")
    lay = M.Layout(world=32, tp=2, dtype_bytes=2, contexts_per_micro_batch=2)
    r = M.rollout_phase(cfg, lay, 0)
    rows, pos = 2 * 16, 2049 + 2048 + 1
    assert r["kv_cache"] == 2 * rows * pos * (8 / 2) * 128 * 2 * 28  # K and V, 28 attention layers: 7.5 GB
    assert r["mamba_states"] == 0
    h = _cfg("+model=nemotron_nano_12b", "rlp=default")
    rh = M.rollout_phase(h, M.Layout(world=32, tp=8, dtype_bytes=2, contexts_per_micro_batch=1), 0)
    conv = (128 * 80 + 2 * 8 * 128) / 8
    assert rh["mamba_states"] == pytest.approx(16 * 28 * (3 * conv * 2 + 128 / 8 * 80 * 128 * 4))
    assert rh["kv_cache"] == 2 * 16 * pos * 1 * 128 * 2 * 6  # 6 attention layers, 8 groups / tp 8


def test_memory_knobs_lower_the_training_peak():
    from dataclasses import replace

    from rlp_dist.perf import memory as M

    cfg = _cfg("+model=qwen3_1_7b", "rlp=default", "train.dtype=bf16")
    base = M.Layout(world=32, dtype_bytes=2, contexts_per_micro_batch=1)
    act = {rc: M.training_phase(cfg, replace(base, recompute=rc), 0)["activations"] for rc in ("none", "selective", "full")}
    assert act["none"] > act["selective"] > act["full"]
    half = M.training_phase(cfg, replace(base, thoughts_per_micro_batch=8), 0)["activations"]
    assert 0.45 * act["none"] < half < 0.6 * act["none"]  # S = P + g(L-1): about half the tokens
    tp2 = M.training_phase(cfg, replace(base, tp=2), 0)["activations"]
    assert tp2 < act["none"]
    # the reference path's full logits: ~10x the fused op's workspace at the paper's shape
    fused = M.logprob_workspace(cfg.model, base, 16, 2048)
    logits = M.logprob_workspace(cfg.model, replace(base, path="logits"), 16, 2048)
    assert logits > 10 * fused and fused < 4e9


@pytest.mark.parametrize("name,overrides", [
    ("qwen3_1_7b", ["parallel.tp=1", "model.recompute=full", "rlp.contexts_per_micro_batch=2"]),
    ("qwen3_1_7b", ["parallel.tp=2", "model.recompute=full", "rlp.contexts_per_micro_batch=4"]),
    ("nemotron_nano_12b", ["parallel.tp=8", "model.recompute=full", "rlp.contexts_per_micro_batch=1"]),
])
def test_the_papers_recipe_fits_80gb(name, overrides):
    from rlp_dist.perf.plan import plan

    base = [f"+model={name}", "rlp=default", "train.dtype=bf16"]
    p = plan(base + overrides, gpu_mem=80, gpus=32)
    assert p["fits"] and p["total_gb"] <= p["budget_gb"] <= 80
    assert set(p["flops_per_step"]) == {"prefill", "decode", "teacher", "policy", "total"}
    # as the user types it (defaults: four contexts per micro-batch, no recompute) it does not fit, and
    # every suggestion, re-planned, does
    p0 = plan(base + [overrides[0]], gpu_mem=80, gpus=32)
    assert not p0["fits"] and p0["suggestions"]
    for s in p0["suggestions"]:
        again = plan(base + [overrides[0]] + [f"{k}={v}" for k, v in s["overrides"].items()], 80, 32)
        assert again["fits"] and again["total_gb"] == pytest.approx(s["total_gb"])


def test_cli_json_and_errors(tmp_path, capsys):
    from rlp_dist.cli import main

    out = tmp_path / "plan.json"
    rc = main(["plan", "+model=qwen3_1_7b", "train.dtype=bf16", "model.recompute=full",
               "rlp.contexts_per_micro_batch=1", "--gpu-mem", "80", "--gpus", "16", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["fits"] is True and d["gpus"] == 16 and d["dp"] == 16
    ph = d["phases"]  # peak = persistent + the larger phase; the parts list both phases
    assert d["total_gb"] == pytest.approx(ph["persistent"] + max(ph["rollout"], ph["training"]))
    assert sum(d["parts"].values()) == pytest.approx(sum(ph.values()))
    assert "FITS" in capsys.readouterr().out
    assert main(["plan", "+model=qwen3_1_7b", "--gpu-mem", "8", "--gpus", "32"]) == 1  # does not fit: exit 1
    assert main(["plan", "+model=qwen3_1_7b", "parallel.tp=2", "--gpus", "3"]) == 2
    assert "error: world size 3 is not divisible" in capsys.readouterr().err
    assert main(["plan", "+model=qwen3_1_7b", "--gpu-mem", "0"]) == 2
    assert main(["plan", "+model=qwen3_1_7b", "--gpu-mem", "2"]) == 2  # nothing left after the margin
    assert "leaves nothing after the margin" in capsys.readouterr().err


def test_startup_line_and_validated_suggestions():
    from rlp_dist.config.schema import ConfigError
    from rlp_dist.perf import plan as P

    cfg = _cfg("+model=qwen3_1_7b", "train.dtype=bf16", "model.recompute=full", "rlp.contexts_per_micro_batch=2")
    line = P.startup_line(cfg, 32)
    assert line.startswith("plan: 27.") and "GB per GPU" in line
    assert P.plan_config(cfg, 80, 32, dtype_bytes=4)["total_gb"] > P.plan_config(cfg, 80, 32)["total_gb"]
    assert P._validated(cfg, {"parallel.tp": "2"}, 32) == {"parallel.tp": "2"}
    with pytest.raises(ConfigError):  # 6 does not divide G=16
        P._validated(cfg, {"rlp.thoughts_per_micro_batch": "6"}, 32)
