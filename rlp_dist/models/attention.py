"""Our core attention submodule (the ``core_attention`` of both backbones' layer specs).

megatron's ``Attention`` projects, rotates and hands (q, k, v) to its ``core_attention`` together with
``packed_seq_params``; this submodule reads the layout there (rlp_dist.models.layout):

- None: megatron's own ``DotProductAttention`` (causal, unchanged);
- :class:`~rlp_dist.models.layout.BranchLayout`: shared-prefix branching (:func:`rlp_dist.models.branch.branch_attention`);
- ``DocumentLayout``: block-diagonal causal attention within each packed document
  (``rlp_dist.models.documents.document_attention``).

It is chosen by the spec (megatron's swap point), never patched onto an instance at call time, and it
uses megatron's own ``softmax_scale`` (1/sqrt(d), times any layer-number coefficient).
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention

from rlp_dist.models.layout import BranchLayout


class LayoutAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """q: (S, B, heads/tp, d), k and v: (S, B, groups/tp, d), rotated. -> (S, B, heads/tp * d)."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, None)
        if isinstance(packed_seq_params, BranchLayout):
            from rlp_dist.models.branch import branch_attention

            return branch_attention(query, key, value, packed_seq_params, self.softmax_scale)
        if hasattr(packed_seq_params, "doc_ids"):
            from rlp_dist.models.documents import document_attention

            return document_attention(query, key, value, packed_seq_params, self.softmax_scale)
        raise ValueError(f"LayoutAttention: unsupported packed_seq_params {type(packed_seq_params).__name__}; "
                         f"pass a BranchLayout, a DocumentLayout or None")
