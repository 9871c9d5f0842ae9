#!/usr/bin/env bash
# The main job, tiny: RLP on the bundled corpus, 2 ranks under the deepspeed launcher.
# Extra arguments are Hydra overrides, e.g. scripts/run_tiny.sh train.steps=50
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec deepspeed --num_gpus 2 launch/pretrain.py +model=tiny_transformer rlp=tiny train.steps=20 \
  optim.lr=1e-4 run.dir=runs/tiny checkpoint.every=10 "$@"
