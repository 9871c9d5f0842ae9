"""rlp-dist eval / compare / make-demo-data: the summary arithmetic against hand-computed values,
position drawing and the positions file, the compare table and its FLOPs axis, the demo corpus'
structure under the bundled tokenizer, and the eval config's one-line errors. CPU, no model."""

import json
import math
import re

import numpy as np
import pytest
import torch

from rlp_dist.config.schema import ConfigError, EvalConfig
from rlp_dist.eval.core import EvalData, _Chunk, draw_positions, load_eval_data, summarize


def _chunk(no, s_pred, ema=None):
    s = torch.tensor(s_pred)
    return _Chunk(np.arange(len(no)), torch.tensor(no), None if ema is None else torch.tensor(ema), s,
                  torch.full(s.shape, 2), torch.tensor([[True, False]] * len(no)))


def test_summary_matches_hand_computation():
    # two positions, G=2: S_no = (-2, -1); S_pred = [[-1, -3], [0, -1]]
    out = summarize([_chunk([-2.0, -1.0], [[-1.0, -3.0], [0.0, -1.0]], ema=[-2.5, -0.5])], 2)
    lme = [math.log((math.exp(-1) + math.exp(-3)) / 2), math.log((1 + math.exp(-1)) / 2)]
    assert out["positions"] == 2
    assert out["nll_no_think"] == pytest.approx(1.5)
    assert out["nll_think_per_thought"] == pytest.approx(1.25)
    assert out["nll_think"] == pytest.approx(-sum(lme) / 2, abs=1e-6)
    assert out["gain_mean"] == pytest.approx((1 - 1 + 1 + 0) / 4)  # S_pred - S_no per thought
    assert out["gain_lme_mean"] == pytest.approx((lme[0] + 2 + lme[1] + 1) / 2, abs=1e-6)
    assert out["gain_pos_frac"] == pytest.approx(2 / 4)  # gains +1, -1, +1, 0: two strictly positive
    assert out["gain_ctx_pos_frac"] == pytest.approx(1.0)
    assert out["closed_frac"] == pytest.approx(0.5) and out["thought_len_mean"] == pytest.approx(2.0)
    assert out["nll_no_think_ema"] == pytest.approx(1.5)
    assert out["reward_mean"] == pytest.approx(((-1 + 2.5) + (-3 + 2.5) + (0 + 0.5) + (-1 + 0.5)) / 4)


def test_draw_positions_seeded_and_full_context():
    data = EvalData(np.arange(100), np.array([0, 50]))
    a, b = draw_positions(data, 10, 8, seed=3), draw_positions(data, 10, 8, seed=3)
    assert (a == b).all() and len(set(a.tolist())) == 10 and a.min() >= 8
    assert not (draw_positions(data, 10, 8, seed=4) == a).all()
    assert draw_positions(data, 0, 8, 0).tolist() == list(range(8, 100))  # all
    docs, inside = data.locate(np.array([8, 49, 50, 99]))
    assert docs.tolist() == [0, 0, 1, 1] and inside.tolist() == [8, 49, 0, 49]
    with pytest.raises(ConfigError, match="200 tokens before it"):
        draw_positions(data, 5, 200, 0)


@pytest.fixture(scope="module")
def tokenizer():
    from rlp_dist.data.tokenizer import load_tokenizer

    return load_tokenizer("bundled")


def test_positions_key_indexes_document_tokens(tmp_path, tokenizer):
    f = tmp_path / "e.jsonl"
    f.write_text(json.dumps({"text": " a = 1 b = 2", "at": [2, 5]}) + "\n" + json.dumps({"text": " c = 3", "at": [2]}) + "\n")
    eos = tokenizer.eos_token_id
    d = load_eval_data(str(f), tokenizer, eos, positions_key="at")
    ids = [tokenizer.encode(" a = 1 b = 2", add_special_tokens=False), tokenizer.encode(" c = 3", add_special_tokens=False)]
    assert d.tokens.tolist() == ids[0] + [eos] + ids[1] + [eos]
    assert d.candidates.tolist() == [2, 5, len(ids[0]) + 1 + 2]
    assert [tokenizer.decode([int(d.tokens[t])]) for t in d.candidates] == [" 1", " 2", " 3"]
    f.write_text(json.dumps({"text": " a = 1", "at": [9]}) + "\n")
    with pytest.raises(ConfigError, match="outside the document"):
        load_eval_data(str(f), tokenizer, eos, positions_key="at")


