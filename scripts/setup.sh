#!/usr/bin/env bash
# Install entropy_rl into the active Python environment.
#   bash scripts/setup.sh            # the package and its runtime dependencies
#   EXTRAS=dev bash scripts/setup.sh # plus what the tests and the docs build need
#
# PyTorch is installed first, and on purpose before anything that depends on it: pip would
# otherwise resolve an unpinned `torch` to the multi-GB CUDA build even on a CPU-only machine.
#  - a machine where `nvidia-smi` sees a GPU gets the default (CUDA) build from the index;
#  - any other machine gets torch==2.13.0, which this project's machines serve as a CPU build.
#    Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel index to get the CPU build.
# An already importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
  pip_install "torch>=2.4"
else
  echo "setup: no NVIDIA GPU, installing the CPU build torch==2.13.0"
  pip_install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

spec="."
[ -n "${EXTRAS:-}" ] && spec=".[${EXTRAS}]"
echo "setup: pip install -e '$spec'"
pip_install -e "$spec"
"$PY" -m pip check
