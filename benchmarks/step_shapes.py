"""Where a training step's time goes: micro-batch shape and the spread of lengths inside it.

    python benchmarks/step_shapes.py --layers 4 --out benchmarks/results/NAME.json

Times forward + backward + optimizer step of train_lora's model path (LoRA
r48 on all seven projections of a Llama-2-7B-wide model, `--layers` deep,
bf16, answer-only logits) for micro-batches of about 8k tokens in several
shapes, each once with every row the same length (no padding) and once with
lengths spread over the bottom 8% of the row (as length-grouped batches
have). Differences tell whether a slow step comes from its shape (rows x
padded length) or from padding itself. `--rotate N` instead takes a new
shape every step, N rounds through all of them, as training does: the first
round shows what a shape costs the first time it is seen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

from mcqa.demo_model import build_model  # noqa: E402
from mcqa.modeling import without_attention_mask  # noqa: E402
from mcqa.batching import AnswerOnlyCollator  # noqa: E402

SHAPES = [(16, 512), (16, 504), (16, 496), (24, 344), (23, 344), (23, 352), (32, 256), (31, 264), (64, 128)]


def batch(rows: int, width: int, spread: bool, vocab: int) -> dict:
    lengths = [width - (i * width // (12 * rows) if spread else 0) for i in range(rows)]
    features = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,)).tolist()
        features.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n - 2) + ids[-2:]})
    return AnswerOnlyCollator(pad_token_id=2)(features)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a toy width, to try the script on a CPU")
    parser.add_argument("--rotate", type=int, default=0, help="rounds through the shapes, one step per shape")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    width = dict(hidden_size=64, intermediate_size=128, num_heads=4, vocab_size=3000) if args.tiny else dict(
        hidden_size=4096, intermediate_size=11008, num_heads=32, vocab_size=55296)
    torch.set_default_dtype(dtype)
    model = build_model(num_layers=args.layers, seed=0, dtype=dtype, device=device, init_std=0.02, **width)
    torch.set_default_dtype(torch.float32)
    model = get_peft_model(model, LoraConfig(r=48, lora_alpha=64, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    def step(inputs: dict) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def entry(inputs: dict, spread: bool, seconds: float) -> dict:
        rows, padded = inputs["input_ids"].shape
        return {"rows": rows, "padded_length": padded, "lengths_spread": spread,
                "answer_positions": len(inputs["logits_to_keep"]), "ms": round(seconds * 1e3, 2),
                "us_per_padded_token": round(seconds * 1e6 / (rows * padded), 2)}

    def inputs_for(rows: int, length: int, spread: bool) -> dict:
        return {k: v.to(device) for k, v in without_attention_mask(batch(rows, length, spread, width["vocab_size"])).items()}

    results = []
    if args.rotate:
        step(inputs_for(16, 512, False))  # warm-up on the full-length shape only
        for round_ in range(args.rotate):
            for rows, length in SHAPES:
                inputs = inputs_for(rows, length, True)
                results.append({"round": round_, **entry(inputs, True, step(inputs))})
                print(json.dumps(results[-1]), flush=True)
    for rows, length in SHAPES if not args.rotate else []:
        for spread in (False, True):
            inputs = inputs_for(rows, length, spread)
            times = [step(inputs) for _ in range(args.repeats + 2)]
            results.append(entry(inputs, spread, statistics.median(times[2:])))
            print(json.dumps(results[-1]), flush=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                    "layers": args.layers, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
