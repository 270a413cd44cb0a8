#!/usr/bin/env bash
# Set up and run every test, as CI does:
#   1. nbdev_export and nbdev_clean leave entropy_rl/ and nbs/ unchanged (notebooks are the source)
#   2. nbdev_test on every notebook (cells flagged slow / gpu are skipped; add --flags to run them)
#   3. the docs build (real Quarto site where `quarto` is on PATH, nbconvert stand-in otherwise)
#   4. pytest tests/ — including the headless-Chromium check of the built site
# Exits non-zero on the first failure; the last line is pytest's summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n== %s\n' "$*"; }

step "setup (dev extras)"
EXTRAS=${EXTRAS:-dev} bash scripts/setup.sh

step "browser and math renderer for the site check (Debian packages)"
# chromium + chromedriver drive the site check; libjs-katex is the math renderer the docs build ships into docs/
pkgs=()
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
command -v chromedriver >/dev/null 2>&1 || pkgs+=(chromium-driver)
[ -f /usr/share/javascript/katex/katex.min.js ] || pkgs+=(libjs-katex)
if [ ${#pkgs[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
chromium --version

step "nbdev_export and nbdev_clean leave the tree unchanged"
snap=$(mktemp -d)
# the tests' temporary files (notebook runs, pytest's tmp_path, checkpoints of a `--flags slow` run) go in one scratch
# directory that is removed at the end, so repeated runs do not fill /tmp
scratch=$(mktemp -d); trap 'rm -rf "$snap" "$scratch"' EXIT
export TMPDIR="$scratch"
cp -r entropy_rl nbs "$snap/"
nbdev_export
nbdev_clean
if ! diff -r -q --no-dereference -x __pycache__ -x .ipynb_checkpoints -x nbdev.yml -x sidebar.yml "$snap/entropy_rl" entropy_rl \
   || ! diff -r -q --no-dereference -x __pycache__ -x .ipynb_checkpoints -x nbdev.yml -x sidebar.yml "$snap/nbs" nbs; then
  echo "FAIL: the notebooks and entropy_rl/ disagree, or a notebook is not clean."
  echo "      Edit the notebook, run nbdev_export and nbdev_clean, and commit both."
  exit 1
fi

step "nbdev_test (flags skipped: slow gpu)"
nbdev_test --n_workers 2

step "docs build"
"$PY" scripts/build_docs.py

step "pytest"
"$PY" -m pytest tests/ -q -p no:cacheprovider
