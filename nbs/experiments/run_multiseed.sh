#!/usr/bin/env bash
# The multi-seed experiment of chapter 13b (issue 19): every method x every seed on the default model (SmolLM2-135M-Instruct,
# full fine-tuning, CPU), on a task where the rewarded tokens are often not the most likely ones, with settings that give
# the mechanisms room to act. Chapter 13b states each choice and its reason; the numbers it rests on are in
# nbs/experiments/multiseed/calibration.json (made by nbs/experiments/multiseed/calibrate.py).
#
#   bash nbs/experiments/run_multiseed.sh                               # the whole experiment (many CPU hours: it accumulates)
#   STEPS=10 SEEDS="0 1" METHODS="grpo clip_cov" bash nbs/experiments/run_multiseed.sh    # a quick look
#   EXTRA="model=tiny" STEPS=3 SEEDS=0 METHODS=grpo DEST=/tmp/d WORK=/tmp/w bash ...      # a smoke test of the script itself
#
# Runs go in priority order (the core methods before the zoo; seed 0 of every core method before seed 1), JOBS at a time
# (at most 2), one thread each, under `nice -n $NICE`. It resumes at two levels: a (method, seed) whose committed log
# already has STEPS steps and a held-out evaluation is skipped; an interrupted one continues from the checkpoint in its
# run directory under $WORK (the trainer resumes from output_dir by default). Checkpoints (~1.6 GB each) stay under
# $WORK and are deleted once a run is finished and copied; only metrics.jsonl, config.json, eval.json, run.json and
# sessions.jsonl are copied into $DEST/<method>/seed<k>/ (nbs/experiments/multiseed/ for the full STEPS, .../quick/ for
# fewer), also after an interruption, so a partial run's log is never lost. Run from the repository root.
set -uo pipefail
RL=${RL:-entropy-rl}
FULL_STEPS=60
STEPS=${STEPS:-$FULL_STEPS}
SEEDS=(${SEEDS:-0 1 2})
JOBS=${JOBS:-2}; (( JOBS >= 1 && JOBS <= 2 )) || { echo "JOBS must be 1 or 2" >&2; exit 2; }
NICE=${NICE:-10}
WORK=${WORK:-/tmp/entropy_rl_multiseed_runs}
if [ "$STEPS" = "$FULL_STEPS" ]; then TAG=full; DEST=${DEST:-nbs/experiments/multiseed}; else TAG=quick$STEPS; DEST=${DEST:-nbs/experiments/multiseed/quick}; fi
EVAL_ARGS="--problems 50 --k 4 --samples 8 --seed 1"   # held-out: 50 problems x 8 samples, pass@1 and pass@4
# The fixed design (chapter 13b says why each value): the task, 8 prompts x 4 samples, 16 new tokens, 4 optimizer steps
# per rollout batch, lr 2e-5, token-mean aggregation for every loss.
TASK="task_options.min_digits=1 task_options.max_digits=2 task_options.operators=[+]"
COMMON="$TASK prompts_per_step=8 group_size=4 max_new_tokens=16 lr=2e-5 minibatches=4 epochs_per_step=1 \
loss_options.aggregation=token-mean save_every=10 keep_checkpoints=1 progress=false plot=false ${EXTRA:-}"
# method -> the overrides that make it (on top of COMMON); selection fractions scaled to this batch, the paper's as reference rows
declare -A RUNS=(
  [grpo]="algo=grpo"
  [clip_cov]="algo=clip_cov loss_options.clip_ratio=0.05"
  [kl_cov]="algo=kl_cov loss_options.k=0.05"
  [clip_higher]="algo=grpo loss_options.clip_high=0.28"
  [bapo]="algo=bapo_paper"
  [entropy_bonus]="algo=grpo regularizers.entropy.coef=0.01"
  [entropy_bonus_small]="algo=grpo regularizers.entropy.coef=0.001"
  [siren]="algo=grpo regularizers.siren.coef=0.05"
  [clip_cov_paper]="algo=clip_cov"
  [kl_cov_paper]="algo=kl_cov"
  [cispo]="algo=cispo" [sapo]="algo=sapo" [steer]="algo=steer" [hapo]="algo=hapo" [entropy_balanced]="algo=entropy_balanced"
  [lp_reg]="algo=lp_reg loss_options.rho=0.05"
  [canon]="algo=grpo advantage=canon" [riskpo]="algo=grpo advantage=riskpo" [empg_token]="algo=grpo advantage=empg_token"
  [spine_band]="algo=grpo regularizers.spine_band.coef=0.01"
)
CORE="grpo clip_cov kl_cov clip_higher bapo entropy_bonus siren entropy_bonus_small"
ZOO="clip_cov_paper kl_cov_paper cispo sapo steer canon riskpo lp_reg hapo entropy_balanced empg_token spine_band"
METHODS=(${METHODS:-$CORE $ZOO})
for m in "${METHODS[@]}"; do [ -n "${RUNS[$m]:-}" ] || { echo "unknown method '$m'; known: ${!RUNS[*]}" >&2; exit 2; }; done
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# fail before any work when the command cannot start (e.g. an editable install that points at a deleted checkout)
if ! err=$($RL algos 2>&1 >/dev/null); then
  echo "$err" | tail -3 >&2; echo "'$RL' does not start; install the package from this checkout (pip install -e .) and rerun" >&2; exit 2; fi
