"""How examples are cut into micro-batches: packed end to end (first-fit decreasing) or padded to similar
lengths, within a token budget. Training and scoring both use it."""

from __future__ import annotations

import math
import random


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
