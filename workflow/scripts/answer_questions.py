"""Answer the test questions with a merged model: answers.csv and answer_probs.csv.

    answer_questions.py --model MERGED_DIR --test test.json --answers answers.csv --probs answer_probs.csv \
        --max-seq-length 512 --settings \
        '{"batch_tokens": 16384, "precision": "auto", "load_in": "none", "rotations": 4, "prompt_format": "plain"}'

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
from mcqa.records import read_records, write_json_atomic
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
    parser.add_argument("--stats", type=Path, help="also write where the time went here (JSON)")
    args = parser.parse_args(argv)
    answering = json.loads(args.settings)

    start = time.perf_counter()
    records = read_records(args.test, "test")
    log_probs, stats = score_records(args.model, records, args.max_seq_length, answering, args.trust_remote_code)
    ids = [r["id"] for r in records]
    write_answers(args.answers, ids, (log_probs.argmax(dim=-1) + 1).tolist())
    write_probs(args.probs, "ID", ids, log_probs.exp().tolist())
    stats["total_s"] = round(time.perf_counter() - start, 2)
    print(f"answered {len(records)} questions in {stats['total_s']:.1f} s ({stats['questions_per_s']:.1f} questions/s "
          f"while scoring, {answering['rotations']} option order(s) each)", file=sys.stderr)
    if args.stats:
        write_json_atomic(args.stats, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
