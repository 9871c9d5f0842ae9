#!/usr/bin/env bash
# The first run that shows RLP learning (a few minutes on 2 CPU cores, one process per phase):
#   1. rlp-dist make-demo-data: a corpus where the answer of a fact x = z needs an intermediate letter
#      y = g(x) that a short thought can state (rlp_dist/demo/data.py explains the task);
#   2. NTP warm start of tiny_transformer on documents that contain (noisy) worked thoughts;
#   3. RLP from it (model.init_from) on plain documents without thoughts;
#   4. the same RLP run with the advantages shuffled within each step (the control; DEMO_CONTROL=0 skips it);
#   5. rlp-dist eval of each at the held-out positions where thinking can help, and a table.
# Environment: DEMO_DIR (default runs/demo; recreated), WARM_STEPS, RLP_STEPS, EVAL_POSITIONS, DEMO_SEED.
# Extra arguments are Hydra overrides for the two RLP runs, e.g. scripts/demo.sh optim.lr=5e-4
source "$(dirname "$0")/env.sh"
cd "$ROOT"
DIR="${DEMO_DIR:-runs/demo}"
WARM_STEPS="${WARM_STEPS:-300}"
RLP_STEPS="${RLP_STEPS:-60}"
POSITIONS="${EVAL_POSITIONS:-128}"
SEED="${DEMO_SEED:-0}"
COMMON=(+model=tiny_transformer rlp=demo train.seed="$SEED" logging.wandb_mode=disabled logging.progress=false
        checkpoint.every=0 eval.data="$DIR/data/eval.jsonl" eval.positions_key=think_positions
        eval.positions="$POSITIONS")
rm -rf "$DIR"
mkdir -p "$DIR"
set -x
rlp-dist make-demo-data --out "$DIR/data" --seed "$SEED"
python launch/pretrain.py "${COMMON[@]}" objective=ntp data.path="$DIR/data/warm.jsonl" ntp.seq_len=64 \
  ntp.sequences_per_step=16 ntp.sequences_per_micro_batch=16 optim.lr=3e-3 optim.warmup_steps=20 \
  train.steps="$WARM_STEPS" logging.log_every=50 eval.every="$WARM_STEPS" run.dir="$DIR/warm"
python launch/pretrain.py "${COMMON[@]}" model.init_from="$DIR/warm" data.path="$DIR/data/rlp.jsonl" \
  optim.lr=5e-4 train.steps="$RLP_STEPS" logging.log_every=10 eval.every=$(( (RLP_STEPS + 3) / 4 )) \
  run.dir="$DIR/rlp" "$@"
RUNS=("$DIR/warm" "$DIR/rlp")
if [ "${DEMO_CONTROL:-1}" != 0 ]; then
  python launch/pretrain.py "${COMMON[@]}" model.init_from="$DIR/warm" data.path="$DIR/data/rlp.jsonl" \
    optim.lr=5e-4 train.steps="$RLP_STEPS" logging.log_every=10 eval.every=$(( (RLP_STEPS + 3) / 4 )) \
    rlp.shuffle_advantages=true run.dir="$DIR/rlp_shuffled" "$@"
  RUNS+=("$DIR/rlp_shuffled")
fi
for run in "${RUNS[@]}"; do
  rlp-dist eval --run "$run" --data "$DIR/data/eval.jsonl" --positions-key think_positions \
    --positions "$POSITIONS" --out "$run/eval"
done
rlp-dist compare "${RUNS[@]}" --metrics eval/gain_mean,eval/nll_think_per_thought,eval/nll_no_think,eval/gain_pos_frac,eval/thought_len_mean \
  --out "$DIR"
set +x
python - "$DIR/data" "${RUNS[@]}" <<'EOF'
import json, sys
from rlp_dist.data.tokenizer import load_tokenizer
from rlp_dist.demo.data import right_intermediate_share
data_dir, paths = sys.argv[1], sys.argv[2:]
tok = load_tokenizer("bundled")
runs = [(r.rsplit("/", 1)[-1], json.load(open(f"{r}/eval/summary.json")),
         right_intermediate_share(f"{r}/eval/positions.jsonl", data_dir, tok)) for r in paths]
ref = runs[0][1]["nll_no_think"]  # the warm start's no-think: one fixed reference for every run
print("\nthink vs no-think at the held-out positions where a thought can help (nats, natural log):")
print(f"{'run':<13} {'no-think NLL':>12} {'think NLL':>10} {'gain':>7} {'gain vs warm no-think':>22} {'helping':>8} "
      f"{'len':>5} {'states g(x)':>12}  most frequent thought")
for name, s, r in runs:
    print(f"{name:<13} {s['nll_no_think']:>12.3f} {s['nll_think_per_thought']:>10.3f} {s['gain_mean']:>+7.3f} "
          f"{ref - s['nll_think_per_thought']:>+22.3f} {100 * s['gain_pos_frac']:>7.0f}% {s['thought_len_mean']:>5.2f} "
          f"{100 * r['right']:>11.0f}%  {r['top']!r}")
print("think NLL = -mean log p(x_t | x_<t, thought) over the G sampled thoughts; gain = no-think NLL - think NLL of "
      "the same model; helping = thoughts with a positive gain; states g(x) = thoughts whose first word is the right "
      "intermediate (a gain without it is a thought that hedges, not one that carries the information)")
EOF
