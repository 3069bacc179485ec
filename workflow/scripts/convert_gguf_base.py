"""Convert a GGUF base model (llama.cpp's format) into a Hugging Face folder, once, for every stage to read.

    convert_gguf_base.py --gguf model.Q4_K_M.gguf --out resources/models/gguf/model.Q4_K_M

The weights are dequantized to bf16 (a 7B Q4 file becomes a 13.5 GB folder: LoRA then trains on the
dequantized weights); the tokenizer's special tokens and whether it adds a BOS come from the GGUF's
metadata (mcqa.gguf_base).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from mcqa.gguf_base import convert
from mcqa.storage import disk_full_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary, parameters = convert(args.gguf, args.out)
    except ValueError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        shutil.rmtree(args.out, ignore_errors=True)
        if message := disk_full_message(exc, args.out):
            print(f"ERROR {message}", file=sys.stderr)
            return 1
        raise
    size = sum(f.stat().st_size for f in args.out.iterdir())
    types = ", ".join(f"{count} {name}" for name, count in sorted(summary.tensor_types.items()))
    print(f"{args.gguf}: {summary.architecture}, {parameters:,} parameters ({types}) dequantized to bf16 in "
          f"{time.perf_counter() - start:.0f} s; {size / 1e9:.2f} GB in {args.out}\n"
          f"special tokens from the GGUF's metadata: {summary.special_ids}; adds a BOS: {summary.add_bos}; "
          f"chat template: {'yes' if summary.chat_template else 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
