"""Pipelined rollouts (rlp_dist.rlp.pipeline_decode) at PP=2 and PP=2 x TP=2 on both backbones.

Each rank first builds the unpipelined model (PP=1, this TP rank's shard, randomised weights), then
re-initialises the parallel state at PP=2 and copies that model's weights into its stage by global
name (layer numbers offset per stage; the tied output layer of the last stage is the embedding).
The unpipelined model is the reference: greedy decoding by full recompute, the teacher-forced S_pred
and the training forward's log-probs (the checks of test_rollout.py, imported). Every stage must
return the identical RolloutBatch.
"""

import pytest
import torch

from test_rollout import B, G, L, check_greedy, check_s_pred_and_behaviour, data, markers

FIELDS = ("prefix", "next_tokens", "thoughts", "mask", "behaviour_logp", "closed", "s_pred")
# (preset, overrides); tied Transformer: the last stage holds its own copy of the embedding
VARIANTS = (("tiny_transformer", []), ("tiny_transformer", ["model.tie_embeddings=false"]), ("tiny_hybrid", []))


def _stage_with_reference_weights(cfg, tp: int):
    """(reference PP=1 model, this rank's PP=2 stage with the same weights, PP=2 ParallelDims)."""
    from rlp_test_models import randomize

    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.ema import _global_names

    init_distributed(tp=tp, pp=1)  # its groups stay valid after the re-initialisation below
    torch.manual_seed(0)
    ref = randomize(build_model(cfg.model)).eval()
    full = dict(ref.named_parameters())
    dims = init_distributed(tp=tp, pp=2)
    stage = build_model(cfg.model)
    names = _global_names(stage)
    with torch.no_grad():
        for name, p in stage.named_parameters():
            g = names[name]
            if g == "output_layer.weight" and cfg.model.tie_embeddings:
                g = "embedding.word_embeddings.weight"
            p.copy_(full[g])
    return ref, stage, dims


def check_stage_contract(stage, dims):
    """The stage decoder against megatron's own stage forward: batch-first hidden (B, S, H) is the
    transpose of megatron's [S, B, H] (out of a stage without post_process, into one without
    pre_process through set_input_tensor); prefill and a decode step both."""
    from rlp_dist.rlp.rollout import cached_decoder_class

    ctx, _ = data(4)
    prefix = torch.cat([ctx, torch.tensor([7, 5]).expand(B, -1)], dim=1)  # (B, P)
    b, p = prefix.shape
    pos = torch.arange(p + 1).expand(b, -1)
    dec = cached_decoder_class(stage)(stage, p + 2, dims.tp_group)
    with torch.no_grad():
        if dims.is_first_stage:
            nxt = torch.randint(8, 2048, (b,), generator=torch.Generator().manual_seed(9))
            ours = torch.cat([dec.prefill(prefix), dec.step(nxt)], dim=1)  # (B, P+1, H)
            stock = stage(torch.cat([prefix, nxt[:, None]], 1), pos, None)  # [P+1, B, H]
            # the residual stream reaches ~60 here: float32 reassociation, 1e-6 of the largest entry
            scale = float(stock.abs().max())
            torch.testing.assert_close(ours, stock.transpose(0, 1), atol=1e-6 * scale, rtol=1e-5)
        else:  # the same hidden on every TP rank: activations are replicated
            h = torch.randn(b, p + 1, stage.config.hidden_size, generator=torch.Generator().manual_seed(9))
            ours = torch.stack([dec.prefill(h[:, :p]), dec.step(h[:, p:])], dim=1)  # (B, 2, V/tp)
            stage.set_input_tensor(h.transpose(0, 1).contiguous())  # [P+1, B, H]
            stock = stage(None, pos, None)  # (B, P+1, V/tp): megatron's logits are batch-first
            torch.testing.assert_close(ours, stock[:, p - 1:], atol=1e-5, rtol=1e-5)
            stage.set_input_tensor(None)


