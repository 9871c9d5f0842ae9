"""Analytic FLOPs (rlp_dist.perf.flops) against torch.utils.flop_counter on real megatron-core forwards.

The counter sees the matmul-class ops a forward executes (mm, bmm/baddbmm of attention, the SSD scan's
einsums, the depthwise conv); megatron's local DotProductAttention scores the full S x S square, so the
comparison uses the analytic count's dense-attention variant, and leaves out the analytic
``elementwise`` bucket (norms, activations: not counted by the counter).
"""

import pytest
from helpers.spawn import run_ranks

SHAPES = [(2, 128), (1, 200)]  # (batch, seq): one chunk-aligned, one padded Mamba chunk


def _measure():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model

    init_distributed(1, 1)
    out = {}
    for preset in ("tiny_transformer", "tiny_hybrid"):
        torch.manual_seed(0)
        model = build_model(compose([f"+model={preset}"]).model)
        for b, s in SHAPES:
            ids = torch.randint(0, 2048, (b, s))
            pos = torch.arange(s).expand(b, s)
            with FlopCounterMode(display=False) as fc:
                logits = model(ids, pos, None)
            out[(preset, b, s, "fwd")] = fc.get_total_flops()
            if preset == "tiny_transformer" and s == 128:
                with FlopCounterMode(display=False) as fc:
                    logits = model(ids, pos, None)
                    logits.float().logsumexp(-1).sum().backward()
                out[(preset, b, s, "fwd+bwd")] = fc.get_total_flops()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_ranks(_measure, 1)[0]


def _matmul(d):
    return d["total"] - d["elementwise"]


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
@pytest.mark.parametrize("b,s", SHAPES)
def test_forward_flops_match_flop_counter(preset, b, s, measured):
    from rlp_dist.config import compose
    from rlp_dist.perf import flops

    m = compose([f"+model={preset}"]).model
    ana = flops.sequence_forward(m, b, s, dense_attention=True)
    got = measured[(preset, b, s, "fwd")]
    print(f"{preset} b={b} s={s}: analytic {_matmul(ana):.4g} counter {got:.4g}")
    assert abs(_matmul(ana) - got) <= 0.05 * got
    assert ana["elementwise"] < 0.05 * ana["total"]
    if preset == "tiny_hybrid":
        assert ana["ssm"] > 0.1 * ana["total"]  # the scan is a real part of the count, not noise


def test_backward_is_twice_the_forward(measured):
    """fwd+bwd = 3x forward for the layers and the output layer (the embedding's backward is a scatter)."""
    from rlp_dist.config import compose
    from rlp_dist.perf import flops

    m = compose(["+model=tiny_transformer"]).model
    fwd = flops.sequence_forward(m, 2, 128, dense_attention=True)
    train = flops._train(fwd, "none") - 3 * fwd["elementwise"]
    got = measured[("tiny_transformer", 2, 128, "fwd+bwd")]
    assert abs(train - got) <= 0.05 * got


def _rlp_cfg(preset="qwen3_1_7b", *extra):
    from rlp_dist.config import compose

    return compose([f"+model={preset}", "rlp=default", *extra])


