"""GPU smoke of the whole loop (skipped without CUDA): same code path, nccl, compat inert."""

import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_compat_is_inert_on_gpu():
    from rlp_dist.distributed import megatron_compat

    assert megatron_compat.apply() is False and not megatron_compat.is_applied()


@pytest.mark.gpu
def test_tiny_rlp_trains_on_gpu(tmp_path):
    p = subprocess.run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", "train.steps=3",
                        f"run.dir={tmp_path}", "logging.wandb_mode=disabled", "train.dtype=bf16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(math.isfinite(r["rlp/loss"]) and math.isfinite(r["rlp/s_ema_mean"]) for r in rows)
    assert torch.cuda.is_available()
