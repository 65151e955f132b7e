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
install -m 755 "${CARGO_TARGET_DIR:-target}/release/pipeline" "$BIN_DIR/pipeline"
echo "installed: $BIN_DIR/pipeline"
case ":$PATH:" in
  *":$BIN_DIR:"*) ;;
  *) echo "note: add $BIN_DIR to your PATH (export PATH=\"$BIN_DIR:\$PATH\")" ;;
esac

echo "== main job: the built-in recipe pipelines/animals.toml on the CPU (VAE, class-conditional LDM, a grid)"
# SETUP_VAE_STEPS / SETUP_LDM_STEPS shorten the run (a smoke test of this script); unset, the
# recipe's own budgets apply.
"$BIN_DIR/pipeline" run animals --device cpu \
  ${SETUP_VAE_STEPS:+--vae-steps "$SETUP_VAE_STEPS"} ${SETUP_LDM_STEPS:+--ldm-steps "$SETUP_LDM_STEPS"}
echo "== the design card's command"
"$BIN_DIR/pipeline" generate --prompt "cat" --cfg 5 --out runs/animals/cat --device cpu
echo "outputs: runs/animals/ (vae/, ldm/, grid.png: one row per class), runs/animals/cat/ (16 cats, grid.png, generate.json)"
echo "next: pipeline generate --prompt \"giraffe\" --cfg 5   (pipeline --help for every command)"
