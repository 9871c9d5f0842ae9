"""`rlp-dist score` and `rlp-dist convert` end to end on checkpoints the parity tests never saw."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.spawn import run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "rlp_dist" / "assets" / "tokenizer"


def _reference_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits.float()
    return torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


@pytest.mark.distributed
def test_score_cli_pp2_matches_transformers(tmp_path):
    """A fresh hybrid checkpoint with the bundled tokenizer; text and pre-tokenized lines; --pp 2."""
    from transformers import AutoTokenizer, NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(7)
    model = NemotronHForCausalLM(NemotronHConfig(
        vocab_size=2048, hidden_size=32, intermediate_size=48, hybrid_override_pattern="M*-M-M",
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=4, mamba_head_dim=8,
        ssm_state_size=8, n_groups=1, chunk_size=4)).eval()
    model.save_pretrained(tmp_path / "hf")
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    lines = ["The quick brown fox jumps over the lazy dog.", json.dumps({"input_ids": [5, 900, 17, 2047, 3]}),
             "x"]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "rlp_dist.cli", "score", "--hf-dir", str(tmp_path / "hf"), "--text-file",
                    str(tmp_path / "in.txt"), "--pp", "2", "--out", str(tmp_path / "out.jsonl")],
                   check=True, env=env, cwd=ROOT, timeout=300)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert out[0]["tokens"] == tok.encode(lines[0], add_special_tokens=False)
    assert out[1]["tokens"] == [5, 900, 17, 2047, 3]
    assert len(out) == 3 and len(out[2]["logprobs"]) == len(out[2]["tokens"]) - 1
    for rec in out:
        if len(rec["tokens"]) < 2:
            continue
        ref = _reference_logprobs(model, rec["tokens"])
        diff = (torch.tensor(rec["logprobs"]) - ref).abs().max().item()
        print(f"score --pp 2 vs transformers: max |diff| {diff:.2e} over {len(ref)} tokens")
        assert diff <= 1e-4


def _convert_round_trip(hf_dir, work):
    from rlp_dist.models import convert

    convert.hf_to_ckpt(hf_dir, f"{work}/run")
    convert.ckpt_to_hf(f"{work}/run", f"{work}/back", hf_dir=hf_dir, which="student")
    convert.ckpt_to_hf(f"{work}/run", f"{work}/back_bf16", preset=None, hf_dir=hf_dir, dtype="bf16")
    return True


def test_convert_round_trip_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from rlp_dist.models.hf import SafetensorsReader

    torch.manual_seed(3)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "hf")
    run_ranks(_convert_round_trip, 1, (str(tmp_path / "hf"), str(tmp_path)))
    a, b = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "back")
    assert set(a.where) == set(b.where)
    for k in a.where:
        assert torch.equal(a.rows(k), b.rows(k)), k
    c = SafetensorsReader(tmp_path / "back_bf16")
    assert c.rows("model.embed_tokens.weight").dtype == torch.bfloat16
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
