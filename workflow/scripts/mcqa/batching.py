"""How examples are cut into micro-batches: packed end to end (first-fit decreasing) or padded to similar
lengths, within a token budget (training and scoring both cut so), and how training serves and collates
them."""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch

from .modeling import pad_right


def micro_batches(lengths: list[int], max_examples: int, max_tokens: int, seed: int, packed: bool = False,
                  group: int = 1024, multiple_of: int = 8) -> list[list[int]]:
    """Example indices cut into micro-batches of at most `max_examples` examples and `max_tokens` tokens.

    The examples are shuffled (seeded) and taken in groups of `group`, each
    group sorted longest first and cut by first_fit (packed) or
    similar_lengths (padded). 0 tokens means no token limit; an example
    longer than `max_tokens` trains alone.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        longest_first = sorted(order[start : start + group], key=lambda i: -lengths[i])
        if packed:
            batches += first_fit(longest_first, lengths, max_examples, max_tokens)
        else:
            batches += similar_lengths(longest_first, lengths, max_examples, max_tokens, multiple_of)
    return batches


def first_fit(longest_first: list[int], lengths: list[int], max_examples: int, max_tokens: int) -> list[list[int]]:
    """Each example into the first micro-batch with room for its tokens (first-fit decreasing):
    packed micro-batches come out nearly full."""
    batches: list[list[int]] = []
    room: list[float] = []
    for i in longest_first:
        fits = (b for b, free in enumerate(room) if lengths[i] <= free and len(batches[b]) < max_examples)
        if (b := next(fits, None)) is None:
            batches.append([])
            room.append(max_tokens or math.inf)
            b = len(batches) - 1
        batches[b].append(i)
        room[b] -= lengths[i]
    return batches


def similar_lengths(longest_first: list[int], lengths: list[int], max_examples: int, max_tokens: int,
                    multiple_of: int) -> list[list[int]]:
    """Cut greedily: a micro-batch closes when one more example would make it exceed `max_tokens`
    once padded to its longest example, so examples of similar length share a padded batch."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in longest_first:
        width = -(-lengths[batch[0] if batch else i] // multiple_of) * multiple_of
        if batch and (len(batch) == max_examples or (max_tokens and (len(batch) + 1) * width > max_tokens)):
            batches.append(batch)
            batch = []
        batch.append(i)
    return batches + [batch]


def divisible(batches: list[list[int]], processes: int) -> list[list[int]]:
    """The micro-batches, their number made a multiple of `processes` by halving the largest.

    Each process of a data-parallel training takes every processes-th
    micro-batch; a number that does not divide would make the sampler train
    some micro-batches twice to give every process as many steps. Halving
    keeps every example trained exactly once per epoch. Only when every
    micro-batch holds one example does the number stay as it is.
    """
    batches = [list(b) for b in batches]
    while len(batches) % processes and (largest := max(batches, key=len)) and len(largest) > 1:
        batches.remove(largest)
        batches += [largest[: len(largest) // 2], largest[len(largest) // 2:]]
    return batches


class MicroBatchDataset(torch.utils.data.Dataset):
    """Training features served one whole micro-batch at a time.

    The Trainer shuffles the micro-batches (seeded) every epoch; their
    composition is fixed once, by micro_batches().
    """

    def __init__(self, features: list[dict], batches: list[list[int]]):
        self.features, self.batches = features, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.features[i] for i in self.batches[index]]


class AnswerOnlyCollator:
    """Collates a micro-batch and asks the model for logits only where the loss is.

    The loss sees only answer and EOS, so projecting every prompt position onto
    the vocabulary (and upcasting those logits to fp32) would be wasted work
    and memory. `logits_to_keep` takes the positions that predict a label, and
    `shift_labels` gives the target at those positions (-100 where a row has
    none).

    Padded, examples are right-padded rows: right padding, as in answering,
    leaves no fully masked attention rows, which can turn half-precision
    gradients into NaN, and makes the attention mask unnecessary (pad_right).
    Packed, they lie end to end in one row with no padding at all: position
    ids restart at each example, and `cu_seq_lens_q`/`_k` (where each example
    starts) reach mcqa.attention.packed_attention, so no token attends across
    examples. Either way the loss and gradients are the same (tests/test_packing.py).
    The attention mask (all ones when packed) is only for the Trainer's count
    of real tokens.
    """

    def __init__(self, pad_token_id: int, packed: bool = False, multiple_of: int = 8):
        self.pad_token_id, self.packed, self.multiple_of = pad_token_id, packed, multiple_of

    def __call__(self, features: list) -> dict:
        if isinstance(features[0], list):  # one micro-batch from MicroBatchDataset
            features = [f for batch in features for f in batch]
        if self.packed:
            batch, targets = self.pack(features)
        else:
            batch = {key: pad_right([f[key] for f in features], value, self.multiple_of)
                     for key, value in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100))}
            targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
        keep = (targets != -100).any(dim=0).nonzero().flatten()
        if any("teacher_probs" in f for f in features):  # distillation: each example's teacher, NaN for none
            batch["teacher_probs"] = torch.tensor([f.get("teacher_probs") or [math.nan] * 4 for f in features])
        return {**batch, "logits_to_keep": keep, "shift_labels": targets[:, keep]}

    @staticmethod
    def pack(features: list[dict]) -> tuple[dict, torch.Tensor]:
        """One row of the examples end to end, and each token's target (its example's next label)."""

        def row(values) -> torch.Tensor:
            return torch.tensor([v for vs in values for v in vs], dtype=torch.long).unsqueeze(0)

        packed = packed_row([f["input_ids"] for f in features])
        batch = {
            **packed,
            "attention_mask": row(f["attention_mask"] for f in features),
            "labels": row(f["labels"] for f in features),
        }
        return batch, row(f["labels"][1:] + [-100] for f in features)


def packed_row(sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> dict:
    """Token sequences end to end in one row, as the decoder and packed_attention take them (training's
    micro-batches, scoring's passes): ids, position ids (each sequence counting on from `starts`, else
    from 0), where each sequence begins (cu_seq_lens_q, total last) and the longest (max_length_q)."""
    lengths = [len(s) for s in sequences]
    starts = starts or [0] * len(sequences)
    return {"input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.long)[None],
            "position_ids": torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)])[None],
            "cu_seq_lens_q": torch.tensor([0, *lengths]).cumsum(0).to(torch.int32), "max_length_q": max(lengths)}
