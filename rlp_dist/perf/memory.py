"""Per-GPU memory of an RLP (or NTP) run, by part, from the config's shapes (the `rlp-dist plan` model).

Units: elements times bytes; ``w`` is the compute dtype's size (2 for bf16 on GPU, 4 for fp32 on CPU).
One rank holds a TP shard (1/tp of every matrix; norms replicated) of one pipeline stage's layers
(megatron's split, ``models.builder.pipeline_split``); Psi is that shard's parameter count and dp =
world / (tp * pp). The plan reports the worst stage.

Persistent (the whole run):
    weights       w Psi, or w Psi / dp under ZeRO-3 (PP = 1)
    gradients     ZeRO-0/1: w Psi, plus a full fp32 accumulation buffer 4 Psi at bf16 (DeepSpeed's
                  BF16_Optimizer); ZeRO-2/3: (w + 4 [bf16]) Psi / dp
    optimizer     AdamW m, v (8 Psi) and, at bf16, fp32 masters (4 Psi); / dp for ZeRO >= 1
    ema_teacher   its ZeRO-3 copy partitioned over DP, w Psi / dp, plus fp32 masters 4 Psi / dp at bf16
                  (in fp32 the shard is its own master)
Rollout phase (the decode of one micro-batch: R = contexts_per_micro_batch * G rows):
    rollout_weights   ZeRO-3 gathers the stage's full shard once per rollout: w Psi
    kv_cache          2 (K and V) R (P + L + 1) (groups / tp) d w per attention layer
    mamba_states      R [(K - 1)(i + 2 ng n) / tp w  +  (h / tp) p n 4 (fp32 SSM state)] per Mamba layer
    decode_workspace  R V/tp 4 x 3 (fp32 logits, probabilities, cumulative sum for sampling) plus one
                      layer's prefill temporaries of the micro-batch's contexts
Training phase (one policy-gradient micro-batch, forward + backward; b = contexts_per_micro_batch
packed rows of S = P + g(L-1) tokens, g = rlp.thoughts_per_micro_batch or G; replicated instead — b g
rows of P + L - 1 — with rlp.shared_prefix=false, or at PP > 1 with several contexts per document):
    zero3_gather      ZeRO-3: the largest layer and the output layer gathered: w (Psi_layer + Psi_out)
    layer_grads       one layer's fresh weight gradients before they are accumulated (or reduce-
                      scattered under ZeRO-2/3): w Psi_layer (short-lived: not seen by the CPU calibration)
    activations       per layer, elements per token (Korthikanti et al. 2022 adapted: RMSNorm, GQA,
                      SwiGLU or squared ReLU, no dropout, memory-efficient attention: no S^2 term):
                        attention  3H + [(a + 2g) + 2(a + g) qk_norm + (a + g) rope + 2a] d / tp
                        MLP        3H + (4F SwiGLU | 3F squared ReLU) / tp
                        Mamba2     3H + [2(2i + 2ng n + h) + 3(i + 2ng n) + 6i] / tp (+ fp32 dt, states)
                      times b S w, plus the branch attention's per-thought [prefix ; own thought] K/V
                      copies (SDPA inputs): 2 b g (P + L) (groups / tp) d w per attention layer, and for
                      Mamba layers the G forked fp32 initial states b g (h/tp) p n 4. Recompute: 'none'
                      keeps every layer; 'selective' drops the core-attention internals (the K/V copies,
                      score tensors); 'full' keeps each layer's input b S H w plus one layer's activations.
                      The backward holds one more layer's worth (activation gradients). At PP > 1 the
                      first stage keeps min(pp, micro-batches) micro-batches in flight (1F1B).
    logprob           the fused, token-chunked op (kernels/logprob): the selected hidden states and their
                      gradient 2 b g L H w, about three fp32 chunks of logits C V/tp 4 (C = 256 MiB /
                      (4 V/tp) rows, at most b g L), and the fp32 output-weight gradient V/tp H 4
                      (+ its cast V/tp H w at bf16). The reference path (``path="logits"``, today's
                      ``policy_logits`` + ``token_logprobs``) holds instead (N, L, V/tp) logits in w and about
                      three fp32 copies (tempered logits / log-softmax / their gradients). The part
                      reported is what the output layer adds to the activations' peak at its worst
                      moment: max(0, saved + workspace - activations, end - activations), the first
                      during the op's backward (all forward activations still saved, no layer
                      gradients yet), the second at the end of the backward, with the activations
                      freed, when the output layer's dense weight gradient V/tp H w meets the embedding's:
                      dense V/tp H w untied (or at PP > 1, on the first stage), the looked-up rows b S H w
                      (a sparse gradient added into it in place: models/head.TiedEmbedding) when tied at
                      PP = 1 (the CPU peak at V=151936 at small shapes).
The teacher's no-think forward is far smaller than either phase (no gradients, one layer at a time).

peak = persistent + max(rollout, training). ``fits`` asks peak <= gpu_mem * (1 - 0.10) - 2 GB: 10% for
allocator fragmentation and 2 GB for the CUDA context, NCCL and DeepSpeed buffers (``MARGIN``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

GB = 1e9
MARGIN_FRAC, MARGIN_GB = 0.10, 2.0
LOGPROB_CHUNK_BYTES = 256 * 2**20  # kernels/logprob/reference.CHUNK_BYTES


@dataclass(frozen=True)
class Layout:
    """What the plan varies: parallel sizes, ZeRO, dtype, recompute and the micro-batch shape."""

    world: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 3
    dtype_bytes: int = 2
    recompute: str = "none"  # none | selective | full
    contexts_per_micro_batch: int = 1
    thoughts_per_micro_batch: int = 0  # 0: all G
    path: str = "fused"  # fused (hidden states -> fused log-prob, SDPA branches) | logits (reference)

    @property
    def dp(self) -> int:
        return max(self.world // (self.tp * self.pp), 1)


def layout_from_config(cfg, world: int, dtype_bytes: Optional[int] = None) -> Layout:
    r = cfg.rlp
    return Layout(world=world, tp=cfg.parallel.tp, pp=cfg.parallel.pp, zero_stage=cfg.parallel.zero_stage,
                  dtype_bytes=dtype_bytes or (2 if cfg.train.dtype == "bf16" else 4),
                  recompute=getattr(cfg.model, "recompute", "none") or "none",
                  contexts_per_micro_batch=min(r.contexts_per_micro_batch, max(r.contexts_per_step // max(
                      world // (cfg.parallel.tp * cfg.parallel.pp), 1), 1)),
                  thoughts_per_micro_batch=getattr(r, "thoughts_per_micro_batch", 0) or 0)


# ---- parameters ------------------------------------------------------------------------------------
def layer_params(m, kind: str, tp: int) -> float:
    """Parameters of one layer on one TP rank ('T' GPT layer, or the hybrid's 'M' / '*' / '-')."""
    hid, f, a, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    n = 0.0
    if kind in "T*":
        n += hid * (a + 2 * g) * d / tp + a * d * hid / tp + hid + (2 * d if m.qk_layernorm else 0)
    if kind in "T-":
        n += (3 if m.activation == "swiglu" else 2) * hid * f / tp + hid
    if kind == "M":
        h, p, ng, s, k = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim, m.mamba_conv_kernel
        i = h * p
        conv = i + 2 * ng * s
        n += (hid * (2 * i + 2 * ng * s + h) + conv * (k + 1) + 3 * h + i + i * hid) / tp + hid
    return n


def stage_layers(m, pp: int) -> list[list[str]]:
    """The layer kinds on each pipeline stage, as megatron splits them."""
    from rlp_dist.models.builder import pipeline_split
    from rlp_dist.perf.flops import layer_kinds

    kinds = layer_kinds(m)
    if pp <= 1:
        return [kinds]
    split = pipeline_split(m.num_layers, pp)
    if not split:
        counts = [m.num_layers // pp] * pp
    else:
        first, last = split["num_layers_in_first_pipeline_stage"], split["num_layers_in_last_pipeline_stage"]
        counts = [first] + [(m.num_layers - first - last) // (pp - 2)] * (pp - 2) + [last]
    out, at = [], 0
    for c in counts:
        out.append(kinds[at:at + c])
        at += c
    return out


def stage_params(m, tp: int, pp: int, stage: int) -> float:
    layers = stage_layers(m, pp)[stage]
    n = sum(layer_params(m, k, tp) for k in layers)
    emb = m.vocab_size * m.hidden_size / tp
    if stage == 0:
        n += emb
    if stage == pp - 1:
        n += m.hidden_size  # final norm
        if not m.tie_embeddings or pp > 1:  # tied at PP > 1: the last stage keeps its own copy
            n += emb
    return n


def total_params(m) -> float:
    return stage_params(m, 1, 1, 0)


# ---- activations -----------------------------------------------------------------------------------
def _per_token(m, kind: str, tp: int) -> float:
    """Elements kept for backward per token by one layer (see the module docstring)."""
    hid, f, a, g, d = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.num_query_groups, m.kv_channels
    e = 0.0
    if kind in "T*":
        rope = m.position_embedding == "rope"
        e += 3 * hid + ((a + 2 * g) + 2 * (a + g) * m.qk_layernorm + (a + g) * rope + 2 * a) * d / tp
    if kind in "T-":
        e += 3 * hid + (4 if m.activation == "swiglu" else 3) * f / tp
    if kind == "M":
        h, p, ng, s = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
        i = h * p
        e += 3 * hid + (2 * (2 * i + 2 * ng * s + h) + 3 * (i + 2 * ng * s) + 6 * i + 2 * h) / tp
    return e


def _branch_extra(m, kind: str, lay: Layout, p: int, g: int, big_l: int) -> float:
    """Bytes per packed row of one layer's core-attention internals / Mamba forked states."""
    if kind in "T*":
        kv = 2 * g * (p + big_l) * (m.num_query_groups / lay.tp) * m.kv_channels * lay.dtype_bytes
        if lay.path == "logits":  # the reference's dense branch scores: exp of (g, heads, T, P + T) kept
            kv += g * (m.num_attention_heads / lay.tp) * (big_l - 1) * (p + big_l - 1) * lay.dtype_bytes
        return kv
    if kind == "M":
        return g * (m.mamba_num_heads / lay.tp) * m.mamba_head_dim * m.mamba_state_dim * 4
    return 0.0


def policy_activations(m, lay: Layout, layers: list[str], p: int, g: int, big_l: int,
                       backward: bool = True) -> float:
    """Bytes of one policy micro-batch's activations on a stage: those saved by the forward, plus (with
    ``backward``) what the layers' backward holds on top: one layer's activation gradients, and with
    full recompute the recomputed layer as well."""
    b, w = lay.contexts_per_micro_batch, lay.dtype_bytes
    s = p + g * (big_l - 1)
    per_layer = [b * s * _per_token(m, k, lay.tp) * w + b * _branch_extra(m, k, lay, p, g, big_l) for k in layers]
    if not per_layer:
        return 0.0
    core = [b * _branch_extra(m, k, lay, p, g, big_l) if k in "T*" else 0.0 for k in layers]
    final_norm = 3 * b * s * m.hidden_size * w
    if lay.recompute == "full":
        saved, extra = len(layers) * b * s * m.hidden_size * w, 2 * max(per_layer)
    elif lay.recompute == "selective":
        saved, extra = sum(x - c for x, c in zip(per_layer, core)), max(per_layer)
    else:
        saved, extra = sum(per_layer), max(per_layer)
    return saved + final_norm + (extra if backward else 0.0)


def policy_peak_parts(m, lay: Layout, layers: list[str], p: int, g: int, big_l: int, last_stage: bool,
                      stage: int, replicated: bool = False) -> tuple[float, float]:
    """(activations, logprob) bytes such that their sum is the training peak of one micro-batch: the
    larger of the layers' backward (activations), the log-prob op's backward (the forward's saved
    activations + its workspace) and the end of the backward (the output/embedding gradients)."""
    if replicated:  # b*g rows of [prefix | thought], no branch copies
        rows = replace(lay, contexts_per_micro_batch=lay.contexts_per_micro_batch * g)
        args, ws = (rows, layers, p + big_l - 1, 0, 1), logprob_workspace(m, rows, 1, big_l, last_stage, s=p + big_l - 1)
    else:
        args, ws = (lay, layers, p, g, big_l), logprob_workspace(m, lay, g, big_l, last_stage, s=p + g * (big_l - 1))
    act = policy_activations(m, *args)
    saved = policy_activations(m, *args, backward=False)
    tokens = lay.contexts_per_micro_batch * (g if replicated else 1) * (p + (1 if replicated else g) * (big_l - 1))
    return act, max(0.0, saved + ws - act, output_grads_end(m, lay, stage, tokens) - act)


def output_grads_end(m, lay: Layout, stage: int, tokens: float = 0.0) -> float:
    """Bytes alive at the end of the backward, when the activations are freed. Tied at PP = 1: the
    output layer's dense gradient and the embedding's sparse one (``tokens`` looked-up rows of H values and
    an int64 index: models/head.TiedEmbedding), added into it in place (at ZeRO-3: two dense ones). Otherwise the first stage's
    dense embedding gradient and the last stage's output-layer gradient."""
    one = m.vocab_size / lay.tp * m.hidden_size * lay.dtype_bytes
    first, last = stage == 0, stage == lay.pp - 1
    if m.tie_embeddings and lay.pp == 1:
        if lay.zero_stage == 3:  # a partitioned weight is not routed: the rows are summed out of place
            return 2 * one
        return one + tokens * (m.hidden_size * lay.dtype_bytes + 8)
    return one if (first or last) else 0.0


def logprob_workspace(m, lay: Layout, g: int, big_l: int, last_stage: bool = True,
                      s: Optional[int] = None) -> float:
    """Bytes of turning the last stage's outputs into log-probs of the b*g*L thought tokens (fwd + bwd)."""
    if not last_stage:
        return 0.0
    b, w, v = lay.contexts_per_micro_batch, lay.dtype_bytes, m.vocab_size / lay.tp
    tokens = b * g * big_l
    if lay.path == "logits":
        rows = b * (s if s is not None else g * big_l)  # the model's (b, S, V/tp) output and its gradient
        return tokens * v * (w + 3 * 4) + rows * v * w
    chunk = min(max(16, LOGPROB_CHUNK_BYTES // (4 * v) // 16 * 16), tokens)
    grad_w = v * m.hidden_size * (4 + (w if w != 4 else 0))
    return 2 * tokens * m.hidden_size * w + 3 * chunk * v * 4 + grad_w


# ---- the plan ----------------------------------------------------------------------------------------
def prefix_len(cfg, prompt_tokens: int = 0) -> int:
    return cfg.rlp.context_len + prompt_tokens + 1


def persistent(m, lay: Layout, stage: int, ema: bool = True) -> dict[str, float]:
    psi = stage_params(m, lay.tp, lay.pp, stage)
    w, dp, z = lay.dtype_bytes, lay.dp, lay.zero_stage
    bf16 = w != 4
    out = {"weights": w * psi / (dp if z == 3 else 1)}
    out["gradients"] = (w + 4 * bf16) * psi / dp if z >= 2 else (w + 4 * bf16) * psi
    out["optimizer"] = (8 + 4 * bf16) * psi / (dp if z >= 1 else 1)
    if ema:
        out["ema_teacher"] = (w + 4 * bf16) * psi / dp
    return out


def rollout_phase(cfg, lay: Layout, stage: int, prompt_tokens: int = 0) -> dict[str, float]:
    m, r = cfg.model, cfg.rlp
    layers = stage_layers(m, lay.pp)[stage]
    rows = lay.contexts_per_micro_batch * r.group_size
    p, big_l, w = prefix_len(cfg, prompt_tokens), r.thought_max_tokens, lay.dtype_bytes
    n_attn, n_m = sum(k in "T*" for k in layers), sum(k == "M" for k in layers)
    out = {"rollout_weights": w * stage_params(m, lay.tp, lay.pp, stage) if lay.zero_stage == 3 else 0.0}
    out["kv_cache"] = 2 * rows * (p + big_l + 1) * (m.num_query_groups / lay.tp) * m.kv_channels * w * n_attn
    if n_m:
        h, hd, ng, s = m.mamba_num_heads, m.mamba_head_dim, m.mamba_num_groups, m.mamba_state_dim
        conv = (h * hd + 2 * ng * s) / lay.tp
        out["mamba_states"] = rows * n_m * ((m.mamba_conv_kernel - 1) * conv * w + h / lay.tp * hd * s * 4)
    else:
        out["mamba_states"] = 0.0
    widest = max(2 * m.ffn_hidden_size, 2 * (m.mamba_num_heads or 0) * (m.mamba_head_dim or 0)) / lay.tp
    out["decode_workspace"] = (rows * m.vocab_size / lay.tp * 4 * 3
                               + lay.contexts_per_micro_batch * p * (widest + 4 * m.hidden_size) * w)
    return out


def training_phase(cfg, lay: Layout, stage: int, prompt_tokens: int = 0,
                   thought_len: Optional[int] = None) -> dict[str, float]:
    m, r = cfg.model, cfg.rlp
    layers = stage_layers(m, lay.pp)[stage]
    p, big_l = prefix_len(cfg, prompt_tokens), thought_len or r.thought_max_tokens
    g = min(lay.thoughts_per_micro_batch or r.group_size, r.group_size)
    w, out = lay.dtype_bytes, {}
    biggest = max((layer_params(m, k, lay.tp) for k in layers), default=0.0)
    out["zero3_gather"] = w * (biggest + m.vocab_size * m.hidden_size / lay.tp) if lay.zero_stage == 3 else 0.0
    out["layer_grads"] = w * biggest  # a layer's fresh weight gradients before they are accumulated/reduced
    micro = r.contexts_per_step // lay.dp // max(lay.contexts_per_micro_batch, 1) * r.group_size // g
    in_flight = min(lay.pp - stage, max(micro, 1)) if lay.pp > 1 else 1
    packed = r.shared_prefix and not (lay.pp > 1 and r.contexts_per_document > 1)  # as train.PolicyGradient
    act, lp = policy_peak_parts(m, lay, layers, p, g, big_l, stage == lay.pp - 1, stage, replicated=not packed)
    out["activations"], out["logprob"] = in_flight * act, lp
    return out


def ntp_phase(cfg, lay: Layout, stage: int) -> dict[str, float]:
    """Training phase of an NTP step: ntp.sequences_per_micro_batch rows of ntp.seq_len tokens."""
    m, n = cfg.model, cfg.ntp
    layers = stage_layers(m, lay.pp)[stage]
    seq = n.seq_len
    nl = replace(lay, contexts_per_micro_batch=n.sequences_per_micro_batch, thoughts_per_micro_batch=1)
    biggest = max((layer_params(m, k, lay.tp) for k in layers), default=0.0)
    w = lay.dtype_bytes
    out = {"zero3_gather": w * (biggest + m.vocab_size * m.hidden_size / lay.tp) if lay.zero_stage == 3 else 0.0,
           "layer_grads": w * biggest}
    # a plain sequence is a packed row with no thoughts: S = seq, no branch copies
    fused = replace(nl, path="fused")  # a plain sequence is a packed row without thoughts: S = seq
    act = policy_activations(m, fused, layers, seq, 0, 1)
    saved = policy_activations(m, fused, layers, seq, 0, 1, backward=False)
    ws = logprob_workspace(m, nl, seq, 1, stage == lay.pp - 1)  # logits of every position
    out["activations"] = act * (min(lay.pp - stage, 8) if lay.pp > 1 else 1)
    out["logprob"] = max(0.0, saved + ws - act, output_grads_end(m, nl, stage, n.sequences_per_micro_batch * seq) - act)
    return out


def stage_memory(cfg, lay: Layout, stage: int, prompt_tokens: int = 0) -> dict:
    """{'parts': {name: bytes}, 'persistent', 'rollout', 'training', 'peak'} for one pipeline stage."""
    rlp = cfg.objective == "rlp"
    pers = persistent(cfg.model, lay, stage, ema=rlp)
    roll = rollout_phase(cfg, lay, stage, prompt_tokens) if rlp else {}
    train = training_phase(cfg, lay, stage, prompt_tokens) if rlp else ntp_phase(cfg, lay, stage)
    sp, sr, st = sum(pers.values()), sum(roll.values()), sum(train.values())
    return {"parts": {**pers, **roll, **train}, "persistent": sp, "rollout": sr, "training": st,
            "peak": sp + max(sr, st), "stage": stage}


def plan_memory(cfg, lay: Layout, prompt_tokens: int = 0) -> dict:
    """The worst pipeline stage's memory (bytes), see :func:`stage_memory`."""
    stages = [stage_memory(cfg, lay, s, prompt_tokens) for s in range(lay.pp)]
    return max(stages, key=lambda d: d["peak"])


def budget_bytes(gpu_mem_gb: float) -> float:
    """Usable bytes of a GPU of ``gpu_mem_gb`` after the fragmentation/workspace margin."""
    return (gpu_mem_gb * (1 - MARGIN_FRAC) - MARGIN_GB) * GB
