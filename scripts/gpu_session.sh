#!/usr/bin/env bash
# What a GPU session measures, in one command per step (device time is scarce: build and test
# on the CPU first). Run from the repository root on the GPU machine, with the `tch` binary
# (`bash scripts/setup_libtorch.sh --build` -> gpu-bin/pipeline) and data/animal-mnist carried
# over (both git-ignored; together about 37 MB):
#
#   bash scripts/gpu_session.sh env         # the machine, the binary, torch; two steps of each training row (the direct
#                                           # backward kernels; whether attention's memory-efficient kernel is called
#                                           # directly) and of the DiT with train.foreach on
#   bash scripts/gpu_session.sh bench       # compare.sh: burn-tch vs PyTorch, recipe batches and batch $BIG_BATCH (1024)
#   bash scripts/gpu_session.sh bench-bf16  # the same at batch $BIG_BATCH with train.precision = bf16 (autocast in the twin)
#   bash scripts/gpu_session.sh phases      # one run per tool with --phases: forward / backward / optimizer / EMA per step
#                                           # (recipe batches, the tiny host-cost rows at batch 1, batch $BIG_BATCH),
#                                           # then the recipe's batches with the other train.foreach mode and, burn
#                                           # only, with LDM_TORCH_BACKWARD=autograd and with LDM_UPLOADS=pageable
#   bash scripts/gpu_session.sh train       # pipeline run animals
#   bash scripts/gpu_session.sh eval        # pipeline eval of the trained model at cfg 1.5 and 5 (and 5 in bf16), scored by
#                                           # the reference evaluator compiled into pipeline (the CPU results' yardstick)
#   bash scripts/gpu_session.sh all         # env, bench, phases, train, bench-bf16, eval within $BUDGET_S
#
# `all` is the one command for a short lease (the device tool allows 10 minutes a command and
# 15 of device time a session, machine start included): the steps in order of what issue 7
# still misses, $RUNS (default 2 here) runs per tool, each step bounded by what is left of
# $BUDGET_S seconds (default 540). A step cut short keeps what it wrote; later steps are skipped.
# $OUT/all.txt says what ran, how it ended and how long it took.
#
# Everything lands in $OUT (default runs/gpu-session); on the device tool, write it under $OUT
# there so that it comes back. Each step also samples nvidia-smi's GPU utilisation (NAME.gpu.csv);
# `pipeline bench` reports the DiT step's achieved TFLOP/s. Environment: PIPELINE (default gpu-bin/pipeline), PYTHON (default
# python3; needs torch), DEVICE (default cuda; `libtorch` rehearses every step on a CPU with
# libtorch), QUICK=1 (a few steps per stage: a rehearsal, not a measurement).
set -euo pipefail
cd "$(dirname "$0")/.."

step="${1:-}"
case "$step" in
  env|bench|bench-bf16|phases|train|eval|all) ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 2 ;;
esac
PIPELINE="${PIPELINE:-gpu-bin/pipeline}"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
OUT="${OUT:-runs/gpu-session}"
mkdir -p "$OUT"

[[ -x $PIPELINE ]] || {
  echo "error: $PIPELINE: no such binary; build it with scripts/setup_libtorch.sh --build (or set PIPELINE)" >&2
  exit 1
}
torch_lib="$("$PYTHON" -W ignore -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)" || {
  echo "error: $PYTHON cannot import torch (the binary loads libtorch from it)" >&2
  exit 1
}
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
case "$DEVICE" in
  cuda|cuda:*) compare=(--device "$DEVICE") ;;
  libtorch) compare=(--device cpu --libtorch) ;;
  *) echo "error: DEVICE=$DEVICE: expected cuda, cuda:N or libtorch" >&2; exit 2 ;;
esac
# The direct backward kernels (ldm_common::torch_ops, csrc/torch_backward.cpp) have not run on
# a GPU before: `env` trains two steps of every row with them, and if that fails but torch's
# autograd path works, the later steps run with LDM_TORCH_BACKWARD=autograd.
if [[ -f $OUT/backward.txt && $(cat "$OUT/backward.txt") == autograd ]]; then
  export LDM_TORCH_BACKWARD=autograd
  echo "note: the direct backward failed its check in env ($OUT/backward-check.log): running with LDM_TORCH_BACKWARD=autograd" >&2
fi
# train.foreach (AdamW and the EMA over all parameters at once, `auto` = on for CUDA) has
# not run on a GPU before: `env` checks it with one DiT step, and if that fails the later
# steps turn it off (--foreach off, --set *.train.foreach=off) instead of failing too.
foreach_bench=() foreach_run=()
if [[ -f $OUT/foreach.txt && $(cat "$OUT/foreach.txt") == failed ]]; then
  foreach_bench=(--foreach off)
  foreach_run=(--set vae.train.foreach=off --set ldm.train.foreach=off)
  echo "note: train.foreach failed its check in env ($OUT/foreach-check.log): running with it off" >&2
