"""Tiny models with varied weights for the rollout tests (importable from spawned ranks)."""

import torch


def build(preset: str, seed: int = 0) -> torch.nn.Module:
    from rlp_dist.config import compose
    from rlp_dist.models.builder import build_model

    torch.manual_seed(seed)
    return randomize(build_model(compose([f"+model={preset}"]).model), seed)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw the weights at a larger scale (norm weights around 1, never exactly 1).

    A freshly initialised tied-embedding model predicts the last input token again and again, which
    makes greedy-decoding comparisons vacuous; these weights give context-dependent, varied outputs.
    Replicated parameters get the same values on every TP rank; a TP-sharded one (megatron's
    ``tensor_model_parallel`` flag) gets a rank-specific draw, or the vocabulary halves would tie.
    """
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(seed)
    shard_gen = torch.Generator().manual_seed(seed + 1000 * (1 + tp_rank))
    with torch.no_grad():
        for p in model.parameters():
            g = shard_gen if getattr(p, "tensor_model_parallel", False) else gen
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(0.25 * noise if p.dim() > 1 else 1.0 + 0.3 * noise)
    return model
