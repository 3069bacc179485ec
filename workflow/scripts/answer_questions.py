"""Answer the test questions with a merged model: answers.csv and answer_probs.csv.

    answer_questions.py --model MERGED_DIR --test test.json --answers answers.csv --probs answer_probs.csv \
        --max-seq-length 512 --settings '{"batch_size": 32, "precision": "auto", "load_in": "none"}'

Each question gets the answer whose digit has the highest log-probability at
the answer position: no sampling, so the same model gives the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mcqa.metrics import write_answers, write_probs
from mcqa.records import read_records
from mcqa.scoring import score_records


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
    ids = [r["id"] for r in records]
    write_answers(args.answers, ids, (log_probs.argmax(dim=-1) + 1).tolist())
    write_probs(args.probs, "ID", ids, log_probs.exp().tolist())
    print(f"answered {len(records)} questions in {time.perf_counter() - start:.1f} s "
          f"({meter.rate() / s['rotations']:.1f} questions/s while scoring, {s['rotations']} option order(s) each)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
