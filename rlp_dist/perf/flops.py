"""Analytic FLOPs of one RLP (or NTP) step, from the model's shapes (no tracing, no device).

A multiply-add is 2 FLOPs; a matmul (m, k) x (k, n) is 2mkn. Per token of a forward pass through one
layer (full model, TP does not change the total; H hidden, V vocabulary, F MLP width, a query heads,
g KV groups of dim d; Mamba2: h heads of dim p, inner i = h*p, ng groups, state n, conv width K):

    attention '*'   2H(a + 2g)d  (QKV)  +  2adH  (out proj)  +  4ad * keys   (scores QK^T and AV)
    MLP '-'         6HF (SwiGLU: gate, up, down)   |   4HF (squared ReLU: up, down)
    Mamba2 'M'      2H(2i + 2ng*n + h) (in_proj)  +  2(i + 2ng*n)K (depthwise causal conv)
                    +  SSD chunked scan (below)  +  2iH (out_proj)
    output layer    2HV at every position whose logits are used

A GPTModel layer is attention + MLP. ``keys`` is the number of keys a query attends to: causal
attention over S tokens has S(S+1)/2 (query, key) pairs in all, counted exactly ("causal"); an
unfused implementation that scores the full S x S square (megatron's local DotProductAttention)
does S^2 ("dense", used to check against ``torch.utils.flop_counter``).

SSD chunked scan (Dao & Gu 2024; ``kernels/ssd/reference.py``) over a sequence of T tokens padded to
T' = Q*ceil(T/Q) with chunk Q and c = T'/Q chunks, per head: C B^T scores 2T'Qn, their product with x
2T'Qp, the chunk states 2T'pn, the state passing over chunk boundaries 2(c+1)^2 pn, the output from
the entering states 2T'pn. One decode step of a row (``selective_state_update``): S <- e^{a}S + dt x B^T
and y = S C: 5hpn. Elementwise work (norms, the gated norm y*silu(z), activations, RoPE, softmax,
decays) is reported apart as ``elementwise`` (~10 FLOPs per normalised/activated element); it is part
of ``total`` but is < 1% at these widths, and ``torch.utils.flop_counter`` does not count it.

Phases of one RLP step over the B = rlp.contexts_per_step contexts (global, all ranks together), with
P = context_len + prompt + 1 (the opening marker), G = group_size, L' the thought tensor length (the
longest thought of the batch, <= L = thought_max_tokens) and n_r the tokens fed for row r:

    prefill   B forwards of P tokens (causal), logits at the last position only (the engine prefills
              once and forks the KV/conv/SSM states G ways)
    decode    B*G rows; a row feeds its n_r thought tokens one by one, token j seeing P + j keys, with
              logits at every step (the step that feeds the closing marker yields S_pred). Only live rows
              are counted: sum_r (n_r * dense + 4ad(n_r P + n_r(n_r+1)/2) + n_r * 2HV). With only the
              mean length given, n_r = mean for all rows (this undercounts the quadratic term by
              4ad * Var(n)/2 per row).
    teacher   B no-think forwards of the C context tokens (EMA teacher), logits at the scored position
    policy    the shared-prefix packed row per context and per thought chunk of g =
              rlp.thoughts_per_micro_batch thoughts: S = P + g(L'-1) tokens, prefix causal, thought
              token u of each thought seeing P + u keys, its Mamba scan the prefix (1, P) plus g rows of
              L'-1; logits at the G*L' thought positions. Forward + backward = 3x forward (backward
              2x: input and weight gradients); recompute adds one more forward of the layers (full) or
              of the attention scores only (selective). The replicated forward (shared_prefix=false)
              runs B*G rows of P + L' - 1 tokens instead.
    ntp       sequences_per_step rows of seq_len tokens, logits everywhere, 3x forward (+ recompute).

The paper's compute-matched CPT budget (RLP.md): T_flop = n_rollouts * l_seq * batch * iters + T_input,
with l_seq = context_len + thought_max_tokens and T_input = batch * iters * context_len (our reading:
170M input tokens at G=16, l_seq = 4096 give 5.6B, the paper's "~6B"). :func:`flop_matched_tokens` is the
exact alternative: an RLP run's analytic FLOPs divided by the NTP FLOPs per token of the same model.
"""

from __future__ import annotations

import math
import re
from typing import Optional, Sequence

MAMBA_CHUNK = 128  # megatron MambaMixer's chunk_size default (the SSD scan's Q)
ELEMENTWISE_PER_ELEMENT = 10  # rough cost of a norm / activation per element (reported apart)

