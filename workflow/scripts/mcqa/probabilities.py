"""The probability files that scoring, folds, the ensemble and the teachers exchange: a key column (ID of a
test question, or record: the number of a labelled record), the label when known, then p1..p4. Written,
read, checked to cover the same questions, and averaged."""

from __future__ import annotations

import csv
import os
from typing import Sequence

from .prompt import ANSWERS

PROB_COLUMNS = [f"p{a}" for a in ANSWERS]


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
    if not rows:
        raise ProbabilityFileError(f"{path} is empty; rerun the job that writes it")
    header, body = rows[0], rows[1:]
    if header[-4:] != PROB_COLUMNS:
        raise ProbabilityFileError(f"{path}: expected the columns {', '.join(PROB_COLUMNS)} last, found {', '.join(header)}")
    label = header.index("label") if "label" in header else None
    keys, probs, labels = [], [], []
    for line, row in enumerate(body, start=2):
        try:
            if len(row) != len(header):
                raise ValueError(f"{len(row)} fields for the header's {len(header)}")
            probs.append([float(p) for p in row[-4:]])
            labels.append(int(row[label]) if label is not None else None)
        except ValueError as exc:  # a file cut short or edited by hand
            raise ProbabilityFileError(f"{path}, line {line}: {exc}; rerun the job that writes it") from None
        keys.append(row[0])
    return header[0], keys, probs, labels if label is not None else None


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
