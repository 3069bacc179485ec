"""Write a merged checkpoint as a GGUF file for llama.cpp, Ollama and LM Studio (mcqa.gguf_export).

    export_gguf.py --model results/RUN/merged --type q8_0 --out results/RUN/model-q8_0.gguf

f16 and bf16 keep the merged weights as they are (bf16 exactly; f16 rounds them once more); q8_0 stores each
block of 32 weights as 8-bit integers and one scale: about half the size of f16, and lossy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mcqa.gguf_export import TYPES, ExportError, export
from mcqa.progress import say
from mcqa.storage import disk_full_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="a merged checkpoint (safetensors)")
    parser.add_argument("--type", required=True, choices=sorted(TYPES))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        for line in export(args.model, args.out, args.type):
            say(line)
    except ExportError as exc:
        args.out.unlink(missing_ok=True)
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        args.out.unlink(missing_ok=True)
        if message := disk_full_message(exc, args.out.parent):
            print(f"ERROR {message}", file=sys.stderr)
            return 1
        raise
    say(f"{args.out}: {args.out.stat().st_size / 1e9:.2f} GB ({args.type}) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
