"""Sequence layouts that travel through megatron's own ``packed_seq_params`` argument.

GPTModel.forward and MambaModel.forward hand ``packed_seq_params`` to every layer's core attention and
every Mamba mixer. Our layer specs put our own submodules there (:mod:`rlp_dist.models.attention`,
:mod:`rlp_dist.models.mixer`), which read the layout's type:

- ``None``: megatron's stock computation (one causal sequence per row);
- :class:`BranchLayout`: one packed row per context, ``[prefix (P) | thought 1 (T) | ... | thought g (T)]``,
  the thoughts branching from the shared prefix (the shared-prefix policy-gradient forward);
- ``rlp_dist.models.documents.DocumentLayout``: packed documents, attention and Mamba state confined to
  each document.

The layout also carries the rotary positions (our GPTModel subclass rotates at ``positions`` instead of
0..S-1). ``qkv_format`` stays None so that megatron's 'thd' branches never trigger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


@dataclass
class BranchLayout(PackedSeqParams):
    """A packed shared-prefix row: S = P + g*T tokens, thought i at [P + i*T, P + (i+1)*T).

    positions (S,): [0..P-1 | P..P+T-1 repeated g times]: every thought restarts right after the prefix.
    attention: "sdpa" (memory-bounded: one SDPA call over [prefix K/V; own thought K/V] per thought, no
    score tensor kept) or "dense" (the reference: prefix scores of all thoughts in one matmul, kept for
    backward; O(g*heads*T*P) memory per layer — used by tests and the memory benchmark's baseline).
    """

    prefix_len: int = 0
    group: int = 1
    thought_len: int = 0
    positions: Optional[torch.Tensor] = None
    attention: str = "sdpa"

    def __post_init__(self):
        if self.attention not in ("sdpa", "dense"):
            raise ValueError(f"BranchLayout.attention={self.attention!r}; use 'sdpa' or 'dense'")

    @classmethod
    def build(cls, prefix_len: int, group: int, thought_len: int, device, attention: str = "sdpa") -> "BranchLayout":
        u = torch.arange(thought_len, device=device)
        positions = torch.cat([torch.arange(prefix_len, device=device), (prefix_len + u).repeat(group)])  # (S,)
        s = prefix_len + group * thought_len
        # max_seqlen_*: megatron's rotary module sizes its table from them when packed_seq_params is given
        return cls(prefix_len=prefix_len, group=group, thought_len=thought_len, positions=positions,
                   attention=attention, max_seqlen_q=s, max_seqlen_kv=s)

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.group * self.thought_len

    def thought_mask(self, device) -> torch.Tensor:
        """(T, P+T) bool: a thought query sees every prefix key and its own keys causally. Built once per
        layout (every attention layer of the forward shares it): at P=2048, T=2047 it is 8.4 MB."""
        cached = getattr(self, "_mask", None)
        if cached is None or cached.device != torch.device(device):
            t, p = self.thought_len, self.prefix_len
            cached = torch.ones(t, p + t, dtype=torch.bool, device=device)
            cached[:, p:] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            object.__setattr__(self, "_mask", cached)
        return cached


def layout_positions(packed_seq_params) -> Optional[torch.Tensor]:
    """The rotary positions a layout asks for ((S,) or (B, S)), or None for 0..S-1."""
    return getattr(packed_seq_params, "positions", None) if packed_seq_params is not None else None

