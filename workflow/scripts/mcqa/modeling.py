"""Loading tokenizers and causal LMs, and preparing them (fused kernels, compiled layers), the same way in every
model stage."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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

    `attention` is "sdpa", or mcqa.attention.PACKED_ATTENTION for training on packed batches.
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


@contextlib.contextmanager
def optional_backends_quiet(about: str = "cute") -> Iterator[None]:
    """Keep what the block writes to the process's stdout and stderr (file descriptors 1 and 2, so also what a
    logger or C code writes there), and pass it on to stderr unless it mentions `about`: liger-kernel says,
    at every import on a GPU machine, that its optional CuTe DSL backend cannot be imported (with the
    ImportError), which is neither an error nor anything to act on."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as caught:
        try:
            for fd in saved:
                os.dup2(caught.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            if about not in text.lower():
                sys.stderr.write(text)


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
        with optional_backends_quiet():
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
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
