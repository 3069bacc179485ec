"""Score the validation questions the same way as the test ones: metrics.json and val_probs.csv.

    evaluate_answers.py --model MERGED_DIR --val val.json --out metrics.json --probs val_probs.csv \
        --max-seq-length 512 --settings '{...}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mcqa.metrics import CHOSEN, metrics, write_probs
from mcqa.records import read_records, write_json_atomic
from mcqa.scoring import score_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True, help="metrics.json")
    parser.add_argument("--probs", required=True, help="val_probs.csv: record (index in val.json), label, p1..p4")
    parser.add_argument("--max-seq-length", required=True, type=int)
    parser.add_argument("--settings", required=True, help="JSON of the config's answering block")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--stats", help="also write where the time went here (JSON)")
    parser.add_argument("--selected-step", action="store_true",
                        help="the model's training step was chosen on these questions (select_best): say so")
    args = parser.parse_args(argv)
    answering = json.loads(args.settings)

    records = read_records(args.val, "labelled")
    labels = [r["label"] for r in records]
    start = time.perf_counter()
    log_probs, stats = score_records(args.model, records, args.max_seq_length, answering, args.trust_remote_code)
    probs = log_probs.exp().tolist()
    result = {**metrics(probs, labels), "rotations": answering["rotations"]}
    if args.selected_step:
        result["chosen_on_these_questions"] = CHOSEN["step"]
    write_probs(args.probs, "record", range(len(records)), probs, labels)
    write_json_atomic(args.out, result)
    if args.stats:
        write_json_atomic(args.stats, {**stats, "total_s": round(time.perf_counter() - start, 2)})
    low, high = result["accuracy_ci95"]
    print(f"validation accuracy {result['accuracy']:.4f} (95% interval {low:.3f}-{high:.3f}) on {len(records)} "
          f"questions; log-loss {result['log_loss']:.4f}; predicted {result['predicted_counts']}", file=sys.stderr)
    if args.selected_step:
        print(f"optimistic: {CHOSEN['step']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
