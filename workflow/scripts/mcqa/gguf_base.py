"""A GGUF file (llama.cpp's format) as a base model: what it holds, read before any job, and its conversion
into the Hugging Face folder that every stage reads.

transformers dequantizes a GGUF's tensors as it loads them (gguf-py's arithmetic), but its tokenizer
conversion takes the special tokens wrong (SmolLM2: eos `<|im_start|>`, no pad) and never adds the BOS a
GGUF asks for (Gemma 3 without its BOS writes " is is is"). The GGUF's own metadata says both, and the
converted tokenizer is set from it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

# Causal LMs with Llama-style projection names (q_proj ... down_proj, what LoRA targets and the merge adds to)
# that transformers loads from GGUF. Tested: llama (SmolLM2) and gemma3 (Gemma 3 270M).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
# The special tokens a GGUF names, as transformers' tokenizer calls them.
SPECIAL_TOKEN_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                      "pad_token": "tokenizer.ggml.padding_token_id", "unk_token": "tokenizer.ggml.unknown_token_id"}


class GGUFSummary(NamedTuple):
    """What a GGUF holds, as far as the workflow needs to know before converting it."""

    architecture: str
    tensor_types: dict[str, int]  # GGML type name -> tensors of that type
    special_ids: dict[str, int]  # bos_token, eos_token, pad_token, unk_token -> token id (those the file names)
    add_bos: bool | None  # None where the file does not say
    add_eos: bool | None
    chat_template: str | None
    tied_embeddings: bool  # no separate output layer: it is the token embedding

    def undequantizable(self) -> list[str]:
        """The tensor types that gguf-py (so transformers) cannot turn back into floats: each is tried on one
        block of zeros."""
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        bad = []
        for name in sorted(self.tensor_types):
            qtype = GGMLQuantizationType[name]
            try:
                dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
            except NotImplementedError:
                bad.append(name)
        return bad


def read_summary(path: str | Path) -> GGUFSummary:
    """Read a GGUF's metadata and tensor list (not its weights) with gguf-py's reader."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    names = {tensor.name for tensor in reader.tensors}
    return GGUFSummary(
        architecture=value("general.architecture") or "unknown",
        tensor_types=dict(Counter(tensor.tensor_type.name for tensor in reader.tensors)),
        special_ids={role: int(v) for role, key in SPECIAL_TOKEN_KEYS.items() if (v := value(key)) is not None},
        add_bos=value("tokenizer.ggml.add_bos_token"),
        add_eos=value("tokenizer.ggml.add_eos_token"),
        chat_template=value("tokenizer.chat_template"),
        tied_embeddings="output.weight" not in names,
    )


def refusal(summary: GGUFSummary, path: str | Path) -> str | None:
    """Why the workflow cannot train on this GGUF, or None: an architecture outside SUPPORTED_ARCHITECTURES
    or one transformers does not read from GGUF, or tensors that cannot be dequantized."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    types = ", ".join(f"{count} {name}" for name, count in sorted(summary.tensor_types.items()))
    held = f"{path} holds a {summary.architecture} model ({types})"
    supported = [a for a in SUPPORTED_ARCHITECTURES if a in GGUF_CONFIG_MAPPING]
    if summary.architecture not in supported:
        return (f"{held}; GGUF bases of these architectures are supported: {', '.join(supported)} (causal LMs "
                "whose projections LoRA targets, which transformers reads from GGUF). Convert the model to a "
                "Hugging Face folder yourself, or use its Hugging Face release as base_model.")
    if bad := summary.undequantizable():
        return (f"{held}; transformers cannot dequantize {', '.join(bad)} tensors (the gguf package reads "
                "F32, F16, BF16, the Q and K quantizations and the IQ types). Use a GGUF quantized otherwise, "
                "e.g. Q8_0 or Q4_K_M.")
    return None


def converted_tokenizer(folder: str | Path, name: str, summary: GGUFSummary):
    """The GGUF's tokenizer as transformers converts it, with the special tokens and the BOS/EOS rule that
    the GGUF's metadata gives."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for role, token_id in summary.special_ids.items():
        setattr(tokenizer, role, tokenizer.convert_ids_to_tokens(token_id))
    if summary.add_bos is not None:
        tokenizer.add_bos_token = summary.add_bos
    if summary.add_eos is not None:
        tokenizer.add_eos_token = summary.add_eos
    if summary.chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = summary.chat_template
    return tokenizer


def convert(path: str | Path, out: str | Path) -> tuple[GGUFSummary, int]:
    """Write the GGUF at `path` as a Hugging Face folder at `out` (bf16 safetensors shards, a config without
    quantization, tokenizer, chat template, generation config); returns what the file holds and the
    model's parameter count."""
    import torch
    from transformers import AutoModelForCausalLM
    path = Path(path)
    summary = read_summary(path)
    if reason := refusal(summary, path):
        raise ValueError(reason)
    tokenizer = converted_tokenizer(path.parent, path.name, summary)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    # The weights are dequantized floats now: the model is saved as any bf16 checkpoint (transformers refuses
    # to save a model that it still marks as GGUF-quantized).
    model.hf_quantizer = None
    del model.config.quantization_config
    ids = {f"{role}_id": token_id for role, token_id in summary.special_ids.items() if role != "unk_token"}
    for config in (model.config, model.generation_config):
        for key, token_id in ids.items():
            setattr(config, key, token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return summary, sum(p.numel() for p in model.parameters())
