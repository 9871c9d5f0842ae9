"""Smoke check of an installation: `python -m rlp_dist.ops.smoke [--gpu]` (the Docker HEALTHCHECK).

Imports the stack (torch, deepspeed, megatron-core, hydra, wandb, transformers, rlp-dist) and
composes the tiny config; with ``--gpu`` also requires CUDA, mamba-ssm and causal-conv1d and runs
one CUDA matmul. Prints one line per component with its version; exits 1 naming what is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

REQUIRED = ["torch", "deepspeed", "megatron.core", "hydra", "omegaconf", "wandb", "transformers", "rlp_dist"]
GPU = ["mamba_ssm", "causal_conv1d"]


def _version(mod) -> str:
    return str(getattr(mod, "__version__", "") or "?")


def check(gpu: bool) -> list[str]:
    problems = []
    for name in REQUIRED + (GPU if gpu else []):
        try:
            mod = importlib.import_module(name)
            print(f"ok   {name} {_version(mod)}")
        except Exception as e:  # noqa: BLE001 - report any import failure
            problems.append(f"{name}: {type(e).__name__}: {e}")
            print(f"FAIL {name}: {e}")
    if not problems:
        from rlp_dist.config import compose

        cfg = compose(["+model=tiny_transformer", "rlp=tiny"])
        print(f"ok   config: {cfg.model.name}, rlp.group_size={cfg.rlp.group_size}")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            problems.append("CUDA: torch.cuda.is_available() is False; run the container with --gpus all")
        else:
            x = torch.randn(256, 256, device="cuda")
            torch.cuda.synchronize()
            print(f"ok   CUDA {torch.version.cuda} on {torch.cuda.get_device_name()}: matmul {float((x @ x).norm()):.1f}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlp_dist.ops.smoke", description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", action="store_true", help="also require CUDA, mamba-ssm and causal-conv1d")
    problems = check(ap.parse_args(argv).gpu)
    if problems:
        print("smoke: FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
