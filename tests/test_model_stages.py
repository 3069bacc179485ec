"""Merge, adapter and scoring on tiny models (CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_script, training_defaults
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from mcqa.demo_model import build_model
from mcqa.modeling import load_tokenizer, without_attention_mask
from mcqa.records import read_records
from mcqa.batching import micro_batches
from mcqa.training import tokenize


def tiny_base(path, vocab=97, bin_shards=False):
    model = build_model(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, seed=1)
    model.save_pretrained(path, max_shard_size="40KB")
    if bin_shards:
        to_bin_shards(path)
    return model


def to_bin_shards(path):
    """Rewrite a safetensors checkpoint as pickled .bin shards, as older checkpoints come."""
    from safetensors.torch import load_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    renamed = {}
    for shard in sorted(set(index["weight_map"].values())):
        bin_name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        torch.save(load_file(path / shard), path / bin_name)
        (path / shard).unlink()
        renamed[shard] = bin_name
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (path / "model.safetensors.index.json").unlink()


def tiny_adapter(base_path, adapter_path, modules_to_save=None, use_rslora=False, use_dora=False, **fields):
    """A LoRA adapter of the tiny base with random (trained-looking) weights; `fields` are other LoraConfig
    fields, which also replace the defaults below."""
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                           "modules_to_save": modules_to_save, "use_rslora": use_rslora, "use_dora": use_dora,
                           "task_type": "CAUSAL_LM", **fields})
    peft_model = get_peft_model(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if any(part in name for part in ("lora_B", "modules_to_save", "lora_magnitude_vector", "lora_embedding_B")):
                p.add_(torch.randn_like(p) * 0.1)  # a trained adapter, not the zero init
    peft_model.save_pretrained(adapter_path)


def reference_logits(base_path, adapter_path, ids):
    model = AutoModelForCausalLM.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return merged(ids).logits


@pytest.mark.parametrize(
    "bin_shards, modules_to_save, use_rslora, threads, block_bytes, use_dora",
    [(False, None, False, 1, None, False), (True, None, False, 1, None, False), (False, ["lm_head"], False, 3, 200, False),
     (False, None, True, 1, None, False), (False, None, False, 4, 200, False), (True, ["lm_head"], False, 2, 200, False),
     (False, None, False, 2, 200, True), (False, None, True, 1, None, True)],
)
def test_streaming_merge_equals_merge_and_unload(tmp_path, monkeypatch, request, bin_shards, modules_to_save,
                                                 use_rslora, threads, block_bytes, use_dora):
    """Also with several shards at a time, tensors cut into many blocks of rows (block_bytes), rsLoRA and DoRA."""
    import merge_lora

    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))  # merge() sets it

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    original = tiny_base(base, bin_shards=bin_shards)
    assert len(list(base.glob("*.bin" if bin_shards else "*.safetensors"))) > 1, "want several shards"
    tiny_adapter(base, adapter, modules_to_save, use_rslora, use_dora)
    if block_bytes:
        monkeypatch.setattr(merge_lora, "BLOCK_BYTES", block_bytes)
        assert any(len(list(merge_lora.row_blocks(w.to("meta")))) > 5 for w in original.state_dict().values())
    assert merge_lora.main(["--base-model", str(base), "--adapter", str(adapter), "--out", str(out),
                            "--threads", str(threads)]) == 0
    assert (out / "model.safetensors.index.json").exists() and not list(out.glob("*.bin"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 97, (2, 17))
    expected = reference_logits(base, adapter, ids)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(original(ids).logits, expected, atol=1e-3), "the adapter changed nothing"


def test_adapter_for_another_vocabulary_is_refused(tmp_path):
    tiny_base(tmp_path / "base")
    tiny_base(tmp_path / "other", vocab=120)
    tiny_adapter(tmp_path / "other", tmp_path / "adapter", modules_to_save=["lm_head"])
    result = run_script("merge_lora.py", "--base-model", tmp_path / "base", "--adapter", tmp_path / "adapter",
                        "--out", tmp_path / "merged")
    assert result.returncode == 2
    assert "lm_head.weight: adapter has shape (120, 32), base has (97, 32)" in result.stderr
    assert "different vocabulary size" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_adapter_for_unknown_module_is_refused(tmp_path):
    tiny_base(tmp_path / "base")
    tiny_adapter(tmp_path / "base", tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qkv"): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter" / "adapter_model.safetensors")
    assert json.loads(config_path.read_text())["peft_type"] == "LORA"
    result = run_script("merge_lora.py", "--base-model", tmp_path / "base", "--adapter", tmp_path / "adapter",
                        "--out", tmp_path / "merged")
    assert result.returncode == 2
    assert "LoRA module model.layers.1.self_attn.qkv does not exist in the base model" in result.stderr


def test_trained_adapter_round_trips_through_peft(demo_run):
    """The workflow's adapter loads with peft and matches the workflow's merged model."""
    base, adapter = demo_run / "resources/models/demo", demo_run / "results/default/adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    ids = torch.randint(0, 500, (2, 23))
    merged = AutoModelForCausalLM.from_pretrained(demo_run / "results/default/merged")
    # fp32 sums in another order (addmm against peft's B @ A * scale): the 3-layer demo's logits differ by up to ~1.1e-5
    torch.testing.assert_close(merged(ids).logits, reference_logits(base, adapter, ids), rtol=1e-5, atol=3e-5)


def test_answering_twice_gives_identical_files(demo_run, tmp_path):
    outputs = []
    for n in range(2):
        answers, probs = tmp_path / f"a{n}.csv", tmp_path / f"p{n}.csv"
        result = run_script(
            "score_questions.py", "--model", demo_run / "results/default/merged", "--test",
            demo_run / "results/data/test.json", "--answers", answers, "--answer-probs", probs, "--max-seq-length", "256",
            "--settings", json.dumps({"batch_tokens": 400 + 300 * n, "precision": "auto", "load_in": "none", "rotations": 4,
                                      "prompt_format": "plain", "fused_kernels": True}),
        )
        assert result.returncode == 0, result.stderr
        outputs.append((answers.read_bytes(), probs.read_text()))
    assert outputs[0][0] == outputs[1][0]
    assert (demo_run / "results/default/answers.csv").read_bytes() == outputs[0][0]
    for row0, row1 in zip(outputs[0][1].splitlines()[1:], outputs[1][1].splitlines()[1:]):
        assert all(abs(float(a) - float(b)) < 1e-5 for a, b in zip(row0.split(",")[1:], row1.split(",")[1:]))


def test_answer_only_batches_give_the_full_forward_loss():
    """Logits at the answer positions only give the loss of a plain unpadded forward."""
    from mcqa.batching import AnswerOnlyCollator

    model = build_model(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, seed=1)
    torch.manual_seed(0)
    features = []
    for n in (9, 14, 5):
        ids = torch.randint(3, 97, (n,)).tolist()
        features.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:], "attention_mask": [1] * n})
    batch = AnswerOnlyCollator(pad_token_id=2)(features)
    assert batch["input_ids"].shape == (3, 16)
    assert batch["logits_to_keep"].tolist() == [2, 3, 6, 7, 11, 12]  # the positions before each label
    per_token = [model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]])).loss
                 for f in features]
    gradients = []
    # With right padding the attention mask changes neither the loss nor its gradients.
    for inputs in (batch, without_attention_mask(batch)):
        model.zero_grad()
        loss = model(**inputs).loss
        torch.testing.assert_close(loss, torch.stack(per_token).mean(), rtol=1e-5, atol=1e-5)
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merged_weight_is_base_plus_scaled_b_times_a(tmp_path, fan_in_fan_out):
    """The merge arithmetic itself, also for layers stored transposed (GPT-2's Conv1D)."""
    from safetensors.torch import save_file

    from mcqa.lora import merge_tensor, read_adapter

    torch.manual_seed(0)
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    weight = torch.randn(6, 5) if fan_in_fan_out else torch.randn(5, 6)
    save_file({"base_model.model.layer.proj.lora_A.weight": a, "base_model.model.layer.proj.lora_B.weight": b},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "lora_alpha": 8, "fan_in_fan_out": fan_in_fan_out}))
    _, pairs, _ = read_adapter(tmp_path)
    merged = merge_tensor("layer.proj.weight", weight.to(torch.bfloat16), pairs, {})
    delta = (b @ a).T if fan_in_fan_out else b @ a
    expected = (weight.to(torch.bfloat16).float() + 2.0 * delta).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged, expected)  # bf16 tolerance: the GPU may round the sum differently
    # Merged in blocks of rows, as the streaming merge does: the same bits.
    blocks = [merge_tensor("layer.proj.weight", rows.to(torch.bfloat16), pairs, {}, first_row)
              for first_row, rows in zip(range(0, len(weight), 2), weight.split(2))]
    assert torch.equal(torch.cat(blocks), merged)


