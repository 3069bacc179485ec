"""What a base model's tokenizer files need to load, told from the files alone (no transformers import),
so that the config check can say it before any job runs and the model stages can say it when loading fails."""

from __future__ import annotations

import importlib
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
