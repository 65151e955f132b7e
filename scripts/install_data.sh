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
