"""`rlp-dist` command line: one subcommand per module, each owning its own argument parser.

    rlp-dist convert hf-to-ckpt|ckpt-to-hf ...   (rlp_dist.models.convert)
    rlp-dist score --hf-dir DIR --text-file F    (rlp_dist.models.score)
    rlp-dist prepare-data --input ... --out P    (rlp_dist.data.prepare)
    rlp-dist plot RUN_DIR                        (rlp_dist.logging.plot)
    rlp-dist params +model=NAME                  (parameter count on the meta device)
    rlp-dist eval --run RUN_DIR --data F --out D (think vs no-think: rlp_dist.eval.command)
    rlp-dist compare RUN...                      (eval metrics against cumulative FLOPs: rlp_dist.eval.compare)
    rlp-dist make-demo-data --out DIR            (the demo corpus: rlp_dist.demo.data)

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "convert": ("rlp_dist.models.convert", "convert checkpoints between transformers and rlp-dist"),
    "score": ("rlp_dist.models.score", "per-token log-probs of text with the sharded model"),
    "prepare-data": ("rlp_dist.data.prepare", "tokenize text/JSONL into a megatron indexed dataset"),
    "plot": ("rlp_dist.logging.plot", "plot the main curves of a run's metrics.jsonl to PNG"),
    "params": ("rlp_dist.models.params", "count a preset's parameters on the meta device"),
    "eval": ("rlp_dist.eval.command", "think vs no-think on held-out text (summary.json, positions.jsonl)"),
    "compare": ("rlp_dist.eval.compare", "eval metrics of several runs against cumulative FLOPs (PNG + table)"),
    "make-demo-data": ("rlp_dist.demo.data", "write the demo corpus where a short thought helps (scripts/demo.sh)"),
    "plan": ("rlp_dist.perf.plan", "per-GPU memory and FLOPs per step of a config before launch; does it fit"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlp-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    available = {}
    for name, (mod_name, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        available[name] = mod
    args = parser.parse_args(argv)
    from rlp_dist.config.schema import ConfigError

    from rlp_dist.checkpoint.safe_load import CONVERT_FLAG, guarded_loads

    try:
        # Every torch.load of a subcommand is weights-only (checkpoint.safe_load) unless it has --trust-checkpoint.
        with guarded_loads(CONVERT_FLAG, bool(getattr(args, "trust_checkpoint", False))):
            return int(available[args.command].run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"rlp-dist {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
