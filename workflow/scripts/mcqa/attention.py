"""Attention over packed rows, registered with transformers as PACKED_ATTENTION: sequences lie end to end in
one row with no padding, and each token attends only within its own sequence (in scoring, also to the kept
keys and values of the prefixes the sequence continues: PrefixCache). Training and scoring both use it."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface


PACKED_ATTENTION = "packed_varlen"


class PrefixCache:
    """Keys and values of packed passes over shared prefixes, for later packed passes whose sequences each
    continue some of them (the questions of an article after its instruction and article, then each
    question's option orders after its question).

    Passed to the decoder as `prefix_cache`, it reaches packed_attention in every layer, which keeps each
    pass's keys and values; once `index` is set (see continuation), each sequence attends over the kept
    tokens of its prefixes followed by its own.
    """

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.index: torch.Tensor | None = None

    @torch.compiler.disable
    def keys_values(self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `module`'s layer for attention, (tokens, heads, dim) each: the pass's own
        until an index is set, each sequence's prefixes and its own after; the pass's own are kept either way.

        Kept out of compiled graphs (benchmarks/scoring_kernels.py compiles scoring's layers): its
        dictionaries differ by layer, which would make the compiler trace every layer again."""
        layer = module.layer_idx
        if layer in self.keys:
            self.keys[layer], self.values[layer] = torch.cat([self.keys[layer], key]), torch.cat([self.values[layer], value])
        else:
            self.keys[layer], self.values[layer] = key, value
        if self.index is None:
            return key, value
        return self.keys[layer][self.index], self.values[layer][self.index]


def continuation(prefixes: Sequence[Sequence[range]], lengths: Sequence[int], offset: int) -> dict:
    """How a packed pass continues earlier ones: its sequence n (of lengths[n] tokens) follows the tokens
    of prefixes[n] (ranges in the numbering of every earlier pass's tokens, in order), and its own tokens
    are numbered from `offset` on.

    Returns PrefixCache's `index` and the keys' cu_seq_lens_k and max_length_k, as CPU tensors.
    """
    index, key_lengths, start = [], [], offset
    for spans, length in zip(prefixes, lengths):
        before = [t for span in spans for t in span]
        index += [*before, *range(start, start + length)]
        key_lengths.append(len(before) + length)
        start += length
    return {"index": torch.tensor(index), "cu_seq_lens_k": torch.tensor([0, *key_lengths]).cumsum(0).to(torch.int32),
            "max_length_k": max(key_lengths)}


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                     max_length_q: int | None = None, max_length_k: int | None = None,
                     prefix_cache: PrefixCache | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a packed row (an AttentionInterface function).

    Sequences lie end to end in one row (query, key, value of shape (1,
    heads, tokens, dim)); `cu_seq_lens_q` holds where each starts, with the
    total last. With a `prefix_cache`, sequence n's keys are its prefix's and
    then its own (`cu_seq_lens_k`), the last query seeing every key: the
    causal mask is aligned at the end. On a GPU in half precision, torch's
    variable-length flash-attention kernel does all sequences in one call;
    elsewhere (a CPU, or fp32) they are laid out as right-padded rows for one
    SDPA call (what the tests compare against padded batches on the CPU).
    Returns (1, tokens, heads, dim).
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention needs one packed row and cu_seq_lens_q (a packed training "
                         "micro-batch or scoring row); other batches use sdpa")
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no attention dropout; this model asks for {dropout}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    continuing = prefix_cache is not None and prefix_cache.index is not None
    if prefix_cache is not None:
        k, v = prefix_cache.keys_values(module, k, v)
    if not continuing:  # the keys are the queries' own tokens
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 states under half-precision autocast (norms kept in fp32 next to an 8-bit base):
        # attention runs in the autocast type, as SDPA would.
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn

        options = {"window_size": (-1, 0)}  # causal, aligned at the end of each sequence's keys
        if gqa and "enable_gqa" in inspect.signature(varlen_attn).parameters:
            options["enable_gqa"] = True
        elif gqa:  # torch before 2.13 has no grouped-query flag: each key-value head serves its group
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        if scaling is not None and scaling != q.shape[-1] ** -0.5:  # the default scale needs no argument
            options["scale"] = scaling
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **options)
    else:
        out = padded_rows_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling, gqa,
                                    continuing)
    return out.unsqueeze(0), None


def padded_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                          max_q: int, max_k: int, scaling: float | None, gqa: bool, continuing: bool) -> torch.Tensor:
    """packed_attention without a varlen kernel: each sequence as a right-padded row, one SDPA call.

    Where queries and keys are the same tokens (training, a prefix pass), the
    padding needs no mask (pad_right's reasoning: causal attention never
    reads a row's padding); where a sequence's keys start with a prefix, the
    mask lets query i see keys up to i + (keys - queries).
    """
    def layout(t: torch.Tensor, cu: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = cu.diff()
        row = torch.repeat_interleave(torch.arange(len(lengths), device=t.device), lengths)
        slot = row * width + torch.arange(len(row), device=t.device) - cu[row]
        padded = t.new_zeros(len(lengths) * width, *t.shape[1:]).index_copy(0, slot, t)
        return padded.view(len(lengths), width, *t.shape[1:]).transpose(1, 2), slot

    rows_q, slot = layout(q, cu_q, max_q)
    rows_k, _ = layout(k, cu_k, max_k)
    rows_v, _ = layout(v, cu_k, max_k)
    if not continuing:
        out = F.scaled_dot_product_attention(rows_q, rows_k, rows_v, is_causal=True, scale=scaling, enable_gqa=gqa)
    else:
        shift = (cu_k.diff() - cu_q.diff())[:, None, None]
        mask = torch.arange(max_k, device=q.device)[None, None, :] <= torch.arange(max_q, device=q.device)[None, :, None] + shift
        out = F.scaled_dot_product_attention(rows_q, rows_k, rows_v, attn_mask=mask[:, None], scale=scaling,
                                             enable_gqa=gqa)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[slot]


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run `model` with another attention implementation inside the block (e.g. sdpa for
    scoring padded batches with a model that trains on packed ones)."""
    before = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
