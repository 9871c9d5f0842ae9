"""Nemotron-H hybrid backbone: megatron-core ``MambaModel`` with a local (non-TransformerEngine) spec.

The layer pattern (``ModelConfig.hybrid_pattern``) assigns each layer one of three blocks, all
pre-norm residual, x <- x + f(RMSNorm(x)):

    M  Mamba2 mixer:  [z, x, B, C, dt] = in_proj(h); x, B, C <- silu(causal_conv1d([x, B, C]));
                      y = SSD(x, dt, A, B, C) + D x  (per head, B/C shared within a group);
                      out = out_proj(gated_rmsnorm(y, z))   (norm of y * silu(z), per group)
    *  attention:     GQA softmax attention, no position embedding, no QK-norm
    -  MLP:           down(relu(up(h))^2)   (squared ReLU, no gate)

then a final RMSNorm and an untied (by default) output layer. The stock ``mamba_stack_spec`` is
TransformerEngine-only and ``MambaStack`` builds its final norm with TE; here the spec uses megatron's
plain column/row-parallel linears and ``torch.nn.RMSNorm``, and :class:`LocalMambaStack` swaps the
final norm for a torch one. The mixer's kernels come from ``rlp_kernels.dispatch`` (mamba-ssm on GPU,
PyTorch references on CPU), bound by ``rlp_dist.distributed.megatron_compat``.

Tensor parallelism shards every Mamba parameter over heads/groups (in_proj rows per [z, x, B, C, dt]
block, conv channels per [x, B, C], A_log/D/dt_bias per head, the gated norm per group): none is
replicated across TP, so no extra gradient reduction is needed beyond what megatron's linears do.

Departure from transformers' NemotronH: it clamps dt >= time_step_min (1e-3) in its chunked scan;
megatron (and so we) do not clamp. The difference only shows where softplus(dt + dt_bias) < 1e-3.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlp_dist.config.schema import ModelConfig
from rlp_dist.models.builder import _stage_flags, register, transformer_config


def _is_mixer(module) -> bool:
    from megatron.core.ssm.mamba_mixer import MambaMixer

    return isinstance(module, MambaMixer)


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's norm constructor (config, hidden_size, eps)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def _stack_class():
    from megatron.core.ssm.mamba_block import MambaStack

    class LocalMambaStack(MambaStack):
        """MambaStack whose final norm is torch RMSNorm instead of the hard-coded TENorm."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = LocalRMSNorm(config, config.hidden_size, config.layernorm_epsilon)

    return LocalMambaStack


def _recompute_layer(base):
    """``base`` (a megatron layer class) with full activation recomputation when the config asks for it:
    MambaStack has no ``_checkpointed_forward`` (TransformerBlock's), so each hybrid layer checkpoints
    itself — only its input is kept; the layer runs again in backward (ZeRO-3's hooks gather again)."""

    class Layer(base):
        def forward(self, *args, **kwargs):
            if self.training and self.config.recompute_granularity == "full" and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
            return super().forward(*args, **kwargs)

    Layer.__name__ = Layer.__qualname__ = f"Recompute{base.__name__}"
    return Layer


def _layout_mamba_class():
    from megatron.core.models.mamba import MambaModel

    class LayoutMambaModel(MambaModel):
        """MambaModel refusing layouts with RoPE: its forward derives the rotations from the sequence
        length, which a packed layout (thoughts restarting after the prefix, documents) does not follow.
        Nemotron-H has no position embedding."""

        def forward(self, *args, packed_seq_params=None, **kwargs):
            if packed_seq_params is not None and self.position_embedding_type == "rope":
                raise ValueError("a hybrid with model.position_embedding=rope cannot run packed layouts "
                                 "(shared prefix, documents); use position_embedding=none (Nemotron-H) or "
                                 "rlp.shared_prefix=false data.document_boundaries=ignore")
            return super().forward(*args, packed_seq_params=packed_seq_params, **kwargs)

    return LayoutMambaModel


def hybrid_stack_spec(mcfg: ModelConfig):
    """The local MambaStack spec: M / * / - layers from megatron modules, torch RMSNorm."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType

    from rlp_dist.models.attention import LayoutAttention
    from rlp_dist.models.mixer import LayoutMambaMixer
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    norm = LocalRMSNorm  # transformer layers pass eps=config.layernorm_epsilon themselves
    mamba = ModuleSpec(module=_recompute_layer(MambaLayer), submodules=MambaLayerSubmodules(
        norm=ModuleSpec(module=LocalRMSNorm, params={"eps": mcfg.norm_eps}),  # MambaLayer passes none
        mixer=ModuleSpec(module=LayoutMambaMixer, params={"d_conv": mcfg.mamba_conv_kernel},
                         submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                         out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(module=_recompute_layer(TransformerLayer), submodules=TransformerLayerSubmodules(
        input_layernorm=norm,
        self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(
                                      linear_qkv=ColumnParallelLinear, core_attention=LayoutAttention,
                                      linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add))
    mlp = ModuleSpec(module=_recompute_layer(MLPLayer), submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=norm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                            linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=_stack_class(), submodules=MambaStackSubmodules(
        mamba_layer=mamba, attention_layer=attention, mlp_layer=mlp))


@register("hybrid")
def build_hybrid(mcfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                 pp_rank: Optional[int] = None, pp: Optional[int] = None) -> torch.nn.Module:
    """This rank's shard of a Nemotron-H MambaModel (TP/PP from megatron's parallel_state)."""
    from rlp_dist.distributed import megatron_compat
    from rlp_dist.models import head
    from rlp_dist.models.builder import recompute_overrides

    megatron_compat.apply()  # no-op on GPU or when already applied; binds the CPU Mamba kernels
    megatron_compat.bind_mamba_kernels()  # GPU with a Python-only mamba-ssm: the dispatcher's kernels
    if mcfg.activation != "squared_relu" or mcfg.qk_layernorm:
        raise ValueError(f"model.arch=hybrid expects activation=squared_relu and qk_layernorm=false "
                         f"(Nemotron-H); got activation={mcfg.activation!r}, qk_layernorm={mcfg.qk_layernorm}")
    config = transformer_config(
        mcfg, params_dtype,
        mamba_state_dim=mcfg.mamba_state_dim, mamba_head_dim=mcfg.mamba_head_dim,
        mamba_num_groups=mcfg.mamba_num_groups, mamba_num_heads=mcfg.mamba_num_heads,
        # the memory-efficient path is one fused Triton kernel with no CPU counterpart
        use_mamba_mem_eff_path=False, **recompute_overrides(mcfg.recompute))
    pre, post = _stage_flags(pp_rank, pp)
    model = _layout_mamba_class()(
        config=config,
        mamba_stack_spec=hybrid_stack_spec(mcfg),
        vocab_size=mcfg.vocab_size,
        max_sequence_length=mcfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        hybrid_override_pattern=mcfg.hybrid_pattern,
        parallel_output=True,
        share_embeddings_and_output_weights=mcfg.tie_embeddings,
        position_embedding_type="rope" if mcfg.position_embedding == "rope" else "none",
        rotary_base=int(mcfg.rope_base),
    )
    for module in model.modules():  # megatron fixes the mixer's gated-norm eps at 1e-5; use the preset's
        if _is_mixer(module):
            module.norm.eps = mcfg.norm_eps
    return head.install(model)
