"""The sharded EMA teacher against the fp32 recursion over the student's history (gloo ranks, CPU).

Each rank trains a tiny student with a next-token loss for a few AdamW steps (lr large enough that
every parameter moves), updates the ZeRO-3 teacher after each step, and records the student's full
fp32 parameters (gathered, test-only). The teacher, gathered at the end, must equal

    phi_0 = theta_0;  phi_s = tau phi_{s-1} + (1 - tau) theta_s        (computed here in fp64)

to 1e-6, and the updates must issue zero collectives.
"""

from __future__ import annotations

import pytest
import torch

from helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _setup(tp: int, zero: int, dtype: str, world: int, lr: float = 1e-3):
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.train import build_student, wrap_deepspeed

    dims = init_distributed(tp, 1, "gloo", seed=1234)
    cfg = compose(["+model=tiny_transformer", "rlp=tiny", "objective=ntp", f"parallel.tp={tp}",
                   f"parallel.zero_stage={zero}", f"train.dtype={dtype}", "train.steps=10", f"optim.lr={lr}",
                   "ntp.seq_len=16", f"ntp.sequences_per_step={2 * dims.dp}", "ntp.sequences_per_micro_batch=2"],
                  world)
    torch.manual_seed(cfg.train.seed)
    vocab = cfg.model.vocab_size
    engine = wrap_deepspeed(build_student(cfg, vocab), cfg, dims)
    return cfg, dims, engine, vocab


def _train_step(engine, dims, vocab: int, step: int) -> None:
    from rlp_dist.rlp.logprobs import token_logprobs

    g = torch.Generator().manual_seed(1000 * step + dims.dp_rank)
    w = torch.randint(0, vocab, (2, 17), generator=g)  # (mb, S+1)
    ids, tgt = w[:, :-1], w[:, 1:]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    logp = token_logprobs(engine(ids, pos, None), tgt, 1.0, dims.tp_group if dims.tp > 1 else None)
    engine.backward(-logp.mean())
    engine.step()