def test_phases_scale_as_the_shapes_say():
    from rlp_dist.perf import flops

    cfg = _rlp_cfg()
    m, r = cfg.model, cfg.rlp
    f = flops.step_flops(cfg, thought_len_mean=512)
    assert set(f) == {"prefill", "decode", "teacher", "policy", "total"}
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    # decode counts live rows only: twice the thought tokens, at least twice the FLOPs
    f2 = flops.step_flops(cfg, thought_len_mean=1024)
    assert 2 * f["decode"] < f2["decode"] < 2.2 * f["decode"]
    assert f2["prefill"] == f["prefill"] and f2["policy"] == f["policy"]  # padded to L either way
    # per-row lengths: the quadratic term of unequal rows exceeds that of their mean
    lens = [64, 960] * (r.group_size // 2)
    assert flops.step_flops(cfg, thought_lens=lens)["decode"] > f["decode"]
    # the shared prefix computes each context once: cheaper than G replicas, dearer than no prefix
    rep = flops.step_flops(_rlp_cfg("qwen3_1_7b", "rlp.shared_prefix=false"), thought_len_mean=512)
    assert f["policy"] < rep["policy"]
    p = r.context_len + 1  # the replicated forward repeats each prefix G-1 more times (fwd + bwd)
    extra = flops.sequence_forward(m, r.contexts_per_step * (r.group_size - 1), p, logits=False)["total"]
    assert rep["policy"] - f["policy"] == pytest.approx(3 * extra, rel=1e-9)
    # teacher: one no-think forward of C tokens per context; skipped on steps without teacher scoring
    assert flops.step_flops(cfg, thought_len_mean=512, score_teacher=False)["teacher"] == 0
    # a dense model's NTP step is about 6 N FLOPs per token (+ attention)
    n_params = 28 * (2 * 2048 * (16 + 16) * 128 + 3 * 2048 * 6144) + 2048 * 151936
    assert 6 * n_params < flops.ntp_flops_per_token(m, 2048) < 6 * n_params * 1.25


def test_recompute_adds_forward_work():
    from rlp_dist.perf import flops

    cfg = _rlp_cfg()
    fwd = flops.sequence_forward(cfg.model, 4, 2048)
    none, sel, full = (flops._train(fwd, rc) for rc in ("none", "selective", "full"))
    assert none == pytest.approx(3 * fwd["total"])
    assert sel - none == pytest.approx(fwd["attention"])
    assert full - none == pytest.approx(fwd["total"] - fwd["vocab"])


def test_peak_table_mfu_and_the_papers_budget():
    from rlp_dist.perf import flops

    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("NVIDIA H200") == 989e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops("NVIDIA B200") == 2250e12
    assert flops.peak_flops("cpu") is None and flops.peak_flops("cpu", 100) == 100e12
    assert flops.mfu(989e12 * 8 * 0.4, 1.0, 8, 989e12) == pytest.approx(0.4)
    assert flops.mfu(1.0, 1.0, 1, None) is None
    # RLP.md: 170M input tokens at G=16 came to ~6B CPT tokens (l_seq = 2048 context + 2048 thought)
    cfg = _rlp_cfg()
    iters = round(170e6 / (512 * 2048))
    t = flops.cpt_equivalent_tokens_of(cfg, iters)
    assert 5e9 < t < 7e9
    assert t == flops.cpt_equivalent_tokens(16, 4096, 512, iters, 512 * iters * 2048)


def test_flop_meter_accumulates_and_resumes():
    from rlp_dist.perf import flops

    cfg = _rlp_cfg("qwen3_1_7b", "logging.peak_tflops=989")
    meter = flops.FlopMeter(cfg, n_gpus=32)
    one = flops.step_flops(cfg, thought_len_mean=300)["total"]
    m1 = meter.step(10.0, thought_len_mean=300)
    m2 = meter.step(10.0, thought_len_mean=300)
    assert m2["perf/flops_total"] == pytest.approx(2 * one) and m1["perf/flops_step"] == pytest.approx(one)
    assert m1["perf/tflops_per_s"] == pytest.approx(one / 10 / 32 / 1e12)
    assert m1["perf/mfu"] == pytest.approx(one / 10 / 32 / 989e12)
    assert m2["perf/cpt_equivalent_tokens"] == flops.cpt_equivalent_tokens_of(cfg, 2)
    resumed = flops.FlopMeter(cfg, n_gpus=32)
    resumed.load_state_dict(meter.state_dict())
    assert resumed.step(10.0, thought_len_mean=300)["perf/flops_total"] == pytest.approx(3 * one)
    assert "perf/mfu" not in flops.FlopMeter(_rlp_cfg(), 32, device_name=None).step(1.0, thought_len_mean=1)
