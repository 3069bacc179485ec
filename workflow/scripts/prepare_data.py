"""Turn a question spreadsheet into the JSON records the model stages read.

    prepare_data.py train --input AI.xlsx --train-out train.json --val-out val.json --report-out r.json ...
    prepare_data.py test  --input AI1000.xlsx --out test.json --report-out r.json ...
    prepare_data.py folds --train train.json --folds 5 --out-dir results/data ...
    prepare_data.py extra --input c3.csv --name c3 --against train.json val.json test.json --out c3.json ...
    prepare_data.py extra-check --records c3.json --against test.json --out c3_test_check.json

An extra source (data.extra) is another labelled file, only ever trained on:
read with its own column names, converted to Traditional Chinese with OpenCC
where asked, and without the questions whose article is also in the training
or test file (after conversion, Unicode NFKC and without whitespace), so
validation and out-of-fold figures stay comparable and nothing of the test
file is trained on. Each row left out is counted in its report with why.

The folds are a job of their own, read from train.json: changing data.folds
rewrites only them, and what reads train.json alone (a refit, a baseline,
the demo base) is not made stale.

Bad rows stop the run with a message naming file, column and row (exit 2,
no output written), or with --on-invalid skip (training files only) are left out
and listed in the report. A test file is never cut short: a question with an
empty article is still answered, and a bad or repeated id always stops the
run. Every fix made to a cell is counted in the report.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from mcqa.articles import NEAR_COPY_JACCARD, SHINGLE_CHARACTERS, NearCopies, article_key
from mcqa.prompt import ARTICLE_MARKER, INSTRUCTION, build_input, split_input
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
    """Raise on bad rows (on_invalid=error, or never for a test file, whose rows are never skipped) or return
    them as skipped entries (skip)."""
    if not result.problems:
        return []
    lines = "\n".join("  " + p.describe() for p in result.problems)
    if on_invalid != "skip":
        rows = len({(p.sheet, p.row) for p in result.problems})
        fix = ("Fix these cells in the file, or set data.on_invalid: skip in config.yaml to leave the rows out "
               "(they are then listed under 'skipped' in results/data/report.json)." if on_invalid == "error" else
               "Fix these cells in the file: a test file is answered whole, every question once, so data.on_invalid "
               "never leaves its rows out.")
        raise InputError(f"{path}: {rows} invalid row(s):\n{lines}\n{fix}")
    print(f"WARNING {path}: skipping {len({(p.sheet, p.row) for p in result.problems})} invalid row(s):\n{lines}",
          file=sys.stderr)
    skipped: dict[tuple, dict] = {}
    for p in result.problems:
        entry = skipped.setdefault((p.sheet, p.row), {"row": p.row, **({"sheet": p.sheet} if p.sheet else {}),
                                                      "id": p.row_id, "reasons": []})
        entry["reasons"].append(f"{p.column}: {p.message}")
    return list(skipped.values())


def text_lengths(rows: list[Row]) -> dict:
    """Length statistics, in characters, of the rows' articles, questions and whole inputs."""
    return {
        "article": length_stats([len(r.article) for r in rows]),
        "question": length_stats([len(r.question) for r in rows]),
        "input": length_stats([len(build_input(r.article, r.question, r.options)) for r in rows]),
    }


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
        "lengths_chars": text_lengths(result.rows),
    }


def grouped(items: list, key: Callable, seed: int) -> tuple[list, dict]:
    """The groups of items with the same key, in a seeded order, and the items of each."""
    groups: dict[object, list] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    order = list(groups)
    random.Random(seed).shuffle(order)
    return order, groups


def row_key(split_by: str) -> Callable[[Row], object]:
    """What must stay on one side of a split: an article's questions (split_by=article: the article's key,
    so its spellings that differ in whitespace or punctuation count as one) or identical rows (same article,
    question and options; split_by=row), so validation never scores a question trained on."""
    if split_by == "article":
        return lambda r: article_key(r.article)
    return lambda r: (article_key(r.article), r.question, tuple(r.options))


def record_key(split_by: str) -> Callable[[dict], object]:
    """row_key for the records of train.json, whose `input` is the article, question and options."""
    if split_by == "article":
        return lambda r: article_key(record_article(r))
    return lambda r: (article_key(record_article(r)), split_input(r["input"])[1])


def record_article(record: dict) -> str:
    """The article of a record's `input`."""
    return split_input(record["input"])[0].removeprefix(ARTICLE_MARKER)


def split_rows(rows: list[Row], val_fraction: float, seed: int, split_by: str) -> tuple[list[Row], list[Row]]:
    """Hold out about val_fraction of the rows, whole groups at a time (see row_key)."""
    if val_fraction <= 0:
        return rows, []
    key = row_key(split_by)
    order, groups = grouped(rows, key, seed)
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


