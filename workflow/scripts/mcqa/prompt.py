"""The one place that defines what the model sees and what it must answer.

Data preparation builds the JSON `input` with `build_input`; training and
answering both turn a record into token ids with `encode_prompt` under the
same `PromptFrame`, so the text the model is trained on up to the answer is,
token for token, the text it is asked about later.

A prompt is always the one-pass encoding of its whole text, as the tokenizer
encodes that string when given it at once (the recipe tokenized its prompt in
one pass). Encoding pieces separately and joining the ids would not be:
SentencePiece puts a "▁" before every piece, and byte-level BPE merges
differently at the seams. A prompt that is too long loses the end of its
article, cut by characters, and is encoded again in one pass.
"""

from __future__ import annotations

from datetime import datetime
from typing import Iterable, NamedTuple, Sequence

INSTRUCTION = (
    "請閱讀以下文章，並根據文章內容回答問題。"
    "從四個選項中選出正確答案，只回答選項編號（1、2、3 或 4）。"
)
ARTICLE_MARKER = "文章："
QUESTION_MARKER = "\n\n問題："
OPTIONS_MARKER = "\n選項："
ANSWER_CUE = "\n\n答案："
CHAT_ANSWER_CUE = "答案："  # opens the assistant's content in a chat prompt
ANSWERS = ("1", "2", "3", "4")
# Tokens appended after the prompt in training: the answer digit and the end token.
ANSWER_SUFFIX_TOKENS = 2
PROMPT_FORMATS = ("plain", "chat")
# What a prompt lost to fit its token budget (Prompt.cut).
ARTICLE_CUT, QUESTION_CUT = "article", "question"

# Chat templates that print today's date (Llama-3.1 and later call strftime_now or read
# date_string) get this fixed day, so a prompt is a function of the tokenizer alone and the
# same on the day of answering as on the day of training.
FIXED_DATE = datetime(2024, 7, 26)
FIXED_CLOCK = {"date_string": FIXED_DATE.strftime("%d %b %Y"), "strftime_now": FIXED_DATE.strftime}


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
    """The plain prompt as a string, as the recipe wrote it (the model gets `encode_prompt`)."""
    return f"{instruction}\n\n{text}{ANSWER_CUE}"


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def answer_token_ids(tokenizer, cue: str = ANSWER_CUE) -> tuple[int, ...]:
    """Token id of each answer digit as it follows `cue` (the end of the prompt).

    Fails with a clear message when a digit is not a single token after the
    cue, because then neither training nor scoring could use one position.
    """
    context = _encode(tokenizer, cue)
    ids = []
    for digit in ANSWERS:
        full = _encode(tokenizer, cue + digit)
        if len(full) != len(context) + 1 or full[: len(context)] != context:
            raise ValueError(
                f"tokenizer {_name(tokenizer)} does not encode the answer {digit!r} as one token after "
                f"{cue[-12:]!r} (got {full[-4:]} after {context[-3:]}); use a base model whose tokenizer splits "
                "digits into single tokens (Llama, Mistral, Qwen do)"
            )
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answer tokens are not distinct: {ids}")
    return tuple(ids)


class PromptFrame(NamedTuple):
    """How a record becomes token ids for one tokenizer and prompt format.

    The prompt is `bos_ids` (in plain format the special tokens the tokenizer
    adds before a text) and then the one-pass encoding of `before` +
    instruction + blank line + input + `after` (`after` ends with the answer
    cue); the user's part is stripped when the chat template strips it. A
    training example adds the answer digit's token (`answer_ids`) and `end_id`:
    EOS in plain format, in chat format the token that the template closes
    the assistant's turn with.
    """

    before: str
    after: str
    bos_ids: tuple[int, ...]
    end_id: int
    answer_ids: tuple[int, ...]
    strip_user: bool = False

    def text(self, instruction: str, text: str) -> str:
        """The prompt's text after `bos_ids`, encoded in one pass."""
        user = f"{instruction}\n\n{text}"
        return f"{self.before}{user.strip() if self.strip_user else user}{self.after}"


