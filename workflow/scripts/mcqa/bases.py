"""What a base model's tokenizer files need to load, told from the files alone (no transformers import),
so that the config check can say it before any job runs and the model stages can say it when loading fails."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

# Python package -> the module that proves it is installed.
MODULES = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf", "tiktoken": "tiktoken"}


def tokenizer_packages(folder: str | Path) -> list[str]:
    """The packages beyond `tokenizers` that loading this folder's tokenizer takes.

    A tokenizer.json loads with `tokenizers` alone. Without one, transformers
    converts what is there: a SentencePiece tokenizer.model (Chinese-LLaMA-2,
    Llama 2, Mistral, Breeze) needs sentencepiece and protobuf; a tiktoken
    file (Meta's original Llama-3 release, Qwen 1) needs tiktoken.
    """
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return []
    vocabularies = [folder / "tokenizer.model", *sorted(folder.glob("*.tiktoken"))]
    for path in filter(Path.is_file, vocabularies):
        with open(path, "rb") as fh:
            start = fh.read(64)
        if path.suffix == ".tiktoken" or re.match(rb"[A-Za-z0-9+/=]+ \d+\n", start):
            return ["tiktoken"]
        return ["sentencepiece", "protobuf"]
    return []


def has_tokenizer(folder: str | Path) -> bool:
    """Whether the folder holds a tokenizer's vocabulary in any form transformers reads."""
    folder = Path(folder)
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
    return any((folder / name).is_file() for name in names) or any(folder.glob("*.tiktoken"))


def missing_packages(packages: list[str]) -> list[str]:
    """Those of `packages` that this Python cannot import."""
    missing = []
    for package in packages:
        try:
            importlib.import_module(MODULES[package])
        except ImportError:
            missing.append(package)
    return missing


def install_hint(base: str, missing: list[str]) -> str:
    """What to tell a user whose base needs packages that are not installed."""
    tokenizer = "a tiktoken file" if missing == ["tiktoken"] else "a SentencePiece tokenizer.model"
    return (f"the tokenizer of base_model {base} is {tokenizer} with no tokenizer.json, and loading it needs "
            f"{' and '.join(missing)}, which this Python lacks: pip install {' '.join(missing)} "
            "(requirements.txt pins sentencepiece and protobuf; `make run` installs them)")


# The input embedding and output layer under the names of the architectures users fine-tune.
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")


def tied_embeddings(folder: str | Path) -> bool:
    """Whether a local base's config.json ties its input and output embeddings (Qwen2.5 up to 3B, Llama-3.2
    1B and 3B, Gemma)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return bool(config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings")))


def tied_modules_refused(base: str, modules_to_save: list[str]) -> str | None:
    """Why training `modules_to_save` in full cannot work on a base with tied embeddings, or None."""
    named = [m for m in modules_to_save if m.split(".")[-1] in EMBEDDING_MODULES]
    if not named:
        return None
    return (f"modules_to_save {named} on base_model {base}, whose input and output embeddings are one tied "
            "weight: training a full copy of one unties them, and no merged checkpoint of the tied base holds "
            "what was trained (lm_head is not even stored). Leave modules_to_save empty (LoRA on the "
            "projections is what this task trains), or use a base with untied embeddings (7B and larger).")
