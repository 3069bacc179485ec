"""Join the train and test data reports into results/data/report.json.

    summarize_data.py --train train_report.json --test test_report.json --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys

from mcqa.records import write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    report = {}
    for part in ("train", "test"):
        with open(getattr(args, part), encoding="utf-8") as fh:
            report[part] = json.load(fh)
    write_json_atomic(args.out, report)
    print(f"read {report['train']['rows_read']} train and {report['test']['rows_read']} test rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
