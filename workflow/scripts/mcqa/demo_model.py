"""A small model of random weights and a tokenizer trained on the data: the workflow's offline demo base
(build_demo_model.py) and the 7B shape the GPU benchmarks time (any size, from toy to 7B)."""

from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_token_length: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (never an unknown character) with every digit its own token.

    max_token_length (in bytes) caps merges, e.g. 6 for at most two Chinese
    characters a token as in general-purpose Chinese vocabularies.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=max_token_length,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    wrapped.padding_side = "right"
    return wrapped


def build_model(vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                seed: int, max_positions: int = 4096, dtype: torch.dtype = torch.float32,
                device: str = "cpu", init_std: float = 0.2) -> LlamaForCausalLM:
    """A Llama-architecture model with random weights (any size, from toy to 7B).

    The demo's init_std is wider than the usual 0.02 so that a frozen random
    output layer can still give peaked answer probabilities once LoRA moves
    the hidden state; a 7B-shaped model wants the usual 0.02.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        # Ids of <s>, </s>, <pad> in the order SPECIAL_TOKENS gives them to the tokenizer.
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model
