"""Run a multi-rank benchmark body in spawned processes on this machine (gloo)."""

from __future__ import annotations


def spawn_ranks(entry, world: int, *args) -> dict:
    """Start ``world`` processes running ``entry(rank, world, port, *args, queue)``; each puts
    ``(rank, result)`` on the queue, or ``(rank, traceback string)`` on failure. Returns
    {rank: result}; a failed rank raises RuntimeError with its traceback."""
    import torch.multiprocessing as mp

    from rlp_dist.distributed.parallel import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=entry, args=(r, world, port, *args, queue)) for r in range(world)]
    for pr in procs:
        pr.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for pr in procs:
        pr.join(timeout=60)
    errors = [v for v in results.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError(f"benchmark rank failed:\n{errors[0]}")
    return results
