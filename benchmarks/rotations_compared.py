"""One option order against four on the same questions: the paired difference in accuracy of runs scored
both ways by benchmarks/real_model_levers.sh (its r1/ and r4/ folders), seed replicas pooled per run.

    python benchmarks/rotations_compared.py RESULTS --runs base lora_seed1,lora_seed2 --out RESULTS/rotations.json

Each --runs item is one run or a comma-separated list of seed replicas of one setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

from mcqa.metrics import correctness, paired_difference  # noqa: E402


def validation_probs(run: Path) -> Path:
    """A run's validation probabilities: out of fold when cross-validated."""
    return next(path for path in (run / "oof_probs.csv", run / "val_probs.csv") if path.exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the folder holding r1/ and r4/")
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = {}
    for item in args.runs:
        replicas = item.split(",")
        one = [correctness(validation_probs(args.results / "r1" / run)) for run in replicas]
        four = [correctness(validation_probs(args.results / "r4" / run)) for run in replicas]
        d = paired_difference(one, four)
        rows[item] = {"accuracy_1_order": round(sum(map(sum, one)) / sum(map(len, one)), 4),
                      "accuracy_4_orders": round(sum(map(sum, four)) / sum(map(len, four)), 4),
                      "difference_points": round(100 * d["difference"], 2),
                      "ci95_points": [round(100 * x, 2) for x in d["ci95"]], "seeds": len(replicas)}
        print(item, rows[item])
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
