"""`rlp-dist plan`: the memory model against measured peaks, the paper's recipe fitting on 80 GB, the CLI.

Calibration: each shape runs in a fresh process (``python tests/unit/test_plan.py SPEC``) that builds a
Qwen3-1.7B-wide model (H=2048, 16/8 heads, F=6144, fp32 on CPU; one layer at V=151936, four at a small V so
that the activations dominate), gives every
parameter a zero gradient (so the backward accumulates in place, as in training after the first step),
and samples its RSS every millisecond while one policy-gradient forward + backward of the training path
(``shared_prefix.policy_logprobs``: packed shared-prefix row, SDPA branches, fused chunked log-probs)
runs. The measured peak minus the RSS before it must be within 25% of the plan's activations + log-prob
workspace for that shape (``memory.policy_activations`` + the layer's fresh gradients + the log-prob part,
``max(logprob_workspace, output_grads_end - activations)``, all with a 4-byte dtype).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)
WIDE = ["+model=qwen3_1_7b"]
SHAPES = [  # (P, G, L, recompute, vocab, layers): the real vocabulary (log-prob/output-gradient bound), then a
    # small one and four layers so that the layer activations dominate, without and with full recompute
    (256, 4, 16, "none", 151936, 1),
    (512, 4, 16, "none", 8192, 4),
    (512, 4, 16, "full", 8192, 4),
]


def measure(p: int, g: int, big_l: int, recompute: str, vocab: int, layers: int) -> dict:
    """Run in a fresh process: measured peak RSS delta of one policy fwd+bwd, and the plan's prediction."""
    import threading
    import time

    import psutil
    import torch

    from rlp_dist.config import compose
    from rlp_dist.distributed.parallel import init_distributed
    from rlp_dist.models.builder import build_model
    from rlp_dist.perf import memory as M
    from rlp_dist.rlp import shared_prefix
    from rlp_dist.rlp.rollout import RolloutBatch

    init_distributed(1, 1)
    cfg = compose(WIDE + [f"model.recompute={recompute}", f"model.vocab_size={vocab}", f"model.num_layers={layers}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    for prm in model.parameters():
        prm.grad = torch.zeros_like(prm)
    v, n = cfg.model.vocab_size, g
    gen = torch.Generator().manual_seed(0)
    ro = RolloutBatch(prefix=torch.randint(8, v, (1, p), generator=gen),
                      next_tokens=torch.randint(8, v, (1,), generator=gen),
                      thoughts=torch.randint(8, v, (n, big_l), generator=gen), mask=torch.ones(n, big_l),
                      behaviour_logp=torch.zeros(n, big_l), closed=torch.ones(n, dtype=torch.bool),
                      s_pred=torch.zeros(n), group_size=g)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    logp = shared_prefix.policy_logprobs(ro, model, shared=True, temperature=0.7)  # (G, L)
    (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    lay = M.Layout(world=1, dtype_bytes=4, recompute=recompute, contexts_per_micro_batch=1)
    layers = M.stage_layers(cfg.model, 1)[0]
    act = M.policy_activations(cfg.model, lay, layers, p, g, big_l)
    act += 4 * max(M.layer_params(cfg.model, k, 1) for k in layers)  # the backward's fresh layer gradients
    lp = max(M.logprob_workspace(cfg.model, lay, g, big_l), M.output_grads_end(cfg.model, lay, 0) - act)
    return {"measured_gb": (peak[0] - base) / 1e9, "activations_gb": act / 1e9, "logprob_gb": lp / 1e9,
            "predicted_gb": (act + lp) / 1e9, "seconds": seconds}


def _run_shape(shape) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    from helpers.spawn import free_port

    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(free_port()))
    out = subprocess.run([sys.executable, HERE, json.dumps(shape)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}-G{}-L{}-{}-V{}-layers{}".format(*s))
def test_activation_and_logprob_prediction_within_25pct_of_measured(shape):
    r = _run_shape(shape)
    print(f"shape {shape}: measured {r['measured_gb']:.3f} GB, predicted {r['predicted_gb']:.3f} GB "
          f"(activations {r['activations_gb']:.3f}, log-prob {r['logprob_gb']:.3f}), {r['seconds']:.1f} s")
    assert abs(r["predicted_gb"] - r["measured_gb"]) <= 0.25 * r["measured_gb"]


if __name__ == "__main__":
    print(json.dumps(measure(*json.loads(sys.argv[1]))))