fi

# QUICK=1: a few steps of every stage and benchmark row
quick=() runs=${RUNS:-3} big=${BIG_BATCH:-1024} short=()
[[ ${QUICK:-0} == 1 ]] && quick=(--vae-steps 20 --ldm-steps 20) runs=1 big=64 \
  short=(--iters 2 --warmup 1 --sample-runs 1)

# `bench NAME FLAGS...`: compare.sh into $OUT/NAME, FLAGS after `--config animals`.
bench() {
  local name=$1
  shift
  timed "$name" env PIPELINE="$PIPELINE" PYTHON="$PYTHON" OUT="$OUT/$name" \
    bash scripts/bench/compare.sh "${compare[@]}" --runs "$runs" -- --config animals \
    "${foreach_bench[@]}" "$@" "${short[@]}"
}

# `timed NAME CMD...`: runs CMD, its output in $OUT/NAME.log, its wall time in $OUT/NAME.wall,
# and where nvidia-smi exists the GPU's utilisation and memory every 200 ms in $OUT/NAME.gpu.csv.
timed() {
  local name=$1 start=$SECONDS sampler=
  shift
  echo "== $*" | tee "$OUT/$name.log" >&2
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw \
      --format=csv -lms 200 > "$OUT/$name.gpu.csv" 2>&1 &
    sampler=$!
  fi
  "$@" 2>&1 | tee -a "$OUT/$name.log"
  [[ -n $sampler ]] && kill "$sampler" 2>/dev/null
  echo "$((SECONDS - start)) s" > "$OUT/$name.wall"
  echo "== $name: $((SECONDS - start)) s" >&2
}

