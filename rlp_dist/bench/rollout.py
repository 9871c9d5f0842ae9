"""Rollout engine and full RLP step: ours vs transformers ``generate`` and vs a naive implementation.

    python -m rlp_dist.bench rollout --json OUT [--presets tiny_transformer,tiny_hybrid]
        [--contexts 4] [--group 8] [--context-len 128] [--thought-len 128] [--repeats 3] [--set k=v ...]

Per backbone preset, on the same weights and the same batch (B contexts x G thoughts, sampled at
T=0.7, at most L thought tokens, stop at the closing marker), one process, this machine's threads:

- ``decode_tok_per_s``: our default engine (``sample_thoughts(engine="auto")``: the cached decode
  program for the Transformer), sampled thought tokens / wall time of the whole rollout (prefill,
  fork, decode, S_pred);
- ``megatron_tok_per_s``: the stock megatron-core ``StaticInferenceContext`` engine (the foundation's);
- ``hf_generate_tok_per_s``: ``transformers`` ``generate`` (sampling, its own KV cache, eos = the
  closing marker) on the model exported by ``rlp_dist.models.hf.export`` from our weights, given the
  B*G replicated prompts (``hf_logit_max_diff`` checks the export: its logits vs ours on the prompts);
- ``recompute_tok_per_s``: our model without a cache, recomputing the whole sequence per token (over
  the first ``--recompute-len`` thought tokens only: its cost grows with length, so this flatters it);
- ``step_s``: one full RLP step as the trainer runs it: rollout with S_pred read at the rollout, a
  no-think S_ema forward, the shared-prefix policy-gradient forward + backward, an AdamW step;
- ``naive_step_s``: the same step done naively: G prefills per context (stock engine on replicated
  contexts), a separate teacher-forced S_pred forward, the replicated training forward.
Times are the best of ``repeats`` rounds after a warm-up, the variants interleaved within each round
(A B C A B C: the machines are shared, and every variant sees the same background load).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time

import torch

from rlp_dist.data.tokenizer import ThoughtTokens

TEMPERATURE = 0.7


def _interleaved(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` wall time per callable, run in rounds (A B C A B C ...) after a warm-up.

    The machines are shared: interleaving exposes every variant to the same background load, and the
    minimum is the least-disturbed run. Returns {name: (seconds, last result)}.
    """
    out = {k: (float("inf"), fn()) for k, fn in fns.items()}  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            out[k] = (min(out[k][0], time.perf_counter() - t0), r)
    return out


def _hf_model(model, mcfg):
    """transformers model from our weights, through the backbones' exporter (one rank)."""
    from transformers import AutoModelForCausalLM

    from rlp_dist.models import hf

    with tempfile.TemporaryDirectory() as d:
        hf.export(model, mcfg, d)
        return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _hf_generate(hf_model, prompts, mk: ThoughtTokens, max_tokens: int) -> int:
    """Sample with generate; return the thought tokens produced (up to and including the close)."""
    with torch.no_grad():
        out = hf_model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                eos_token_id=mk.close_id, pad_token_id=mk.pad_id)
    new = out[:, prompts.shape[1]:]  # (N, <=L)
    closed = (new == mk.close_id).int()
    after_close = (closed.cumsum(1) - closed) > 0  # positions after the first close are padding
    return int((~after_close).sum())


def _recompute(model, prefix, mk, g: int, max_tokens: int) -> int:
    """No-cache sampling: the whole sequence through the model for every new token."""
    from rlp_dist.rlp.logprobs import sample

    seq = prefix.repeat_interleave(g, dim=0)
    active = torch.ones(seq.shape[0], dtype=torch.bool)
    tokens = 0
    with torch.no_grad():
        for _ in range(max_tokens):
            pos = torch.arange(seq.shape[1]).expand_as(seq)
            tok, _ = sample(model(seq, pos, None)[:, -1], TEMPERATURE)
            tokens += int(active.sum())
            active &= tok != mk.close_id
            seq = torch.cat([seq, tok[:, None]], dim=1)
            if not active.any():
                break
    return tokens


