"""Deterministic scoring: the log-probability of each answer digit at the answer position,
optionally with the options shown in several cyclic orders (rotations) to cancel a label bias."""

from __future__ import annotations

import sys
import time
from typing import Sequence

import torch

from .modeling import load_model, load_tokenizer, pad_right, resolve_precision
from .progress import Meter
from .prompt import (ANSWER_SUFFIX_TOKENS, ANSWERS, Prompt, PromptFrame, describe_cuts, encode_prompt, prompt_frame,
                     rotate_input, worst_cut)


ROTATIONS = {1: (0,), 2: (0, 2), 4: (0, 1, 2, 3)}  # answering.rotations -> shifts of the options


def encode_all(tokenizer, records: list[dict], max_seq_length: int, shift: int = 0,
               frame: PromptFrame | None = None) -> list[Prompt]:
    """The prompt of every record (cut exactly as in training), its options rotated by `shift`
    (plain format unless `frame` says otherwise)."""
    frame = frame or prompt_frame(tokenizer, "plain")
    return [encode_prompt(tokenizer, r["instruction"], rotate_input(r["input"], r["options"], shift) if shift
                          else r["input"], max_seq_length - ANSWER_SUFFIX_TOKENS, frame) for r in records]


@torch.inference_mode()
def answer_log_probs(model, tokenizer, encoded: list[list[int]], batch_size: int, meter: Meter | None = None,
                     answer_ids: Sequence[int] | None = None) -> torch.Tensor:
    """(N, 4) log-probabilities over the whole vocabulary of '1'..'4' after each prompt.

    Prompts are sorted by length and padded on the right (no attention mask
    needed, see pad_right), so a batch carries little padding and a row's
    logits do not depend on its neighbours. Only the answer position goes
    through the output layer.
    """
    answers = torch.tensor(answer_ids or prompt_frame(tokenizer, "plain").answer_ids)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    result = torch.empty(len(encoded), len(answers))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(encoded[i]) for i in rows])
        ids = pad_right([encoded[i] for i in rows], tokenizer.pad_token_id)
        hidden = decoder(input_ids=ids.to(device)).last_hidden_state
        last = hidden[torch.arange(len(rows), device=device), (lengths - 1).to(device)]
        log_probs = torch.log_softmax(head(last).float(), dim=-1)[:, answers.to(device)]
        result[rows] = log_probs.cpu()
        if meter:
            meter.update(len(rows))
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
def rotation_log_probs(model, tokenizer, prompts: dict[int, list[list[int]]], batch_size: int,
                       meter: Meter | None = None, answer_ids: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """For each shift, the (N, 4) log-probabilities that answer_log_probs gives its prompts, with the part
    of a question's prompts that every order shares (instruction, article, question) run once.

    The shared prefixes of a batch go through the model once, right-padded, keeping their key-value
    cache; each order's remaining tokens (the options and the answer cue) then attend to that cache,
    with the prefix padding masked and positions continuing each prefix, and the cache is cut back to
    the prefixes before the next order. The result is the full prompts' up to rounding.
    """
    from transformers import DynamicCache

    shifts = list(prompts)
    answers = torch.tensor(answer_ids or prompt_frame(tokenizer, "plain").answer_ids)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    first = prompts[shifts[0]]
    shared = [shared_prefix([prompts[k][i] for k in shifts]) for i in range(len(first))]
    order = sorted(range(len(first)), key=lambda i: (len(first[i]), i))
    result = {k: torch.empty(len(first), len(answers)) for k in shifts}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([shared[i] for i in rows])
        # At least one (masked) position: prompts that lost their first tokens to fit share no prefix.
        prefix = pad_right([first[i][: max(shared[i], 1)] for i in rows], tokenizer.pad_token_id)
        cache = DynamicCache()
        decoder(input_ids=prefix.to(device), past_key_values=cache, use_cache=True)
        width = prefix.shape[1]
        for k in shifts:
            rests = [prompts[k][i][shared[i] :] for i in rows]
            ids = pad_right(rests, tokenizer.pad_token_id)
            mask = torch.cat([torch.arange(width)[None, :] < lengths[:, None],
                              torch.ones(len(rows), ids.shape[1], dtype=torch.bool)], dim=1)
            positions = lengths[:, None] + torch.arange(ids.shape[1])[None, :]
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.long().to(device),
                             position_ids=positions.to(device), past_key_values=cache, use_cache=True).last_hidden_state
            last = hidden[torch.arange(len(rows), device=device), torch.tensor([len(r) - 1 for r in rests], device=device)]
            result[k][rows] = torch.log_softmax(head(last).float(), dim=-1)[:, answers.to(device)].cpu()
            cache.crop(-ids.shape[1])  # back to the shared prefixes
            if meter:
                meter.update(len(rows))
    return result


def score_rotations(model, tokenizer, records: list[dict], max_seq_length: int, batch_size: int, rotations: int,
                    meter: Meter | None = None, frame: PromptFrame | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(N, 4) log-probabilities of the records' options, combined over `rotations` orders, and what each
    record's prompts lost to fit (the most in any order, see worst_cut)."""
    frame = frame or prompt_frame(tokenizer, "plain")
    prompts = {shift: encode_all(tokenizer, records, max_seq_length, shift, frame) for shift in ROTATIONS[rotations]}
    ids = {shift: [p.ids for p in encoded] for shift, encoded in prompts.items()}
    if rotations == 1:
        scores = {0: answer_log_probs(model, tokenizer, ids[0], batch_size, meter, frame.answer_ids)}
    else:
        scores = rotation_log_probs(model, tokenizer, ids, batch_size, meter, frame.answer_ids)
    return combine_rotations(scores), [worst_cut(p.cut for p in orders) for orders in zip(*prompts.values())]


def score_records(model_path: str, records: list[dict], max_seq_length: int, settings: dict,
                  trust_remote_code: bool = False) -> tuple[torch.Tensor, Meter]:
    """Load a merged model as the answering settings say and score every record.

    Returns (N, 4) log-probabilities over the four answers, in the records'
    own option order, combined over `settings["rotations"]` orders.
    """
    start = time.perf_counter()
    precision = resolve_precision(settings["precision"])
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, precision, settings["load_in"], trust_remote_code).eval()
    print(f"{len(records)} questions x {settings['rotations']} option order(s), {settings['prompt_format']} prompts; "
          f"precision {precision}, "
          f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    meter = Meter(len(records) * settings["rotations"], "prompts")
    log_probs, cuts = score_rotations(model, tokenizer, records, max_seq_length, settings["batch_size"],
                                      settings["rotations"], meter, prompt_frame(tokenizer, settings["prompt_format"]))
    print(describe_cuts(cuts, [r.get("id", f"record {n}") for n, r in enumerate(records)], max_seq_length),
          file=sys.stderr, flush=True)
    return log_probs, meter
