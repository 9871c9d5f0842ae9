"""`rlp-dist eval`: think vs no-think on held-out text (the measurement in rlp_dist.eval.core).

    rlp-dist eval (--run RUN_DIR [--which student|ema] [--tag TAG] | --hf-dir HF) --data PATH --out DIR
                  [--positions N|all] [--positions-key KEY] [--seed S] [--group-size G]
                  [--thought-max-tokens L] [--temperature T] [--context-len C] [--tp N] [--pp N]
                  [--document-boundaries respect|ignore]

Model: a run directory (the student, or ``--which ema`` the EMA teacher, of the latest or ``--tag``
checkpoint; config, tokenizer and thought markers are the run's own) or a transformers directory
(``--hf-dir``; markers ``--thought-open``/``--thought-close``). With ``--run`` and the student, the
run's EMA teacher also scores no-think (``nll_no_think_ema``, ``reward_mean``); ``--teacher-hf-dir``
names any other no-think reference. Sampling options default to the run's ``rlp`` section, contexts to
its ``data.document_boundaries`` (respect: the prefix of x_t's own document, as training draws them).

Writes DIR/summary.json (rlp_dist.eval.core.SUMMARY_KEYS and more), DIR/positions.jsonl (one line per
position: document, position, token, no-think and per-thought log-probs, thought texts),
DIR/gain_hist.png and DIR/samples.md (sample thoughts), and prints the summary.

With ``--tp``/``--pp`` > 1 the command launches tp*pp ranks itself through torchrun (like ``rlp-dist
score``); a run directory is first exported to a temporary transformers directory (student and
teacher, via rlp_dist.models.hf) that every rank reads its own slices from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from typing import Optional

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (checkpoints/ inside)")
    src.add_argument("--hf-dir", help="transformers checkpoint directory")
    p.add_argument("--which", choices=("student", "ema"), default="student", help="with --run: which weights think")
    p.add_argument("--tag", default=None, help="with --run: checkpoint tag (default: latest)")
    p.add_argument("--teacher-hf-dir", default=None, help="a transformers model scoring no-think as the reference")
    p.add_argument("--data", required=True, help=".txt/.jsonl file, directory, glob or indexed dataset")
    p.add_argument("--text-key", default="text")
    p.add_argument("--positions", default="256", help="N positions drawn with --seed, or 'all'")
    p.add_argument("--positions-key", default=None, help="JSONL field listing each document's token indices to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-size", type=int, default=None, help="G thoughts per position (default: run's, else 8)")
    p.add_argument("--thought-max-tokens", type=int, default=None, help="L (default: run's, else 64)")
    p.add_argument("--temperature", type=float, default=None, help="(default: run's, else 0.7)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--context-len", type=int, default=None, help="tokens of x_<t (default: run's, else 2048)")
    p.add_argument("--batch", type=int, default=16, help="contexts per rollout call")
    p.add_argument("--document-boundaries", choices=("respect", "ignore"), default=None,
                   help="contexts inside x_t's document, or stream windows (default: the run's data setting, else respect)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's / the HF dir)")
    p.add_argument("--thought-open", default=None)
    p.add_argument("--thought-close", default=None)
    p.add_argument("--add-thought-tokens", action="store_true", default=None)
    p.add_argument("--samples", type=int, default=8, help="positions shown in samples.md")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--label", default=None, help=argparse.SUPPRESS)  # the run dir, when _launch exported it


# ---- the run directory: config, weights ----------------------------------------------------------
def _ckpt_dir(run: str) -> pathlib.Path:
    p = pathlib.Path(run)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def run_config(run: str, tag: Optional[str] = None) -> dict:
    """The config a run saved with its checkpoint (the client state of its DeepSpeed model states)."""
    from rlp_dist.config.schema import ConfigError

    c = _ckpt_dir(run)
    if tag is None:
        if not (c / "latest").exists():
            raise ConfigError(f"--run {run}: no checkpoints/latest there; pass a run directory holding a checkpoint")
        tag = (c / "latest").read_text().strip()
    saved = c / tag / "config.json"  # written beside newer checkpoints: read without unpickling
    if saved.is_file():
        return json.loads(saved.read_text())
    from rlp_dist.checkpoint.layout import read_topology

    try:  # older checkpoints: DeepSpeed's client state, loaded weights-only (checkpoint.safe_load)
        return read_topology(c / tag)[1]
    except Exception as e:  # one line: an imported or foreign checkpoint
        raise ConfigError(f"--run {run}: {c / tag} holds no readable run config ({str(e).splitlines()[0][:200]}); "
                          f"export it with `rlp-dist convert ckpt-to-hf` and use --hf-dir") from None


def _full_weights(run: str, which: str, tag: Optional[str]) -> dict[str, torch.Tensor]:
    try:  # the consolidation helper's reader, once it exists (any TP/PP/ZeRO layout)
        from rlp_dist.checkpoint.consolidate import load_full_state
    except ImportError:
        load_full_state = None
    if load_full_state is not None:
        return load_full_state(run, which=which, tag=tag)
    if which == "ema":
        from rlp_dist.rlp.ema import consolidated_teacher_state_dict

        return consolidated_teacher_state_dict(run, tag)
    from rlp_dist.checkpoint.manager import consolidated_state_dict

    return consolidated_state_dict(run, tag)


def _has_teacher(run: str, tag: Optional[str]) -> bool:
    """An RLP run saves its EMA teacher with every checkpoint (objective=ntp runs have none)."""
    return run_config(run, tag).get("objective", "rlp") == "rlp"


def _model_config(cfg: dict, vocab: int):
    from rlp_dist.config.schema import ModelConfig

    m = {k: v for k, v in cfg["model"].items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}
    return ModelConfig(**{**m, "vocab_size": vocab, "init_from": None, "hf_dir": None})


def _build_from_weights(mcfg, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from rlp_dist.distributed.parallel import megatron_layout
    from rlp_dist.models.builder import build_model
    from rlp_dist.train import load_resized

    model = build_model(mcfg)
    layout = megatron_layout()  # full tensors cut to this rank's TP slice (pipeline stages map their layers)
    with torch.no_grad():
        load_resized(model, sd, mcfg, layout.tp, layout.tp_rank)
    return model


def _export_hf(run: str, which: str, tag: Optional[str], out: pathlib.Path) -> None:
    """The run's weights as a transformers directory (one process), for sharded evaluation."""
    from rlp_dist.models import hf
    from rlp_dist.models.convert import _meta_model, _one_rank_group

    _one_rank_group()
    sd = {k: v for k, v in _full_weights(run, which, tag).items() if not k.endswith("_extra_state")}
    mcfg = _model_config(run_config(run, tag), sd["embedding.word_embeddings.weight"].shape[0])
    model = _meta_model(mcfg)
    model.load_state_dict(sd, strict=False, assign=True)
    hf.export(model, mcfg, out)