case "$step" in
  all)
    budget=${BUDGET_S:-540}
    [[ $budget =~ ^[0-9]+$ ]] || { echo "error: BUDGET_S=$budget: expected seconds" >&2; exit 2; }
    deadline=$((SECONDS + budget))
    : > "$OUT/all.txt"
    for part in env bench phases train bench-bf16 eval; do
      left=$((deadline - SECONDS))
      if ((left < 15)); then
        echo "$part: skipped, the budget is spent" | tee -a "$OUT/all.txt" >&2
        continue
      fi
      start=$SECONDS ended=ok
      RUNS=${RUNS:-2} timeout --kill-after 5 "$left" bash "$0" "$part" || ended="exit $?"
      [[ $ended == "exit 124" || $ended == "exit 137" ]] && ended="cut short at the budget"
      echo "$part: $ended, $((SECONDS - start)) s" | tee -a "$OUT/all.txt" >&2
    done
    ;;
  env)
    { date -u; nvidia-smi 2>&1 || echo "(no nvidia-smi)"; "$PIPELINE" --version
      "$PYTHON" -W ignore -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
      nproc; free -g | head -2; } | tee "$OUT/env.txt"
    check=("$PIPELINE" bench --config animals --rows vae-train,ldm-train-unet,ldm-train-dit
      --iters 2 --warmup 1 --device "$DEVICE" --foreach off)
    if timeout 180 "${check[@]}" > "$OUT/backward-check.log" 2>&1; then
      echo direct > "$OUT/backward.txt"
    elif LDM_TORCH_BACKWARD=autograd timeout 180 "${check[@]}" >> "$OUT/backward-check.log" 2>&1; then
      echo autograd > "$OUT/backward.txt"
      export LDM_TORCH_BACKWARD=autograd
      echo "warning: the direct backward failed ($OUT/backward-check.log); the later steps run with LDM_TORCH_BACKWARD=autograd" >&2
    else
      echo failed > "$OUT/backward.txt"
      echo "warning: two training steps failed with either backward ($OUT/backward-check.log)" >&2
    fi
    echo "backward check: $(cat "$OUT/backward.txt")" | tee -a "$OUT/env.txt"
    # attention's memory-efficient kernel (CUDA, f32) is called directly once a check against
    # torch's autograd passes on its first inputs; `bench` says how that went
    attention=$(grep -m1 '^attention on libtorch:' "$OUT/backward-check.log" || true)
    echo "${attention:-attention on libtorch: the memory-efficient kernel was not picked (no direct path)}" \
      | tee -a "$OUT/env.txt"
    # uploads go through page-locked memory without waiting once a check reads them back
    uploads=$(grep -m1 '^uploads to CUDA:' "$OUT/backward-check.log" || true)
    echo "${uploads:-uploads to CUDA: none (not a CUDA device)}" | tee -a "$OUT/env.txt"
    if timeout 120 "$PIPELINE" bench --config animals --rows ldm-train-dit --iters 2 --warmup 1 \
      --device "$DEVICE" --foreach on > "$OUT/foreach-check.log" 2>&1; then
      echo ok > "$OUT/foreach.txt"
    else
      echo failed > "$OUT/foreach.txt"
      echo "warning: one DiT step with train.foreach = on failed ($OUT/foreach-check.log); the later steps run with it off" >&2
    fi
    echo "train.foreach check: $(cat "$OUT/foreach.txt")" | tee -a "$OUT/env.txt"
    ;;
  bench)
    bench bench-recipe
    bench bench-big --batch-size "$big"
    ;;
  bench-bf16)
    bench bench-big-bf16 --batch-size "$big" --precision bf16
    ;;
  phases)
    # where a training step's time goes on each side: the device synced after every part
    train_rows=(--rows vae-train,ldm-train-unet,ldm-train-dit --phases)
    runs=1 bench phases-recipe "${train_rows[@]}"
    # the host cost: the recipe's networks with every width cut down, at batch 1, so that a
    # step is almost all per-operation cost (launches)
    tiny=(--config scripts/bench/tiny/recipe.toml --unet scripts/bench/tiny/unet.toml --batch-size 1)
    tiny_iters=(--iters "${TINY_ITERS:-100}")
    ((${#short[@]} == 0)) || tiny_iters=("${short[@]}")
    timed host-tiny env PIPELINE="$PIPELINE" PYTHON="$PYTHON" OUT="$OUT/host-tiny" \
      bash scripts/bench/compare.sh "${compare[@]}" --runs 1 -- "${tiny[@]}" --phases \
      "${foreach_bench[@]}" "${tiny_iters[@]}"
    runs=1 bench phases-big --batch-size "$big" "${train_rows[@]}"
    # the other train.foreach mode at the recipe's batches (auto is on for CUDA, off on a
    # CPU): what the all-at-once AdamW and EMA change, on both sides
    # (skipped when the env check turned foreach off: there is one mode left)
    other=on
    [[ $DEVICE == cuda* ]] && other=off
    if ((${#foreach_bench[@]} == 0)); then
      runs=1 bench "phases-recipe-foreach-$other" "${train_rows[@]}" --foreach "$other"
    fi
    # burn's side alone (the twin does not change) at the recipe's batches and on the
    # host-cost rows, against phases-recipe and host-tiny: `burn_only SUFFIX VAR=VALUE`
    burn_only() {
      timed "phases-recipe-$1" env "$2" "$PIPELINE" bench --config animals \
        "${train_rows[@]}" "${foreach_bench[@]}" --device "$DEVICE" "${short[@]}" \
        --json "$OUT/phases-recipe-$1.json"
      timed "host-tiny-$1" env "$2" "$PIPELINE" bench "${tiny[@]}" \
        "${train_rows[@]}" "${foreach_bench[@]}" --device "$DEVICE" "${tiny_iters[@]}" \
        --json "$OUT/host-tiny-$1.json"
    }
    # every backward through torch's autograd, as before the direct kernels
    if [[ ${LDM_TORCH_BACKWARD:-direct} == direct ]]; then
      burn_only autograd LDM_TORCH_BACKWARD=autograd
    fi
    # every upload from pageable memory (each waits for the device), as before the
    # page-locked uploads
    burn_only pageable LDM_UPLOADS=pageable
    ;;
  train)
    [[ -d data/animal-mnist ]] || {
      echo "error: data/animal-mnist is missing: carry it (bash scripts/install_data.sh makes it on a CPU machine)" >&2
      exit 1
    }
    timed run-animals "$PIPELINE" run animals --out "$OUT/animals" --device "$DEVICE" "${quick[@]}" \
      "${foreach_run[@]}"
    ;;
  eval)
    n=50
    [[ ${QUICK:-0} == 1 ]] && n=13
    for cfg in 1.5 5; do
      timed "eval-cfg$cfg" "$PIPELINE" eval --model "$OUT/animals/ldm" \
        --evaluator auto -n "$n" --cfg "$cfg" --seed 0 --device "$DEVICE" \
        --json "$OUT/eval-cfg$cfg.json"
    done
    # the same scores with the network sampling in bf16 (speed and quality of --precision bf16)
    timed "eval-cfg5-bf16" "$PIPELINE" eval --model "$OUT/animals/ldm" \
      --evaluator auto -n "$n" --cfg 5 --seed 0 --device "$DEVICE" \
      --precision bf16 --json "$OUT/eval-cfg5-bf16.json"
    ;;
esac
