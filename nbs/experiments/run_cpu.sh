#!/usr/bin/env bash
# The CPU version of the entropy-collapse experiment (notebook 13). No GPU was available: this is
# a small run on a 2-core CPU shared with other jobs. Four losses from the same start (the embedded
# default model SmolLM2-135M-Instruct, the default arithmetic task, seed 0), two runs at a time
# with one thread each. Logs (metrics.jsonl, config.json) are copied to nbs/experiments/cpu/<algo>/.
# Run from the repository root:  bash nbs/experiments/run_cpu.sh
set -euo pipefail
RL=${RL:-"python -c 'import sys; from entropy_rl.cli import main; sys.exit(main())'"}
WORK=${WORK:-/tmp/entropy_rl_cpu_runs}
DEST=nbs/experiments/cpu
COMMON="--steps 10 --seed 0 prompts_per_step=4 group_size=4 max_new_tokens=16 lr=1e-5 minibatches=2 \
eval_every=10 eval_problems=32 save_every=0 progress=false plot=false resume=false"
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"
run() {  # $1 = loss name
  eval "$RL train --algo $1 --output-dir $WORK/$1 $COMMON" > "$WORK.$1.log" 2>&1
  mkdir -p "$DEST/$1"; cp "$WORK/$1/metrics.jsonl" "$WORK/$1/config.json" "$DEST/$1/"
  rm -rf "$WORK/$1/checkpoints"
}
mkdir -p "$WORK"
eval "$RL eval --model default --problems 32 --max-new-tokens 16 --seed 0" > "$DEST/base_eval.json"
for pair in "grpo clip_cov" "kl_cov bapo_paper"; do
  for algo in $pair; do run "$algo" & done
  wait
done
