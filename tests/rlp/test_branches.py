"""Several contexts per document (``sample_thoughts(..., branches=...)``): one prefill per document,
the contexts x_<t_j branching from it (attention: a prefix of its KV; Mamba: the conv/SSM states
captured at t_j during the one scan), against independent rollouts of each context and against the
stock forward; the training forward over prefixes of different lengths, shared vs replicated."""

import pytest
import torch

from rlp_dist.rlp.logprobs import token_logprobs
from rlp_dist.rlp.rollout import RolloutGroups, RolloutSettings, sample_thoughts
from rlp_dist.rlp.shared_prefix import policy_logits
from test_rollout import G, L, check_s_pred_and_behaviour, documents, markers

BRANCHES = (5, 9, 12)  # three contexts per document: x_<5, x_<9, x_<12


def greedy_close(model, docs):
    """A closing marker the greedy policy emits early for some thoughts (both stop kinds covered)."""
    ro = sample_thoughts(model, docs, None, markers(close_id=1), RolloutSettings(1, 3, 1.0, top_k=1), branches=BRANCHES)
    return int(ro.thoughts[0, 1])


def check_branches_equal_independent(model, tp_group=None, **kw):
    docs = documents(4)
    mk = markers(greedy_close(model, docs))
    ro = sample_thoughts(model, docs, None, mk, RolloutSettings(G, L, 1.0, top_k=1),
                         groups=RolloutGroups(tp=tp_group), branches=BRANCHES, **kw)
    assert ro.closed.any() and not ro.closed.all()
    k = len(BRANCHES)
    for j, t in enumerate(BRANCHES):  # each context on its own: prefilled alone, from position 0
        ref = sample_thoughts(model, docs[:, :t], docs[:, t], mk, RolloutSettings(G, L, 1.0, top_k=1),
                              groups=RolloutGroups(tp=tp_group), **kw)
        rows = (torch.arange(docs.shape[0])[:, None] * k + j) * G + torch.arange(G)  # (D, G) rows of context j
        rows = rows.reshape(-1)
        assert torch.equal(ro.thoughts[rows], ref.thoughts), t
        assert torch.equal(ro.closed[rows], ref.closed)
        torch.testing.assert_close(ro.s_pred[rows], ref.s_pred, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ro.behaviour_logp[rows], ref.behaviour_logp, atol=1e-5, rtol=1e-5)
        p = ref.prefix.shape[1]
        ctx_rows = torch.arange(docs.shape[0]) * k + j
        assert torch.equal(ro.prefix[ctx_rows, :p], ref.prefix) and (ro.prefix_lengths[ctx_rows] == p).all()
    return ro


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_branched_rollout_equals_independent_contexts(request, preset):
    """Greedy: the branched rollout of D documents x k contexts equals k separate rollouts, token for
    token, with S_pred and behaviour log-probs to 1e-5."""
    check_branches_equal_independent(request.getfixturevalue(preset))


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_branched_s_pred_and_behaviour_equal_forward(request, preset):
    """Sampled (T=0.7, top-p 0.9): S_pred equals the teacher-forced forward of each variable-length
    sequence and behaviour log-probs equal the (right-padded) training forward's."""
    check_s_pred_and_behaviour(request.getfixturevalue(preset), "cached", branches=BRANCHES)


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_branched_training_forward_shared_equals_replicated(request, preset):
    """The policy-gradient forward over prefixes of different lengths: one packed forward per length
    (shared prefix) equals the right-padded replicated forward: logits, loss and every gradient."""
    model = request.getfixturevalue(preset)
    gen = torch.Generator().manual_seed(5)
    ro = sample_thoughts(model, documents(6), None, markers(close_id=1), RolloutSettings(G, L, 1.0), generator=gen,
                         branches=BRANCHES)
    adv = torch.randn(ro.thoughts.shape[0], generator=gen)
    model.train()

    def run(shared):
        model.zero_grad(set_to_none=True)
        logits = policy_logits(ro, model, shared=shared)  # (N, L, V)
        loss = -(token_logprobs(logits, ro.thoughts, 0.7) * ro.mask * adv[:, None]).sum() / ro.mask.sum()
        loss.backward()
        return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref_logits, ref_grads = run(False)
    logits, grads = run(True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for k, g in ref_grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=k)


def test_branch_points_are_checked(tiny_transformer):
    docs = documents()
    with pytest.raises(ValueError, match="must increase"):
        sample_thoughts(tiny_transformer, docs, None, markers(1), RolloutSettings(G, L, 1.0), branches=(9, 5))
    with pytest.raises(ValueError, match="below the document length"):
        sample_thoughts(tiny_transformer, docs, None, markers(1), RolloutSettings(G, L, 1.0), branches=(5, 16))
    with pytest.raises(ValueError, match="next_tokens=None"):
        sample_thoughts(tiny_transformer, docs, docs[:, 5], markers(1), RolloutSettings(G, L, 1.0), branches=(5,))


def _teacher_positions_worker():
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
        docs = documents(7 + dims.dp_rank, d=4)  # (4, 16): this DP rank's documents
        together = teacher.score(docs, None, 2, positions=BRANCHES)  # (4*k,), row d*k + j
        apart = torch.stack([teacher.score(docs[:, :t], docs[:, t], 2) for t in BRANCHES], 1).reshape(-1)
        out.append(float((together - apart).abs().max()))
    return out


@pytest.mark.distributed
def test_teacher_scores_all_branch_points_in_one_forward():
    """S_ema of a document's k contexts from one ZeRO-3 teacher forward over the document equals k
    separate context forwards (DP=2, both backbones)."""
    from helpers.spawn import run_ranks

    for diffs in run_ranks(_teacher_positions_worker, world_size=2):
        assert max(diffs) < 1e-5, diffs
