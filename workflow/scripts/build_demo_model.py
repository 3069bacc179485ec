"""Build the offline demo base model: a tokenizer trained on the training
articles and a small randomly initialised LlamaForCausalLM, saved as a normal
Hugging Face checkpoint (safetensors shards + tokenizer files).

    build_demo_model.py --train results/data/train.json --out resources/models/demo --settings '{...}'
"""

from __future__ import annotations

import argparse
import json
import sys

from mcqa.demo_model import build_model, train_tokenizer
from mcqa.prompt import ANSWER_CUE, INSTRUCTION, answer_token_ids
from mcqa.records import read_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True, help="train.json whose articles train the tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", required=True, help="JSON of the config's demo_model block")
    args = parser.parse_args(argv)
    settings = json.loads(args.settings)

    records = read_records(args.train, "labelled")
    texts = [INSTRUCTION + ANSWER_CUE] + [r["input"] for r in records]
    tokenizer = train_tokenizer(texts, settings["vocab_size"])
    answer_token_ids(tokenizer)  # fail here, not in training, if digits are not single tokens
    model = build_model(
        vocab_size=len(tokenizer),
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_layers=settings["num_layers"],
        num_heads=settings["num_heads"],
        seed=settings["seed"],
    )
    # Small shards on purpose: the merge stage streams shard by shard, and the
    # demo exercises that path.
    model.save_pretrained(args.out, max_shard_size="300KB")
    tokenizer.save_pretrained(args.out)
    print(
        f"demo model: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tokenizer)}, "
        f"saved to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
