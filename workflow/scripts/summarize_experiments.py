"""One table and one figure comparing every run (and the ensemble): experiments.tsv, .html, .png.

    summarize_experiments.py --manifest '{"run": {"settings": {...}, "train_logs": [...], "metrics": ...,
        "replica_of": null, "folds": 0}, ...}' [--ensemble-metrics ensemble/metrics.json] \
        --tsv experiments.tsv --html experiments.html --png experiments.png

A row per run: what it trained on beyond the training file (extra sources,
pseudo-labels; shown when any run has such), the training settings that
differ between runs (only those),
validation accuracy (with folds: out-of-fold, on every training question)
with its 95% interval and, with folds, the spread of the fold accuracies,
log-loss, how the predictions spread over answers 1-4, the best step
(select_best), the final training loss, tokens/s, training minutes (summed
over a run's fold models; a refit's are not counted, as it is not what the
figure validates) and peak GPU memory. A baseline (train: false) says so,
the ensemble how it weighted its members; the replicas of a run's seeds get
a row of their mean and spread.
Sorted by validation accuracy. The figure shows each accuracy with its
interval, so runs whose intervals overlap are visibly not told apart.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from mcqa.history import best_entry, last_totals, logging_steps, read_history  # noqa: E402
from mcqa.metrics import CHOSEN, correctness, paired_difference  # noqa: E402


def differing_settings(settings: dict[str, dict]) -> list[str]:
    """Training keys whose values are not the same in every run."""
    keys = sorted({k for s in settings.values() for k in s})
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings.values()}) > 1]


def training_summary(log_paths: list[str]) -> dict:
    """Final loss, throughput, minutes, peak memory and best step from a run's train_log.jsonl files (one,
    or one a fold model: losses averaged, minutes summed); nothing for a baseline."""
    if not log_paths:
        return {"kind": "baseline (no training)"}
    summaries = []
    for path in log_paths:
        entries = read_history(path)
        steps = logging_steps(entries)
        last = last_totals(entries)
        summaries.append({"best": best_entry(entries).get("best_step"), "loss": steps[-1]["loss"] if steps else None,
                          "tokens": last.get("tokens_seen", 0), "seconds": last.get("elapsed_s", 0),
                          "peak": max((e.get("peak_gpu_mem_gb", 0) for e in entries), default=0)})
    losses = [s["loss"] for s in summaries if s["loss"] is not None]
    seconds = sum(s["seconds"] for s in summaries)
    bests = [s["best"] for s in summaries if s["best"] is not None]
    return {
        "best step": bests[0] if len(bests) == 1 else (" / ".join(map(str, bests)) if bests else None),
        "final training loss": round(sum(losses) / len(losses), 4) if losses else None,
        "tokens/s": round(sum(s["tokens"] for s in summaries) / seconds) if seconds else None,
        "training minutes": round(seconds / 60, 2) if seconds else None,
        "peak GPU GiB": max(s["peak"] for s in summaries) or None,
    }


def validation_summary(metrics_path: str | None) -> dict:
    if not metrics_path:
        return {}
    m = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    low, high = m["accuracy_ci95"]
    spread = " / ".join(str(m["predicted_counts"][a]) for a in "1234")
    kinds = {text: kind for kind, text in CHOSEN.items()}
    chosen = ", ".join(filter(None, (kinds.get(m.get("chosen_on_these_questions")),
                                     kinds.get(m.get("teacher_saw_these_questions")))))
    folds = f"{m['folds']} (sd {m['fold_accuracy_sd']:.4f})" if m.get("folds") else ""
    return {"val accuracy": round(m["accuracy"], 4), "95% interval": f"{low:.3f}-{high:.3f}", "ci_low": low,
            "ci_high": high, "folds": folds, "chosen on these questions": chosen, "log-loss": round(m["log_loss"], 4),
            "predicted 1/2/3/4": spread}


def ensemble_kind(metrics_path: str) -> str:
    """How the ensemble combined its members, with each member's weight."""
    m = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    weights = ", ".join(f"{member} {weight:.3g}" for member, weight in m["members"].items())
    how = "greedy, weight = times picked" if m["method"] == "greedy" else f"mean probability, {m['weights']} weights"
    return f"ensemble ({how}): {weights}"


