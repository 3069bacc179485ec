"""Deterministic scoring: the log-probability of each answer digit at the answer position."""

from __future__ import annotations

import sys
import time

import torch

from .modeling import load_model, load_tokenizer, pad_right, resolve_precision
from .progress import Meter
from .prompt import ANSWER_SUFFIX_TOKENS, answer_token_ids, encode_prompt


def encode_all(tokenizer, records: list[dict], max_seq_length: int) -> tuple[list[list[int]], int]:
    """Prompt ids of every record (cut exactly as in training) and how many were cut."""
    encoded, cut = [], 0
    for r in records:
        ids, truncated = encode_prompt(tokenizer, r["instruction"], r["input"], max_seq_length - ANSWER_SUFFIX_TOKENS)
        encoded.append(ids)
        cut += truncated
    return encoded, cut


@torch.inference_mode()
def answer_log_probs(model, tokenizer, encoded: list[list[int]], batch_size: int, meter: Meter | None = None) -> torch.Tensor:
    """(N, 4) log-probabilities over the whole vocabulary of '1'..'4' after each prompt.

    Prompts are sorted by length and padded on the right (no attention mask
    needed, see pad_right), so a batch carries little padding and a row's
    logits do not depend on its neighbours. Only the answer position goes
    through the output layer.
    """
    answers = torch.tensor(answer_token_ids(tokenizer))
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


def score_records(model_path: str, records: list[dict], max_seq_length: int, settings: dict,
                  trust_remote_code: bool = False) -> tuple[torch.Tensor, Meter]:
    """Load a merged model as the answering settings say and score every record: (N, 4) log-probs."""
    start = time.perf_counter()
    precision = resolve_precision(settings["precision"])
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    model = load_model(model_path, precision, settings["load_in"], trust_remote_code).eval()
    encoded, cut = encode_all(tokenizer, records, max_seq_length)
    print(f"{len(records)} questions, {cut} with the article cut to {max_seq_length} tokens; "
          f"precision {precision}, loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    meter = Meter(len(records), "questions")
    return answer_log_probs(model, tokenizer, encoded, settings["batch_size"], meter), meter
