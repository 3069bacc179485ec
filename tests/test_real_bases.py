"""Prompts on the real tokenizers of the bases users fine-tune (../shared/tokenizers): every prompt is the
one-pass encoding of its text, chat prompts are the template's own turns, and cuts keep whole characters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (REAL_TOKENIZERS, REPO, SAMPLE, SCRIPTS, SHARED_DATA, SHARED_TOKENIZERS, run_script,
                      sample_workdir, snakemake, training_defaults)

from mcqa.modeling import load_tokenizer
from mcqa.prompt import (ANSWER_SUFFIX_TOKENS, ANSWERS, ARTICLE_CUT, ARTICLE_MARKER, FIXED_CLOCK, INSTRUCTION,
                         OPTIONS_MARKER, QUESTION_CUT, build_input, encode_prompt, encode_training_example,
                         numbered_options, prompt_frame, rotate_input, split_input)
from mcqa.records import read_records
from mcqa.scoring import encode_all

# SmolLM2-135M-Instruct's tokenizer as the GGUF conversion writes it (conftest's smollm2): byte-level BPE with
# a ChatML template whose BOS it never adds itself.
GGUF_TOKENIZERS = {"smollm2-gguf": {"formats": ("plain", "chat")}}
CASES = [pytest.param(name, fmt, id=f"{name}-{fmt}") for name, spec in {**REAL_TOKENIZERS, **GGUF_TOKENIZERS}.items()
         for fmt in spec["formats"]]
# Characters that Chinese-LLaMA-2's vocabulary spells as several byte tokens (byte fallback), between
# common ones: a cut by tokens could end inside one of them.
RARE = "龘靐鱻犇骉麤𠀋"


@pytest.fixture(scope="module")
def tokenizers(request):
    loaded = {}

    def get(name):
        if name in GGUF_TOKENIZERS:
            folder = request.getfixturevalue("smollm2")
        elif not (folder := SHARED_TOKENIZERS / name).is_dir():
            pytest.skip(f"real tokenizer folder {folder} is absent")
        if name not in loaded:
            loaded[name] = load_tokenizer(str(folder))
        return loaded[name]

    return get


def record(article: str, question: str = "小明住在哪裡？", options=("臺北", "臺中", "高雄", "2013"), label=2) -> dict:
    return {"instruction": INSTRUCTION, "input": build_input(article, question, list(options)), "options": list(options),
            "label": label}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    """The bundled sample's training records, a slice of the real data when it is there, and made-up ones
    with long articles, rare characters and an empty option."""
    tmp = tmp_path_factory.mktemp("records")
    made = [record("小明住在臺中，每天騎腳踏車上學。"), record("短文。", options=("甲", "乙", "丙", "")),
            record(("他說：「" + RARE + "是罕見字。」") * 40, label=4), record("長文章。" * 400, label=1)]
    sources = [SAMPLE / "train.xlsx"] + ([SHARED_DATA / "AI.xlsx"] if (SHARED_DATA / "AI.xlsx").exists() else [])
    for n, source in enumerate(sources):
        prepared = run_script("prepare_data.py", "train", "--input", source, "--train-out", tmp / f"t{n}.json",
                              "--val-out", tmp / f"v{n}.json", "--report-out", tmp / f"r{n}.json",
                              "--val-fraction", "0")
        assert prepared.returncode == 0, prepared.stderr
        made += read_records(tmp / f"t{n}.json", "labelled")[:60]
    return made


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_parts(frame, r: dict) -> tuple[str, str, str]:
    """What a prompt's text must start with, the article body that may be cut, and what it must end with."""
    article, rest = split_input(r["input"])
    head, tail = frame.text(INSTRUCTION, f"{ARTICLE_MARKER}\x00{rest}").split("\x00")
    return head, article[len(ARTICLE_MARKER):], tail


