"""Attention over packed rows, registered with transformers as PACKED_ATTENTION: sequences lie end to end in
one row with no padding, and each token attends only within its own sequence (in scoring, also to the kept
keys and values of the prefixes the sequence continues: PrefixCache). Training and scoring both use it."""

from __future__ import annotations

import contextlib
import functools
import inspect
from itertools import accumulate
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface


PACKED_ATTENTION = "packed_varlen"


class PrefixCache:
    """Keys and values of the packed passes over a group of prompts, for the later passes whose sequences
    continue them (the questions of an article after its instruction and article, then each question's
    option orders after its question).

    Passed to the decoder as `prefix_cache`, it reaches packed_attention in every layer, which keeps each
    pass's keys and values. With `levels` set (continuation's), the pass's tokens also attend to the
    prefixes they continue in earlier passes: one attention call a level, whose queries are all the
    tokens of the sequences that share a prefix, and whose keys are that prefix's, each only once.
    """

    def __init__(self):
        self.passes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.levels: list[dict] = []

    @torch.compiler.disable
    def keep(self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keep `module`'s layer's keys and values of this pass, (tokens, heads, dim) each; returns the
        earlier passes' in order.

        Kept out of compiled graphs (benchmarks/scoring_kernels.py compiles scoring's layers): its
        dictionary differs by layer, which would make the compiler trace every layer again."""
        kept = self.passes.setdefault(module.layer_idx, [])
        kept.append((key, value))
        return kept[:-1]


def continuation(prefixes: Sequence[Sequence[tuple[int, range]]], lengths: Sequence[int]) -> list[dict]:
    """How a packed pass continues earlier ones: its sequence n (of lengths[n] tokens) follows the tokens
    of prefixes[n], each a (pass, range of that pass's tokens), at most one a pass.

    Returns PrefixCache's levels, one for each earlier pass the sequences continue: which of this pass's
    tokens attend to it (`queries`, None for all), which of its tokens they read (`keys`, None for the
    first `key_tokens`: then they are read in place), and how the queries fall into blocks, each
    attending to one prefix (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k), as CPU tensors
    and ints.
    """
    starts = [0, *accumulate(lengths)]
    levels = []
    for earlier in sorted({p for spans in prefixes for p, span in spans if span}):
        queries, keys, query_lengths, key_lengths, previous = [], [], [], [], None
        for n, spans in enumerate(prefixes):
            span = next((s for p, s in spans if p == earlier and s), None)
            if span is not None:
                queries += range(starts[n], starts[n + 1])
                if span == previous:  # the next sequence on the same prefix: the same block
                    query_lengths[-1] += lengths[n]
                else:
                    query_lengths.append(lengths[n])
                    key_lengths.append(len(span))
                    keys += span
            previous = span
        levels.append({
            "pass": earlier, "queries": None if len(queries) == starts[-1] else torch.tensor(queries),
            "keys": None if keys == list(range(len(keys))) else torch.tensor(keys), "key_tokens": len(keys),
            "cu_seq_lens_q": torch.tensor([0, *query_lengths]).cumsum(0).to(torch.int32),
            "cu_seq_lens_k": torch.tensor([0, *key_lengths]).cumsum(0).to(torch.int32),
            "max_length_q": max(query_lengths), "max_length_k": max(key_lengths)})
    return levels


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
                     prefix_cache: PrefixCache | None = None, sliding_window: int | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sequence of a packed row (an AttentionInterface function).

    Sequences lie end to end in one row (query, key, value of shape (1,
    heads, tokens, dim)); `cu_seq_lens_q` holds where each starts, with the
    total last. A layer with a `sliding_window` (Gemma's local layers) lets
    a token see only the keys less than that many places back, as
    transformers' own masks do. With a `prefix_cache` whose levels are set,
    each sequence also attends to the whole of the prefixes it continues,
    and the parts are merged by their log-sum-exp (merge_attention): the
    attention over its prefixes' keys followed by its own, causal within
    its own. A prefix is read whole, past any window: only sequences that
    fit the window with their prefixes may continue one (mcqa.scoring
    scores longer prompts whole). Returns (1, tokens, heads, dim).
    """
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"{PACKED_ATTENTION} attention needs one packed row and cu_seq_lens_q (a packed training "
                         "micro-batch or scoring row); other batches use sdpa")
    if dropout:
        raise ValueError(f"{PACKED_ATTENTION} attention has no attention dropout; this model asks for {dropout}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 states under half-precision autocast (norms kept in fp32 next to an 8-bit base):
        # attention runs in the autocast type, as SDPA would (and the kept keys are kept in it).
        q, k, v = (t.to(torch.get_autocast_dtype("cuda")) for t in (q, k, v))
    earlier = prefix_cache.keep(module, k, v) if prefix_cache is not None else []
    levels = prefix_cache.levels if prefix_cache is not None else []
    # A window no shorter than the longest sequence hides nothing.
    window = sliding_window if sliding_window is not None and sliding_window < max_length_q else None
    out, lse = varlen_attention(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scaling,
                                causal=True, with_lse=bool(levels), window=window)
    for level in levels:
        keys, values = (t[: level["key_tokens"]] if level["keys"] is None else t[level["keys"]]
                        for t in earlier[level["pass"]])
        rows = level["queries"]
        part, part_lse = varlen_attention(q if rows is None else q[rows], keys, values, level["cu_seq_lens_q"],
                                          level["cu_seq_lens_k"], level["max_length_q"], level["max_length_k"],
                                          scaling, causal=False, with_lse=True)
        merge_attention(out, lse, part, part_lse, rows)
    return out.unsqueeze(0), None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, scaling: float | None, causal: bool,
                     with_lse: bool, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each block of queries (cu_q) over its block of keys (cu_k), causal aligned at the end
    of the keys or full, (tokens, heads, dim) in and out; with `with_lse` also the log-sum-exp of each
    query's scores, (tokens, heads) in fp32. A causal `window` (no log-sum-exp) lets each query see the
    keys fewer than `window` places back.

    On a GPU in half precision, torch's variable-length flash-attention kernel does all blocks in one call;
    elsewhere (a CPU, or fp32) they are laid out as right-padded rows (what the tests compare against
    padded batches on the CPU).
    """
    gqa = k.shape[1] != q.shape[1]
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        if with_lse:
            return padded_rows_attention_with_lse(q, k, v, cu_q, cu_k, max_q, max_k, scaling, causal, window)
        return padded_rows_attention(q, k, v, cu_q, max_q, scaling, gqa, window), None
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    options = {"window_size": (-1 if window is None else window - 1, 0) if causal else (-1, -1)}
    if gqa and varlen_takes_gqa():
        options["enable_gqa"] = True
    elif gqa:  # torch before 2.13 has no grouped-query flag: each key-value head serves its group
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if scaling is not None and scaling != q.shape[-1] ** -0.5:  # the default scale needs no argument
        options["scale"] = scaling
    if not with_lse:
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options), None
    out, lse = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=AuxRequest(lse=True), **options)
    return out, lse.transpose(0, 1)  # flash attention's (heads, tokens)


@functools.cache
def varlen_takes_gqa() -> bool:
    """Whether this torch's varlen_attn has the grouped-query flag (2.13 on; asked once, off the hot path)."""
    from torch.nn.attention.varlen import varlen_attn

    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def merge_attention(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor,
                    rows: torch.Tensor | None) -> None:
    """Attention over two sets of keys from attention over each: `out` and `lse` (over the first set,
    (tokens, heads, dim) and (tokens, heads)) become, in place at `rows` (all if None), the attention over
    both, with `part` and `part_lse` over the second. Each part is weighted by its share of the joint
    softmax denominator, exp(its lse - the joint lse), kept in fp32: in half precision a weight near 1
    would lose the small other share (a lerp with half-precision weights doubled the error of
    benchmarks/scoring_check.py's packed scores)."""
    mine, mine_lse = (out, lse) if rows is None else (out[rows], lse[rows])
    joint = torch.logaddexp(mine_lse, part_lse)
    mine.mul_((mine_lse - joint).exp().unsqueeze(-1)).addcmul_(part, (part_lse - joint).exp().unsqueeze(-1))
    if rows is None:
        lse.copy_(joint)
    else:
        out[rows], lse[rows] = mine, joint


def padded_rows(t: torch.Tensor, cu: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences of a packed (tokens, heads, dim) tensor as right-padded rows, (rows, heads, width,
    dim), and each token's place in the flattened rows (to take them back)."""
    lengths = cu.diff()
    row = torch.repeat_interleave(torch.arange(len(lengths), device=t.device), lengths)
    slot = row * width + torch.arange(len(row), device=t.device) - cu[row]
    padded = t.new_zeros(len(lengths) * width, *t.shape[1:]).index_copy(0, slot, t)
    return padded.view(len(lengths), width, *t.shape[1:]).transpose(1, 2), slot


def padded_rows_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_length: int,
                          scaling: float | None, gqa: bool, window: int | None = None) -> torch.Tensor:
    """Causal attention within each packed sequence without a varlen kernel: each sequence as a
    right-padded row, one SDPA call. The padding needs no mask (pad_right's reasoning: causal attention
    never reads a row's padding); a `window` masks the keys `window` or more places back."""
    rows_q, slot = padded_rows(q, cu, max_length)
    rows_k, rows_v = (padded_rows(t, cu, max_length)[0] for t in (k, v))
    mask = None
    if window is not None:
        back = torch.arange(max_length, device=q.device)[:, None] - torch.arange(max_length, device=q.device)
        mask = (back >= 0) & (back < window)
    out = F.scaled_dot_product_attention(rows_q, rows_k, rows_v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).reshape(-1, *q.shape[1:])[slot]


def padded_rows_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                                   cu_k: torch.Tensor, max_q: int, max_k: int, scaling: float | None,
                                   causal: bool, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """varlen_attention's result and log-sum-exp without a varlen kernel, written out (SDPA does not
    return the log-sum-exp): each block as a right-padded row, the padded keys masked."""
    rows_q, slot = padded_rows(q, cu_q, max_q)
    rows_k, rows_v = (padded_rows(t.repeat_interleave(q.shape[1] // k.shape[1], dim=1), cu_k, max_k)[0]
                      for t in (k, v))
    scores = rows_q @ rows_k.transpose(-1, -2) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    key = torch.arange(max_k, device=q.device)
    visible = key[None, None, :] < cu_k.diff()[:, None, None]  # (rows, 1, keys)
    if causal:  # query i sees the keys up to its own place counted from the end of its block's keys
        shift = (cu_k.diff() - cu_q.diff())[:, None, None]
        back = torch.arange(max_q, device=q.device)[None, :, None] + shift - key[None, None, :]
        visible = visible & (back >= 0) & (back < (window or max_k))
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = scores.float().logsumexp(-1)
    out = ((scores - lse[..., None]).exp().to(q.dtype) @ rows_v).transpose(1, 2).reshape(-1, *q.shape[1:])[slot]
    return out, lse.transpose(1, 2).reshape(-1, q.shape[1])[slot]


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
