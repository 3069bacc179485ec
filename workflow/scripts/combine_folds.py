"""A cross-validated run from its fold models: oof_probs.csv, metrics.json, answer_probs.csv, answers.csv.

    combine_folds.py --folds results/data/folds.json --val-probs r/fold0/val_probs.csv r/fold1/val_probs.csv \
        --answer-probs r/fold0/answer_probs.csv r/fold1/answer_probs.csv --oof r/oof_probs.csv \
        --metrics r/metrics.json --answers r/answers.csv --probs r/answer_probs.csv

Each fold model scored the fold it did not train on: together they score
every training question exactly once (oof_probs.csv, keyed by the record's
place in results/data/train.json). The metrics are computed on all of them,
with each fold's accuracy and their spread. The run's test probabilities are
the mean of its fold models', and its answers the most probable of those.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mcqa.metrics import CHOSEN, metrics, predicted_answers, write_answers
from mcqa.probabilities import ProbabilityFileError, read_aligned, read_probs, weighted_mean, write_probs
from mcqa.records import write_json_atomic


def out_of_fold(folds: dict, val_probs: list[str]) -> tuple[list[list[float]], list[int], list[float]]:
    """Every training question's probabilities and label in train.json's order, and each fold's accuracy."""
    probs: dict[int, list[float]] = {}
    labels: dict[int, int] = {}
    accuracies = []
    for held_out, path in zip(folds["held_out"], val_probs):
        _, keys, fold_probs, fold_labels = read_probs(path)
        if len(keys) != len(held_out):
            raise ProbabilityFileError(f"{path} has {len(keys)} rows, but its fold holds out {len(held_out)} "
                                       "questions; rerun that fold's evaluation")
        for row, record in enumerate(held_out):
            probs[record], labels[record] = fold_probs[row], fold_labels[row]
        accuracies.append(metrics(fold_probs, fold_labels)["accuracy"])
    order = sorted(probs)
    if order != list(range(len(order))):
        raise ProbabilityFileError("the folds do not hold out every training question exactly once; rerun data "
                                   "preparation")
    return [probs[n] for n in order], [labels[n] for n in order], accuracies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", required=True, help="results/data/folds.json")
    parser.add_argument("--val-probs", nargs="+", required=True, help="each fold model's val_probs.csv, in fold order")
    parser.add_argument("--answer-probs", nargs="+", required=True, help="each fold model's answer_probs.csv")
    parser.add_argument("--oof", required=True)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--answers", required=True)
    parser.add_argument("--probs", required=True)
    parser.add_argument("--selected-step", action="store_true",
                        help="each fold model's step was chosen on its held-out fold (select_best): say so")
    parser.add_argument("--distilled", action="store_true",
                        help="the fold models learnt from a teacher whose fold models saw their held-out folds: say so")
    parser.add_argument("--pseudo-labelled", action="store_true",
                        help="the fold models trained on pseudo-labels of a teacher whose fold models saw their "
                             "held-out folds: say so")
    args = parser.parse_args(argv)
    folds = json.loads(Path(args.folds).read_text())
    try:
        if len(args.val_probs) != folds["folds"] or len(args.answer_probs) != folds["folds"]:
            raise ProbabilityFileError(f"{args.folds} has {folds['folds']} folds, but {len(args.val_probs)} "
                                       f"validation and {len(args.answer_probs)} answer files were given")
        probs, labels, accuracies = out_of_fold(folds, args.val_probs)
        _, ids, test_probs, _ = weighted_mean(read_aligned(args.answer_probs), [1.0] * len(args.answer_probs))
    except ProbabilityFileError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    write_probs(args.oof, "record", range(len(probs)), probs, labels)
    result = {**metrics(probs, labels), "folds": folds["folds"], "fold_accuracy": accuracies,
              "fold_accuracy_sd": round(statistics.stdev(accuracies), 4)}
    if args.selected_step:
        result["chosen_on_these_questions"] = CHOSEN["step"]
    if args.distilled:
        result["teacher_saw_these_questions"] = CHOSEN["teacher"]
    elif args.pseudo_labelled:
        result["teacher_saw_these_questions"] = CHOSEN["pseudo_teacher"]
    write_json_atomic(args.metrics, result)
    write_answers(args.answers, ids, predicted_answers(test_probs))
    write_probs(args.probs, "ID", ids, test_probs)
    low, high = result["accuracy_ci95"]
    print(f"out-of-fold accuracy {result['accuracy']:.4f} (95% interval {low:.3f}-{high:.3f}) on {len(probs)} "
          f"questions; folds {', '.join(f'{a:.4f}' for a in accuracies)} (sd {result['fold_accuracy_sd']}); "
          f"{len(ids)} test answers from the mean of {folds['folds']} fold models", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
