"""Preset parameter counts on the meta device: within 1% of the published sizes and exactly equal to
transformers' own model built from the equivalent config.json (which checks every preset number that
shapes a weight against Qwen3Config / NemotronHConfig)."""

import pytest
import torch
from helpers.spawn import run_ranks

PUBLISHED = {"qwen3_1_7b": 1.72e9, "nemotron_nano_12b": 12.31e9}  # incl. embeddings (model cards)


def _ours(names):
    from rlp_dist.models import params

    return {n: params.count([f"+model={n}"])["total"] for n in names}


@pytest.fixture(scope="module")
def our_counts():
    return run_ranks(_ours, 1, (sorted(PUBLISHED),))[0]  # one spawned rank builds both on meta


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_transformers_and_published_size(name, our_counts):
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlp_dist.config import compose
    from rlp_dist.models import hf

    mcfg = compose([f"+model={name}"]).model
    cfg = hf.hf_config_from_model_config(mcfg)
    back = hf.model_config_from_hf(cfg, name=name)
    for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "vocab_size", "norm_eps", "tie_embeddings", "hybrid_pattern", "mamba_num_heads",
              "mamba_head_dim", "mamba_state_dim", "mamba_num_groups", "mamba_conv_kernel"):
        assert getattr(back, f) == getattr(mcfg, f), f
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        theirs = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_cfg).parameters())
    ours = our_counts[name]
    print(f"{name}: ours {ours:,} transformers {theirs:,} published {PUBLISHED[name]:,.0f}")
    assert ours == theirs
    assert abs(ours - PUBLISHED[name]) <= 0.01 * PUBLISHED[name]


@pytest.mark.parametrize("n,pp", [(62, 4), (62, 3), (5, 2), (3, 2), (7, 5), (28, 4), (29, 8)])
def test_pipeline_split_places_every_layer(n, pp):
    from rlp_dist.models.builder import pipeline_split

    d = pipeline_split(n, pp)
    if n % pp == 0:
        assert d == {}
        return
    first, last = d["num_layers_in_first_pipeline_stage"], d["num_layers_in_last_pipeline_stage"]
    assert first >= 1 and last >= 1
    if pp > 2:  # megatron gives each middle stage (n - first - last) / (pp - 2) layers, which must be whole
        assert (n - first - last) % (pp - 2) == 0 and (n - first - last) // (pp - 2) >= 1
    else:
        assert first + last == n
