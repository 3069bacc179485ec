"""Validation metrics from four-way answer probabilities, and the answers file, the same for a run and for
an ensemble (the probability files are mcqa.probabilities)."""

from __future__ import annotations

import csv
import math
import os
from typing import Sequence

from .probabilities import read_probs
from .prompt import ANSWERS

# What was chosen on the validation questions that a metrics.json then scores, making its accuracy
# optimistic (metrics.json's chosen_on_these_questions, and a column of the experiments table).
CHOSEN = {"step": "the training step kept (select_best), the best of several on these questions",
          "weights": "the members' weights (ensemble.weights: val_accuracy or method: greedy), taken from these "
                     "questions",
          "teacher": "the teacher distilled into each fold model (distill), whose fold models trained on these "
                     "questions",
          "pseudo_teacher": "the teacher whose pseudo-labels each fold model trained on (pseudo_labels), whose fold "
                            "models trained on these questions"}


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (honest also near 0 and 1, unlike p +- 2 se)."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def predicted_answers(probs: Sequence[Sequence[float]]) -> list[int]:
    """The most probable answer (1-4) of each question."""
    return [max(range(len(ANSWERS)), key=lambda a: row[a]) + 1 for row in probs]


def correctness(path: str | os.PathLike) -> list[int]:
    """1 or 0 for each question of a probability file (mcqa.probabilities): whether its most probable answer
    is its label."""
    _, _, probs, labels = read_probs(str(path))
    return [int(answer == label) for answer, label in zip(predicted_answers(probs), labels)]


def metrics(probs: Sequence[Sequence[float]], labels: Sequence[int]) -> dict:
    """Accuracy with its 95% interval, log-loss, confusion and how the answers spread over 1-4.

    `probs` are each question's four answer probabilities (summing to 1),
    `labels` the true answers 1-4. Rows of `confusion` are true answers,
    columns predicted ones; `recall` is per true answer.
    """
    n = len(labels)
    predicted = predicted_answers(probs)
    correct = sum(p == t for p, t in zip(predicted, labels))
    confusion = {t: {p: 0 for p in ANSWERS} for t in ANSWERS}
    for t, p in zip(labels, predicted):
        confusion[str(t)][str(p)] += 1
    true_counts = {a: labels.count(int(a)) for a in ANSWERS}
    predicted_counts = {a: predicted.count(int(a)) for a in ANSWERS}
    return {
        "questions": n,
        "accuracy": correct / n if n else None,
        "accuracy_ci95": wilson_interval(correct, n),
        "log_loss": -sum(math.log(max(row[t - 1], 1e-12)) for row, t in zip(probs, labels)) / n if n else None,
        "confusion": confusion,
        "true_counts": true_counts,
        "predicted_counts": predicted_counts,
        "recall": {a: confusion[a][a] / true_counts[a] if true_counts[a] else None for a in ANSWERS},
    }


def write_answers(path: str | os.PathLike, ids: Sequence[str], answers: Sequence[int]) -> None:
    """The submission, `ID,Answer`, one row per test id (checked: every id exactly once), via a temporary file."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"test ids are not unique; rerun data preparation ({len(ids) - len(set(ids))} repeated)")
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "Answer"])
        writer.writerows(zip(ids, answers))
    os.replace(tmp, path)


def paired_difference(run: Sequence[Sequence[int]], reference: Sequence[Sequence[int]], z: float = 1.96) -> dict:
    """A run's accuracy minus a reference's on the same questions, with a 95% interval.

    Each side is one correctness vector (1 or 0 a question, the questions in the same order) per seed
    replica. The difference is of the replicas' mean accuracies; its interval is normal, with the variance
    of the per-question paired differences (of each side's mean correctness over its replicas) over the
    number of questions, plus, for a side with two or more replicas, the variance of its replicas'
    accuracies over their number (the spread between seeds; counted on top of the questions' part, so the
    interval errs wide). A side of one replica adds no seed spread: `seeds` says how many each side had.
    """
    if len({len(r) for r in [*run, *reference]}) != 1:
        raise ValueError("the two sides are not scored on the same questions")
    ours = [sum(column) / len(run) for column in zip(*run)]
    theirs = [sum(column) / len(reference) for column in zip(*reference)]
    differences = [a - b for a, b in zip(ours, theirs)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) / n if n > 1 else 0.0
    for side in (run, reference):
        if len(side) > 1:
            accuracies = [sum(r) / n for r in side]
            centre = sum(accuracies) / len(side)
            variance += sum((a - centre) ** 2 for a in accuracies) / (len(side) - 1) / len(side)
    half = z * math.sqrt(variance)
    return {"difference": mean, "ci95": [mean - half, mean + half], "seeds": [len(run), len(reference)]}
