"""Workflow overhead on the CPU: dry-run time with four runs and their ensemble (also with five folds each, and at
the scale of a real comparison: the four runs with two seeds each over a sweep of four learning rates, in five
folds: 160 fold models), and a second call with nothing stale.

    python benchmarks/workflow_overhead.py --out benchmarks/results/<name>.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RECIPE_RUNS = {"r32_1ep": {"lora_r": 32, "epochs": 1}, "r32_2ep": {"lora_r": 32, "epochs": 2},
               "r48_2ep": {"lora_r": 48, "epochs": 2}, "r48_3ep": {"lora_r": 48, "epochs": 3, "warmup_ratio": 0.04}}
AT_SCALE = {"runs": {name: {**run, "seeds": [1, 2]} for name, run in RECIPE_RUNS.items()},
            "sweep": {"learning_rate": [0.0001, 0.0002, 0.0003, 0.0004]}}


def snakemake(workdir: Path, *args: str) -> tuple[float, str]:
    command = [str(BIN / "snakemake"), *args, "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--resources", "gpu=1"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir)})
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return time.perf_counter() - start, result.stdout + result.stderr


def jobs_planned(output: str) -> int:
    """The total of a dry run's job stats."""
    return int(output.split("Job stats:")[1].split("total")[1].split()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="overhead-"))
    (workdir / "data").mkdir()
    for name in ("train.xlsx", "test.xlsx"):
        shutil.copy2(REPO / "resources/sample" / name, workdir / "data" / name)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"].update(train="data/train.xlsx", test="data/test.xlsx")
    config["runs"] = RECIPE_RUNS
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    folded = workdir.parent / f"{workdir.name}-folds"
    shutil.copytree(workdir, folded)
    (folded / "config.yaml").write_text(yaml.safe_dump({**config, "data": {**config["data"], "folds": 5}},
                                                       allow_unicode=True))
    folded_runs = [snakemake(folded, "-n") for _ in range(3)]
    (folded / "config.yaml").write_text(yaml.safe_dump({**config, **AT_SCALE, "data": {**config["data"], "folds": 5}},
                                                       allow_unicode=True))
    scale_runs = [snakemake(folded, "-n") for _ in range(3)]
    shutil.rmtree(folded)
    fresh_runs = [snakemake(workdir, "-n") for _ in range(3)]
    fresh = [t for t, _ in fresh_runs]
    run_seconds, _ = snakemake(workdir)
    after = [snakemake(workdir, "-n") for _ in range(3)]
    second_seconds, second_output = snakemake(workdir)
    result = {
        "device": f"{platform.processor() or platform.machine()} (CPU, {subprocess.getoutput('nproc')} cores)",
        "runs_in_config": len(RECIPE_RUNS),
        "ensemble_in_dag": "ensemble_answers" in fresh_runs[0][1],
        "dry_run_seconds_fresh_median": round(statistics.median(fresh), 2),
        "dry_run_seconds_5_folds_median": round(statistics.median(t for t, _ in folded_runs), 2),
        "jobs_with_5_folds": jobs_planned(folded_runs[0][1]),
        "dry_run_seconds_at_scale_median": round(statistics.median(t for t, _ in scale_runs), 2),
        "jobs_at_scale": jobs_planned(scale_runs[0][1]),
        "dry_run_seconds_after_run_median": round(statistics.median(t for t, _ in after), 2),
        "full_demo_run_seconds": round(run_seconds, 1),
        "second_call_seconds": round(second_seconds, 2),
        "second_call_scheduled_nothing": "Nothing to be done" in second_output,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    shutil.rmtree(workdir)
    return 0 if result["second_call_scheduled_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
