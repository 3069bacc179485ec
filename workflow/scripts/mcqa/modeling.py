"""Loading tokenizers and causal LMs, and batching token ids, the same way in every model stage."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .prompt import answer_token_ids

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 on GPUs that have it, fp16 on other GPUs, fp32 on CPU."""
    if precision != "auto":
        if precision != "fp32" and not torch.cuda.is_available():
            return "fp32"  # half precision on a CPU is slow and not what a laptop run wants
        return precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def quantization_config(load_in: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for an 8-bit or 4-bit base, or None."""
    if load_in == "none":
        return None
    if not torch.cuda.is_available():
        raise RuntimeError(f"load_in: {load_in} needs a CUDA GPU (bitsandbytes); set load_in: none to run on CPU")
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer, with right padding and a pad token, checked to have one-token answers.

    `revision` pins a hub commit, branch or tag (ignored for local folders).
    """
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    answer_token_ids(tokenizer)
    return tokenizer


def local_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def load_model(path: str, precision: str, load_in: str = "none", trust_remote_code: bool = False,
               revision: str | None = None):
    """A causal LM on this process's device in the given precision (already resolved)."""
    dtype = DTYPES[precision]
    device = local_device()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(load_in, dtype),
        device_map={"": device},
        attn_implementation="sdpa",
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    return model


def without_attention_mask(batch: dict) -> dict:
    """The batch for a forward pass of right-padded rows (see pad_right)."""
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def pad_right(sequences: list[list[int]], value: int, multiple_of: int = 1) -> torch.Tensor:
    """Sequences as one tensor, padded with `value` on the right to a multiple of `multiple_of`.

    Training and answering both pad on the right, so in both a prompt's
    positions count from its first token, and a causal model needs no
    attention mask: a real token attends only to tokens before it, which are
    all real, and what pad positions compute is never read. Without a mask
    attention can run its fused causal kernel (flash attention) rather than
    a masked one.
    """
    width = max(len(seq) for seq in sequences)
    width = -(-width // multiple_of) * multiple_of
    batch = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return batch
