"""Loading tokenizers and causal LMs, and batching token ids, the same way in every model stage."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

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


class FirstTimeOnly(logging.Filter):
    """Lets each message of a logger through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        new = record.msg not in self.seen
        self.seen.add(record.msg)
        return new


# With an 8-bit base, peft keeps the norms in fp32, and bitsandbytes logs that it casts their output to fp16 at
# every 8-bit matrix product: 1,476 log lines in a 54-step run of a 2-layer model. Once says it.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(FirstTimeOnly())


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


LIGER = "liger-kernel==0.8.5"  # as pinned in requirements-gpu.txt and envs/answer.yaml


def fuse_kernels(model: torch.nn.Module) -> str:
    """Put Liger's fused Triton kernels for RMSNorm, RoPE and SwiGLU into a loaded model for scoring, where
    they apply: a CUDA GPU, half precision, no 8-bit or 4-bit weights, an architecture Liger covers.
    Returns what was done, or why not, for the log.

    PyTorch runs each of those as several element-wise kernels, a quarter of eager scoring's GPU time
    (BENCHMARKS.md); Liger's are one kernel each, with the same arithmetic up to bf16 rounding. Scoring calls
    the decoder and the output layer, never the model's forward, which Liger may also replace.
    """
    if not torch.cuda.is_available():
        return "off: no CUDA GPU"
    if getattr(model, "hf_quantizer", None) is not None:
        return "off: an 8-bit or 4-bit model"
    if model.dtype not in (torch.float16, torch.bfloat16):
        return f"off: the model is in {model.dtype}, not bf16 or fp16"
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # exported by the package
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return f"off: liger-kernel is not installed (pip install {LIGER}, as `make run GPU=1` does)"
    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"off: Liger has no kernels for {model.config.model_type} models"
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return f"Liger's fused RMSNorm, RoPE and SwiGLU ({model.config.model_type})"


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


class PrefixCache:
    """Keys and values of packed passes over shared prefixes, for later packed passes whose sequences each
    continue some of them (the questions of an article after its instruction and article, then each
    question's option orders after its question).

    Passed to the decoder as `prefix_cache`, it reaches packed_attention in every layer, which keeps each
    pass's keys and values; once `index` is set (see continuation), each sequence attends over the kept
    tokens of its prefixes followed by its own.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.index: torch.Tensor | None = None

    @torch.compiler.disable
    def keys_values(self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `module`'s layer for attention, (tokens, heads, dim) each: the pass's own
        until an index is set, each sequence's prefixes and its own after; the pass's own are kept either way.

        Kept out of compiled graphs (benchmarks/scoring_kernels.py compiles scoring's layers): its
        dictionaries differ by layer, which would make the compiler trace every layer again."""
        layer = module.layer_idx
        if layer in self.keys:
            self.keys[layer], self.values[layer] = torch.cat([self.keys[layer], key]), torch.cat([self.values[layer], value])
        else:
            self.keys[layer], self.values[layer] = key, value
        if self.index is None:
            return key, value
        return self.keys[layer][self.index], self.values[layer][self.index]


