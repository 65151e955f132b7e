#!/usr/bin/env bash
# Rebuilds docs/RESULTS.md from the measurements that exist, and runs the sweeps behind it.
#
#   scripts/results.sh                       assemble docs/RESULTS.md (fast; runs nothing long)
#   (EVALUATOR: a train-evaluator folder, or auto: the reference evaluator compiled into pipeline)
#   scripts/results.sh sweep-cfg MODEL EVALUATOR NAME
#       pipeline eval --cfg w for w in $CFGS (default 0 1 2 3 5 8)
#       -> docs/results/NAME-cfg<w>.json, then assemble
#   scripts/results.sh sweep-steps MODEL EVALUATOR NAME
#       pipeline eval --sampler s --steps n for s in $SAMPLERS (default ddpm ddim plms
#       dpm-solver++ unipc heun langevin) and n in $STEPS (default 10 20 50 100 250 1000) at --cfg $CFG (default 5),
#       with --spacing $SPACING when set (default: the model's)
#       -> docs/results/NAME-<s>-steps<n>.json (NAME-<s>-<SPACING>-steps<n>.json), then assemble
#   scripts/results.sh sweep-ablation VAE EVALUATOR NAME
#       trains one proxy LDM per variant of $ABL_CONFIG (default configs/ldm-animals.toml) for
#       $ABL_STEPS steps (default 1000) into runs/ablation/NAME-<variant> (a trained variant is
#       kept, an interrupted one resumed), variants $ABL_VARIANTS (default all: base x0 v
#       cosine scaled-linear min-snr unet), then per variant `pipeline eval-ldm`
#       -> docs/results/NAME-<variant>-bound.json and `pipeline eval --cfg $CFG` (default 5)
#       -> docs/results/NAME-<variant>.json, each .meta with the training's wall time; assemble
#
# Sweeps are long (every point samples N images per class; default N=50): run them on purpose.
# Environment: PIPELINE (the binary; default target/release/pipeline, else `pipeline` on the PATH),
# N, CFGS, SAMPLERS, STEPS, CFG, SPACING, DEVICE (default auto), SEED (default 0), RUNS (the run folders
# whose curves to draw; default every finished run under runs/), ABL_STEPS, ABL_CONFIG,
# ABL_VARIANTS.
#
# Nothing here makes up a number: the page shows what the JSON files written by `pipeline eval`,
# `eval-vae`, `eval-ldm` and `train-evaluator` hold, the PNGs `pipeline plot` and
# `pipeline plot-sweep` draw from them and from runs/*/metrics.csv, and, for each figure, the
# command, device and date recorded beside it in a `.meta` file (written by the sweeps here;
# "not recorded" where none exists). A hand-written reading of a table lives in
# docs/results/KEY.notes.md (KEY: evaluators, vae, ldm, an eval group such as `animals`, a
# sweep such as `animals-cfg`, or an ablation such as `animals-ablation`) and is copied under it.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS=docs/results
PAGE=docs/RESULTS.md
if [[ -n "${PIPELINE:-}" ]]; then :
elif [[ -x target/release/pipeline ]]; then PIPELINE=target/release/pipeline
else PIPELINE=pipeline; fi
DEVICE=${DEVICE:-auto}
N=${N:-50}
SEED=${SEED:-0}

die() { echo "error: $*" >&2; exit 1; }

# One line describing this machine: CPU model and cores, GPUs if any (and the --device asked
# for, with an argument).
machine() {
  local cpu cores gpu
  cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo 2>/dev/null | head -n1)
  cores=$(nproc 2>/dev/null || echo '?')
  gpu=$(nvidia-smi -L 2>/dev/null | sed 's/ (UUID.*//' | paste -sd ';' - || true)
  echo "${cores} CPU cores (${cpu:-unknown CPU})${gpu:+, GPU: $gpu}${1:+, --device $1}"
}

