"""A merged checkpoint as one GGUF file (llama.cpp's format, read by llama.cpp, Ollama and LM Studio), written
with gguf-py, the llama.cpp project's own writer, its tensor-name map and its quantization.

The file holds the model's hyperparameters, its tokenizer (the vocabulary with the merges of a byte-level BPE,
or the pieces and scores of a SentencePiece model), its special tokens, whether it adds a BOS, and its chat
template, so it runs with its own template. The weights are streamed: each tensor is read, converted and
written in turn, so memory holds one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

# Architectures exported, by config.json's model_type: gguf-py's name for them. llama.cpp's llama
# architecture also runs Mistral's checkpoints; Qwen2.5's is qwen2.
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
# File types written: the type of every matrix (1-D tensors, norms and biases, stay F32, as llama.cpp keeps them).
TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# What llama.cpp calls a byte-level BPE tokenizer's pre-tokenizer, told by the pattern it splits text with
# (tokenizer.json's Split regex): Llama-3's and Qwen2's own, else GPT-2's ("default", a plain ByteLevel).
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


class ExportError(ValueError):
    """A checkpoint that cannot be written as GGUF; the message says why and what is supported."""


def refusal(config: dict, where: str) -> str | None:
    """Why a checkpoint of this config.json cannot be exported, or None."""
    model_type = config.get("model_type", "unknown")
    if model_type not in ARCHITECTURES:
        return (f"{where} is a {model_type} model; the GGUF export writes {', '.join(sorted(ARCHITECTURES))} "
                "models (llama.cpp's llama and qwen2 architectures). Convert it with llama.cpp's "
                "convert_hf_to_gguf.py instead.")
    return None


def shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in the order its index names them."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [folder / "model.safetensors"]


class Tensor(NamedTuple):
    name: str  # the GGUF name
    source: str  # the checkpoint's name
    file: Path
    shape: tuple[int, ...]


def tensors(folder: Path, config: dict) -> list[Tensor]:
    """Every tensor of the checkpoint with its GGUF name (gguf-py's map), in file order."""
    import gguf
    from safetensors import safe_open

    arch = gguf.MODEL_ARCH[ARCHITECTURES[config["model_type"]]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    found = []
    for file in shards(folder):
        with safe_open(str(file), "pt") as weights:
            for source in weights.keys():
                if source.endswith("rotary_emb.inv_freq"):
                    continue  # recomputed from the rope base
                name = names.get_name(source, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ExportError(f"{file}: no GGUF name for the tensor {source}")
                found.append(Tensor(name, source, file, tuple(weights.get_slice(source).get_shape())))
    return found


def permuted(weight: np.ndarray, heads: int) -> np.ndarray:
    """A q or k projection's rows in llama.cpp's order: each head's rotary halves interleaved, where Hugging
    Face's Llama keeps them apart (transformers' GGUF reader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def ggml_type(tensor: Tensor, type_name: str):
    """The GGML type a tensor is written in: matrices in the file's type, 1-D tensors (norms, biases) in F32."""
    import gguf

    return gguf.GGMLQuantizationType["F32" if len(tensor.shape) < 2 else TYPES[type_name][0]]


def converted(tensor: Tensor, data: np.ndarray, config: dict, type_name: str) -> np.ndarray:
    """The tensor's data as written: q and k rows in llama.cpp's order, then F32, F16, or the bytes of BF16 or
    Q8_0 (gguf-py's quantization)."""
    import gguf

    if config["model_type"] in ("llama", "mistral"):
        if tensor.source.endswith("q_proj.weight"):
            data = permuted(data, config["num_attention_heads"])
        elif tensor.source.endswith("k_proj.weight"):
            data = permuted(data, config.get("num_key_value_heads") or config["num_attention_heads"])
    qtype = ggml_type(tensor, type_name)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return data.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def vocabulary(writer, folder: Path) -> str:
    """Write the tokenizer into the GGUF; returns what it is, for the log."""
    import gguf
    from transformers import AutoTokenizer

    from .prompt import leading_special_ids

    if (folder / "tokenizer.model").exists():
        vocab = gguf.SentencePieceVocab(folder)
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre("default")
        merges = False
    else:
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer["model"]
        if model["type"] != "BPE":
            raise ExportError(f"{folder}/tokenizer.json is a {model['type']} tokenizer with no tokenizer.model; the "
                              "GGUF export writes byte-level BPE tokenizers and SentencePiece models")
        ids = {**model["vocab"], **{t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}}
        special = {t["content"]: t["special"] for t in tokenizer.get("added_tokens", [])}
        tokens = [token for token, _ in sorted(ids.items(), key=lambda item: item[1])]
        if [ids[t] for t in tokens] != list(range(len(tokens))):
            raise ExportError(f"{folder}/tokenizer.json: its token ids are not 0 to {len(tokens) - 1} without gaps")
        scores = [0.0] * len(tokens)
        types = [gguf.TokenType.CONTROL if special.get(t) else gguf.TokenType.USER_DEFINED if t in special
                 else gguf.TokenType.NORMAL for t in tokens]
        split = json.dumps(tokenizer.get("pre_tokenizer"))
        pre = next((name for pattern, name in PRE_TOKENIZERS.items() if json.dumps(pattern)[1:-1] in split), "default")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        merges = True
    writer.add_token_list(list(tokens))
    writer.add_token_scores(list(scores))
    writer.add_token_types(list(types))
    special_vocab = gguf.SpecialVocab(folder, load_merges=merges, n_vocab=len(tokens))
    # Whether a BOS is added is what the tokenizer itself does (the prompts were trained so), whatever its
    # config files say or leave unsaid.
    special_vocab.add_special_token["bos"] = bool(leading_special_ids(AutoTokenizer.from_pretrained(folder)))
    special_vocab.add_to_gguf(writer, quiet=True)
    return (f"{len(tokens):,} tokens ({'SentencePiece' if not merges else f'byte-level BPE, pre-tokenizer {pre}'}), "
            f"special tokens {special_vocab.special_token_ids}, adds a BOS: {special_vocab.add_special_token['bos']}, "
            f"chat template: {'yes' if special_vocab.chat_template else 'none'}")


def hyperparameters(writer, config: dict, type_name: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType[TYPES[type_name][1]])


def export(folder: str | Path, out: str | Path, type_name: str) -> Iterator[str]:
    """Write the checkpoint in `folder` as one GGUF file of `type_name` (f16, bf16 or q8_0), tensor by tensor;
    yields progress lines for the log."""
    import gguf
    import torch
    from safetensors import safe_open

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    if reason := refusal(config, str(folder)):
        raise ExportError(reason)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[ARCHITECTURES[config["model_type"]]]]
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name(folder.parent.name)
    hyperparameters(writer, config, type_name)
    yield vocabulary(writer, folder)
    planned = tensors(folder, config)
    for tensor in planned:  # the tensor table first: each tensor's type and size
        qtype = ggml_type(tensor, type_name)
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(tensor.name, tensor.shape, dtype, int(np.prod(tensor.shape)) * dtype.itemsize)
        else:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tensor.shape, qtype)
            writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for n, tensor in enumerate(planned, 1):
        with safe_open(str(tensor.file), "pt") as weights:
            data = weights.get_tensor(tensor.source).to(torch.float32).numpy()
        writer.write_tensor_data(converted(tensor, data, config, type_name))
        if n % 50 == 0 or n == len(planned):
            yield f"{n}/{len(planned)} tensors written"
    writer.close()
