"""Exactness of the rollout engines (rlp_dist.rlp.rollout / decode) against the model's own forward.

Every reference here is the stock megatron-core ``model(ids, pos, None)`` forward without a cache:
greedy decoding by full recompute, G independent prefills, a teacher-forced S_pred forward, the
training forward's log-probs, and the tempered/top-p distribution of the first thought token.
"""

import math

import pytest
import torch

from rlp_dist.data.tokenizer import ThoughtTokens
from rlp_dist.rlp.logprobs import filter_logits, token_logprobs
from rlp_dist.rlp.logprobs import gather_vocab
from rlp_dist.rlp.rollout import (RolloutGroups, RolloutSettings, cached_decoder_class, fork_kv_cache,
                                   preallocate_mamba_states, sample_thoughts)

ENGINES = ["cached", "megatron"]
# (preset, engine): our cached decode programs (decode.CachedDecoder for the Transformer,
# decode_hybrid.HybridDecoder for the hybrid: attention KV, Mamba conv + fp32 SSM state) and the stock
# megatron StaticInferenceContext engine with our cache fork, for both backbones.
CASES = [("tiny_transformer", "cached"), ("tiny_transformer", "megatron"), ("tiny_hybrid", "cached"),
         ("tiny_hybrid", "megatron")]
B, C, G, L = 3, 10, 4, 8


def markers(close_id: int) -> ThoughtTokens:
    return ThoughtTokens(open_id=5, close_id=close_id, prompt_ids=(7,), eos_id=0, pad_id=0)


def forward(model, ids, tp_group=None):
    """Full-vocabulary logits of the stock forward, no cache. (N, S) -> (N, S, V)."""
    with torch.no_grad():
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        return gather_vocab(model(ids, pos, None), tp_group)


def greedy_recompute(model, prefix, mk, steps, tp_group=None):
    """Greedy thoughts by recomputing the whole sequence each step. (B, P) -> (B, steps), pad after close."""
    seq, done, out = prefix, torch.zeros(prefix.shape[0], dtype=torch.bool), []
    for _ in range(steps):
        tok = forward(model, seq, tp_group)[:, -1].argmax(-1)
        tok = torch.where(done, torch.full_like(tok, mk.pad_id), tok)
        done |= tok == mk.close_id
        out.append(tok)
        seq = torch.cat([seq, tok[:, None]], dim=1)
    return torch.stack(out, dim=1)


def data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(8, 2048, (B, C), generator=gen), torch.randint(8, 2048, (B,), generator=gen)


def close_from_greedy(model, ctx, tp_group=None):
    """A closing-marker id the greedy policy emits at step 2 of context 0, so thoughts close early."""
    mk = markers(close_id=-1)
    prefix = torch.cat([ctx, torch.tensor(mk.prefix_ids).expand(ctx.shape[0], -1)], dim=1)
    return int(greedy_recompute(model, prefix, mk, 3, tp_group)[0, 2])


def check_greedy(model, engine, tp_group=None, ref_model=None, pp_group=None, **rollout_kw):
    """Greedy cached rollouts of ``model`` == greedy recompute by ``ref_model`` (default: the same model;
    the PP tests pass this rank's stage as ``model`` and an unpipelined copy with its weights)."""
    ref_model = model if ref_model is None else ref_model
    ctx, nxt = data()
    mk = markers(close_from_greedy(ref_model, ctx, tp_group))
    ro = sample_thoughts(model, ctx, nxt, mk, RolloutSettings(G, L, 1.0, top_k=1, engine=engine),
                         groups=RolloutGroups(tp=tp_group, pp=pp_group), **rollout_kw)
    ref = greedy_recompute(ref_model, ro.prefix, mk, L, tp_group).repeat_interleave(G, dim=0)
    assert torch.equal(ro.thoughts, ref), (engine, ro.thoughts, ref)
    assert bool(ro.closed[0]) and not bool(ro.closed.all()), "the test should cover both stop kinds"
    assert torch.equal(ro.mask.bool(), (torch.arange(L) < ro.lengths[:, None]))
    return ro, mk


@pytest.mark.parametrize("preset,engine", CASES)
def test_greedy_cached_equals_recompute(request, preset, engine):
    check_greedy(request.getfixturevalue(preset), engine)


