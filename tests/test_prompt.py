"""Training and answering see the same prompt; truncation cuts only the article."""

from __future__ import annotations

import json

import pytest
from conftest import SAMPLE, run_script

from mcqa.modeling import load_tokenizer
from mcqa.prompt import (ANSWER_SUFFIX_TOKENS, ARTICLE_CUT, INSTRUCTION, answer_token_ids, build_input, encode_prompt,
                         encode_training_example, prompt_frame, split_input)
from mcqa.scoring import encode_all

DEMO_SETTINGS = '{"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "seed": 0}'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    prepared = run_script("prepare_data.py", "train", "--input", SAMPLE / "train.xlsx", "--train-out",
                          tmp / "train.json", "--val-out", tmp / "val.json", "--report-out", tmp / "r.json")
    assert prepared.returncode == 0, prepared.stderr
    built = run_script("build_demo_model.py", "--train", tmp / "train.json", "--out", tmp / "model",
                       "--settings", DEMO_SETTINGS)
    assert built.returncode == 0, built.stderr
    return load_tokenizer(str(tmp / "model"))


def record(article: str) -> dict:
    return {"instruction": INSTRUCTION, "input": build_input(article, "小明住在哪裡？", ["臺北", "臺中", "高雄", "2013"]),
            "label": 2}


# A Llama-3-style template, as instruction-tuned bases ship in tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(params=["plain", "chat"])
def frame(request, tokenizer):
    if request.param == "plain":
        yield prompt_frame(tokenizer, "plain")
        return
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        yield prompt_frame(tokenizer, "chat")
    finally:
        tokenizer.chat_template = None


def test_training_prompt_up_to_the_answer_is_the_answering_prompt(tokenizer, frame):
    answers = answer_token_ids(tokenizer)
    for article, max_len in [("小明住在臺中，每天騎腳踏車上學。", 512), ("很長的文章。" * 200, 128)]:
        r = record(article)
        ids, labels, _ = encode_training_example(tokenizer, r["instruction"], r["input"], r["label"], max_len, frame)
        ((prompt, _),) = encode_all(tokenizer, [r], max_len, frame=frame)
        assert ids[: len(prompt)] == prompt
        assert ids[len(prompt)] == answers[r["label"] - 1]
        assert labels == [-100] * len(prompt) + [answers[1], tokenizer.eos_token_id]
        assert len(ids) <= max_len


def test_chat_prompt_puts_the_question_in_the_user_turn_and_the_cue_in_the_assistant_turn(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        r = record("短文。")
        ids, _ = encode_prompt(tokenizer, r["instruction"], r["input"], 510, prompt_frame(tokenizer, "chat"))
    finally:
        tokenizer.chat_template = None
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        f"<s><|start_header_id|>user<|end_header_id|>\n\n{INSTRUCTION}\n\n{r['input']}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n答案：")


def test_chat_format_without_a_template_names_the_model(tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_frame(tokenizer, "chat")


def test_long_article_is_cut_but_question_and_options_stay(tokenizer):
    r = record("這是一篇非常長的文章。" * 300)
    frame = prompt_frame(tokenizer, "plain")
    ids, cut = encode_prompt(tokenizer, r["instruction"], r["input"], 200, frame)
    assert cut == ARTICLE_CUT and len(ids) <= 200
    text = tokenizer.decode(ids, skip_special_tokens=True)
    article, tail = split_input(r["input"])
    assert text.endswith(tail + "\n\n答案：")
    assert text.startswith(INSTRUCTION)
    kept = len(text) - len(f"{INSTRUCTION}\n\n{tail}\n\n答案：")
    longer = encode_prompt(tokenizer, r["instruction"], article[: kept + 1] + tail, 10**6, frame).ids
    assert len(longer) > 200, "the cut kept less of the article than fits"


def test_short_prompt_is_not_cut(tokenizer):
    r = record("短文。")
    ids, cut = encode_prompt(tokenizer, r["instruction"], r["input"], 512 - ANSWER_SUFFIX_TOKENS,
                             prompt_frame(tokenizer, "plain"))
    assert cut is None
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"{INSTRUCTION}\n\n{r['input']}\n\n答案："


def test_answers_are_four_distinct_single_tokens(tokenizer):
    ids = answer_token_ids(tokenizer)
    assert len(set(ids)) == 4
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4"]


def test_records_written_by_data_stage_use_the_prompt_module(tmp_path):
    out = tmp_path / "test.json"
    result = run_script("prepare_data.py", "test", "--input", SAMPLE / "test.xlsx", "--out", out,
                        "--report-out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    first = json.loads(out.read_text())[0]
    assert first["instruction"] == INSTRUCTION
    article, tail = split_input(first["input"])
    assert article.startswith("文章：") and tail.startswith("\n\n問題：")
