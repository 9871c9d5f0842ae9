"""The megatron-core CPU compatibility module: applied on CPU, inert with CUDA, reversible."""

import subprocess
import sys
import textwrap

import torch

from rlp_dist.distributed import megatron_compat as mc


def test_inert_when_cuda_is_present(monkeypatch):
    mc.revert()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import megatron.core.models.common.embeddings.rotary_pos_embedding as rope

    before = rope.torch
    assert mc.apply() is False
    assert not mc.is_applied()
    assert rope.torch is before is torch


def test_apply_and_revert_on_cpu():
    import megatron.core.pipeline_parallel.schedules as sched
    import megatron.core.tensor_parallel.random as mrandom

    mc.revert()
    fork = mrandom.CudaRNGStatesTracker.fork
    assert mc.apply() is True and mc.is_applied()
    assert sched.torch is not torch
    # device="cuda" literals and current_device() land on the CPU
    assert sched.torch.zeros(2, device="cuda").device.type == "cpu"
    assert sched.torch.cuda.current_device() == torch.device("cpu")
    assert mc.apply() is False  # idempotent
    mc.revert()
    assert sched.torch is torch and mrandom.CudaRNGStatesTracker.fork is fork
    mc.apply()


def test_gpt_forward_needs_the_patch():
    """A megatron GPTModel forward fails on CPU without the patch and works with it."""
    script = textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
        dist.init_process_group("gloo", rank=0, world_size=1)
        from rlp_dist.distributed import megatron_compat
        if sys.argv[1] == "patched":
            megatron_compat.apply()
        from megatron.core import parallel_state as ps, tensor_parallel
        ps.initialize_model_parallel(1, 1)
        from rlp_dist.config import compose
        from rlp_dist.models.builder import build_model
        model = build_model(compose(["+model=tiny_transformer"]).model)
        try:
            tensor_parallel.model_parallel_cuda_manual_seed(1)
            out = model(torch.randint(0, 100, (2, 5)), torch.arange(5).expand(2, 5), None)
            print("OK", tuple(out.shape))
        except (AssertionError, RuntimeError) as e:
            print("FAIL", type(e).__name__)
    """)
    from helpers.spawn import free_port

    res = {}
    for mode in ("patched", "unpatched"):
        p = subprocess.run([sys.executable, "-c", script, mode, str(free_port())], capture_output=True,
                           text=True, timeout=180)
        res[mode] = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
    assert res["patched"] == "OK (2, 5, 2048)", res
    assert res["unpatched"].startswith("FAIL"), res
