#!/usr/bin/env bash
# The accuracy levers on a real pretrained model, as a user runs them: snakemake over CONFIG in WORK (the data
# and the GGUF base put there first), in two phases whose results are kept as each ends: every run of the
# config, the students starting as soon as their teacher ensemble is scored (r4/); then the baseline and the
# default runs scored again in one option order, answering.rotations: 1, which trains nothing (r1/). Several
# small trainings share the GPU (--resources gpu=8 counts jobs, not GPUs). fp8_as_trained, a phase asked for by
# name, scores the config's FP8 runs on the base rounded as their training read it (benchmarks/fp8_as_trained.py).
#   bash benchmarks/real_model_levers.sh WORK CONFIG DATA_DIR GGUF [PHASE...]   (default: levers rotations1)
set -euo pipefail
work=$1 config=$2 data=$3 gguf=$4
shift 4
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(levers rotations1)
repo=$(pwd)
mkdir -p "$work/data" "$work/r4" "$work/r1"
cp "$data"/AI.xlsx "$data"/AI1000.xlsx "$work/data/"
ln -sf "$gguf" "$work/$(basename "$gguf")"
cp "$config" "$work/config.yaml"
smk=(snakemake -s "$repo/Snakefile" --directory "$work" --configfile "$work/config.yaml" --cores 16
     --resources gpu=8 --keep-going)

phase() {  # name, folder to keep the runs' results in, extra snakemake arguments, targets
  local name=$1 keep=$2 extra=$3; shift 3
  local start
  start=$(date +%s)
  # shellcheck disable=SC2086
  "${smk[@]}" "$@" $extra > "$work/snakemake_$name.log" 2>&1 || true
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$work/times.txt"
  # everything but the models' weights (a 270M base is 0.5 GB a merged fold model)
  (cd "$work/results" && tar cf - --exclude='*.safetensors' --exclude='*/adapter' --exclude='*/checkpoints' \
    --exclude=./data .) | (cd "$keep" && tar xf -)
}

for name in "${phases[@]}"; do
  case $name in
    levers) phase levers "$work/r4" "" all ;;
    rotations1)
      echo "answering: {rotations: 1}" > "$work/rotations1.yaml"
      phase rotations1 "$work/r1" "--configfile $work/config.yaml $work/rotations1.yaml" \
        results/base/metrics.json results/lora_seed1/metrics.json results/lora_seed2/metrics.json ;;
    fp8_as_trained)
      start=$(date +%s)
      python "$repo/benchmarks/fp8_as_trained.py" "$work" --out "$work/r4/fp8_as_trained.json" \
        > "$work/fp8_as_trained.log" 2>&1 || true
      echo "fp8_as_trained: $(( $(date +%s) - start )) s" | tee -a "$work/times.txt" ;;
    *) echo "unknown phase $name" >&2; exit 2 ;;
  esac
done
echo done >> "$work/times.txt"
