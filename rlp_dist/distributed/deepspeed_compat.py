"""The one place where DeepSpeed behaviour is bent: ZeRO-3's trace checks under pipeline parallelism.

A ZeRO-3 module records the order in which its submodules and parameters are used over its first
forwards (the "trace", used for prefetching) and then checks that every rank recorded the same one
(``PartitionedParameterCoordinator.reset_step`` -> ``assert_ints_same_as_other_ranks``). That check
broadcasts from global rank 0 over the WORLD group. With pipeline parallelism the stages hold
different modules and run them at different moments of the schedule, so a WORLD broadcast pairs a
stage's check with another stage's (a disagreement error, or a deadlock against the pipeline's
point-to-point traffic) — STACK.md, measured with the EMA teacher run ``forward_only`` per stage.

The ranks that must agree are those that gather the module's partitions together: the data-parallel
group of one TP/PP shard (``zero.Init(data_parallel_group=...)``). :func:`trace_checks_over` makes the
check run over that group, for the duration of a ``with`` block, by rebinding the one module global
``deepspeed.runtime.zero.partitioned_param_coordinator.assert_ints_same_as_other_ranks``; the
original is restored on exit. The check itself is unchanged (same lists, same error), only its group.

Used by the EMA teacher's scoring (``rlp_dist.rlp.ema.EmaTeacher.score``); the student is never ZeRO-3
when PP > 1 (validated: ZeRO-3 *training* under PP fails for other reasons, STACK.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

_COORDINATOR = "deepspeed.runtime.zero.partitioned_param_coordinator"
_NAME = "assert_ints_same_as_other_ranks"


def assert_ints_same_over(ints: list[int], group, device: torch.device) -> None:
    """Raise if ``ints`` differs from the list of the group's first rank (2 broadcasts over ``group``)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    n = torch.tensor([len(ints)], dtype=torch.long, device=device)
    dist.broadcast(n, src=src, group=group)
    if int(n) != len(ints):
        raise RuntimeError(f"ZeRO-3 trace: rank {dist.get_rank()} recorded {len(ints)} entries, the first rank of "
                           f"its data-parallel group {int(n)}: the ranks ran different modules")
    ref = torch.tensor(ints, dtype=torch.long, device=device)
    dist.broadcast(ref, src=src, group=group)
    if ref.tolist() != list(ints):
        raise RuntimeError(f"ZeRO-3 trace: rank {dist.get_rank()} recorded {list(ints)}, the first rank of its "
                           f"data-parallel group {ref.tolist()}: the ranks ran different modules")


@contextlib.contextmanager
def trace_checks_over(group, device: torch.device) -> Iterator[None]:
    """Within the block, ZeRO-3 trace checks compare lists over ``group`` instead of the WORLD."""
    import importlib

    mod = importlib.import_module(_COORDINATOR)
    original = getattr(mod, _NAME)
    setattr(mod, _NAME, lambda ints: assert_ints_same_over(ints, group, device))
    try:
        yield
    finally:
        setattr(mod, _NAME, original)
