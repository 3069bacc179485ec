"""Disk and wall time of a run through Snakemake (cross-validated or one split), as a user runs it on one GPU
machine.

    python benchmarks/fold_disk.py --workflow REPO --base BASE_DIR --train-xlsx AI.xlsx --test-xlsx AI1000.xlsx \
        --work DIR --out result.json [--folds 2] [--epochs 0.1] [--training '{"fp8": "rowwise"}'] [--cores 16]

Writes a config (the given folds, epochs and training keys, every other key the
schema's default; --folds 0 is one train/validation split) into DIR and runs
`snakemake --cores N --resources gpu=1` there with REPO's Snakefile (so an
older checkout can be measured the same way). While it runs, `du` of DIR
(results, logs, checkpoints, caches: everything the run writes; the base lives
elsewhere and is reported on its own) is sampled every two seconds. Reports the
wall time, the largest and final sizes, what the results hold at the end, the
accuracy in metrics.json (out of fold, or on validation) and each job's time
from Snakemake's benchmark files.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml


def size_of(path: Path) -> int:
    """Bytes under `path`, as `du -sb` counts them."""
    result = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(result.stdout.split()[0]) if result.stdout else 0


def sample_sizes(path: Path, samples: list, stop: threading.Event, every: float = 2.0) -> None:
    start = time.perf_counter()
    while not stop.wait(every):
        samples.append((round(time.perf_counter() - start, 1), size_of(path)))


def job_seconds(work: Path) -> dict[str, float]:
    """Each job's wall time from the rules' benchmark files (logs/**/*.benchmark.tsv)."""
    found = {}
    for tsv in sorted((work / "logs").rglob("*.benchmark.tsv")):
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        found[str(tsv.relative_to(work / "logs")).removesuffix(".benchmark.tsv")] = float(row["s"])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflow", required=True, type=Path, help="the checkout whose Snakefile runs")
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--train-xlsx", required=True, type=Path)
    parser.add_argument("--test-xlsx", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=0.1)
    parser.add_argument("--training", type=json.loads, default={}, help="more training keys, as JSON")
    parser.add_argument("--cores", type=int, default=16)
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    config = {"data": {"train": str(args.train_xlsx.absolute()), "test": str(args.test_xlsx.absolute()),
                       "folds": args.folds},
              "base_model": str(args.base.absolute()), "training": {**args.training, "epochs": args.epochs}}
    (args.work / "config.yaml").write_text(yaml.safe_dump(config))
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    sampler = threading.Thread(target=sample_sizes, args=(args.work, samples, stop), daemon=True)
    command = ["snakemake", "-s", str(args.workflow.absolute() / "Snakefile"), "--directory", str(args.work),
               "--configfile", str(args.work / "config.yaml"), "--cores", str(args.cores), "--resources", "gpu=1"]
    print(" ".join(command), file=sys.stderr, flush=True)
    start = time.perf_counter()
    sampler.start()
    with open(args.work / "snakemake.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    samples.append((round(wall, 1), size_of(args.work)))
    if code:
        print((args.work / "snakemake.log").read_text()[-5000:], file=sys.stderr)
    results = args.work / "results"
    merged = sorted(str(p.relative_to(results)) for p in results.rglob("merged") if p.is_dir())
    metrics = results / "default" / "metrics.json"
    peak = max(samples, key=lambda s: s[1])
    report = {
        "workflow": str(args.workflow), "folds": args.folds, "epochs": args.epochs, "training": args.training, "returncode": code,
        "wall_s": round(wall, 1), "base_gb": round(size_of(args.base) / 1e9, 2),
        "peak_work_gb": round(peak[1] / 1e9, 2), "peak_at_s": peak[0],
        "final_work_gb": round(samples[-1][1] / 1e9, 2),
        "results_gb": {p.name: round(size_of(p) / 1e9, 3) for p in sorted(results.glob("*")) if p.is_dir()},
        "merged_folders": merged,
        "accuracy": json.loads(metrics.read_text()).get("accuracy") if metrics.exists() else None,
        "job_seconds": job_seconds(args.work),
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "job_seconds")}), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