def prompt_frame(tokenizer, prompt_format: str) -> PromptFrame:
    """The frame of a prompt format for a tokenizer: `plain` as the recipe (BOS, the prompt, 答案：), or
    `chat`: the conversation [user: instruction and input, assistant: 答案：N] exactly as the tokenizer's
    chat template renders it."""
    if prompt_format == "plain":
        return PromptFrame("", ANSWER_CUE, leading_special_ids(tokenizer), tokenizer.eos_token_id,
                           answer_token_ids(tokenizer))
    if prompt_format != "chat":
        raise ValueError(f"prompt_format {prompt_format!r} is not one of {PROMPT_FORMATS}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt_format: chat, but the tokenizer of {_name(tokenizer)} has no chat template; use "
            "prompt_format: plain, or an instruction-tuned base that ships one"
        )
    # Sentinels as the two turns' contents: what the template writes around them is the frame.
    user, assistant = "\x00USER\x00", "\x00ASSISTANT\x00"

    def render(user_content: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_content}, {"role": "assistant", "content": assistant}],
            tokenize=False, **FIXED_CLOCK)

    rendered = render(user)
    if rendered.count(user) != 1 or rendered.count(assistant) != 1:
        raise ValueError(f"the chat template of {_name(tokenizer)} does not write a user and an assistant turn "
                         "around their contents; use prompt_format: plain")
    before, rest = rendered.split(user)
    opening, closing = rest.split(assistant)
    after = opening + CHAT_ANSWER_CUE
    return PromptFrame(before, after, (), end_of_turn(tokenizer, closing), answer_token_ids(tokenizer, after),
                       strip_user=f" {user} " not in render(f" {user} "))


def leading_special_ids(tokenizer) -> tuple[int, ...]:
    """The special tokens the tokenizer itself puts before a text (BOS for Llama 2 and 3, Gemma; none for
    Qwen2.5 or SmolLM2, whose BOS is a chat token they never add on their own)."""
    text, full = _encode(tokenizer, ANSWER_CUE), list(tokenizer(ANSWER_CUE)["input_ids"])
    start = next((k for k in range(len(full) - len(text) + 1) if full[k: k + len(text)] == text), 0)
    return tuple(full[:start])


def end_of_turn(tokenizer, closing: str) -> int:
    """The special token that a chat template writes first after the assistant's content (e.g. <|eot_id|>,
    <|im_end|>), or EOS when it writes none there."""
    closing = closing.lstrip()
    specials = sorted(tokenizer.get_added_vocab().items(), key=lambda item: -len(item[0]))
    return next((i for token, i in specials if closing.startswith(token)), tokenizer.eos_token_id)


class Prompt(NamedTuple):
    """A prompt's token ids, and what was cut to fit its budget: None, ARTICLE_CUT or QUESTION_CUT
    (not even the question and options fit, so the prompt lost its first tokens)."""

    ids: list[int]
    cut: str | None


