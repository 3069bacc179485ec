"""Where torch.compile's wait before the first training step goes, and what the workflow's compile cache saves.

    python benchmarks/compile_time.py --work /tmp/bench --out benchmarks/results/<name>.json [--steps 54]

Uses the harness's work folder (its setup stage: data and the 7B base's
tokenizer). A small model of the same vocabulary (2 layers, 256 wide) trains
the same steps three times as train_lora does at the schema's defaults:
compiled with an empty cache folder, compiled again with that folder (what a
second run of the workflow on the same machine finds in
resources/compile_cache), and uncompiled. Each run logs torch's recompiles
and graph breaks (TORCH_LOGS); the wait is the time to the first logged
step minus the uncompiled run's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "workflow" / "scripts"))

from run_gpu_benchmarks import LORA, epoch_batches, log  # noqa: E402

from build_demo_model import build_model  # noqa: E402
from mcqa.modeling import load_tokenizer  # noqa: E402


def small_base(work: Path) -> Path:
    """A 2-layer, 256-wide Llama with the 7B base's tokenizer, in bf16."""
    out = work / "small_base"
    if not (out / "config.json").exists():
        tokenizer = load_tokenizer(str(work / "base"))
        model = build_model(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_layers=2,
                            num_heads=4, seed=0, dtype=torch.bfloat16, init_std=0.02)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def train(work: Path, base: Path, name: str, settings: dict, cache: Path | None) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    command = [sys.executable, REPO / "workflow/scripts/train_lora.py", "--train", work / "data/train.json",
               "--base-model", base, "--out", out / "adapter", "--log-jsonl", out / "train_log.jsonl",
               "--checkpoint-dir", out / "checkpoints", "--settings", json.dumps(settings)]
    command += ["--compile-cache", cache] if cache else []
    start = time.perf_counter()
    with open(out / "train.log", "w") as fh:
        code = subprocess.call([str(c) for c in command], stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"})
    wall = time.perf_counter() - start
    text = (out / "train.log").read_text()
    if code:
        raise SystemExit(f"{name} failed ({code}):\n{text[-3000:]}")
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [e for e in steps if "loss" in e]
    result = {"wall_s": round(wall, 1), "first_step_at_s": losses[0]["elapsed_s"],
              "steps_after_first_s": round(losses[-1]["elapsed_s"] - losses[0]["elapsed_s"], 2),
              "steps": losses[-1]["step"], "recompiles": len(re.findall(r"Recompiling function", text)),
              "graph_breaks": len(re.findall(r"Graph break", text))}
    shutil.copyfile(out / "train.log", work / f"compile_{name}.log")
    log(f"{name}: {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=54)
    args = parser.parse_args()
    base = small_base(args.work)
    settings = {**LORA, "precision": "bf16", "logging_steps": 1}
    _, batches = epoch_batches(args.work, settings)
    settings["epochs"] = args.steps / len(batches)
    cache = args.work / "compile_cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = {"compiled_empty_cache": train(args.work, base, "compiled_empty_cache", settings, cache),
            "compiled_warm_cache": train(args.work, base, "compiled_warm_cache", settings, cache),
            "uncompiled": train(args.work, base, "uncompiled", {**settings, "compile": False}, None)}
    eager = runs["uncompiled"]["first_step_at_s"]
    for run in runs.values():
        run["compile_wait_s"] = round(run["first_step_at_s"] - eager, 1)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "model": "Llama 2 layers, hidden 256, MLP 688, vocab of the 7B base",
              "steps": args.steps, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