def test_demo_corpus_structure(tmp_path, tokenizer):
    from rlp_dist.demo.data import FACTS_PER_DOC, generate

    d = generate(str(tmp_path), seed=5, warm_docs=20, rlp_docs=4, eval_docs=6, thought_accuracy=0.3)
    meta = json.loads((d / "meta.json").read_text())
    g, f, held = meta["g"], meta["f"], set(meta["x_held"])
    think, close = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    for line in (d / "eval.jsonl").read_text().splitlines():
        doc = json.loads(line)
        ids = tokenizer.encode(doc["text"], add_special_tokens=False)
        assert len(ids) == 3 * FACTS_PER_DOC  # every symbol is one token: x, =, z per fact
        toks = [tokenizer.decode([i]).strip() for i in ids]
        expect = [3 * i + 2 for i in range(FACTS_PER_DOC) if toks[3 * i] in held]
        assert doc["think_positions"] == expect
        for p in expect:  # the answer is f(g(x)): two lookups
            assert toks[p] == f[g[toks[p - 2]]]
    n_worked = n_right = 0
    for line in (d / "warm.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        worked = re.findall(r"<think></think> (\w)<think></think> =<think> (\w)</think> (\d)", text)
        plain = re.findall(r" (\w) = (\d)", text)
        assert sorted([len(worked), len(plain)]) == [0, FACTS_PER_DOC]  # a document is all worked or all plain
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 10 * len(worked) + 3 * len(plain)
        assert ids.count(think) == ids.count(close) == 3 * len(worked)  # two empty thoughts + the worked one
        assert all(z == f[y] for _, y, z in worked)  # the answer follows from the thought written
        assert all(x in meta["x_plain"] and z == f[g[x]] for x, z in plain)  # never a plain X_held fact
        n_worked += len(worked)
        n_right += sum(y == g[x] for x, y, _ in worked)
    assert 0.2 < n_right / n_worked < 0.45  # thought_accuracy 0.3 (+ 0.7/16 right by chance)
    with pytest.raises(ValueError, match="thought-accuracy"):
        generate(str(tmp_path), thought_accuracy=1.5)


def test_compare_places_eval_points_at_cumulative_flops(tmp_path):
    from rlp_dist.eval.compare import markdown_table, run_series

    run = tmp_path / "a"
    run.mkdir()
    rows = [{"step": 1, "perf/flops_total": 10.0}, {"step": 2, "perf/flops_total": 20.0},
            {"step": 2, "eval/gain_mean": 0.5}, {"step": 3, "perf/flops_total": 30.0}, {"step": 4, "eval/gain_mean": 0.9}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = run_series(str(run), ["eval/gain_mean"])
    assert s["x"] == "flops" and s["points"]["eval/gain_mean"] == [(20.0, 0.5), (30.0, 0.9)]
    bare = tmp_path / "b"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 5, "eval/gain_mean": 0.1}) + "\n")
    sb = run_series(str(bare), ["eval/gain_mean"])
    assert sb["x"] == "step" and sb["points"]["eval/gain_mean"] == [(5.0, 0.1)]
    table = markdown_table(["a", "b"], [s, sb], ["eval/gain_mean"])
    assert "| a | flops | 3.000e+01 | 0.9000 |" in table and "| b | step | n/a | 0.1000 |" in table
    assert "no perf/flops_total" in table


def test_compare_cli_writes_png_and_errors(tmp_path, capsys):
    from rlp_dist import cli

    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "perf/flops_total": 5.0, "eval/gain_mean": 0.2}) + "\n")
    assert cli.main(["compare", str(run), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "compare.png").stat().st_size > 0 and (tmp_path / "o" / "compare.md").exists()
    assert cli.main(["compare", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_eval_config_errors():
    with pytest.raises(ConfigError, match="eval.data"):
        EvalConfig(every=10)
    with pytest.raises(ConfigError, match="eval.positions"):
        EvalConfig(positions=-1)
    assert EvalConfig(every=5, data="x.jsonl").every == 5


def test_contexts_respect_document_boundaries():
    from rlp_dist.eval.core import contexts_at

    # two documents: [10 11 12 EOS] [20 21 22 23 24 25 EOS]; starts 0 and 4
    data = EvalData(np.array([10, 11, 12, 0, 20, 21, 22, 23, 24, 25, 0]), np.array([0, 4]))
    assert data.eligible(3, respect=True).tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10]  # >= 1 token of its document
    assert data.eligible(3, respect=False).tolist() == list(range(3, 11))
    ctx, lengths = contexts_at(data, np.array([2, 5, 9]), 3, True, pad_id=-1)
    assert lengths.tolist() == [2, 1, 3]  # the document's prefix, its last <= 3 tokens
    assert ctx.tolist() == [[10, 11, -1], [20, -1, -1], [22, 23, 24]]  # right-padded
    ctx, lengths = contexts_at(data, np.array([5]), 3, False, pad_id=-1)
    assert lengths is None and ctx.tolist() == [[12, 0, 20]]  # ignore: the stream window crosses documents
    full, none = contexts_at(data, np.array([8, 9]), 3, True, pad_id=-1)
    assert none is None and full.tolist() == [[21, 22, 23], [22, 23, 24]]  # all full: plain windows


def test_right_intermediate_share(tmp_path, tokenizer):
    from rlp_dist.demo.data import generate, right_intermediate_share

    d = generate(str(tmp_path), seed=1, warm_docs=2, rlp_docs=1, eval_docs=2)
    g = json.loads((d / "meta.json").read_text())["g"]
    doc = json.loads((d / "eval.jsonl").read_text().splitlines()[0])
    p = doc["think_positions"][0]
    x = tokenizer.decode([tokenizer.encode(doc["text"], add_special_tokens=False)[p - 2]]).strip()
    wrong = next(y for y in sorted(set(g.values())) if y != g[x])
    rec = {"document": 0, "position": p, "thoughts": [f" {g[x]}", f" {g[x]} = 1", f" {wrong}", ""]}
    (tmp_path / "positions.jsonl").write_text(json.dumps(rec) + "\n")
    out = right_intermediate_share(str(tmp_path / "positions.jsonl"), str(d), tokenizer)
    assert out["right"] == pytest.approx(2 / 4) and out["distinct"] == 4
