"""A fast cached forward for the megatron-core GPTModel that trains: prefill and one-token decode steps.

Same parameters, same math, a leaner program. It walks the live modules of this rank's shard
(``model.decoder.layers[i].self_attention.linear_qkv.weight`` ...) and evaluates the local-spec
Transformer layer directly with torch ops; nothing is copied to a separate engine, so a step of the
optimizer is seen by the next rollout. Per layer, for hidden x (N, S, H):

    h = RMSNorm(x);  q, k, v = split_groups(h W_qkv)            megatron's [q_1..q_hpg, k, v] per group
    q, k = RoPE(QKNorm(q), pos), RoPE(QKNorm(k), pos)
    K[:, :, pos], V[:, :, pos] = k, v                         keys cached ALREADY rotated
    a = softmax(q K^T / sqrt(d)) V                            one SDPA call, grouped heads without copies
    x = x + a W_o  (+ all-reduce over tp);  x = x + MLP(RMSNorm(x))  (+ all-reduce over tp)

Departures from megatron-core's ``StaticInferenceContext`` path (STACK.md, "Decoding speed"), all of
them exact rewrites, checked against the stock ``model(...)`` forward by tests/rlp/test_rollout.py:
- keys are stored rotated once, instead of re-rotating the whole cache every step;
- a decode query of one token has the layout (N, groups, heads_per_group, d): the heads of a group are
  the "query rows" of one SDPA against that group's (N, groups, t, d) cache, so grouped-query
  attention reads the cache in place (no ``repeat_interleave`` of K/V);
- the cache is preallocated (N, groups, T, d) per layer: a write is an indexed copy, never a ``cat``;
- no autograd functions, autocast decorators or group look-ups per layer (the ~1 ms/layer overhead);
- rows can be dropped (``keep``) so finished sequences stop costing compute.

Tensor parallelism: column-parallel weights are applied locally (their input is replicated),
row-parallel outputs and the vocab-parallel embedding are all-reduced over the TP group — the same
collectives megatron issues. The logits stay vocab-parallel (N, V/tp).

ZeRO-3: partitioned parameters are gathered once for the whole rollout (``gathered``) rather than
per forward (which is what the stock path costs: one all-gather per layer per token).

The stage-decoder contract (what :func:`rlp_dist.rlp.rollout._decode_loop` drives, directly at PP=1 or
through :class:`rlp_dist.rlp.pipeline_decode.PipelineDecoder` at PP>1; :class:`CachedDecoder` and the
hybrid's ``HybridDecoder`` implement it). A decoder serves this rank's pipeline stage, flagged by
``pre_process`` (it holds the embedding) and ``post_process`` (it holds the final norm and output
layer), megatron's names:

    prefill(x, repeats) -> y    x: ids (B, P) on a pre_process stage, else hidden (B, P, H)
                                y: (B, V/tp) logits of the last position on a post_process stage,
                                   else hidden (B, P, H) of every position (the next stage forks its
                                   own cache); the stage's own cache is forked ``repeats`` ways
    step(x) -> y                x: tokens (N,) on a pre_process stage, else hidden (N, 1, H)
                                y: (N, V/tp) logits on a post_process stage, else hidden (N, 1, H)
    keep(rows)                  keep cache rows ``rows`` (N_kept,), in that order; drop the others

Hidden states between stages are batch-first (N, S, H), the residual stream *before* the final norm.
megatron's GPTModel exchanges the same tensor sequence-first: a stage without ``post_process``
returns ``hidden_states`` [S, B, H], and one without ``pre_process`` takes it through
``set_input_tensor`` [S, B, H]; ours is its ``transpose(0, 1)``. Logits are vocab-parallel (this TP
rank's slice); a decoder that returns the full vocabulary sets ``vocab_parallel = False``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class _Layer:
    ln1: torch.Tensor
    w_qkv: torch.Tensor
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]
    w_proj: torch.Tensor
    ln2: torch.Tensor
    w_fc1: torch.Tensor
    w_fc2: torch.Tensor


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Materialise ZeRO-3 partitioned parameters for the duration of a rollout (a no-op otherwise).

    One all-gather per parameter over the data-parallel group, instead of one per forward call.
    Memory: this rank's full TP/PP shard of the weights while the rollout runs.
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def supports(model: torch.nn.Module) -> bool:
    """True for the local-spec GPTModel this program implements (RMSNorm, RoPE or none, no biases,
    whole KV groups per TP rank), on any pipeline stage; other models take the stock megatron engine.
    Decided from the config and the layer spec only, so every stage of a pipeline answers the same."""
    from megatron.core.models.gpt import GPTModel

    if not isinstance(model, GPTModel):
        return False
    c = model.config
    rope = model.position_embedding_type
    rope_ok = rope == "none" or (rope == "rope" and not c.rotary_interleaved)
    return (c.normalization == "RMSNorm" and not c.add_bias_linear and not c.add_qkv_bias and rope_ok
            and not c.multi_latent_attention and c.num_query_groups >= c.tensor_model_parallel_size
            and all(isinstance(layer.input_layernorm, torch.nn.RMSNorm) for layer in model.decoder.layers))


class CachedDecoder:
    """Prefill + one-token decode over a preallocated, rotated KV cache for this rank's GPTModel shard
    (any pipeline stage: see the stage-decoder contract in the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_len: int, tp_group=None):
        c = model.config
        self.tp_group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        tp = 1 if self.tp_group is None else dist.get_world_size(self.tp_group)
        if c.num_query_groups < tp:
            raise ValueError(f"cached decode needs num_query_groups={c.num_query_groups} >= tp={tp}")
        self.heads = c.num_attention_heads // tp
        self.groups = c.num_query_groups // tp
        self.hpg = self.heads // self.groups
        self.d = c.kv_channels
        self.eps = c.layernorm_epsilon
        self.gated = c.gated_linear_unit
        self.act = c.activation_func
        self.pre_process, self.post_process = model.pre_process, model.post_process
        self.layers = [self._collect(layer) for layer in model.decoder.layers]
        self.embedding = model.embedding.word_embeddings if self.pre_process else None
        self.final_norm = self.out_w = None
        if self.post_process:
            self.final_norm = self._final_norm(model).weight
            # Tied embeddings at PP>1: the last stage holds its own copy of the embedding as
            # output_layer.weight (megatron keeps the copies equal: equal at init, gradients all-reduced
            # over the embedding group), and shared_embedding_or_output_weight() returns that copy there.
            tied = model.share_embeddings_and_output_weights
            self.out_w = model.shared_embedding_or_output_weight() if tied else model.output_layer.weight
        self.max_len = max_len
        self.cos = self.sin = None
        if model.position_embedding_type == "rope":  # every stage has rotary_pos_emb (no parameters)
            freqs = model.rotary_pos_emb(max_len)[:, 0, 0]  # (T, d): megatron's own frequency table
            if freqs.shape[-1] != self.d:
                raise ValueError("cached decode implements full-dimension RoPE only (rotary_percent=1)")
            dtype = next(model.parameters()).dtype
            self.cos, self.sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0

    @staticmethod
    def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
        return model.decoder.final_layernorm

    @staticmethod
    def _collect(layer) -> _Layer:
        att, mlp = layer.self_attention, layer.mlp
        return _Layer(layer.input_layernorm.weight, att.linear_qkv.weight,
                      att.q_layernorm.weight if att.q_layernorm is not None else None,
                      att.k_layernorm.weight if att.k_layernorm is not None else None,
                      att.linear_proj.weight, layer.pre_mlp_layernorm.weight,
                      mlp.linear_fc1.weight, mlp.linear_fc2.weight)

    # ---- pieces -----------------------------------------------------------------------------------
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:  # row-parallel partial sums (megatron's reduce_from_tp_region)
            dist.all_reduce(x, group=self.tp_group)
        return x

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = t.shape[-1] // 2
        rot = torch.cat((-t[..., half:], t[..., :half]), dim=-1)
        return t * cos + rot * sin

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        if self.tp_group is None:
            return F.embedding(ids, e.weight)
        outside = (ids < e.vocab_start_index) | (ids >= e.vocab_end_index)
        local = (ids - e.vocab_start_index).masked_fill(outside, 0)
        x = F.embedding(local, e.weight).masked_fill(outside[..., None], 0.0)
        return self._all_reduce(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H) final hidden -> (N, V/tp) vocab-parallel logits."""
        return F.linear(self._norm(x, self.final_norm), self.out_w)

    def stage_input(self, x: torch.Tensor, s: int) -> torch.Tensor:
        """What this stage was fed -> its (N, s, H) input hidden: ids (N, s) (or tokens (N,) when s=1)
        are embedded on the first stage; later stages are fed the previous stage's hidden."""
        if self.pre_process:
            if x.dtype != torch.long:
                raise ValueError(f"the first pipeline stage takes token ids, got {x.dtype} {tuple(x.shape)}")
            return self.embed(x.view(x.shape[0], s))
        if x.dim() != 3 or x.shape[1] != s:
            raise ValueError(f"a stage without pre_process takes the previous stage's hidden (N, {s}, H), "
                             f"got {tuple(x.shape)}; drive it with pipeline_decode.PipelineDecoder")
        return x

    def stage_output(self, x: torch.Tensor, ends: Optional[torch.Tensor] = None,
                     row_ends: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S, H) hidden -> logits on the last stage: of the last position (B, V/tp), or with ``ends``
        (k,) of each position ends[j] - 1, row b*k + j: (B*k, V/tp), or with ``row_ends`` (B,) of row b's
        position row_ends[b] - 1: (B, V/tp). Earlier stages hand on (B, S, H)."""
        if not self.post_process:
            return x
        if row_ends is not None:
            return self.logits(x[torch.arange(x.shape[0], device=x.device), row_ends - 1])  # (B, V/tp)
        if ends is None:
            return self.logits(x[:, -1])
        return self.logits(x[:, ends - 1].reshape(-1, x.shape[-1]))  # (B*k, H) -> (B*k, V/tp)

    def _fork(self, b: int, p: int, repeats: int, branches: Optional[Sequence[int]], device,
              lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Set up the rows of a prefill of B sequences of P positions; returns the source sequence of
        each cache row (N,). Without branches row b*repeats + i copies sequence b and continues at P.
        With branches (t_0 < .. < t_{k-1} = P) row (b*k + j)*repeats + i copies sequence b's prefix
        [0, t_j) and continues at t_j: several contexts of one document share its prefill. With
        ``lengths`` (B,) (right-padded sequences of their own lengths, one context each) row
        b*repeats + i copies sequence b's [0, lengths[b]) and continues there; the padding's cache
        entries lie after the row's position, masked, and are overwritten as the row decodes."""
        self.row_ends = None
        if lengths is not None:
            if branches is not None:
                raise ValueError("prefill: pass branches (several contexts per document) or lengths, not both")
            if lengths.shape != (b,) or bool(((lengths < 1) | (lengths > p)).any()):
                raise ValueError(f"prefill lengths must be (B,) = ({b},) in [1, {p}], got {lengths.tolist()}")
            self.row_ends = lengths.to(device=device, dtype=torch.long)
            self.ends_list, self.ends = [p], torch.tensor([p], device=device)
            self.pos = self.row_ends.repeat_interleave(repeats)  # (N,): each row's next position
            self.uniform, self.length = False, p
            self.context_of_row = torch.arange(b, device=device).repeat_interleave(repeats)  # (N,)
            return self.context_of_row
        ends = [p] if branches is None else [int(t) for t in branches]
        if not all(0 < a < c for a, c in zip(ends, ends[1:])) or ends[0] < 1 or ends[-1] != p:
            raise ValueError(f"branch points {ends} must increase from >= 1 and end at the prefilled length {p}")
        k = len(ends)
        self.ends_list = ends  # host copy: the hybrid's segmented scan slices at these points
        self.ends = torch.tensor(ends, device=device)
        self.pos = self.ends.repeat_interleave(repeats).repeat(b)  # (N,): each row's next position
        self.uniform = k == 1  # all rows at one position: slices and no mask in the decode step
        self.length = p  # = max(pos): the cache prefix in use
        self.context_of_row = torch.arange(b * k, device=device).repeat_interleave(repeats)  # (N,): b*k + j
        return self.context_of_row // k  # (N,): the source sequence b

    def _mlp(self, x: torch.Tensor, lw: _Layer) -> torch.Tensor:
        h = F.linear(self._norm(x, lw.ln2), lw.w_fc1)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # megatron's fc1 rows: [gate | up] on every TP rank
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return x + self._all_reduce(F.linear(h, lw.w_fc2))

    def _qkv(self, x: torch.Tensor, lw: _Layer, pos):
        """(N, S, H) -> q (N, S, groups, hpg, d), k and v (N, S, groups, d), RoPE applied at ``pos``: a
        slice of S positions shared by all rows, or (N,) one position per row (S = 1)."""
        n, s, _ = x.shape
        qkv = F.linear(self._norm(x, lw.ln1), lw.w_qkv).view(n, s, self.groups, self.hpg + 2, self.d)
        q, k, v = qkv[..., : self.hpg, :], qkv[..., self.hpg, :], qkv[..., self.hpg + 1, :]
        if lw.q_norm is not None:
            q = self._norm(q, lw.q_norm)
        if lw.k_norm is not None:
            k = self._norm(k, lw.k_norm)
        if self.cos is not None:
            if isinstance(pos, slice):
                cos, sin = self.cos[pos][None, :, None], self.sin[pos][None, :, None]  # (1, S, 1, d)
            else:
                cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # (N, 1, 1, d)
            q = self._rope(q, cos[:, :, :, None], sin[:, :, :, None])
            k = self._rope(k, cos, sin)
        return q, k, v

    # ---- cache ------------------------------------------------------------------------------------
    def prefill(self, x: torch.Tensor, repeats: int = 1, branches: Optional[Sequence[int]] = None,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run B prompts of P tokens, cache their K/V forked ``repeats`` ways.

        x: ids (B, P) on the first stage, else hidden (B, P, H). Returns (B, V/tp) logits of the last
        position on the last stage, else hidden (B, P, H). Row b*repeats + i of the cache is a copy of
        prompt b (``repeat_interleave`` order). With ``branches`` (t_0 < .. < t_{k-1} = P) the B
        sequences are documents and each holds k contexts [0, t_j): row (b*k + j)*repeats + i continues
        context j of document b, and the last stage returns the (B*k, V/tp) logits at t_j - 1. With
        ``lengths`` (B,) the B prompts are right-padded, row b real up to lengths[b]: its logits are read
        at lengths[b] - 1 and it decodes on from there.
        """
        b, p = x.shape[:2]
        x = self.stage_input(x, p)  # (B, P, H)
        src = self._fork(b, p, repeats, branches, x.device, lengths)  # (N,) source document of each row
        self.k = [self._cache(src.numel(), x) for _ in self.layers]
        self.v = [self._cache(src.numel(), x) for _ in self.layers]
        for i, lw in enumerate(self.layers):
            x = self._attention_prefill(x, lw, i, src)
            x = self._mlp(x, lw)
        return self.stage_output(x, None if branches is None else self.ends, self.row_ends)  # (B[*k], V/tp) | (B, P, H)

    def _cache(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """A (N, groups, T, d) K or V buffer. Rows at their own positions (branches) attend under a mask
        over entries some rows never write: zeros there, since masked weights are 0 but 0 * NaN of
        uninitialised memory is not."""
        alloc = torch.empty if self.uniform else torch.zeros
        return alloc(n, self.groups, self.max_len, self.d, dtype=x.dtype, device=x.device)

    def _attention_prefill(self, x: torch.Tensor, lw, i: int, src: torch.Tensor) -> torch.Tensor:
        """Causal attention over (B, P, H); K/V written into cache rows from their source row ``src``."""
        b, p, _ = x.shape
        q, k, v = self._qkv(x, lw, slice(0, p))
        q = q.reshape(b, p, self.heads, self.d).transpose(1, 2)  # (B, heads, P, d)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, groups, P, d)
        self.k[i][:, :, :p] = k.index_select(0, src)  # the fork: every row gets its document's keys
        self.v[i][:, :, :p] = v.index_select(0, src)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, heads, P, d)
        return x + self._all_reduce(F.linear(a.transpose(1, 2).reshape(b, p, self.heads * self.d), lw.w_proj))

    def _row_positions(self, rows: slice, n: int, device):
        """Per step, for rows at their own positions (branches): (row index (n,), position (n,),
        attention mask (n, 1, 1, T)); None when every row is at one position."""
        if self.uniform:
            return None
        pos = self.pos[rows]  # (n,)
        mask = (torch.arange(self.length + 1, device=device) <= pos[:, None])[:, None, None]
        return torch.arange(n, device=device), pos, mask

    def _attention_step(self, x: torch.Tensor, lw, i: int, rows: slice, at=None) -> torch.Tensor:
        """One position per row (n, 1, H) of cache rows ``rows`` against the cache: rows at one shared
        position use slices; rows at their own positions (branches; ``at`` from :meth:`_row_positions`,
        built once per step) write with an index and attend under a mask. Writes go through views."""
        n, t = x.shape[0], self.length
        kc, vc = self.k[i][rows], self.v[i][rows]  # (n, groups, T, d) views
        if at is None:
            q, k, v = self._qkv(x, lw, slice(t, t + 1))
            kc[:, :, t] = k[:, 0]
            vc[:, :, t] = v[:, 0]
            mask = None
        else:
            r, pos, mask = at
            q, k, v = self._qkv(x, lw, pos)
            kc[r, :, pos] = k[:, 0]  # (n, groups, d) at each row's own position
            vc[r, :, pos] = v[:, 0]
        q = q[:, 0]  # (n, groups, hpg, d): a group's heads are the query rows against its keys
        a = F.scaled_dot_product_attention(q, kc[:, :, : t + 1], vc[:, :, : t + 1], attn_mask=mask)
        return x + self._all_reduce(F.linear(a.reshape(n, 1, self.heads * self.d), lw.w_proj))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Feed one position per row (at ``self.pos``): tokens (N,) on the first stage, else hidden
        (N, 1, H). Returns (N, V/tp) logits on the last stage, else hidden (N, 1, H)."""
        y = self.step_rows(x, slice(None))
        self.advance()
        return y

    def step_rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """:meth:`step` for the cache rows ``rows`` only (a pipeline feeds a step's rows in
        micro-batches); positions move on once every row has been fed (:meth:`advance`)."""
        if self.length >= self.max_len:
            raise ValueError(f"decode past the preallocated cache length {self.max_len}")
        x = self.stage_input(x, 1)  # (n, 1, H)
        at = self._row_positions(rows, x.shape[0], x.device)
        for i, lw in enumerate(self.layers):
            x = self._attention_step(x, lw, i, rows, at)
            x = self._mlp(x, lw)
        return self.stage_output(x)  # (n, V/tp) or (n, 1, H)

    def advance(self) -> None:
        self.length += 1
        self.pos = self.pos + 1

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every cached row not in ``rows`` (N_kept,) so later steps cost only the kept rows.

        Copies the kept rows into fresh buffers (a gather); callers amortise it by compacting only when
        a sizeable share of rows has finished.
        """
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.pos = self.pos.index_select(0, rows)
