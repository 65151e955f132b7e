#!/usr/bin/env bash
# Sets up libtorch for the `tch` build (burn-tch: libtorch on the CPU and on CUDA) from the PyPI
# torch wheel, as ../shared/GPU.md describes, and prints the environment to export. With
# --build it also builds `pipeline` with the feature.
#
#   bash scripts/setup_libtorch.sh [--build] [--venv DIR]
#
#   --venv DIR   the virtual environment that holds torch (default .venv; made if missing)
#   --build      then `cargo build --release -p ldm-pipeline --features tch` into
#                $CARGO_TARGET_DIR (default target-tch, so that the burn-flex build in target/
#                is kept: switching the backend set recompiles burn, 12+ minutes on 2 cores),
#                and copy the binary to gpu-bin/pipeline (git-ignored; what a GPU run carries)
#
# Environment: TORCH_VERSION (default 2.11.0: the GPU machines' version; tch 0.22 was generated
# for 2.9.0, hence LIBTORCH_BYPASS_VERSION_CHECK=1, verified to build and run against 2.11.0).
# The Linux wheel on PyPI is the CUDA build (about 4.6 GB with its CUDA libraries); the same
# binary runs on the CPU (`--device libtorch`) and on CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv build=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) venv="${2:?--venv needs a folder}"; shift 2 ;;
    --build) build=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
version="${TORCH_VERSION:-2.11.0}"

if [[ ! -x $venv/bin/python ]]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian and Ubuntu ship venv separately
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    else
      echo "error: python3 -m venv $venv failed; install python3-venv" >&2
      exit 1
    fi
  fi
fi
have="$("$venv/bin/python" -W ignore -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ $have != "$version" ]]; then
  echo "== installing torch==$version into $venv (the CUDA wheel, about 4.6 GB)" >&2
  "$venv/bin/pip" install --quiet "torch==$version"
fi
libtorch="$("$venv/bin/python" -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
[[ -f $libtorch/lib/libtorch_cpu.so ]] || {
  echo "error: $libtorch/lib/libtorch_cpu.so not found: this torch has no libtorch" >&2
  exit 1
}

if [[ $build == 1 ]]; then
  target="${CARGO_TARGET_DIR:-target-tch}"
  echo "== cargo build --release -p ldm-pipeline --features tch (into $target)" >&2
  LIBTORCH="$libtorch" LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR="$target" \
    cargo build --release -p ldm-pipeline --features tch >&2
  mkdir -p gpu-bin
  install -m 755 "$target/release/pipeline" gpu-bin/pipeline
  echo "== built gpu-bin/pipeline; check: LD_LIBRARY_PATH=$libtorch/lib gpu-bin/pipeline bench --device libtorch --iters 3" >&2
fi

echo "# libtorch $version from $libtorch; export these to build or run the tch binary:"
echo "export LIBTORCH=$libtorch"
echo "export LIBTORCH_BYPASS_VERSION_CHECK=1"
echo "export LD_LIBRARY_PATH=$libtorch/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