@pytest.mark.parametrize("name, prompt_format", CASES)
@pytest.mark.parametrize("max_seq_length", [512, 160])
def test_training_example_is_the_one_pass_encoding_of_its_text(tokenizers, records, name, prompt_format,
                                                               max_seq_length):
    """No separately encoded pieces: the ids are what the tokenizer gives the whole (possibly cut) text
    at once, which decodes to exactly that text, with only the article's end cut, at a character."""
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, prompt_format)
    cuts = 0
    for r in records:
        ids, labels, cut = encode_training_example(tokenizer, r["instruction"], r["input"], r["label"], max_seq_length,
                                                   frame)
        assert len(ids) <= max_seq_length
        if cut == QUESTION_CUT:  # a long real question and options fill 160 tokens (tested below)
            assert max_seq_length == 160
            cuts += 1  # SmolLM2's chat prompt spends 160 tokens before the article: every cut is one of these
            continue
        assert ids[-ANSWER_SUFFIX_TOKENS:] == [frame.answer_ids[r["label"] - 1], frame.end_id]
        assert labels == [-100] * (len(ids) - 2) + ids[-2:]
        prompt = ids[len(frame.bos_ids): -ANSWER_SUFFIX_TOKENS]
        assert ids[: len(frame.bos_ids)] == list(frame.bos_ids)
        text = tokenizer.decode(prompt)
        assert prompt == encode(tokenizer, text), "not the one-pass encoding of its own text"
        head, body, tail = prompt_parts(frame, r)
        assert text.startswith(head) and text.endswith(tail), text[-200:]
        kept = text[len(head): len(text) - len(tail)]
        assert body.startswith(kept) and "\ufffd" not in text, "the article was cut inside a character"
        assert (kept != body) == (cut == ARTICLE_CUT)
        cuts += cut == ARTICLE_CUT
    assert cuts >= (2 if max_seq_length == 160 else 1)


@pytest.mark.parametrize("name, prompt_format", CASES)
def test_scoring_prompt_is_the_training_example_up_to_the_digit(tokenizers, records, name, prompt_format):
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, prompt_format)
    for shift in range(4):
        prompts = encode_all(tokenizer, records, 256, shift, frame)
        for r, prompt in zip(records, prompts):
            rotated = rotate_input(r["input"], r["options"], shift)
            label = (r["label"] - 1 - shift) % 4 + 1  # where the right option is shown in this order
            ids, _, cut = encode_training_example(tokenizer, r["instruction"], rotated, label, 256, frame)
            assert prompt.ids == ids[:-ANSWER_SUFFIX_TOKENS] and prompt.cut == cut


@pytest.mark.parametrize("name", [name for name, spec in {**REAL_TOKENIZERS, **GGUF_TOKENIZERS}.items()
                                  if "chat" in spec["formats"]])
def test_chat_example_is_the_templates_own_rendering_of_the_answer_turn(tokenizers, records, name):
    """[user: instruction and input, assistant: 答案：N] as the chat template writes it, tokenized in one
    pass, up to the template's own end-of-turn token (not the tokenizer's eos, which often differs)."""
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, "chat")
    for r in records:
        ids, _, cut = encode_training_example(tokenizer, r["instruction"], r["input"], r["label"], 4096, frame)
        assert cut is None
        conversation = [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"},
                        {"role": "assistant", "content": f"答案：{r['label']}"}]
        rendered = encode(tokenizer, tokenizer.apply_chat_template(conversation, tokenize=False, **FIXED_CLOCK))
        end = rendered.index(frame.end_id, len(ids) - 2)
        assert rendered[: end + 1] == ids
    assert tokenizer.convert_ids_to_tokens(frame.end_id) == {"llama-3": "<|eot_id|>", "qwen2.5-instruct": "<|im_end|>",
                                                             "smollm2-gguf": "<|im_end|>"}[name]


@pytest.mark.parametrize("name, prompt_format", CASES)
def test_answers_are_four_distinct_single_tokens_after_the_cue(tokenizers, name, prompt_format):
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, prompt_format)
    assert [tokenizer.decode([i]) for i in frame.answer_ids] == list(ANSWERS)
    for digit, answer_id in zip(ANSWERS, frame.answer_ids):
        text = frame.text(INSTRUCTION, record("短文。")["input"])
        assert encode(tokenizer, text + digit) == encode(tokenizer, text) + [answer_id]


@pytest.mark.parametrize("name, prompt_format", CASES)
def test_tokenizer_saved_with_adapter_and_merged_model_encodes_the_same(tokenizers, records, tmp_path, name,
                                                                        prompt_format):
    """train_lora saves the tokenizer beside the adapter; the merge copies the base's files, then the
    adapter's: both reload to the same prompts, token for token."""
    from merge_lora import copy_side_files

    tokenizer = tokenizers(name)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    tokenizer.save_pretrained(adapter)
    merged.mkdir()
    copy_side_files(Path(tokenizer.name_or_path), adapter, merged)  # the base folder it was loaded from
    expected = [p.ids for p in encode_all(tokenizer, records, 256, frame=prompt_frame(tokenizer, prompt_format))]
    for folder in (adapter, merged):
        reloaded = load_tokenizer(str(folder))
        frame = prompt_frame(reloaded, prompt_format)
        assert frame == prompt_frame(tokenizer, prompt_format)
        assert [p.ids for p in encode_all(reloaded, records, 256, frame=frame)] == expected


