#!/usr/bin/env bash
# The accuracy levers on a real pretrained model, as a user runs them: snakemake over CONFIG in WORK (the data
# and the GGUF base put there first), in three phases whose results are kept as each ends: the runs that
# learn from the data alone and their ensemble (r4/); the runs that learn from the ensemble (r4/ too); the
# baseline and the default runs scored again in one option order, answering.rotations: 1, which trains
# nothing (r1/). Several small trainings share the GPU (--resources gpu=8 counts jobs, not GPUs).
#   bash benchmarks/real_model_levers.sh WORK CONFIG DATA_DIR GGUF
set -euo pipefail
work=$1 config=$2 data=$3 gguf=$4
repo=$(pwd)
mkdir -p "$work/data" "$work/r4" "$work/r1"
cp "$data"/AI.xlsx "$data"/AI1000.xlsx "$work/data/"
ln -sf "$gguf" "$work/$(basename "$gguf")"
cp "$config" "$work/config.yaml"
smk=(snakemake -s "$repo/Snakefile" --directory "$work" --configfile "$work/config.yaml" --cores 16
     --resources gpu=8 --keep-going)

phase() {  # name, folder to keep the runs' results in, extra snakemake arguments, runs
  local name=$1 keep=$2 extra=$3; shift 3
  local targets=() start
  for run in "$@"; do targets+=("results/$run/metrics.json"); done
  start=$(date +%s)
  # shellcheck disable=SC2086
  "${smk[@]}" "${targets[@]}" $extra > "$work/snakemake_$name.log" 2>&1 || true
  echo "$name: $(( $(date +%s) - start )) s" | tee -a "$work/times.txt"
  for run in "$@"; do
    if [ -d "$work/results/$run" ]; then cp -r "$work/results/$run" "$keep/"; else echo "$name: no results for $run"; fi
  done
}

phase first "$work/r4" "" base lora_seed1 lora_seed2 dropout0 fp8 ensemble
phase students "$work/r4" "" distilled pseudo
echo "answering: {rotations: 1}" > "$work/rotations1.yaml"
phase rotations1 "$work/r1" "--configfile $work/config.yaml $work/rotations1.yaml" base lora_seed1 lora_seed2
echo done >> "$work/times.txt"
