"""Score a model on validation questions, test questions or both, loading it once.

    score_questions.py --model MERGED_DIR_OR_BASE [--adapter ADAPTER_DIR] [--revision REV] \
        [--val val.json --metrics metrics.json --val-probs val_probs.csv [--selected-step]] \
        [--test test.json --answer-probs answer_probs.csv [--answers answers.csv]] \
        --max-seq-length 512 --settings \
        '{"batch_tokens": 16384, "precision": "auto", "load_in": "none", "rotations": 4, "prompt_format": "plain",
          "fused_kernels": true}'

Each question gets the answer whose digit has the highest log-probability at
the answer position: no sampling, so the same model gives the same files.
Validation writes metrics.json (accuracy with its interval, log-loss, the
confusion matrix) and the probabilities of every question; test writes the
answers file and the probabilities. With --adapter, --model is the base and
the adapter is merged into it as it loads, so a model that only exists to be
scored (a fold model) needs no merged checkpoint on disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mcqa.lora import MergeError, apply_adapter
from mcqa.metrics import CHOSEN, metrics, write_answers
from mcqa.probabilities import write_probs
from mcqa.modeling import fuse_kernels, load_model, load_tokenizer, resolve_precision
from mcqa.progress import Meter
from mcqa.prompt import describe_cuts, prompt_frame
from mcqa.records import read_records, write_json_atomic
from mcqa.scoring import encode_rotations, score_prompts


def score_question_sets(model_path: str, question_sets: dict[str, list[dict]], max_seq_length: int, settings: dict,
                        adapter: Path | None = None, revision: str | None = None,
                        trust_remote_code: bool = False) -> dict[str, tuple[torch.Tensor, dict]]:
    """Load a model once as the answering settings say and score each named set of records with it.

    The model is a merged checkpoint, or with `adapter` the base at
    `model_path` with the adapter put in as it loads (apply_adapter: merged
    into the weights on the device, or run unmerged over an 8-bit or 4-bit
    base); the tokenizer is then the adapter's. The prompts are encoded
    while the model loads; with `settings["fused_kernels"]` the model gets
    Liger's kernels where they apply (fuse_kernels). Returns, for each set,
    (N, 4) log-probabilities over the four answers, in the records' own
    option order, combined over `settings["rotations"]` orders, and where
    the time went (seconds loading, encoding, scoring; questions/s while
    scoring; the kernels; how the adapter was applied).
    """
    start = time.perf_counter()
    precision = resolve_precision(settings["precision"])
    tokenizer = load_tokenizer(str(adapter or model_path), trust_remote_code, revision)
    frame = prompt_frame(tokenizer, settings["prompt_format"])
    with ThreadPoolExecutor(1) as pool:
        encoding = pool.submit(lambda: {name: encode_rotations(tokenizer, records, max_seq_length, settings["rotations"],
                                                               frame) for name, records in question_sets.items()})
        model = load_model(model_path, precision, settings["load_in"], trust_remote_code, revision).eval()
        model, adapted = apply_adapter(model, adapter) if adapter else (model, "none (a merged model or the base)")
        kernels = fuse_kernels(model) if settings["fused_kernels"] else "off: answering.fused_kernels is false"
        loaded = time.perf_counter() - start
        prompts = encoding.result()
    encoded = time.perf_counter() - start
    sizes = " and ".join(f"{len(records)} {name} questions" for name, records in question_sets.items())
    print(f"{sizes} x {settings['rotations']} option order(s), {settings['prompt_format']} prompts; "
          f"precision {precision}; adapter: {adapted}; fused kernels: {kernels}; model loaded in {loaded:.1f} s, "
          f"prompts encoded by {encoded:.1f} s", file=sys.stderr, flush=True)
    results = {}
    for name, records in question_sets.items():
        began = time.perf_counter()
        meter = Meter(len(records) * settings["rotations"], f"{name} prompts")
        log_probs, cuts = score_prompts(model, records, prompts[name], frame.answer_ids, settings["batch_tokens"], meter)
        scoring = time.perf_counter() - began
        print(describe_cuts(cuts, [r.get("id", f"record {n}") for n, r in enumerate(records)], max_seq_length),
              file=sys.stderr, flush=True)
        results[name] = log_probs, {
            "questions": len(records), "rotations": settings["rotations"], "fused_kernels": kernels,
            "adapter": adapted, "load_s": round(loaded, 2), "ready_s": round(encoded, 2),
            "scoring_s": round(scoring, 2), "questions_per_s": round(len(records) / max(scoring, 1e-9), 1)}
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a merged checkpoint, or with --adapter the base")
    parser.add_argument("--adapter", type=Path, help="a LoRA adapter to merge into --model as it loads")
    parser.add_argument("--revision", default=None, help="hub commit, branch or tag of --model")
    parser.add_argument("--val", help="labelled questions to evaluate on")
    parser.add_argument("--metrics", type=Path, help="metrics.json of the validation questions")
    parser.add_argument("--val-probs", type=Path, help="val_probs.csv: record (index in --val), label, p1..p4")
    parser.add_argument("--selected-step", action="store_true",
                        help="the model's training step was chosen on the validation questions (select_best): say so")
    parser.add_argument("--test", help="questions to answer")
    parser.add_argument("--answers", type=Path, help="answers.csv (ID,Answer); a fold model's go only into its run's")
    parser.add_argument("--answer-probs", type=Path, help="answer_probs.csv: ID, p1..p4")
    parser.add_argument("--max-seq-length", required=True, type=int)
    parser.add_argument("--settings", required=True, help="JSON of the config's answering block")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--stats", type=Path, help="also write where the time went here (JSON, per question set)")
    args = parser.parse_args(argv)
    for part, outputs in (("val", ("metrics", "val_probs")), ("test", ("answer_probs",))):
        given = [getattr(args, name) is not None for name in (part, *outputs)]
        if any(given) and not all(given):
            parser.error(f"--{part} goes with --{' and --'.join(o.replace('_', '-') for o in outputs)}")
    if not (args.val or args.test):
        parser.error("nothing to score: give --val or --test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    answering = json.loads(args.settings)
    start = time.perf_counter()
    question_sets = {}
    if args.val:
        question_sets["val"] = read_records(args.val, "labelled")
    if args.test:
        question_sets["test"] = read_records(args.test, "test")
    try:
        scored = score_question_sets(args.model, question_sets, args.max_seq_length, answering, args.adapter,
                                     args.revision, args.trust_remote_code)
    except MergeError as exc:
        print(f"ERROR merging {args.adapter} into {args.model}: {exc}", file=sys.stderr)
        return 2
    stats = {}
    if args.val:
        log_probs, stats["val"] = scored["val"]
        records = question_sets["val"]
        labels = [r["label"] for r in records]
        probs = log_probs.exp().tolist()
        result = {**metrics(probs, labels), "rotations": answering["rotations"]}
        if args.selected_step:
            result["chosen_on_these_questions"] = CHOSEN["step"]
        write_probs(args.val_probs, "record", range(len(records)), probs, labels)
        write_json_atomic(args.metrics, result)
        low, high = result["accuracy_ci95"]
        print(f"validation accuracy {result['accuracy']:.4f} (95% interval {low:.3f}-{high:.3f}) on {len(records)} "
              f"questions; log-loss {result['log_loss']:.4f}; predicted {result['predicted_counts']}", file=sys.stderr)
        if args.selected_step:
            print(f"optimistic: {CHOSEN['step']}", file=sys.stderr)
    if args.test:
        log_probs, stats["test"] = scored["test"]
        ids = [r["id"] for r in question_sets["test"]]
        if args.answers:
            write_answers(args.answers, ids, (log_probs.argmax(dim=-1) + 1).tolist())
        write_probs(args.answer_probs, "ID", ids, log_probs.exp().tolist())
        print(f"answered {len(ids)} questions ({stats['test']['questions_per_s']:.1f} questions/s while scoring, "
              f"{answering['rotations']} option order(s) each)", file=sys.stderr)
    total = round(time.perf_counter() - start, 2)
    print(f"scored in {total:.1f} s", file=sys.stderr)
    if args.stats:
        write_json_atomic(args.stats, {part: {**entry, "total_s": total} for part, entry in stats.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