# Runs a command that writes JSON file $1 (the command follows), and records how in $1.meta.
measure() {
  local json=$1; shift
  echo "== $*" >&2
  local start=$SECONDS
  "$@"
  printf 'command: %s\ndevice: %s\ndate: %s\nwall: %s s\n' \
    "${*/#$PIPELINE/pipeline}" "$(machine "$DEVICE")" "$(date -u +%Y-%m-%d)" "$((SECONDS - start))" > "$json.meta"
}

sweep_cfg() {
  local model=$1 evaluator=$2 name=$3
  for w in ${CFGS:-0 1 2 3 5 8}; do
    measure "$RESULTS/$name-cfg$w.json" "$PIPELINE" eval --model "$model" --evaluator "$evaluator" \
      -n "$N" --cfg "$w" --seed "$SEED" --device "$DEVICE" --json "$RESULTS/$name-cfg$w.json"
  done
}

sweep_steps() {
  local model=$1 evaluator=$2 name=$3
  local spacing=(${SPACING:+--spacing "$SPACING"}) file
  for s in ${SAMPLERS:-ddpm ddim plms dpm-solver++ unipc heun langevin}; do
    for n in ${STEPS:-10 20 50 100 250 1000}; do
      file="$RESULTS/$name-$s${SPACING:+-$SPACING}-steps$n.json"
      measure "$file" "$PIPELINE" eval --model "$model" \
        --evaluator "$evaluator" -n "$N" --cfg "${CFG:-5}" --sampler "$s" --steps "$n" \
        "${spacing[@]}" --seed "$SEED" --device "$DEVICE" --json "$file"
    done
  done
}

# The variants of sweep-ablation: each changes one thing of the base recipe (epsilon, linear,
# L_simple, DiT-M/2: ABLATION_BASE), through `train-ldm --set`. The U-Net is the ldm-fmnist-unet backbone:
# 2,799,556 parameters against the DiT-M/2's 2,837,776 on 4x8x8 latents with 10 classes.
# The two combinations change the three things that each won alone.
ABLATION_VARIANTS="base x0 v cosine scaled-linear min-snr unet v-scaled-linear-min-snr x0-scaled-linear-min-snr"
ABLATION_UNET='backbone={kind="unet", base_channels=64, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=4, groups=32}'

# The base every variant changes, pinned with --set so that it stays the same when the config's
# own defaults move (ldm-animals has predicted v with scaled-linear and min-SNR since session 4).
ABLATION_BASE=(--set diffusion.parameterization=epsilon --set schedule.kind=linear
  --set 'diffusion.loss={kind="simple"}')

# Sets the array SETS to the --set flags of ablation variant $1 (after the base's).
ablation_sets() {
  ablation_change "$1"
  SETS=("${ABLATION_BASE[@]}" "${SETS[@]}")
}

ablation_change() {
  case $1 in
    base) SETS=() ;;
    x0) SETS=(--set diffusion.parameterization=x0) ;;
    v) SETS=(--set diffusion.parameterization=v) ;;
    cosine) SETS=(--set schedule.kind=cosine) ;;
    scaled-linear) SETS=(--set schedule.kind=scaled-linear) ;;
    min-snr) SETS=(--set 'diffusion.loss={kind="min-snr", gamma=5.0}') ;;
    unet) SETS=(--set "$ABLATION_UNET") ;;
    v-scaled-linear-min-snr | x0-scaled-linear-min-snr)
      SETS=(--set "diffusion.parameterization=${1%%-*}" --set schedule.kind=scaled-linear
        --set 'diffusion.loss={kind="min-snr", gamma=5.0}') ;;
    *) die "unknown ablation variant '$1'; expected some of: $ABLATION_VARIANTS" ;;
  esac
}

