#!/usr/bin/env bash
# The accuracy levers on a real pretrained model, as a user runs them: snakemake over CONFIG in WORK (the
# data and the GGUF base put there first), every run's out-of-fold metrics and probabilities; then the
# baseline and the default runs scored again in one option order (answering.rotations: 1), which trains
# nothing. Several small trainings share the GPU (--resources gpu=8 counts jobs, not GPUs).
#   bash benchmarks/real_model_levers.sh WORK CONFIG DATA_DIR GGUF OUT_TAR
set -euo pipefail
work=$1 config=$2 data=$3 gguf=$4 out=$5
repo=$(pwd)
mkdir -p "$work/data"
cp "$data"/AI.xlsx "$data"/AI1000.xlsx "$work/data/"
ln -sf "$gguf" "$work/$(basename "$gguf")"
cp "$config" "$work/config.yaml"
runs=(base lora_seed1 lora_seed2 best dropout0 fp8 distilled pseudo ensemble)
smk=(snakemake -s "$repo/Snakefile" --directory "$work" --configfile "$work/config.yaml" --cores 16
     --resources gpu=8 --keep-going)
start=$(date +%s)
targets=()
for run in "${runs[@]}"; do targets+=("results/$run/metrics.json"); done
"${smk[@]}" "${targets[@]}" > "$work/snakemake_r4.log" 2>&1 || true
echo "rotations 4: $(( $(date +%s) - start )) s" | tee -a "$work/times.txt"
mkdir -p "$work/r4"
for run in "${runs[@]}"; do
  [ -d "$work/results/$run" ] && cp -r "$work/results/$run" "$work/r4/$run" || echo "no results for $run"
done
start=$(date +%s)
"${smk[@]}" --config 'answering={rotations: 1}' results/base/metrics.json results/lora_seed1/metrics.json \
  results/lora_seed2/metrics.json > "$work/snakemake_r1.log" 2>&1 || true
echo "rotations 1: $(( $(date +%s) - start )) s" | tee -a "$work/times.txt"
mkdir -p "$work/r1"
for run in base lora_seed1 lora_seed2; do cp -r "$work/results/$run" "$work/r1/$run" || true; done
tar -czf "$out" -C "$work" r4 r1 logs times.txt snakemake_r4.log snakemake_r1.log config.yaml \
  --exclude='*/merged' --exclude='*/adapter' --exclude='*/checkpoints'
