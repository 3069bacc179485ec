"""Loading tokenizers and causal LMs, and batching token ids, the same way in every model stage."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from .bases import install_hint, missing_packages, tokenizer_packages
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


class TokenizerError(ValueError):
    """A base model's tokenizer cannot be used; the message says what to do."""


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer, with right padding and a pad token, checked to have one-token answers.

    `revision` pins a hub commit, branch or tag (ignored for local folders).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (ValueError, ImportError, OSError) as exc:
        # transformers' own message for a SentencePiece model without sentencepiece asks for tiktoken,
        # which does not help; say what does.
        needed = tokenizer_packages(path) if Path(path).is_dir() else ["sentencepiece", "protobuf"]
        if (missing := missing_packages(needed)) and re.search(r"sentencepiece|tiktoken|protobuf", str(exc), re.I):
            raise TokenizerError(install_hint(path, missing)) from exc
        raise
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
               revision: str | None = None, attention: str = "sdpa"):
    """A causal LM on this process's device in the given precision (already resolved).

    `attention` is "sdpa", or PACKED_ATTENTION for training on packed batches.
    """
    dtype = DTYPES[precision]
    device = local_device()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=dtype,
        quantization_config=quantization_config(load_in, dtype),
        device_map={"": device},
        attn_implementation=attention,
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


PACKED_ATTENTION = "packed_varlen"


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of a packed row (an AttentionInterface function).

    Examples lie end to end in one row (query, key, value of shape (1, heads,
    tokens, dim)); `cu_seq_lens_q` holds where each starts, with the total
    last. On a GPU in half precision, torch's variable-length flash-attention
    kernel does all examples in one call without a token attending across
    examples; elsewhere (a CPU, or fp32), the examples are laid out as
    right-padded rows for one SDPA call (what the tests compare against padded
    batches on the CPU). Returns (1, tokens, heads, dim).
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention needs one packed row and cu_seq_lens_q (train_lora's "
                         "AnswerOnlyCollator with packing); other batches use sdpa")
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no attention dropout; this model asks for {dropout}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 states under half-precision autocast (norms kept in fp32 next to an 8-bit base):
        # attention runs in the autocast type, as SDPA would.
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        options = {"window_size": (-1, 0)}  # causal
        if gqa:
            options["enable_gqa"] = True
        if scaling is not None and scaling != q.shape[-1] ** -0.5:  # the default scale needs no argument
            options["scale"] = scaling
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, **options)
    else:
        # No varlen kernel: the examples as right-padded rows (pad_right's reasoning: causal
        # attention never reads a row's padding), one SDPA call, and back to one packed row.
        lengths = cu_seq_lens_q.diff()
        example = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
        slot = example * max_length_q + torch.arange(len(example), device=q.device) - cu_seq_lens_q[example]

        def rows(t: torch.Tensor) -> torch.Tensor:
            padded = t.new_zeros(len(lengths) * max_length_q, *t.shape[1:]).index_copy(0, slot, t)
            return padded.view(len(lengths), max_length_q, *t.shape[1:]).transpose(1, 2)

        out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
        out = out.transpose(1, 2).reshape(-1, *q.shape[1:])[slot]
    return out.unsqueeze(0), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run `model` with another attention implementation inside the block (e.g. sdpa for
    scoring padded batches with a model that trains on packed ones)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer; returns how many.

    The layers share their code, so one graph, compiled once for every
    sequence length (dynamic shapes: packed rows vary in length), serves them
    all. It fuses the norms, RoPE, SwiGLU and LoRA's element-wise work
    (BENCHMARKS.md has what that gains).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