# ---- options ------------------------------------------------------------------------------------
def _options(args, cfg: Optional[dict]):
    from rlp_dist.config.schema import ConfigError
    from rlp_dist.eval.core import EvalOptions

    r = (cfg or {}).get("rlp", {})

    def pick(v, key, default):
        return v if v is not None else r.get(key, default)

    if args.positions == "all":
        n = 0
    else:
        try:
            n = int(args.positions)
        except ValueError:
            raise ConfigError(f"--positions={args.positions!r}: give a number of positions or 'all'") from None
        if n < 1:
            raise ConfigError(f"--positions={n} must be >= 1 (or 'all')")
    return EvalOptions(positions=n, seed=args.seed, group_size=pick(args.group_size, "group_size", 8),
                       thought_max_tokens=pick(args.thought_max_tokens, "thought_max_tokens", 64),
                       temperature=pick(args.temperature, "temperature", 0.7), top_k=pick(args.top_k, "top_k", 0),
                       top_p=pick(args.top_p, "top_p", 1.0), context_len=pick(args.context_len, "context_len", 2048),
                       batch=args.batch, document_boundaries=args.document_boundaries or
                       (cfg or {}).get("data", {}).get("document_boundaries", "respect"))


def _markers(args, cfg: Optional[dict]):
    from rlp_dist.data.tokenizer import load_tokenizer, thought_tokens

    r = (cfg or {}).get("rlp", {})
    spec = args.tokenizer or ((cfg or {}).get("data", {}).get("tokenizer") if cfg else args.hf_dir)
    tok = load_tokenizer(spec)
    add = args.add_thought_tokens if args.add_thought_tokens is not None else r.get("add_thought_tokens", False)
    markers = thought_tokens(tok, args.thought_open or r.get("thought_open", "<think>"),
                             args.thought_close or r.get("thought_close", "</think>"), r.get("thought_prompt", ""), add)
    return tok, markers


# ---- the command ----------------------------------------------------------------------------------
def _launch(args: argparse.Namespace) -> int:
    """Re-run under torchrun with tp*pp ranks; a run directory goes through a temporary HF export."""
    from rlp_dist.distributed.parallel import free_port

    with tempfile.TemporaryDirectory(prefix="rlp-eval-") as tmp:
        argv = [a for a in sys.argv[1:]]
        argv = argv[argv.index("eval"):] if "eval" in argv else ["eval"] + argv
        if args.run:
            cfg = run_config(args.run, args.tag)
            _export_hf(args.run, args.which, args.tag, pathlib.Path(tmp) / "model")
            argv = _drop(argv, ("--run", "--which", "--tag")) + ["--hf-dir", str(pathlib.Path(tmp) / "model"),
                                                                 "--label", f"{args.run}:{args.which}"]
            if args.which == "student" and not args.teacher_hf_dir and _has_teacher(args.run, args.tag):
                _export_hf(args.run, "ema", args.tag, pathlib.Path(tmp) / "ema")
                argv += ["--teacher-hf-dir", str(pathlib.Path(tmp) / "ema")]
            r = cfg["rlp"]
            for flag, key in (("--group-size", "group_size"), ("--thought-max-tokens", "thought_max_tokens"),
                              ("--temperature", "temperature"), ("--top-k", "top_k"), ("--top-p", "top_p"),
                              ("--context-len", "context_len"), ("--thought-open", "thought_open"),
                              ("--thought-close", "thought_close")):
                if getattr(args, flag[2:].replace("-", "_")) is None:
                    argv += [flag, str(r[key])]
            if args.tokenizer is None:
                argv += ["--tokenizer", str(cfg["data"]["tokenizer"])]
            if args.document_boundaries is None:
                argv += ["--document-boundaries", cfg["data"].get("document_boundaries", "respect")]
            if args.add_thought_tokens is None and r.get("add_thought_tokens"):
                argv += ["--add-thought-tokens"]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.tp * args.pp}",
               f"--master_port={free_port()}", "-m", "rlp_dist.cli"] + argv
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.call(cmd, env=env)