# Dense bf16 tensor-core peaks, FLOP/s (vendor data sheets, SXM parts). Matched against the CUDA device
# name in order; override with logging.peak_tflops.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of a GPU by name (e.g. torch.cuda.get_device_name()); None if unknown."""
    if override_tflops:
        return float(override_tflops) * 1e12
    for key, value in PEAK_BF16_FLOPS:
        if re.search(key, device_name or "", re.IGNORECASE):
            return value
    return None


def mfu(flops: float, seconds: float, n_gpus: int, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s per GPU over the peak (None without a peak)."""
    if not peak or seconds <= 0:
        return None
    return flops / seconds / n_gpus / peak


def layer_kinds(m) -> list[str]:
    """One entry per megatron layer: 'T' (GPTModel layer: attention + MLP), or the hybrid's 'M' / '*' / '-'."""
    if m.arch == "hybrid":
        return list(m.hybrid_pattern)
    return ["T"] * m.num_layers


def _mamba_dims(m) -> tuple[int, int, int, int, int, int]:
    """(heads h, head dim p, inner i, groups ng, state n, conv channels i + 2 ng n)."""
    h, p, ng, n = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
    i = h * p
    return h, p, i, ng, n, i + 2 * ng * n


def per_token_dense(m) -> dict[str, float]:
    """Forward FLOPs per token through all layers, excluding attention scores, the scan and the output
    layer: {'linear', 'conv', 'elementwise'}."""
    hid, f, a, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    attn = 2 * hid * (a + 2 * g) * d + 2 * a * d * hid
    mlp = (6 if m.activation == "swiglu" else 4) * hid * f
    mlp_elem = (2 if m.activation == "swiglu" else 1) * f
    out = {"linear": 0.0, "conv": 0.0, "elementwise": 0.0}
    e = ELEMENTWISE_PER_ELEMENT
    for kind in layer_kinds(m):
        if kind in "T*":
            out["linear"] += attn
            out["elementwise"] += e * (hid + (a + g) * d)  # input norm, RoPE/QK-norm
        if kind in "T-":
            out["linear"] += mlp
            out["elementwise"] += e * (hid + mlp_elem)
        if kind == "M":
            h, _, i, ng, n, conv_ch = _mamba_dims(m)
            out["linear"] += 2 * hid * (2 * i + 2 * ng * n + h) + 2 * i * hid
            out["conv"] += 2 * conv_ch * m.mamba_conv_kernel
            out["elementwise"] += e * (hid + conv_ch + 2 * i)  # norm, conv silu, gated norm
    out["elementwise"] += e * hid  # final norm
    return out


def ssd_scan_flops(m, rows: int, length: int, chunk: int = MAMBA_CHUNK) -> float:
    """Matmul FLOPs of the SSD chunked scan of ``rows`` sequences of ``length`` tokens, all Mamba layers."""
    if m.arch != "hybrid" or length <= 0:
        return 0.0
    h, p, _, _, n, _ = _mamba_dims(m)
    c = math.ceil(length / chunk)
    tp_ = c * chunk
    per_head = 2 * tp_ * chunk * n + 2 * tp_ * chunk * p + 2 * tp_ * p * n + 2 * (c + 1) ** 2 * p * n + 2 * tp_ * p * n
    return float(rows * h * per_head * sum(k == "M" for k in m.hybrid_pattern))


def ssm_step_flops(m, tokens: float) -> float:
    """The Mamba layers' single-token state updates (decode) of ``tokens`` row-steps."""
    if m.arch != "hybrid":
        return 0.0
    h, p, _, _, n, _ = _mamba_dims(m)
    return float(tokens * 5 * h * p * n * sum(k == "M" for k in m.hybrid_pattern))


def n_attention_layers(m) -> int:
    return sum(k in "T*" for k in layer_kinds(m))


def forward_flops(m, *, tokens: float, attn_pairs: float, logit_tokens: float,
                  scan: Sequence[tuple[int, int]] = (), ssm_steps: float = 0.0) -> dict[str, float]:
    """Forward FLOPs of ``tokens`` positions through the model.

    attn_pairs: (query, key) pairs summed over all queries and attention layers' sequences (one layer's
    count; multiplied by the number of attention layers here); logit_tokens: positions through the
    output layer; scan: (rows, length) segments of the SSD chunked scan; ssm_steps: Mamba decode steps.
    Returns {'linear', 'attention', 'conv', 'ssm', 'vocab', 'elementwise', 'total'}.
    """
    dense = per_token_dense(m)
    a, d = m.num_attention_heads, m.kv_channels
    out = {
        "linear": tokens * dense["linear"],
        "attention": 4.0 * a * d * attn_pairs * n_attention_layers(m),
        "conv": tokens * dense["conv"],
        "ssm": sum(ssd_scan_flops(m, r, length) for r, length in scan) + ssm_step_flops(m, ssm_steps),
        "vocab": 2.0 * m.hidden_size * m.vocab_size * logit_tokens,
        "elementwise": tokens * dense["elementwise"],
    }
    out["total"] = sum(out.values())
    return out


def causal_pairs(s: float, dense: bool = False) -> float:
    """(query, key) pairs of causal attention over s tokens: s(s+1)/2, or s^2 when scored densely."""
    return s * s if dense else s * (s + 1) / 2


def sequence_forward(m, batch: int, seq: int, logits: bool = True, dense_attention: bool = False) -> dict:
    """Forward FLOPs of ``batch`` plain causal sequences of ``seq`` tokens (logits at every position)."""
    return forward_flops(m, tokens=batch * seq, attn_pairs=batch * causal_pairs(seq, dense_attention),
                         logit_tokens=batch * seq if logits else 0, scan=[(batch, seq)] if m.arch == "hybrid" else ())


def backward_factor(recompute: str) -> tuple[float, float]:
    """(multiplier of the forward, extra multiplier of the attention scores) for forward + backward."""
    if recompute == "full":
        return 4.0, 0.0  # forward, recomputed forward, backward (2x)
    if recompute == "selective":
        return 3.0, 1.0  # core attention recomputed
    return 3.0, 0.0


def _train(fwd: dict, recompute: str) -> float:
    mult, attn_extra = backward_factor(recompute)
    # recomputation covers the layers, not the output layer
    return 3.0 * fwd["vocab"] + (mult * (fwd["total"] - fwd["vocab"])) + attn_extra * fwd["attention"]


def _live_row_sums(p: int, lens: Sequence[float]) -> tuple[float, float]:
    """(tokens fed, (query, key) pairs) of decode rows with ``lens`` tokens each after a P-token prefix."""
    tokens = float(sum(lens))
    pairs = float(sum(n * p + n * (n + 1) / 2 for n in lens))
    return tokens, pairs


def rlp_phase_flops(m, r, *, thought_lens: Sequence[float], thought_len_max: int, prompt_tokens: int = 0,
                    recompute: str = "none", thoughts_per_micro_batch: Optional[int] = None,
                    score_teacher: bool = True) -> dict[str, float]:
    """FLOPs of one RLP step by phase over ``r.contexts_per_step`` contexts (global).

    thought_lens: tokens fed per decode row (B*G values, or one per row of a representative group,
    scaled to B*G); thought_len_max: L', the thought tensor length of the training forward.
    """
    b, g_all, c = r.contexts_per_step, r.group_size, r.context_len
    p = c + prompt_tokens + 1
    hyb = m.arch == "hybrid"
    scale = b * g_all / max(len(thought_lens), 1)
    out: dict[str, float] = {}
    out["prefill"] = forward_flops(m, tokens=b * p, attn_pairs=b * causal_pairs(p), logit_tokens=b,
                                   scan=[(b, p)] if hyb else ())["total"]
    tok, pairs = _live_row_sums(p, thought_lens)
    out["decode"] = forward_flops(m, tokens=tok * scale, attn_pairs=pairs * scale, logit_tokens=tok * scale,
                                  ssm_steps=tok * scale)["total"]
    out["teacher"] = (forward_flops(m, tokens=b * c, attn_pairs=b * causal_pairs(c), logit_tokens=b,
                                    scan=[(b, c)] if hyb else ())["total"] if score_teacher else 0.0)
    lt = max(int(thought_len_max), 1)
    if r.shared_prefix:
        g = min(thoughts_per_micro_batch or g_all, g_all)
        chunks = b * math.ceil(g_all / g)  # packed rows: one per context and thought chunk
        s = p + g * (lt - 1)
        pairs_row = causal_pairs(p) + g * ((lt - 1) * p + (lt - 1) * lt / 2)
        fwd = forward_flops(m, tokens=chunks * s, attn_pairs=chunks * pairs_row, logit_tokens=b * g_all * lt,
                            scan=[(chunks, p), (chunks * g, lt - 1)] if hyb else ())
    else:
        fwd = sequence_forward(m, b * g_all, p + lt - 1, logits=False)
        fwd["vocab"] = 2.0 * m.hidden_size * m.vocab_size * b * g_all * lt
        fwd["total"] = sum(v for k, v in fwd.items() if k != "total")
    out["policy"] = _train(fwd, recompute)
    out["total"] = sum(out.values())
    return out


def ntp_flops(m, n, recompute: str = "none") -> dict[str, float]:
    """FLOPs of one NTP (CPT baseline) step: forward + backward of sequences_per_step x seq_len."""
    fwd = sequence_forward(m, n.sequences_per_step, n.seq_len)
    return {"ntp": _train(fwd, recompute), "total": _train(fwd, recompute)}


def ntp_flops_per_token(m, seq_len: int, recompute: str = "none") -> float:
    return _train(sequence_forward(m, 1, seq_len), recompute) / seq_len


def step_flops(cfg, *, thought_len_mean: Optional[float] = None, thought_lens: Optional[Sequence[float]] = None,
               thought_len_max: Optional[int] = None, prompt_tokens: int = 0,
               score_teacher: bool = True) -> dict[str, float]:
    """FLOPs of one optimizer step of ``cfg`` (a RootConfig), by phase, summed over all ranks.

    RLP: pass the decode rows' lengths (``thought_lens``, tokens fed per row, e.g. ``ro.lengths``) or
    their mean (``thought_len_mean``, e.g. ``rlp/thought_len_mean``); ``thought_len_max`` is the longest
    thought of the step (the training forward's padded length; default rlp.thought_max_tokens).
    Returns {'prefill', 'decode', 'teacher', 'policy', 'total'} (RLP) or {'ntp', 'total'} (NTP).
    """
    recompute = getattr(cfg.model, "recompute", "none") or "none"
    if cfg.objective == "ntp":
        return ntp_flops(cfg.model, cfg.ntp, recompute)
    r = cfg.rlp
    if thought_lens is None:
        if thought_len_mean is None:
            raise ValueError("step_flops: an RLP step needs thought_len_mean or thought_lens")
        thought_lens = [float(thought_len_mean)]
    lmax = int(thought_len_max if thought_len_max is not None else r.thought_max_tokens)
    return rlp_phase_flops(cfg.model, r, thought_lens=thought_lens, thought_len_max=lmax,
                           prompt_tokens=prompt_tokens, recompute=recompute,
                           thoughts_per_micro_batch=getattr(r, "thoughts_per_micro_batch", None),
                           score_teacher=score_teacher)


def cpt_equivalent_tokens(n_rollouts: int, l_seq: int, batch: int, iters: int, t_input: float) -> float:
    """The paper's T_flop = n_rollouts * l_seq * batch * iters + T_input (CPT tokens of equal compute)."""
    return float(n_rollouts) * l_seq * batch * iters + float(t_input)


def cpt_equivalent_tokens_of(cfg, iters: int) -> float:
    """T_flop of ``iters`` RLP steps of ``cfg``: l_seq = context_len + thought_max_tokens,
    T_input = contexts_per_step * iters * context_len."""
    r = cfg.rlp
    return cpt_equivalent_tokens(r.group_size, r.context_len + r.thought_max_tokens, r.contexts_per_step,
                                 iters, r.contexts_per_step * iters * r.context_len)


def flop_matched_tokens(cfg, rlp_flops: float) -> float:
    """NTP tokens (ntp.seq_len sequences) that cost ``rlp_flops`` on the same model."""
    recompute = getattr(cfg.model, "recompute", "none") or "none"
    return rlp_flops / ntp_flops_per_token(cfg.model, cfg.ntp.seq_len, recompute)


class FlopMeter:
    """Per-step FLOP metrics for the training loop; every rank computes the same numbers (no collective).

    ``step(seconds, ...)`` returns ``perf/flops_step`` and ``perf/flops_total`` (all GPUs, cumulative over
    the run: checkpoint ``state_dict()``), ``perf/tflops_per_s`` (achieved per GPU), ``perf/mfu`` (with a
    known peak: a CUDA device name in :data:`PEAK_BF16_FLOPS` or ``logging.peak_tflops``) and, for RLP,
    ``perf/cpt_equivalent_tokens`` (the paper's T_flop of the steps so far).
    """

    def __init__(self, cfg, n_gpus: int, device_name: Optional[str] = None):
        self.cfg, self.n_gpus = cfg, n_gpus
        override = getattr(cfg.logging, "peak_tflops", None)
        self.peak = peak_flops(device_name, override) if (device_name or override) else None
        self.flops_total, self.steps = 0.0, 0

    def step(self, seconds: float, **kw) -> dict[str, float]:
        f = step_flops(self.cfg, **kw)["total"]
        self.flops_total += f
        self.steps += 1
        m = {"perf/flops_step": f, "perf/flops_total": self.flops_total,
             "perf/tflops_per_s": f / max(seconds, 1e-9) / self.n_gpus / 1e12}
        u = mfu(f, seconds, self.n_gpus, self.peak)
        if u is not None:
            m["perf/mfu"] = u
        if self.cfg.objective == "rlp":
            m["perf/cpt_equivalent_tokens"] = cpt_equivalent_tokens_of(self.cfg, self.steps)
        return m

    def state_dict(self) -> dict:
        return {"flops_total": self.flops_total, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.flops_total, self.steps = float(d["flops_total"]), int(d["steps"])