def test_training_with_the_same_seed_gives_the_same_adapter(demo_run, tmp_path):
    # Packed micro-batches (the default) through the Trainer, on the CPU's reference attention.
    settings = {**training_defaults(), "lora_r": 8, "lora_alpha": 16, "learning_rate": 0.002, "epochs": 0.5,
                "micro_batch_size": 8, "micro_batch_tokens": 512, "max_seq_length": 256, "seed": 7,
                "checkpoint_steps": 1000, "eval_steps": 1000, "logging_steps": 5}
    assert settings["packing"]
    adapters = []
    for n in range(2):
        out = tmp_path / f"run{n}"
        result = run_script("train_lora.py", "--train", demo_run / "results/data/train.json", "--base-model",
                            demo_run / "resources/models/demo", "--out", out / "adapter", "--log-jsonl",
                            out / "log.jsonl", "--checkpoint-dir", out / "checkpoints", "--settings", json.dumps(settings),
                            "--revision", "v1.0")
        assert result.returncode == 0, result.stderr
        adapters.append((out / "adapter/adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]
    # base_model_revision is recorded with the adapter, where the merge reads it
    assert json.loads((out / "adapter/adapter_config.json").read_text())["revision"] == "v1.0"
    # Half an epoch of token-budget micro-batches: steps, examples and tokens as the batches say.
    records = read_records(demo_run / "results/data/train.json", "labelled")
    features, _ = tokenize(records, load_tokenizer(str(demo_run / "resources/models/demo")), 256)
    batches = micro_batches([len(f["input_ids"]) for f in features], 8, 512, seed=7, packed=True)
    assert any(len(b) < 8 for b in batches[:-1])  # the token budget, not the cap, closed some batches
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    k = log[-1]["step"]
    assert k == math.ceil(len(batches) / 2)
    assert all(e["samples_per_s"] > 0 and e["tokens_per_s"] > 0 for e in steps)
    batch_tokens = sorted(sum(len(features[i]["input_ids"]) for i in b) for b in batches)
    assert sum(batch_tokens[:k]) <= log[-1]["tokens_seen"] <= sum(batch_tokens[-k:])  # k whole batches, no padding
    batch_sizes = sorted(len(b) for b in batches)
    assert sum(batch_sizes[:k]) <= log[-1]["examples_seen"] <= sum(batch_sizes[-k:])


def test_streaming_merge_of_a_base_with_tied_embeddings_equals_merge_and_unload(tmp_path):
    """Qwen2.5 up to 3B and Llama-3.2 1B/3B store one embedding matrix for input and output (no lm_head
    in the checkpoint): the merged model must still be the trained one."""
    import merge_lora
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    original = Qwen2ForCausalLM(config)
    original.save_pretrained(base, max_shard_size="40KB")
    assert not any("lm_head" in k for k in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    tiny_adapter(base, adapter)
    assert merge_lora.main(["--base-model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    ids = torch.randint(0, 97, (2, 17))
    expected = reference_logits(base, adapter, ids)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(original(ids).logits, expected, atol=1e-3), "the adapter changed nothing"


# Every adapter_config.json field that the merge accepts with values that change the weights, each with a
# value unlike the default; the fields it accepts that decide nothing in the weights are metadata.
FIELD_CASES = {
    "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 32, "v_proj|down_proj": 2},  # regular expressions, as peft reads them
    "rank_pattern": {r"model\.layers\.0\..*": 2},
    "use_rslora": True,
    "use_dora": True,
    "modules_to_save": ["lm_head"],
    "layers_to_transform": [1],
    "target_modules": r".*\.(q_proj|up_proj)",
    "exclude_modules": ["model.layers.0.self_attn.q_proj"],
    "init_lora_weights": "gaussian",
    "lora_dropout": 0.3,
    "r": 6,
    "lora_alpha": 3,
}
METADATA = {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
            "inference_mode", "runtime_config", "megatron_core", "qalora_group_size", "layers_pattern",
            "fan_in_fan_out"}  # fan_in_fan_out: test_merge_of_transposed_layers_equals_merge_and_unload


def test_every_field_the_merge_accepts_is_tested():
    from mcqa.lora import ANY_VALUE, ONLY_VALUES

    assert ANY_VALUE <= set(FIELD_CASES) | METADATA  # no field accepted with any value goes untested
    assert set(FIELD_CASES) <= ANY_VALUE | set(ONLY_VALUES)


@pytest.mark.parametrize("field", sorted(FIELD_CASES))
def test_every_adapter_field_the_merge_accepts_merges_as_peft_does(tmp_path, field):
    import merge_lora

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    original = tiny_base(base)
    tiny_adapter(base, adapter, **{field: FIELD_CASES[field]})
    assert json.loads((adapter / "adapter_config.json").read_text())[field] == FIELD_CASES[field]
    assert merge_lora.main(["--base-model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    ids = torch.randint(0, 97, (2, 17))
    expected = reference_logits(base, adapter, ids)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(original(ids).logits, expected, atol=1e-3), "the adapter changed nothing"


def test_merge_of_transposed_layers_equals_merge_and_unload(tmp_path):
    """fan_in_fan_out: GPT-2 stores its projections (Conv1D) transposed."""
    import merge_lora
    from transformers import GPT2Config, GPT2LMHeadModel

    base, adapter, out = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    torch.manual_seed(1)
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(base)
    tiny_adapter(base, adapter, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    assert merge_lora.main(["--base-model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    ids = torch.randint(0, 97, (2, 17))
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits,
                               reference_logits(base, adapter, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fields, refused", [
    ({"lora_bias": True}, "lora_bias: true"),  # B has a bias the merge would drop
    ({"target_modules": ["q_proj", "embed_tokens"]}, "LoRA on an embedding layer"),
])
def test_adapter_the_merge_cannot_reproduce_is_refused_naming_why(tmp_path, fields, refused):
    tiny_base(tmp_path / "base")
    tiny_adapter(tmp_path / "base", tmp_path / "adapter", **fields)
    result = run_script("merge_lora.py", "--base-model", tmp_path / "base", "--adapter", tmp_path / "adapter",
                        "--out", tmp_path / "merged")
    assert result.returncode == 2 and refused in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("field, value", [
    ("init_lora_weights", "pissa"), ("init_lora_weights", "olora"), ("layer_replication", [[0, 2], [1, 2]]),
    ("use_qalora", True), ("trainable_token_indices", [5, 6]), ("a_field_of_a_later_peft", {"on": True}),
])
def test_adapter_config_field_the_merge_does_not_reproduce_is_refused(tmp_path, field, value):
    """Written into adapter_config.json: these change what the adapter computes (the base moved at its
    initialisation, layers added, quantisation-aware scaling, rows of the embedding trained)."""
    tiny_base(tmp_path / "base")
    tiny_adapter(tmp_path / "base", tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    result = run_script("merge_lora.py", "--base-model", tmp_path / "base", "--adapter", tmp_path / "adapter",
                        "--out", tmp_path / "merged")
    assert result.returncode == 2 and f"{field}: {json.dumps(value)}" in result.stderr, result.stderr[-2000:]


def test_fp8_runs_the_adapted_projections_of_the_frozen_base_in_float8_under_lora():
    """training.fp8 swaps the frozen layer under each LoRA layer for one whose weights were cast to FP8 once
    (torch has FP8 products on the CPU too): LoRA's gradients stay close to fp32's, the loss falls, the FP8
    weights survive a whole-model cast to bf16 (as DeepSpeed makes), and no base weight is a parameter any
    more. Where FP8 cannot apply, it says why and swaps nothing."""
    from mcqa.batching import AnswerOnlyCollator
    from mcqa.float8 import FrozenFloat8Linear
    from mcqa.training import float8_base

    targets = training_defaults()["target_modules"]

    def lora(recipe):
        model = build_model(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, seed=1)
        torch.manual_seed(3)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                 task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # a trained adapter: A gets gradients too
        return model, float8_base(model, recipe, "none", on_any_device=True) if recipe else ""

    model, _ = lora(None)
    assert float8_base(model, "tensorwise", "none").startswith("off on a CPU")
    assert float8_base(model, "rowwise", "8bit").startswith("off with a 8bit base")
    assert float8_base(model, "none", "none", on_any_device=True) == "off (fp8: none)"
    assert not any(isinstance(m, FrozenFloat8Linear) for m in model.modules())

    torch.manual_seed(0)
    features = []
    for n in (19, 24, 15, 30):
        ids = torch.randint(3, 97, (n,)).tolist()
        features.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:], "attention_mask": [1] * n})
    batch = without_attention_mask(AnswerOnlyCollator(pad_token_id=2)(features))

    def loss_and_gradients(model):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])

    exact_loss, exact = loss_and_gradients(model)
    for recipe in ("tensorwise", "rowwise"):
        model, said = lora(recipe)
        assert said == f"14 linear layers of the base in FP8 ({recipe} scaling, weights cast once)"
        down = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
        assert isinstance(down, FrozenFloat8Linear) and down.weight_float8.shape == (64, 128)
        assert not any("base_layer" in n for n, _ in model.named_parameters())  # buffers now, nothing to train
        loss, grads = loss_and_gradients(model)
        # FP8 (3 mantissa bits) is far coarser than bf16: the gradients keep their direction, not their digits.
        # What it costs a real training is measured on the 7B shape (benchmarks/HISTORY.md).
        assert torch.nn.functional.cosine_similarity(grads, exact, dim=0) > 0.85, recipe
        assert abs(loss - exact_loss) < 0.05 * exact_loss
        # DeepSpeed casts the whole model to bf16; the FP8 weights (bytes) and factors (powers of two) keep.
        before = down(torch.ones(3, 128))
        model.bfloat16()
        assert torch.equal(down(torch.ones(3, 128)), before.bfloat16())
        model.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_fp8_products_follow_the_exact_product_within_fp8_precision():
    """The FP8 product of a frozen layer, forward and backward to its input, against the same product in fp32:
    both scalings within FP8's rounding (e4m3: 3 mantissa bits, a relative step of 1/16) on every output,
    except that one factor for a whole tensor loses the outputs of rows a million times smaller than its
    largest (below e4m3's smallest number) where a factor per row keeps them."""
    from mcqa.float8 import FrozenFloat8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).requires_grad_(False)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-6, 1, 48).unsqueeze(1))  # rows of very different sizes
        linear.bias.zero_()
    x = torch.randn(10, 7, 64)
    grad = torch.randn(10, 7, 48)
    exact_x = x.clone().requires_grad_()
    exact = linear(exact_x)
    exact.backward(grad)
    errors = {}
    for recipe in ("tensorwise", "rowwise"):
        layer = FrozenFloat8Linear(linear, recipe)
        fp8_x = x.clone().requires_grad_()
        y = layer(fp8_x)
        y.backward(grad)
        assert y.shape == exact.shape and y.dtype == x.dtype
        assert (fp8_x.grad - exact_x.grad).norm() < 0.1 * exact_x.grad.norm(), recipe
        # each output's relative error (an output is one weight row's product)
        errors[recipe] = ((y - exact).flatten(0, 1).norm(dim=0) / exact.flatten(0, 1).norm(dim=0))
    assert errors["rowwise"].max() < 0.1, errors["rowwise"]
    assert errors["tensorwise"][-30:].max() < 0.1 and errors["tensorwise"][:5].min() > 0.5, errors["tensorwise"]


def test_as_float8_saw_it_gives_the_weights_the_fp8_forward_product_reads():
    """The weights an FP8 training's forward product reads (what benchmarks/fp8_as_trained.py rounds a base
    to): an input FP8 holds exactly goes through the FP8 layer as through those weights in fp32, and they are
    not the bf16 weights; a layer whose sizes are not multiples of 16 takes no FP8."""
    from mcqa.float8 import RECIPES, FrozenFloat8Linear, as_float8_saw_it, takes_float8

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=False).requires_grad_(False)
    x = torch.randint(-8, 9, (5, 64)).float() / 8  # eighths up to 1: FP8 holds each exactly
    for recipe in RECIPES:
        seen = as_float8_saw_it(linear.weight, recipe)
        assert seen.dtype == torch.bfloat16 and not torch.equal(seen.float(), linear.weight)
        torch.testing.assert_close(FrozenFloat8Linear(linear, recipe)(x), x @ seen.float().t(), rtol=1e-2,
                                   atol=1e-3)  # bf16's rounding of the output
    assert takes_float8(linear) and not takes_float8(torch.nn.Linear(64, 40))


def test_fp8_layers_compile_as_training_compiles_them():
    """Two FP8 layers reading the same input (as q, k and v do) compile with dynamic shapes, as the decoder
    layers are compiled, and give what they give uncompiled (a module-level float in the casts once broke
    dynamo on the second layer)."""
    from mcqa.float8 import FrozenFloat8Linear

    torch.manual_seed(0)
    for recipe in ("tensorwise", "rowwise"):
        q, k = (FrozenFloat8Linear(torch.nn.Linear(64, 48, bias=False), recipe) for _ in range(2))
        compiled = torch.compile(lambda x: q(x) * k(x), dynamic=True)
        results = []
        for product in (compiled, lambda x: q(x) * k(x)):
            x = torch.randn(2, 11, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
            y = product(x)
            y.sum().backward()
            results.append((y, x.grad))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_liger_kernels_note_on_its_optional_backend_stays_out_of_the_log(tmp_path):
    """What an import prints about liger-kernel's optional CuTe DSL backend (to stderr, through a logger or
    C code, all on file descriptor 2) is left out of the scoring log; anything else it prints is kept."""
    import subprocess
    import sys

    from conftest import SCRIPTS

    for name, text in (("noisy", "ImportError: cannot import the CuTe DSL backend"), ("plain", "a real warning")):
        (tmp_path / f"{name}.py").write_text(f"import os\nos.write(2, b'{text}\\n')\n")
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "from mcqa.modeling import optional_backends_quiet\n"
            "with optional_backends_quiet():\n    import noisy, plain\n"
            "print('after', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, str(SCRIPTS), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "CuTe" not in result.stderr and result.stderr.endswith("after\n")
    plain = code.replace("import noisy, plain", "import plain")
    result = subprocess.run([sys.executable, "-c", plain, str(SCRIPTS), str(tmp_path)], capture_output=True, text=True)
    assert result.stderr == "a real warning\nafter\n"
