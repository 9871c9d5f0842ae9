"""The training step at pipeline parallelism against PP=1, on the same weights and data (gloo, CPU).

Two ranks first run PP=1 x DP=2 (the default ZeRO-3 student), then re-initialise the parallel state
and run PP=2 x DP=1 (ZeRO-1 student, the only kind that trains under PP); three ranks do the same
with PP=3 (a middle stage that holds neither the embedding nor the output layer). Weights are drawn per
*global* parameter name (layer numbers offset per stage; the last stage's tied output weight is drawn
as the embedding), so both layouts start from the same model. For each case:

- RLP (tiny_transformer with tied embeddings, packed shared-prefix forward; tiny_hybrid with the
  replicated forward): fixed rollouts (random thoughts, behaviour log-probs = the model's own tempered
  log-probs plus noise, so the ratio is clipped for some tokens and not for others), S_ema from the
  real ZeRO-3 EMA teacher, then two update steps (``train.update``) — the loss per micro-batch, the
  logged grad norm and every parameter after each optimizer step must agree to ~1e-6; the PP=1 loss
  also equals the plain single-forward formula (``shared_prefix.policy_logits``).
- NTP: ``train.ntp_step`` itself on a real ContextSampler (loss, grad norm, parameters).
- S_ema from the ZeRO-3 teacher scored through the pipeline schedule equals the PP=1 teacher's, on
  every stage, before and after an EMA update.
- The tied embedding copies (first stage's embedding, last stage's output weight) are equal at
  build time (megatron's embedding-group all-reduce, on CPU through megatron_compat) and after steps.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed

B, MB, G, L, C = 4, 2, 4, 6, 12  # contexts per step (global), per micro-batch, thoughts, thought cap, context
STEPS = 2


def _cfg(preset: str, objective: str, pp: int, zero: int, world: int, extra=()):
    from rlp_dist.config import compose

    return compose([f"+model={preset}", f"objective={objective}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}",
                    # lr large enough that every parameter moves; Adam's eps well above the fp32 noise of
                    # the gradients (an update g/(|g|+eps) amplifies differences by 1/eps near g=0)
                    "optim.lr=1e-2", "optim.eps=1e-4", "optim.grad_clip=0.5", "rlp.ema_decay=0.5",
                    f"rlp.contexts_per_step={B}", f"rlp.contexts_per_micro_batch={MB}", f"rlp.group_size={G}",
                    f"rlp.thought_max_tokens={L}", f"rlp.context_len={C}", "ntp.seq_len=10",
                    f"ntp.sequences_per_step={B}", f"ntp.sequences_per_micro_batch={MB}", *extra], world)


def _set_weights(model: torch.nn.Module) -> None:
    """Deterministic weights keyed by global parameter name (TP=1: local shapes are full shapes)."""
    from rlp_dist.rlp.ema import _global_names

    names = _global_names(model)
    tied = getattr(model, "share_embeddings_and_output_weights", False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            g = names[name]
            if tied and g == "output_layer.weight":
                g = "embedding.word_embeddings.weight"
            noise = torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(g.encode())))
            p.copy_(0.1 * noise if p.dim() > 1 else 1.0 + 0.2 * noise)


def _trainer(cfg, dims, with_teacher: bool):
    from rlp_dist.rlp.ema import EmaTeacher
    from rlp_dist.train import Trainer, build_student, wrap_deepspeed

    vocab = cfg.model.vocab_size
    student = build_student(cfg, vocab)
    tied = {}
    if dims.pp > 1 and student.share_embeddings_and_output_weights:  # megatron's initial copy
        tied["built"] = _tied_copy(student, dims)
    _set_weights(student)
    engine = wrap_deepspeed(student, cfg, dims)
    teacher = None
    if with_teacher:
        teacher = EmaTeacher(build_student(cfg, vocab, load_weights=False), cfg.rlp.ema_decay, 1, dims, "fp32")
        teacher.initialize(engine.module)
    return Trainer(cfg, dims, engine, teacher, None, None, None, None, None), tied


def _tied_copy(model, dims):
    """(max |difference|, scale) of the tied weight as the first and the last stage hold it (every stage
    receives both; a middle stage holds none and sends zeros)."""
    import torch.distributed as dist

    w = model.shared_embedding_or_output_weight()
    w = w.detach().clone() if w is not None else torch.zeros(model.vocab_size, model.config.hidden_size)
    both = [torch.empty_like(w) for _ in range(dims.pp)]
    dist.all_gather(both, w, group=dims.pp_group)
    return float((both[0] - both[-1]).abs().max()), float(both[0].abs().max())


def _full_params(engine, dims) -> dict[str, torch.Tensor]:
    """Full fp32 parameters by global name (collective over DP; test-only)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from rlp_dist.rlp.ema import _global_names

    names = _global_names(engine.module)
    return {names[n]: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}


