"""Packed scoring on a GPU against full passes: the answer log-probabilities of packed rows (one option
order, each question alone) and of four orders with the questions of an article sharing its tokens, in
bf16 with the variable-length attention kernel (and then with the fused kernels of answering.fused_kernels),
each compared with one full bf16 pass per prompt and with fp32.

    python benchmarks/scoring_check.py --out benchmarks/results/<name>.json

A random Llama (4 layers, hidden 1024, 16 query and 4 key-value heads) and random prompts: three questions
an article of 0-400 tokens, a question of 0-40 tokens, and four orders that differ in 5-60 tokens. Packing is
right when its difference from the fp32 scores is no larger than a full bf16 pass's (bf16's own rounding).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))

from mcqa.modeling import fuse_kernels  # noqa: E402
from mcqa.scoring import shared_prefix_log_probs  # noqa: E402


@torch.inference_mode()
def full_passes(model, prompts: list[list[int]], answers: tuple[int, ...]) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.stack([torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0, -1].float(), dim=-1)
                        [list(answers)].cpu() for ids in prompts])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--questions", type=int, default=64)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).cuda().eval()
    rng = random.Random(0)
    prompts, articles = {k: [] for k in range(4)}, []
    for question in range(args.questions):
        articles.append(question // 3)  # three questions an article
        article = random.Random(question // 3)
        shared = [article.randrange(5, 4000) for _ in range(article.randrange(0, 400))]
        shared += [rng.randrange(5, 4000) for _ in range(rng.randrange(0, 40))]
        for k in range(4):
            prompts[k].append(shared + [rng.randrange(5, 4000) for _ in range(rng.randrange(5, 60))])
    answers = (16, 17, 18, 19)
    reference = {k: full_passes(model, prompts[k], answers) for k in range(4)}  # fp32
    model.to(torch.bfloat16)
    full = {k: full_passes(model, prompts[k], answers) for k in range(4)}
    packed = {k: shared_prefix_log_probs(model, {k: prompts[k]}, answers, 4096)[k] for k in range(4)}
    rotated = shared_prefix_log_probs(model, prompts, answers, 4096, groups=articles)
    kernels = fuse_kernels(model)  # answering.fused_kernels: Liger's RMSNorm, RoPE and SwiGLU from here on
    fused = shared_prefix_log_probs(model, prompts, answers, 4096, groups=articles)

    def error(scores: dict) -> float:
        return round(max((scores[k] - reference[k]).abs().max().item() for k in range(4)), 5)

    def agreement(scores: dict) -> float:
        return round(sum((scores[k].argmax(1) == reference[k].argmax(1)).float().mean().item() for k in range(4)) / 4, 4)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "questions": args.questions,
              "max_abs_error_vs_fp32": {"full_bf16": error(full), "packed_bf16": error(packed),
                                        "rotations_packed_bf16": error(rotated),
                                        "rotations_packed_bf16_fused_kernels": error(fused)},
              "argmax_agreement_with_fp32": {"full_bf16": agreement(full), "packed_bf16": agreement(packed),
                                             "rotations_packed_bf16": agreement(rotated),
                                             "rotations_packed_bf16_fused_kernels": agreement(fused)},
              "fused_kernels": kernels,
              "max_abs_difference_packed_vs_full_bf16": round(max(
                  (packed[k] - full[k]).abs().max().item() for k in range(4)), 5),
              "max_abs_difference_rotations_vs_full_bf16": round(max(
                  (rotated[k] - full[k]).abs().max().item() for k in range(4)), 5)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
