"""Contexts of different lengths through the rollout engine (``sample_thoughts(context_lengths=...)``,
data.document_boundaries=respect: a context is the prefix of its own document): right-padded contexts
give, row for row, the rollout of each context alone; S_pred and behaviour log-probs equal the
teacher-forced and training forwards; the training forward over the padded prefixes, shared == replicated."""

import pytest
import torch

from rlp_dist.rlp.rollout import RolloutSettings, sample_thoughts
from test_rollout import G, L, markers

LENGTHS = torch.tensor([3, 9, 1, 6])  # the longest is C = 9
C = 9


def padded_contexts(seed=4):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(8, 2000, (len(LENGTHS), C), generator=gen)
    ctx = ctx.masked_fill(torch.arange(C) >= LENGTHS[:, None], 0)  # right padding (value never read)
    nxt = torch.randint(8, 2000, (len(LENGTHS),), generator=gen)
    return ctx, nxt


def check_equal_alone(model, **kw):
    ctx, nxt = padded_contexts()
    pilot = sample_thoughts(model, ctx, nxt, markers(close_id=1), RolloutSettings(1, 3, 1.0, top_k=1),
                            context_lengths=LENGTHS, **kw)
    mk = markers(int(pilot.thoughts[0, 1]))  # a closing marker the greedy policy emits early for some rows
    ro = sample_thoughts(model, ctx, nxt, mk, RolloutSettings(G, L, 1.0, top_k=1), context_lengths=LENGTHS, **kw)
    assert ro.closed.any() and not ro.closed.all()
    e = len(mk.prefix_ids)
    assert torch.equal(ro.prefix_lengths, LENGTHS + e)
    for b, n in enumerate(LENGTHS.tolist()):  # each context alone, unpadded, from position 0
        ref = sample_thoughts(model, ctx[b:b + 1, :n], nxt[b:b + 1], mk, RolloutSettings(G, L, 1.0, top_k=1), **kw)
        rows = slice(b * G, (b + 1) * G)
        assert torch.equal(ro.thoughts[rows], ref.thoughts), b
        assert torch.equal(ro.closed[rows], ref.closed)
        torch.testing.assert_close(ro.s_pred[rows], ref.s_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.behaviour_logp[rows], ref.behaviour_logp, atol=1e-5, rtol=1e-5)
        assert torch.equal(ro.prefix[b, :n + e], ref.prefix[0]) and not ro.prefix[b, n + e:].any()
    return ro


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_padded_contexts_equal_each_context_alone(request, preset):
    check_equal_alone(request.getfixturevalue(preset))


def test_context_lengths_errors(tiny_transformer):
    ctx, nxt = padded_contexts()
    with pytest.raises(ValueError, match="context_lengths must be"):
        sample_thoughts(tiny_transformer, ctx, nxt, markers(1), RolloutSettings(G, L, 1.0), context_lengths=LENGTHS + C)
    with pytest.raises(ValueError, match="cached engine"):
        sample_thoughts(tiny_transformer, ctx, nxt, markers(1), RolloutSettings(G, L, 1.0, engine="megatron"),
                        context_lengths=LENGTHS)


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_training_forward_over_padded_contexts_shared_equals_replicated(request, preset):
    """The policy-gradient forward of such a rollout: one packed forward per prefix length (shared
    prefix) == the right-padded replicated forward, log-probs and every gradient."""
    from rlp_dist.rlp.shared_prefix import policy_logprobs

    model = request.getfixturevalue(preset)
    ctx, nxt = padded_contexts(5)
    gen = torch.Generator().manual_seed(6)
    ro = sample_thoughts(model, ctx, nxt, markers(close_id=1), RolloutSettings(G, L, 1.0), generator=gen,
                         context_lengths=LENGTHS)
    adv = torch.randn(ro.thoughts.shape[0], generator=gen)
    model.train()

    def run(shared):
        model.zero_grad(set_to_none=True)
        logp = policy_logprobs(ro, model, shared=shared, temperature=0.7)  # (N, L)
        (-(logp * ro.mask * adv[:, None]).sum() / ro.mask.sum()).backward()
        return logp.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_logp, ref_grads = run(False)
    logp, grads = run(True)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    for k, g in ref_grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=k)


def _teacher_lengths_worker():
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.rlp.ema import EmaTeacher
    from rlp_dist.train import build_student, wrap_deepspeed

    dims = init_distributed(tp=1, pp=1)
    out = []
    for preset in ("tiny_transformer", "tiny_hybrid"):
        cfg = compose([f"+model={preset}", "rlp=tiny", "parallel.zero_stage=3"], 2)
        torch.manual_seed(0)
        engine = wrap_deepspeed(build_student(cfg, cfg.model.vocab_size), cfg, dims)
        teacher = EmaTeacher(build_student(cfg, cfg.model.vocab_size, load_weights=False), 0.9, 1, dims, "fp32")
        teacher.initialize(engine.module)
        ctx, nxt = padded_contexts(8 + dims.dp_rank)  # this DP rank's contexts
        together = teacher.score(ctx, nxt, 2, lengths=LENGTHS)  # (B,)
        apart = torch.cat([teacher.score(ctx[b:b + 1, :n], nxt[b:b + 1]) for b, n in enumerate(LENGTHS.tolist())])
        out.append(float((together - apart).abs().max()))
    return out


@pytest.mark.distributed
def test_teacher_scores_padded_contexts_at_their_own_lengths():
    """S_ema of right-padded contexts (one ZeRO-3 teacher forward, DP=2) == each context scored alone."""
    from helpers.spawn import run_ranks

    for diffs in run_ranks(_teacher_lengths_worker, world_size=2):
        assert max(diffs) < 1e-5, diffs
