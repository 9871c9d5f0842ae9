"""The metrics facade with real wandb (offline: no network here): offline by default without an API
key, the resumed run continues the same wandb run id, the API key is never written to the run dir,
run config and the sample-thoughts table are logged; sys/* memory metrics; `rlp-dist plot`.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlp_dist.cli import main as cli
from rlp_dist.logging.metrics import Metrics
from rlp_dist.logging.samples import COLUMNS, sample_rows
from rlp_dist.logging.system import system_metrics

SECRET = "0123456789abcdef0123456789abcdef01234567"  # shaped like a wandb key (40 hex chars)
ROW = {"rlp/loss": 0.01, "rlp/reward_mean": 0.2, "rlp/s_pred_mean": -7.5, "rlp/s_ema_mean": -7.7,
       "rlp/thought_len_mean": 6.0, "optim/lr": 1e-4, "perf/step_s": 0.8, "sys/rss_gb": 1.5}


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "run"


def _offline_runs(run_dir):
    return sorted(p.name for p in (run_dir / "wandb_files" / "wandb").glob("offline-run-*"))


def test_wandb_offline_without_key_and_resume_keeps_run_id(wandb_env):
    run = wandb_env
    m = Metrics(str(run), True, 4, 0, "auto", config={"train": {"steps": 4}}, progress=False)
    assert m.wandb is not None and m.wandb.settings.mode == "offline"
    assert dict(m.wandb.config)["train"] == {"steps": 4}  # run config logged
    run_id = (run / "wandb_id").read_text()
    for step in (1, 2, 3):
        m.log(step, ROW)
    m.log_table(2, "samples", COLUMNS, [["ctx", "thought", "x", 0.1, -7.0, True]])
    m.log_table(3, "samples", COLUMNS, [["ctx3", "thought3", "y", 0.2, -7.1, False]])
    m.close()
    # Resume from step 2: metrics.jsonl and samples.jsonl are cut after the checkpoint; wandb continues
    # the same run.
    m = Metrics(str(run), True, 4, 2, "auto", config={"train": {"steps": 4}}, progress=False)
    assert m.wandb.id == run_id
    m.log(3, ROW)
    m.close()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    runs = _offline_runs(run)
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "context_tail": "ctx", "thought": "thought", "next_token": "x", "reward": 0.1,
                        "s_pred": -7.0, "closed": True}]


def test_wandb_api_key_never_written_to_run_dir(wandb_env, monkeypatch, capfd):
    run = wandb_env
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    m = Metrics(str(run), True, 2, 0, "offline", config={"run": {"dir": str(run)}}, progress=False)
    m.log(1, ROW)
    m.info("hello")
    m.close()
    out = capfd.readouterr()
    assert SECRET not in out.out + out.err
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) > 5, files  # wandb wrote its offline run here
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_system_metrics_report_this_process_memory():
    import psutil

    m = system_metrics(torch.device("cpu"))
    assert {"sys/rss_gb", "sys/rss_peak_gb", "sys/host_available_gb"} <= set(m)
    rss = psutil.Process().memory_info().rss / 2**30
    assert abs(m["sys/rss_gb"] - rss) < 0.1 and m["sys/rss_peak_gb"] >= m["sys/rss_gb"] - 0.01


def test_sample_rows_decode_context_thought_and_reward():
    from rlp_dist.data.tokenizer import load_tokenizer, thought_tokens
    from rlp_dist.rlp.rollout import RolloutBatch

    tok = load_tokenizer("bundled")
    mk = thought_tokens(tok, "<think>", "</think>", "", False)
    ctx = tok.encode("the cat sat on the", add_special_tokens=False)
    prefix = torch.tensor([ctx + list(mk.prefix_ids)])  # (1, P)
    t1 = tok.encode(" a mat", add_special_tokens=False)
    t2 = tok.encode(" hmm", add_special_tokens=False)
    L = 6
    thoughts = torch.full((2, L), mk.pad_id)
    thoughts[0, : len(t1) + 1] = torch.tensor(t1 + [mk.close_id])  # closed by the policy
    thoughts[1, : len(t2)] = torch.tensor(t2)  # ran out of budget (not closed)
    mask = (torch.arange(L)[None] < torch.tensor([[len(t1) + 1], [len(t2)]])).float()
    nxt = tok.encode(" mat", add_special_tokens=False)[:1]
    ro = RolloutBatch(prefix=prefix, next_tokens=torch.tensor(nxt), thoughts=thoughts, mask=mask,
                      behaviour_logp=torch.zeros(2, L), closed=torch.tensor([True, False]),
                      s_pred=torch.tensor([-1.0, -3.0]), group_size=2)
    rows = sample_rows(tok, mk, ro, torch.tensor([-2.0]), tail_tokens=3)
    assert rows[0][0] == tok.decode(ctx[-3:]) and rows[0][1] == tok.decode(t1) and rows[1][1] == tok.decode(t2)
    assert rows[0][2] == tok.decode(nxt)
    assert rows[0][3] == pytest.approx(1.0) and rows[1][3] == pytest.approx(-1.0)  # S_pred - S_ema
    assert [r[5] for r in rows] == [True, False]
    assert all(r != r for r in [sample_rows(tok, mk, ro, None)[0][3]])  # NaN without teacher scoring
    # prefixes of different lengths (several contexts per document): right-padded, tails per row
    short = tok.encode("the cat", add_special_tokens=False)
    padded = torch.zeros(2, prefix.shape[1], dtype=torch.long)
    padded[0, : len(short) + len(mk.prefix_ids)] = torch.tensor(short + list(mk.prefix_ids))
    padded[1] = prefix[0]
    ro2 = RolloutBatch(prefix=padded, next_tokens=torch.tensor(nxt * 2), thoughts=thoughts.repeat(2, 1),
                       mask=mask.repeat(2, 1), behaviour_logp=torch.zeros(4, L), closed=torch.tensor([True, False] * 2),
                       s_pred=torch.zeros(4), group_size=2,
                       prefix_lengths=torch.tensor([len(short) + len(mk.prefix_ids), prefix.shape[1]]))
    rows = sample_rows(tok, mk, ro2, None, tail_tokens=3)
    assert rows[0][0] == tok.decode(short[-3:]) and rows[2][0] == tok.decode(ctx[-3:])


def test_plot_writes_png_of_main_curves(tmp_path):
    m = Metrics(str(tmp_path), True, 5, 0, "disabled", progress=False)
    for s in range(1, 6):
        m.log(s, {**ROW, "rlp/loss": 0.01 * s})
    m.close()
    assert cli(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert cli(["plot", str(tmp_path / "missing")]) == 2  # one-line error, not a traceback
