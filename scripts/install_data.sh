#!/usr/bin/env bash
# Installs the real data sets the recipes use (idempotent):
#   Fashion-MNIST from Debian's `dataset-fashion-mnist` -> /usr/share/datasets/fashion-mnist/
#   Animal-MNIST from the PyPI wheel `animal-mnist`     -> data/animal-mnist/ (IDX, converted once)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "== installing Fashion-MNIST (apt-get install dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"

if [ -f scripts/prepare_animal_mnist.py ]; then
  python3 scripts/prepare_animal_mnist.py --out data/animal-mnist
fi

# A copy in the per-user folder (`ldm_common::home`), so that the built-in configs'
# `data/animal-mnist` is found from any working folder, not only from this repository.
if [ -n "${PIPELINE_HOME:-}" ]; then HOME_DIR="$PIPELINE_HOME"
elif [ -n "${HOME:-}" ]; then HOME_DIR="$HOME/.local/share/latent-diffusion-rs"
else HOME_DIR=.latent-diffusion-rs; fi
if [ -f data/animal-mnist/classes.txt ]; then
  mkdir -p "$HOME_DIR/data"
  rm -rf "$HOME_DIR/data/animal-mnist.tmp"
  cp -r data/animal-mnist "$HOME_DIR/data/animal-mnist.tmp"
  rm -rf "$HOME_DIR/data/animal-mnist"
  mv "$HOME_DIR/data/animal-mnist.tmp" "$HOME_DIR/data/animal-mnist"
  echo "Animal-MNIST: data/animal-mnist (and a copy in $HOME_DIR/data/animal-mnist)"
fi