def check_micro_batches(stage, dims):
    """A decode step fed through the stages in 3 row slices (uneven: 12 rows -> 4+4+4 after a fork of
    3 contexts x 4) equals one slice: rows are independent within a step."""
    from rlp_dist.rlp.pipeline_decode import PipelineDecoder
    from rlp_dist.rlp.rollout import cached_decoder_class

    ctx, _ = data(4)
    prefix = torch.cat([ctx, torch.tensor([7, 5]).expand(B, -1)], dim=1)  # (B, P)
    tokens = torch.randint(8, 2048, (B * G, 3), generator=torch.Generator().manual_seed(11))
    dtype = next(stage.parameters()).dtype
    outs = []
    for m in (1, 3):
        dec = PipelineDecoder(cached_decoder_class(stage)(stage, prefix.shape[1] + 4, dims.tp_group), dims.pp_group,
                              stage.config.hidden_size, dtype, prefix.device, micro_batches=m)
        with torch.no_grad():
            dec.prefill(prefix, repeats=G)
            outs.append([dec.step(tokens[:, u]) for u in range(tokens.shape[1])])
    if dims.is_last_stage:
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    else:
        assert all(o is None for o in outs[0] + outs[1])


def _pp_worker(tp: int):
    from rlp_dist.config import compose
    from rlp_dist.rlp.rollout import RolloutGroups, RolloutSettings, sample_thoughts

    out = []
    for preset, overrides in VARIANTS:
        cfg = compose([f"+model={preset}", *overrides])
        ref, stage, dims = _stage_with_reference_weights(cfg, tp)
        check_stage_contract(stage, dims)
        check_micro_batches(stage, dims)
        greedy, _ = check_greedy(stage, "cached", dims.tp_group, ref_model=ref, pp_group=dims.pp_group)
        sampled = check_s_pred_and_behaviour(stage, "cached", dims.tp_group, ref_model=ref,
                                             pp_group=dims.pp_group)
        check_s_pred_and_behaviour(stage, "cached", dims.tp_group, ref_model=ref, pp_group=dims.pp_group,
                                   branches=(5, 9, 12))  # several contexts per document, pipelined
        out.append({k: (getattr(greedy, k), getattr(sampled, k)) for k in FIELDS})
        ctx, nxt = data()
        with pytest.raises(ValueError, match="runs unpipelined models only"):
            sample_thoughts(stage, ctx, nxt, markers(1), RolloutSettings(G, L, 1.0, engine="megatron"),
                            groups=RolloutGroups(pp=dims.pp_group))
        with pytest.raises(ValueError, match="pass pp_group"):
            sample_thoughts(stage, ctx, nxt, markers(1), RolloutSettings(G, L, 1.0),
                            groups=RolloutGroups(tp=dims.tp_group))
    return dims.pp_rank, dims.tp_rank, out


def _check_stages_agree(results, tp):
    """Every stage (and every TP rank) returned the identical RolloutBatch, bit for bit."""
    assert sorted((pp, t) for pp, t, _ in results) == [(s, t) for s in range(2) for t in range(tp)]
    first = results[0][2]
    for _, _, out in results[1:]:
        for a, b in zip(first, out):
            for k in FIELDS:
                for x, y in zip(a[k], b[k]):
                    assert torch.equal(x, y), k


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2], ids=["pp2", "pp2_tp2"])
def test_pipelined_rollout_equals_unpipelined_reference(tp):
    """PP=2 (and PP=2 x TP=2): greedy cached decoding equals greedy full recompute by the PP=1 model
    token for token (thoughts that close early and thoughts that run to L); S_pred and behaviour
    log-probs equal its teacher-forced forward to 1e-5; tied and untied output layers; every stage
    returns the same RolloutBatch; the stock engine at PP>1 is a clear error."""
    from helpers.spawn import run_ranks

    _check_stages_agree(run_ranks(_pp_worker, world_size=2 * tp, args=(tp,)), tp)
