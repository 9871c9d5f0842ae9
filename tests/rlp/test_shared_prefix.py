"""The policy-gradient forward == the pre-seam reference (replicated rows, full logits, token_logprobs):
thought log-probs, loss and every gradient, for the shared prefix with the memory-bounded and the dense
branch attention, and for the hidden-state seam with the fused log-prob op (shared and replicated)."""

import pytest
import torch

from rlp_dist.rlp.logprobs import token_logprobs
from rlp_dist.rlp.losses import clipped_surrogate
from rlp_dist.rlp.shared_prefix import packed_inputs

B, P, G, L = 2, 9, 3, 6


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(8, 2048, (B, P), generator=gen)
    thoughts = torch.randint(8, 2048, (B * G, L), generator=gen)
    lengths = torch.randint(1, L + 1, (B * G,), generator=gen)
    mask = (torch.arange(L) < lengths[:, None]).float()  # (N, L)
    adv = torch.randn(B * G, generator=gen)
    old = -5.0 + 0.3 * torch.randn(B * G, L, generator=gen)  # ratios away from 1: clipping is active
    return prefix, thoughts, mask, adv, old


def rollout():
    from rlp_dist.rlp.rollout import RolloutBatch

    prefix, thoughts, mask, adv, old = batch()
    ro = RolloutBatch(prefix=prefix, next_tokens=prefix[:, -1], thoughts=thoughts, mask=mask, behaviour_logp=old * mask,
                      closed=torch.zeros(B * G, dtype=torch.bool), s_pred=torch.zeros(B * G), group_size=G)
    return ro, adv


def loss_and_grads(model, logp_fn):
    ro, adv = rollout()
    model.zero_grad(set_to_none=True)
    logp = logp_fn(ro)  # (N, L) fp32
    loss, _ = clipped_surrogate(logp, ro.behaviour_logp, adv, ro.mask, 0.2, 0.2)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return (logp * ro.mask).detach(), loss.detach(), grads


def variants(model, tp_group):
    """The pre-seam reference (replicated forward, full logits, token_logprobs) and the paths to check."""
    from rlp_dist.rlp.shared_prefix import policy_logits, policy_logprobs

    def via_logits(shared, attention):
        return lambda ro: token_logprobs(policy_logits(ro, model, shared=shared, attention=attention), ro.thoughts,
                                         0.7, tp_group)

    return via_logits(False, "sdpa"), {
        "shared dense attention, logits": via_logits(True, "dense"),
        "shared sdpa attention, logits": via_logits(True, "sdpa"),
        "shared sdpa, hidden + fused log-probs": lambda ro: policy_logprobs(ro, model, shared=True, temperature=0.7,
                                                                         tp_group=tp_group),
        "replicated, hidden + fused log-probs": lambda ro: policy_logprobs(ro, model, shared=False, temperature=0.7,
                                                                        tp_group=tp_group),
    }


def check(model, tp_group=None):
    model.train()
    ref_fn, others = variants(model, tp_group)
    ref_logp, ref_loss, ref_grads = loss_and_grads(model, ref_fn)
    assert float(ref_loss.abs()) > 1e-3
    for name, fn in others.items():
        logp, loss, grads = loss_and_grads(model, fn)
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5, msg=name)
        assert grads.keys() == ref_grads.keys(), name
        for k, g in ref_grads.items():
            assert g.abs().max() > 0, k
            torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=f"{name}: {k}")


def test_packed_layout():
    prefix, thoughts, *_ = batch()
    ids, layout = packed_inputs(prefix, thoughts, G)
    s = P + G * (L - 1)
    pos = layout.positions
    assert ids.shape == (B, s) and pos.shape == (s,) and layout.seq_len == s
    assert torch.equal(ids[1, P + (L - 1):P + 2 * (L - 1)], thoughts[G + 1, :-1])  # context 1, thought 1
    assert torch.equal(pos[P + (L - 1):P + 2 * (L - 1)], torch.arange(P, P + L - 1))


def test_shared_prefix_equals_replicated(tiny_transformer):
    check(tiny_transformer)


def _tp2_worker():
    from rlp_test_models import randomize

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model

    dims = init_distributed(tp=2, pp=1)
    for preset in ("tiny_transformer", "tiny_hybrid"):
        torch.manual_seed(0)
        check(randomize(build_model(compose([f"+model={preset}"]).model)), dims.tp_group)
    return True