def seed_rows(rows: list[dict], manifest: dict) -> list[dict]:
    """A row for each run replicated over seeds: its replicas' mean accuracy and their spread."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if (base := manifest.get(row["run"], {}).get("replica_of")) and "val accuracy" in row:
            groups.setdefault(base, []).append(row)
    means = []
    for base, replicas in groups.items():
        accuracies = [r["val accuracy"] for r in replicas]
        mean = statistics.fmean(accuracies)
        sd = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        means.append({"run": f"{base} (mean of {len(replicas)} seeds)", "val accuracy": round(mean, 4),
                      "95% interval": f"sd {sd:.4f} over seeds", "ci_low": mean - sd, "ci_high": mean + sd,
                      "kind": "seed mean (bars: one sd)"})
    return means


def compared(frame: pd.DataFrame, manifest: dict, ensemble_probs: str | None, reference: str | None) -> pd.DataFrame:
    """The frame with each row's accuracy minus the reference row's on the same questions, and its paired
    95% interval (mcqa.metrics.paired_difference: over questions and, where a side has seed replicas, their
    spread), in points; the reference is the named run, else the most accurate row with nothing chosen on
    its validation questions."""
    sides = {run: [correctness(entry["probs"])] for run, entry in manifest.items() if entry.get("probs")}
    for run, entry in manifest.items():
        if entry.get("replica_of") and run in sides:
            sides.setdefault(entry["replica_of"], []).extend(sides[run])
    if ensemble_probs:
        sides["ensemble"] = [correctness(ensemble_probs)]
    # A seed mean's row is named "run (mean of k seeds)".
    names = {row: row.split(" (mean of ")[0] for row in frame["run"]}
    candidates = [row for row in frame["run"] if names[row] in sides
                  and not str(frame.loc[frame["run"] == row, "chosen on these questions"].iloc[0] or "")]
    if reference is None:
        if not candidates:
            return frame
        reference = names[candidates[0]]  # the frame is sorted, best first
    theirs = sides[reference]
    column = f"vs {reference}, points (paired 95%)"
    cells = []
    for row in frame["run"]:
        if names[row] == reference or names[row] not in sides:
            cells.append("reference" if names[row] == reference else "")
            continue
        d = paired_difference(sides[names[row]], theirs)
        low, high = (100 * x for x in d["ci95"])
        ours, their = d["seeds"]
        seeds = "" if min(ours, their) > 1 else f"; {ours} vs {their} seeds: a single seed's spread is not counted"
        cells.append(f"{100 * d['difference']:+.2f} ({low:+.2f} to {high:+.2f}){seeds}")
    return frame.assign(**{column: cells})


def trained_on(entry: dict) -> str:
    """What a run trained on beyond the training file, with how many pseudo-labels were kept."""
    text, report = entry.get("trained_on", ""), entry.get("pseudo_labels_report")
    if report and Path(report).exists():
        kept = json.loads(Path(report).read_text(encoding="utf-8"))["kept"]
        text = re.sub(r"(pseudo-labels of \S+ \(p >= [\d.]+\))", rf"\1: {kept or 'none'} kept", text)
    return text


def setting_text(value) -> str:
    """A setting as a config writes it: a string as it is (JSON's quotes would be quoted again in the TSV),
    anything else as JSON (true, 0.05, [q_proj, v_proj] as a list)."""
    return value if isinstance(value, str) else json.dumps(value)


def table(manifest: dict, differ: list[str], ensemble: str | None) -> pd.DataFrame:
    """One row a run (its `differ` settings, validation and training summaries), the seed means, the
    ensemble; best validation accuracy first."""
    settings = {run: entry["settings"] for run, entry in manifest.items()}
    rows = []
    for run, entry in manifest.items():
        # What a run trained on beyond the training file (extra sources, pseudo-labels), shown whenever any run has it.
        sources = {"trained on": trained_on(entry)} if any(e.get("trained_on") for e in manifest.values()) else {}
        rows.append({"run": run, **sources, **{k: setting_text(settings[run].get(k)) for k in differ},
                     **validation_summary(entry["metrics"]), **training_summary(entry["train_logs"])})
    rows += seed_rows(rows, manifest)
    if ensemble:
        rows.append({"run": "ensemble", "kind": ensemble_kind(ensemble), **validation_summary(ensemble)})
    frame = pd.DataFrame(rows)
    for column in ("best step", "tokens/s"):  # whole numbers, though the ensemble's row has none
        if column in frame and pd.api.types.is_numeric_dtype(frame[column]):  # fold models' steps are "3 / 4"
            frame[column] = frame[column].astype("Int64")
    if "val accuracy" in frame:
        frame = frame.sort_values("val accuracy", ascending=False, kind="stable")
    return frame.reset_index(drop=True)


CHOSEN_NOTE = ("'chosen on these questions': the run's training step (select_best) or the ensemble's weights "
               "(val_accuracy) were picked on the same validation questions it is scored on, so its accuracy is "
               "optimistic (the best of several) and it is favoured beside runs that chose nothing. 'teacher': a "
               "distilled run learnt from a teacher whose fold models trained on its held-out questions, so its "
               "out-of-fold accuracy is slightly optimistic too; 'pseudo_teacher': the same for a run trained on "
               "such a teacher's pseudo-labels.")
DISTILLED_NOTE = ("'final training loss': a distilled run's includes its weighted divergence from the teacher, so it "
                  "does not compare with the plain cross-entropy of the other runs.")


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
    parser.add_argument("--manifest", required=True,
                        help="JSON: run -> its settings, train_logs, metrics, replica_of and folds")
    parser.add_argument("--ensemble-metrics", default="")
    parser.add_argument("--ensemble-probs", default="", help="the ensemble's validation probabilities")
    parser.add_argument("--reference", default=None, help="the run every other is compared with (default: the best)")
    parser.add_argument("--tsv", required=True)
    parser.add_argument("--html", required=True)
    parser.add_argument("--png", required=True)
    args = parser.parse_args(argv)
    manifest = json.loads(args.manifest)
    differ = differing_settings({run: entry["settings"] for run, entry in manifest.items()})
    frame = table(manifest, differ, args.ensemble_metrics or None)
    if "val accuracy" in frame:
        frame = compared(frame, manifest, args.ensemble_probs or None, args.reference)
    shown = frame.drop(columns=[c for c in ("ci_low", "ci_high") if c in frame])
    shown.to_csv(args.tsv, sep="\t", index=False)
    body = shown.to_html(index=False, na_rep="", border=0, classes="experiments")
    Path(args.html).write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Experiments</title><style>"
        "table{border-collapse:collapse;font-family:sans-serif;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0}</style></head><body>"
        f"<h2>{html.escape('Experiments, best validation accuracy first')}</h2>{body}"
        + (f"<p>{html.escape(CHOSEN_NOTE)}</p>" if shown.get("chosen on these questions", pd.Series()).fillna("").any()
           else "")
        + (f"<p>{html.escape(DISTILLED_NOTE)}</p>" if any("distilled from" in e.get("trained_on", "") for e in manifest.values())
           else "") + "</body></html>\n",
        encoding="utf-8")
    plot(frame, args.png)
    print(f"{len(frame)} rows; differing settings: {', '.join(differ) or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
