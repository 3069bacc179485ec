"""Real pretrained weights on the CPU prove what the demo's random model cannot: SmolLM2-135M-Instruct and Gemma 3
270M from their GGUF files (tests/real_models.py), converted as the workflow converts a GGUF base; packed scoring
in four orders, a short training, the streaming merge and a fold model's scoring on real questions."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATA, needs_real_data, read_csv, real_gguf, run_script, training_defaults
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mcqa.gguf_base import SPECIAL_TOKEN_KEYS, converted_tokenizer, read_summary
from mcqa.history import read_history
from mcqa.modeling import load_tokenizer
from mcqa.prompt import prompt_frame, split_input
from mcqa.records import read_records
from mcqa.scoring import combine_rotations, encode_rotations, score_prompts

# How a fold model and a merged model are scored here: one option order (what is compared is the weights).
ANSWERING = {"batch_tokens": 4096, "precision": "fp32", "load_in": "none", "rotations": 1, "prompt_format": "chat",
             "fused_kernels": True}


def metadata(gguf) -> dict:
    """The GGUF's own key-value metadata, read with gguf-py's reader (not the workflow's summary of it)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    keys = [*SPECIAL_TOKEN_KEYS.values(), "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
    return {key: reader.fields[key].contents() for key in keys if key in reader.fields}


def test_smollm2_conversion_keeps_the_ggufs_special_tokens_template_and_bos_rule(smollm2):
    """transformers' own GGUF conversion says eos <|im_start|> and no pad; the folder says what the file says
    (bos 1, eos 2 <|im_end|>, pad 2, unk 0, no BOS added), in the tokenizer, config.json and
    generation_config.json, and holds plain bf16 weights."""
    meta = metadata(real_gguf("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    config = json.loads((smollm2 / "config.json").read_text())
    generation = json.loads((smollm2 / "generation_config.json").read_text())
    for role, key in SPECIAL_TOKEN_KEYS.items():
        assert getattr(tokenizer, f"{role}_id") == meta[key], role
        if role != "unk_token":
            assert config[f"{role}_id"] == generation[f"{role}_id"] == meta[key], role
    assert tokenizer.eos_token == "<|im_end|>" and meta["tokenizer.ggml.add_bos_token"] is False
    assert tokenizer("答案：")["input_ids"] == tokenizer("答案：", add_special_tokens=False)["input_ids"]
    assert tokenizer.chat_template == meta["tokenizer.chat_template"]
    assert "quantization_config" not in config
    with safe_open(str(smollm2 / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_gemma3_tokenizer_adds_the_bos_its_gguf_asks_for():
    """Gemma 3's GGUF says add_bos_token: transformers' conversion alone adds none (and the model then
    writes " is is is"); the converted tokenizer adds it, with the file's bos 2, eos 1, pad 0, unk 3."""
    gguf = real_gguf("gemma3")
    meta = metadata(gguf)
    tokenizer = converted_tokenizer(gguf.parent, gguf.name, read_summary(gguf))
    for role, key in SPECIAL_TOKEN_KEYS.items():
        assert getattr(tokenizer, f"{role}_id") == meta[key], role
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert tokenizer("答案：")["input_ids"] == [meta["tokenizer.ggml.bos_token_id"],
                                               *tokenizer("答案：", add_special_tokens=False)["input_ids"]]
    assert prompt_frame(tokenizer, "plain").bos_ids == (meta["tokenizer.ggml.bos_token_id"],)


@pytest.fixture(scope="module")
def real_questions(tmp_path_factory) -> list[dict]:
    """Real training questions with short articles, two on each article."""
    if not (SHARED_DATA / "AI.xlsx").exists():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    tmp = tmp_path_factory.mktemp("real_questions")
    prepared = run_script("prepare_data.py", "train", "--input", SHARED_DATA / "AI.xlsx", "--train-out", tmp / "t.json",
                          "--val-out", tmp / "v.json", "--report-out", tmp / "r.json", "--val-fraction", "0")
    assert prepared.returncode == 0, prepared.stderr
    by_article: dict[str, list[dict]] = {}
    for r in read_records(tmp / "t.json", "labelled"):
        if len(r["input"]) < 150:
            by_article.setdefault(split_input(r["input"])[0], []).append(r)
    return [r for questions in by_article.values() if len(questions) > 1 for r in questions[:2]][:10]


@needs_real_data
def test_packed_scoring_in_four_orders_equals_a_plain_pass_of_each_prompt(smollm2, real_questions):
    """On real weights, the packed scoring (questions of an article and the orders of a question sharing
    their leading tokens) gives what one plain forward pass of each whole prompt gives."""
    tokenizer = load_tokenizer(str(smollm2))
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    records = real_questions[:4]
    articles = [split_input(r["input"])[0] for r in records]
    assert len(set(articles)) < len(articles), "some of the questions share an article"
    frame = prompt_frame(tokenizer, "chat")
    prompts = encode_rotations(tokenizer, records, 1024, 4, frame)
    scores, _ = score_prompts(model, records, prompts, frame.answer_ids, batch_tokens=4096)
    with torch.no_grad():
        plain = {shift: torch.stack([model(torch.tensor([p.ids])).logits[0, -1].log_softmax(-1)[list(frame.answer_ids)]
                                     for p in orders]) for shift, orders in prompts.items()}
    torch.testing.assert_close(scores, combine_rotations(plain), rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def trained_smollm2(smollm2, real_questions, tmp_path_factory):
    """A LoRA adapter trained for a few steps on real questions (the schema's defaults, a higher learning
    rate), merged by the workflow's streaming merge: the folder holding train.json, val.json, adapter/,
    train_log.jsonl and merged/."""
    work = tmp_path_factory.mktemp("trained_smollm2")
    (work / "train.json").write_text(json.dumps(real_questions[:6], ensure_ascii=False))
    (work / "val.json").write_text(json.dumps(real_questions[6:10], ensure_ascii=False))
    settings = {**training_defaults(), "max_seq_length": 512, "micro_batch_size": 2, "learning_rate": 1e-3,
                "epochs": 2, "logging_steps": 1, "warmup_ratio": 0}
    trained = run_script("train_lora.py", "--train", work / "train.json", "--base-model", smollm2, "--out",
                         work / "adapter", "--log-jsonl", work / "train_log.jsonl", "--checkpoint-dir",
                         work / "checkpoints", "--settings", json.dumps(settings), "--prompt-format", "chat")
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_script("merge_lora.py", "--base-model", smollm2, "--adapter", work / "adapter", "--out",
                        work / "merged")
    assert merged.returncode == 0, merged.stderr[-3000:]
    return work


@needs_real_data
def test_a_few_steps_on_real_questions_lower_the_loss(trained_smollm2):
    losses = [e["loss"] for e in read_history(trained_smollm2 / "train_log.jsonl") if "loss" in e]
    assert len(losses) == 6
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2, losses


@needs_real_data
def test_streaming_merge_gives_peft_merge_and_unloads_logits(smollm2, trained_smollm2, real_questions):
    """The merged checkpoint (W + scale B A in fp32, rounded once to the base's bf16) against peft's
    merge_and_unload of the same adapter in fp32, rounded once to bf16 too: the same weights, so the same
    logits."""
    from peft import PeftModel

    tokenizer = load_tokenizer(str(smollm2))
    frame = prompt_frame(tokenizer, "chat")
    ids = torch.tensor([encode_rotations(tokenizer, real_questions[6:7], 512, 1, frame)[0][0].ids])
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    with torch.no_grad():
        untrained = base(ids).logits
        reference = PeftModel.from_pretrained(base, trained_smollm2 / "adapter").merge_and_unload()
        reference = reference.to(torch.bfloat16).to(torch.float32)
        expected = reference(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(trained_smollm2 / "merged", dtype=torch.float32)
        logits = merged(ids).logits
    assert (expected - untrained).abs().max() > 1.0, "the adapter changed the logits"
    weights = dict(reference.named_parameters())
    for name, w in merged.named_parameters():  # fp32 sums in another order may round to a neighbour
        assert (w != weights[name]).float().mean() < 1e-3, name
    answers = list(frame.answer_ids)
    torch.testing.assert_close(logits[0, -1].log_softmax(-1)[answers], expected[0, -1].log_softmax(-1)[answers],
                               rtol=0, atol=0.02)


@needs_real_data
def test_fold_model_scored_from_base_and_adapter_matches_its_merged_model(smollm2, trained_smollm2):
    """A fold model is scored from the base with its adapter merged as it loads; a run's model from its
    merged checkpoint (its weights rounded once to bf16): on real weights the same answers, and probabilities
    that differ by that rounding alone."""
    work = trained_smollm2
    settings = json.dumps(ANSWERING)
    for name, model in (("adapter", ["--model", smollm2, "--adapter", work / "adapter"]),
                        ("merged", ["--model", work / "merged"])):
        scored = run_script("score_questions.py", *model, "--val", work / "val.json", "--metrics",
                            work / f"metrics_{name}.json", "--val-probs", work / f"probs_{name}.csv",
                            "--max-seq-length", "512", "--settings", settings)
        assert scored.returncode == 0, scored.stderr[-3000:]
    rows = {name: read_csv(work / f"probs_{name}.csv") for name in ("adapter", "merged")}
    columns = ["p1", "p2", "p3", "p4"]
    difference = max(abs(float(a[c]) - float(m[c])) for a, m in zip(rows["adapter"], rows["merged"]) for c in columns)
    assert len(rows["adapter"]) == 4 and difference < 0.05  # 0.035 measured: the checkpoint's bf16 rounding
    assert [max(columns, key=lambda c: float(a[c])) for a in rows["adapter"]] == \
        [max(columns, key=lambda c: float(m[c])) for m in rows["merged"]]


@needs_real_data
@pytest.mark.parametrize("type_name, tolerance", [("f16", 1e-3), ("q8_0", 0.2)])
def test_the_merged_model_as_gguf_reads_back_with_its_tokens_template_and_answers(trained_smollm2, real_questions,
                                                                                  type_name, tolerance):
    """The trained SmolLM2's merged checkpoint written as GGUF (export_gguf.py) and read back with transformers
    (gguf_file=): the same tokens for the same prompts, the same special tokens, BOS rule and chat template in
    the file, and the same answers; the answers' log-probabilities equal up to f16's rounding of bf16 weights
    (0.00002 measured), and within `tolerance` in Q8_0, 8-bit blocks (0.08 measured)."""
    merged, out = trained_smollm2 / "merged", trained_smollm2 / f"model-{type_name}.gguf"
    exported = run_script("export_gguf.py", "--model", merged, "--type", type_name, "--out", out)
    assert exported.returncode == 0, exported.stderr[-3000:]
    tokenizer = load_tokenizer(str(merged))
    read_back = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    frame = prompt_frame(tokenizer, "chat")
    prompts = [p.ids for p in encode_rotations(tokenizer, real_questions[6:10], 512, 1, frame)[0]]
    for ids in prompts:
        text = tokenizer.decode(ids)
        assert read_back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert read_back.chat_template == tokenizer.chat_template
    # The file's own special tokens (transformers' GGUF tokenizer misreads eos and pad: the conversion's test).
    meta = metadata(out)
    assert {role: meta[key] for role, key in SPECIAL_TOKEN_KEYS.items()} == {
        role: getattr(tokenizer, f"{role}_id") for role in SPECIAL_TOKEN_KEYS}
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.chat_template"] == tokenizer.chat_template
    answers = list(frame.answer_ids)

    def answer_log_probs(model) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)[answers] for ids in prompts])

    expected = answer_log_probs(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    found = answer_log_probs(AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32))
    assert (found - expected).abs().max() < tolerance, (found - expected).abs().max()
    assert found.argmax(-1).tolist() == expected.argmax(-1).tolist()
