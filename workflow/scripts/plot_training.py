"""Plot training and validation loss (and validation accuracy with the step kept, when logged) into a PNG.

    plot_training.py --log-jsonl train_log.jsonl --out train_curve.png --title RUN
"""

from __future__ import annotations

import argparse
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mcqa.history import best_entry, logging_steps, read_history  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-jsonl", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    entries = read_history(args.log_jsonl)
    train = [(e["step"], e["loss"]) for e in logging_steps(entries)]
    val = [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
    accuracy = [(e["step"], e["val_accuracy"]) for e in entries if "val_accuracy" in e]
    best = best_entry(entries).get("best_step")
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    if train:
        loss_ax.plot(*zip(*train), label="training loss (answer tokens)")
    if val:
        loss_ax.plot(*zip(*val), "o-", label="validation loss")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"LoRA training {args.title}")
    loss_ax.grid(alpha=0.3)
    handles, labels = loss_ax.get_legend_handles_labels()
    if accuracy:
        accuracy_ax = loss_ax.twinx()
        handles += accuracy_ax.plot(*zip(*accuracy), "s-", color="tab:green", label="validation accuracy")
        labels.append("validation accuracy")
        accuracy_ax.set_ylabel("validation accuracy")
        accuracy_ax.set_ylim(0, 1)
    if best is not None:
        handles.append(loss_ax.axvline(best, color="grey", linestyle="--"))
        labels.append(f"adapter kept (step {best})")
    loss_ax.legend(handles, labels, loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"plotted {len(train)} training and {len(val)} validation points to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
