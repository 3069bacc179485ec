"""Where evaluation's scoring time goes on a GPU, and what fused kernels save: the validation-sized set
(the first 20% of the training questions) with four option orders, scored in one process per variant.

    python benchmarks/scoring_kernels.py --work /tmp/bench --out benchmarks/results/<name>.json \
        --variants fp32 eager liger profiled profiled_liger compiled compiled

After run_gpu_benchmarks.py's setup stage (WORK/base, WORK/data/train.json). Variants:
- fp32: the reference, the first --reference-questions questions in full precision;
- eager: bf16 with PyTorch's kernels (answering.fused_kernels: false);
- liger: bf16 with Liger's fused RMSNorm, RoPE and SwiGLU (mcqa.modeling.fuse_kernels, answering.fused_kernels: true);
- profiled, profiled_liger: the same under torch.profiler over the first --profile-questions questions,
  GPU time by kind of kernel (the kernels, longest first, in --profile-out);
- compiled: every decoder layer compiled as training compiles it (mcqa.modeling.compile_decoder_layers),
  with an inductor cache in WORK/scoring_cache, so a second `compiled` finds it warm.
Each bf16 variant but eager scores everything twice in its process (the first run includes compiling
kernels) and reports its largest difference from the fp32 and eager variants' log-probabilities.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

from mcqa.modeling import compile_decoder_layers, fuse_kernels, load_model, load_tokenizer, use_compile_cache  # noqa: E402
from mcqa.prompt import prompt_frame  # noqa: E402
from mcqa.records import read_records  # noqa: E402
from mcqa.scoring import encode_rotations, score_prompts  # noqa: E402

KINDS = [("attention", r"flash|fmha|varlen"), ("matrix products", r"gemm|cutlass|nvjet|xmma|sm90"),
         ("gather, copy, concatenate", r"index|gather|cat|copy|Memcpy|scatter"),
         ("norms, RoPE, SwiGLU, adds (element-wise)", r".")]


def kind(name: str) -> str:
    return next(label for label, pattern in KINDS if re.search(pattern, name, re.I))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_scoring(model, records, prompts, answer_ids, batch_tokens) -> tuple[torch.Tensor, float]:
    synchronize()
    start = time.perf_counter()
    log_probs, _ = score_prompts(model, records, prompts, answer_ids, batch_tokens)
    synchronize()
    return log_probs, time.perf_counter() - start


def one(args) -> dict:
    tokenizer = load_tokenizer(str(args.work / "base"))
    frame = prompt_frame(tokenizer, "plain")
    labelled = read_records(args.work / "data/train.json", "labelled")
    records = labelled[: round(0.2 * len(labelled))]
    prompts = encode_rotations(tokenizer, records, 512, 4, frame)
    half = "bf16" if torch.cuda.is_available() else "fp32"
    model = load_model(str(args.work / "base"), "fp32" if args.one == "fp32" else half).eval()
    if args.one == "fp32":  # the reference: the first --reference-questions in full precision
        records, prompts = records[: args.reference_questions], {k: v[: args.reference_questions] for k, v in prompts.items()}
    result = {"variant": args.one, "questions": len(records), "ready_at_s": round(time.perf_counter() - START, 2)}
    if "liger" in args.one:
        result["fused_kernels"] = fuse_kernels(model)
    if args.one == "compiled":
        use_compile_cache(args.work / "scoring_cache")
        compile_decoder_layers(model)
    if args.one.startswith("profiled"):
        from torch.profiler import ProfilerActivity, profile

        subset = records[: args.profile_questions]
        part = {k: v[: args.profile_questions] for k, v in prompts.items()}
        timed_scoring(model, subset, part, frame.answer_ids, args.batch_tokens)  # warm-up
        _, wall = timed_scoring(model, subset, part, frame.answer_ids, args.batch_tokens)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_scoring(model, subset, part, frame.answer_ids, args.batch_tokens)
        by_kind, kernels = collections.Counter(), []
        for event in prof.key_averages():
            device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
            if device_us and event.device_type == torch.autograd.DeviceType.CUDA:
                by_kind[kind(event.key)] += device_us / 1e6
                kernels.append((device_us / 1e6, event.count, event.key[:140]))
        busy = sum(by_kind.values())
        args.profile_out.write_text("\n".join(f"{s:8.3f} s {n:7d}x  {k}" for s, n, k in sorted(kernels, reverse=True)))
        result.update(profiled_questions=len(subset), wall_s=round(wall, 3), gpu_busy_s=round(busy, 3),
                      by_kind_s={k: round(v, 3) for k, v in by_kind.most_common()})
        return result
    scores, first = timed_scoring(model, records, prompts, frame.answer_ids, args.batch_tokens)
    result["first_scoring_s"] = round(first, 2)
    if args.one not in ("eager", "fp32"):  # the others' first run includes compiling kernels
        result["second_scoring_s"] = round(timed_scoring(model, records, prompts, frame.answer_ids, args.batch_tokens)[1], 2)
    result.update(
                  peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None)
    if args.one in ("eager", "fp32"):
        torch.save(scores, args.work / f"scores_{args.one}.pt")
    for name in ("eager", "fp32"):  # the largest difference of the combined log-probabilities from theirs
        if name != args.one and (args.work / f"scores_{name}.pt").exists():
            other = torch.load(args.work / f"scores_{name}.pt")
            n = min(len(scores), len(other))
            result[f"largest_difference_from_{name}"] = round((scores[:n] - other[:n]).abs().max().item(), 4)
    if args.one == "compiled":
        from torch._dynamo.utils import counters

        result["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break")}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+",
                        default=["fp32", "eager", "liger", "profiled", "profiled_liger", "compiled", "compiled"])
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--profile-questions", type=int, default=600)
    parser.add_argument("--reference-questions", type=int, default=200, help="how many the fp32 variant scores")
    parser.add_argument("--profile-out", type=Path, help="the profiled variant's kernels, longest first")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return 0
    results, device = [], torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    for variant in args.variants:
        command = [sys.executable, __file__, "--work", args.work, "--out", args.out, "--one", variant,
                   "--batch-tokens", args.batch_tokens, "--profile-questions", args.profile_questions,
                   "--reference-questions", args.reference_questions,
                   "--profile-out", args.profile_out or args.out.with_suffix(".kernels.txt")]
        start = time.perf_counter()
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=os.environ)
        if done.returncode:
            result = {"variant": variant, "failed": done.stderr[-3000:]}
        else:
            result = {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - start, 1)}
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
        args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "batch_tokens": args.batch_tokens,
                                        "variants": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
