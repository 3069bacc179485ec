"""The one place that defines what the model sees and what it must answer.

Data preparation builds the JSON `input` with `build_input`; training and
answering both turn a record into token ids with `encode_prompt`, so the text
the model is trained on up to the answer is, token for token, the text it is
asked about later.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

INSTRUCTION = (
    "請閱讀以下文章，並根據文章內容回答問題。"
    "從四個選項中選出正確答案，只回答選項編號（1、2、3 或 4）。"
)
ARTICLE_MARKER = "文章："
QUESTION_MARKER = "\n\n問題："
OPTIONS_MARKER = "\n選項："
ANSWER_CUE = "\n\n答案："
CHAT_ANSWER_CUE = "答案："  # opens the assistant turn of a chat prompt
ANSWERS = ("1", "2", "3", "4")
# Tokens appended after the prompt in training: the answer digit and EOS.
ANSWER_SUFFIX_TOKENS = 2


def numbered_options(options: Sequence[str]) -> str:
    """The options block of an input: one numbered line per option."""
    if len(options) != len(ANSWERS):
        raise ValueError(f"expected {len(ANSWERS)} options, got {len(options)}")
    return "".join(f"\n{n}. {text}" for n, text in zip(ANSWERS, options))


def build_input(article: str, question: str, options: Sequence[str]) -> str:
    """Join article, question and the four numbered options into the record's `input`."""
    return f"{ARTICLE_MARKER}{article}{QUESTION_MARKER}{question}{OPTIONS_MARKER}{numbered_options(options)}"


def rotate_input(text: str, options: Sequence[str], shift: int) -> str:
    """The input with its options rotated by `shift`: answer position j then shows option (j + shift) % 4.

    Only the options block changes; the article and question stay as they are.
    """
    block = numbered_options(options)
    if not text.endswith(block):
        raise ValueError("the record's input does not end with its options; rerun data preparation")
    rotated = list(options[shift:]) + list(options[:shift])
    return text[: len(text) - len(block)] + numbered_options(rotated)


def split_input(text: str) -> tuple[str, str]:
    """Split a record's `input` into the article part and the part that must never be cut.

    The split is at the last question marker, so an article that happens to
    contain the marker is at worst cut less, never split inside the options.
    """
    cut = text.rfind(QUESTION_MARKER)
    if cut < 0:
        return "", text
    return text[:cut], text[cut:]


def prompt_text(instruction: str, text: str) -> str:
    """The full prompt as a string (for people reading logs; the model gets `encode_prompt`)."""
    return f"{instruction}\n\n{text}{ANSWER_CUE}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_token_ids(tokenizer) -> list[int]:
    """Token id of each answer digit as it follows the answer cue.

    Fails with a clear message when a digit is not a single token after the
    cue, because then neither training nor scoring could use one position.
    """
    cue = _encode(tokenizer, ANSWER_CUE)
    ids = []
    for digit in ANSWERS:
        full = _encode(tokenizer, ANSWER_CUE + digit)
        if len(full) != len(cue) + 1 or full[: len(cue)] != cue:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} does not encode the answer "
                f"{digit!r} as one token after {ANSWER_CUE!r} (got {full} after {cue}); "
                "use a base model whose tokenizer splits digits into single tokens (Llama, Mistral, Qwen do)"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer tokens are not distinct: {ids}")
    return ids


class PromptFrame(NamedTuple):
    """What surrounds instruction and input: text before them, text after the options up to the
    answer digit, and whether the tokenizer's BOS token goes first."""

    before: str
    after: str
    bos: bool


PLAIN = PromptFrame("", ANSWER_CUE, True)
PROMPT_FORMATS = ("plain", "chat")


def prompt_frame(tokenizer, prompt_format: str) -> PromptFrame:
    """The frame of a prompt format: `plain` as the recipe, or `chat`: the tokenizer's own chat template,
    instruction and input as the user turn, the answer cue opening the assistant turn."""
    if prompt_format == "plain":
        return PLAIN
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format: chat, but the tokenizer of {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template; use prompt_format: plain, or an instruction-tuned base that ships one"
        )
    marker = "\x00USER_TURN\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    before, after = rendered.split(marker)
    return PromptFrame(before, after + CHAT_ANSWER_CUE, False)  # a template writes its own BOS


def encode_prompt(tokenizer, instruction: str, text: str, max_tokens: int,
                  frame: PromptFrame = PLAIN) -> tuple[list[int], bool]:
    """Token ids of the prompt, at most `max_tokens` long, and whether the article was cut.

    Only the article is cut (from its end); instruction, question, options
    and answer cue are kept whole. If even those do not fit, the
    oldest tokens of the question part go, which the caller counts as a cut.
    """
    article_part, question_part = split_input(text)
    head = _encode(tokenizer, f"{frame.before}{instruction}\n\n")
    article = _encode(tokenizer, article_part)
    tail = _encode(tokenizer, f"{question_part}{frame.after}")
    bos = [tokenizer.bos_token_id] if frame.bos and tokenizer.bos_token_id is not None else []
    budget = max_tokens - len(bos) - len(head) - len(tail)
    if len(article) <= budget:
        return bos + head + article + tail, False
    if budget >= 0:
        return bos + head + article[:budget] + tail, True
    return (bos + head + tail)[-max_tokens:], True


def encode_training_example(
    tokenizer, instruction: str, text: str, answer: int, max_seq_length: int, answer_ids: Sequence[int],
    frame: PromptFrame = PLAIN,
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) for one labelled record; the loss sees only answer and EOS."""
    prompt, truncated = encode_prompt(tokenizer, instruction, text, max_seq_length - ANSWER_SUFFIX_TOKENS, frame)
    target = [answer_ids[answer - 1], tokenizer.eos_token_id]
    return prompt + target, [-100] * len(prompt) + target, truncated
