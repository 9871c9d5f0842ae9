"""Process groups, built once and passed down as one :class:`ParallelDims` object.

Rank layout is megatron-core's (tp fastest, then dp, then pp — ``order="tp-cp-ep-dp-pp"``): this
module is the only one that calls ``megatron.core.parallel_state``; everything else receives a
``ParallelDims``. ``DeepSpeedMPU`` adapts it to the ``mpu`` interface DeepSpeed expects, so ZeRO
partitions over the data-parallel group and clips gradients over the model-parallel group.

Environment: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` (torchrun and the
deepspeed launcher), or SLURM's ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun), or
nothing (one process).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


class _StageFlags:
    """First / last pipeline stage from ``pp_rank`` and ``pp`` (ParallelDims, MegatronLayout)."""

    pp: int
    pp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


@dataclass
class ParallelDims(_StageFlags):
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    mp_group: Any = None  # tp x pp: the group over which a gradient norm is complete

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def env_rank_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/deepspeed or SLURM variables, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _slurm_master_addr() -> Optional[str]:
    """The first node's ``NodeAddr`` (what slurmd listens on; a node *name* need not resolve, and
    a rendezvous on an unresolvable name hangs — STACK.md), falling back to its name."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import subprocess

    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    if not names:
        return None
    try:
        info = subprocess.run(["scontrol", "show", "node", names[0], "-o"], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        for field in info.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return names[0]


def free_port() -> int:
    """A TCP port free on this host now (single-node rendezvous for tests and CLI sub-launches)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def master_address() -> str:
    """RLP_MASTER_ADDR, else MASTER_ADDR, else the SLURM first node's address, else localhost."""
    return (os.environ.get("RLP_MASTER_ADDR") or os.environ.get("MASTER_ADDR") or _slurm_master_addr()
            or "127.0.0.1")


def init_distributed(tp: int = 1, pp: int = 1, backend: str = "auto", seed: int = 1234,
                     timeout_s: int = 600) -> ParallelDims:
    """Initialise torch.distributed and megatron-core's model-parallel groups; return the groups.

    Idempotent within a process only in the sense that an existing default group is reused.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from rlp_dist.distributed import megatron_compat

    rank, world, local_rank = env_rank_info()
    # DeepSpeed reads these from the environment; SLURM and plain `python` runs do not set them.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        megatron_compat.apply()
        device = torch.device("cpu")
    if world % (tp * pp) != 0:
        raise ValueError(f"world size {world} is not divisible by parallel.tp*parallel.pp={tp * pp}; "
                         f"launch a multiple of {tp * pp} ranks")
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = master_address()
        # A single process needs no agreed port: take a free one, so concurrent one-rank runs on a
        # host do not collide on 29500.
        default_port = str(free_port()) if world == 1 else "29500"
        os.environ["MASTER_PORT"] = os.environ.get("RLP_MASTER_PORT") or os.environ.get("MASTER_PORT", default_port)
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    # Megatron's RNG tracker (used around attention dropout); same seed on all ranks, offset per TP/PP.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelDims(
        world_size=world, rank=rank, local_rank=local_rank, tp=tp, pp=pp,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class DeepSpeedMPU:
    """The ``mpu`` object DeepSpeed queries, backed by a ParallelDims.

    ``get_model_parallel_*`` answers with the TP x PP group: DeepSpeed sums gradient norms over it,
    so with PP > 1 each stage clips on the true global norm rather than its own (STACK.md; checked:
    the logged grad norm at PP=2 equals PP=1's, tests/distributed/test_train_pp.py). DeepSpeed counts
    replicated parameters on TP rank 0 only (``get_tensor_model_parallel_rank``) and skips those
    marked ``ds_pipe_replicated`` (the last stage's tied output weight, see ``train.wrap_deepspeed``).
    """

    def __init__(self, dims: ParallelDims):
        self.d = dims

    def get_model_parallel_group(self):
        return self.d.mp_group

    def get_model_parallel_world_size(self):
        return self.d.tp * self.d.pp

    def get_model_parallel_rank(self):
        return dist.get_rank(self.d.mp_group)

    def get_tensor_model_parallel_group(self):
        return self.d.tp_group

    def get_tensor_model_parallel_world_size(self):
        return self.d.tp

    def get_tensor_model_parallel_rank(self):
        return self.d.tp_rank

    def get_data_parallel_group(self):
        return self.d.dp_group

    def get_data_parallel_world_size(self):
        return self.d.dp

    def get_data_parallel_rank(self):
        return self.d.dp_rank

    def get_pipeline_model_parallel_group(self):
        return self.d.pp_group

    def get_pipeline_model_parallel_world_size(self):
        return self.d.pp

    def get_pipeline_model_parallel_rank(self):
        return self.d.pp_rank


@dataclass(frozen=True)
class MegatronLayout(_StageFlags):
    """This rank's place in megatron-core's model-parallel layout, as its ``parallel_state`` holds it.

    Model code (the builder, gradient reductions, schedules, HF import/export) reads megatron's globals
    through :func:`megatron_layout` only, so that this module stays their one reader; a process without
    megatron's state initialised (a converter on one process) gets the single-rank layout."""

    tp: int = 1
    tp_rank: int = 0
    tp_group: Any = None
    pp: int = 1
    pp_rank: int = 0
    dp_rank: int = 0
    embedding_group: Any = None  # the first and last stage (tied embeddings at PP > 1); None elsewhere


def megatron_layout() -> MegatronLayout:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return MegatronLayout()
    emb = None
    if ps.is_rank_in_embedding_group():
        try:  # megatron 0.16.1 keeps stale embedding ranks after a re-initialisation (middle stages)
            emb = ps.get_embedding_group()
        except AssertionError:
            emb = None
    return MegatronLayout(tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
                          tp_group=ps.get_tensor_model_parallel_group(),
                          pp=ps.get_pipeline_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                          dp_rank=ps.get_data_parallel_rank(), embedding_group=emb)
