#!/usr/bin/env bash
# One prepared GPU check of the fused log-prob + entropy head (issue 20); see bench/results/GPU_CHECK.md.
#   bench/gpu_check.sh OUT             on one H100/H200: correctness, failure classes, speed, a training step (< 8 min)
#   bench/gpu_check.sh OUT --dry-run   the same code paths on CPU (TRITON_INTERPRET=1, tiny shapes, tiny model)
# Wheels in .whl/ (liger-kernel) are installed into a private folder first; if they do not install, Liger is skipped.
set -uo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [--dry-run] [gpu_check.py options]" >&2
  exit 2
fi
out=$1; shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out" || exit 2
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ $dry = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  limit=300
else
  unset TRITON_INTERPRET
  limit=475
  if ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    site=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
    if PIP_ROOT_USER_ACTION=ignore "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl; then
      export PYTHONPATH="$PYTHONPATH:$site"
    else
      echo "# the wheels in .whl/ did not install: Liger will be skipped"
    fi
  fi
fi
# the driver keeps every section inside its own budget; this outer limit only catches a hung driver
timeout -k 10 -s INT "$limit" "$py" "$root/bench/gpu_check.py" "$out" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 130 ] || [ "$rc" = 137 ]; then
  echo "# gpu_check.py was stopped at the ${limit} s limit; the summary of what it recorded:" | tee -a "$out/log.txt"
  "$py" "$root/bench/gpu_check.py" "$out" --summarize 2>&1 | tee -a "$out/log.txt"
fi
exit "$rc"