def _full_student(engine) -> dict[str, torch.Tensor]:
    """Full fp32 student parameters (collective; test-only)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().double().clone() for n, p in engine.module.named_parameters()}


def _full_teacher(teacher) -> dict[str, torch.Tensor]:
    """Full teacher compute parameters and fp32 masters, gathered over DP (collective; test-only)."""
    import torch.distributed as dist

    out = {}
    for name, m, (k, start, n) in zip(teacher.names, teacher.masters, teacher.ranges):
        buf = torch.zeros(k * teacher.dims.dp, dtype=torch.float32)
        buf[teacher.dims.dp_rank * k: teacher.dims.dp_rank * k + n] = m
        dist.all_reduce(buf, group=teacher.dims.dp_group)
        out[name] = buf
    return out


def _recursion_case(tp: int, zero: int, dtype: str, world: int, steps: int, tau: float):
    from rlp_dist.rlp.ema import EmaTeacher, count_collectives
    from rlp_dist.train import build_student

    cfg, dims, engine, vocab = _setup(tp, zero, dtype, world)
    teacher = EmaTeacher(build_student(cfg, vocab, load_weights=False), tau, 1, dims, dtype)
    teacher.initialize(engine.module)
    ref = _full_student(engine)  # phi_0 = theta_0
    init = {n: v.clone() for n, v in ref.items()}
    naive = {n: v.to(torch.bfloat16) for n, v in ref.items()}  # a bf16 EMA without masters
    calls = []
    for s in range(1, steps + 1):
        _train_step(engine, dims, vocab, s)
        with count_collectives() as c:
            assert teacher.update(engine.module, s)
        calls.append((c.calls, c.bytes, teacher.last_update_collectives))
        theta = _full_student(engine)
        ref = {n: tau * ref[n] + (1 - tau) * theta[n] for n in ref}
        naive = {n: naive[n] * tau + theta[n].to(torch.bfloat16) * (1 - tau) for n in ref}
    got = _full_teacher(teacher)
    # Of the elements the recursion moves, the share the teacher moved (masters and compute shards)
    # and the share a bf16-only EMA would have moved.
    should = {n: (ref[n] != init[n]).reshape(-1) for n in ref}
    total = sum(int(m.sum()) for m in should.values())
    moved_master = sum(int(((got[n][: init[n].numel()].double() != init[n].reshape(-1)) & should[n]).sum())
                       for n in ref) / total
    moved_naive = sum(int(((naive[n].double() != init[n].to(torch.bfloat16).double()).reshape(-1) & should[n]).sum())
                      for n in ref) / total
    err = max(float((got[n][: ref[n].numel()].double() - ref[n].reshape(-1)).abs().max()) for n in ref)
    err_rel = max(float((got[n][: ref[n].numel()].double() - ref[n].reshape(-1)).abs().max() / ref[n].abs().max())
                  for n in ref)
    moved = max(float((ref[n] - theta[n]).abs().max()) for n in ref)  # the teacher lags the student
    # The bf16 compute shards are the rounded masters.
    shard_err = max(float((sh.float() - m).abs().max() / m.abs().max().clamp(min=1e-30))
                    for sh, m in zip(teacher.shards, teacher.masters) if m.numel())
    # A gather-based read of the same student does communicate: the counter can see collectives.
    with count_collectives() as c:
        _full_student(engine)
    # ema/param_gap from local shards vs the same norm over full tensors (TP=1: full = whole model).
    num = sum(float((got[n][: theta[n].numel()].double() - theta[n].reshape(-1)).pow(2).sum()) for n in theta)
    gap_full = (num / sum(float(theta[n].pow(2).sum()) for n in theta)) ** 0.5
    return {"err": err, "moved": moved, "calls": calls, "shard_err": shard_err, "gather_calls": c.calls,
            "gap": teacher.param_gap(engine.module), "gap_full": gap_full, "moved_master": moved_master, "moved_naive": moved_naive,
            "err_rel": err_rel}


# Spawning ranks dominates the runtime: every case of one topology runs in one set of processes,
# once per module, and the tests below assert on its results.
DP2_CASES = {"zero3": (1, 3, "fp32", 2, 3, 0.9), "zero1": (1, 1, "fp32", 2, 3, 0.9),
             "bf16_zero3": (1, 3, "bf16", 2, 2, 0.999), "bf16_zero1": (1, 1, "bf16", 2, 2, 0.999)}
TP2_CASES = {"zero3": (2, 3, "fp32", 4, 2, 0.9), "zero1": (2, 1, "fp32", 4, 2, 0.9)}


# Rank functions return floats, lists or numpy arrays, not tensors: a tensor in the result queue is
# shared through the child's fd server, which may be gone by the time the parent unpickles it.


def _batch(cases: dict, resume_args: tuple) -> dict:
    out = {name: _recursion_case(*args) for name, args in cases.items()}
    out["resume"] = _resume_case(*resume_args)
    return out


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ema_dp2")
    return run_ranks(_batch, 2, (DP2_CASES, (1, str(ckpt)))), ckpt


@pytest.fixture(scope="module")
def tp2_dp2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("ema_tp2_dp2")
    return run_ranks(_batch, 4, (TP2_CASES, (2, str(ckpt)))), ckpt


@pytest.mark.parametrize("zero", [3, 1])
def test_teacher_equals_fp32_recursion_dp2(dp2, zero):
    res = [r[f"zero{zero}"] for r in dp2[0]]
    for r in res:
        assert r["err"] < 1e-6, r["err"]
        assert r["moved"] > 1e-4  # the student moved away from the teacher: the test can fail
        assert all(c == (0, 0, 0) for c in r["calls"]), r["calls"]
        assert r["gather_calls"] > 0
        assert r["shard_err"] == 0.0  # fp32: the shard is the master
        assert 0 < r["gap"] < 1 and abs(r["gap"] - r["gap_full"]) < 1e-6 * r["gap_full"], (r["gap"], r["gap_full"])
    assert res[0]["gap"] == res[1]["gap"]


@pytest.mark.parametrize("zero", [3, 1])
def test_teacher_equals_fp32_recursion_tp2_dp2(tp2_dp2, zero):
    res = [r[f"zero{zero}"] for r in tp2_dp2[0]]
    for r in res:
        assert r["err"] < 1e-6, r["err"]
        assert r["moved"] > 1e-4
        assert all(c == (0, 0, 0) for c in r["calls"]), r["calls"]
    assert len({r["gap"] for r in res}) == 1


def test_bf16_teacher_tau_0999_moves_every_element(dp2):
    """bf16 compute, tau=0.999: the fp32 masters move every element the recursion moves (a bf16-only
    EMA stalls on most of them), and the compute shards are the masters rounded to bf16."""
    for r in (r["bf16_zero3"] for r in dp2[0]):
        assert r["err"] < 1e-6, r["err"]
        assert r["moved_master"] == 1.0, r["moved_master"]
        assert r["moved_naive"] < 0.5, r["moved_naive"]
        assert 0 < r["shard_err"] <= 2 ** -8  # bf16 rounding of the masters, no more
        assert all(c == (0, 0, 0) for c in r["calls"]), r["calls"]


def test_bf16_zero1_student_reads_local_fp32_fragments(dp2):
    """A bf16 ZeRO-1 student keeps fp32 masters partitioned by flat group, not per parameter: the
    teacher reads them where this rank holds them and the bf16 value elsewhere (no collective), so it
    matches the fp32 recursion to bf16 rounding of theta."""
    for r in (r["bf16_zero1"] for r in dp2[0]):
        assert r["err_rel"] < 2 ** -8, r["err_rel"]
        # Elements read from bf16 move only where theta crossed a bf16 step (a bf16 EMA: far fewer).
        assert r["moved_master"] > 0.99 and r["moved_naive"] < 0.5, (r["moved_master"], r["moved_naive"])
        assert all(c == (0, 0, 0) for c in r["calls"]), r["calls"]


def _scores(teacher, engine, dims, vocab: int):
    """S_ema on fixed contexts from the teacher, and the same score from the student."""
    from rlp_dist.rlp.logprobs import token_logprobs

    g = torch.Generator().manual_seed(7 + dims.dp_rank)
    ctx, nxt = torch.randint(0, vocab, (3, 12), generator=g), torch.randint(0, vocab, (3,), generator=g)
    with torch.no_grad():
        pos = torch.arange(ctx.shape[1]).expand_as(ctx)
        s_student = token_logprobs(engine(ctx, pos, None)[:, -1], nxt, 1.0, dims.tp_group if dims.tp > 1 else None)
    return teacher.score(ctx, nxt), s_student


def _resume_case(tp: int, ckpt_dir: str):
    from rlp_dist.checkpoint.manager import CheckpointManager
    from rlp_dist.rlp.ema import EmaTeacher
    from rlp_dist.train import build_student

    world = 2 * tp
    cfg, dims, engine, vocab = _setup(tp, 3, "fp32", world)
    teacher = EmaTeacher(build_student(cfg, vocab, load_weights=False), 0.9, 1, dims, "fp32")
    teacher.initialize(engine.module)
    s_t, s_s = _scores(teacher, engine, dims, vocab)
    init_err = float((s_t - s_s).abs().max())  # phi = theta: the teacher scores like the student
    for s in (1, 2):
        _train_step(engine, dims, vocab, s)
        teacher.update(engine.module, s)
    mgr = CheckpointManager(ckpt_dir, dims.rank)
    mgr.save(engine, 2, {"step": 2}, {"teacher": teacher.state_dict()})
    saved = teacher.state_dict()
    s_at_save, _ = _scores(teacher, engine, dims, vocab)
    for s in (3, 4):
        _train_step(engine, dims, vocab, s)
        teacher.update(engine.module, s)
    s_full, _ = _scores(teacher, engine, dims, vocab)
    # A fresh student and teacher (different initial weights), restored from step 2.
    torch.manual_seed(99)
    from rlp_dist.train import wrap_deepspeed

    engine2 = wrap_deepspeed(build_student(cfg, vocab), cfg, dims)
    teacher2 = EmaTeacher(build_student(cfg, vocab, load_weights=False), 0.9, 1, dims, "fp32")
    _, rank_state = mgr.load(engine2)
    teacher2.load_state_dict(rank_state["teacher"])
    same = all(torch.equal(a, b) for a, b in zip(teacher2.masters, [saved["masters"][n] for n in teacher2.names]))
    restored = (teacher2.initialized, teacher2.num_updates)
    for s in (3, 4):
        _train_step(engine2, dims, vocab, s)
        teacher2.update(engine2.module, s)
    s_resumed, _ = _scores(teacher2, engine2, dims, vocab)
    return {"init_err": init_err, "same_masters": same, "restored": restored, "resume_err": float((s_full - s_resumed).abs().max()),
            "moved": float((s_full - s_t).abs().max()),
            "s_at_save": s_at_save.tolist(), "dp_rank": dims.dp_rank}


def _score_consolidated(sd: dict):
    """S_ema of DP rank 0's contexts from a TP=1 model loaded with the consolidated teacher weights."""
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.rlp.logprobs import token_logprobs
    from rlp_dist.train import build_student, load_resized

    init_distributed(1, 1, "gloo")
    cfg = compose(["+model=tiny_transformer", "rlp=tiny"], 1)
    model = build_student(cfg, cfg.model.vocab_size, load_weights=False).eval()
    with torch.no_grad():
        load_resized(model, sd)
        g = torch.Generator().manual_seed(7)
        ctx, nxt = torch.randint(0, cfg.model.vocab_size, (3, 12), generator=g), torch.randint(0, cfg.model.vocab_size, (3,), generator=g)
        pos = torch.arange(ctx.shape[1]).expand_as(ctx)
        return token_logprobs(model(ctx, pos, None)[:, -1], nxt).tolist()