def documents(seed=2, d=2, length=16):
    """(D, T) documents for rollouts with several contexts per document (``branches``)."""
    return torch.randint(8, 2048, (d, length), generator=torch.Generator().manual_seed(seed))


def check_s_pred_and_behaviour(model, engine, tp_group=None, top_p=0.9, ref_model=None, pp_group=None,
                               **rollout_kw):
    """S_pred == teacher-forced forward; behaviour log-probs == the training forward's (1e-5), both by
    ``ref_model`` (default: the same model). With ``branches=`` in rollout_kw the contexts are
    several per document (prefixes of different lengths)."""
    ref_model = model if ref_model is None else ref_model
    ctx, nxt = (documents(), None) if rollout_kw.get("branches") else data(2)

    def rollout(mk):
        gen = torch.Generator().manual_seed(3)
        return sample_thoughts(model, ctx, nxt, mk, RolloutSettings(G, L, 0.7, top_p=top_p, engine=engine),
                               generator=gen, groups=RolloutGroups(tp=tp_group, pp=pp_group), **rollout_kw)

    # A pilot run picks a closing marker that thought 0 samples at step 1: the same seed then closes
    # it there (the random stream is identical up to the first close), most others run to L.
    mk = markers(int(rollout(markers(close_id=1)).thoughts[0, 1]))
    ro = rollout(mk)
    assert ro.closed.any() and not ro.closed.all()
    logits = forward(ref_model, ro.scored_sequences(mk), tp_group)  # (N, P+L+2, V)
    rows = torch.arange(ro.thoughts.shape[0])
    ref = token_logprobs(logits[rows, ro.close_positions()], ro.next_tokens.repeat_interleave(G))
    torch.testing.assert_close(ro.s_pred, ref, atol=1e-5, rtol=1e-5)
    ids, off = ro.training_inputs()  # (N, S), (N,): right-padded rows when prefix lengths differ
    full = forward(ref_model, ids, tp_group)  # (N, S, V)
    at = off[:, None] + torch.arange(ro.thoughts.shape[1])  # (N, L)
    logp = token_logprobs(full.gather(1, at[..., None].expand(-1, -1, full.shape[-1])), ro.thoughts, 0.7)
    torch.testing.assert_close(ro.behaviour_logp, logp * ro.mask, atol=1e-5, rtol=1e-5)
    return ro


@pytest.mark.parametrize("preset,engine", CASES)
def test_s_pred_and_behaviour_logprobs_equal_forward(request, preset, engine):
    check_s_pred_and_behaviour(request.getfixturevalue(preset), engine)


def forced_logits_cached(model, prefix, tokens, fork: bool):
    """Logits of a forced decode: G branches forked from one prefill (fork) or G prefills."""
    n = tokens.shape[0]
    g = n // prefix.shape[0]
    dec = cached_decoder_class(model)(model, prefix.shape[1] + tokens.shape[1] + 1)
    with torch.no_grad():
        if fork:
            first = dec.prefill(prefix, repeats=g).repeat_interleave(g, dim=0)
        else:
            first = dec.prefill(prefix.repeat_interleave(g, dim=0))
        return torch.stack([first] + [dec.step(tokens[:, u]) for u in range(tokens.shape[1])], 1)


def forced_logits_megatron(model, prefix, tokens, fork: bool):
    from megatron.core.inference.contexts import StaticInferenceContext

    n, steps = tokens.shape
    b, p = prefix.shape
    g = n // b
    ctx = StaticInferenceContext(n, p + steps + 1)
    preallocate_mamba_states(model, ctx, b if fork else n)  # as the engine does (fp32 SSM state)
    src = prefix if fork else prefix.repeat_interleave(g, dim=0)
    model.eval()
    with torch.no_grad():
        out = [model(src, torch.arange(p).expand_as(src), None, inference_context=ctx,
                     runtime_gather_output=True)[:, -1]]
        if fork:
            fork_kv_cache(ctx, b, g, p, model)
            out[0] = out[0].repeat_interleave(g, dim=0)
        ctx.sequence_len_offset = p
        ctx.enable_decode_mode()
        for u in range(steps):
            pos = torch.full((n, 1), ctx.sequence_len_offset)
            out.append(model(tokens[:, u:u + 1], pos, None, inference_context=ctx,
                             runtime_gather_output=True)[:, -1])
            ctx.sequence_len_offset += 1
    return torch.stack(out, 1)


