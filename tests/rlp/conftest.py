"""Fixtures for the rollout/shared-prefix tests: one single-rank process group and tiny models."""

import os

import pytest

from helpers.spawn import free_port
from rlp_test_models import build


@pytest.fixture(scope="session")
def dims():
    """A world of one (gloo) with megatron's parallel state: TP=PP=DP=1."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    from rlp_dist.distributed.parallel import destroy_distributed, init_distributed

    d = init_distributed(1, 1)
    yield d
    destroy_distributed()


@pytest.fixture(scope="session")
def tiny_transformer(dims):
    return build("tiny_transformer")


@pytest.fixture(scope="session")
def tiny_hybrid(dims):
    return build("tiny_hybrid")
