#!/usr/bin/env bash
# The CPU version of the entropy-collapse experiment (notebook 13): about half an hour for the four runs on
# 2 idle CPU cores, about an hour on a busy machine (STEPS=15 halves it). Four losses from the same start: the embedded default model (SmolLM2-135M-Instruct,
# full fine-tuning), the default task (one-digit addition), seed 0, so every run starts from the same
# weights and sees the same prompts; only --algo differs. Two runs at a time, one thread each.
# Each run is then scored on held-out problems (40 problems x 8 samples, pass@1), as is the start model.
# Logs (metrics.jsonl, config.json, eval.json) go to nbs/experiments/cpu/<algo>/.
# Run from the repository root:  bash nbs/experiments/run_cpu.sh
set -euo pipefail
RL=${RL:-entropy-rl}
WORK=${WORK:-/tmp/entropy_rl_cpu_runs}
SEED=${SEED:-0}                                  # SEED=1 ALGOS="grpo clip_cov" repeats two runs with other samples
ALGOS=(${ALGOS:-grpo clip_cov kl_cov bapo_paper})
DEST=nbs/experiments/cpu; [ "$SEED" != 0 ] && DEST=$DEST/seed$SEED
STEPS=${STEPS:-30}
COMMON="--steps $STEPS --seed $SEED --fresh prompts_per_step=8 group_size=4 max_new_tokens=16 lr=2e-5 minibatches=2 \
save_every=10 progress=false plot=false"
EVAL="--problems 40 --samples 8 --seed 1"
export OMP_NUM_THREADS=1
mkdir -p "$DEST" "$WORK/$SEED"
run() {  # $1 = loss name
  local t0=$SECONDS
  $RL train --algo "$1" --output-dir "$WORK/$SEED/$1" $COMMON > "$WORK/$1.log" 2>&1
  mkdir -p "$DEST/$1"
  $RL eval "$WORK/$SEED/$1" $EVAL > "$DEST/$1/eval.json" 2>> "$WORK/$1.log"
  cp "$WORK/$SEED/$1/metrics.jsonl" "$WORK/$SEED/$1/config.json" "$DEST/$1/"
  rm -rf "$WORK/$SEED/$1/checkpoints"
  echo "$1: $((SECONDS - t0)) s" >> "$DEST/timings.txt"
}
: > "$DEST/timings.txt"
{ echo "date: $(date -u +%FT%TZ)"; echo "device: CPU ($(nproc --all) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU"; 
  python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  echo "code: entropy_rl at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"; } > "$DEST/device.txt"
[ -s nbs/experiments/cpu/base_eval.json ] || $RL eval --model default $EVAL > nbs/experiments/cpu/base_eval.json 2> "$WORK/base.log"
for ((i = 0; i < ${#ALGOS[@]}; i += 2)); do   # two runs at a time
  for algo in "${ALGOS[@]:i:2}"; do run "$algo" & done
  wait
done
