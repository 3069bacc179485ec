"""Answer the test questions with a merged model: answers.csv and answer_probs.csv.

    answer_questions.py --model MERGED_DIR --test test.json --answers answers.csv --probs answer_probs.csv \
        --max-seq-length 512 --settings '{"batch_size": 32, "precision": "auto", "load_in": "none"}'

Each question gets the answer whose digit has the highest log-probability at
the answer position: no sampling, so the same model gives the same file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from mcqa.prompt import ANSWERS
from mcqa.records import read_records
from mcqa.scoring import score_records


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--answers", required=True, type=Path)
    parser.add_argument("--probs", required=True, type=Path)
    parser.add_argument("--max-seq-length", required=True, type=int)
    parser.add_argument("--settings", required=True, help="JSON of the config's answering block")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    s = json.loads(args.settings)

    start = time.perf_counter()
    records = read_records(args.test, "test")
    log_probs, meter = score_records(args.model, records, args.max_seq_length, s, args.trust_remote_code)
    probs = log_probs.softmax(dim=-1)  # renormalised over the four answers
    choice = log_probs.argmax(dim=-1) + 1
    write_csv(args.answers, ["ID", "Answer"], [[r["id"], int(c)] for r, c in zip(records, choice)])
    write_csv(args.probs, ["ID", *(f"p{a}" for a in ANSWERS)],
              [[r["id"], *(f"{p:.6f}" for p in row.tolist())] for r, row in zip(records, probs)])
    print(f"answered {len(records)} questions in {time.perf_counter() - start:.1f} s "
          f"({meter.rate():.1f} questions/s while scoring)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
