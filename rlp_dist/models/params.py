"""`rlp-dist params +model=NAME [more Hydra overrides]`: a preset's parameter count on the meta device.

The full (TP=PP=1) model is built under ``torch.device("meta")`` — shapes only, no memory — in a
single-process group, and its parameters are counted: total, embedding/output, and the rest.
"""

from __future__ import annotations

import argparse
import json
import os

from rlp_dist.distributed.parallel import free_port


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="+", help="Hydra overrides, e.g. +model=qwen3_1_7b")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def count(overrides: list[str]) -> dict:
    """{'name', 'total', 'embedding', 'non_embedding'} for the composed preset (a one-rank group is
    initialised if none exists)."""
    import torch.distributed as dist

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import count_parameters

    mcfg = compose(overrides).model
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        init_distributed(1, 1)
    total = count_parameters(mcfg)
    embed = mcfg.vocab_size * mcfg.hidden_size * (1 if mcfg.tie_embeddings else 2)
    return {"name": mcfg.name, "total": total, "embedding": embed, "non_embedding": total - embed}


def run(args: argparse.Namespace) -> int:
    c = count(args.overrides)
    if args.json:
        print(json.dumps(c))
    else:
        print(f"{c['name']}: {c['total']:,} parameters ({c['total'] / 1e9:.3f}B); embedding/output "
              f"{c['embedding']:,}, non-embedding {c['non_embedding']:,}")
    return 0