def encode_prompts(tokenizer, instructions: Sequence[str], texts: Sequence[str], max_tokens: int,
                   frame: PromptFrame) -> list[Prompt]:
    """The prompt of each record, at most `max_tokens` tokens: the one-pass encoding of its text.

    Only the article is cut, from its end, by whole characters (never inside
    one), as much as is needed: the longest article that fits is found by
    bisection and the cut text is encoded again, so the ids are exactly the
    one-pass encoding of the cut text. Instruction, question, options and
    answer cue stay whole; when even they do not fit, the prompt keeps its
    last `max_tokens` tokens and says so (QUESTION_CUT). The records are
    encoded together, each round of the bisection in one call of the
    tokenizer (its own parallel batch); a record's prompt is the same alone.
    """
    parts = []
    for text in texts:
        article, rest = split_input(text)
        marker = ARTICLE_MARKER if article.startswith(ARTICLE_MARKER) else ""
        parts.append((marker, article[len(marker):], rest))

    def encode(wanted: dict[int, int]) -> dict[int, list[int]]:
        """Record -> the ids of its text with the first `wanted[record]` characters of its article."""
        order = list(wanted)
        batch = [frame.text(instructions[n], f"{parts[n][0]}{parts[n][1][: wanted[n]]}{parts[n][2]}") for n in order]
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"] if batch else []
        return {n: [*frame.bos_ids, *ids] for n, ids in zip(order, encoded)}

    whole = encode({n: len(parts[n][1]) for n in range(len(texts))})
    prompts: dict[int, Prompt] = {n: Prompt(ids, None) for n, ids in whole.items() if len(ids) <= max_tokens}
    best = {}  # record -> the longest fitting prompt found so far
    bounds = {}  # record -> (characters that fit, characters too many)
    for n, ids in encode({n: 0 for n in whole if n not in prompts}).items():
        if len(ids) > max_tokens:
            prompts[n] = Prompt(ids[-max_tokens:], QUESTION_CUT)
        else:
            best[n], bounds[n] = ids, (0, len(parts[n][1]))
    while searching := {n: (fits + too_long) // 2 for n, (fits, too_long) in bounds.items() if too_long - fits > 1}:
        for n, ids in encode(searching).items():
            fits, too_long = bounds[n]
            if len(ids) <= max_tokens:
                best[n], bounds[n] = ids, (searching[n], too_long)
            else:
                bounds[n] = (fits, searching[n])
    prompts.update({n: Prompt(ids, ARTICLE_CUT) for n, ids in best.items()})
    return [prompts[n] for n in range(len(texts))]


def encode_prompt(tokenizer, instruction: str, text: str, max_tokens: int, frame: PromptFrame) -> Prompt:
    """The prompt of one record (see encode_prompts)."""
    return encode_prompts(tokenizer, [instruction], [text], max_tokens, frame)[0]


def training_example(prompt: Prompt, answer: int, frame: PromptFrame) -> tuple[list[int], list[int], str | None]:
    """(input_ids, labels, cut) of a labelled record's prompt: the loss sees only the answer digit and the
    end token."""
    target = [frame.answer_ids[answer - 1], frame.end_id]
    return prompt.ids + target, [-100] * len(prompt.ids) + target, prompt.cut


def encode_training_example(tokenizer, instruction: str, text: str, answer: int, max_seq_length: int,
                            frame: PromptFrame) -> tuple[list[int], list[int], str | None]:
    """(input_ids, labels, cut) for one labelled record."""
    return training_example(encode_prompt(tokenizer, instruction, text, max_seq_length - ANSWER_SUFFIX_TOKENS, frame),
                            answer, frame)


def worst_cut(cuts: Iterable[str | None]) -> str | None:
    """The most that any of a record's prompts (its option orders) lost: QUESTION_CUT, ARTICLE_CUT or None."""
    cuts = set(cuts)
    return QUESTION_CUT if QUESTION_CUT in cuts else ARTICLE_CUT if ARTICLE_CUT in cuts else None


def describe_cuts(cuts: Sequence[str | None], names: Sequence[str], max_seq_length: int, shown: int = 10) -> str:
    """A log line saying how many prompts lost part of their article, and naming every one (up to `shown`)
    that lost part of its question or options, which only a larger max_seq_length can fix."""
    line = (f"{sum(c is not None for c in cuts)} of {len(cuts)} questions had their article cut to fit "
            f"max_seq_length {max_seq_length}")
    lost = [name for name, cut in zip(names, cuts) if cut == QUESTION_CUT]
    if lost:
        more = f" and {len(lost) - shown} more" if len(lost) > shown else ""
        line += (f"\nWARNING {len(lost)} of them did not fit even without their article and lost the start of "
                 f"the prompt (instruction, then question): {', '.join(map(str, lost[:shown]))}{more}; "
                 "raise training.max_seq_length")
    return line
