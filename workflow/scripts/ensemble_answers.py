"""Combine the runs' answer probabilities: results/ensemble/answers.csv and answer_probs.csv (test),
or results/ensemble/metrics.json and val_probs.csv (validation).

    ensemble_answers.py --members a b --weights equal --test-probs a/answer_probs.csv b/answer_probs.csv \
        --answers answers.csv --probs answer_probs.csv
    ensemble_answers.py --members a b --method greedy --val-probs a/oof_probs.csv b/oof_probs.csv \
        --metrics-out metrics.json

No model runs: each question's four probabilities are the weighted mean of
the members', and the answer is the most probable. The weights are equal,
in proportion to each member's validation accuracy, or (method greedy) how
often forward selection with replacement picked the member; the last two
are chosen on the members' validation probabilities (--val-probs: with
folds, out-of-fold). Members must cover the same questions in the same order.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mcqa.metrics import CHOSEN, metrics, predicted_answers, write_answers
from mcqa.probabilities import ProbabilityFile, ProbabilityFileError, read_aligned, weighted_mean, write_probs
from mcqa.records import write_json_atomic

GREEDY_ROUNDS = 25


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) + 1 == labels).mean())


def greedy_counts(members: list[np.ndarray], labels: np.ndarray, rounds: int = GREEDY_ROUNDS) -> list[int]:
    """How often forward selection with replacement (Caruana et al. 2004) picks each member: every round
    adds the member that makes the mean most accurate (lowest log-loss on ties, the first member on exact
    ties); the picks up to the best round are kept."""
    total, counts, best = np.zeros_like(members[0]), [0] * len(members), (None, [])
    for round_ in range(1, rounds + 1):
        scores = []
        for member in members:
            mean = (total + member) / round_
            log_loss = -np.log(np.maximum(mean[np.arange(len(labels)), labels - 1], 1e-12)).mean()
            scores.append((accuracy(mean, labels), -log_loss))
        pick = max(range(len(members)), key=lambda m: (scores[m], -m))
        total += members[pick]
        counts[pick] += 1
        if best[0] is None or scores[pick] > best[0]:
            best = (scores[pick], list(counts))
    return best[1]


def choose_weights(args: argparse.Namespace, validation: list[ProbabilityFile]) -> list[float]:
    """The members' weights, as --weights and --method say (chosen on their validation probabilities,
    --val-probs, where they are chosen)."""
    if args.method == "mean_probability" and args.weights == "equal":
        return [1.0] * len(args.members)
    if len(validation) != len(args.members):
        raise ProbabilityFileError("choosing the members' weights needs every member's validation probabilities")
    labels = np.array(validation[0][3])
    members = [np.array(probs) for _, _, probs, _ in validation]
    if args.method == "greedy":
        weights = [float(n) for n in greedy_counts(members, labels)]
    else:
        weights = [accuracy(member, labels) for member in members]
        if not any(weights):
            raise ProbabilityFileError(f"every member ({', '.join(args.members)}) has validation accuracy 0, so "
                                       "weights by validation accuracy are all 0; set ensemble.weights: equal")
    for member, weight in zip(args.members, weights):
        if not weight:
            why = "never picked" if args.method == "greedy" else "validation accuracy 0"
            print(f"WARNING member {member} gets no weight ({why})", file=sys.stderr)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", nargs="+", required=True, help="run names, in the order of the files")
    parser.add_argument("--weights", choices=["equal", "val_accuracy"], default="equal")
    parser.add_argument("--method", choices=["mean_probability", "greedy"], default="mean_probability")
    parser.add_argument("--test-probs", nargs="*", default=[])
    parser.add_argument("--answers", help="with --test-probs")
    parser.add_argument("--probs", help="with --test-probs")
    parser.add_argument("--val-probs", nargs="*", default=[],
                        help="the members' validation (out-of-fold) probabilities: weights are chosen on them")
    parser.add_argument("--metrics-out", help="the ensemble's metrics on --val-probs")
    parser.add_argument("--val-probs-out", help="with --metrics-out: the ensemble's validation (out-of-fold) "
                                               "probabilities, what distillation from the ensemble learns")
    parser.add_argument("--step-chosen", nargs="*", default=[],
                        help="members whose training step was chosen on the validation questions (select_best)")
    parser.add_argument("--distilled", nargs="*", default=[],
                        help="members distilled from a teacher whose fold models trained on these questions")
    args = parser.parse_args(argv)
    try:
        validation = read_aligned(args.val_probs) if args.val_probs else []
        weights = choose_weights(args, validation)
        members = ", ".join(f"{m} (weight {w:.3g})" for m, w in zip(args.members, weights))
        if args.test_probs:
            _, ids, probs, _ = weighted_mean(read_aligned(args.test_probs), weights)
            write_answers(args.answers, ids, predicted_answers(probs))
            write_probs(args.probs, "ID", ids, probs)
            print(f"ensemble of {members}: {len(ids)} answers", file=sys.stderr)
        if args.metrics_out:
            key, records, val_probs, labels = weighted_mean(validation, weights)
            if args.val_probs_out:
                write_probs(args.val_probs_out, key, records, val_probs, labels)
            result = {**metrics(val_probs, labels), "members": dict(zip(args.members, weights)),
                      "weights": "times picked" if args.method == "greedy" else args.weights, "method": args.method}
            # The ensemble is as optimistic as what went into it: its weights, or a member's step or teacher.
            if args.method == "greedy" or args.weights == "val_accuracy":
                result["chosen_on_these_questions"] = CHOSEN["weights"]
            elif args.step_chosen:
                result["chosen_on_these_questions"] = CHOSEN["step"]
            if args.distilled:
                result["teacher_saw_these_questions"] = CHOSEN["teacher"]
            write_json_atomic(args.metrics_out, result)
            print(f"ensemble of {members}: validation accuracy {result['accuracy']:.4f} {result['accuracy_ci95']}",
                  file=sys.stderr)
    except ProbabilityFileError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
