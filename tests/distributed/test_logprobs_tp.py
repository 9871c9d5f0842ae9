"""Vocab-parallel log-probs (TP=2) equal the full-vocabulary computation, values and gradients."""

import pytest
import torch

from helpers.spawn import run_ranks


def _tp2_logprobs():
    import torch.distributed as dist

    from rlp_dist.rlp.logprobs import token_logprobs

    dist.init_process_group("gloo")
    r = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 8, generator=g) * 3
    t = torch.randint(0, 8, (3, 5), generator=g)
    w = torch.randn(3, 5, generator=g)  # a weighted loss, as the surrogate is
    out = []
    for temp in (1.0, 0.7):
        zl = z[..., r * 4:(r + 1) * 4].clone().requires_grad_()
        lp = token_logprobs(zl, t, temperature=temp, tp_group=dist.group.WORLD)
        (lp * w).sum().backward()
        zf = z.clone().requires_grad_()
        ref = torch.log_softmax(zf / temp, -1).gather(-1, t[..., None]).squeeze(-1)
        (ref * w).sum().backward()
        out.append(((lp - ref).abs().max().item(),
                    (zl.grad - zf.grad[..., r * 4:(r + 1) * 4]).abs().max().item()))
    return out


@pytest.mark.distributed
def test_vocab_parallel_logprobs_match_full_softmax():
    for rank_result in run_ranks(_tp2_logprobs, 2):
        for value_diff, grad_diff in rank_result:
            assert value_diff < 1e-5 and grad_diff < 1e-6, rank_result
