"""Validation metrics from four-way answer probabilities, and the answer and probability files,
the same for a run and for an ensemble."""

from __future__ import annotations

import csv
import math
import os
from typing import Sequence

from .prompt import ANSWERS

PROB_COLUMNS = [f"p{a}" for a in ANSWERS]
# What was chosen on the validation questions that a metrics.json then scores, making its accuracy
# optimistic (metrics.json's chosen_on_these_questions, and a column of the experiments table).
CHOSEN = {"step": "the training step kept (select_best), the best of several on these questions",
          "weights": "the members' weights (ensemble.weights: val_accuracy or method: greedy), taken from these "
                     "questions",
          "teacher": "the teacher distilled into each fold model (distill), whose fold models trained on these "
                     "questions"}


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


def write_probs(path: str | os.PathLike, key: str, keys: Sequence, probs: Sequence[Sequence[float]],
                labels: Sequence[int] | None = None) -> None:
    """A probability file: `key` (ID or record), label when given, p1..p4 (written via a temporary file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, *(["label"] if labels is not None else []), *PROB_COLUMNS])
        for i, (k, row) in enumerate(zip(keys, probs)):
            writer.writerow([k, *([labels[i]] if labels is not None else []), *(f"{p:.6f}" for p in row)])
    os.replace(tmp, path)


# A probability file read: its key column's name, the keys, the probabilities and the labels (if any).
ProbabilityFile = tuple[str, list[str], list[list[float]], list[int] | None]


class ProbabilityFileError(ValueError):
    """Probability files that cannot be read or combined; the message says which and why."""


def read_probs(path: str) -> ProbabilityFile:
    """A probability file: its key column's name, the keys, the probabilities and the labels (if any)."""
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    if header[-4:] != PROB_COLUMNS:
        raise ProbabilityFileError(f"{path}: expected the columns {', '.join(PROB_COLUMNS)} last, found {', '.join(header)}")
    labels = [int(r[header.index("label")]) for r in body] if "label" in header else None
    return header[0], [r[0] for r in body], [[float(p) for p in r[-4:]] for r in body], labels


def read_aligned(paths: Sequence[str]) -> list[ProbabilityFile]:
    """Several probability files (an ensemble's members, a run's folds), refusing files that do not cover
    the same questions in the same order."""
    members = [read_probs(path) for path in paths]
    _, keys, _, labels = members[0]
    for path, (_, other_keys, _, other_labels) in zip(paths[1:], members[1:]):
        if other_keys != keys:
            where = next((i for i, (a, b) in enumerate(zip(keys, other_keys)) if a != b), min(len(keys), len(other_keys)))
            raise ProbabilityFileError(
                f"{path} does not cover the same questions in the same order as {paths[0]} ({len(other_keys)} rows "
                f"against {len(keys)}; first difference at row {where + 1}). Rerun that member with the current data "
                "(snakemake reruns it when its inputs changed), or leave it out of ensemble.runs."
            )
        if other_labels != labels:
            raise ProbabilityFileError(f"{path} has other labels than {paths[0]}; the members were scored on different data")
    return members


def weighted_mean(members: Sequence[ProbabilityFile], weights: Sequence[float]) -> ProbabilityFile:
    """The weighted mean of probability files read by read_aligned."""
    key, keys, _, labels = members[0]
    total = sum(weights)
    mean = [[sum(w * m[2][i][a] for w, m in zip(weights, members)) / total for a in range(len(PROB_COLUMNS))]
            for i in range(len(keys))]
    return key, keys, mean, labels


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
