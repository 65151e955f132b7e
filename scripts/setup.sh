#!/usr/bin/env bash
# The README's first command: sets up a fresh machine, builds `pipeline` (release), puts it on
# the PATH, and runs the main job on the embedded default recipe with a small CPU budget.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install_data.sh

echo "== building pipeline (release; the first build compiles burn, about 12 minutes on 2 cores)"
cargo build --release -p ldm-pipeline

BIN_DIR="${CARGO_HOME:-$HOME/.cargo}/bin"
mkdir -p "$BIN_DIR"
install -m 755 target/release/pipeline "$BIN_DIR/pipeline"
echo "installed: $BIN_DIR/pipeline"
case ":$PATH:" in
  *":$BIN_DIR:"*) ;;
  *) echo "note: add $BIN_DIR to your PATH (export PATH=\"$BIN_DIR:\$PATH\")" ;;
esac

echo "== main job: train-vae on Fashion-MNIST (configs/vae-fmnist.toml), CPU"
"$BIN_DIR/pipeline" train-vae --config configs/vae-fmnist.toml --out runs/vae-fmnist --device cpu
"$BIN_DIR/pipeline" eval-vae --vae runs/vae-fmnist --device cpu
echo "outputs: runs/vae-fmnist (model.safetensors, vae.json, metrics.csv, samples/*.png)"
