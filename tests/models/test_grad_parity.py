"""Gradients on the same weights: TP=2 vs TP=1 and PP=2 vs PP=1, compared in transformers naming.

Includes the reductions megatron's finalize_model_grads would do (rlp_dist.models.grads): QK-norm
weights summed over TP, tied embedding/output summed over the first and last stage."""

import pytest
from helpers.spawn import run_ranks

CONFIGS = [(1, 1), (2, 1), (1, 2)]


def _ranks_grads(items):
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models import grads, hf, runner
    from rlp_dist.models.builder import build_model

    out = {}
    for tp, pp in CONFIGS:  # 2 ranks: (1, 1) runs data-parallel copies, which give identical grads
        dims = init_distributed(tp, pp)
        for name, (hf_dir, ids) in items.items():
            mcfg = hf.model_config_from_hf(hf_dir)
            model = build_model(mcfg)
            hf.load_into(model, hf_dir, mcfg)
            runner.run_schedule(model, ids, micro_batch_size=1, forward_only=False)
            grads.reduce_grads(model, dims.tp_group, tp, tied_pp=mcfg.tie_embeddings and pp > 1)
            local = {n: p.grad for n, p in model.named_parameters()}
            g = hf.hf_state_dict(model, mcfg, local=local)
            if dims.tp_rank == 0:
                out.setdefault((tp, pp), {}).setdefault(name, {}).update(g)
    return out


@pytest.mark.distributed
def test_grad_parity_tp2_pp2_vs_unsharded(hf_models):
    names = ["qwen3_gqa2_tied", "nemotron_h_mixed"]  # QK-norm + tied embeddings; all Mamba params
    items = {n: (hf_models[n][0], hf_models[n][1]) for n in names}
    results = run_ranks(_ranks_grads, 2, (items,))
    merged = {}
    for r in results:
        for cfg, per_model in r.items():
            for name, g in per_model.items():
                merged.setdefault(cfg, {}).setdefault(name, {}).update(g)
    for name in names:
        ref = merged[(1, 1)][name]
        scale = max(v.abs().max().item() for v in ref.values())
        assert scale > 0
        for cfg in [(2, 1), (1, 2)]:
            got = merged[cfg][name]
            assert set(got) == set(ref), set(got) ^ set(ref)
            worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
            print(f"{name} tp,pp={cfg}: max |grad diff| {worst[0]:.2e} ({worst[1]}), grad scale {scale:.2e}")
            assert worst[0] <= 1e-5 * scale, f"{name} {cfg}: {worst[1]} differs by {worst[0]:.3g}"