def assign_folds(records: list[dict], folds: int, seed: int, split_by: str, path: str) -> list[int]:
    """Each record's fold (0 to folds-1): the groups (see row_key), in their seeded order, each to the fold
    with the fewest records so far, so the folds are as even as whole groups allow."""
    key = record_key(split_by)
    order, groups = grouped(records, key, seed)
    unit = "articles" if split_by == "article" else "distinct questions"
    if len(order) < folds:
        fix = "lower data.folds" if folds > 2 else "cross-validation needs at least two; use data.val_fraction"
        raise InputError(f"{path}: {len(records)} records in {len(order)} {unit} cannot make {folds} folds, each "
                         f"holding whole {unit} out; {fix}, or add data.")
    sizes, fold_of_group = [0] * folds, {}
    for group in order:
        fold_of_group[group] = smallest = sizes.index(min(sizes))
        sizes[smallest] += len(groups[group])
    return [fold_of_group[key(r)] for r in records]


def write_folds(args: argparse.Namespace) -> None:
    """folds.json (which records of train.json each fold holds out, and how even the folds are) and, for
    each fold, the train.json of the other folds and the val.json of its own."""
    records = json.loads(Path(args.train).read_text(encoding="utf-8"))  # written by prepare_train, as they are
    fold = assign_folds(records, args.folds, args.split_seed, args.split_by, args.train)
    held_out = [[n for n, f in enumerate(fold) if f == k] for k in range(args.folds)]
    folder = Path(args.out_dir)
    for k, rows_out in enumerate(held_out):
        out = set(rows_out)
        write_json_atomic(folder / f"fold{k}" / "train.json", [r for n, r in enumerate(records) if n not in out])
        write_json_atomic(folder / f"fold{k}" / "val.json", [records[n] for n in rows_out])
    key = record_key(args.split_by)
    groups = [{key(r) for n, r in enumerate(records) if fold[n] == k} for k in range(args.folds)]
    sizes = list(map(len, held_out))
    write_json_atomic(folder / "folds.json", {
        "folds": args.folds, "split_by": args.split_by, "seed": args.split_seed, "fold_records": sizes,
        "groups_in_two_folds": sum(len(a & b) for i, a in enumerate(groups) for b in groups[i + 1:]),
        "held_out": held_out})
    print(f"{args.train}: {args.folds} folds of {sizes} records", file=sys.stderr)
    if min(sizes) < max(sizes) / 2:
        print(f"WARNING the folds are uneven ({', '.join(map(str, sizes))} records): whole "
              f"{'articles' if args.split_by == 'article' else 'questions'} go to one fold, and a few large ones "
              "decide the sizes. The smallest fold's accuracy is then the least certain; fewer folds even them out.",
              file=sys.stderr)


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
        "train_articles": len({article_key(r.article) for r in train}),
        "val_articles": len({article_key(r.article) for r in val}),
        "articles_on_both_sides": len({article_key(r.article) for r in train} & {article_key(r.article) for r in val}),
    }
    write_json_atomic(args.train_out, [labelled_record(r) for r in train])
    write_json_atomic(args.val_out, [labelled_record(r) for r in val])
    write_json_atomic(args.report_out, report)
    print(
        f"{args.input}: read {result.rows_read}, kept {len(result.rows)}, fixed {sum(result.fixes.values())} "
        f"{result.fixes}, skipped {len(skipped)}; train {len(train)}, val {len(val)}"
        + sheets_note(result),
        file=sys.stderr,
    )


def converted(rows: list[Row], config: str) -> int:
    """Convert the rows' texts with OpenCC's `config` (s2twp: Simplified to Taiwan's Traditional, with its
    phrases) in place; the number of rows changed."""
    import opencc

    try:
        converter = opencc.OpenCC(config)
    except RuntimeError as exc:
        raise InputError(f"convert {config!r}: OpenCC has no such conversion ({exc}); use one of its configs, "
                         "e.g. s2twp (Simplified to Traditional as used in Taiwan, with phrases), s2tw or s2t") from None
    changed = 0
    for r in rows:
        texts = [r.article, r.question, *r.options]
        new = [converter.convert(t) for t in texts]
        if new != texts:
            r.article, r.question, r.options = new[0], new[1], new[2:]
            changed += 1
    return changed


def left_out_counts(left_out: list[dict]) -> dict[str, int]:
    """How many rows were left out as copies, and as near-copies, of each file's articles."""
    kinds = Counter(f"{'near-copy' if 'near-copy' in e['reason'] else 'copy'} of an article in {e['also_in']}"
                    for e in left_out)
    return dict(sorted(kinds.items()))


class ArticleIndex:
    """The articles of record files, by key (mcqa.articles) and as near-copies, each with the file it is in."""

    def __init__(self, paths: list[str]):
        self.files = {}
        for path in paths:
            for r in json.loads(Path(path).read_text(encoding="utf-8")):
                self.files.setdefault(article_key(record_article(r)), path)
        self.near = NearCopies(list(self.files))

    def leak(self, article: str) -> tuple[str, str] | None:
        """(why, the file) when an article is in one of the files or a near-copy of one there, else None."""
        key = article_key(article)
        if (also_in := self.files.get(key)) is not None:
            return f"its article is also in {also_in}", also_in
        if found := self.near.nearest(key):
            also_in = self.files[self.near.keys[found[0]]]
            return (f"its article is a near-copy of one in {also_in} (sharing {found[1]:.0%} of their "
                    f"{SHINGLE_CHARACTERS}-character pieces, at least {NEAR_COPY_JACCARD:.0%} counts)"), also_in
        return None