mkdir -p "$DEST" "$WORK/$TAG"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain -- entropy_rl 2>/dev/null)" ] || COMMIT="$COMMIT+uncommitted-changes"
DEVICE="CPU ($(nproc --all) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), no GPU, 1 thread per run"

done_steps() {  # lines of a metrics.jsonl (0 if absent)
  [ -s "$1" ] && wc -l < "$1" || echo 0
}
copy_logs() {  # $1 run dir, $2 destination
  mkdir -p "$2"
  for f in metrics.jsonl config.json eval.json run.json sessions.jsonl; do
    if [ -f "$1/$f" ]; then cp "$1/$f" "$2/"; else rm -f "$2/$f"; fi; done
}
guarded() {  # run "$@" in the background and forward SIGTERM / SIGINT to it (the trainer then saves a checkpoint and exits)
  "$@" & local child=$!
  trap "kill -TERM $child 2>/dev/null" TERM INT
  wait $child; local rc=$?
  while kill -0 $child 2>/dev/null; do wait $child; rc=$?; done   # a trap interrupted the wait: wait for the real exit
  trap - TERM INT; return $rc
}
run_one() {  # $1 method, $2 seed
  local m=$1 s=$2 dir="$WORK/$TAG/$1/seed$2" dest="$DEST/$1/seed$2" t0=$SECONDS start rc from
  mkdir -p "$dir"; start=$(date -u +%FT%TZ); from=$(done_steps "$dir/metrics.jsonl")
  local cmd="$RL train --steps $STEPS --seed $s --output-dir $dir $COMMON ${RUNS[$m]}"
  guarded nice -n "$NICE" $cmd >> "$dir/train.log" 2>&1; rc=$?
  if [ $rc = 0 ] && [ ! -s "$dir/eval.json" ]; then
    guarded nice -n "$NICE" $RL eval "$dir" $EVAL_ARGS > "$dir/eval.tmp" 2>> "$dir/train.log" && mv "$dir/eval.tmp" "$dir/eval.json" || rc=$?
  fi
  local steps; steps=$(done_steps "$dir/metrics.jsonl")
  python - "$dir" "$m" "$s" "$start" "$((SECONDS - t0))" "$from" "$steps" "$rc" "$cmd" "$DEVICE" "$COMMIT" "$STEPS" "$EVAL_ARGS" <<'EOF'
import json, sys, datetime
from pathlib import Path
d, m, s, start, wall, frm, steps, rc, cmd, device, commit, target, eval_args = sys.argv[1:]
d = Path(d)
with open(d / "sessions.jsonl", "a") as f:   # one line per invocation: an interrupted run has several
    f.write(json.dumps({"start": start, "end": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ"),
                        "wall_s": int(wall), "steps_from": int(frm), "steps_to": int(steps), "exit": int(rc),
                        "device": device, "code_commit": commit}) + "\n")
sessions = [json.loads(l) for l in (d / "sessions.jsonl").read_text().splitlines() if l.strip()]
finished = int(steps) >= int(target) and (d / "eval.json").exists()
(d / "run.json").write_text(json.dumps({"method": m, "seed": int(s), "steps": int(steps), "target_steps": int(target),
    "status": "finished" if finished else "partial", "command": cmd, "eval_command": f"entropy-rl eval RUN_DIR {eval_args}",
    "device": device, "code_commit": commit, "wall_s": sum(x["wall_s"] for x in sessions), "sessions": len(sessions)}, indent=1))
EOF
  [ "$steps" -gt 0 ] && copy_logs "$dir" "$dest"        # nothing to keep from a run stopped before its first step
  if [ $rc = 0 ]; then rm -rf "$dir/checkpoints"; echo "$m seed$s: finished ($((SECONDS - t0)) s)";
  else echo "$m seed$s: stopped at step $steps (exit $rc; log $dir/train.log); rerun the script to resume"; fi
}

