"""Turn a question spreadsheet into the JSON records the model stages read.

    prepare_data.py train --input AI.xlsx --train-out train.json --val-out val.json --report-out r.json ...
    prepare_data.py test  --input AI1000.xlsx --out test.json --report-out r.json ...

Bad rows stop the run with a message naming file, column and row (exit 2,
no output written), or with --on-invalid skip (training files only) are left out
and listed in the report. A test file is never cut short: a question with an
empty article is still answered, and a bad or repeated id always stops the
run. Every fix made to a cell is counted in the report.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

from mcqa.prompt import INSTRUCTION, build_input
from mcqa.records import write_json_atomic
from mcqa.spreadsheet import InputError, ReadResult, Row, duplicate_rows, read_questions


def sheets_note(result: ReadResult) -> str:
    """For the log: the sheets read, when a workbook has several, and those left out (no question columns)."""
    note = f"; sheets read: {', '.join(map(repr, result.sheets_read))}" if len(result.sheets_read) > 1 else ""
    if result.sheets_left_out:
        note += f"; sheets without the question columns, not read: {', '.join(map(repr, result.sheets_left_out))}"
    return note


def length_stats(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 1),
        "median": statistics.median(values),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def check(result: ReadResult, path: str, on_invalid: str) -> list[dict]:
    """Raise on bad rows (on_invalid=error) or return them as skipped entries."""
    if not result.problems:
        return []
    lines = "\n".join("  " + p.describe() for p in result.problems)
    if on_invalid == "error":
        rows = len({(p.sheet, p.row) for p in result.problems})
        raise InputError(
            f"{path}: {rows} invalid row(s):\n{lines}\n"
            "Fix these cells in the file, or set data.on_invalid: skip in config.yaml to leave the rows out "
            "(they are then listed under 'skipped' in results/data/report.json)."
        )
    print(f"WARNING {path}: skipping {len({(p.sheet, p.row) for p in result.problems})} invalid row(s):\n{lines}",
          file=sys.stderr)
    skipped: dict[tuple, dict] = {}
    for p in result.problems:
        entry = skipped.setdefault((p.sheet, p.row), {"row": p.row, **({"sheet": p.sheet} if p.sheet else {}),
                                                      "id": p.row_id, "reasons": []})
        entry["reasons"].append(f"{p.column}: {p.message}")
    return list(skipped.values())


def base_report(result: ReadResult, path: str, skipped: list[dict]) -> dict:
    return {
        "file": path,
        "sheets_read": result.sheets_read,
        "sheets_left_out": result.sheets_left_out,
        "rows_read": result.rows_read,
        "rows_kept": len(result.rows),
        "fixed": result.fixes,
        "fixed_where": dict(sorted(result.fixed_rows.items())),
        "skipped": skipped,
        "rows_skipped": len(skipped),
        "lengths_chars": {
            "article": length_stats([len(r.article) for r in result.rows]),
            "question": length_stats([len(r.question) for r in result.rows]),
            "input": length_stats([len(build_input(r.article, r.question, r.options)) for r in result.rows]),
        },
    }


def grouped(rows: list[Row], split_by: str, seed: int) -> tuple[list, dict, Callable[[Row], object]]:
    """The groups that must stay on one side of a split, in a seeded order: an article's questions
    (split_by=article) or identical rows (same article, question and options; split_by=row), so validation
    never scores a question trained on."""
    key = (lambda r: r.article) if split_by == "article" else (lambda r: (r.article, r.question, tuple(r.options)))
    groups: dict[object, list[Row]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return order, groups, key


def split_rows(rows: list[Row], val_fraction: float, seed: int, split_by: str) -> tuple[list[Row], list[Row]]:
    """Hold out about val_fraction of the rows, whole groups at a time (see grouped)."""
    if val_fraction <= 0:
        return rows, []
    order, groups, key = grouped(rows, split_by, seed)
    target = round(val_fraction * len(rows))
    val_keys, taken = set(), 0
    for k in order:
        if taken >= target:
            break
        val_keys.add(k)
        taken += len(groups[k])
    train = [r for r in rows if key(r) not in val_keys]
    val = [r for r in rows if key(r) in val_keys]
    return train, val


def assign_folds(rows: list[Row], folds: int, seed: int, split_by: str) -> list[int]:
    """Each row's fold (0 to folds-1): the groups (see grouped), in their seeded order, each to the fold
    with the fewest rows so far, so the folds are as even as whole groups allow."""
    order, groups, key = grouped(rows, split_by, seed)
    sizes, fold_of_group = [0] * folds, {}
    for group in order:
        fold_of_group[group] = smallest = sizes.index(min(sizes))
        sizes[smallest] += len(groups[group])
    return [fold_of_group[key(r)] for r in rows]


def write_folds(rows: list[Row], folds: int, seed: int, split_by: str, folder: Path, path: str) -> dict:
    """folds.json (which rows of train.json each fold holds out) and, for each fold, the train.json of the
    other folds and the val.json of its own; returns the folds' part of the data report."""
    fold = assign_folds(rows, folds, seed, split_by)
    held_out = [[n for n, f in enumerate(fold) if f == k] for k in range(folds)]
    if min(map(len, held_out)) == 0:
        raise InputError(f"{path}: {len(rows)} usable rows in {len({r.article for r in rows})} articles cannot make "
                         f"{folds} folds that each hold something out; lower data.folds.")
    for k, rows_out in enumerate(held_out):
        out = set(rows_out)
        write_json_atomic(folder / f"fold{k}" / "train.json", [labelled_record(r) for n, r in enumerate(rows) if n not in out])
        write_json_atomic(folder / f"fold{k}" / "val.json", [labelled_record(rows[n]) for n in rows_out])
    write_json_atomic(folder / "folds.json", {"folds": folds, "held_out": held_out})
    articles = [{r.article for n, r in enumerate(rows) if fold[n] == k} for k in range(folds)]
    return {"folds": folds, "fold_records": list(map(len, held_out)),
            "articles_in_two_folds": sum(len(a & b) for i, a in enumerate(articles) for b in articles[i + 1:])}


