#!/usr/bin/env bash
# Every zoo mechanism of chapters 16-19 switched on by name in a short real run on the default model (issue 17 item 4),
# against GRPO from the same start: SmolLM2-135M-Instruct (full fine-tuning), one-digit addition, seed 0, so every run
# starts from the same weights and sees the same first prompts; only the named stage differs. Short on purpose (STEPS=6,
# 4 prompts x 4 samples): it shows that each entry trains on a real model and what it does to entropy in a few steps,
# not which mechanism is better (chapter 13 says why one seed cannot tell). Two runs at a time, one thread each.
# Logs (metrics.jsonl, config.json) go to nbs/experiments/zoo/<name>/. Run from the repository root:
#   bash nbs/experiments/run_zoo_cpu.sh            (about 15 minutes on 2 idle CPU cores)
#   NAMES="ares_kl" bash nbs/experiments/run_zoo_cpu.sh   (only those entries: their timings lines are replaced and a
#                                                          section for the rerun is appended to device.txt; the other
#                                                          entries' logs, timings and device lines are kept)
#   SET=rollout bash nbs/experiments/run_zoo_cpu.sh       (issue 18's rollout-side entries — rollout structures,
#                                                          samplers, reward shapers — and a GRPO run of the same code,
#                                                          into nbs/experiments/zoo_rollout/)
set -euo pipefail
RL=${RL:-entropy-rl}
WORK=${WORK:-/tmp/entropy_rl_zoo_runs}
STEPS=${STEPS:-6}
SET=${SET:-loss}
DEST=nbs/experiments/$([ "$SET" = rollout ] && echo zoo_rollout || echo zoo)
COMMON="--steps $STEPS --seed 0 --fresh prompts_per_step=4 group_size=4 max_new_tokens=16 lr=2e-5 minibatches=2 progress=false plot=false"
# name -> the overrides that switch it on (each entry with its registered defaults)
declare -A RUNS=(
  [grpo]="algo=grpo"
  [cispo]="algo=cispo" [sapo]="algo=sapo" [hapo_clip]="algo=hapo_clip" [entropy_balanced]="algo=entropy_balanced"
  [steer]="algo=steer" [hapo]="algo=hapo" [lp_reg]="algo=lp_reg" [lp_reg_fullvocab]="algo=lp_reg_fullvocab"
  [empg_token]="advantage=empg_token" [empg_segment]="advantage=empg_segment" [canon]="advantage=canon"
  [riskpo]="advantage=riskpo" [hapo_token_level]="advantage=hapo_token_level"
  [siren]="regularizers.siren.coef=0.005" [spine_band]="regularizers.spine_band.coef=0.01"
  [ares_kl]="regularizers.ares_kl.coef=0.01"
  # rollout side (SET=rollout): CURE with n2=1 keeps the group at 4 rows (2 originals + 2 branches), so the cost per
  # step stays that of GRPO's 4 samples; AEPO's N_R = 1 is the released 2.3% share of 16 samples, at least one
  [cure]="rollout_structure=cure rollout_structure_options.n2=1" [aepo]="recipe=aepo"
  [eb_tree]="rollout_structure=eb_tree"
)
SUBSET=${NAMES:+1}
DEFAULT_NAMES="grpo cispo sapo hapo_clip entropy_balanced steer hapo lp_reg lp_reg_fullvocab empg_token empg_segment canon riskpo hapo_token_level siren spine_band ares_kl"
[ "$SET" = rollout ] && DEFAULT_NAMES="grpo cure aepo eb_tree"
NAMES=(${NAMES:-$DEFAULT_NAMES})
export OMP_NUM_THREADS=1
mkdir -p "$DEST" "$WORK"
run() {  # $1 = entry name
  local t0=$SECONDS
  $RL train --output-dir "$WORK/$1" $COMMON ${RUNS[$1]} > "$WORK/$1.log" 2>&1 || { echo "$1: FAILED (see $WORK/$1.log)" >> "$DEST/timings.txt"; return; }
  mkdir -p "$DEST/$1"
  cp "$WORK/$1/metrics.jsonl" "$WORK/$1/config.json" "$DEST/$1/"
  rm -rf "$WORK/$1/checkpoints"
  echo "$1: $((SECONDS - t0)) s" >> "$DEST/timings.txt"
}
if [ -n "$SUBSET" ]; then   # a rerun of some entries: keep the others' lines
  touch "$DEST/timings.txt"
  for name in "${NAMES[@]}"; do grep -v "^$name: " "$DEST/timings.txt" > "$DEST/timings.tmp" || true; mv "$DEST/timings.tmp" "$DEST/timings.txt"; done
  echo "--- rerun of: ${NAMES[*]}" >> "$DEST/device.txt"
else
  : > "$DEST/timings.txt"; : > "$DEST/device.txt"
fi
{ echo "date: $(date -u +%FT%TZ)"; echo "device: CPU ($(nproc --all) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU";
  python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  echo "code: entropy_rl at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)";
  echo "command: ${SUBSET:+NAMES=\"${NAMES[*]}\" }SET=$SET bash nbs/experiments/run_zoo_cpu.sh (STEPS=$STEPS)"; } >> "$DEST/device.txt"
for ((i = 0; i < ${#NAMES[@]}; i += 2)); do   # two runs at a time
  for name in "${NAMES[@]:i:2}"; do run "$name" & done
  wait
done