@pytest.mark.parametrize("preset,engine", CASES)
def test_forked_cache_equals_independent_prefills(request, preset, engine):
    model = request.getfixturevalue(preset)
    ctx, _ = data(4)
    prefix = torch.cat([ctx, torch.tensor([7, 5]).expand(B, -1)], dim=1)
    tokens = torch.randint(8, 2048, (B * G, 5), generator=torch.Generator().manual_seed(5))  # distinct
    fn = forced_logits_cached if engine == "cached" else forced_logits_megatron
    forked = fn(model, prefix, tokens, fork=True)  # (N, 6, V)
    independent = fn(model, prefix, tokens, fork=False)
    torch.testing.assert_close(forked, independent, atol=1e-5, rtol=0)
    full = forward(model, torch.cat([prefix.repeat_interleave(G, 0), tokens], 1))
    # vs the uncached forward: logits of magnitude ~10, float32 reassociation -> relative 1e-5
    torch.testing.assert_close(forked, full[:, prefix.shape[1] - 1:], atol=1e-5, rtol=1e-5)


def chi2_quantile(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) by the Wilson-Hilferty approximation (z=3.09: p=0.001)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


@pytest.mark.parametrize("temperature,top_p", [(0.7, 0.8), (1.3, 1.0)])
def test_sampling_frequencies_match_renormalised_distribution(tiny_transformer, temperature, top_p):
    """The first thought token of 4000 rollouts of one context is distributed as
    softmax(z/T) renormalised over the top-p set: a chi-square goodness-of-fit test (fixed seed)."""
    model = tiny_transformer
    ctx, nxt = data(6)
    ctx, nxt = ctx[1:2], nxt[1:2]
    mk = markers(close_id=1)
    n = 4000
    ro = sample_thoughts(model, ctx, nxt, mk, RolloutSettings(n, 1, temperature, top_p=top_p, engine="cached"),
                         generator=torch.Generator().manual_seed(7))
    z = forward(model, ro.prefix)[0, -1] / temperature
    probs = torch.softmax(filter_logits(z[None], 0, top_p)[0], dim=-1).double()
    counts = torch.bincount(ro.thoughts[:, 0], minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token outside the top-p set"
    expected = probs * n
    big = expected >= 5  # pool the rare tokens into one bin
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert len(obs) >= 5, "the distribution is too flat or too peaked for a useful test"
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi2_quantile(len(obs) - 1), (stat, len(obs))
    # behaviour log-probs are those of the full tempered policy
    torch.testing.assert_close(ro.behaviour_logp[:, 0], torch.log_softmax(z, -1)[ro.thoughts[:, 0]],
                               atol=1e-5, rtol=0)


def _tp2_worker():
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_test_models import randomize

    dims = init_distributed(tp=2, pp=1)
    models = {}
    for preset, engine in CASES:
        if preset not in models:
            torch.manual_seed(0)
            models[preset] = randomize(build_model(compose([f"+model={preset}"]).model))
        check_greedy(models[preset], engine, dims.tp_group)
        check_s_pred_and_behaviour(models[preset], engine, dims.tp_group)
        if engine == "cached":  # several contexts per document (test_branches.py at TP=1)
            check_s_pred_and_behaviour(models[preset], engine, dims.tp_group, branches=(5, 9, 12))
    return True


@pytest.mark.distributed
def test_tp2_greedy_s_pred_and_behaviour():
    """At TP=2 (vocab-parallel logits, row-parallel all-reduces) every engine matches the TP=2 forward."""
    from helpers.spawn import run_ranks

    assert run_ranks(_tp2_worker, world_size=2) == [True, True]


def _zero3_worker():
    import torch.distributed as dist
    from rlp_test_models import randomize

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.train import wrap_deepspeed

    dims = init_distributed(tp=1, pp=1)
    for preset, engine in [("tiny_transformer", "cached"), ("tiny_hybrid", "cached"), ("tiny_hybrid", "megatron")]:
        cfg = compose([f"+model={preset}", "rlp=tiny", "parallel.zero_stage=3"], 2)
        torch.manual_seed(0)
        model = randomize(build_model(cfg.model))
        ctx, nxt = data(8 + dims.dp_rank)  # different contexts per rank: they stop at different steps
        mk = markers(close_id=1)
        kw = dict(groups=RolloutGroups(sync=dist.group.WORLD))
        settings = RolloutSettings(G, L, 1.0, top_k=1, engine=engine)
        before = sample_thoughts(model, ctx, nxt, mk, settings, **kw)
        engine_ = wrap_deepspeed(model, cfg, dims)
        assert any(p.ds_tensor.numel() < p.ds_numel for p in engine_.module.parameters())  # sharded
        after = sample_thoughts(engine_.module, ctx, nxt, mk, settings, **kw)
        assert torch.equal(after.thoughts, before.thoughts), preset
        torch.testing.assert_close(after.s_pred, before.s_pred, atol=1e-6, rtol=0)
        assert all(p.data.numel() == 0 for p in engine_.module.parameters())  # partitioned again
    return True


@pytest.mark.distributed
def test_zero3_rollout_matches_unsharded():
    """Under ZeRO-3 (DP=2) both engines decode exactly what the unsharded model decodes (cached: the
    shards gathered once per rollout; megatron/hybrid: gathered per forward, ranks kept in step);
    the parameters are partitioned again afterwards."""
    from helpers.spawn import run_ranks

    assert run_ranks(_zero3_worker, world_size=2) == [True, True]


def test_hybrid_bf16_keeps_fp32_ssm_state(dims):
    """With bf16 weights the Mamba SSM state is allocated (and stays) fp32 through prefill, fork and
    decode; the cached logits track the no-cache bf16 forward."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.rollout import preallocate_mamba_states

    torch.manual_seed(0)
    model = build_model(compose(["+model=tiny_hybrid"]).model, params_dtype=torch.bfloat16).eval()
    ctx, _ = data(4)
    prefix = torch.cat([ctx, torch.tensor([7, 5]).expand(B, -1)], dim=1)
    tokens = torch.randint(8, 2048, (B * G, 4), generator=torch.Generator().manual_seed(5))
    cached = forced_logits_megatron(model, prefix, tokens, fork=True).float()  # (N, 5, V)
    full = forward(model, torch.cat([prefix.repeat_interleave(G, 0), tokens], 1)).float()
    torch.testing.assert_close(cached, full[:, prefix.shape[1] - 1:], atol=0.1, rtol=0.05)
    c = StaticInferenceContext(B * G, 40)
    preallocate_mamba_states(model, c, B)
    with torch.no_grad():
        model(prefix, torch.arange(prefix.shape[1]).expand_as(prefix), None, inference_context=c,
              runtime_gather_output=True)
    fork_kv_cache(c, B, G, prefix.shape[1], model)
    from megatron.core.ssm.mamba_mixer import MambaMixer

    mixers = [m.layer_number for m in model.modules() if isinstance(m, MambaMixer)]
    assert mixers and all(c.key_value_memory_dict[k][1].dtype == torch.float32 for k in mixers)
    assert all(c.key_value_memory_dict[k][1].shape[0] == B * G for k in mixers)


def test_hybrid_cached_decoder_bf16_keeps_fp32_ssm_state(dims):
    """Our hybrid decode program in bf16: SSM states are fp32 after prefill, fork and every step (the
    recurrence is not rounded to bf16 per token), and its logits track the no-cache bf16 forward."""
    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model

    torch.manual_seed(0)
    model = build_model(compose(["+model=tiny_hybrid"]).model, params_dtype=torch.bfloat16).eval()
    ctx, _ = data(4)
    prefix = torch.cat([ctx, torch.tensor([7, 5]).expand(B, -1)], dim=1)
    tokens = torch.randint(8, 2048, (B * G, 4), generator=torch.Generator().manual_seed(5))
    dec = cached_decoder_class(model)(model, prefix.shape[1] + 5)
    with torch.no_grad():
        out = [dec.prefill(prefix, repeats=G).repeat_interleave(G, 0)]
        out += [dec.step(tokens[:, u]) for u in range(tokens.shape[1])]
    states = [s for s in dec.ssm if s is not None]
    assert states and all(s.dtype == torch.float32 and s.shape[0] == B * G for s in states)
    full = forward(model, torch.cat([prefix.repeat_interleave(G, 0), tokens], 1)).float()
    torch.testing.assert_close(torch.stack(out, 1).float(), full[:, prefix.shape[1] - 1:], atol=0.1, rtol=0.05)
