"""Deterministic scoring: the log-probability of each answer digit at the answer position,
optionally with the options shown in several cyclic orders (rotations) to cancel a label bias.

Prompts are packed end to end into rows of up to a token budget, with no
padding: position ids restart at each prompt and the variable-length
attention kernel that training uses keeps every token within its prompt
(mcqa.attention.packed_attention; on a CPU the same function lays the prompts
out as padded rows). Only each prompt's last position goes through the
output layer. The prompts of a group share their leading tokens: a question's
option orders share the instruction, article and question, and the questions
of one article share the instruction and the article. That shared part runs
once, and the rest of every prompt of the group then runs in a second packed
pass that attends to its keys and values (PrefixCache).
"""

from __future__ import annotations

from typing import Hashable, Iterator, Sequence

import torch

from .batching import first_fit, packed_row
from .attention import PACKED_ATTENTION, PrefixCache, attention_implementation, continuation
from .progress import Meter
from .prompt import ANSWER_SUFFIX_TOKENS, ANSWERS, Prompt, PromptFrame, encode_prompts, prompt_frame, \
    rotate_input, split_input, worst_cut

ROTATIONS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3)}  # answering.rotations -> shifts of the options


def encode_all(tokenizer, records: list[dict], max_seq_length: int, shift: int = 0,
               frame: PromptFrame | None = None) -> list[Prompt]:
    """The prompt of every record (cut exactly as in training), its options rotated by `shift`
    (plain format unless `frame` says otherwise)."""
    frame = frame or prompt_frame(tokenizer, "plain")
    texts = [rotate_input(r["input"], r["options"], shift) if shift else r["input"] for r in records]
    return encode_prompts(tokenizer, [r["instruction"] for r in records], texts, max_seq_length - ANSWER_SUFFIX_TOKENS,
                          frame)


