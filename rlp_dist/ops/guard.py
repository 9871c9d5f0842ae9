"""Non-finite steps and divergence: skip or stop, never train on (or checkpoint) a NaN.

Policy ``train.on_nonfinite``:

    stop (default)  the step whose loss, reward or gradient norm is not finite ends the run: one line
                    ``error: step N: non-finite ...; last good checkpoint: ...``, exit 3, no checkpoint
                    is written from that state (the update itself is discarded too).
    skip            that step's update is discarded: parameters, optimizer state (moments, step
                    count), LR schedule and the EMA teacher stay exactly as before the step; the
                    count is logged as ``train/skipped_steps``. ``train.skip_limit`` skipped steps in
                    a row stop the run as above (a run whose weights are gone will not recover), and
                    so does a non-finite metric of a step whose update was applied (finite loss).

How the update is discarded (:class:`NonfiniteGuard`, installed once on the engine by train()):
``engine.backward(loss)`` is wrapped to record ``~isfinite(loss)`` per micro-batch (a device flag,
no sync); at the gradient-accumulation boundary ``engine.step()`` first reduces the flag (MAX over
all ranks: one 1-element all-reduce per step, so every rank skips together; under PP the last
stage's loss reaches the others this way). A bad step runs DeepSpeed's own overflow path instead of
the optimizer: the accumulated gradients are dropped the way DeepSpeed drops an fp16 overflow
(ZeRO-3 ``_overflow_clean_up``; ZeRO-1/2 and the bf16 optimizer clear their gradient buffers; a
plain torch optimizer's ``p.grad`` are dropped) and ``optimizer.overflow = True`` makes the engine
count ``skipped_steps`` and not advance the LR scheduler. DeepSpeed's ZeRO/bf16 optimizers already
skip by themselves when the gradient norm is not finite; that skip is detected (``skipped_steps``
grew) and treated the same; a plain torch optimizer (ZeRO-0 fp32, where under PP the loss never
passes ``engine.backward``) gets its local gradients checked for non-finite values. The EMA update of that step is suppressed by handing rlp_step a held
teacher (:class:`HeldTeacher`) until the step ends.

The watchdog (``train.guard``) warns, once per episode, on the console and as ``guard/*`` metrics
(1.0 while the condition holds): ``guard/zero_grad`` (grad norm exactly 0 for K steps: an update
that no longer moves the student), ``guard/s_ema`` and ``guard/reward`` (|mean| beyond a bound in
nats: a log-prob below -1000 means the teacher has collapsed), ``guard/loss_spike`` (|loss - mean| >
k std over the previous steps, after 5 steps).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# Metrics whose non-finite value marks a bad step.
WATCHED = ("rlp/loss", "ntp/loss", "rlp/reward_mean", "rlp/s_ema_mean", "rlp/s_pred_mean", "optim/grad_norm")
EXIT_CODE = 3


class NonFiniteStop(RuntimeError):
    """The run stops on a non-finite step: ``str()`` is the one-line message."""


class HeldTeacher:
    """The EMA teacher during a discarded step: ``update`` does nothing (returns False); everything
    else (scoring, param_gap, metrics) is the real teacher's."""

    def __init__(self, teacher):
        self._teacher = teacher

    def update(self, student, step: int) -> bool:  # noqa: ARG002 - EmaTeacher.update's signature
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._teacher, name)


def _discard_gradients(opt) -> None:
    """Drop the accumulated gradients the way DeepSpeed drops an fp16 overflow step (DeepSpeed 0.19)."""
    if hasattr(opt, "_overflow_clean_up"):  # ZeRO-3 (fp32 / bf16)
        opt._overflow_clean_up(getattr(opt, "loss_scale", 1.0))
    elif hasattr(opt, "averaged_gradients"):  # ZeRO-1/2
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for k in list(opt.averaged_gradients.keys()):
            opt.averaged_gradients[k] = None
            if hasattr(opt, "all_grad_tensors"):
                opt.all_grad_tensors[k] = None
    elif hasattr(opt, "clear_hp_grads"):  # BF16_Optimizer (ZeRO-0/1 with bf16)
        opt.clear_hp_grads()
        opt.zero_grad()
    else:  # a torch optimizer (ZeRO-0 fp32): AdamW leaves a parameter without .grad untouched
        opt.zero_grad(set_to_none=True)
    opt._global_grad_norm = float("inf")


