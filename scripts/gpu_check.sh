#!/usr/bin/env bash
# The GPU check, on a lent CUDA machine (Python 3.12, torch+CUDA, triton, transformers; no network).
# Prepare once on a CPU machine with PyPI: `scripts/gpu_wheels.sh` (fills .whl/gpu, git-ignored), then on
# the GPU machine (the device tool: carry=[".whl/gpu"]):   bash scripts/gpu_check.sh [OUT_DIR]
# Installs the wheels into a private folder (PYTHONPATH, nothing system-wide), mamba-ssm Python-only (its
# Triton kernels; the CUDA extension is not built) and causal-conv1d if it compiles within its time box,
# then runs: tests/gpu, the kernel parity tests on CUDA (log-prob op and Mamba ops vs their references,
# fwd+bwd, fp32 and bf16), the memory and rollout benchmarks, and a short bf16 RLP run of both tiny
# presets. Every step has a time box (all within ~8 minutes); one JSON summary: OUT_DIR/gpu_check.json.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUT"
DEPS="$OUT/deps"
mkdir -p "$DEPS"
SUMMARY="$OUT/gpu_check.json"
PY="${PYTHON:-python3}"
export OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled HF_HUB_OFFLINE=1
export PYTHONPATH="$DEPS:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions"
declare -A STATUS SECONDS_TAKEN

step() {  # step NAME TIMEOUT_S CMD...: run, log to OUT/NAME.log, record status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  STATUS[$name]=$rc
  SECONDS_TAKEN[$name]=$((SECONDS - t0))
  echo "gpu_check: $name rc=$rc (${SECONDS_TAKEN[$name]} s)" >&2
}

# 1. the stack: wheels into $DEPS; our package importable as rlp_dist + rlp_kernels (kernels/)
step install 120 bash -c "
  $PY -m pip install --no-index --no-deps --target '$DEPS' .whl/gpu/*.whl &&
  ln -sfn '$ROOT/kernels' '$DEPS/rlp_kernels' &&
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $PY -m pip install --no-index --no-deps --no-build-isolation \
      --target '$DEPS' .whl/gpu/mamba_ssm-*.tar.gz"
step causal_conv1d 150 bash -c "
  command -v nvcc >/dev/null && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 $PY -m pip install --no-index --no-deps \
      --no-build-isolation --target '$DEPS' .whl/gpu/causal_conv1d-*.tar.gz"
step env 60 "$PY" - <<'EOF'
import json, torch
from rlp_kernels import dispatch
dev = torch.device("cuda")
print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "backends": {op: dispatch.backend(op, dev) for op in dispatch._FAST}}))
EOF

# 2. tests on CUDA: the gpu-marked tests and the kernel parity tests (their CUDA parametrisations)
step tests_gpu 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/gpu
step tests_kernels 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels

# 3. benchmarks (JSON each): memory of one policy micro-batch at the paper's thought shape, rollouts
step bench_memory 150 "$PY" -m rlp_dist.bench memory --shapes 8x1024x1024,16x2048x2048 --layers 2 \
  --json "$OUT/bench_memory.json"
step bench_logprob 60 "$PY" -m rlp_dist.bench logprob --device cuda --dtype bfloat16 --n 32768 --hidden 2048 \
  --json "$OUT/bench_logprob.json"
step bench_rollout 120 "$PY" -m rlp_dist.bench rollout --repeats 1 --json "$OUT/bench_rollout.json"

# 4. a short bf16 RLP run of both tiny presets (one process, nccl)
for preset in tiny_transformer tiny_hybrid; do
  step "run_$preset" 90 "$PY" launch/pretrain.py "+model=$preset" train.steps=3 train.dtype=bf16 \
    logging.wandb_mode=disabled "run.dir=$OUT/runs/$preset"
done

# 5. one summary
status_json="{"; for k in "${!STATUS[@]}"; do status_json+="\"$k\": {\"rc\": ${STATUS[$k]}, \"s\": ${SECONDS_TAKEN[$k]}},"; done
status_json="${status_json%,}}"
"$PY" - "$OUT" "$status_json" > "$SUMMARY" <<'EOF'
import json, pathlib, sys
out, steps = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
summary = {"steps": steps}
for name in ("bench_memory", "bench_logprob", "bench_rollout"):
    p = out / f"{name}.json"
    summary[name] = json.loads(p.read_text()) if p.is_file() else None
env = (out / "env.log").read_text().strip().splitlines() if (out / "env.log").is_file() else []
summary["env"] = json.loads(env[-1]) if env and env[-1].startswith("{") else None
for preset in ("tiny_transformer", "tiny_hybrid"):
    m = out / "runs" / preset / "metrics.jsonl"
    summary[f"run_{preset}"] = [json.loads(x) for x in m.read_text().splitlines()][-1] if m.is_file() else None
for name in ("tests_gpu", "tests_kernels"):
    log = (out / f"{name}.log").read_text().strip().splitlines() if (out / f"{name}.log").is_file() else [""]
    summary[name] = log[-1] if log else ""
print(json.dumps(summary, indent=2))
EOF
cat "$SUMMARY"
