"""The no-think EMA teacher p_phi (RLP.md, Algorithm 1, steps 4, 5 and 11).

    phi <- theta                         at the first update (lazy init)
    phi <- tau * phi + (1 - tau) * theta after every ``update_every`` optimizer steps

The teacher is a second model of the same preset and shard (same TP/PP rank) with fp32
parameters; it only runs forward under ``no_grad`` to score S_ema = log p_phi(x_t | x_<t).

This is the foundation's plain version: a full fp32 copy of this rank's model shard; reading a
ZeRO-3 student gathers each parameter (collectives). The EMA issue replaces the storage with ZeRO-3
partitioned shards whose update is local arithmetic; the interface (``update``, ``score``,
``state_dict``) stays.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rlp_dist.rlp.logprobs import token_logprobs


def _gathered(params: list[torch.nn.Parameter]):
    """Context manager giving full tensors of (possibly ZeRO-3 partitioned) parameters."""
    import contextlib

    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EmaTeacher:
    def __init__(self, module: torch.nn.Module, decay: float, update_every: int = 1, tp_group=None):
        self.module = module.float().eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.update_every = update_every
        self.tp_group = tp_group
        self.initialized = False
        self.num_updates = 0

    def _pairs(self, student: torch.nn.Module) -> Iterable[tuple[torch.Tensor, torch.nn.Parameter]]:
        teacher = dict(self.module.named_parameters())
        for name, p in student.named_parameters():
            yield teacher[name], p

    @torch.no_grad()
    def initialize(self, student: torch.nn.Module) -> None:
        """Lazy init (step 1, before the first scoring): phi <- theta."""
        self._blend(student, 0.0)
        self.initialized = True

    @torch.no_grad()
    def update(self, student: torch.nn.Module, step: int) -> bool:
        """EMA step from the student (after its optimizer step). Returns True if it ran this step."""
        if not self.initialized:
            raise RuntimeError("EmaTeacher.update before initialize(student)")
        if step % self.update_every != 0:
            return False
        self._blend(student, self.decay)
        self.num_updates += 1
        return True

    def _blend(self, student: torch.nn.Module, tau: float) -> None:
        for t, s in self._pairs(student):
            with _gathered([s]):
                t.mul_(tau).add_(s.detach().float(), alpha=1.0 - tau)

    @torch.no_grad()
    def score(self, contexts: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """S_ema = log p_phi(x_t | x_<t) in fp32. contexts (B, C), next_tokens (B,) -> (B,)."""
        if not self.initialized:
            raise RuntimeError("EMA teacher used before its first update (lazy init from the student)")
        pos = torch.arange(contexts.shape[1], device=contexts.device).expand_as(contexts)
        logits = self.module(contexts, pos, None)[:, -1]  # (B, V/tp)
        return token_logprobs(logits, next_tokens, tp_group=self.tp_group)

    @torch.no_grad()
    def param_gap(self, student: torch.nn.Module) -> torch.Tensor:
        """||phi - theta|| / ||theta|| over this rank's shard (gathers a ZeRO-3 student)."""
        num = torch.zeros(())
        den = torch.zeros(())
        for t, s in self._pairs(student):
            with _gathered([s]):
                sf = s.detach().float()
                num += (t - sf).pow(2).sum()
                den += sf.pow(2).sum()
        return (num / den.clamp(min=1e-30)).sqrt()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "initialized": self.initialized,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.initialized = state["initialized"]
        self.num_updates = state["num_updates"]