def pinned(row: dict) -> dict:
    """A packed row's tensors in pinned memory (on a CUDA machine), for a copy that does not stop the host."""
    return {k: v.pin_memory() if torch.is_tensor(v) and torch.cuda.is_available() else v for k, v in row.items()}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens a group of prompts has in common (at least one token is left to each,
    whose logits are the answer)."""
    length = 0
    for tokens in zip(*prompts):
        if len(set(tokens)) > 1:
            break
        length += 1
    return min(length, min(map(len, prompts)) - 1)


def sliding_window(model) -> int | None:
    """The attention window of a model whose layers (some or all) see only the last so many tokens
    (Gemma 2 and 3, Mistral 7B v0.1), else None."""
    window = getattr(model.config, "sliding_window", None)
    layer_types = getattr(model.config, "layer_types", None)
    return None if layer_types is not None and "sliding_attention" not in layer_types else window


def packed_passes(prompts: dict[int, list[list[int]]], members: dict[Hashable, list[int]], batch_tokens: int,
                  window: int | None = None) -> Iterator[tuple[list[tuple[dict, list[dict]]], list[tuple[int, int]]]]:
    """Each group of groups that fits `batch_tokens` as its packed rows (pinned CPU tensors, each with how
    it continues the rows before it: continuation's levels, see shared_prefix_log_probs) and the (shift,
    question) of each sequence of its last row. A group with a prompt longer than a sliding `window` shares
    nothing: its prompts are scored whole. A generator: the host lays out the next groups while the GPU
    runs these."""
    shifts, keys = list(prompts), list(members)
    share = [window is None or max(len(prompts[k][i]) for i in members[g] for k in shifts) <= window for g in keys]
    article = [shared_prefix([prompts[k][i] for i in members[g] for k in shifts]) * share[n] for n, g in enumerate(keys)]
    question = {}  # question -> the end of the part its orders share (after its group's)
    for n, g in enumerate(keys):
        question.update({i: max(article[n], shared_prefix([prompts[k][i] for k in shifts]) * share[n])
                         for i in members[g]})
    cost = [article[n] + sum(question[i] - article[n] + sum(len(prompts[k][i]) - question[i] for k in shifts)
                             for i in members[g]) for n, g in enumerate(keys)]
    for chunk in first_fit(sorted(range(len(keys)), key=lambda n: -cost[n]), cost, len(keys), batch_tokens):
        passes = []  # (packed row, how it continues the passes before it)
        spans, own = {}, {}  # group -> its article part in its pass; question -> its question part in its pass
        articles = [n for n in chunk if article[n]]
        if articles:
            article_pass, taken = len(passes), 0
            for n in articles:
                spans[n], taken = (article_pass, range(taken, taken + article[n])), taken + article[n]
            passes.append((packed_row([prompts[shifts[0]][members[keys[n]][0]][: article[n]] for n in articles]), []))
        questions = [(n, i) for n in chunk for i in members[keys[n]] if question[i] > article[n]]
        if questions:
            question_pass, taken = len(passes), 0
            lengths = [question[i] - article[n] for n, i in questions]
            for (n, i), length in zip(questions, lengths):
                own[i], taken = (question_pass, range(taken, taken + length)), taken + length
            passes.append((packed_row([prompts[shifts[0]][i][article[n]: question[i]] for n, i in questions],
                                      starts=[article[n] for n, _ in questions]),
                           continuation([[spans[n]] if n in spans else [] for n, _ in questions], lengths)))
        rests = [(n, k, i) for n in chunk for i in members[keys[n]] for k in shifts]
        passes.append((packed_row([prompts[k][i][question[i]:] for n, k, i in rests],
                                  starts=[question[i] for _, _, i in rests]),
                       continuation([[s for s in (spans.get(n), own.get(i)) if s is not None] for n, _, i in rests],
                                    [len(prompts[k][i]) - question[i] for n, k, i in rests])))
        yield [(pinned(ids), [pinned(level) for level in levels]) for ids, levels in passes], \
            [(k, i) for _, k, i in rests]


@torch.inference_mode()
def shared_prefix_log_probs(model, prompts: dict[int, list[list[int]]], answer_ids: Sequence[int], batch_tokens: int,
                            groups: Sequence[Hashable] | None = None, meter: Meter | None = None) -> dict[int, torch.Tensor]:
    """For each option order (shift), the (N, 4) log-probabilities over the whole vocabulary of the answer
    digits after each of its N prompts, with the leading tokens that prompts share run once.

    The questions that `groups` gives the same key (by default each alone) share the leading tokens of all
    their prompts (an article's instruction and article); a question's orders share theirs (its question).
    Groups are taken together while their tokens fit `batch_tokens` (a larger group runs alone) and run in
    three packed rows: the groups' shared parts, then the questions' shared parts, then every prompt's
    rest, each row attending to the keys and values of the parts before it (PrefixCache: each part's keys
    read once for all the sequences that continue it) and causally to itself, with positions continuing
    them. The result is that of one full pass per prompt, up to rounding. With a model's sliding window,
    the groups with a prompt longer than it are scored as whole prompts (a prefix's keys would be seen past
    the window).
    """
    decoder, device = model.get_decoder(), model.get_output_embeddings().weight.device
    answers = torch.tensor(answer_ids, device=device)
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups if groups is not None else range(len(next(iter(prompts.values()))))):
        members.setdefault(key, []).append(i)
    scores, where = [], []
    with attention_implementation(model, PACKED_ATTENTION):
        for rows, order in packed_passes(prompts, members, batch_tokens, sliding_window(model)):
            cache = PrefixCache()
            for ids, levels in rows:
                batch, cache.levels = to_device(ids, device), [to_device(level, device) for level in levels]
                hidden = decoder(**batch, prefix_cache=cache, use_cache=False).last_hidden_state
            ends = batch["cu_seq_lens_q"][1:].long() - 1
            scores.append(torch.log_softmax(model.get_output_embeddings()(hidden[0, ends]).float(), dim=-1)[:, answers])
            where += order
            if meter:
                meter.update(len(order))
    result = {k: torch.empty(len(prompts[k]), len(answer_ids)) for k in prompts}
    for (k, i), row in zip(where, torch.cat(scores).cpu()):
        result[k][i] = row
    return result


def combine_rotations(log_probs: dict[int, torch.Tensor]) -> torch.Tensor:
    """(N, 4) log-probabilities of the original options from each shift's (N, 4) scores.

    Under shift k answer position j shows option (j + k) % 4, so option i
    was scored at position (i - k) % 4. Each shift's scores are first
    renormalised over the four answers; the shifts are then combined by
    the mean of log-probabilities (a renormalised geometric mean): a
    constant preference for an answer position adds the same amount to
    every option once over the four shifts, so it cancels exactly, which a
    mean of probabilities would only dampen.
    """
    n = len(ANSWERS)
    aligned = []
    for shift, scores in log_probs.items():
        within = scores.log_softmax(dim=-1)
        aligned.append(within[:, [(i - shift) % n for i in range(n)]])
    return torch.stack(aligned).mean(dim=0).log_softmax(dim=-1)


def encode_rotations(tokenizer, records: list[dict], max_seq_length: int, rotations: int,
                     frame: PromptFrame) -> dict[int, list[Prompt]]:
    """Every record's prompt in each of the `rotations` option orders."""
    return {shift: encode_all(tokenizer, records, max_seq_length, shift, frame) for shift in ROTATIONS[rotations]}


def score_prompts(model, records: list[dict], prompts: dict[int, list[Prompt]], answer_ids: Sequence[int],
                  batch_tokens: int, meter: Meter | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 4) log-probabilities of the records' options, combined over the option orders of `prompts`, and
    what each record's prompts lost to fit (the most in any order, see worst_cut). The questions of one
    article share its prompts' leading tokens."""
    ids = {shift: [p.ids for p in encoded] for shift, encoded in prompts.items()}
    articles = [split_input(r["input"])[0] for r in records]
    scores = shared_prefix_log_probs(model, ids, answer_ids, batch_tokens, articles, meter)
    return combine_rotations(scores), [worst_cut(p.cut for p in orders) for orders in zip(*prompts.values())]


def score_rotations(model, tokenizer, records: list[dict], max_seq_length: int, batch_tokens: int, rotations: int,
                    meter: Meter | None = None, frame: PromptFrame | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 4) log-probabilities of the records' options, combined over `rotations` orders, and what each
    record's prompts lost to fit."""
    frame = frame or prompt_frame(tokenizer, "plain")
    return score_prompts(model, records, encode_rotations(tokenizer, records, max_seq_length, rotations, frame),
                         frame.answer_ids, batch_tokens, meter)