def _rollouts(engine, cfg, dims):
    """Fixed RolloutBatches for the whole global batch (identical on every rank), one per micro-batch.
    Behaviour log-probs: the model's own (plain PP=1 formula) plus noise, so some ratios leave the
    clip range. Computed on the PP=1 model and reused at PP=2."""
    from rlp_dist.rlp.logprobs import token_logprobs
    from rlp_dist.rlp.rollout import RolloutBatch
    from rlp_dist.rlp.shared_prefix import policy_logits

    v, r, B = cfg.model.vocab_size, cfg.rlp, cfg.rlp.contexts_per_step
    gen = torch.Generator().manual_seed(5)
    contexts = torch.randint(8, v, (B, C), generator=gen)
    next_tokens = torch.randint(8, v, (B,), generator=gen)
    prefix = torch.cat([contexts, torch.full((B, 1), 3)], dim=1)  # (B, P): context + open marker
    thoughts = torch.randint(8, v, (B * G, L), generator=gen)
    lengths = torch.randint(1, L + 1, (B * G,), generator=gen)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()  # (N, L)
    thoughts = torch.where(mask.bool(), thoughts, torch.zeros_like(thoughts))
    closed = torch.rand(B * G, generator=gen) < 0.5
    s_pred = -6.0 + torch.randn(B * G, generator=gen)
    noise = 0.3 * torch.randn(B * G, L, generator=gen)
    out = []
    for i in range(0, B, MB):
        rows = slice(i * G, (i + MB) * G)
        ro = RolloutBatch(prefix=prefix[i:i + MB], next_tokens=next_tokens[i:i + MB], thoughts=thoughts[rows],
                          mask=mask[rows], behaviour_logp=torch.zeros(MB * G, L), closed=closed[rows],
                          s_pred=s_pred[rows], group_size=G)
        with torch.no_grad():
            logp = token_logprobs(policy_logits(ro, engine.module, engine, r.shared_prefix), ro.thoughts,
                                  r.temperature, dims.tp_group)
        ro.behaviour_logp = (logp + noise[rows]) * ro.mask
        out.append(ro)
    return contexts, next_tokens, out


def _plain_losses(engine, cfg, dims, scored) -> list[float]:
    """The PP=1 loss by the plain formula: one policy_logits forward, token_logprobs, clipped_surrogate."""
    from rlp_dist.rlp.logprobs import token_logprobs
    from rlp_dist.rlp.losses import clipped_surrogate
    from rlp_dist.rlp.shared_prefix import policy_logits

    r, out = cfg.rlp, []
    with torch.no_grad():
        for sb in scored:
            ro = sb.rollout
            logp = token_logprobs(policy_logits(ro, engine.module, engine, r.shared_prefix), ro.thoughts,
                                  r.temperature, dims.tp_group)
            out.append(float(clipped_surrogate(logp, ro.behaviour_logp, sb.advantages, ro.mask, r.clip_eps_low,
                                               r.clip_eps_high)[0]))
    return out


