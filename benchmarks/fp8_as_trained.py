"""FP8-trained adapters scored on the base as their training saw it, against the same adapters on the bf16
base (as the workflow scores them) and against a bf16-trained reference run, question by question.

    python benchmarks/fp8_as_trained.py WORK --out RESULT.json [--runs fp8 fp8_blockwise] [--reference lora]

WORK is a finished cross-validated workflow run (benchmarks/real_model_levers.sh). An FP8 training reads each
adapted weight of the base rounded to FP8 (mcqa.float8); the adapter learns on that model, yet is merged into
the bf16 weights. Here each run's base is rounded as its training rounded it (its recipe, the layers
takes_float8 picks, the forward product's values) and every fold's adapter scores its held-out questions on
it, with the workflow's own scoring script and answering settings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
SCHEMAS = REPO / "workflow" / "schemas"
sys.path.insert(0, str(SCRIPTS))

from mcqa.float8 import as_float8_saw_it, takes_float8  # noqa: E402
from mcqa.metrics import correctness, paired_difference  # noqa: E402


def config_of(work: Path) -> tuple[dict, dict[str, dict], str]:
    """The run's config and each run's training settings, validated against the schemas as the workflow
    validates them (defaults filled in), and the base's folder."""
    from snakemake.utils import validate

    config = yaml.safe_load((work / "config.yaml").read_text())
    validate(config, str(SCHEMAS / "config.schema.yaml"))
    runs = {}
    for run, overrides in config["runs"].items():
        runs[run] = {**config.get("training", {}), **(overrides or {})}
        validate(runs[run], str(SCHEMAS / "training.schema.yaml"))
    name = config["base_model"]  # the folder rules/config.smk reads the base from (BASE_FOLDER)
    if name == "demo":
        return config, runs, str(work / "resources/models/demo")
    if name.lower().endswith(".gguf"):
        return config, runs, str(work / "resources/models/gguf" / Path(name).stem)
    return config, runs, str(work / name) if (work / name).is_dir() else name


def rounded_base(base: str, recipe: str, targets: list[str], out: Path) -> int:
    """Write `base` with the weights an FP8 training of `recipe` reads in FP8 rounded to those values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    rounded = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in targets and takes_float8(module):
                module.weight.copy_(as_float8_saw_it(module.weight, recipe))
                rounded += 1
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return rounded


def score(work: Path, run: str, fold: str, model: Path, max_seq_length: int, answering: dict, out: Path) -> Path:
    """A fold model's adapter on `model`, scoring its held-out questions with the workflow's script."""
    probs = out / f"{run}_{fold}_val_probs.csv"
    with open(out / f"{run}_{fold}_score.log", "w") as log:
        subprocess.run([sys.executable, SCRIPTS / "score_questions.py", "--model", model, "--adapter",
                        work / f"results/{run}/{fold}/adapter", "--val", work / f"results/data/{fold}/val.json",
                        "--metrics", out / f"{run}_{fold}_metrics.json", "--val-probs", probs,
                        "--max-seq-length", str(max_seq_length), "--settings", json.dumps(answering)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return probs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--runs", nargs="+", help="FP8 runs of the config (default: every one)")
    parser.add_argument("--reference", help="a bf16-trained run of the same folds and seed (default: the "
                                            "config's experiments.reference)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config, runs, base = config_of(args.work)
    folds = [f"fold{k}" for k in range(config["data"]["folds"])]
    args.runs = args.runs or [run for run, settings in runs.items() if settings["fp8"] != "none"]
    args.reference = args.reference or config["experiments"]["reference"]
    scratch = args.work / "fp8_as_trained"
    scratch.mkdir(exist_ok=True)
    bases, jobs = {}, []
    for run in args.runs:
        recipe = runs[run]["fp8"]
        if recipe not in bases:
            bases[recipe] = scratch / f"base_{recipe}"
            count = rounded_base(base, recipe, runs[run]["target_modules"], bases[recipe])
            print(f"{base}: {count} weights rounded as fp8 {recipe} reads them", flush=True)
        jobs += [(run, fold, bases[recipe], runs[run]["max_seq_length"]) for fold in folds]
    answering = {**config["answering"], "prompt_format": config["prompt_format"]}  # rules/config.smk's ANSWERING
    with ThreadPoolExecutor(max_workers=4) as pool:  # GPU scoring jobs of a small model share the card
        scored = pool.map(lambda job: score(args.work, *job, answering, scratch), jobs)
        probs = dict(zip([(run, fold) for run, fold, *_ in jobs], scored))

    def right(run: str, as_trained: bool = False) -> list[int]:
        return [x for fold in folds for x in correctness(
            probs[run, fold] if as_trained else args.work / f"results/{run}/{fold}/val_probs.csv")]

    reference = right(args.reference)
    result = {"reference": args.reference, "questions": len(reference),
              "reference_accuracy": round(sum(reference) / len(reference), 4), "runs": {}}
    for run in args.runs:
        on_bf16, on_fp8 = right(run), right(run, as_trained=True)
        row = {"accuracy_bf16_base": round(sum(on_bf16) / len(on_bf16), 4),
               "accuracy_base_as_trained": round(sum(on_fp8) / len(on_fp8), 4)}
        for name, a, b in (("as_trained_vs_bf16_base", on_fp8, on_bf16), ("bf16_base_vs_reference", on_bf16, reference),
                           ("as_trained_vs_reference", on_fp8, reference)):
            d = paired_difference([a], [b])
            row[name] = {"points": round(100 * d["difference"], 2), "ci95": [round(100 * x, 2) for x in d["ci95"]]}
        result["runs"][run] = row
        print(run, row, flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