@pytest.mark.distributed
def test_shared_prefix_equals_replicated_tp2():
    from helpers.spawn import run_ranks

    assert run_ranks(_tp2_worker, world_size=2) == [True, True]


def test_shared_prefix_equals_replicated_hybrid(tiny_hybrid):
    """The hybrid: attention layers branch as the Transformer's do; every Mamba mixer scans the prefix
    once and seeds each thought with its final conv and SSM states (gradients into the prefix)."""
    check(tiny_hybrid)


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_policy_logits_replicated_equals_shared(request, preset):
    """policy_logits on a RolloutBatch: the replicated forward (prefixes of one length: a view of the
    logits from P-1 on) equals the shared-prefix one."""
    from rlp_dist.rlp.rollout import RolloutBatch
    from rlp_dist.rlp.shared_prefix import policy_logits

    model = request.getfixturevalue(preset)
    prefix, thoughts, mask, _, old = batch()
    ro = RolloutBatch(prefix=prefix, next_tokens=prefix[:, -1], thoughts=thoughts, mask=mask, behaviour_logp=old,
                      closed=torch.zeros(B * G, dtype=torch.bool), s_pred=torch.zeros(B * G), group_size=G)
    with torch.no_grad():
        torch.testing.assert_close(policy_logits(ro, model, shared=False), policy_logits(ro, model, shared=True),
                                   atol=1e-5, rtol=1e-5)


def _grads_of(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    return loss.detach(), {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(request, preset, recompute):
    """model.recompute (megatron's options; the hybrid's layers checkpoint themselves) changes memory,
    not numbers: the shared-prefix policy-gradient loss and every gradient equal recompute=none."""
    from rlp_test_models import randomize

    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.shared_prefix import policy_logprobs

    ref_model = request.getfixturevalue(preset)
    torch.manual_seed(0)
    model = randomize(build_model(compose([f"+model={preset}", f"model.recompute={recompute}"]).model))
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    ro, adv = rollout()

    def loss_fn(m):
        def fn():
            m.train()
            logp = policy_logprobs(ro, m, shared=True, temperature=0.7)
            return clipped_surrogate(logp, ro.behaviour_logp, adv, ro.mask, 0.2, 0.2)[0]
        return fn

    from rlp_dist.models.attention import LayoutAttention

    # the recomputed module runs twice per step (forward, then again in backward): count its calls
    watched = (LayoutAttention if recompute == "selective" else torch.nn.RMSNorm)
    calls = {"ref": 0, "got": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [m.register_forward_hook(counter(key)) for key, net in (("ref", ref_model), ("got", model))
               for m in net.modules() if isinstance(m, watched)]
    ref_loss, ref = _grads_of(ref_model, loss_fn(ref_model))
    loss, got = _grads_of(model, loss_fn(model))
    for h in handles:
        h.remove()
    assert calls["ref"] > 0 and calls["got"] > calls["ref"], calls  # it really recomputed
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("preset", ["tiny_transformer", "tiny_hybrid"])
def test_thoughts_split_over_micro_batches_equal_the_unsplit_step(request, preset):
    """rlp.thoughts_per_micro_batch: a context's G thoughts over G/g backward passes (the loss of each
    averaged, as DeepSpeed's gradient accumulation does) give the unsplit gradient."""
    from rlp_dist.rlp.shared_prefix import policy_logprobs
    from rlp_dist.train import ScoredBatch, split_thoughts

    model = request.getfixturevalue(preset)
    model.train()
    ro, adv = rollout()
    sb = ScoredBatch(ro, ro.s_pred.view(B, G), None, None, adv)

    def surrogate(part):
        r = part.rollout
        logp = policy_logprobs(r, model, shared=True, temperature=0.7)
        return clipped_surrogate(logp, r.behaviour_logp, part.advantages, r.mask, 0.2, 0.2)[0]

    ref_loss, ref = _grads_of(model, lambda: surrogate(sb))
    parts = split_thoughts(sb, 1)  # G = 3 splits of one thought each
    assert len(parts) == G and all(p.rollout.thoughts.shape == (B, L) for p in parts)
    loss, got = _grads_of(model, lambda: sum(surrogate(p) for p in parts) / len(parts))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4, msg=k)
