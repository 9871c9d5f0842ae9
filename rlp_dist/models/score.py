"""`rlp-dist score`: per-token log-probs of text under a transformers checkpoint, run by rlp-dist's own
TP/PP-sharded megatron-core model (not transformers).

    rlp-dist score --hf-dir DIR --text-file F [--tp N] [--pp N] [--out FILE]

Each input line is plain text (tokenized with the checkpoint's tokenizer, no special tokens added) or
a JSON object {"input_ids": [...]}. Each output line is {"tokens": [x_0..x_{L-1}], "logprobs":
[log p(x_1 | x_0), ..., log p(x_{L-1} | x_<L-1)]} (the first token has no log-prob; fp32, natural
log). With --tp/--pp > 1 the command launches tp*pp ranks itself through torchrun (equivalent to
``torchrun --nproc_per_node=TP*PP -m rlp_dist.cli score ...``); the last pipeline stage's first TP
rank writes the output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="transformers checkpoint (config.json + safetensors)")
    p.add_argument("--text-file", required=True, help="one text or {\"input_ids\": [...]} per line")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", default=None, help="output JSON-lines file (default: stdout)")


def _launch(args: argparse.Namespace) -> int:
    """Re-run this command under torchrun with tp*pp ranks (one machine, gloo on CPU)."""
    from rlp_dist.distributed.parallel import free_port

    n = args.tp * args.pp
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
           f"--master_port={free_port()}", "-m", "rlp_dist.cli", "score", "--hf-dir", args.hf_dir,
           "--text-file", args.text_file, "--tp", str(args.tp), "--pp", str(args.pp)]
    if args.out:
        cmd += ["--out", args.out]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def read_inputs(path: str, hf_dir: str) -> list[list[int]]:
    """Token ids per input line (JSON {"input_ids": [...]} or text for the checkpoint's tokenizer)."""
    tok = None
    out = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.lstrip().startswith("{"):
                obj = json.loads(line)
                if "input_ids" not in obj:
                    raise ValueError(f"{path}:{lineno}: a JSON line needs an 'input_ids' list")
                out.append([int(t) for t in obj["input_ids"]])
                continue
            if tok is None:
                tok = _tokenizer(hf_dir, f"{path}:{lineno}")
            out.append(tok.encode(line, add_special_tokens=False))
    return out


def _tokenizer(hf_dir: str, where: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # noqa: BLE001 - any failure means: no usable tokenizer there
        raise ValueError(f"{where} is plain text but {hf_dir} has no loadable tokenizer ({type(e).__name__}); "
                         f"give pre-tokenized lines {{\"input_ids\": [...]}}") from None


def score_file(hf_dir: str, text_file: str, tp: int, pp: int) -> Optional[list[dict]]:
    """Score every line on this rank's shard; returns the records on the writing rank, else None."""
    import torch

    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models import hf, runner
    from rlp_dist.models.builder import build_model

    dims = init_distributed(tp, pp)
    mcfg = hf.model_config_from_hf(hf_dir)
    model = build_model(mcfg)
    hf.load_into(model, hf_dir, mcfg)
    records = []
    for ids in read_inputs(text_file, hf_dir):
        bad = [t for t in ids if not 0 <= t < mcfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:3]} are outside the vocabulary [0, {mcfg.vocab_size})")
        lp = runner.score(model, torch.tensor([ids])) if len(ids) >= 2 else torch.zeros(1, 0)
        records.append({"tokens": ids, "logprobs": None if lp is None else lp[0].tolist()})
    writer = dims.is_last_stage and dims.tp_rank == 0 and dims.dp_rank == 0
    return records if writer else None


def run(args: argparse.Namespace) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp * args.pp > 1 and world == 1:
        return _launch(args)
    if "MASTER_PORT" not in os.environ:
        from rlp_dist.distributed.parallel import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    records = score_file(args.hf_dir, args.text_file, args.tp, args.pp)
    if records is not None:
        f = open(args.out, "w") if args.out else sys.stdout
        try:
            for r in records:
                f.write(json.dumps(r) + "\n")
        finally:
            if args.out:
                f.close()
    return 0
