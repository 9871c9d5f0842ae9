"""config.json <-> ModelConfig, and the one-line errors for checkpoints that do not fit."""

import pytest
import torch

from rlp_dist.config.schema import ConfigError
from rlp_dist.models import hf


def test_config_round_trip_and_mismatch_errors(hf_models):
    for name, (hf_dir, _, _) in hf_models.items():
        mcfg = hf.model_config_from_hf(hf_dir)
        back = hf.model_config_from_hf(hf.hf_config_from_model_config(mcfg, hf.read_hf_config(hf_dir)), name=mcfg.name)
        assert back == mcfg, name
    hf_dir = hf_models["nemotron_h_mixed"][0]
    mcfg = hf.model_config_from_hf(hf_dir)
    import dataclasses

    with pytest.raises(ConfigError, match=r"model.mamba_state_dim=32 but .*config.json has 16"):
        hf._check_matches(hf.model_config_from_hf(hf_dir), dataclasses.replace(mcfg, mamba_state_dim=32), hf_dir)
    with pytest.raises(ConfigError, match=r"model.vocab_size=100 is smaller than the checkpoint's 256"):
        hf._check_matches(hf.model_config_from_hf(hf_dir), dataclasses.replace(mcfg, vocab_size=100), hf_dir)


def test_unsupported_configs_and_missing_tensors(hf_models, tmp_path):
    cfg = hf.read_hf_config(hf_models["nemotron_h_mixed"][0])
    with pytest.raises(ConfigError, match="layers_block_type has \\['moe'\\]"):
        hf.model_config_from_hf({**cfg, "layers_block_type": ["moe", "mlp"]})
    with pytest.raises(ConfigError, match="mlp_hidden_act='relu2'"):
        hf.model_config_from_hf({**cfg, "mlp_hidden_act": "silu"})
    with pytest.raises(ConfigError, match="model_type='llama' is unsupported"):
        hf.model_config_from_hf({**cfg, "model_type": "llama"})
    q = hf.read_hf_config(hf_models["qwen3_gqa2_tied"][0])
    with pytest.raises(ConfigError, match="rope_type"):
        hf.model_config_from_hf({**q, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}})
    reader = hf.SafetensorsReader(hf_models["qwen3_gqa2_tied"][0])
    with pytest.raises(KeyError, match="checkpoint has no tensor 'model.layers.9.mlp.up_proj.weight'"):
        reader.rows("model.layers.9.mlp.up_proj.weight")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        hf.SafetensorsReader(tmp_path)


def test_vocab_growth_uses_mean_embedding():
    full = torch.arange(12.0).reshape(4, 3)
    grown = hf._grow_vocab(full, 6, "emb")
    assert torch.equal(grown[:4], full) and torch.equal(grown[4], full.mean(0))
    with pytest.raises(ConfigError, match="set model.vocab_size >= 4"):
        hf._grow_vocab(full, 3, "emb")


def test_released_style_configs():
    """config.json as shipped with the released checkpoints (legacy field names, pattern string)."""
    nano = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", "hidden_size": 5120,
            "intermediate_size": 20480, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
            "vocab_size": 131072, "num_hidden_layers": 62, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
            "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
            "mamba_num_heads": 128, "mamba_head_dim": 80, "ssm_state_size": 128, "mamba_n_groups": 8,
            "mamba_d_conv": 4, "mamba_conv_bias": True, "mlp_hidden_act": "relu2", "mamba_hidden_act": "silu",
            "use_bias": False, "mlp_bias": False, "attention_bias": False, "max_position_embeddings": 131072}
    from rlp_dist.config import compose

    preset = compose(["+model=nemotron_nano_12b"]).model
    got = hf.model_config_from_hf(nano, name="nemotron_nano_12b")
    for f in ("num_layers", "hybrid_pattern", "mamba_num_groups", "mamba_conv_kernel", "kv_channels", "norm_eps",
              "ffn_hidden_size", "mamba_head_dim", "vocab_size"):
        assert getattr(got, f) == getattr(preset, f), f
    qwen = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048, "intermediate_size": 6144,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28,
            "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
            "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
            "max_position_embeddings": 32768}
    got = hf.model_config_from_hf(qwen, name="q")
    preset = compose(["+model=qwen3_1_7b"]).model
    for f in ("num_layers", "kv_channels", "rope_base", "tie_embeddings", "num_query_groups", "norm_eps"):
        assert getattr(got, f) == getattr(preset, f), f
    with pytest.raises(ConfigError, match="use_sliding_window=false"):
        hf.model_config_from_hf({**qwen, "use_sliding_window": True})
