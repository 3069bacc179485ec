"""Deterministic scoring: the log-probability of each answer digit at the answer position,
optionally with the options shown in several cyclic orders (rotations) to cancel a label bias.

Prompts are packed end to end into rows of up to a token budget, with no
padding: position ids restart at each prompt and the variable-length
attention kernel that training uses keeps every token within its prompt
(mcqa.modeling.packed_attention; on a CPU the same function lays the prompts
out as padded rows). Only each prompt's last position goes through the
output layer. With several option orders, a question's shared part
(instruction, article, question) runs once, and all its orders' remaining
tokens then run together in one packed pass that attends to that part's
keys and values (PrefixCache).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .batching import first_fit
from .modeling import PACKED_ATTENTION, PrefixCache, attention_implementation, load_model, load_tokenizer, resolve_precision
from .progress import Meter
from .prompt import ANSWER_SUFFIX_TOKENS, ANSWERS, Prompt, PromptFrame, describe_cuts, encode_prompts, prompt_frame, \
    rotate_input, worst_cut

ROTATIONS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3)}  # answering.rotations -> shifts of the options


def encode_all(tokenizer, records: list[dict], max_seq_length: int, shift: int = 0,
               frame: PromptFrame | None = None) -> list[Prompt]:
    """The prompt of every record (cut exactly as in training), its options rotated by `shift`
    (plain format unless `frame` says otherwise)."""
    frame = frame or prompt_frame(tokenizer, "plain")
    texts = [rotate_input(r["input"], r["options"], shift) if shift else r["input"] for r in records]
    return encode_prompts(tokenizer, [r["instruction"] for r in records], texts, max_seq_length - ANSWER_SUFFIX_TOKENS,
                          frame)


def packed(sequences: Sequence[Sequence[int]], device: torch.device, starts: Sequence[int] | None = None) -> dict:
    """Token sequences end to end in one row, as the decoder takes them: ids, position ids (each sequence's
    counting on from `starts`, else from 0) and where each sequence begins (cu_seq_lens, total last)."""
    lengths = [len(s) for s in sequences]
    starts = starts or [0] * len(sequences)
    cumulative = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return {
        "input_ids": torch.tensor([t for s in sequences for t in s], dtype=torch.long, device=device)[None],
        "position_ids": torch.tensor([p for s, n in zip(starts, lengths) for p in range(s, s + n)],
                                     device=device)[None],
        "cu_seq_lens_q": cumulative.to(device), "cu_seq_lens_k": cumulative.to(device),
        "max_length_q": max(lengths), "max_length_k": max(lengths),
    }


def answer_scores(model, hidden: torch.Tensor, ends: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """(N, 4) log-probabilities over the whole vocabulary of the answer digits after the tokens at `ends`."""
    logits = model.get_output_embeddings()(hidden[0, ends.long()]).float()
    return torch.log_softmax(logits, dim=-1)[:, answer_ids]


@torch.inference_mode()
def answer_log_probs(model, encoded: list[list[int]], answer_ids: Sequence[int], batch_tokens: int,
                     meter: Meter | None = None) -> torch.Tensor:
    """(N, 4) log-probabilities over the whole vocabulary of the answer digits after each prompt, the
    prompts packed into rows of up to `batch_tokens` tokens (a longer prompt runs alone)."""
    decoder, device = model.get_decoder(), model.get_output_embeddings().weight.device
    answers = torch.tensor(answer_ids, device=device)
    lengths = [len(ids) for ids in encoded]
    result = torch.empty(len(encoded), len(answer_ids))
    with attention_implementation(model, PACKED_ATTENTION):
        for row in first_fit(sorted(range(len(encoded)), key=lambda i: -lengths[i]), lengths, len(encoded), batch_tokens):
            batch = packed([encoded[i] for i in row], device)
            hidden = decoder(**batch, use_cache=False).last_hidden_state
            result[row] = answer_scores(model, hidden, batch["cu_seq_lens_q"][1:] - 1, answers).cpu()
            if meter:
                meter.update(len(row))
    return result


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens a question's prompts in every option order have in common (at least one
    token is left to each, whose logits are the answer)."""
    length = 0
    for tokens in zip(*prompts):
        if len(set(tokens)) > 1:
            break
        length += 1
    return min(length, min(map(len, prompts)) - 1)


