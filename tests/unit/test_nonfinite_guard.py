"""ops.guard on real DeepSpeed engines (ZeRO 0, 1 and 3; one gloo rank): a step with a non-finite loss
is discarded exactly, and so is a step whose loss is finite but a gradient is not — parameters unchanged, and the run that went on (good, bad,
good) equals the run that never saw the bad step (good, good) in weights, i.e. Adam moments, step
count and LR schedule were untouched too. The NaN comes in the first of two micro-batches, so a
finite last micro-batch does not hide it. Also: the HeldTeacher proxy and the skip/stop policy."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _engine(stage: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=cfg,
        optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 4))
    return engine


def _weights(engine) -> list[torch.Tensor]:
    import deepspeed

    out = []
    for p in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out.append(p.detach().clone())
    return out


def _step(engine, seed: int, poison: str = "") -> None:
    """poison='loss': the first micro-batch's loss is NaN; 'grad': the loss is finite but one gradient is
    NaN (what a PP stage sees: its loss never passes engine.backward)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(2):  # two micro-batches, one optimizer step
        x = torch.randn(2, 8, generator=g)
        hook = None
        if poison == "grad" and i == 0:
            hook = engine.module[0].weight.register_hook(lambda grad: grad * float("nan"))
        loss = engine(x).pow(2).mean()
        if poison == "loss" and i == 0:
            loss = loss * float("nan")
        engine.backward(loss)
        if hook is not None:
            hook.remove()
        engine.step()


def _run(stages):
    import deepspeed

    from rlp_dist.ops.guard import NonfiniteGuard

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in stages:
        a = _engine(stage)
        guard = NonfiniteGuard(a, torch.device("cpu"), distributed=True)
        _step(a, 1)
        ok_first = not guard.discarded
        before = _weights(a)
        _step(a, 2, poison="loss")
        after_bad = _weights(a)
        discarded, skipped = guard.discarded, a.skipped_steps
        _step(a, 4, poison="grad")
        grad_discarded = guard.discarded and a.skipped_steps == 2
        after_bad = after_bad if all(torch.equal(x, y) for x, y in zip(after_bad, _weights(a))) else None
        _step(a, 3)
        b = _engine(stage)
        _step(b, 1)
        _step(b, 3)
        out[stage] = dict(ok_first=ok_first, discarded=discarded, skipped=skipped, grad_discarded=grad_discarded,
                          unchanged=after_bad is not None and all(torch.equal(x, y) for x, y in zip(before, after_bad)),
                          same_as_never=all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b))),
                          moved=not all(torch.equal(x, y) for x, y in zip(before, _weights(a))),
                          lr=(a.get_lr()[0], b.get_lr()[0]))
    return out


def test_nonfinite_step_is_discarded_exactly_at_zero_0_1_3():
    (res,) = run_ranks(_run, 1, ((0, 1, 3),), timeout=300)
    for stage, r in res.items():
        assert r["ok_first"], f"ZeRO-{stage}: a finite step was discarded"
        assert r["discarded"] and r["skipped"] == 1, f"ZeRO-{stage}: the NaN step was not discarded: {r}"
        assert r["grad_discarded"], f"ZeRO-{stage}: a NaN gradient under a finite loss was applied"
        assert r["unchanged"], f"ZeRO-{stage}: parameters changed in a discarded step"
        assert r["moved"], f"ZeRO-{stage}: the good step after the skip did not train"
        assert r["same_as_never"], f"ZeRO-{stage}: good-bad-good differs from good-good (optimizer/LR touched)"
        assert r["lr"][0] == r["lr"][1], f"ZeRO-{stage}: LR schedule advanced on the skipped step"


def _policy(mode: str, limit: int = 3):
    from rlp_dist.config.schema import GuardConfig
    from rlp_dist.ops.guard import Policy

    cfg = SimpleNamespace(train=SimpleNamespace(on_nonfinite=mode, skip_limit=limit, guard=GuardConfig()))
    warnings: list[str] = []
    guard = SimpleNamespace(discarded=False)
    return Policy(cfg, guard, lambda: "runs/x/checkpoints/step_00000004", warnings.append), guard, warnings


def test_policy_stop_names_step_and_last_good_checkpoint():
    from rlp_dist.ops.guard import NonFiniteStop

    pol, guard, _ = _policy("stop")
    pol.after_step(1, {"rlp/loss": 0.1, "optim/grad_norm": 0.5})
    guard.discarded = True
    with pytest.raises(NonFiniteStop) as e:
        pol.after_step(5, {"rlp/loss": math.nan, "optim/grad_norm": math.inf})
    msg = str(e.value)
    assert "\n" not in msg and "step 5" in msg and "step_00000004" in msg and "rlp/loss=nan" in msg


def test_policy_skip_counts_and_stops_past_the_limit():
    from rlp_dist.ops.guard import NonFiniteStop

    pol, guard, warnings = _policy("skip", limit=2)
    guard.discarded = True
    for step in (1, 2):
        m = pol.after_step(step, {"rlp/loss": math.nan})
    assert m["train/skipped_steps"] == 2.0 and len(warnings) == 2
    with pytest.raises(NonFiniteStop, match="3 skipped steps in a row"):
        pol.after_step(3, {"rlp/loss": math.nan})
    pol, guard, _ = _policy("skip")
    with pytest.raises(NonFiniteStop, match="the update was applied"):  # not discarded: never go on from it
        pol.after_step(1, {"rlp/s_ema_mean": math.nan})


def test_watchdog_warns_once_per_episode():
    pol, _, warnings = _policy("stop")
    seen = [pol.after_step(s, {"optim/grad_norm": 0.0, "rlp/s_ema_mean": -278535.0, "rlp/reward_mean": 278528.0})
            for s in range(1, 6)]
    assert [m["guard/zero_grad"] for m in seen] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert all(m["guard/s_ema"] == 1.0 and m["guard/reward"] == 1.0 for m in seen)
    assert sum("guard/zero_grad" in w for w in warnings) == 1 and sum("guard/s_ema" in w for w in warnings) == 1


def test_held_teacher_does_not_update():
    from rlp_dist.ops.guard import HeldTeacher

    calls = []
    real = SimpleNamespace(update=lambda s, t: calls.append(t) or True, param_gap=lambda s: 0.25)
    held = HeldTeacher(real)
    assert held.update(None, 3) is False and calls == [] and held.param_gap(None) == 0.25
