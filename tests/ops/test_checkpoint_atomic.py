"""CheckpointManager's atomic save on a real DeepSpeed ZeRO-3 engine (2 gloo ranks, in-process crash).

A save that dies halfway through DeepSpeed's files (on every rank torch.save writes half of the
optimizer-state file, then raises — at the same point on both ranks, so nobody waits in a barrier)
leaves ``latest`` on the previous tag, which loads back exactly (weights, client state, the
rank file's RNG). A missing ``latest`` falls back to the newest complete tag; stale ``.tmp``
folders are ignored by resume and removed by the next save.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
from helpers.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _engine():
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    # A torch optimizer, as train.py uses (DeepSpeed's own AdamW would JIT-build an op on CPU).
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                      optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    return engine


def _train_step(engine, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, generator=g)
    loss = engine(x).pow(2).mean()
    engine.backward(loss)
    engine.step()


def _full_weights(engine) -> list[torch.Tensor]:
    import deepspeed

    out = []
    for p in engine.module.parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out.append(p.detach().clone())
    return out


def _crash_then_resume(run_dir: str):
    import deepspeed
    import torch.distributed as dist

    from rlp_dist.checkpoint.manager import CheckpointManager

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    engine = _engine()
    ck = CheckpointManager(run_dir, rank)
    _train_step(engine, 1)
    torch.manual_seed(100 + rank)
    ck.save(engine, 1, {"step": 1, "marker": "one"}, {"teacher": {"rank": rank}})
    saved = _full_weights(engine)
    rng_after_save = torch.rand(3)
    _train_step(engine, 2)

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith("optim_states.pt"):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            with open(f, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError("injected crash mid-write")
        return real_save(obj, f, *a, **k)

    torch.save = dying_save
    crashed = False
    try:
        ck.save(engine, 2, {"step": 2, "marker": "two"}, {"teacher": {"rank": rank}})
    except OSError:
        crashed = True
    finally:
        torch.save = real_save
    return crashed, saved, rng_after_save, ck.latest_tag(), sorted(os.listdir(ck.dir))


def _load_latest(run_dir: str):
    import deepspeed
    import torch.distributed as dist

    from rlp_dist.checkpoint.manager import CheckpointManager

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    engine = _engine()
    _train_step(engine, 7)  # different weights than any checkpoint
    ck = CheckpointManager(run_dir, rank)
    client, rank_state = ck.load(engine)
    weights = _full_weights(engine)
    rng = torch.rand(3)
    _train_step(engine, 3)
    tag = ck.save(engine, 3, {"step": 3}, {"teacher": None})  # cleans the stale .tmp
    return client["step"], client["marker"], rank_state["teacher"], weights, rng, tag, sorted(os.listdir(ck.dir))


def test_checkpoint_crash_mid_write_keeps_previous_loadable_for_resume(tmp_path):
    run = str(tmp_path / "run")
    results = run_ranks(_crash_then_resume, 2, (run,), timeout=150)
    assert all(r[0] for r in results), "the injected crash did not happen"
    assert all(r[3] == "step_00000001" for r in results)
    ckdir = tmp_path / "run" / "checkpoints"
    assert (ckdir / "latest").read_text() == "step_00000001"
    assert (ckdir / "step_00000002.tmp").is_dir() and not (ckdir / "step_00000002").exists()

    loaded = run_ranks(_load_latest, 2, (run,), timeout=150)
    for rank, (step, marker, teacher, weights, rng, tag, listing) in enumerate(loaded):
        assert (step, marker, teacher) == (1, "one", {"rank": rank})
        _, saved, rng_after_save, *_ = results[rank]
        assert all(torch.equal(a, b) for a, b in zip(weights, saved)), "weights differ from step 1"
        assert torch.equal(rng, rng_after_save), "RNG state not restored from the rank file"
        assert tag == "step_00000003"
        assert "step_00000002.tmp" not in listing and "step_00000003" in listing

    # Without 'latest' (e.g. lost), resume takes the newest complete tag, never a .tmp one.
    from rlp_dist.checkpoint.manager import CheckpointManager

    (ckdir / "latest").unlink()
    (ckdir / "step_00000009.tmp").mkdir()
    assert CheckpointManager(run, 0).latest_tag() == "step_00000003"