base_eval() {  # the start model on the same held-out problems, once
  [ -s "$DEST/base_eval.json" ] && return
  guarded nice -n "$NICE" python -c "
import json, sys
from entropy_rl.trainer import TrainConfig, build_model, build_task, evaluate
from entropy_rl.cli import parse_overrides
cfg = TrainConfig.from_dict(parse_overrides(sys.argv[1:]))
model, tok = build_model(cfg)
print(json.dumps(evaluate(model, tok, build_task(cfg), n_problems=50, k=4, samples=8, max_new_tokens=cfg.max_new_tokens, seed=1)))
" $TASK max_new_tokens=16 ${EXTRA:-} > "$WORK/$TAG/base_eval.tmp" 2> "$WORK/$TAG/base_eval.log" && mv "$WORK/$TAG/base_eval.tmp" "$DEST/base_eval.json"
}

pids=()
stop() {
  trap - INT TERM; echo "interrupted: stopping the runs (each saves a checkpoint; rerun the script to resume)"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait; exit 130
}
trap stop INT TERM
{ echo "date: $(date -u +%FT%TZ)"; echo "device: $DEVICE"
  python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  echo "code: entropy_rl at commit $COMMIT"
  echo "command: EXTRA=\"${EXTRA:-}\" STEPS=$STEPS SEEDS=\"${SEEDS[*]}\" METHODS=\"${METHODS[*]}\" JOBS=$JOBS NICE=$NICE bash nbs/experiments/run_multiseed.sh"; } >> "$DEST/invocations.txt"
base_eval
queue=()
for s in "${SEEDS[@]}"; do for m in "${METHODS[@]}"; do      # priority order: core before zoo, seed 0 of all first
  case " $CORE " in *" $m "*) ;; *) continue;; esac
  queue+=("$m:$s"); done; done
for s in "${SEEDS[@]}"; do for m in "${METHODS[@]}"; do
  case " $CORE " in *" $m "*) continue;; esac
  queue+=("$m:$s"); done; done
for item in "${queue[@]}"; do
  m=${item%%:*}; s=${item##*:}
  if [ "$(done_steps "$DEST/$m/seed$s/metrics.jsonl")" -ge "$STEPS" ] && grep -q '"status": "finished"' "$DEST/$m/seed$s/run.json" 2>/dev/null; then
    echo "$m seed$s: already done, skipped"; continue; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  run_one "$m" "$s" &
  pids+=($!)
done
wait
