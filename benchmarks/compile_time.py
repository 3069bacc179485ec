"""Where torch.compile's wait before the first training step goes, and what the workflow's compile cache saves.

    python benchmarks/compile_time.py --work /tmp/bench --out benchmarks/results/<name>.json [--steps 54] [--runs ...]

Uses the harness's work folder (its setup stage: data and the 7B base's
tokenizer). A small model of the same vocabulary (2 layers, 256 wide) trains
the same steps as train_lora does at the schema's defaults, once per run
named in --runs (RUNS below, in that order): uncompiled; compiled with an
empty cache folder; compiled again with that folder (what a second run of
the workflow on the same machine finds in resources/compile_cache), as is,
with inductor compiling in the process instead of its worker pool, and
under cProfile; and under cProfile with inductor's probe of the CPU's
vector instructions back on (the profiles' top functions and their callers
go to compile_<run>_profile.txt in the work folder). Each run logs torch's
recompiles and graph breaks (TORCH_LOGS); the wait is the time to the first
logged step minus the uncompiled run's. The JSON is rewritten after every
run.
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

from mcqa.demo_model import build_model  # noqa: E402
from mcqa.history import logging_steps, read_history  # noqa: E402
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


# name: (compiled, extra environment, profiled); the warm runs need compiled_empty_cache before them.
RUNS = {
    "uncompiled": (False, {}, False),
    "compiled_empty_cache": (True, {}, False),
    "compiled_warm_cache": (True, {}, False),
    "compiled_warm_cache_in_process": (True, {"TORCHINDUCTOR_COMPILE_THREADS": "1"}, False),
    "compiled_warm_cache_profiled": (True, {}, True),
    # inductor's probe of the CPU's vector instructions, which compile_decoder_layers turns off, back on
    "compiled_isa_probe_profiled": (True, {"TORCHINDUCTOR_VEC_ISA_OK": "1"}, True),
}


def profile_summary(stats_file: Path, out: Path) -> None:
    import pstats

    with open(out, "w") as fh:
        stats = pstats.Stats(str(stats_file), stream=fh).strip_dirs()
        print("== by cumulative time ==", file=fh)
        stats.sort_stats("cumulative").print_stats(60)
        print("== by own time ==", file=fh)
        stats.sort_stats("tottime").print_stats(30)
        print("== who called the slowest ==", file=fh)
        stats.sort_stats("cumulative").print_callers(40)


def train(work: Path, base: Path, name: str, settings: dict, cache: Path | None, env: dict | None = None,
          profiled: bool = False) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    profiler = ["-m", "cProfile", "-o", out / "profile.pstats"] if profiled else []
    command = [sys.executable, *profiler, REPO / "workflow/scripts/train_lora.py", "--train", work / "data/train.json",
               "--base-model", base, "--out", out / "adapter", "--log-jsonl", out / "train_log.jsonl",
               "--checkpoint-dir", out / "checkpoints", "--settings", json.dumps(settings)]
    command += ["--compile-cache", cache] if cache else []
    start = time.perf_counter()
    with open(out / "train.log", "w") as fh:
        code = subprocess.call([str(c) for c in command], stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, "TORCH_LOGS": "recompiles,graph_breaks", **(env or {})})
    wall = time.perf_counter() - start
    text = (out / "train.log").read_text()
    if code:
        raise SystemExit(f"{name} failed ({code}):\n{text[-3000:]}")
    losses = logging_steps(read_history(out / "train_log.jsonl"))
    result = {"wall_s": round(wall, 1), "first_step_at_s": losses[0]["elapsed_s"],
              "steps_after_first_s": round(losses[-1]["elapsed_s"] - losses[0]["elapsed_s"], 2),
              "steps": losses[-1]["step"], "recompiles": len(re.findall(r"Recompiling function", text)),
              "graph_breaks": len(re.findall(r"Graph break", text))}
    shutil.copyfile(out / "train.log", work / f"compile_{name}.log")
    if profiled:
        profile_summary(out / "profile.pstats", work / f"compile_{name}_profile.txt")
    log(f"{name}: {result}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=54)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS)[:3])
    args = parser.parse_args()
    base = small_base(args.work)
    settings = {**LORA, "precision": "bf16", "logging_steps": 1}
    _, batches = epoch_batches(args.work, settings)
    settings["epochs"] = args.steps / len(batches)
    cache = args.work / "compile_cache"
    shutil.rmtree(cache, ignore_errors=True)
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "model": "Llama 2 layers, hidden 256, MLP 688, vocab of the 7B base",
              "steps": args.steps, "runs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        compiled, env, profiled = RUNS[name]
        run_settings = settings if compiled else {**settings, "compile": False}
        result["runs"][name] = train(args.work, base, name, run_settings, cache if compiled else None, env, profiled)
        eager = result["runs"].get("uncompiled", {}).get("first_step_at_s")
        for run in result["runs"].values():
            if eager is not None:
                run["compile_wait_s"] = round(run["first_step_at_s"] - eager, 1)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