def _rlp_step(model, opt, ctx, nxt, mk, g, max_tokens, naive: bool):
    """One RLP step (rollout, S_ema, S_pred, advantages, clipped loss, backward, AdamW)."""
    from rlp_dist.rlp.logprobs import token_logprobs
    from rlp_dist.rlp.losses import clipped_surrogate, group_advantages
    from rlp_dist.rlp.rollout import RolloutSettings, sample_thoughts
    from rlp_dist.rlp.shared_prefix import policy_logits

    b = ctx.shape[0]
    if naive:  # G prefills per context: the stock engine over replicated contexts
        ro = sample_thoughts(model, ctx.repeat_interleave(g, 0), nxt.repeat_interleave(g), mk,
                             RolloutSettings(1, max_tokens, TEMPERATURE, engine="megatron"))
        with torch.no_grad():  # a separate teacher-forced forward for S_pred
            seqs = ro.scored_sequences(mk)
            logits = model(seqs, torch.arange(seqs.shape[1]).expand_as(seqs), None)
            rows = torch.arange(seqs.shape[0])
            s_pred = token_logprobs(logits[rows, ro.close_positions()], ro.next_tokens)
    else:
        ro = sample_thoughts(model, ctx, nxt, mk, RolloutSettings(g, max_tokens, TEMPERATURE))
        s_pred = ro.s_pred
    with torch.no_grad():  # S_ema: a no-think forward (the EMA teacher has the student's shape)
        full = torch.cat([ctx, nxt[:, None]], 1)
        token_logprobs(model(full, torch.arange(full.shape[1]).expand_as(full), None)[:, -2], nxt)
    adv = group_advantages(s_pred.view(b, g)).reshape(-1)
    logits = policy_logits(ro, model, shared=not naive)  # (N, L, V)
    logp = token_logprobs(logits, ro.thoughts, TEMPERATURE)
    loss, _ = clipped_surrogate(logp, ro.behaviour_logp, adv, ro.mask, 0.2, 0.2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return ro


def bench_preset(preset: str, args) -> dict:
    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model
    from rlp_dist.rlp.rollout import RolloutSettings, cached_decoder_class, sample_thoughts

    mcfg = compose([f"+model={preset}", *args.set]).model
    torch.manual_seed(0)
    model = build_model(mcfg)
    b, g, big_l, c = args.contexts, args.group, args.thought_len, args.context_len
    gen = torch.Generator().manual_seed(1)
    ctx = torch.randint(8, mcfg.vocab_size, (b, c), generator=gen)
    nxt = torch.randint(8, mcfg.vocab_size, (b,), generator=gen)
    mk = ThoughtTokens(open_id=5, close_id=6, prompt_ids=(), eos_id=0, pad_id=0)
    res: dict = {"model": preset, "arch": mcfg.arch, "contexts": b, "group": g, "context_len": c,
                 "thought_len": big_l, "temperature": TEMPERATURE}

    def rollout(engine):
        return lambda: sample_thoughts(model, ctx, nxt, mk, RolloutSettings(g, big_l, TEMPERATURE, engine=engine))

    hf_model = _hf_model(model, mcfg)
    prefix = ctx_prefix(ctx, mk)
    res["hf_logit_max_diff"] = _hf_logit_diff(model, hf_model, prefix)  # the export is the same model
    prompts = prefix.repeat_interleave(g, dim=0)  # as generate's num_return_sequences
    t = _interleaved({"ours": rollout("auto"), "megatron": rollout("megatron"),
                      "hf": lambda: _hf_generate(hf_model, prompts, mk, big_l)}, args.repeats)
    ro = t["ours"][1]
    res["decode_tok_per_s"] = float(ro.mask.sum()) / t["ours"][0]
    res["engine"] = "cached" if cached_decoder_class(model) is not None else "megatron"
    res["mean_thought_len"] = float(ro.lengths.mean())
    res["megatron_tok_per_s"] = float(t["megatron"][1].mask.sum()) / t["megatron"][0]
    res["hf_generate_tok_per_s"] = t["hf"][1] / t["hf"][0]
    n_rc = min(big_l, args.recompute_len)  # O(L^2): a shorter run, which flatters recompute
    rc = _interleaved({"recompute": lambda: _recompute(model, ro.prefix, mk, g, n_rc)}, 1)["recompute"]
    res["recompute_tok_per_s"] = rc[1] / rc[0]
    res["ratio_vs_hf"] = res["decode_tok_per_s"] / res["hf_generate_tok_per_s"]
    res["ratio_vs_megatron"] = res["decode_tok_per_s"] / res["megatron_tok_per_s"]
    res["ratio_vs_recompute"] = res["decode_tok_per_s"] / res["recompute_tok_per_s"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    t = _interleaved({"step": lambda: _rlp_step(model, opt, ctx, nxt, mk, g, big_l, False),
                      "naive": lambda: _rlp_step(model, opt, ctx, nxt, mk, g, big_l, True)}, args.repeats)
    res["step_s"], res["naive_step_s"] = t["step"][0], t["naive"][0]
    res["ratio_vs_naive"] = res["naive_step_s"] / res["step_s"]
    return res


def ctx_prefix(ctx: torch.Tensor, mk: ThoughtTokens) -> torch.Tensor:
    """(B, C) contexts -> (B, P) prompts: context + prompt + opening marker (as the rollout builds them)."""
    extra = torch.tensor(mk.prefix_ids, dtype=torch.long)
    return torch.cat([ctx, extra.expand(ctx.shape[0], -1)], dim=1)


def _hf_logit_diff(model, hf_model, prefix) -> float:
    with torch.no_grad():
        ours = model(prefix, torch.arange(prefix.shape[1]).expand_as(prefix), None)
        return float((ours - hf_model(prefix).logits).abs().max())


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m rlp_dist.bench rollout")
    p.add_argument("--presets", default="tiny_transformer,tiny_hybrid")
    p.add_argument("--contexts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--thought-len", type=int, default=128)
    p.add_argument("--recompute-len", type=int, default=32, help="thought tokens for the no-cache run")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up (best of)")
    p.add_argument("--set", nargs="*", default=[], help="model overrides, e.g. model.hidden_size=256")
    args = p.parse_args(argv)
    from rlp_dist.config import ConfigError, compose
    from rlp_dist.distributed.parallel import destroy_distributed, init_distributed

    for preset in args.presets.split(","):  # bad presets/overrides fail before any work, with exit 2
        try:
            compose([f"+model={preset}", *args.set])
        except ConfigError as e:
            raise SystemExit(f"bench rollout: {e}") from None

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free port: several benchmarks may run side by side
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    init_distributed(1, 1)
    out = []
    try:
        for preset in args.presets.split(","):
            try:
                r = bench_preset(preset, args)
            except Exception as e:  # noqa: BLE001 - one preset's failure is reported, not fatal
                r = {"model": preset, "error": f"{type(e).__name__}: {e}"}
            r.update(threads=torch.get_num_threads(), machine=platform.machine(), torch=torch.__version__)
            out.append(r)
    finally:
        destroy_distributed()
    return out