def _rlp_case(preset: str, pp: int, zero: int, fixed=None, extra=()):
    """One layout: S_ema, STEPS update steps on fixed rollouts, EMA updates. fixed: the PP=1 rollouts."""
    import torch.distributed as dist

    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.rlp.losses import group_advantages, rewards
    from rlp_dist.train import PolicyGradient, ScoredBatch, update

    dims = init_distributed(1, pp, "gloo", seed=1234)
    cfg = _cfg(preset, "rlp", pp, zero, dims.world_size, extra)
    B = cfg.rlp.contexts_per_step
    tr, tied = _trainer(cfg, dims, with_teacher=True)
    engine, teacher = tr.engine, tr.teacher
    contexts, next_tokens, rollouts = fixed if fixed is not None else _rollouts(engine, cfg, dims)
    # This rank's micro-batches: DP rank d holds contexts [d*B/dp, (d+1)*B/dp).
    per = B // dims.dp
    mine = list(range(dims.dp_rank * per // MB, (dims.dp_rank + 1) * per // MB))
    ctx, nxt = contexts[dims.dp_rank * per:(dims.dp_rank + 1) * per], next_tokens[dims.dp_rank * per:(dims.dp_rank + 1) * per]
    res = {"dp_rank": dims.dp_rank, "pp_rank": dims.pp_rank, "mine": mine, "steps": [], "tied": tied}

    def s_ema_full():
        s = teacher.score(ctx, nxt, MB)  # (per,) on every stage
        full = [torch.empty_like(s) for _ in range(dims.dp)]
        dist.all_gather(full, s, group=dims.dp_group)
        return torch.cat(full)  # (B,)

    pg = PolicyGradient(cfg.rlp, dims.tp_group, engine.module)
    for step in range(1, STEPS + 1):
        s_ema = s_ema_full()
        scored = []
        for j in mine:  # steps 7-8 as rlp_step does them
            s_pred, s_ema_b = rollouts[j].s_pred.view(MB, G), s_ema[j * MB:(j + 1) * MB]
            reward = rewards(s_pred, s_ema_b)
            scored.append(ScoredBatch(rollouts[j], s_pred, s_ema_b, reward, group_advantages(reward).reshape(-1)))
        plain = _plain_losses(engine, cfg, dims, scored) if pp == 1 else None
        outs = update(tr, scored, pg.forward, pg.loss, pg.shape)
        teacher.update(engine.module, step)
        res["steps"].append({
            "s_ema": s_ema, "plain": plain, "grad_norm": float(engine.get_global_grad_norm()),
            "loss": [float(o["loss"]) if o is not None else None for o in outs],
            "clip_frac": [float(o["clip_frac"]) if o is not None else None for o in outs],
            "params": _full_params(engine, dims),
            "tied": _tied_copy(engine.module, dims) if tied else None,
        })
    res["s_ema_after"] = s_ema_full()
    return res, (contexts, next_tokens, rollouts)


def _ntp_case(preset: str, pp: int, zero: int, extra=()):
    import numpy as np

    from rlp_dist.data.stream import ContextSampler
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.train import ntp_step

    dims = init_distributed(1, pp, "gloo", seed=1234)
    cfg = _cfg(preset, "ntp", pp, zero, dims.world_size, extra)
    tr, tied = _trainer(cfg, dims, with_teacher=False)
    stream = np.random.default_rng(3).integers(8, cfg.model.vocab_size, size=500)
    tr.sampler = ContextSampler(stream, cfg.train.seed, dims.dp_rank, dims.dp)
    steps = []
    for s in range(1, STEPS + 1):
        tr.step = s
        m = ntp_step(tr)
        steps.append({"loss": m["ntp/loss"], "grad_norm": m["optim/grad_norm"],
                      "params": _full_params(tr.engine, dims), "tied": _tied_copy(tr.engine.module, dims) if tied else None})
    return {"pp_rank": dims.pp_rank, "steps": steps, "tied": tied}


def _worker(cases, pp: int = 2):
    # Every PP=1 run first: ZeRO-3 numbers parameters with a per-process counter, and its (WORLD)
    # trace check at PP=1 needs the same numbers on every rank, which the PP stages (different
    # parameters) would have put out of step.
    out = {name: {} for name in cases}
    fixed = {}
    for layout, zero in ((1, 3), (pp, 1)):
        key = "pp1" if layout == 1 else "pipe"  # the pipelined layout, compared with PP=1
        for name, (kind, preset, extra) in cases.items():
            if kind == "rlp":
                out[name][key], fixed[name] = _rlp_case(preset, layout, zero, fixed.get(name), extra)
            else:
                out[name][key] = _ntp_case(preset, layout, zero, extra)
    return _numpy(out)


def _numpy(x):
    """Tensors -> numpy arrays: a tensor in the result queue is shared through the child's fd server,
    which may be gone by the time the parent unpickles it."""
    if isinstance(x, torch.Tensor):
        return x.numpy()
    if isinstance(x, dict):
        return {k: _numpy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_numpy(v) for v in x)
    return x


CASES = {"rlp_transformer": ("rlp", "tiny_transformer", ()), "ntp_transformer": ("ntp", "tiny_transformer", ()),
         "rlp_hybrid": ("rlp", "tiny_hybrid", ())}
# PP=3 (a middle stage with neither embedding nor output layer) against PP=1 x DP=3, on 3 ranks.
CASES_PP3 = {"rlp_transformer_pp3": ("rlp", "tiny_transformer", ("model.num_layers=4", "rlp.contexts_per_step=6"))}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_worker, 2, (CASES,))


@pytest.fixture(scope="module")
def results_pp3():
    return run_ranks(_worker, 3, (CASES_PP3, 3))


def _merged_params(ranks: list, step: int) -> dict[str, torch.Tensor]:
    """Parameters after ``step`` by global name, merged over the stages (rank results)."""
    out = {}
    for r in ranks:
        out.update(r["steps"][step]["params"])
    return out


def _assert_params_equal(ref: dict, got: dict, tied: bool, what: str) -> None:
    ref = {k: torch.from_numpy(v) for k, v in ref.items()}
    got = {k: torch.from_numpy(v) for k, v in got.items()}
    if tied:  # the last stage's copy of the embedding; compared with the first stage's below
        got = {k: v for k, v in got.items() if k != "output_layer.weight"}
    assert set(got) == set(ref), set(got) ^ set(ref)
    worst = max(((got[k] - ref[k]).abs().max().item(), k) for k in ref)
    print(f"{what}: max |param diff| {worst[0]:.2e} ({worst[1]})")
    assert worst[0] < 2e-6, f"{what}: {worst[1]} differs by {worst[0]:.3g}"


def _results(request, case: str) -> list:
    return request.getfixturevalue("results_pp3" if case.endswith("_pp3") else "results")


@pytest.mark.parametrize("case", ["rlp_transformer", "rlp_hybrid", "rlp_transformer_pp3"])
def test_rlp_update_pipelined_equals_pp1(request, case):
    results = _results(request, case)
    pp1 = [r[case]["pp1"] for r in results]
    pipe = [r[case]["pipe"] for r in results]
    last = max(pipe, key=lambda r: r["pp_rank"])
    tied = case.startswith("rlp_transformer")
    moved = False
    for step in range(STEPS):
        ref_loss = {j: r["steps"][step]["loss"][k] for r in pp1 for k, j in enumerate(r["mine"])}
        plain = {j: r["steps"][step]["plain"][k] for r in pp1 for k, j in enumerate(r["mine"])}
        got_loss = dict(zip(last["mine"], last["steps"][step]["loss"]))
        print(f"{case} step {step + 1}: loss pp1 {ref_loss} pipelined {got_loss}; clip_frac "
              f"{last['steps'][step]['clip_frac']}; grad norm pp1 {pp1[0]['steps'][step]['grad_norm']:.6f} "
              f"pipelined {[r['steps'][step]['grad_norm'] for r in pipe]}")
        # Step 1 runs on identical weights; step 2 on weights that already differ by fp32 reduction order
        # (< 1e-6), which a loss of O(1) with steep ratios turns into a few 1e-6.
        tol = 1e-6 if step == 0 else 1e-5
        for j in ref_loss:
            assert abs(ref_loss[j] - plain[j]) < 1e-6, (j, ref_loss[j], plain[j])  # the split forward is the plain one
            assert abs(got_loss[j] - ref_loss[j]) < tol, (j, got_loss[j], ref_loss[j])
        clip = last["steps"][step]["clip_frac"]
        assert any(0 < c < 1 for c in clip), clip  # some ratios are clipped, others are not: the test can fail
        # The clipping norm is global: summed over the stages (mpu's TP x PP group), the tied weight once.
        for r in pipe:
            assert r["steps"][step]["grad_norm"] == pytest.approx(pp1[0]["steps"][step]["grad_norm"], rel=1e-5)
        ref = pp1[0]["steps"][step]["params"]
        _assert_params_equal(ref, _merged_params(pipe, step), tied, f"{case} step {step + 1}")
        init_moved = max(float(abs(ref[k] - pp1[0]["steps"][0]["params"][k]).max()) for k in ref)
        moved = moved or init_moved > 1e-4
        if tied:  # the two copies of the tied weight stay one parameter
            for r in pipe:
                assert r["steps"][step]["tied"][0] == 0.0, r["steps"][step]["tied"]
    assert moved  # the second step moved the parameters: the comparison of steps is not vacuous
    assert pp1[0]["steps"][0]["grad_norm"] > 0.5  # above optim.grad_clip at step 1: clipping is active


@pytest.mark.parametrize("case", ["rlp_transformer", "rlp_hybrid", "rlp_transformer_pp3"])
def test_s_ema_zero3_teacher_pipelined_equals_pp1(request, case):
    results = _results(request, case)
    pp1 = [r[case]["pp1"] for r in results]
    pipe = [r[case]["pipe"] for r in results]
    for step in range(STEPS):
        ref = pp1[0]["steps"][step]["s_ema"]
        for r in pipe:  # every stage holds S_ema
            err = float(abs(r["steps"][step]["s_ema"] - ref).max())
            print(f"{case} step {step + 1} stage {r['pp_rank']}: |S_ema pipelined - pp1| {err:.2e}")
            assert err < 1e-5
    ref, before = pp1[0]["s_ema_after"], pp1[0]["steps"][0]["s_ema"]
    assert abs(ref - before).max() > 1e-3  # the EMA updates moved the teacher
    for r in pipe:
        assert abs(r["s_ema_after"] - ref).max() < 1e-5


def test_tied_copies_equal_at_build_pp2(results):
    for r in results:
        diff, scale = r["rlp_transformer"]["pipe"]["tied"]["built"]
        assert diff == 0.0 and scale > 0, (diff, scale)


def test_ntp_step_pp2_equals_pp1(results):
    pp1 = [r["ntp_transformer"]["pp1"] for r in results]
    pp2 = [r["ntp_transformer"]["pipe"] for r in results]
    for step in range(STEPS):
        ref = pp1[0]["steps"][step]
        print(f"ntp step {step + 1}: loss pp1 {ref['loss']:.7f} pp2 {[r['steps'][step]['loss'] for r in pp2]}; "
              f"grad norm pp1 {ref['grad_norm']:.6f} pp2 {[r['steps'][step]['grad_norm'] for r in pp2]}")
        for r in pp2:  # every stage reports the last stage's loss
            assert r["steps"][step]["loss"] == pytest.approx(ref["loss"], abs=1e-6)
            assert r["steps"][step]["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
            assert r["steps"][step]["tied"][0] == 0.0
        _assert_params_equal(ref["params"], _merged_params(pp2, step), True, f"ntp step {step + 1}")


def _trace_check_worker():
    import torch.distributed as dist

    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    from rlp_dist.distributed.deepspeed_compat import trace_checks_over
    from rlp_dist.distributed.parallel import init_distributed

    dims = init_distributed(1, 2, "gloo")  # PP=2 x DP=1: each rank's DP group is itself
    original = coordinator.assert_ints_same_as_other_ranks
    out = {}
    with trace_checks_over(dims.dp_group, dims.device):
        coordinator.assert_ints_same_as_other_ranks([dims.rank] * (1 + dims.rank))  # differs per stage: fine
        out["patched"] = coordinator.assert_ints_same_as_other_ranks is not original
    out["restored"] = coordinator.assert_ints_same_as_other_ranks is original
    with trace_checks_over(dist.group.WORLD, dims.device):  # over two ranks: the check still checks
        coordinator.assert_ints_same_as_other_ranks([5, 6])
        try:
            coordinator.assert_ints_same_as_other_ranks([5, 6 + dims.rank])
            out["raised"] = False
        except RuntimeError as e:
            out["raised"] = "recorded [5, 7]" in str(e)
    return out


def test_zero3_trace_check_runs_over_the_given_group():
    """deepspeed_compat.trace_checks_over: the check compares over the given group only, still raises on
    a disagreement inside it, and the DeepSpeed function is restored after the block."""
    res = run_ranks(_trace_check_worker, 2)
    assert all(r["patched"] and r["restored"] for r in res), res
    assert res[0]["raised"] is False and res[1]["raised"] is True, res


def _init_from_worker():
    import dataclasses

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.ema import global_param_names
    from rlp_dist.train import load_resized

    mcfg = compose(["+model=tiny_transformer", "model.num_layers=4"]).model
    init_distributed(1, 1, "gloo")
    full = build_model(mcfg)
    _set_weights(full)
    sd = {k: v.clone() for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    dims = init_distributed(1, 2, "gloo")
    stage = build_model(dataclasses.replace(mcfg, vocab_size=mcfg.vocab_size + 2))  # 2 thought tokens added
    load_resized(stage, sd)
    names = global_param_names(stage)
    return {"pp_rank": dims.pp_rank, "sd": _numpy(sd),
            "got": {names[n]: p.detach().numpy().copy() for n, p in stage.named_parameters()}}


def test_init_from_loads_full_weights_into_pp_stages():
    """model.init_from at PP=2: each stage gets the full model's layers by global index (stage 1's
    local layer 0 is global layer 2), the last stage's tied output copy the embedding, both grown by
    the same mean rows for added thought tokens."""
    import numpy as np

    res = run_ranks(_init_from_worker, 2)
    sd = res[0]["sd"]
    emb = torch.from_numpy(sd["embedding.word_embeddings.weight"])
    grown = torch.cat([emb, emb.mean(0, keepdim=True).expand(2, -1)]).numpy()
    assert set(res[1]["got"]) >= {"decoder.layers.2.mlp.linear_fc1.weight", "output_layer.weight"}
    for r in res:
        for g, v in r["got"].items():
            want = grown if g in ("embedding.word_embeddings.weight", "output_layer.weight") else sd[g]
            np.testing.assert_array_equal(v, want, err_msg=g)
    np.testing.assert_array_equal(res[0]["got"]["embedding.word_embeddings.weight"], res[1]["got"]["output_layer.weight"])
