"""Our Mamba2 mixer submodule (the ``mixer`` of the hybrid's Mamba layer spec).

megatron's ``MambaLayer`` hands ``packed_seq_params`` to its mixer; this subclass of megatron's
``MambaMixer`` reads the layout there (rlp_dist.models.layout):

- None: megatron's own forward (training scan, or the static-inference cache when one is passed);
- :class:`~rlp_dist.models.layout.BranchLayout`: the prefix scanned once, every thought seeded with its
  final conv and SSM states (:func:`rlp_dist.models.branch.branch_mixer`);
- ``DocumentLayout``: conv and SSM states reset at each document start
  (``rlp_dist.models.documents.document_mixer``: mamba-ssm's ``seq_idx``).
"""

from __future__ import annotations

from megatron.core.ssm.mamba_mixer import MambaMixer

from rlp_dist.models.layout import BranchLayout


class LayoutMambaMixer(MambaMixer):
    def forward(self, hidden_states, inference_context=None, *, inference_params=None, packed_seq_params=None):
        """hidden_states: (S, B, H) -> (out (S, B, H), bias or None)."""
        if packed_seq_params is None:
            return super().forward(hidden_states, inference_context, inference_params=inference_params)
        if isinstance(packed_seq_params, BranchLayout):
            from rlp_dist.models.branch import branch_mixer

            return branch_mixer(self, hidden_states, packed_seq_params)
        if hasattr(packed_seq_params, "doc_ids"):
            from rlp_dist.models.documents import document_mixer

            return document_mixer(self, hidden_states, packed_seq_params)
        raise ValueError(f"LayoutMambaMixer: unsupported packed_seq_params {type(packed_seq_params).__name__}; "
                         f"pass a BranchLayout, a DocumentLayout or None")

    @property
    def supports_layouts(self) -> bool:
        """branch_mixer implements the gated-RMSNorm mixer with D per head and no context parallelism."""
        return bool(self.rmsnorm and not self.D_has_hdim and self.cp.cp_size == 1)