def check_split(train: list[Row], val: list[Row], val_fraction: float, path: str) -> None:
    """Refuse a split that leaves training or validation with nothing."""
    rows = len(train) + len(val)
    if not train:
        raise InputError(f"{path}: data.val_fraction {val_fraction} holds out all {rows} usable rows, leaving none "
                         "to train on; lower data.val_fraction (0.2 is usual).")
    if val_fraction > 0 and not val:
        raise InputError(f"{path}: data.val_fraction {val_fraction} of {rows} usable rows is less than one row, so "
                         "validation would be empty; raise data.val_fraction, or set it to 0 to train on everything.")


def record(r: Row) -> dict:
    """The JSON record of a row (see mcqa.records): what the model reads, and the options it ends with."""
    return {"instruction": INSTRUCTION, "input": build_input(r.article, r.question, r.options), "options": r.options}


def labelled_record(r: Row) -> dict:
    return {**record(r), "output": str(r.label)}


def prepare_train(args: argparse.Namespace) -> None:
    result = read_questions(args.input, labelled=True)
    skipped = check(result, args.input, args.on_invalid)
    train, val = split_rows(result.rows, args.val_fraction, args.split_seed, args.split_by)
    check_split(train, val, args.val_fraction, args.input)
    report = base_report(result, args.input, skipped)
    report["duplicates"] = duplicate_rows(result.rows)
    report["split"] = {
        "by": args.split_by,
        "val_fraction": args.val_fraction,
        "seed": args.split_seed,
        "train_records": len(train),
        "val_records": len(val),
        "train_articles": len({r.article for r in train}),
        "val_articles": len({r.article for r in val}),
        "articles_on_both_sides": len({r.article for r in train} & {r.article for r in val}),
    }
    if args.folds:
        report["split"].update(write_folds(train, args.folds, args.split_seed, args.split_by, Path(args.folds_dir),
                                           args.input))
    write_json_atomic(args.train_out, [labelled_record(r) for r in train])
    write_json_atomic(args.val_out, [labelled_record(r) for r in val])
    write_json_atomic(args.report_out, report)
    print(
        f"{args.input}: read {result.rows_read}, kept {len(result.rows)}, fixed {sum(result.fixes.values())} "
        f"{result.fixes}, skipped {len(skipped)}; train {len(train)}, val {len(val)}"
        + (f"; {args.folds} folds of {report['split']['fold_records']} records" if args.folds else "")
        + sheets_note(result),
        file=sys.stderr,
    )


def prepare_test(args: argparse.Namespace) -> None:
    """Every test question becomes a record, or the run fails: a submission must hold every id once.

    Questions with an empty article or question are kept (counted as fixes);
    an unusable id is an error whatever data.on_invalid says.
    """
    result = read_questions(args.input, labelled=False)
    skipped = check(result, args.input, "error")
    records = [
        {"id": r.row_id, **record(r)} for r in result.rows
    ]
    write_json_atomic(args.out, records)
    write_json_atomic(args.report_out, base_report(result, args.input, skipped))
    print(
        f"{args.input}: read {result.rows_read}, kept {len(records)}, fixed {result.fixes}, skipped {len(skipped)}"
        f"{sheets_note(result)}",
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    train = sub.add_parser("train", help="labelled file -> train.json + val.json")
    train.add_argument("--input", required=True)
    train.add_argument("--train-out", required=True)
    train.add_argument("--val-out", required=True)
    train.add_argument("--report-out", required=True)
    train.add_argument("--val-fraction", type=float, default=0.2)
    train.add_argument("--split-seed", type=int, default=42)
    train.add_argument("--split-by", choices=["article", "row"], default="article")
    train.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    train.add_argument("--folds", type=int, default=0, help="K >= 2: write K folds (with --folds-dir)")
    train.add_argument("--folds-dir", default="", help="folder of folds.json and fold<k>/train.json, val.json")
    test = sub.add_parser("test", help="unlabelled file -> test.json")
    test.add_argument("--input", required=True)
    test.add_argument("--out", required=True)
    test.add_argument("--report-out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        (prepare_train if args.stage == "train" else prepare_test)(args)
    except InputError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
