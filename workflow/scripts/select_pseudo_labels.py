"""Pseudo-labels: the test questions a teacher answers confidently, labelled with its answer, to train on.

    select_pseudo_labels.py --test test.json --teacher-probs results/TEACHER/answer_probs.csv --teacher TEACHER \
        --min-probability 0.9 --out pseudo_labels.json --report-out pseudo_labels_report.json

A question is kept when the teacher's probability of its most probable answer
is at least --min-probability. The records are trained on only, never
validated; the report says how many were kept and how the teacher's answers
among them spread over 1-4 (a teacher that favours one answer passes that on).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from mcqa.probabilities import ProbabilityFileError, read_probs
from mcqa.prompt import ANSWERS
from mcqa.records import read_records, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--test", required=True)
    parser.add_argument("--teacher-probs", required=True)
    parser.add_argument("--teacher", required=True, help="the teacher's name, for the report")
    parser.add_argument("--min-probability", type=float, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-out", required=True)
    args = parser.parse_args(argv)
    questions = read_records(args.test, "test")
    try:
        _, ids, probs, _ = read_probs(args.teacher_probs)
    except ProbabilityFileError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    if ids != [q["id"] for q in questions]:
        print(f"ERROR {args.teacher_probs} does not answer the questions of {args.test} in their order "
              f"({len(ids)} against {len(questions)}); the teacher was scored on another test file: rerun it",
              file=sys.stderr)
        return 2
    kept, confidence = [], []
    for question, p in zip(questions, probs):
        best = max(range(len(ANSWERS)), key=p.__getitem__)
        if p[best] >= args.min_probability:
            kept.append({key: question[key] for key in ("instruction", "input", "options")} | {"output": ANSWERS[best]})
            confidence.append(p[best])
    spread = Counter(r["output"] for r in kept)
    report = {"teacher": args.teacher, "min_probability": args.min_probability, "test_questions": len(questions),
              "kept": len(kept), "answer_spread": {answer: spread[answer] for answer in ANSWERS},
              "mean_teacher_probability": round(sum(confidence) / len(confidence), 4) if confidence else None}
    write_json_atomic(args.out, kept)
    write_json_atomic(args.report_out, report)
    print(f"{len(kept)} of {len(questions)} test questions pseudo-labelled by {args.teacher} (probability >= "
          f"{args.min_probability}); answers {report['answer_spread']}", file=sys.stderr)
    if not kept:
        print(f"WARNING no test question reaches probability {args.min_probability} under {args.teacher}: the run "
              "trains on no pseudo-labels; lower min_probability", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