def prepare_extra(args: argparse.Namespace) -> None:
    """An extra labelled source: every usable row whose article is in neither the training nor the test file."""
    result = read_questions(args.input, labelled=True, columns=json.loads(args.columns))
    skipped = check(result, args.input, args.on_invalid)
    changed = converted(result.rows, args.convert) if args.convert != "none" else 0
    index = ArticleIndex(args.against)
    kept, left_out = [], []
    for r in result.rows:
        if (leak := index.leak(r.article)) is None:
            kept.append(r)
            continue
        left_out.append({"row": r.row, **({"sheet": r.sheet} if r.sheet else {}), "id": r.row_id, "reason": leak[0],
                         "also_in": leak[1]})
    report = base_report(result, args.input, skipped)
    report["duplicates"] = duplicate_rows(kept)  # kept and trained on twice, as in the training file
    report.update(name=args.name, convert=args.convert, rows_converted=changed, rows_kept=len(kept),
                  rows_left_out=len(left_out), left_out=left_out,
                  left_out_by_reason=left_out_counts(left_out))
    report["lengths_chars"] = text_lengths(kept)
    write_json_atomic(args.out, [labelled_record(r) for r in kept])
    write_json_atomic(args.report_out, report)
    print(f"{args.input} (extra source {args.name}): read {result.rows_read}, skipped {len(skipped)}, converted "
          f"{changed} ({args.convert}), left out {len(left_out)} {report['left_out_by_reason']}; kept {len(kept)} "
          f"to train on, {report['duplicates']['rows']} of them repeating an earlier row" + sheets_note(result),
          file=sys.stderr)
    if not kept:
        print(f"WARNING {args.input}: extra source {args.name} keeps no rows to train on", file=sys.stderr)


def check_extra(args: argparse.Namespace) -> None:
    """An extra source's kept records against the test file as it is now: the source was screened against
    the test file of its own run, and a new test file does not screen it again (that would retrain every run
    that trains on it); a test article found in it stops the run, saying how to screen it again."""
    index = ArticleIndex([args.against])
    records = json.loads(Path(args.records).read_text(encoding="utf-8"))
    leaks = [n for n, r in enumerate(records) if index.leak(record_article(r))]
    write_json_atomic(args.out, {"records": args.records, "against": args.against, "leaks": leaks})
    if leaks:
        raise InputError(f"{args.records}: {len(leaks)} of its records (the first: record {leaks[0]}) have an article of "
                         f"{args.against}, or a near-copy of one: the test file changed since the source was "
                         f"screened. Screen it again (snakemake --forcerun prepare_extra_data), which retrains "
                         "the runs that train on it.")
    print(f"{args.records}: none of its {len(records)} records has an article of {args.against}", file=sys.stderr)


def prepare_test(args: argparse.Namespace) -> None:
    """Every test question becomes a record, or the run fails: a submission must hold every id once.

    Questions with an empty article or question are kept (counted as fixes);
    an unusable id is an error whatever data.on_invalid says.
    """
    result = read_questions(args.input, labelled=False)
    skipped = check(result, args.input, "never")
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
    folds = sub.add_parser("folds", help="train.json -> K folds: folds.json, fold<k>/train.json and val.json")
    folds.add_argument("--train", required=True)
    folds.add_argument("--folds", required=True, type=int)
    folds.add_argument("--out-dir", required=True, help="folder of folds.json and fold<k>/")
    folds.add_argument("--split-seed", type=int, default=42)
    folds.add_argument("--split-by", choices=["article", "row"], default="article")
    extra = sub.add_parser("extra", help="an extra labelled source -> its records, trained on only")
    extra.add_argument("--input", required=True)
    extra.add_argument("--name", required=True, help="the source's name in data.extra")
    extra.add_argument("--columns", default="{}", help="JSON: our column name -> the file's (e.g. {\"文章\": \"context\"})")
    extra.add_argument("--convert", default="none", help="an OpenCC conversion (e.g. s2twp), or none")
    extra.add_argument("--against", nargs="+", default=[], help="record files whose articles are left out")
    extra.add_argument("--out", required=True)
    extra.add_argument("--report-out", required=True)
    extra.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    check_ = sub.add_parser("extra-check", help="an extra source's records against the current test file")
    check_.add_argument("--records", required=True)
    check_.add_argument("--against", required=True, help="test.json")
    check_.add_argument("--out", required=True)
    test = sub.add_parser("test", help="unlabelled file -> test.json")
    test.add_argument("--input", required=True)
    test.add_argument("--out", required=True)
    test.add_argument("--report-out", required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        {"train": prepare_train, "folds": write_folds, "extra": prepare_extra, "extra-check": check_extra,
         "test": prepare_test}[args.stage](args)
    except InputError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
