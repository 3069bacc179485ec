"""Score the validation questions the same way as the test ones: metrics.json.

    evaluate_answers.py --model MERGED_DIR --val val.json --out metrics.json --max-seq-length 512 --settings '{...}'
"""

from __future__ import annotations

import argparse
import json
import sys

from mcqa.prompt import ANSWERS
from mcqa.records import read_records, write_json_atomic
from mcqa.scoring import score_records


def metrics(log_probs, labels: list[int]) -> dict:
    """Accuracy, confusion (rows: true answer, columns: predicted) and likelihoods."""
    n = len(labels)
    predicted = (log_probs.argmax(dim=-1) + 1).tolist()
    confusion = {t: {p: 0 for p in ANSWERS} for t in ANSWERS}
    for t, p in zip(labels, predicted):
        confusion[str(t)][str(p)] += 1
    correct_log_probs = [float(log_probs[i, t - 1]) for i, t in enumerate(labels)]
    within_four = log_probs.log_softmax(dim=-1)
    return {
        "questions": n,
        "accuracy": sum(p == t for p, t in zip(predicted, labels)) / n if n else None,
        "confusion": confusion,
        "mean_log_likelihood": sum(correct_log_probs) / n if n else None,
        "mean_log_likelihood_among_options": sum(float(within_four[i, t - 1]) for i, t in enumerate(labels)) / n if n else None,
        "answer_share_true": {a: labels.count(int(a)) / n for a in ANSWERS} if n else {},
        "answer_share_predicted": {a: predicted.count(int(a)) / n for a in ANSWERS} if n else {},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-seq-length", required=True, type=int)
    parser.add_argument("--settings", required=True, help="JSON of the config's answering block")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    s = json.loads(args.settings)

    records = read_records(args.val, "labelled")
    log_probs, _ = score_records(args.model, records, args.max_seq_length, s, args.trust_remote_code)
    result = metrics(log_probs, [r["label"] for r in records])
    write_json_atomic(args.out, result)
    print(f"validation accuracy {result['accuracy']} on {len(records)} questions", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
