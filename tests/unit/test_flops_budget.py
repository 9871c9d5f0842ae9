"""train.flops_budget: the compute-matched CPT baseline's step count from an FLOP budget or an RLP run."""

import json
import math

import pytest

from rlp_dist.config import compose
from rlp_dist.config.schema import ConfigError
from rlp_dist.perf import flops
from rlp_dist.train import apply_flops_budget

NTP = ["+model=tiny_transformer", "objective=ntp", "ntp.seq_len=64", "ntp.sequences_per_step=4"]


def test_budget_number_sets_the_steps_that_spend_it():
    cfg = compose(NTP + ["train.flops_budget=1e12"])
    per_step = flops.step_flops(cfg)["total"]
    apply_flops_budget(cfg)
    assert cfg.train.steps == math.ceil(1e12 / per_step)
    assert (cfg.train.steps - 1) * per_step < 1e12 <= cfg.train.steps * per_step


def test_budget_from_an_rlp_run_directory(tmp_path):
    rows = [{"step": 1, "perf/flops_total": 2.0e11}, {"step": 2, "perf/flops_total": 4.5e11}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(NTP + [f"train.flops_budget={tmp_path}"])
    apply_flops_budget(cfg)
    assert cfg.train.steps == math.ceil(4.5e11 / flops.step_flops(cfg)["total"])


@pytest.mark.parametrize("extra, words", [
    (["train.flops_budget=/nonexistent/run"], "neither a number nor a run directory"),
    (["train.flops_budget=-5"], "positive"),
    (["train.flops_budget=inf"], "finite"),
])
def test_bad_budgets_are_one_line_errors(extra, words):
    cfg = compose(NTP + extra)
    with pytest.raises(ConfigError, match=words):
        apply_flops_budget(cfg)


def test_budget_run_directory_skips_a_torn_last_line_and_refuses_damage_inside(tmp_path):
    good = [json.dumps({"step": 1, "perf/flops_total": 2.0e11}), json.dumps({"step": 2, "perf/flops_total": 4.5e11})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 3, "perf/flo')  # killed mid-write
    cfg = compose(NTP + [f"train.flops_budget={tmp_path}"])
    apply_flops_budget(cfg)
    assert cfg.train.steps == math.ceil(4.5e11 / flops.step_flops(cfg)["total"])
    (tmp_path / "metrics.jsonl").write_text(good[0] + "\n{not json\n" + good[1] + "\n")
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        apply_flops_budget(compose(NTP + [f"train.flops_budget={tmp_path}"]))


def test_budget_is_for_the_ntp_objective():
    cfg = compose(["+model=tiny_transformer", "train.flops_budget=1e12"])
    with pytest.raises(ConfigError, match="objective=ntp"):
        apply_flops_budget(cfg)