@torch.inference_mode()
def rotation_log_probs(model, prompts: dict[int, list[list[int]]], answer_ids: Sequence[int], batch_tokens: int,
                       meter: Meter | None = None) -> dict[int, torch.Tensor]:
    """For each shift, the (N, 4) log-probabilities that answer_log_probs gives its prompts, with the part
    of a question's prompts that every order shares (instruction, article, question) run once.

    Questions are taken in groups whose shared parts and remaining tokens (every order's options and
    answer cue) fit `batch_tokens`. A group's shared parts run as one packed row, keeping each layer's keys
    and values; then every order's remaining tokens of the group run as a second packed row, each
    attending to its question's shared keys and values and causally to itself, with positions continuing
    the shared part. The result is the full prompts' up to rounding.
    """
    shifts = list(prompts)
    decoder, device = model.get_decoder(), model.get_output_embeddings().weight.device
    answers = torch.tensor(answer_ids, device=device)
    first = prompts[shifts[0]]
    shared = [shared_prefix([prompts[k][i] for k in shifts]) for i in range(len(first))]
    cost = [len(first[i]) + sum(len(prompts[k][i]) - shared[i] for k in shifts[1:]) for i in range(len(first))]
    result = {k: torch.empty(len(first), len(answer_ids)) for k in shifts}
    with attention_implementation(model, PACKED_ATTENTION):
        for group in first_fit(sorted(range(len(first)), key=lambda i: -cost[i]), cost, len(first), batch_tokens):
            cache = PrefixCache()
            prefixes = [i for i in group if shared[i]]  # a prompt that lost its first tokens to fit shares none
            if prefixes:
                decoder(**packed([first[i][: shared[i]] for i in prefixes], device), prefix_cache=cache, use_cache=False)
            rests = [(k, i) for k in shifts for i in group]
            batch = packed([prompts[k][i][shared[i]:] for k, i in rests], device, starts=[shared[i] for _, i in rests])
            cache.continue_with(prefixes, shared, [i for _, i in rests], batch)
            hidden = decoder(**batch, prefix_cache=cache, use_cache=False).last_hidden_state
            scores = answer_scores(model, hidden, batch["cu_seq_lens_q"][1:] - 1, answers).cpu()
            for n, (k, i) in enumerate(rests):
                result[k][i] = scores[n]
            if meter:
                meter.update(len(rests))
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


def score_prompts(model, prompts: dict[int, list[Prompt]], answer_ids: Sequence[int], batch_tokens: int,
                  meter: Meter | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 4) log-probabilities of the records' options, combined over the option orders of `prompts`, and
    what each record's prompts lost to fit (the most in any order, see worst_cut)."""
    ids = {shift: [p.ids for p in encoded] for shift, encoded in prompts.items()}
    if len(ids) == 1:
        scores = {0: answer_log_probs(model, ids[0], answer_ids, batch_tokens, meter)}
    else:
        scores = rotation_log_probs(model, ids, answer_ids, batch_tokens, meter)
    return combine_rotations(scores), [worst_cut(p.cut for p in orders) for orders in zip(*prompts.values())]


def score_rotations(model, tokenizer, records: list[dict], max_seq_length: int, batch_tokens: int, rotations: int,
                    meter: Meter | None = None, frame: PromptFrame | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 4) log-probabilities of the records' options, combined over `rotations` orders, and what each
    record's prompts lost to fit."""
    frame = frame or prompt_frame(tokenizer, "plain")
    return score_prompts(model, encode_rotations(tokenizer, records, max_seq_length, rotations, frame),
                         frame.answer_ids, batch_tokens, meter)


def score_records(model_path: str, records: list[dict], max_seq_length: int, settings: dict,
                  trust_remote_code: bool = False) -> tuple[torch.Tensor, dict]:
    """Load a merged model as the answering settings say and score every record.

    The prompts are encoded while the model loads. Returns (N, 4)
    log-probabilities over the four answers, in the records' own option
    order, combined over `settings["rotations"]` orders, and where the time
    went (seconds loading, encoding, scoring; questions/s while scoring).
    """
    start = time.perf_counter()
    precision = resolve_precision(settings["precision"])
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    frame = prompt_frame(tokenizer, settings["prompt_format"])
    with ThreadPoolExecutor(1) as pool:
        encoding = pool.submit(encode_rotations, tokenizer, records, max_seq_length, settings["rotations"], frame)
        model = load_model(model_path, precision, settings["load_in"], trust_remote_code).eval()
        loaded = time.perf_counter() - start
        prompts = encoding.result()
    print(f"{len(records)} questions x {settings['rotations']} option order(s), {settings['prompt_format']} prompts; "
          f"precision {precision}; model loaded in {loaded:.1f} s, prompts encoded by "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    encoded = time.perf_counter() - start
    meter = Meter(len(records) * settings["rotations"], "prompts")
    log_probs, cuts = score_prompts(model, prompts, frame.answer_ids, settings["batch_tokens"], meter)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    print(describe_cuts(cuts, [r.get("id", f"record {n}") for n, r in enumerate(records)], max_seq_length),
          file=sys.stderr, flush=True)
    scoring = time.perf_counter() - start - encoded
    return log_probs, {"questions": len(records), "rotations": settings["rotations"], "load_s": round(loaded, 2),
                       "ready_s": round(encoded, 2), "scoring_s": round(scoring, 2),
                       "questions_per_s": round(len(records) / max(scoring, 1e-9), 1)}
