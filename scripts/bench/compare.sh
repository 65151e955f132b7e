#!/usr/bin/env bash
# `pipeline bench` and its PyTorch twin in one command, then the side-by-side table with the
# ratio PyTorch time / burn time per row (above 1: burn is faster).
#
#   scripts/bench/compare.sh [--device cpu|cuda] [--runs N] [--libtorch] [-- FLAGS of pipeline bench]
#
#   --device cpu    burn-flex (pure Rust) against PyTorch on the CPU (default)
#   --device cuda   burn-tch on CUDA against PyTorch on CUDA (a `--features tch` binary)
#   --libtorch      with --device cpu: also burn-tch on the CPU (a `--features tch` binary)
#   --runs N        alternate N runs of each tool (default 3); the table shows the median
#
# Everything after `--` goes to `pipeline bench` (default: --config animals). The twin builds
# the same networks from the settings `pipeline bench --json` records, so both always measure
# the same work.
#
# Environment: PIPELINE (default target/release/pipeline, else `pipeline` on the PATH), PYTHON
# (default .venv/bin/python, else python3; needs torch), THREADS (PyTorch CPU threads; default
# nproc), OUT (folder for the JSON files; default runs/bench/<device>-<date>). For CUDA and
# --libtorch, LD_LIBRARY_PATH gets the twin's torch/lib (the libtorch the binary runs on).
set -euo pipefail
cd "$(dirname "$0")/../.."

device=cpu runs=3 libtorch=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="${2:?--device needs cpu or cuda}"; shift 2 ;;
        --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
        --libtorch) libtorch=1; shift ;;
        --) shift; break ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in
    cpu) burn_device=cpu twin_device=cpu ;;
    cuda|cuda:*) burn_device="$device" twin_device="$device" ;;
    *) echo "error: --device $device: expected cpu or cuda[:N]" >&2; exit 2 ;;
esac
if ! [[ "$runs" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: --runs $runs: expected a positive integer" >&2; exit 2
fi
extra=("$@")
[[ ${#extra[@]} -gt 0 ]] || extra=(--config animals)

if [[ -n "${PIPELINE:-}" ]]; then :
elif [[ -x target/release/pipeline ]]; then PIPELINE=target/release/pipeline
else PIPELINE=pipeline; fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import torch" 2>/dev/null || {
    echo "error: $PYTHON cannot import torch; install it (python3 -m venv .venv && .venv/bin/pip install torch==2.11.0) or set PYTHON" >&2
    exit 1
}
# A `--features tch` binary loads libtorch at start: take it from the twin's torch.
if [[ "$device" != cpu || "$libtorch" == 1 ]]; then
    torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
threads="${THREADS:-$(nproc)}"
out="${OUT:-runs/bench/${device/:/}-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"

columns=("flex:$burn_device")
[[ "$device" == cpu ]] || columns=("tch-cuda:$burn_device")
[[ "$libtorch" == 1 && "$device" == cpu ]] && columns+=("tch-cpu:libtorch")

torch_files=()
declare -A burn_files
for ((r = 1; r <= runs; r++)); do
    for col in "${columns[@]}"; do
        name="${col%%:*}" dev="${col#*:}"
        echo "== run $r/$runs: pipeline bench --device $dev ${extra[*]}" >&2
        "$PIPELINE" bench --device "$dev" "${extra[@]}" --json "$out/$name-$r.json" >&2
        burn_files[$name]+="$out/$name-$r.json "
    done
    spec="$out/${columns[0]%%:*}-$r.json"
    echo "== run $r/$runs: torch_twin.py --device $twin_device --threads $threads" >&2
    "$PYTHON" scripts/bench/torch_twin.py --spec "$spec" --device "$twin_device" \
        --threads "$threads" --json "$out/torch-$r.json" >&2
    torch_files+=("$out/torch-$r.json")
done

args=(--torch "${torch_files[@]}")
for col in "${columns[@]}"; do
    name="${col%%:*}"
    # shellcheck disable=SC2206
    files=(${burn_files[$name]})
    args+=(--burn "$name" "${files[@]}")
done
python3 scripts/bench/side_by_side.py "${args[@]}" | tee "$out/table.txt"
python3 scripts/bench/side_by_side.py --markdown "${args[@]}" > "$out/table.md"
echo "JSON files and the table in $out" >&2
