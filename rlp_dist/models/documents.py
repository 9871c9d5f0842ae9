"""Packed documents: attention and Mamba state confined to each document of a row.

A row of S tokens packs documents end to end; ``doc_ids`` (B, S) numbers them per row (0, 0, 1, 1, 1,
2, ...: non-decreasing) and ``positions`` restarts at 0 at each document start. With this layout as
megatron's ``packed_seq_params`` (rlp_dist.models.layout) every layer computes what it computes on each
document alone:

- attention is block-diagonal causal: query i attends to key j iff doc[i] == doc[j] and j <= i,

      a_i = sum_{j <= i, doc[j] = doc[i]} softmax_j(q_i . k_j * scale) v_j

  and RoPE rotates at ``positions`` (the model's rotary positions), so scores equal the lone run's;
- the Mamba mixer resets its causal conv window and its SSD state at each document start (mamba-ssm's
  ``seq_idx`` = doc_ids): S_t = [doc_t = doc_{t-1}] exp(a_t) S_{t-1} + dt_t x_t B_t^T.

Never a dense S x S mask: on CPU causal SDPA over the documents batched by length bucket (right-padded
to the next power of two, a few calls per layer however many documents; host-side, built once per
layout); on CUDA flex_attention with a block-sparse BlockMask built once per layout from
doc_ids (O(S^2 / 128^2) blocks), compiled. Grouped-query heads use SDPA's / flex's ``enable_gqa`` (K/V
never repeated per query head). Memory at S=8192, B=4, 16 heads x 128 (bf16): the bucketed path's
gathered q/k/v/out are at most 2x the row's own (<= 2 x 4 x 8192 x 16 x 128 x 2 B = 256 MB for q, less
for grouped K/V) and nothing O(S^2) is kept; the BlockMask holds B x (S/128)^2 = 16k block entries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class DocumentLayout(PackedSeqParams):
    """Documents packed in (B, S) rows. ``qkv_format`` stays None (megatron's 'thd' branches never run);
    ``max_seqlen_q/kv`` = S, so megatron sizes its rotary table for the row."""

    doc_ids: Optional[torch.Tensor] = None  # (B, S) int32, non-decreasing per row
    positions: Optional[torch.Tensor] = None  # (B, S) int64, position within the token's document
    _cache: dict = field(default_factory=dict, repr=False, compare=False)  # segments / block mask, per layout

    @classmethod
    def from_doc_ids(cls, doc_ids: torch.Tensor) -> "DocumentLayout":
        if doc_ids.dim() != 2:
            raise ValueError(f"DocumentLayout: doc_ids must be (B, S), got shape {tuple(doc_ids.shape)}")
        doc_ids = doc_ids.to(torch.int32).contiguous()
        s = doc_ids.shape[1]
        if s > 1 and bool((doc_ids[:, 1:] < doc_ids[:, :-1]).any()):
            raise ValueError("DocumentLayout: doc_ids must be non-decreasing along each row (0, 0, 1, 1, 2, ...)")
        idx = torch.arange(s, device=doc_ids.device).expand_as(doc_ids)  # (B, S)
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # (B, S): a document begins here
        first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # (B, S): its start
        return cls(doc_ids=doc_ids, positions=(idx - first).to(torch.int64), max_seqlen_q=s, max_seqlen_kv=s)

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> "DocumentLayout":
        """From per-document positions (B, S) (0 at each document start)."""
        return cls.from_doc_ids(torch.cumsum((positions == 0).to(torch.int32), dim=1) - 1)

    def segments(self) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) of each document (host lists; one device sync, cached)."""
        if "segments" not in self._cache:
            b, s = self.doc_ids.shape
            change = (self.doc_ids[:, 1:] != self.doc_ids[:, :-1]).nonzero().tolist()  # [(row, i-1)]
            cuts = [[0] for _ in range(b)]
            for row, i in change:
                cuts[row].append(i + 1)
            self._cache["segments"] = [list(zip(c, c[1:] + [s])) for c in cuts]
        return self._cache["segments"]

    def buckets(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per length bucket (the next power of two): gather (n_b, L_b) flat token indices b*S + t of its
        documents, right-padded by repeating each document's last token; valid (n_b*L_b,) bool; dest
        (tokens_b,) the flat index of every valid entry. Built once per layout (host segments)."""
        if "buckets" not in self._cache:
            b, s = self.doc_ids.shape
            groups: dict[int, list[tuple[int, int]]] = {}
            for row, segs in enumerate(self.segments()):
                for a, e in segs:
                    groups.setdefault(1 << (e - a - 1).bit_length(), []).append((row * s + a, e - a))
            out = []
            for _, docs in sorted(groups.items()):
                length = max(n for _, n in docs)
                j = torch.arange(length)
                start = torch.tensor([a for a, _ in docs])[:, None]  # (n_b, 1)
                size = torch.tensor([n for _, n in docs])[:, None]
                gather = start + torch.minimum(j, size - 1)  # (n_b, L_b)
                valid = (j < size).reshape(-1)  # (n_b*L_b,)
                dev = self.doc_ids.device
                out.append((gather.to(dev), valid.to(dev), (start + j).reshape(-1)[valid].to(dev)))
            self._cache["buckets"] = out
        return self._cache["buckets"]

    def block_mask(self):
        """flex_attention's BlockMask of the block-diagonal causal pattern (built once per layout)."""
        if "block_mask" not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.doc_ids

            def mask_mod(b, h, q, kv):
                return (doc[b, q] == doc[b, kv]) & (kv <= q)

            b, s = doc.shape
            self._cache["block_mask"] = create_block_mask(mask_mod, b, None, s, s, device=doc.device)
        return self._cache["block_mask"]


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                       scale: float) -> torch.Tensor:
    """Block-diagonal causal attention. q: (S, B, heads, d), k and v: (S, B, groups, d) megatron's
    layout, already rotated. Returns (S, B, heads*d) like megatron's core attention."""
    s, b, heads, d = q.shape
    if tuple(layout.doc_ids.shape) != (b, s):
        raise ValueError(f"document_attention: layout is for rows {tuple(layout.doc_ids.shape)}, "
                         f"the batch is (B, S) = {(b, s)}")
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # (B, h|g, S, d)
    # The one device check: on CUDA flex_attention's compiled kernel over the block-sparse mask; the
    # bucketed SDPA path (CPU, or CUDA with RLP_KERNELS_FORCE_REFERENCE=1) needs no compiler.
    from rlp_kernels.dispatch import force_reference

    if q.device.type == "cuda" and not force_reference():
        out = _flex(qb, kb, vb, layout, scale, compiled=True)  # (B, h, S, d)
    else:
        out = _per_segment(qb, kb, vb, layout, scale)
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)  # (S, B, h*d)


