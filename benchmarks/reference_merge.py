"""The usual merge, for comparison: load the whole base, apply the adapter with
peft's merge_and_unload, save in 2 GB safetensors shards.

    python benchmarks/reference_merge.py BASE_DIR ADAPTER_DIR OUT_DIR
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> int:
    base, adapter, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, max_shard_size="2GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
