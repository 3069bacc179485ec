"""Join the train and test data reports into results/data/report.json, and show them as an HTML page.

    summarize_data.py --train train_report.json --test test_report.json [--folds folds.json] \
        [--extra extra/c3_report.json ...] --out report.json --html report.html

Each extra source (data.extra) is a part of its own, "extra NAME": rows read, converted, left out and why.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

from mcqa.records import write_json_atomic
from mcqa.spreadsheet import place


def table(counts: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in counts.items()) + "</table>"


def as_html(report: dict) -> str:
    """Rows read, kept, fixed and skipped per file, each fix and skipped row listed (the report viewer shows no JSON);
    each run's pseudo-labels: how many, from which teacher, and its answers' spread among them."""
    parts = []
    for part, r in report.items():
        if part.startswith("pseudo-labels "):
            parts.append(f"<h2>{html.escape(part)}</h2>" + table({
                "teacher": r["teacher"], "min probability": r["min_probability"], "test questions": r["test_questions"],
                "kept as pseudo-labels": r["kept"], "teacher's answers among them (1, 2, 3, 4)":
                    ", ".join(str(n) for n in r["answer_spread"].values()),
                "teacher's mean probability of them": r["mean_teacher_probability"]}))
            continue
        counts = {"sheets read": ", ".join(r["sheets_read"]) or "(csv)",
                  "sheets left out (no question columns)": ", ".join(r["sheets_left_out"]) or "none",
                  "rows read": r["rows_read"], "rows kept": r["rows_kept"], "rows skipped": r["rows_skipped"],
                  **{f"fixed: {kind}": n for kind, n in r["fixed"].items()}}
        if "duplicates" in r:
            counts["repeated rows"] = r["duplicates"]["rows"]
        if "convert" in r:
            counts[f"rows converted ({r['convert']})"] = r["rows_converted"]
            counts.update({f"left out: {reason}": n for reason, n in r["left_out_by_reason"].items()})
        for text, stats in r["lengths_chars"].items():
            if stats["count"]:
                counts[f"{text} length (characters): mean, median, p95, max"] = \
                    f"{stats['mean']}, {stats['median']}, {stats['p95']}, {stats['max']}"
        if "split" in r:
            counts.update({"train records": r["split"]["train_records"], "validation records": r["split"]["val_records"],
                           "articles on both sides": r["split"]["articles_on_both_sides"]})
            if "folds" in r["split"]:
                counts[f"{r['split']['folds']} folds, records held out by each"] = ", ".join(
                    map(str, r["split"]["fold_records"]))
        details = "".join(f"<li>{html.escape(kind)}: {html.escape(', '.join(where))}</li>"
                          for kind, where in r["fixed_where"].items())
        details += "".join(f"<li>skipped {html.escape(place(s.get('sheet'), s['row']))} (ID {html.escape(str(s['id']))}): "
                           f"{html.escape('; '.join(s['reasons']))}</li>" for s in r["skipped"])
        details += "".join(f"<li>left out {html.escape(place(s.get('sheet'), s['row']))}: {html.escape(s['reason'])}</li>"
                           for s in r.get("left_out", []))
        parts.append(f"<h2>{html.escape(part)}: {html.escape(r['file'])}</h2>{table(counts)}<ul>{details}</ul>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Data report</title><style>"
            "table{border-collapse:collapse;font-family:sans-serif}th,td{border:1px solid #ccc;padding:4px 8px}"
            "th{text-align:left;background:#f0f0f0}</style></head><body>" + "".join(parts) + "</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--folds", help="folds.json, with data.folds: the folds' sizes go into the train part")
    parser.add_argument("--extra", nargs="+", default=[], help="the extra sources' reports")
    parser.add_argument("--pseudo-labels", nargs="+", default=[], help="pseudo_labels_report.json of each run using them")
    parser.add_argument("--out", required=True)
    parser.add_argument("--html", required=True)
    args = parser.parse_args(argv)
    report = {}
    for part in ("train", "test"):
        with open(getattr(args, part), encoding="utf-8") as fh:
            report[part] = json.load(fh)
    if args.folds:
        with open(args.folds, encoding="utf-8") as fh:
            folds = json.load(fh)
        report["train"]["split"].update({key: folds[key] for key in ("folds", "fold_records", "groups_in_two_folds")})
    for path in args.extra:
        extra = json.loads(Path(path).read_text(encoding="utf-8"))
        report[f"extra {extra['name']}"] = extra
    for path in args.pseudo_labels:
        report[f"pseudo-labels {Path(path).parent.name}"] = json.loads(Path(path).read_text(encoding="utf-8"))
    write_json_atomic(args.out, report)
    Path(args.html).write_text(as_html(report), encoding="utf-8")
    extras = "".join(f", {r['rows_kept']} of {r['rows_read']} rows kept from extra source {r['name']}"
                     for part, r in report.items() if part.startswith("extra "))
    extras += "".join(f", {r['kept']} pseudo-labels for {part.removeprefix('pseudo-labels ')}"
                      for part, r in report.items() if part.startswith("pseudo-labels "))
    print(f"read {report['train']['rows_read']} train and {report['test']['rows_read']} test rows{extras}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