sweep_ablation() {
  local vae=$1 evaluator=$2 name=$3 v dir start resume params a shown
  local steps=${ABL_STEPS:-1000} config=${ABL_CONFIG:-configs/ldm-animals.toml}
  local variants=${ABL_VARIANTS:-$ABLATION_VARIANTS} cache=runs/ablation/.latents-$name
  for v in $variants; do ablation_sets "$v"; done
  # The training latents, encoded once (a one-step run) and copied to every variant, so that
  # each variant's wall time is its training alone.
  if [[ ! -f $cache/latents/train.meta.json ]]; then
    echo "== encoding the training latents once into $cache" >&2
    "$PIPELINE" train-ldm --config "$config" --vae "$vae" --out "$cache" --steps 1 \
      --seed "$SEED" --device "$DEVICE" >&2
  fi
  for v in $variants; do
    ablation_sets "$v"
    dir=runs/ablation/$name-$v
    if [[ -f $dir/model.safetensors ]]; then
      echo "== $dir is trained, kept" >&2
    else
      mkdir -p "$dir"
      [[ -d $dir/latents ]] || cp -a "$cache/latents" "$dir/latents"
      resume=()
      [[ -f $dir/checkpoint/state.json ]] && resume=(--resume)
      echo "== train-ldm $v -> $dir" >&2
      start=$SECONDS
      "$PIPELINE" train-ldm --config "$config" --vae "$vae" --out "$dir" --steps "$steps" \
        --seed "$SEED" --device "$DEVICE" "${SETS[@]}" "${resume[@]}"
      shown=""
      for a in "${SETS[@]}"; do [[ $a == --set ]] && shown+=" --set" || shown+=" '$a'"; done
      params=$(sed -n 's/.*"num_params": *\([0-9]*\).*/\1/p' "$dir/ldm.json")
      printf 'train_command: %s\ntrain_device: %s\ntrain_date: %s\ntrain_wall: %s s%s\ntrain_steps: %s\nparams: %s\nvariant: %s\n' \
        "pipeline train-ldm --config $config --vae $vae --out $dir --steps $steps --seed $SEED$shown" \
        "$(machine "$DEVICE")" "$(date -u +%Y-%m-%d)" "$((SECONDS - start))" \
        "${resume[*]:+ (resumed: the part after the checkpoint only)}" "$steps" "$params" "$v" \
        > "$dir/train.meta"
    fi
    # an evaluation newer than the model is kept
    if [[ ! $RESULTS/$name-$v-bound.json.meta -nt $dir/model.safetensors ]]; then
      measure "$RESULTS/$name-$v-bound.json" "$PIPELINE" eval-ldm --model "$dir" --seed "$SEED" \
        --device "$DEVICE" --json "$RESULTS/$name-$v-bound.json"
      cat "$dir/train.meta" >> "$RESULTS/$name-$v-bound.json.meta"
    fi
    if [[ ! $RESULTS/$name-$v.json.meta -nt $dir/model.safetensors ]]; then
      measure "$RESULTS/$name-$v.json" "$PIPELINE" eval --model "$dir" --evaluator "$evaluator" \
        -n "$N" --cfg "${CFG:-5}" --seed "$SEED" --device "$DEVICE" --json "$RESULTS/$name-$v.json"
      cat "$dir/train.meta" >> "$RESULTS/$name-$v.json.meta"
    fi
  done
}

# Loss curves of every finished run (a model.safetensors beside its metrics.csv) in runs/X
# and recipe stages runs/X/Y, or of the folders in $RUNS.
plot_runs() {
  mkdir -p "$RESULTS/curves"
  local csv run name
  for csv in ${RUNS:+$(printf '%s/metrics.csv ' $RUNS)} ${RUNS:-runs/*/metrics.csv runs/*/*/metrics.csv}; do
    [[ -f $csv && -f $(dirname "$csv")/model.safetensors ]] || continue
    run=$(dirname "$csv")
    name=$(echo "${run#runs/}" | tr '/' '-')
    "$PIPELINE" plot "$run" --out "$RESULTS/curves/$name.png" >/dev/null
    printf 'command: pipeline plot %s --out %s\nrun: %s (its settings: %s/config.toml)\ndate: %s\n' \
      "$run" "$RESULTS/curves/$name.png" "$run" "$run" "$(date -u +%Y-%m-%d)" \
      > "$RESULTS/curves/$name.png.meta"
  done
}

