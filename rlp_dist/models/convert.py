"""`rlp-dist convert`: transformers checkpoints <-> rlp-dist checkpoints.

    rlp-dist convert hf-to-ckpt --hf-dir HF --out RUN_DIR
        writes RUN_DIR/checkpoints/{latest, hf_import/mp_rank_00_model_states.pt} holding the full
        (TP=PP=1) megatron state dict, usable as ``model.init_from=RUN_DIR``. Sharded training does
        not need this step: ``model.hf_dir=HF`` makes each rank read only its own TP/PP slices.
    rlp-dist convert ckpt-to-hf --ckpt RUN_DIR --out HF_OUT (--hf-dir HF | --preset NAME)
                                [--which student|ema] [--tag TAG] [--dtype fp32|bf16]
        the student (DeepSpeed weights, any ZeRO stage, TP=PP=1) or the EMA teacher (the per-rank
        ``rank_*.pt`` shards, any TP/PP/DP) as a directory that
        ``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``--hf-dir`` supplies the base
        config.json and tokenizer files; added vocabulary rows (thought tokens) are kept.

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
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", help="the transformers checkpoint the run started from (config, tokenizer)")
    src.add_argument("--preset", help="model preset name (conf/model/NAME.yaml) when there is no HF base")
    b.add_argument("--which", choices=("student", "ema"), default="student")
    b.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    b.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")


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
    sd = dict(hf.local_tensors(_meta_model(mcfg), hf_dir, mcfg))
    tag_dir = pathlib.Path(out) / "checkpoints" / "hf_import"
    tag_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"module": sd, "hf_dir": str(hf_dir)}, tag_dir / "mp_rank_00_model_states.pt")
    (tag_dir.parent / "latest").write_text("hf_import")
    return tag_dir


def ckpt_to_hf(ckpt: str, out: str, hf_dir=None, preset=None, which="student", tag=None,
               dtype: str = "fp32") -> pathlib.Path:
    from rlp_dist.models import hf

    _one_rank_group()
    if hf_dir:
        mcfg = hf.model_config_from_hf(hf_dir)
    else:
        from rlp_dist.config import compose

        mcfg = compose([f"+model={preset}"]).model
    if which == "ema":
        from rlp_dist.rlp.ema import consolidated_teacher_state_dict

        _check_ema_mergeable(ckpt, tag, mcfg)
        sd = consolidated_teacher_state_dict(ckpt, tag)
    else:
        from rlp_dist.checkpoint.manager import consolidated_state_dict

        sd = consolidated_state_dict(ckpt, tag)
    mcfg = dataclasses.replace(mcfg, vocab_size=sd["embedding.word_embeddings.weight"].shape[0])
    model = _meta_model(mcfg)
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"{ckpt}: the {which} weights do not fit preset {mcfg.name!r} (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); pass the --hf-dir/--preset the run used")
    return hf.export(model, mcfg, out, base_config=hf.read_hf_config(hf_dir) if hf_dir else None,
                     dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, tokenizer_from=hf_dir)


def _check_ema_mergeable(ckpt: str, tag, mcfg) -> None:
    """The EMA consolidation merges TP slices along one dim per tensor (SwiGLU halves aside), which
    does not reassemble the Mamba mixer's per-block fused tensors (in_proj, conv1d) at TP > 1."""
    if mcfg.arch != "hybrid":
        return
    p = pathlib.Path(ckpt)
    p = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    tag = tag or (p / "latest").read_text().strip()
    files = sorted((p / tag).glob("rank_*.pt"))
    state = torch.load(files[0], weights_only=False, map_location="cpu").get("teacher") if files else None
    if state is not None and state["ranks"]["tp"] > 1:
        raise NotImplementedError(f"{p / tag}: EMA export of a hybrid model saved at TP={state['ranks']['tp']} "
                                  f"is not supported (fused Mamba tensors); export the student, or save "
                                  f"the run at parallel.tp=1")


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-ckpt":
        path = hf_to_ckpt(args.hf_dir, args.out)
    else:
        path = ckpt_to_hf(args.ckpt, args.out, args.hf_dir, args.preset, args.which, args.tag, args.dtype)
    print(f"wrote {path}")
    return 0