def _drop(argv: list[str], flags) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        if any(a.startswith(f + "=") for f in flags):
            continue
        out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    if args.tp * args.pp > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _launch(args)
    if "MASTER_PORT" not in os.environ:
        from rlp_dist.distributed.parallel import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    from rlp_dist.config.schema import ConfigError
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.eval.core import evaluate, load_eval_data
    from rlp_dist.models import hf
    from rlp_dist.models.builder import build_model

    if args.which == "ema" and not args.run:
        raise ConfigError("--which ema needs --run RUN_DIR (a transformers directory holds one model)")
    cfg = run_config(args.run, args.tag) if args.run else None
    opts = _options(args, cfg)
    tok, markers = _markers(args, cfg)
    data = load_eval_data(args.data, tok, markers.eos_id, args.text_key, args.positions_key)
    dims = init_distributed(args.tp, args.pp)
    teacher = None
    if args.run:
        sd = _full_weights(args.run, args.which, args.tag)
        mcfg = _model_config(cfg, sd["embedding.word_embeddings.weight"].shape[0])
        model = _build_from_weights(mcfg, sd)
        if args.which == "student" and not args.teacher_hf_dir and _has_teacher(args.run, args.tag):
            teacher = _build_from_weights(mcfg, _full_weights(args.run, "ema", args.tag))
    else:
        mcfg = hf.model_config_from_hf(args.hf_dir)
        model = build_model(mcfg)
        hf.load_into(model, args.hf_dir, mcfg)
    if args.teacher_hf_dir:
        tcfg = hf.model_config_from_hf(args.teacher_hf_dir)
        teacher = build_model(tcfg)
        hf.load_into(teacher, args.teacher_hf_dir, tcfg)
    if len(tok) > mcfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tok)} tokens but the model only {mcfg.vocab_size} rows; use the "
                          f"tokenizer the model was trained with (--tokenizer)")
    if opts.context_len + opts.thought_max_tokens + 8 > mcfg.max_position_embeddings:
        raise ConfigError(f"--context-len {opts.context_len} + --thought-max-tokens {opts.thought_max_tokens} (+ "
                          f"markers) exceeds the model's max_position_embeddings={mcfg.max_position_embeddings}")
    res = evaluate(model, teacher, tok, markers, data, opts, dims)
    if dims.rank == 0:
        source, which = (args.run, args.which) if args.run else (args.hf_dir, "hf")
        if args.label:
            source, which = args.label.rsplit(":", 1)
        write_outputs(pathlib.Path(args.out), res, opts, args.samples, source=source, which=which)
    return 0


def write_outputs(out: pathlib.Path, res: dict, opts, n_samples: int, source: str, which: str) -> None:
    from rlp_dist.eval.report import gain_histogram, samples_markdown

    out.mkdir(parents=True, exist_ok=True)
    summary = {**res["summary"], "source": str(source), "which": which, "options": dataclasses.asdict(opts)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    with open(out / "positions.jsonl", "w") as f:
        for r in res["records"]:
            f.write(json.dumps(r) + "\n")
    gain_histogram(res["records"], out / "gain_hist.png")
    (out / "samples.md").write_text(samples_markdown(res["records"][:n_samples]))
    s = res["summary"]
    print(f"eval {source} ({which}): {s['positions']} positions x {s['group_size']} thoughts | "
          f"no-think NLL {s['nll_no_think']:.3f} | think NLL {s['nll_think']:.3f} (per thought "
          f"{s['nll_think_per_thought']:.3f}) | gain {s['gain_mean']:+.3f} nats (log-mean-exp {s['gain_lme_mean']:+.3f}), "
          f"{100 * s['gain_pos_frac']:.0f}% of thoughts help | thought len {s['thought_len_mean']:.1f}, "
          f"closed {100 * s['closed_frac']:.0f}%")
    print(f"wrote {out}/summary.json, positions.jsonl, gain_hist.png, samples.md")
