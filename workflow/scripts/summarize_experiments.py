"""One table and one figure comparing every run (and the ensemble): experiments.tsv, .html, .png.

    summarize_experiments.py --settings '{"run": {...}, ...}' --train-logs a/train_log.jsonl b/train_log.jsonl \
        [--metrics a/metrics.json b/metrics.json] [--ensemble-metrics ensemble/metrics.json] \
        --tsv experiments.tsv --html experiments.html --png experiments.png

A row per run: the training settings that differ between runs (only those),
validation accuracy with its 95% interval, log-loss, how the predictions
spread over answers 1-4, the best step (select_best), the final training
loss, tokens/s, training minutes and peak GPU memory. Sorted by validation
accuracy. The figure shows each accuracy with its interval, so runs whose
intervals overlap are visibly not told apart by this validation set.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mcqa.metrics import CHOSEN  # noqa: E402


def differing_settings(settings: dict[str, dict]) -> list[str]:
    """Training keys whose values are not the same in every run."""
    keys = sorted({k for s in settings.values() for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]


def training_summary(log_path: str) -> dict:
    """Final loss, throughput, minutes, peak memory and best step from a train_log.jsonl."""
    entries = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [e for e in entries if "loss" in e]
    totals = [e for e in entries if "elapsed_s" in e and e.get("tokens_seen")]
    last = totals[-1] if totals else {}
    best = next((e for e in entries if "best_step" in e), {})
    return {
        "best step": best.get("best_step"),
        "final training loss": round(steps[-1]["loss"], 4) if steps else None,
        "tokens/s": round(last["tokens_seen"] / last["elapsed_s"]) if last.get("elapsed_s") else None,
        "training minutes": round(last["elapsed_s"] / 60, 2) if last else None,
        "peak GPU GiB": max((e.get("peak_gpu_mem_gb", 0) for e in entries), default=0) or None,
    }


def validation_summary(metrics_path: str | None) -> dict:
    if not metrics_path:
        return {}
    m = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    low, high = m["accuracy_ci95"]
    spread = " / ".join(str(m["predicted_counts"][a]) for a in "1234")
    chosen = {text: kind for kind, text in CHOSEN.items()}.get(m.get("chosen_on_these_questions"), "")
    return {"val accuracy": round(m["accuracy"], 4), "95% interval": f"{low:.3f}-{high:.3f}", "ci_low": low,
            "ci_high": high, "chosen on these questions": chosen, "log-loss": round(m["log_loss"], 4),
            "predicted 1/2/3/4": spread}


def table(runs: list[str], settings: dict, logs: list[str], metrics: list[str], ensemble: str | None) -> pd.DataFrame:
    differ = differing_settings(settings)
    rows = []
    for n, run in enumerate(runs):
        rows.append({"run": run, **{k: json.dumps(settings[run].get(k)) for k in differ},
                     **validation_summary(metrics[n] if metrics else None), **training_summary(logs[n])})
    if ensemble:
        rows.append({"run": "ensemble", **validation_summary(ensemble)})
    frame = pd.DataFrame(rows)
    for column in ("best step", "tokens/s"):  # whole numbers, though the ensemble's row has none
        frame[column] = frame[column].astype("Int64")
    if "val accuracy" in frame:
        frame = frame.sort_values("val accuracy", ascending=False, kind="stable")
    return frame.reset_index(drop=True)


CHOSEN_NOTE = ("'chosen on these questions': the run's training step (select_best) or the ensemble's weights "
               "(val_accuracy) were picked on the same validation questions it is scored on, so its accuracy is "
               "optimistic (the best of several) and it is favoured beside runs that chose nothing.")


def plot(frame: pd.DataFrame, out: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(frame) + 1.5))
    if "val accuracy" in frame:
        ordered = frame.iloc[::-1].reset_index(drop=True)
        for chosen, group in ordered.groupby(ordered["chosen on these questions"].fillna("") != ""):
            ax.errorbar(group["val accuracy"], group.index, fmt="o", capsize=4, mfc="none" if chosen else None,
                        label="chosen on these questions (optimistic)" if chosen else "nothing chosen on them",
                        xerr=[group["val accuracy"] - group["ci_low"], group["ci_high"] - group["val accuracy"]])
        if ordered["chosen on these questions"].fillna("").any():
            ax.legend(loc="lower right", fontsize=8)
        ax.set_yticks(list(ordered.index), ordered["run"])
        ax.set_xlabel("validation accuracy (bars: 95% interval)")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no validation split (data.val_fraction: 0)", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Runs by validation accuracy")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="JSON: run name -> its training settings")
    parser.add_argument("--train-logs", nargs="+", required=True, help="train_log.jsonl of each run, in settings order")
    parser.add_argument("--metrics", nargs="*", default=[], help="metrics.json of each run, in settings order")
    parser.add_argument("--ensemble-metrics", default="")
    parser.add_argument("--tsv", required=True)
    parser.add_argument("--html", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args(argv)
    settings = json.loads(args.settings)
    frame = table(list(settings), settings, args.train_logs, args.metrics, args.ensemble_metrics or None)
    shown = frame.drop(columns=[c for c in ("ci_low", "ci_high") if c in frame])
    shown.to_csv(args.tsv, sep="\t", index=False)
    body = shown.to_html(index=False, na_rep="", border=0, classes="experiments")
    Path(args.html).write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Experiments</title><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}</style></head><body>"
        f"<h2>{html.escape('Experiments, best validation accuracy first')}</h2>{body}"
        + (f"<p>{html.escape(CHOSEN_NOTE)}</p>" if shown.get("chosen on these questions", pd.Series()).fillna("").any()
           else "") + "</body></html>\n",
        encoding="utf-8")
    plot(frame, args.png)
    print(f"{len(frame)} rows; differing settings: {', '.join(differing_settings(settings)) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