def continuation(prefixes: Sequence[Sequence[range]], lengths: Sequence[int], offset: int) -> dict:
    """How a packed pass continues earlier ones: its sequence n (of lengths[n] tokens) follows the tokens
    of prefixes[n] (ranges in the numbering of every earlier pass's tokens, in order), and its own tokens
    are numbered from `offset` on.

    Returns PrefixCache's `index` and the keys' cu_seq_lens_k and max_length_k, as CPU tensors.
    """
    index, key_lengths, start = [], [], offset
    for spans, length in zip(prefixes, lengths):
        before = [t for span in spans for t in span]
        index += [*before, *range(start, start + length)]
        key_lengths.append(len(before) + length)
        start += length
    return {"index": torch.tensor(index), "cu_seq_lens_k": torch.tensor([0, *key_lengths]).cumsum(0).to(torch.int32),
            "max_length_k": max(key_lengths)}


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     prefix_cache: PrefixCache | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a packed row (an AttentionInterface function).

    Sequences lie end to end in one row (query, key, value of shape (1,
    heads, tokens, dim)); `cu_seq_lens_q` holds where each starts, with the
    total last. With a `prefix_cache`, sequence n's keys are its prefix's and
    then its own (`cu_seq_lens_k`), the last query seeing every key: the
    causal mask is aligned at the end. On a GPU in half precision, torch's
    variable-length flash-attention kernel does all sequences in one call;
    elsewhere (a CPU, or fp32) they are laid out as right-padded rows for one
    SDPA call (what the tests compare against padded batches on the CPU).
    Returns (1, tokens, heads, dim).
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention needs one packed row and cu_seq_lens_q (a packed training "
                         "micro-batch or scoring row); other batches use sdpa")
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no attention dropout; this model asks for {dropout}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    continuing = prefix_cache is not None and prefix_cache.index is not None
    if prefix_cache is not None:
        k, v = prefix_cache.keys_values(module, k, v)
    if not continuing:  # the keys are the queries' own tokens
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 states under half-precision autocast (norms kept in fp32 next to an 8-bit base):
        # attention runs in the autocast type, as SDPA would.
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        options = {"window_size": (-1, 0)}  # causal, aligned at the end of each sequence's keys
        if gqa and "enable_gqa" in inspect.signature(varlen_attn).parameters:
            options["enable_gqa"] = True
        elif gqa:  # torch before 2.13 has no grouped-query flag: each key-value head serves its group
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        if scaling is not None and scaling != q.shape[-1] ** -0.5:  # the default scale needs no argument
            options["scale"] = scaling
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **options)
    else:
        out = padded_rows_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, gqa,
                                    continuing)
    return out.unsqueeze(0), None


def padded_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                          max_q: int, max_k: int, scaling: float | None, gqa: bool, continuing: bool) -> torch.Tensor:
    """packed_attention without a varlen kernel: each sequence as a right-padded row, one SDPA call.

    Where queries and keys are the same tokens (training, a prefix pass), the
    padding needs no mask (pad_right's reasoning: causal attention never
    reads a row's padding); where a sequence's keys start with a prefix, the
    mask lets query i see keys up to i + (keys - queries).
    """
    def layout(t: torch.Tensor, cu: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = cu.diff()
        row = torch.repeat_interleave(torch.arange(len(lengths), device=t.device), lengths)
        slot = row * width + torch.arange(len(row), device=t.device) - cu[row]
        padded = t.new_zeros(len(lengths) * width, *t.shape[1:]).index_copy(0, slot, t)
        return padded.view(len(lengths), width, *t.shape[1:]).transpose(1, 2), slot

    rows_q, slot = layout(q, cu_q, max_q)
    rows_k, _ = layout(k, cu_k, max_k)
    rows_v, _ = layout(v, cu_k, max_k)
    if not continuing:
        out = F.scaled_dot_product_attention(rows_q, rows_k, rows_v, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        shift = (cu_k.diff() - cu_q.diff())[:, None, None]
        mask = torch.arange(max_k, device=q.device)[None, None, :] <= torch.arange(max_q, device=q.device)[None, :, None] + shift
        out = F.scaled_dot_product_attention(rows_q, rows_k, rows_v, attn_mask=mask[:, None], scale=scaling,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[slot]


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


def use_compile_cache(folder: Path) -> None:
    """Keep inductor's compiled kernels and graphs, and AOTAutograd's, in `folder`, read back by later runs."""
    import torch._functorch.config
    import torch._inductor.config

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder.absolute())
    os.environ["TRITON_CACHE_DIR"] = str(folder.absolute() / "triton")
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """torch.compile every decoder layer; returns how many.

    The layers share their code, so one graph, compiled once for every
    sequence length (dynamic shapes: packed rows vary in length), serves them
    all. It fuses the norms, RoPE, SwiGLU and LoRA's element-wise work
    (BENCHMARKS.md has what that gains).
    """
    import torch._inductor.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is None:
        # Loading the layers' few CPU kernels makes inductor probe the CPU's vector instructions first: five
        # C++ builds, each dlopened by a new Python, in every process, cache or not (50 s of a warm-cache
        # compile's 51 s where starting Python is slow, BENCHMARKS.md); scalar code serves those kernels.
        torch._inductor.config.cpp.vec_isa_ok = False
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    # The frozen embedding's output does not require grad while every later layer's input does: dynamo
    # would compile the first layer's graph a second time for it (a recompile that doubled the wait).
    model.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
