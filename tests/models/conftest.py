"""Tiny random transformers checkpoints (created and saved by transformers) and their reference log-probs."""

import pytest
import torch

QWEN3 = {  # GQA 2:1 tied; GQA 4:1 untied, other head dim and rope base, 3 layers (uneven PP=2 split)
    "qwen3_gqa2_tied": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                            rope_theta=1_000_000.0),
    "qwen3_gqa4_untied": dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                              rope_theta=10_000.0),
}
NEMOTRON_H = {  # all three layer kinds; two Mamba group/head layouts; 5 layers (uneven PP=2 split)
    "nemotron_h_mixed": dict(vocab_size=256, hidden_size=64, intermediate_size=96, hybrid_override_pattern="M-M*",
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=8,
                             mamba_head_dim=8, ssm_state_size=16, n_groups=2, chunk_size=8),
    "nemotron_h_star_first": dict(vocab_size=128, hidden_size=32, intermediate_size=64,
                                  hybrid_override_pattern="*M-M-", num_attention_heads=8, num_key_value_heads=2,
                                  head_dim=4, mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=2,
                                  chunk_size=4, layer_norm_epsilon=1e-6),
}
SEQ_LEN = 13


def _perturb(model, seed):
    """Random norm weights, A, D and dt_bias so that every parameter matters for the parity check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("norm_f.weight") or n.endswith((".D", "dt_bias")):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("A_log"):
                p.copy_(torch.log(0.5 + 2 * torch.rand(p.shape, generator=g)))
            elif n.endswith("conv1d.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """name -> (directory, ids (2, SEQ_LEN), reference log-probs (2, SEQ_LEN-1) from transformers)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out = {}
    for i, (name, kw) in enumerate({**QWEN3, **NEMOTRON_H}.items()):
        torch.manual_seed(100 + i)
        if name in QWEN3:
            kw = dict(kw)
            theta = kw.pop("rope_theta")
            model = Qwen3ForCausalLM(Qwen3Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": theta}))
        else:
            model = NemotronHForCausalLM(NemotronHConfig(**kw))
        _perturb(model, i)
        model.eval()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        ids = torch.randint(0, kw["vocab_size"], (2, SEQ_LEN), generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            logits = model(ids).logits.float()
        ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out[name] = (str(path), ids, ref)
    return out