# Sweep plots and tables: NAME-cfg<w>[-rescale<phi>].json groups (a group with a rescaled file is
# also drawn against the rescale), and NAME-<sampler>-steps<n>.json groups.
plot_sweeps() {
  local tmp=$1 f name
  declare -A cfg_groups=() step_groups=() rescale_groups=()
  for f in "$RESULTS"/*.json; do
    [[ -f $f ]] || continue
    name=$(basename "$f" .json)
    if [[ $name =~ ^(.+)-cfg[0-9.]+(-rescale[0-9.]+)?$ ]]; then
      cfg_groups[${BASH_REMATCH[1]}]+="$f "
      if [[ -n ${BASH_REMATCH[2]} ]]; then rescale_groups[${BASH_REMATCH[1]}]=1; fi
    elif [[ $name =~ ^(.+)-(ddpm|ddim|plms|dpm-solver\+\+|unipc|heun|langevin)(-(leading|trailing|linspace|karras))?-steps[0-9]+$ ]]; then
      step_groups[${BASH_REMATCH[1]}]+="$f "
    fi
  done
  mkdir -p "$RESULTS/sweeps"
  for name in "${!cfg_groups[@]}"; do
    # shellcheck disable=SC2086
    "$PIPELINE" plot-sweep --x cfg --out "$RESULTS/sweeps/$name-cfg.png" ${cfg_groups[$name]} \
      > "$tmp/sweep-cfg-$name.md" 2>/dev/null
  done
  for name in "${!rescale_groups[@]}"; do
    # shellcheck disable=SC2086
    "$PIPELINE" plot-sweep --x rescale --out "$RESULTS/sweeps/$name-rescale.png" ${cfg_groups[$name]} \
      > "$tmp/sweep-rescale-$name.md" 2>/dev/null
  done
  for name in "${!step_groups[@]}"; do
    # shellcheck disable=SC2086
    "$PIPELINE" plot-sweep --x steps --out "$RESULTS/sweeps/$name-steps.png" ${step_groups[$name]} \
      > "$tmp/sweep-steps-$name.md" 2>/dev/null
  done
}

assemble() {
  command -v "$PIPELINE" >/dev/null || [[ -x $PIPELINE ]] \
    || die "$PIPELINE: not found; build it (cargo build --release -p ldm-pipeline) or set PIPELINE"
  command -v python3 >/dev/null || die "python3 is needed to write the tables"
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  plot_runs
  plot_sweeps "$tmp"
  python3 - "$RESULTS" "$tmp" "$(machine)" > "$PAGE.tmp" <<'PY'
import glob, json, os, re, sys
from datetime import datetime, timezone

results, tmp, here = sys.argv[1], sys.argv[2], sys.argv[3]

def meta(path):
    """The key: value lines recorded beside a file, or {}."""
    try:
        with open(path + ".meta") as f:
            return dict(l.rstrip("\n").split(": ", 1) for l in f if ": " in l)
    except OSError:
        return {}

def provenance(path):
    m = meta(path)
    if not m:
        return f"`{path}`: command, device and date not recorded."
    parts = [f"`{m['command']}`" if "command" in m else None,
             m.get("device"), m.get("date"),
             f"{m['wall']} wall" if "wall" in m else None, m.get("note")]
    return f"`{path}`: " + "; ".join(p for p in parts if p) + "."

def notes(key):
    """A hand-written reading kept beside the data (docs/results/KEY.notes.md), if any."""
    try:
        with open(os.path.join(results, key + ".notes.md")) as f:
            text = f.read().strip()
    except OSError:
        return
    w(text)
    w("")

def load(path):
    with open(path) as f:
        return json.load(f)

def pct(x):
    return f"{100 * x:.1f}%"

def num(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"

files = sorted(glob.glob(os.path.join(results, "*.json")))
kinds = {"evaluator": [], "vae": [], "ldm": [], "eval": []}
for f in files:
    try:
        j = load(f)
    except (OSError, ValueError):
        continue
    if isinstance(j.get("held_out_accuracy"), (int, float)):
        kinds["evaluator"].append((f, j))
    elif "psnr_db" in j:
        kinds["vae"].append((f, j))
    elif "vlb_nats_per_dim" in j:
        kinds["ldm"].append((f, j))
    elif "fid" in j and "accuracy_per_class" in j:
        kinds["eval"].append((f, j))

# sweep-ablation files (NAME-<variant>.json, NAME-<variant>-bound.json, each with the variant in
# its .meta) get their own table instead of the eval and bound tables.
ABLATION = ["base", "x0", "v", "cosine", "scaled-linear", "min-snr", "unet",
            "v-scaled-linear-min-snr", "x0-scaled-linear-min-snr"]
CHANGES = {
    "base": "nothing: epsilon, linear, L_simple, DiT-M/2",
    "x0": "predicts x0 (`diffusion.parameterization = \"sample\"`)",
    "v": "predicts v (`diffusion.parameterization = \"v\"`)",
    "cosine": "cosine schedule",
    "scaled-linear": "scaled-linear schedule",
    "min-snr": "min-SNR-gamma loss weighting, gamma 5",
    "unet": "U-Net (64 channels, mult [1, 2], 1 block per level, attention at 4x4) for the DiT",
    "v-scaled-linear-min-snr": "v, scaled-linear and min-SNR-5 together",
    "x0-scaled-linear-min-snr": "x0, scaled-linear and min-SNR-5 together",
}

def ablation_of(f):
    """(NAME, variant, is_bound) of a sweep-ablation file, or None."""
    stem = os.path.basename(f)[:-5]
    bound = stem.endswith("-bound")
    stem = stem[: -len("-bound")] if bound else stem
    # the longest variant first: "...-v-scaled-linear-min-snr" is not variant "min-snr"
    for v in sorted(ABLATION, key=len, reverse=True):
        if stem.endswith("-" + v) and meta(f).get("variant") == v:
            return stem[: -len(v) - 1], v, bound
    return None

ablations = {}
for kind, bound in (("eval", False), ("ldm", True)):
    keep = []
    for f, j in kinds[kind]:
        a = ablation_of(f)
        if a and a[2] == bound:
            ablations.setdefault(a[0], {}).setdefault(a[1], {})["bound" if bound else "eval"] = (f, j)
        else:
            keep.append((f, j))
    kinds[kind] = keep

out = []
w = out.append
w("# Results")
w("")
w(f"Assembled by `scripts/results.sh` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
  f"(on {here}) from the files in `{results}/` and the run folders present; do not edit by hand. "
  "Each figure names the file it comes from and the command, device and date recorded with it. "
  "Sizes are those of the project's CPU budget unless a figure says otherwise.")
w("")

if kinds["evaluator"]:
    w("## Evaluation classifiers")
    w("")
    w("The CNN whose penultimate features define FID and precision/recall, trained on the real "
      "training split only (`pipeline train-evaluator`).")
    w("")
    w("| file | classes | held-out accuracy | held-out images |")
    w("|---|---|---|---|")
    for f, j in kinds["evaluator"]:
        w(f"| `{os.path.basename(f)}` | {len(j['class_names'])} | **{pct(j['held_out_accuracy'])}** | {j['held_out_images']} |")
    w("")
    for f, _ in kinds["evaluator"]:
        w(f"- {provenance(f)}")
    w("")
    notes("evaluators")

if kinds["vae"]:
    w("## VAE (stage 1): held-out reconstruction")
    w("")
    w("| file | images | PSNR | SSIM | KL / latent dim |")
    w("|---|---|---|---|---|")
    for f, j in kinds["vae"]:
        w(f"| `{os.path.basename(f)}` | {j['images']} | {j['psnr_db']:.2f} dB | {j['ssim']:.4f} | {j['kl_per_dim']:.3f} nats |")
    w("")
    for f, _ in kinds["vae"]:
        w(f"- {provenance(f)}")
    w("")
    notes("vae")

if kinds["ldm"]:
    w("## Latent diffusion (stage 2): held-out variational bound")
    w("")
    w("| file | latents | loss | bound (nats / latent dim) | prior | diffusion |")
    w("|---|---|---|---|---|---|")
    for f, j in kinds["ldm"]:
        w(f"| `{os.path.basename(f)}` | {j.get('latents', '-')} | {j.get('loss', float('nan')):.5f} | "
          f"{j['vlb_nats_per_dim']:.4f} | {j.get('prior_nats_per_dim', float('nan')):.4f} | "
          f"{j.get('diffusion_nats_per_dim', float('nan')):.4f} |")
    w("")
    for f, _ in kinds["ldm"]:
        w(f"- {provenance(f)}")
    w("")
    notes("ldm")

def cfg_text(j):
    """The guidance scale, with the guidance rescale where there is one: `5`, `5 rescaled by 0.7`."""
    phi = j["sampler"].get("guidance_rescale", 0)
    return f"{j['cfg']:g} rescaled by {phi:g}" if phi else f"{j['cfg']:g}"

def group_of(f):
    name = os.path.basename(f)[:-5]
    m = re.match(r"^(.+)-cfg[0-9.]+(-rescale[0-9.]+)?$", name) or \
        re.match(r"^(.+)-(ddpm|ddim|plms|dpm-solver\+\+|unipc|heun|langevin)(-(leading|trailing|linspace|karras))?-steps[0-9]+$", name)
    return m.group(1) if m else name

def kid_text(j):
    """KID x 1000 with its floor, `-` in files written before `pipeline eval` measured it."""
    if j.get("kid") is None:
        return "-"
    return f"{1000 * j['kid']:.1f} ({1000 * j['kid_floor']:.1f})"

def sampler_text(j):
    """The sampler, with its timestep spacing where it is not the default trailing: `ddim`, `ddim karras`."""
    spacing = j["sampler"].get("spacing", "trailing")
    return j["sampler"]["kind"] + ("" if spacing == "trailing" else f" {spacing}")

if kinds["eval"]:
    w("## Generated samples scored by the evaluator (`pipeline eval`)")
    w("")
    w("Per-class conditional accuracy (generated images of class c classified as c), FID in the "
      "evaluator's features against the held-out split with its real-vs-real floor (two disjoint "
      "halves of held-out images at the same sample size), precision/recall (k-NN manifolds, "
      "k = 3) and sampling speed.")
    w("")
    groups = {}
    for f, j in kinds["eval"]:
        groups.setdefault(group_of(f), []).append((f, j))
    for g, members in sorted(groups.items()):
        members.sort(key=lambda fj: (sampler_text(fj[1]), fj[1]["sampler"]["steps"],
                                     fj[1]["sampler"].get("guidance_rescale", 0), fj[1]["cfg"]))
        classes = [c for c, _ in members[0][1]["accuracy_per_class"]]
        w(f"### {g}")
        w("")
        w("| sampler | steps | cfg | n/class | " + " | ".join(classes) + " | all | FID (floor) | KID×10³ (floor) | precision / recall | images/s |")
        w("|---" * (len(classes) + 9) + "|")
        for f, j in members:
            accs = " | ".join(pct(a) for _, a in j["accuracy_per_class"])
            w(f"| {sampler_text(j)} | {j['sampler']['steps']} | {cfg_text(j)} | {j['per_class']} | {accs} | "
              f"**{pct(j['accuracy'])}** | {j['fid']:.2f} ({j['fid_floor']:.2f}) | {kid_text(j)} | "
              f"{j['precision']:.3f} / {j['recall']:.3f} | {j['images_per_second']:.1f} |")
        w("")
        with_class_fid = [(f, j) for f, j in members if "fid_per_class" in j]
        if with_class_fid:
            r = with_class_fid[0][1]["fid_per_class"]
            w(f"Per-class FID (floor): `d` in the evaluator's {r['feature_dim']} features, `k` in the top "
              f"{r['pca_dim']} principal directions of the held-out features (a lower bound of the d figure); "
              "`-` where the class has too few images for the dimension (FID needs more samples than dimensions); "
              "KID×10³ (floor) in the d features divided by the held-out features' RMS, unbiased, defined from 2 images "
              "(in files written since 2026-12-08).")
            w("")
            w("| sampler | steps | cfg | " + " | ".join(classes) + " |")
            w("|---" * (len(classes) + 3) + "|")
            for f, j in with_class_fid:
                cells = []
                for c in j["fid_per_class"]["classes"]:
                    d = f"d {num(c['fid'])} ({num(c['fid_floor'])})" if c["fid"] is not None else None
                    k = f"k {num(c['fid_pca'])} ({num(c['fid_pca_floor'])})" if c["fid_pca"] is not None else None
                    kid = (f"KID×10³ {1000 * c['kid']:.0f} ({1000 * c['kid_floor']:.0f})"
                           if c.get("kid") is not None and c.get("kid_floor") is not None else None)
                    cells.append("<br>".join(x for x in (d, k, kid) if x) or "-")
                w(f"| {sampler_text(j)} | {j['sampler']['steps']} | {cfg_text(j)} | " + " | ".join(cells) + " |")
            w("")
            reasons = sorted({c["note"] for f, j in with_class_fid for c in j["fid_per_class"]["classes"] if c.get("note")})
            for n in reasons:
                w(f"- {n}")
            if reasons:
                w("")
        for f, _ in members:
            w(f"- {provenance(f)}")
        w("")
        notes(g)

if ablations:
    w("## Ablations: parameterization, schedule, loss weighting, backbone")
    w("")
    w("Proxy runs of `scripts/results.sh sweep-ablation`: each variant changes one thing of the "
      "base config (by default `configs/ldm-animals.toml`: epsilon prediction, linear schedule, "
      "L_simple, DiT-M/2; each training command below names its config) with `train-ldm --set` "
      "and is trained for the same number of steps on the same "
      "VAE latents, seed and data order, then scored by `pipeline eval` (conditional accuracy, FID "
      "with its real-vs-real floor, precision/recall) and `pipeline eval-ldm` (held-out variational "
      "bound, 4 timesteps per latent). The held-out loss is each run's own training objective: "
      "those of different parameterizations and weightings measure different things and are not "
      "comparable with each other; the bound is.")
    w("")
    for name, variants in sorted(ablations.items()):
        w(f"### {name}: ablations")
        w("")
        w("| variant | what changed | parameters | training | cfg, n/class | accuracy | FID (floor) | precision | recall | held-out loss | bound (nats / latent dim) |")
        w("|---" * 11 + "|")
        for v in ABLATION:
            if v not in variants:
                continue
            e, b = variants[v].get("eval"), variants[v].get("bound")
            m = meta((e or b)[0])
            params = m.get("params", "")
            params = f"{int(params):,}" if params.isdigit() else "-"
            train = f"{m['train_steps']} steps, {m['train_wall']}" if "train_wall" in m else "-"
            row = [v, CHANGES[v], params, train]
            if e:
                j = e[1]
                row += [f"{j['cfg']:g}, {j['per_class']}", f"**{pct(j['accuracy'])}**",
                        f"{j['fid']:.2f} ({j['fid_floor']:.2f})", f"{j['precision']:.3f}", f"{j['recall']:.3f}"]
            else:
                row += ["-"] * 5
            if b:
                j = b[1]
                row += [f"{j['loss']:.5f}" if "loss" in j else "-", f"{j['vlb_nats_per_dim']:.4f}"]
            else:
                row += ["-", "-"]
            w("| " + " | ".join(row) + " |")
        w("")
        for v in ABLATION:
            for key in ("eval", "bound"):
                if key in variants.get(v, {}):
                    w(f"- {provenance(variants[v][key][0])}")
            first = next(iter(variants.get(v, {}).values()), None)
            m = meta(first[0]) if first else {}
            if "train_command" in m:
                w(f"- training of `{v}`: `{m['train_command']}`; {m.get('train_device', '?')}; "
                  f"{m.get('train_date', '?')}; {m['train_wall']} wall.")
        w("")
        notes(f"{name}-ablation")

sweeps = sorted(glob.glob(os.path.join(tmp, "sweep-*.md")))
if sweeps:
    w("## Sweeps")
    w("")
    for s in sweeps:
        kind, name = re.match(r"sweep-(cfg|steps|rescale)-(.+)\.md$", os.path.basename(s)).groups()
        png = f"results/sweeps/{name}-{kind}.png"
        what = {"cfg": "guidance scale", "steps": "number of sampling steps",
                "rescale": "guidance rescale"}[kind]
        w(f"### {name}: FID and accuracy vs {what}")
        w("")
        w(f"![{name} {kind} sweep]({png})")
        w("")
        with open(s) as fh:
            w(fh.read().rstrip())
        w("")
        w(f"Drawn by `pipeline plot-sweep --x {kind} --out docs/{png} <the JSON files of the {name} rows above>`; "
          "the dashed lines are the real-vs-real floors.")
        w("")
        notes(f"{name}-{kind}")

curves = sorted(glob.glob(os.path.join(results, "curves", "*.png")))
if curves:
    w("## Training curves")
    w("")
    w("Every numeric column of each run's `metrics.csv` against step (`pipeline plot`): the raw "
      "values in light blue, an exponential moving average over them (time constant 1/40 of the "
      "logged rows); loss-like columns on a log axis.")
    w("")
    for c in curves:
        name = os.path.basename(c)[:-4]
        w(f"### {name}")
        w("")
        w(f"![{name}](results/curves/{name}.png)")
        w("")
        w(f"- {provenance(c)}")
        w("")

grids = sorted(p for p in glob.glob(os.path.join(results, "*.png")))
if grids:
    w("## Sample grids and other images")
    w("")
    for p in grids:
        name = os.path.basename(p)
        w(f"![{name}](results/{name})")
        w("")
        w(f"- {provenance(p)}")
        w("")

print("\n".join(out).rstrip() + "\n")
PY
  mv "$PAGE.tmp" "$PAGE"
  echo "wrote $PAGE" >&2
}

mode=${1:-assemble}
case "$mode" in
  assemble) assemble ;;
  sweep-cfg|sweep-steps)
    [[ $# -eq 4 ]] || die "usage: scripts/results.sh $mode MODEL EVALUATOR NAME"
    [[ -d $2 ]] || die "$2: no such model folder (a run of pipeline train-ldm)"
    [[ $3 == auto || -d $3 ]] || die "$3: no such evaluator folder (make one with pipeline train-evaluator, or give auto: the reference evaluator in pipeline)"
    if [[ $mode == sweep-cfg ]]; then sweep_cfg "$2" "$3" "$4"; else sweep_steps "$2" "$3" "$4"; fi
    assemble ;;
  sweep-ablation)
    [[ $# -eq 4 ]] || die "usage: scripts/results.sh $mode VAE EVALUATOR NAME"
    [[ -f $2/vae.json ]] || die "$2: not a trained VAE folder (make one with pipeline train-vae)"
    [[ $3 == auto || -d $3 ]] || die "$3: no such evaluator folder (make one with pipeline train-evaluator, or give auto: the reference evaluator in pipeline)"
    [[ $4 =~ ^[A-Za-z0-9_.-]+$ ]] || die "NAME '$4': expected letters, digits, '.', '_' or '-'"
    sweep_ablation "$2" "$3" "$4"
    assemble ;;
  -h|--help) sed -n '2,32p' "$0" ;;
  *) die "unknown mode '$mode'; expected assemble, sweep-cfg, sweep-steps or sweep-ablation (see --help)" ;;
esac
