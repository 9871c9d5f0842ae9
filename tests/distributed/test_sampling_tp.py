"""Vocab-parallel sampling (TP=2, TP=4) draws the full-vocabulary sampler's tokens, token for token.

Every rank builds the same full (N, V) logits from a shared seed and keeps its slice; the reference is
``sample`` on the full logits with an identically seeded generator.
"""

import pytest
import torch

from helpers.spawn import run_ranks

N, V = 512, 1024
CASES = [(0, 1.0), (5, 1.0), (5, 0.8), (0, 0.9)]  # (top_k, top_p)


def _full_logits(seed: int, ties: bool) -> torch.Tensor:
    """(N, V): a third of the rows generic, a third with one dominant token, a third near-uniform.
    With ``ties`` the logits are rounded to bf16 after scaling up, as a bf16 output layer gives: many
    exact ties, also at the k-th largest value and across ranks."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g) * 3
    third = N // 3
    dominant = torch.randint(0, V, (third,), generator=g)
    z[third:2 * third, :].scatter_(1, dominant[:, None], 25.0)
    z[2 * third:] = torch.randn(N - 2 * third, V, generator=g) * 1e-3
    if ties:
        z = (z * 4).round().bfloat16().float()  # integer-valued logits up to ~+-40
    return z


def _count(fn):
    from rlp_dist.rlp.ema import count_collectives

    with count_collectives() as c:
        out = fn()
    return out, c.bytes


def _compare(tp: int):
    import torch.distributed as dist

    from rlp_dist.rlp.logprobs import sample, sample_vocab_parallel

    dist.init_process_group("gloo")  # the whole world is the TP group here
    group = dist.group.WORLD
    r, v_local = dist.get_rank(group), V // tp
    report = []
    for ties in (False, True):
        for temperature in (0.7, 1.3):
            for case, (top_k, top_p) in enumerate(CASES):
                seed = 1000 * int(ties) + 100 * case + int(temperature * 10)
                z = _full_logits(seed, ties)
                zl = z[:, r * v_local:(r + 1) * v_local].contiguous()  # (N, V/tp) this rank's slice
                g_ref = torch.Generator().manual_seed(seed)
                g_new = torch.Generator().manual_seed(seed)
                ref_tok, ref_lp = sample(z, temperature, top_k, top_p, g_ref)
                (tok, lp), sent = _count(lambda: sample_vocab_parallel(zl, temperature, top_k, top_p, g_new, group))
                # The streams stay in lockstep: a second draw from each generator agrees too.
                ref_tok2, _ = sample(z, temperature, top_k, top_p, g_ref)
                tok2, _ = sample_vocab_parallel(zl, temperature, top_k, top_p, g_new, group)
                report.append(dict(
                    ties=ties, temperature=temperature, top_k=top_k, top_p=top_p,
                    mismatches=int((tok != ref_tok).sum()), mismatches2=int((tok2 != ref_tok2).sum()),
                    # float32 log-probs of magnitude up to ~16: 1e-6 absolute is one ulp there
                    lp_err=((lp - ref_lp).abs() / (1e-6 * (1 + ref_lp.abs()))).max().item(),
                    same_state=torch.equal(g_ref.get_state(), g_new.get_state()),
                    bytes_sent=sent, distinct_tokens=int(tok.unique().numel()), tokens=tok.tolist()))
    dist.barrier()
    return report


def _check(results, tp):
    v_local = V // tp
    for rank_report in results[1:]:  # every TP rank holds the same tokens
        assert [row["tokens"] for row in rank_report] == [row["tokens"] for row in results[0]]
    for row in results[0]:
        row.pop("tokens")
        assert row["mismatches"] == 0 and row["mismatches2"] == 0, row
        assert row["lp_err"] <= 1.0, row  # |diff| <= 1e-6 * (1 + |logp|)
        assert row["same_state"], row
        assert row["distinct_tokens"] > 20, row  # the rows really are sampled, not all one token
        top_k, top_p, sent = row["top_k"], row["top_p"], row["bytes_sent"]
        if top_k == 0 and top_p == 1.0:  # max (N fp32) + own mass (N fp64) + token and logit (2N fp64)
            assert sent == N * (4 + 8 + 16), row
        elif top_k:  # the candidates (N, 2k + 3) fp64, plus the vocabulary of rows with ties at the k-th
            candidates = N * (2 * top_k + 3) * 8
            n_tied = (sent - candidates) // (v_local * 4)
            assert sent == candidates + n_tied * v_local * 4, row
            if row["ties"]:  # both paths run: the near-uniform third ties everywhere, most rows do not
                assert N // 3 <= n_tied < N // 2, row
            else:
                assert n_tied == 0, row
        else:  # the nucleus without top-k gathers the vocabulary
            assert sent == N * v_local * 4, row


@pytest.mark.distributed
def test_vocab_parallel_sampling_equals_full_vocab_tp2():
    _check(run_ranks(_compare, 2, args=(2,)), 2)


@pytest.mark.distributed
def test_vocab_parallel_sampling_equals_full_vocab_tp4():
    _check(run_ranks(_compare, 4, args=(4,)), 4)
