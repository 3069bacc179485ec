"""Draw a validation confusion matrix (true answer x predicted answer) from a metrics.json.

    plot_confusion.py --metrics metrics.json --out confusion.png --title RUN
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mcqa.prompt import ANSWERS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    with open(args.metrics, encoding="utf-8") as fh:
        metrics = json.load(fh)
    counts = [[metrics["confusion"][t][p] for p in ANSWERS] for t in ANSWERS]
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(counts, cmap="Blues")
    top = max(max(row) for row in counts) or 1
    for t, row in enumerate(counts):
        for p, n in enumerate(row):
            ax.text(p, t, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    ax.set_xticks(range(4), ANSWERS)
    ax.set_yticks(range(4), ANSWERS)
    ax.set_xlabel("predicted answer")
    ax.set_ylabel("true answer")
    ax.set_title(f"{args.title}: accuracy {metrics['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"confusion of {metrics['questions']} questions -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
