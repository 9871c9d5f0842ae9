"""Run a multi-rank benchmark body in spawned processes on this machine (gloo)."""

from __future__ import annotations

import os


def spawn_ranks(body, world: int, *args) -> dict:
    """Run ``body(*args)`` on ``world`` spawned ranks (one thread each, a free local port). ``body``
    must be a module-level function. Returns {rank: result}; a failed rank raises RuntimeError with
    its traceback."""
    import torch.multiprocessing as mp

    from rlp_dist.distributed.parallel import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, body, args, queue)) for r in range(world)]
    for pr in procs:
        pr.start()
    results = dict(queue.get(timeout=1800) for _ in procs)
    for pr in procs:
        pr.join(timeout=60)
    errors = [v for v in results.values() if isinstance(v, str)]
    if errors:
        raise RuntimeError(f"benchmark rank failed:\n{errors[0]}")
    return results


def _entry(rank: int, world: int, port: int, body, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, body(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        queue.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        from rlp_dist.distributed.parallel import destroy_distributed

        destroy_distributed()
