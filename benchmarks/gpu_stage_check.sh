#!/usr/bin/env bash
# Prove the model stages on a CUDA GPU: train, merge and answer a small random
# Llama on the bundled sample in bf16, then again with an 8-bit base
# (bitsandbytes), each with the schema's default training settings; each model
# is also scored as a fold model is, from the base and the adapter, and the
# two compared. Usage: bash benchmarks/gpu_stage_check.sh WORK_DIR
set -euo pipefail
work=${1:-benchmarks/work/stages}
scripts=workflow/scripts
mkdir -p "$work"
python $scripts/prepare_data.py train --input resources/sample/train.xlsx --train-out "$work/train.json" \
  --val-out "$work/val.json" --report-out "$work/train_report.json"
python $scripts/prepare_data.py test --input resources/sample/test.xlsx --out "$work/test.json" \
  --report-out "$work/test_report.json"
python $scripts/build_demo_model.py --train "$work/train.json" --out "$work/base" \
  --settings '{"vocab_size": 2000, "hidden_size": 256, "intermediate_size": 512, "num_layers": 2, "num_heads": 4, "seed": 0}'
# bf16: the defaults (packed, compiled) with select_best, which scores validation
# with SDPA between packed training steps; 8-bit: the recipe's base (never compiled).
modes=${MODES:-bf16:none fp16:8bit}  # e.g. MODES=fp16:8bit for one
for mode in $modes; do
  precision=${mode%:*} load_in=${mode#*:}
  settings=$(python -c "import json, yaml; print(json.dumps({
    **{k: v['default'] for k, v in yaml.safe_load(open('workflow/schemas/training.schema.yaml'))['properties'].items()},
    'lora_r': 16, 'lora_alpha': 32, 'learning_rate': 0.002, 'epochs': 3, 'micro_batch_size': 8,
    'max_seq_length': 256, 'precision': '$precision', 'load_in': '$load_in',
    'gradient_checkpointing': '$load_in' != 'none', 'select_best': '$load_in' == 'none',
    'checkpoint_steps': 20, 'eval_steps': 20, 'logging_steps': 10}))")
  answering="{\"batch_tokens\": 4096, \"precision\": \"$precision\", \"load_in\": \"$load_in\", \"rotations\": 4, \"prompt_format\": \"plain\", \"fused_kernels\": true}"
  exact="{\"batch_tokens\": 4096, \"precision\": \"fp32\", \"load_in\": \"none\", \"rotations\": 4, \"prompt_format\": \"plain\", \"fused_kernels\": true}"
  echo "== $precision, base loaded as $load_in"
  python $scripts/train_lora.py --train "$work/train.json" --val "$work/val.json" --base-model "$work/base" \
    --out "$work/adapter_$load_in" --log-jsonl "$work/train_log_$load_in.jsonl" \
    --checkpoint-dir "$work/checkpoints_$load_in" --settings "$settings" --rotations 4
  python $scripts/merge_lora.py --base-model "$work/base" --adapter "$work/adapter_$load_in" --out "$work/merged_$load_in"
  python $scripts/score_questions.py --model "$work/merged_$load_in" --test "$work/test.json" \
    --answers "$work/answers_$load_in.csv" --answer-probs "$work/probs_$load_in.csv" --val "$work/val.json" \
    --metrics "$work/metrics_$load_in.json" --val-probs "$work/val_probs_$load_in.csv" --max-seq-length 256 \
    --settings "$answering"
  # As a fold model is scored: the base with the adapter put in as it loads, no merged checkpoint.
  python $scripts/score_questions.py --model "$work/base" --adapter "$work/adapter_$load_in" \
    --test "$work/test.json" --answer-probs "$work/probs_adapter_$load_in.csv" --val "$work/val.json" \
    --metrics "$work/metrics_adapter_$load_in.json" --val-probs "$work/val_probs_adapter_$load_in.csv" \
    --max-seq-length 256 --settings "$answering"
  # The exact merged model's scores: base and adapter in fp32, unquantised (what both ways above round).
  python $scripts/score_questions.py --model "$work/base" --adapter "$work/adapter_$load_in" \
    --test "$work/test.json" --answer-probs "$work/probs_fp32_$load_in.csv" --val "$work/val.json" \
    --metrics "$work/metrics_fp32_$load_in.json" --val-probs "$work/val_probs_fp32_$load_in.csv" \
    --max-seq-length 256 --settings "$exact"
done
python - "$work" $modes <<'PY'
import csv, json, sys
work = sys.argv[1]
for load_in in (mode.split(":")[1] for mode in sys.argv[2:]):
    rows = list(csv.DictReader(open(f"{work}/answers_{load_in}.csv")))
    metrics = json.load(open(f"{work}/metrics_{load_in}.json"))
    log = [json.loads(l) for l in open(f"{work}/train_log_{load_in}.jsonl")]
    losses = [e["loss"] for e in log if "loss" in e]
    assert {r["Answer"] for r in rows} <= set("1234") and len(rows) == 45
    best = [e for e in log if "best_step" in e]
    assert load_in != "none" or best, "select_best kept no step"
    print(f"{load_in}: {best}")
    print(f"{load_in}: {len(rows)} answers, val accuracy {metrics['accuracy']:.3f}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, peak {max(e.get('peak_gpu_mem_gb', 0) for e in log)} GiB")
    for part in ("probs", "val_probs"):  # the merged checkpoint and the base with the adapter put in, against fp32
        exact = list(csv.DictReader(open(f"{work}/{part}_fp32_{load_in}.csv")))
        for kind, name in (("", "merged checkpoint"), ("_adapter", "base + adapter")):
            rows = list(csv.DictReader(open(f"{work}/{part}{kind}_{load_in}.csv")))
            diff = max(abs(float(x[f"p{k}"]) - float(y[f"p{k}"])) for x, y in zip(rows, exact) for k in "1234")
            same = sum(max("1234", key=lambda k: float(x[f"p{k}"])) == max("1234", key=lambda k: float(y[f"p{k}"]))
                       for x, y in zip(rows, exact)) / len(rows)
            print(f"{load_in}: {part} of the {name} against the exact model in fp32: largest probability "
                  f"difference {diff:.4f}, same answer for {same:.1%}")
PY