@pytest.mark.parametrize("name, prompt_format", CASES)
def test_long_article_is_cut_at_a_character_keeping_question_options_and_cue(tokenizers, name, prompt_format):
    """Every budget from tight to loose, on an article of rare characters that byte-fallback tokenizers
    spell as several tokens each: never a partial character, the question part always whole."""
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, prompt_format)
    r = record(("古書記載" + RARE + "等字。") * 12)
    head, body, tail = prompt_parts(frame, r)
    shortest = len(encode_prompt(tokenizer, INSTRUCTION, build_input("", "小明住在哪裡？", r["options"]), 10**6,
                                 frame).ids)
    for budget in range(shortest, shortest + 120, 3):
        prompt = encode_prompt(tokenizer, INSTRUCTION, r["input"], budget, frame)
        assert len(prompt.ids) <= budget and prompt.cut == ARTICLE_CUT
        text = tokenizer.decode(prompt.ids[len(frame.bos_ids):])
        assert text.startswith(head) and text.endswith(tail) and "\ufffd" not in text
        assert body.startswith(text[len(head): len(text) - len(tail)])
        assert prompt.ids[len(frame.bos_ids):] == encode(tokenizer, text)


@pytest.mark.parametrize("name, prompt_format", CASES)
def test_prompt_that_cannot_fit_its_question_says_so(tokenizers, name, prompt_format):
    tokenizer = tokenizers(name)
    frame = prompt_frame(tokenizer, prompt_format)
    r = record("短文。", question="很長的問題？" * 50)
    prompt = encode_prompt(tokenizer, INSTRUCTION, r["input"], 64, frame)
    assert prompt.cut == QUESTION_CUT and len(prompt.ids) == 64
    assert tokenizer.decode(prompt.ids).endswith(OPTIONS_MARKER + numbered_options(r["options"]) + frame.after)


def test_chat_frame_does_not_depend_on_the_day(tokenizers, monkeypatch):
    """A Llama-3.1-style template prints today's date: the frame is the same on the day of training and
    on the day of answering."""
    import datetime

    import transformers.utils.chat_template_utils as templates

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 5, 4)

    tokenizer = tokenizers("llama-3")
    template = tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template.replace("{% set loop_messages = messages %}", (
        "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}"
        "{{ bos_token }}System date: {{ date_string }}, {{ strftime_now('%Y-%m-%d') }}\n"
        "{% set loop_messages = messages %}")).replace("{% set content = bos_token + content %}", ""))
    today = prompt_frame(tokenizer, "chat")
    monkeypatch.setattr(templates, "datetime", Later)
    assert prompt_frame(tokenizer, "chat") == today
    assert "System date: 26 Jul 2024, 2024-07-26\n" in today.before