class NonfiniteGuard:
    """Wraps ``engine.backward`` / ``engine.step`` (module docstring); ``distributed``: reduce the flag
    over all ranks (WORLD)."""

    def __init__(self, engine, device: torch.device, distributed: bool):
        self.engine, self.device, self.distributed = engine, device, distributed
        self._bad = torch.zeros((), dtype=torch.float32, device=device)
        self.discarded = False  # the last boundary step was discarded (by us or by DeepSpeed)
        self.on_discard: Callable[[], None] = lambda: None  # train(): hold the EMA teacher for the step
        self._backward, self._step = engine.backward, engine.step
        engine.backward, engine.step = self.backward, self.step

    def backward(self, loss, *args, **kwargs):
        self._bad = torch.maximum(self._bad, (~torch.isfinite(loss.detach())).any().float())
        return self._backward(loss, *args, **kwargs)

    def mark_bad(self) -> None:
        """Discard this step's update (e.g. a non-finite reward seen before the step)."""
        self._bad = torch.ones((), dtype=torch.float32, device=self.device)

    def step(self, *args, **kwargs):
        engine = self.engine
        if not engine.is_gradient_accumulation_boundary():
            return self._step(*args, **kwargs)
        bad = self._bad
        opt = engine.optimizer
        if not hasattr(opt, "overflow"):
            # A plain torch optimizer (ZeRO-0 fp32) has no overflow check of its own, and under PP the
            # loss never passes engine.backward: look at the local gradients (one pass over p.grad).
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                finite = torch.stack([torch.isfinite(x).all() for x in grads]).all()
                bad = torch.maximum(bad, (~finite).float().to(bad.device))
        if self.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = bool(bad.item())  # the step's one host sync for the guard
        self._bad = torch.zeros((), dtype=torch.float32, device=self.device)
        before = engine.skipped_steps
        if not bad:
            out = self._step(*args, **kwargs)
        else:
            own_step = vars(opt).get("step")  # an instance-level step method (rare), put back after
            plain = not hasattr(type(opt), "overflow") and "overflow" not in vars(opt)

            def discard(closure=None):  # noqa: ARG001 - optimizer.step's signature
                _discard_gradients(opt)
                opt.overflow = True

            opt.step = discard
            try:
                out = self._step(*args, **kwargs)
            finally:
                del opt.step  # back to the class's method
                if own_step is not None:
                    opt.step = own_step
                if plain:
                    del opt.overflow
                else:
                    opt.overflow = False
        self.discarded = bad or engine.skipped_steps > before
        if self.discarded:
            self.on_discard()
        return out


class Policy:
    """After each step (train()): the skip/stop decision, ``train/skipped_steps`` and the watchdog."""

    def __init__(self, cfg, guard: Optional[NonfiniteGuard], last_good: Callable[[], Optional[str]],
                 warn: Callable[[str], None]):
        self.mode, self.limit, self.g = cfg.train.on_nonfinite, cfg.train.skip_limit, cfg.train.guard
        self.guard, self.last_good, self.warn = guard, last_good, warn
        self.skipped = 0
        self.in_a_row = 0
        self.zero_run = 0
        self.losses: list[float] = []
        self.active: set[str] = set()

    def after_step(self, step: int, m: dict) -> dict:
        """Update ``m`` with guard metrics; raises NonFiniteStop under ``stop`` (or past the skip limit)."""
        bad = [k for k in WATCHED if k in m and isinstance(m[k], float) and not math.isfinite(m[k])]
        discarded = self.guard is not None and self.guard.discarded
        if bad or discarded:
            what = ", ".join(f"{k}={m[k]}" for k in bad) or "gradient norm (update discarded)"
            # A non-finite metric of a step whose update went through (the loss was finite: e.g. a NaN that
            # reached only the metrics) stops under either mode: the state may be non-finite, never checkpoint it.
            if self.mode == "stop" or self.in_a_row + 1 > self.limit or not discarded:
                why = ("train.on_nonfinite=stop" if self.mode == "stop" else
                       f"{self.in_a_row + 1} skipped steps in a row" if discarded else "the update was applied")
                applied = "was not applied" if discarded else "was applied"
                good = self.last_good()
                raise NonFiniteStop(
                    f"step {step}: non-finite {what} ({why}); the update {applied} and no checkpoint was "
                    f"written; last good checkpoint: {good or 'none'}; lower optim.lr, raise optim.warmup_steps "
                    f"or resume from it with train.on_nonfinite=skip")
            self.skipped += 1
            self.in_a_row += 1
            self.warn(f"warning: step {step}: non-finite {what}: update skipped "
                      f"({self.skipped} so far, train.on_nonfinite=skip)")
        else:
            self.in_a_row = 0
        m["train/skipped_steps"] = float(self.skipped)
        if self.g.enabled:
            self._watch(step, m)
        return m

    def _watch(self, step: int, m: dict) -> None:
        g = self.g
        gn = m.get("optim/grad_norm")
        self.zero_run = self.zero_run + 1 if gn == 0.0 else 0
        loss = m.get("rlp/loss", m.get("ntp/loss"))
        spike = False
        if g.loss_spike and loss is not None and math.isfinite(loss):
            if len(self.losses) >= 5:
                mean = sum(self.losses) / len(self.losses)
                std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
                spike = abs(loss - mean) > g.loss_spike * max(std, 1e-6)
            self.losses = (self.losses + [loss])[-50:]
        conds = {
            "zero_grad": (bool(g.zero_grad_steps) and self.zero_run >= g.zero_grad_steps,
                          f"optim/grad_norm has been exactly 0 for {self.zero_run} steps: the student no longer "
                          f"moves (diverged or collapsed); lower optim.lr"),
            "s_ema": (bool(g.max_abs_s_ema) and abs(m.get("rlp/s_ema_mean", 0.0)) > g.max_abs_s_ema,
                      f"|rlp/s_ema_mean|={abs(m.get('rlp/s_ema_mean', 0.0)):.4g} nats > train.guard.max_abs_s_ema="
                      f"{g.max_abs_s_ema:g}: the EMA teacher has collapsed"),
            "reward": (bool(g.max_abs_reward) and abs(m.get("rlp/reward_mean", 0.0)) > g.max_abs_reward,
                       f"|rlp/reward_mean|={abs(m.get('rlp/reward_mean', 0.0)):.4g} nats > "
                       f"train.guard.max_abs_reward={g.max_abs_reward:g}: the reward is an artefact of divergence"),
            "loss_spike": (spike, f"loss {loss} is more than train.guard.loss_spike={g.loss_spike:g} std from "
                                  f"its recent mean"),
        }
        for name, (on, msg) in conds.items():
            m[f"guard/{name}"] = float(on)
            if on and name not in self.active:
                self.warn(f"warning: step {step}: guard/{name}: {msg}")
            (self.active.add if on else self.active.discard)(name)
