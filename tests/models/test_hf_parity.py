"""Our megatron-core backbones vs transformers' Qwen3ForCausalLM / NemotronHForCausalLM.

Weights are created by transformers, saved, imported by rlp_dist.models.hf into the TP/PP-sharded
model; log-probs of the same tokens must agree to 1e-4 (fp32) at TP=1, TP=2 and PP=2. Each spawn
also exports back to a transformers directory: the round trip must be exact and the exported model,
loaded by transformers, must reproduce our log-probs. For the hybrid at PP=1, megatron's cached
inference path (StaticInferenceContext: prefill, then one token at a time through the conv and SSM
state-update kernels) must reproduce the full forward's logits."""

import pytest
import torch
from helpers.spawn import run_ranks

TOL = 1e-4


def _decode_vs_full(model, ids, prefill=5):
    """Max |logit diff| of cached decoding (prefill, then single tokens) vs one full forward."""
    from megatron.core.inference.contexts import StaticInferenceContext

    B, L = ids.shape
    pos = torch.arange(L).unsqueeze(0).expand(B, L)  # (B, L)
    model.eval()
    with torch.no_grad():
        ctx = StaticInferenceContext(B, L)
        ctx.materialize_only_last_token_logits = False
        full = model(ids, pos, None, inference_context=ctx, runtime_gather_output=True)  # (B, L, V)
        ctx = StaticInferenceContext(B, L)
        worst = 0.0
        out = model(ids[:, :prefill], pos[:, :prefill], None, inference_context=ctx, runtime_gather_output=True)
        worst = max(worst, (out[:, -1] - full[:, prefill - 1]).abs().max().item())
        ctx.sequence_len_offset += prefill
        for t in range(prefill, L):
            out = model(ids[:, t:t + 1], pos[:, t:t + 1], None, inference_context=ctx, runtime_gather_output=True)
            worst = max(worst, (out[:, -1] - full[:, t]).abs().max().item())
            ctx.sequence_len_offset += 1
    return worst


CONFIGS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp); 2 ranks: (1, 1) runs two data-parallel copies


def _ranks_score_and_export(items, export_root):
    """On each rank, per (tp, pp): import every checkpoint, score its ids, export it, and for the hybrid
    at PP=1 compare cached decoding with the full forward. Returns {(tp, pp): {name: result}}."""
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models import hf, runner
    from rlp_dist.models.builder import build_model

    out = {}
    for tp, pp in CONFIGS:
        dims = init_distributed(tp, pp)
        res = out.setdefault((tp, pp), {})
        for name, (hf_dir, ids) in items.items():
            mcfg = hf.model_config_from_hf(hf_dir)
            model = build_model(mcfg)
            hf.load_into(model, hf_dir, mcfg)
            lp = runner.score(model, ids)
            hf.export(model, mcfg, f"{export_root}/tp{tp}_pp{pp}/{name}", base_config=hf.read_hf_config(hf_dir))
            if lp is not None and dims.tp_rank == 0:
                res[name] = lp
            if mcfg.arch == "hybrid" and pp == 1:
                res[f"{name}/decode"] = _decode_vs_full(model, ids)
    return out


@pytest.fixture(scope="module")
def ours(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    items = {n: (d, ids) for n, (d, ids, _) in hf_models.items()}
    merged = {}
    for r in run_ranks(_ranks_score_and_export, 2, (items, str(root))):
        for cfg, res in r.items():
            merged.setdefault(cfg, {}).update(res)
    return merged, root


def _check_round_trip(src_dir, exp_dir):
    from transformers import AutoModelForCausalLM

    from rlp_dist.models.hf import SafetensorsReader

    a, b = SafetensorsReader(src_dir), SafetensorsReader(exp_dir)
    assert set(a.where) == set(b.where), set(a.where) ^ set(b.where)
    for k in a.where:
        assert torch.equal(a.rows(k), b.rows(k)), k
    return AutoModelForCausalLM.from_pretrained(exp_dir, dtype=torch.float32).eval()


def _check(hf_models, ours, tp, pp):
    got, root = ours[0][(tp, pp)], ours[1] / f"tp{tp}_pp{pp}"
    for name, (hf_dir, ids, ref) in hf_models.items():
        diff = (got[name] - ref).abs().max().item()
        print(f"{name} tp={tp} pp={pp}: max |logp diff| vs transformers = {diff:.2e}")
        assert diff <= TOL, f"{name} tp={tp} pp={pp}: max |diff| {diff:.3g} > {TOL}"
        exported = _check_round_trip(hf_dir, root / name)
        with torch.no_grad():
            logits = exported(ids).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert (lp - got[name]).abs().max().item() <= TOL
        if f"{name}/decode" in got:
            print(f"{name} tp={tp}: cached decode vs full forward, max |logit diff| {got[f'{name}/decode']:.2e}")
            assert got[f"{name}/decode"] <= 1e-5


@pytest.mark.distributed
def test_parity_tp1(hf_models, ours):
    _check(hf_models, ours, 1, 1)


@pytest.mark.distributed
def test_parity_tp2(hf_models, ours):
    _check(hf_models, ours, 2, 1)


@pytest.mark.distributed
def test_parity_pp2(hf_models, ours):
    _check(hf_models, ours, 1, 2)