def test_config_check_names_the_base_and_the_packages_a_sentencepiece_tokenizer_needs(real_base, tmp_path,
                                                                                    monkeypatch):
    """Chinese-LLaMA-2 ships only tokenizer.model: without sentencepiece (here hidden from the workflow's
    Python) the config check fails before any job, naming the base and what to install."""
    base = real_base("chinese-llama-2")
    blocker = tmp_path / "blocker"
    (blocker / "sentencepiece").mkdir(parents=True)
    (blocker / "sentencepiece" / "__init__.py").write_text("raise ImportError(\"No module named 'sentencepiece'\")\n")
    workdir = sample_workdir(tmp_path / "work", base_model=str(base))
    with monkeypatch.context() as hidden:
        hidden.setenv("PYTHONPATH", str(blocker))
        result = snakemake(workdir, "-n", check=False)
        loading = subprocess.run([sys.executable, "-c", "from mcqa.modeling import load_tokenizer; "
                                  f"load_tokenizer({str(base)!r})"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{SCRIPTS}"})
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"base_model {base}" in output, output[-2000:]
    assert "SentencePiece tokenizer.model" in output and "pip install sentencepiece" in output
    assert not (workdir / "results").exists()
    # A hub id is checked only when training loads it: the same advice then, not transformers' tiktoken hint.
    assert "TokenizerError" in loading.stderr and "pip install sentencepiece" in loading.stderr
    assert snakemake(workdir, "-n").returncode == 0, "with sentencepiece and protobuf installed the base is accepted"
    assert json.loads((base / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"


# The whole workflow on the bundled sample with a real tokenizer: the recipe's base in plain format, and an
# instruction-tuned base (tied embeddings, as Qwen2.5 up to 3B) in chat format.
REAL_RUNS = {"chinese-llama-2": "plain", "qwen2.5-instruct": "chat"}


@pytest.fixture(scope="module")
def real_run(real_base, tmp_path_factory):
    """name -> the workdir of a finished workflow run on that real tokenizer (each run once per test run)."""
    finished = {}

    def get(name):
        if name not in finished:
            workdir = sample_workdir(tmp_path_factory.mktemp(f"run-{name}"), base_model=str(real_base(name)),
                                     prompt_format=REAL_RUNS[name], training={"logging_steps": 1, "eval_steps": 2})
            snakemake(workdir, "results/default/answers.csv", "results/default/metrics.json")
            finished[name] = workdir
        return finished[name]

    return get


@pytest.mark.parametrize("name", REAL_RUNS)
def test_whole_workflow_runs_on_a_real_tokenizer(real_run, name):
    import csv

    workdir = real_run(name)
    test = read_records(workdir / "results/data/test.json", "test")
    with open(workdir / "results/default/answers.csv", encoding="utf-8") as fh:
        answers = list(csv.DictReader(fh))
    assert [a["ID"] for a in answers] == [r["id"] for r in test] and {a["Answer"] for a in answers} <= set(ANSWERS)
    metrics = json.loads((workdir / "results/default/metrics.json").read_text())
    assert metrics["questions"] == len(read_records(workdir / "results/data/val.json", "labelled")) > 0
    log = (workdir / "logs/default/train_lora.log").read_text()
    assert f'"prompt_format": "{REAL_RUNS[name]}"' in log and "WARNING" not in log


@pytest.mark.parametrize("name", REAL_RUNS)
def test_adapter_and_merged_tokenizers_prompt_as_the_base_does(real_run, real_base, name):
    workdir = real_run(name)
    records = read_records(workdir / "results/data/test.json", "test")
    prompts = {}
    for folder in (real_base(name), workdir / "results/default/adapter", workdir / "results/default/merged"):
        tokenizer = load_tokenizer(str(folder))
        prompts[folder] = [p.ids for p in encode_all(tokenizer, records, 512, 1, prompt_frame(tokenizer, REAL_RUNS[name]))]
    assert len(set(map(str, prompts.values()))) == 1


# Each example config in resources/configs/ and the real tokenizer of the base it names.
EXAMPLE_CONFIGS = {"chinese-llama-2.yaml": "chinese-llama-2", "llama-3-instruct.yaml": "llama-3",
                   "qwen2.5-instruct.yaml": "qwen2.5-instruct"}


def test_every_example_config_is_checked():
    assert sorted(p.name for p in (REPO / "resources/configs").glob("*.yaml")) == sorted(EXAMPLE_CONFIGS)


@pytest.mark.parametrize("config_name, name", EXAMPLE_CONFIGS.items())
def test_example_config_plans_the_workflow_for_its_base(real_base, tmp_path, config_name, name):
    """`snakemake -n --configfile resources/configs/X.yaml`, its base_model replaced by a tiny base of the
    same tokenizer and its data by the sample: the config validates and every run is planned."""
    example = yaml.safe_load((REPO / "resources/configs" / config_name).read_text())
    workdir = sample_workdir(tmp_path, base_model=str(real_base(name)))
    result = snakemake(workdir, "-n", "-p", configfiles=(str(REPO / "resources/configs" / config_name), "config.yaml"))
    trainings = [line for line in result.stdout.splitlines() if "train_lora.py --train" in line]
    assert len(trainings) == len(example["runs"])
    assert all(f"--prompt-format {example['prompt_format']}" in line for line in trainings)


@pytest.mark.parametrize("modules", [["lm_head"], ["embed_tokens"]])
def test_full_copies_of_tied_embeddings_are_refused_before_training(real_base, tmp_path, modules):
    """On a base with tied embeddings, a trained lm_head cannot be merged and a trained embed_tokens would
    also replace the output layer: the merged model would not be the trained one."""
    tied = real_base("qwen2.5-instruct")
    result = snakemake(sample_workdir(tmp_path / "tied", base_model=str(tied), training={"modules_to_save": modules}),
                       "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"modules_to_save {modules} on base_model {tied}" in output, output[-2000:]
    assert "Leave modules_to_save empty" in output
    # A hub id is not read at config time: training refuses it once the model is loaded, before any step.
    (tmp_path / "train.json").write_text(json.dumps([{**record("短文。"), "output": "2"}], ensure_ascii=False))
    settings = {**training_defaults(), "modules_to_save": modules}
    trained = run_script("train_lora.py", "--train", tmp_path / "train.json", "--base-model", tied, "--out",
                         tmp_path / "adapter", "--log-jsonl", tmp_path / "log.jsonl", "--checkpoint-dir",
                         tmp_path / "checkpoints", "--settings", json.dumps(settings))
    assert trained.returncode == 2 and f"ERROR modules_to_save {modules}" in trained.stderr, trained.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()
    untied = real_base("llama-3")
    assert snakemake(sample_workdir(tmp_path / "untied", base_model=str(untied), training={"modules_to_save": modules}),
                     "-n", check=False).returncode == 0
