"""Where a training step's GPU time goes: train_lora.py as the workflow runs it, with torch.profiler over a few
steps after warm-up, summed by kind of kernel.

    python benchmarks/profile_training.py --out profile.json -- <train_lora.py arguments>

The kinds: FP8 matrix products, bf16/fp32 matrix products, attention, fused (Triton) elementwise kernels of
compiled code (and how much of that is in kernels that apply LoRA's dropout), the optimizer, everything
else; and the share of the steps' wall time the GPU was busy (the rest is launch gaps and host work). The
profiler is added to mcqa.training's trainer from outside, and train_lora.py runs as its own program (as
`python train_lora.py ...` does): the stage script is neither imported nor changed.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
TRAIN_LORA = SCRIPTS / "train_lora.py"
sys.path.insert(0, str(SCRIPTS))

from mcqa import training  # noqa: E402

KINDS = (  # first match wins
    # Compiled code's kernels are named after the ops they fuse: FP8's casts and scales fused ahead of a
    # product read "triton_..._scaled_mm_...", yet are elementwise work.
    ("fused_elementwise", ("triton",)),
    ("attention", ("flash", "fmha", "attention")),  # flash attention's names mention cutlass too
    # cuBLAS's FP8 products: nvjet_..._qqtst_ (rowwise, both operands quantised) and _qrtst_ (tensorwise).
    ("fp8_matmul", ("qqtst", "qrtst", "f8", "fp8", "e4m3", "scaled_mm")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul")),
    ("optimizer", ("multi_tensor", "adam")),
)


def kind_of(kernel: str) -> str:
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(mark in name for mark in marks)), "other")


class StepProfiler(TrainerCallback):
    """torch.profiler from the start of step `first` to the end of step `first + steps - 1`."""

    def __init__(self, first: int, steps: int, out: Path) -> None:
        self.first, self.last, self.out = first, first + steps - 1, out
        self.profiler = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.first:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != self.last:
            return
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        by_kind, top, with_dropout = defaultdict(float), [], 0.0
        for event in self.profiler.key_averages():
            gpu_us = event.self_device_time_total
            if gpu_us > 0 and event.device_type == torch.autograd.DeviceType.CUDA:
                kind = kind_of(event.key)
                by_kind[kind] += gpu_us
                # LoRA's dropout draws a random number an element; compiled code fuses it into these kernels
                if kind == "fused_elementwise" and "dropout" in event.key:
                    with_dropout += gpu_us
                top.append((gpu_us, event.count, event.key[:160]))
        busy = sum(by_kind.values()) / 1e6
        steps = self.last - self.first + 1
        self.out.write_text(json.dumps({
            "steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 2),
            "gpu_busy_ms_per_step": round(busy / steps * 1e3, 2), "gpu_busy_fraction": round(busy / wall, 3),
            "ms_per_step_by_kind": {k: round(v / 1e3 / steps, 2) for k, v in sorted(by_kind.items(),
                                                                                      key=lambda kv: -kv[1])},
            "fused_elementwise_with_dropout_ms_per_step": round(with_dropout / 1e3 / steps, 2),
            "top_kernels": [{"ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": count / steps, "kernel": k}
                            for us, count, k in sorted(top, reverse=True)[:40]]}, indent=1))
        self.profiler = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--first-step", type=int, default=20, help="the first profiled step (after warm-up)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("train_lora_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    profiler = StepProfiler(args.first_step, args.steps, args.out)
    trainer_init = training.AnswerOnlyTrainer.__init__

    def with_profiler(self, *a, **kw):
        trainer_init(self, *a, **kw)
        self.add_callback(profiler)

    training.AnswerOnlyTrainer.__init__ = with_profiler
    sys.argv = [str(TRAIN_LORA), *(a for a in args.train_lora_args if a != "--")]
    try:
        runpy.run_path(str(TRAIN_LORA), run_name="__main__")
    except SystemExit as finished:  # train_lora.py ends with sys.exit(main())
        return finished.code or 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