def _per_segment(qb, kb, vb, layout: DocumentLayout, scale: float) -> torch.Tensor:
    """Causal SDPA per document, documents of similar length batched: q: (B, h, S, d), k/v: (B, g, S, d)
    -> (B, h, S, d). The segments are grouped by length bucket (powers of two); each bucket is one
    right-padded batch (n_b, h, L_b, d) through one causal SDPA — a real query never sees a padding key,
    which sits after it — so a row of many short documents costs a few calls, not one per document,
    and padding at most doubles the tokens."""
    b, h, s, d = qb.shape
    g = kb.shape[1]
    qf, kf, vf = (x.permute(0, 2, 1, 3).reshape(b * s, x.shape[1], d) for x in (qb, kb, vb))  # (B*S, h|g, d)
    outs, where = [], []
    for gather, valid, dest in layout.buckets():
        n, length = gather.shape
        q_, k_, v_ = (x.index_select(0, gather.reshape(-1)).view(n, length, x.shape[1], d).transpose(1, 2)
                      for x in (qf, kf, vf))  # (n_b, h|g, L_b, d)
        o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=g != h)
        outs.append(o.transpose(1, 2).reshape(n * length, h * d)[valid])  # (tokens_b, h*d)
        where.append(dest)
    flat = torch.cat(outs).new_zeros(b * s, h * d).index_copy(0, torch.cat(where), torch.cat(outs))  # (B*S, h*d)
    return flat.view(b, s, h, d).transpose(1, 2)  # (B, h, S, d)


@functools.lru_cache(maxsize=2)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def _flex(qb, kb, vb, layout: DocumentLayout, scale: float, compiled: bool) -> torch.Tensor:
    """flex_attention with the layout's BlockMask. q: (B, h, S, d), k/v: (B, g, S, d) -> (B, h, S, d).
    compiled=False runs flex's eager math (tests on CPU); training on CUDA uses the compiled kernel."""
    return _flex_fn(compiled)(qb, kb, vb, block_mask=layout.block_mask(), scale=scale,
                              enable_gqa=kb.shape[1] != qb.shape[1])


def document_mixer(mixer, hidden: torch.Tensor, layout: DocumentLayout) -> tuple[torch.Tensor, None]:
    """megatron's MambaMixer forward (the non-fused path: in_proj, causal conv, SSD scan, gated norm,
    out_proj) with the conv window and the SSD state reset at each document start (seq_idx = doc_ids).

    hidden: (S, B, H) megatron's layout -> (out (S, B, H), None) like the mixer (no out-projection bias).
    """
    from rlp_kernels import dispatch

    m = mixer
    s, b, _ = hidden.shape
    if m.cp.cp_size != 1:
        raise ValueError("document_mixer: context parallelism is not supported with packed documents; "
                         "use parallel.cp=1")
    inner, ng, n, heads, hd = m.d_inner_local_tp, m.ngroups_local_tp, m.d_state, m.nheads_local_tp, m.headdim
    seq_idx = layout.doc_ids.to(device=hidden.device, dtype=torch.int32).contiguous()  # (B, S)
    zxbcdt, _ = m.in_proj(hidden)  # (S, B, D_in) this rank's [z | x B C | dt]
    zxbcdt = zxbcdt.transpose(0, 1).contiguous()  # (B, S, D_in)
    z, xbc, dt = zxbcdt.split([inner, inner + 2 * ng * n, heads], dim=-1)
    # causal conv, channel-last (B, C, S) view of a contiguous (B, S, C): causal-conv1d's seq_idx layout
    xbc = dispatch.causal_conv1d_fn(xbc.contiguous().transpose(1, 2), m.conv1d.weight[:, 0], m.conv1d.bias,
                                    activation=m.activation, seq_idx=seq_idx).transpose(1, 2)  # (B, S, C)
    x, bb, cc = xbc.split([inner, ng * n, ng * n], dim=-1)
    d = m.D.float().view(heads, hd) if m.D_has_hdim else m.D
    y = dispatch.mamba_chunk_scan_combined(
        x.reshape(b, s, heads, hd), dt.contiguous(), -torch.exp(m.A_log.float()),
        bb.reshape(b, s, ng, n), cc.reshape(b, s, ng, n), m.chunk_size, D=d,
        z=None if m.rmsnorm else z.reshape(b, s, heads, hd), dt_bias=m.dt_bias.float(), dt_softplus=True,
        seq_idx=seq_idx)  # (B, S, heads, hd)
    y = y.reshape(b, s, inner).transpose(0, 1)  # (S, B, inner)
    if m.rmsnorm:
        y = m.norm(y, z.transpose(0, 1))  # gated group RMSNorm
    return m.out_proj(y)
