"""RLP reward, advantage and clipped surrogate against hand-computed examples (RLP.md, steps 7-9)."""

import math

import pytest
import torch

from rlp_dist.rlp.losses import clipped_surrogate, group_advantages, ntp_loss, rewards


def test_reward_and_group_advantage_hand_computed():
    s_pred = torch.tensor([[-1.0, -3.0]])  # (B=1, G=2)
    s_ema = torch.tensor([-2.0])
    r = rewards(s_pred, s_ema)
    assert torch.equal(r, torch.tensor([[1.0, -1.0]]))
    # G/(G-1) * (r - mean r) = 2 * ([1, -1] - 0)
    assert torch.allclose(group_advantages(r), torch.tensor([[2.0, -2.0]]))


def test_inclusive_mean_correction_equals_leave_one_out():
    torch.manual_seed(0)
    r = torch.randn(5, 4)  # (B, G=4)
    a = group_advantages(r)
    g = r.shape[1]
    loo = torch.stack([r[:, i] - (r.sum(1) - r[:, i]) / (g - 1) for i in range(g)], dim=1)
    assert torch.allclose(a, loo, atol=1e-6)
    # G/(G-1) with G=4 -> 4/3 times the plain centred reward
    assert torch.allclose(a, (4 / 3) * (r - r.mean(1, keepdim=True)), atol=1e-6)


def test_s_ema_cancels_in_the_advantage():
    torch.manual_seed(1)
    s_pred = torch.randn(3, 8)
    a_with = group_advantages(rewards(s_pred, torch.randn(3) * 5))
    a_without = group_advantages(s_pred)
    assert torch.allclose(a_with, a_without, atol=1e-5)


def test_group_size_one_is_rejected():
    with pytest.raises(ValueError, match="group size 1"):
        group_advantages(torch.zeros(2, 1))


def _example():
    # Two thoughts: thought 0 (A=+2) has 2 tokens, thought 1 (A=-2) has 3 tokens; width 3.
    ratios = torch.tensor([[1.5, 0.9, 1.0], [0.5, 1.1, 1.3]])
    logp_old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logp = (logp_old + ratios.log()).clone()
    logp[0, 2] = 100.0  # padding holds garbage: must not matter
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -2.0])
    return logp, logp_old, adv, mask


def test_clipped_surrogate_hand_computed_both_sides():
    logp, logp_old, adv, mask = _example()
    logp.requires_grad_(True)
    loss, m = clipped_surrogate(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.2)
    # thought 0 (A=+2): token ratios 1.5 -> min(3.0, 1.2*2=2.4)=2.4 (clipped high); 0.9 -> 1.8
    l0 = -(2.4 + 1.8) / 2
    # thought 1 (A=-2): 0.5 -> min(-1.0, 0.8*-2=-1.6)=-1.6 (clipped low); 1.1 -> -2.2; 1.3 -> min(-2.6,-2.4)=-2.6
    l1 = -(-1.6 - 2.2 - 2.6) / 3
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(2 / 5)
    loss.backward()
    # d loss / d logp_u = -A * rho_u / |c| / N on unclipped tokens, 0 on clipped tokens and padding
    expected = torch.tensor([[0.0, -2 * 0.9 / 2 / 2, 0.0], [0.0, 2 * 1.1 / 3 / 2, 2 * 1.3 / 3 / 2]])
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_asymmetric_clip_bounds():
    logp, logp_old, adv, mask = _example()
    # eps_high=0.6 lets ratio 1.5 through unclipped for A>0: 1.5*2 = 3.0
    loss, m = clipped_surrogate(logp, logp_old, adv, mask, eps_low=0.2, eps_high=0.6)
    l0 = -(3.0 + 1.8) / 2
    l1 = -(-1.6 - 2.2 - 2.6) / 3
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert m["clip_frac"].item() == pytest.approx(1 / 5)


def test_length_normalisation_is_per_thought():
    # Same per-token surrogate, different lengths: each thought contributes its token mean.
    logp = torch.zeros(2, 4)
    logp_old = torch.zeros(2, 4)
    mask = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 1]])
    adv = torch.tensor([1.0, 1.0])
    loss, _ = clipped_surrogate(logp, logp_old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.0)  # ratio 1: -(A) per thought, averaged
    # A per-token (not per-thought) normalisation would weight the long thought 4x: check it does not.
    adv = torch.tensor([1.0, -1.0])
    loss, _ = clipped_surrogate(logp, logp_old, adv, mask, 0.2, 0.2)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_on_policy_gradient_is_advantage_weighted_score():
    # At rho = 1 the clipped loss' gradient is -A/|c|/N per token: REINFORCE with the group baseline.
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([0.5, -1.5])
    mask = torch.ones(2, 2)
    loss, m = clipped_surrogate(logp, logp.detach(), adv, mask, 0.2, 0.2)
    loss.backward()
    assert torch.allclose(logp.grad, (-adv[:, None] / 2 / 2).expand(2, 2))
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["clip_frac"].item() == 0.0


def test_ntp_loss_masks():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)], [5.0, math.log(0.5)]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert ntp_loss(logp, mask).item() == pytest.approx(-(math.log(0.5) * 2 + math.log(0.25)) / 3)
