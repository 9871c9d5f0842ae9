"""`rlp-dist convert`: transformers checkpoints <-> rlp-dist checkpoints.

    rlp-dist convert hf-to-ckpt --hf-dir HF --out RUN_DIR
        writes RUN_DIR/checkpoints/{latest, hf_import/model.safetensors} holding the full
        (TP=PP=1) megatron state dict, usable as ``model.init_from=RUN_DIR``. Sharded training does
        not need this step: ``model.hf_dir=HF`` makes each rank read only its own TP/PP slices.
    rlp-dist convert ckpt-to-hf --ckpt RUN_DIR --out HF_OUT [--hf-dir HF | --preset NAME]
                                [--which student|ema] [--tag TAG] [--dtype fp32|bf16] [--trust-checkpoint]
        the student (DeepSpeed's ZeRO shards) or the EMA teacher (the per-rank rank-state files) of a
        checkpoint saved at any TP/PP/DP and ZeRO stage, both backbones (``checkpoint.consolidate``),
        as a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``--hf-dir``
        supplies the base config.json and tokenizer files; without --hf-dir/--preset the preset is
        the one the checkpoint saved. Added vocabulary rows (thought tokens) are kept. DeepSpeed's
        files are read with ``weights_only=True``; ``--trust-checkpoint`` unpickles them in full.

Weights are never materialised twice: the model is built on the meta device and the tensors read
from disk are assigned to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-ckpt", help="transformers directory -> rlp-dist init_from checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True, help="run directory to create (checkpoints/ inside)")
    b = sub.add_parser("ckpt-to-hf", help="rlp-dist checkpoint -> transformers directory")
    b.add_argument("--ckpt", required=True, help="run directory (or its checkpoints/ folder)")
    b.add_argument("--out", required=True)
    src = b.add_mutually_exclusive_group()
    src.add_argument("--hf-dir", help="the transformers checkpoint the run started from (config, tokenizer)")
    src.add_argument("--preset", help="model preset name (conf/model/NAME.yaml) when there is no HF base")
    b.add_argument("--which", choices=("student", "ema"), default="student")
    b.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    b.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    b.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle DeepSpeed's files in full (only for checkpoints you trust: they can run code)")


def _one_rank_group() -> None:
    import torch.distributed as dist

    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.distributed.parallel import free_port

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        init_distributed(1, 1)


def _meta_model(mcfg):
    from rlp_dist.models.builder import build_model

    with torch.device("meta"):
        return build_model(mcfg)


def hf_to_ckpt(hf_dir: str, out: str) -> pathlib.Path:
    from rlp_dist.models import hf

    _one_rank_group()
    mcfg = hf.model_config_from_hf(hf_dir)
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in hf.local_tensors(_meta_model(mcfg), hf_dir, mcfg)}
    tag_dir = pathlib.Path(out) / "checkpoints" / "hf_import"
    tag_dir.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tag_dir / "model.safetensors"), metadata={"format": "pt", "hf_dir": str(hf_dir)})
    (tag_dir.parent / "latest").write_text("hf_import")
    return tag_dir


def ckpt_to_hf(ckpt: str, out: str, hf_dir=None, preset=None, which="student", tag=None,
               dtype: str = "fp32", trust: bool = False) -> pathlib.Path:
    from rlp_dist.checkpoint.consolidate import load_full_state, model_config
    from rlp_dist.checkpoint.layout import read_topology, resolve_tag
    from rlp_dist.checkpoint.safe_load import CONVERT_FLAG
    from rlp_dist.models import hf

    _one_rank_group()
    if hf_dir:
        mcfg = hf.model_config_from_hf(hf_dir)
    elif preset:
        from rlp_dist.config import compose

        mcfg = compose([f"+model={preset}"]).model
    else:  # the preset the checkpoint was saved with
        mcfg = model_config(read_topology(resolve_tag(ckpt, tag), trust, CONVERT_FLAG)[1]["model"])
    sd = load_full_state(ckpt, which, tag, trust, CONVERT_FLAG)  # global names, any saved TP/PP/DP/ZeRO
    mcfg = dataclasses.replace(mcfg, vocab_size=sd["embedding.word_embeddings.weight"].shape[0])
    model = _meta_model(mcfg)
    from rlp_dist.config.schema import ConfigError

    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    bad = [k for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    missing, unexpected = [k for k in want if k not in sd], [k for k in sd if k not in want]
    if missing or unexpected or bad:
        what = (f"{bad[0]} has shape {tuple(sd[bad[0]].shape)}, the preset needs {want[bad[0]]}" if bad
                else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise ConfigError(f"{ckpt}: the {which} weights do not fit preset {mcfg.name!r} ({what}); pass the "
                          f"--hf-dir/--preset the run used (or neither: the checkpoint's own preset)")
    model.load_state_dict(sd, strict=False, assign=True)
    return hf.export(model, mcfg, out, base_config=hf.read_hf_config(hf_dir) if hf_dir else None,
                     dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, tokenizer_from=hf_dir)


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-ckpt":
        path = hf_to_ckpt(args.hf_dir, args.out)
    else:
        path = ckpt_to_hf(args.ckpt, args.out, args.hf_dir, args.preset, args.which, args.tag, args.dtype,
                          args.trust_checkpoint)
    print(f"wrote {path}")
    return 0
