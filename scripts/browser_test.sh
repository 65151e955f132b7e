#!/usr/bin/env bash
# A real-browser test of `pipeline serve` (not run by CI: it installs a browser).
#
#   bash scripts/browser_test.sh [--model DIR] [--out docs/results/serve.png]
#
# Installs Debian's `chromium` and `chromium-driver` (apt-get, as root) and selenium (PyPI, into
# target/browser-venv) when missing, builds the binary if needed, starts `pipeline serve` on a
# free loopback port (the default model of the README's first command, else a tiny model whose
# classes include "cat", trained in seconds), and drives headless Chromium with the keyboard
# only: type "cat", press Enter, wait for the grid, open an image, reuse its settings, generate
# again. Saves a screenshot and exits non-zero on any failed step.
set -euo pipefail
cd "$(dirname "$0")/.."
model=""
out="docs/results/serve.png"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "error: unknown argument $1 (expected --model DIR or --out FILE)" >&2; exit 2 ;;
  esac
done
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
fi
venv=target/browser-venv
if [[ ! -x $venv/bin/python ]] || ! $venv/bin/python -c "import selenium" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "selenium>=4.20,<5"
fi
[[ -x target/release/pipeline ]] || cargo build --release -p ldm-pipeline
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -z $model ]]; then
  default="${PIPELINE_HOME:-$HOME/.local/share/latent-diffusion-rs}/default-model"
  if [[ -f $default ]] && [[ -f "$(cat "$default")/ldm.json" ]]; then
    model=$(cat "$default")
  else
    model=$(python3 scripts/tiny_model.py "$work" --classes cat,dog,bird,horse)
  fi
fi
mkdir -p "$(dirname "$out")"
"$venv/bin/python" scripts/browser_test.py --binary target/release/pipeline --model "$model" --out "$out"
