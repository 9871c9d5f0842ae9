"""`rlp-dist plan`: the memory model against measured peaks, the paper's recipe fitting on 80 GB, the CLI.

Calibration: each shape runs in a fresh process (``python tests/unit/test_plan.py SPEC``) that builds a
Qwen3-1.7B-wide model (H=2048, 16/8 heads, F=6144, fp32 on CPU; one layer at V=151936, four at a small V so
that the activations dominate), gives every
parameter a zero gradient (so the backward accumulates in place, as in training after the first step),
and samples its RSS every millisecond while one policy-gradient forward + backward of the training path
(``shared_prefix.policy_logprobs``: packed shared-prefix row, SDPA branches, fused chunked log-probs)
runs. The measured peak minus the RSS before it must be within 25% of the plan's activations + log-prob
workspace for that shape (``memory.policy_activations`` + the layer's fresh gradients + the log-prob part,
``max(logprob_workspace, output_grads_end - activations)``, all with a 4-byte dtype).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
WIDE = ["+model=qwen3_1_7b"]
SHAPES = [  # (P, G, L, recompute, vocab, layers): the real vocabulary (log-prob/output-gradient bound), then a
    # small one and four layers so that the layer activations dominate, without and with full recompute
    (256, 4, 16, "none", 151936, 1),
    (512, 4, 16, "none", 8192, 4),
    (512, 4, 16, "full", 8192, 4),
]


def measure(p: int, g: int, big_l: int, recompute: str, vocab: int, layers: int) -> dict:
    """Run in a fresh process: measured peak RSS delta of one policy fwd+bwd, and the plan's prediction."""
    import threading
    import time

    import psutil
    import torch

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.perf import memory as M
    from rlp_dist.rlp import shared_prefix
    from rlp_dist.rlp.rollout import RolloutBatch

    init_distributed(1, 1)
    cfg = compose(WIDE + [f"model.recompute={recompute}", f"model.vocab_size={vocab}", f"model.num_layers={layers}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
    v, n = cfg.model.vocab_size, g
    gen = torch.Generator().manual_seed(0)
    ro = RolloutBatch(prefix=torch.randint(8, v, (1, p), generator=gen),
                      next_tokens=torch.randint(8, v, (1,), generator=gen),
                      thoughts=torch.randint(8, v, (n, big_l), generator=gen), mask=torch.ones(n, big_l),
                      behaviour_logp=torch.zeros(n, big_l), closed=torch.ones(n, dtype=torch.bool),
                      s_pred=torch.zeros(n), group_size=g)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    logp = shared_prefix.policy_logprobs(ro, model, shared=True, temperature=0.7)  # (G, L)
    (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    lay = M.Layout(world=1, dtype_bytes=4, recompute=recompute, contexts_per_micro_batch=1)
    layers = M.stage_layers(cfg.model, 1)[0]
    act = M.policy_activations(cfg.model, lay, layers, p, g, big_l)
    act += 4 * max(M.layer_params(cfg.model, k, 1) for k in layers)  # the backward's fresh layer gradients
    lp = max(M.logprob_workspace(cfg.model, lay, g, big_l), M.output_grads_end(cfg.model, lay, 0) - act)
    return {"measured_gb": (peak[0] - base) / 1e9, "activations_gb": act / 1e9, "logprob_gb": lp / 1e9,
            "predicted_gb": (act + lp) / 1e9, "seconds": seconds}


def _run_shape(shape) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    from helpers.spawn import free_port

    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, HERE, json.dumps(shape)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-G{}-L{}-{}-V{}-layers{}".format(*s))
def test_activation_and_logprob_prediction_within_25pct_of_measured(shape):
    r = _run_shape(shape)
    print(f"shape {shape}: measured {r['measured_gb']:.3f} GB, predicted {r['predicted_gb']:.3f} GB "
          f"(activations {r['activations_gb']:.3f}, log-prob {r['logprob_gb']:.3f}), {r['seconds']:.1f} s")
    assert abs(r["predicted_gb"] - r["measured_gb"]) <= 0.25 * r["measured_gb"]


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))


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
