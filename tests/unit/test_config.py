"""Bad configs fail fast with a message naming the field and a value that works."""

import subprocess
import sys

import pytest

from rlp_dist.config import ConfigError, compose
from rlp_dist.config.schema import ModelConfig
from rlp_dist.data.stream import resolve_files

BASE = ["+model=tiny_transformer", "rlp=tiny"]


@pytest.mark.parametrize("override, pattern", [
    ("rlp.group_size=1", r"rlp\.group_size=1 must be >= 2"),
    ("rlp.thought_max_tokens=0", r"rlp\.thought_max_tokens=0 must be >= 1"),
    ("rlp.temperature=0", r"rlp\.temperature=0.0 must be > 0"),
    ("rlp.temperature=-1", r"rlp\.temperature=-1.0 must be > 0"),
    ("parallel.tp=3", r"parallel\.tp=3 does not divide model\.num_attention_heads=4; use 1, 2 or 4"),
    ("parallel.zero_stage=5", r"parallel\.zero_stage=5; use 0, 1, 2 or 3"),
    ("rlp.ema_decay=1.0", r"rlp\.ema_decay=1.0 must be in \[0, 1\)"),
    ("rlp.kl_coef=0.001", r"rlp\.kl_coef=0.001: only 0 is implemented"),
    ("objective=sft", r"objective='sft'; use 'rlp' or 'ntp'"),
    ("logging.wandb_mode=cloud", r"logging\.wandb_mode='cloud'"),
    ("train.dtype=fp16", r"train\.dtype='fp16'; use 'fp32' or 'bf16'"),
    ("rlp.teacher_scoring=never", r"rlp\.teacher_scoring='never'"),
    ("rlp.contexts_per_document=3", r"rlp\.contexts_per_document=3 must divide rlp\.contexts_per_step=4 .* use multiples of 3"),
    ("rlp.context_stride=-1", r"rlp\.context_stride=-1 must be >= 0"),
])
def test_bad_value_names_field_and_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        compose(BASE + [override], world_size=2)


def test_cross_field_checks_need_world_size():
    with pytest.raises(ConfigError, match=r"rlp\.contexts_per_step=3 is not divisible by the data-parallel size 2"):
        compose(BASE + ["rlp.contexts_per_step=3"], world_size=2)
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel\.tp\*parallel\.pp=2"):
        compose(BASE + ["parallel.tp=2"], world_size=3)
    with pytest.raises(ConfigError, match=r"parallel\.zero_stage=3 with parallel\.pp=2.*use parallel\.zero_stage=1"):
        compose(BASE + ["parallel.pp=2"], world_size=2)
    with pytest.raises(ConfigError, match=r"exceeds model\.max_position_embeddings=512"):
        compose(BASE + ["rlp.context_len=500"], world_size=1)
    with pytest.raises(ConfigError, match=r"rlp\.contexts_per_step=4 is not divisible by the data-parallel size 4 "
                                          r"x rlp\.contexts_per_document=2; use a multiple of 8"):
        compose(BASE + ["rlp.contexts_per_document=2"], world_size=4)
    with pytest.raises(ConfigError, match=r"does not fit in rlp\.context_len=32; use a stride below 32"):
        compose(BASE + ["rlp.contexts_per_document=2", "rlp.context_stride=40"], world_size=1)


def test_contexts_per_document_branch_points():
    r = compose(BASE + ["rlp.contexts_per_document=2"]).rlp
    assert r.branch_points() == (16, 32)  # default stride context_len // k; the longest is context_len
    r = compose(BASE + ["rlp.contexts_per_document=4", "rlp.context_stride=3", "rlp.contexts_per_micro_batch=4"]).rlp
    assert r.branch_points() == (23, 26, 29, 32)


def test_no_model_lists_presets():
    with pytest.raises(ConfigError, match=r"add \+model=NAME with NAME one of: .*qwen3_1_7b.*tiny_transformer"):
        compose(["rlp=tiny"])


def test_unknown_preset_lists_options():
    with pytest.raises(ConfigError, match=r"Could not find 'model/llama_70b'; use one of: .*tiny_hybrid") as e:
        compose(["+model=llama_70b"])
    assert "\n" not in str(e.value)


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match="rlp.grop_size"):
        compose(BASE + ["rlp.grop_size=4"])


def test_wrong_type_rejected():
    with pytest.raises(ConfigError, match="train.steps"):
        compose(BASE + ["train.steps=abc"])


def test_missing_data_path():
    with pytest.raises(ConfigError, match=r"data\.path='/nonexistent/corpus.jsonl': no such file"):
        resolve_files("/nonexistent/corpus.jsonl")


def test_hybrid_pattern_validated():
    kw = dict(name="x", arch="hybrid", num_layers=3, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
              num_query_groups=1, kv_channels=4, vocab_size=16, mamba_num_heads=2, mamba_head_dim=4,
              mamba_state_dim=4, mamba_num_groups=1)
    with pytest.raises(ConfigError, match=r"model\.hybrid_pattern='MX-'"):
        ModelConfig(hybrid_pattern="MX-", **kw)
    with pytest.raises(ConfigError, match=r"model\.num_layers=3 must equal len\(model\.hybrid_pattern\)=4"):
        ModelConfig(hybrid_pattern="M*--", **kw)


def test_presets_compose_with_real_numbers():
    q = compose(["+model=qwen3_1_7b"]).model
    assert (q.num_layers, q.hidden_size, q.num_attention_heads, q.num_query_groups, q.vocab_size) == \
        (28, 2048, 16, 8, 151936)
    n = compose(["+model=nemotron_nano_12b", "parallel.tp=8"], world_size=8).model
    assert n.hybrid_pattern.count("M") == 28 and n.hybrid_pattern.count("*") == 6
    assert (n.hidden_size, n.mamba_num_heads, n.mamba_head_dim, n.vocab_size) == (5120, 128, 80, 131072)


def test_launcher_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "+model=tiny_transformer", "rlp=tiny",
                           "rlp.group_size=1", f"run.dir={tmp_path}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "config error: rlp.group_size=1 must be >= 2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_training_text_is_reported_with_file_and_line(tmp_path):
    from rlp_dist.data.stream import iter_documents

    bad = tmp_path / "c.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: invalid UTF-8"):
        list(iter_documents([bad]))
    bad.write_bytes(b'{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"c\.jsonl:2: not a JSON object with a 'text' string"):
        list(iter_documents([bad]))
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"ok \xff")
    with pytest.raises(ConfigError, match=r"d\.txt \(byte 3\): invalid UTF-8"):
        list(iter_documents([txt]))
