"""Presets -> megatron-core models, one builder per backbone family.

Model code is single-device: the builder constructs the module for *this* rank's tensor/pipeline
shard (megatron-core reads its TP/PP sizes from ``parallel_state``, set up once by
``rlp_dist.distributed``) and knows nothing about RLP, DeepSpeed or the EMA teacher. Parallel
wrapping (ZeRO) is applied from outside, by the trainer.

Families register themselves in :data:`BUILDERS` keyed by ``ModelConfig.arch``:
``transformer`` (Qwen3-style GPTModel, this file) and ``hybrid`` (Nemotron-H MambaModel,
``rlp_dist.models.hybrid``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from rlp_dist.config.schema import ModelConfig

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {}


def register(arch: str):
    def deco(fn):
        BUILDERS[arch] = fn
        return fn

    return deco


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


def pipeline_split(num_layers: int, pp: int) -> dict:
    """TransformerConfig overrides placing ``num_layers`` on ``pp`` stages when pp does not divide it.

    megatron gives every middle stage the same count and lets the first and last stage differ; without
    these overrides GPTModel asserts and MambaStack silently builds only pp * (num_layers // pp)
    layers. Even splits need no override."""
    if pp <= 1 or num_layers % pp == 0:
        return {}
    if num_layers < pp:
        raise ValueError(f"parallel.pp={pp} exceeds model.num_layers={num_layers}; use at most {num_layers}")
    middle = -(-num_layers // pp)  # ceil: first and last stage take what is left, split evenly
    while middle > 0 and num_layers - middle * (pp - 2) < 2:
        middle -= 1
    rest = num_layers - middle * (pp - 2)
    return {"num_layers_in_first_pipeline_stage": rest // 2,
            "num_layers_in_last_pipeline_stage": rest - rest // 2}


def transformer_config(mcfg: ModelConfig, params_dtype: torch.dtype = torch.float32, **overrides):
    """A megatron-core TransformerConfig for a preset, with CPU-safe (unfused) kernels."""
    from megatron.core.transformer import TransformerConfig

    from rlp_dist.distributed.parallel import megatron_layout

    swiglu = mcfg.activation == "swiglu"
    kw = dict(
        num_layers=mcfg.num_layers,
        hidden_size=mcfg.hidden_size,
        ffn_hidden_size=mcfg.ffn_hidden_size,
        num_attention_heads=mcfg.num_attention_heads,
        num_query_groups=mcfg.num_query_groups,
        kv_channels=mcfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=mcfg.norm_eps,
        qk_layernorm=mcfg.qk_layernorm,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else squared_relu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=mcfg.init_method_std,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        tensor_model_parallel_size=megatron_layout().tp,
        pipeline_model_parallel_size=megatron_layout().pp,
        pipeline_dtype=params_dtype,
        use_cpu_initialization=True,
        perform_initialization=True,
        # Fusions assume CUDA/apex; the unfused paths are exact and run everywhere.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
    )
    kw.update(pipeline_split(mcfg.num_layers, kw["pipeline_model_parallel_size"]))
    kw.update(overrides)
    return TransformerConfig(**kw)


def _stage_flags(pp_rank: Optional[int], pp: Optional[int]) -> tuple[bool, bool]:
    from rlp_dist.distributed.parallel import megatron_layout

    layout = megatron_layout()
    pp = layout.pp if pp is None else pp
    pp_rank = layout.pp_rank if pp_rank is None else pp_rank
    return pp_rank == 0, pp_rank == pp - 1


def recompute_overrides(recompute: str) -> dict:
    """megatron-core's activation-recomputation options for ``model.recompute``.

    none: keep every layer's activations. selective: recompute the core attention in backward
    (megatron's ``recompute_modules=["core_attn"]``; with memory-bounded attention kernels the saving is
    small, the option is for parity with Megatron-LM). full: keep only each layer's input (S, B, H) and
    recompute the layer in backward (``recompute_method="uniform"``, one layer per checkpoint)."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {}


def _layout_gpt_class():
    from megatron.core.models.gpt import GPTModel

    from rlp_dist.models.layout import layout_positions

    class LayoutGPTModel(GPTModel):
        """GPTModel whose RoPE follows the layout's positions (``packed_seq_params``, rlp_dist.models.layout):
        megatron derives the rotations from the sequence length alone; a packed shared-prefix row restarts
        every thought after the prefix, and packed documents restart at each document."""

        def _preprocess(self, **kw):
            out = super()._preprocess(**kw)
            pos = layout_positions(kw.get("packed_seq_params"))
            if pos is None or self.position_embedding_type != "rope" or out[1] is None:
                return out
            table = self.rotary_pos_emb.get_emb(int(pos.max()) + 1)  # (n, 1, 1, d)
            rot = table[pos] if pos.dim() == 1 else table[:, 0][pos.transpose(0, 1)]  # (S, 1, 1, d) | (S, B, 1, d)
            return (out[0], rot, *out[2:])

    return LayoutGPTModel


def transformer_layer_spec(mcfg: ModelConfig):
    """megatron's local GPT layer spec with our layout-aware core attention (the swap point)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from rlp_dist.models.attention import LayoutAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=mcfg.qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = LayoutAttention
    return spec


@register("transformer")
def build_transformer(mcfg: ModelConfig, params_dtype: torch.dtype = torch.float32,
                      pp_rank: Optional[int] = None, pp: Optional[int] = None) -> torch.nn.Module:
    """Qwen3-style GPTModel: RMSNorm, GQA, per-head QK RMSNorm, RoPE, SwiGLU, tied/untied output."""
    from rlp_dist.models import head

    config = transformer_config(mcfg, params_dtype, **recompute_overrides(mcfg.recompute))
    pre, post = _stage_flags(pp_rank, pp)
    model = _layout_gpt_class()(
        config=config,
        transformer_layer_spec=transformer_layer_spec(mcfg),
        vocab_size=mcfg.vocab_size,
        max_sequence_length=mcfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,  # vocab-parallel logits; log-probs use a vocab-parallel log-softmax
        share_embeddings_and_output_weights=mcfg.tie_embeddings,
        position_embedding_type=mcfg.position_embedding,
        rotary_base=int(mcfg.rope_base),
    )
    return head.install(model)


def build_model(mcfg: ModelConfig, params_dtype: torch.dtype = torch.float32, **kw) -> torch.nn.Module:
    """Build this rank's shard of the preset's backbone (TP/PP from megatron's parallel_state)."""
    if mcfg.arch not in BUILDERS:
        # Importing the family module registers its builder.
        import importlib

        try:
            importlib.import_module(f"rlp_dist.models.{mcfg.arch}")
        except ImportError as e:
            raise ValueError(f"model.arch={mcfg.arch!r} has no builder ({e}); "
                             f"available: {sorted(BUILDERS)}") from None
    return BUILDERS[mcfg.arch](mcfg, params_dtype, **kw)


def count_parameters(mcfg: ModelConfig) -> int:
    """Parameters of the full (unsharded) model, counted on the meta device: no memory used."""
    with torch.device("meta"):
        model = build_model(mcfg)
    return sum(p.numel() for p in model.parameters())
