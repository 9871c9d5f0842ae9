"""Run a function on N gloo ranks (CPU) and collect each rank's return value.

    from helpers.spawn import run_ranks
    results = run_ranks(my_module_level_fn, world_size=2, args=(...))  # list, index = rank

The function runs in a fresh (spawned) process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set; it
typically calls ``rlp_dist.distributed.parallel.init_distributed(tp, pp)``. Exceptions on any rank
fail the call with that rank's traceback. Return values must be picklable (CPU tensors are fine).
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import traceback

import torch
import torch.multiprocessing as mp

from rlp_dist.distributed.parallel import free_port  # noqa: F401 (re-exported for tests)


def _entry(rank, world_size, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        out = fn(*args)
        # As bytes, not tensors: torch's queue passes tensor storage through shared memory that vanishes
        # when this process exits before the parent has read it (FileNotFoundError on a loaded machine).
        buf = io.BytesIO()
        torch.save(out, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from rlp_dist.distributed.parallel import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def run_ranks(fn, world_size: int, args: tuple = (), timeout: float = 600.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = [None] * world_size, []
    for _ in range(world_size):
        try:
            rank, ok, out = queue.get(timeout=timeout)
        except queue_mod.Empty:
            errors.append(f"timed out waiting for a rank ({timeout:.0f} s)")
            break
        except Exception as e:  # a rank died, or its result did not unpickle
            errors.append(f"reading a rank's result failed: {e!r}")
            break
        if ok:
            results[rank] = torch.load(io.BytesIO(out), weights_only=False)  # our own ranks' results
        else:
            errors.append(f"rank {rank}:\n{out}")
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return results