@pytest.mark.parametrize("topology", ["dp2", "tp2_dp2"])
def test_resume_restores_masters_and_s_ema(request, topology):
    out, ckpt = request.getfixturevalue(topology)
    res = [r["resume"] for r in out]
    for r in res:
        assert r["init_err"] < 1e-5, r["init_err"]
        assert r["same_masters"] and r["restored"] == (True, 2)
        assert r["resume_err"] == 0.0, r["resume_err"]
        assert r["moved"] > 1e-4  # S_ema changed over the 4 steps: equality is not trivial
    # Export: the consolidated (DP- and TP-merged) teacher in an unsharded model scores the same.
    from rlp_dist.rlp.ema import consolidated_teacher_state_dict

    sd = consolidated_teacher_state_dict(str(ckpt), "step_00000002")
    s_export = run_ranks(_score_consolidated, 1, (sd,))[0]
    s_ref = next(r["s_at_save"] for r in res if r["dp_rank"] == 0)
    assert float((torch.tensor(s_export) - torch.tensor(s_ref)).abs().max()) < 1e-4


def _pp_case(ckpt_dir: str, steps: int, tau: float):
    """PP=2 x DP=2, ZeRO-1 student per stage: per-stage teacher, recursion, checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param

    from rlp_dist.checkpoint.manager import CheckpointManager
    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.rlp.ema import EmaTeacher, count_collectives
    from rlp_dist.train import build_student, wrap_deepspeed

    dims = init_distributed(1, 2, "gloo", seed=1234)
    cfg = compose(["+model=tiny_transformer", "rlp=tiny", "objective=ntp", "parallel.pp=2", "parallel.zero_stage=1",
                   "optim.lr=1e-3", "ntp.seq_len=16", "ntp.sequences_per_step=4", "ntp.sequences_per_micro_batch=2"], 4)
    vocab = cfg.model.vocab_size
    torch.manual_seed(cfg.train.seed)
    engine = wrap_deepspeed(build_student(cfg, vocab), cfg, dims)
    teacher = EmaTeacher(build_student(cfg, vocab, load_weights=False), tau, 1, dims, "fp32")
    teacher.initialize(engine.module)

    def full():
        return {teacher.global_names[n]: safe_get_full_fp32_param(p).double().clone()
                for n, p in engine.module.named_parameters()}

    ref, calls = full(), []
    for s in range(1, steps + 1):
        # A stage-local loss with a fixed random weight per parameter (no pipeline schedule needed):
        # every parameter gets a gradient and AdamW moves it.
        g = torch.Generator().manual_seed(s * 100 + dims.rank)
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() for p in engine.module.parameters())
        engine.backward(loss)  # gradient accumulation 1 (2 sequences per DP rank, micro-batch 2)
        engine.step()
        with count_collectives() as c:
            teacher.update(engine.module, s)
        calls.append(c.calls)
        theta = full()
        ref = {n: tau * ref[n] + (1 - tau) * theta[n] for n in ref}
    CheckpointManager(ckpt_dir, dims.rank).save(engine, steps, {"step": steps}, {"teacher": teacher.state_dict()})
    return {"ref": {n: v.numpy() for n, v in ref.items()}, "calls": calls, "dp_rank": dims.dp_rank, "pp_rank": dims.pp_rank,
            "gap": teacher.param_gap(engine.module), "moved": max(float((theta[n] - ref[n]).abs().max()) for n in ref)}


def test_pipeline_stages_pp2_dp2(tmp_path):
    """Each PP stage's teacher follows its ZeRO-1 student; the export merges stages with global layer
    numbers and drops the tied output-layer copy."""
    from rlp_dist.rlp.ema import consolidated_teacher_state_dict

    res = run_ranks(_pp_case, 4, (str(tmp_path), 2, 0.9))
    assert all(c == 0 for r in res for c in r["calls"])
    assert min(r["moved"] for r in res) > 1e-5  # every stage's student moved away from its teacher
    assert len({r["gap"] for r in res}) == 1 and res[0]["gap"] > 0
    sd = consolidated_teacher_state_dict(str(tmp_path))
    ref = {}
    for r in res:
        if r["dp_rank"] == 0:
            ref.update({n: torch.from_numpy(v) for n, v in r["ref"].items()})
    ref.pop("output_layer.weight", None)  # tied: the last stage's copy of the embedding
    assert set(sd) == set(ref)
    assert {k.split(".")[2] for k in sd if k.startswith("decoder.layers.")} == {"0", "1"}
    err = max(float((sd[k].double() - ref[k]).abs().max()) for k in ref)
    assert err < 1e-6, err
