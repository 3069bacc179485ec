"""Combine the runs' answer probabilities: results/ensemble/answers.csv and answer_probs.csv (test),
or results/ensemble/metrics.json (validation).

    ensemble_answers.py --members a b --weights equal --test-probs a/answer_probs.csv b/answer_probs.csv \
        --answers answers.csv --probs answer_probs.csv
    ensemble_answers.py --members a b --weights val_accuracy --metrics a/metrics.json b/metrics.json \
        --val-probs a/val_probs.csv b/val_probs.csv --metrics-out metrics.json

No model runs: each question's four probabilities are the weighted mean of
the members' (weights equal, or in proportion to validation accuracy), and
the answer is the most probable. Members must cover the same questions in
the same order.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mcqa.metrics import CHOSEN, PROB_COLUMNS, metrics, predicted_answers, write_answers, write_probs
from mcqa.records import write_json_atomic


class EnsembleError(ValueError):
    """Members that cannot be combined; the message says which and why."""


def read_probs(path: str) -> tuple[str, list[str], list[list[float]], list[int] | None]:
    """A probability file: its key column's name, the keys, the probabilities and the labels (if any)."""
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if header[-4:] != PROB_COLUMNS:
        raise EnsembleError(f"{path}: expected the columns {', '.join(PROB_COLUMNS)} last, found {', '.join(header)}")
    labels = [int(r[header.index("label")]) for r in body] if "label" in header else None
    return header[0], [r[0] for r in body], [[float(p) for p in r[-4:]] for r in body], labels


def combine(paths: list[str], weights: list[float]) -> tuple[str, list[str], list[list[float]], list[int] | None]:
    """The weighted mean of the members' probabilities, refusing members that do not line up."""
    members = [read_probs(path) for path in paths]
    key, keys, _, labels = members[0]
    for path, (_, other_keys, _, other_labels) in zip(paths[1:], members[1:]):
        if other_keys != keys:
            where = next((i for i, (a, b) in enumerate(zip(keys, other_keys)) if a != b), min(len(keys), len(other_keys)))
            raise EnsembleError(
                f"{path} does not cover the same questions in the same order as {paths[0]} ({len(other_keys)} rows "
                f"against {len(keys)}; first difference at row {where + 1}). Rerun that member with the current data "
                "(snakemake reruns it when its inputs changed), or leave it out of ensemble.runs."
            )
        if other_labels != labels:
            raise EnsembleError(f"{path} has other labels than {paths[0]}; the members were scored on different data")
    total = sum(weights)
    mean = [[sum(w * m[2][i][a] for w, m in zip(weights, members)) / total for a in range(len(PROB_COLUMNS))]
            for i in range(len(keys))]
    return key, keys, mean, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", required=True, help="run names, in the order of the files")
    parser.add_argument("--weights", choices=["equal", "val_accuracy"], default="equal")
    parser.add_argument("--metrics", nargs="*", default=[], help="the members' metrics.json (for val_accuracy weights)")
    parser.add_argument("--test-probs", nargs="*", default=[])
    parser.add_argument("--answers", help="with --test-probs")
    parser.add_argument("--probs", help="with --test-probs")
    parser.add_argument("--val-probs", nargs="*", default=[])
    parser.add_argument("--metrics-out", help="with --val-probs")
    args = parser.parse_args(argv)
    try:
        if args.weights == "val_accuracy":
            if len(args.metrics) != len(args.members):
                raise EnsembleError("weights by validation accuracy need every member's metrics.json")
            weights = [json.loads(Path(path).read_text())["accuracy"] for path in args.metrics]
            if not any(weights):
                raise EnsembleError(f"every member ({', '.join(args.members)}) has validation accuracy 0, so "
                                    "weights by validation accuracy are all 0; set ensemble.weights: equal")
            for member, weight in zip(args.members, weights):
                if not weight:
                    print(f"WARNING member {member} has validation accuracy 0, so it gets no weight", file=sys.stderr)
        else:
            weights = [1.0] * len(args.members)
        members = ", ".join(f"{m} (weight {w:.3g})" for m, w in zip(args.members, weights))
        if args.test_probs:
            _, ids, probs, _ = combine(args.test_probs, weights)
            write_answers(args.answers, ids, predicted_answers(probs))
            write_probs(args.probs, "ID", ids, probs)
            print(f"ensemble of {members}: {len(ids)} answers", file=sys.stderr)
        if args.val_probs:
            _, _, val_probs, labels = combine(args.val_probs, weights)
            result = {**metrics(val_probs, labels), "members": dict(zip(args.members, weights)),
                      "weights": args.weights}
            if args.weights == "val_accuracy":
                result["chosen_on_these_questions"] = CHOSEN["weights"]
            write_json_atomic(args.metrics_out, result)
            print(f"ensemble of {members}: validation accuracy {result['accuracy']:.4f} {result['accuracy_ci95']}",
                  file=sys.stderr)
    except EnsembleError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
