"""Padding-free packed micro-batches train exactly what padded ones do (CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from mcqa.attention import PACKED_ATTENTION
from mcqa.modeling import compile_decoder_layers, without_attention_mask
from mcqa.batching import AnswerOnlyCollator, micro_batches


def lora_model(num_key_value_heads: int) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_key_value_heads, pad_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(1)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # a trained adapter: with B = 0, A would get no gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def examples(lengths: list[int], seed: int = 0) -> list[dict]:
    """Prompts of random tokens whose last two tokens (answer, EOS) carry the loss."""
    rng = random.Random(seed)
    features = []
    for n in lengths:
        ids = [rng.randrange(3, 97) for _ in range(n)]
        features.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:], "attention_mask": [1] * n})
    return features


def loss_and_lora_gradients(model, batch: dict, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_attn_implementation(attention)
    model.zero_grad()
    loss = model(**without_attention_mask(batch)).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n])
    return loss.detach(), grads


# 2 key-value heads: grouped-query attention, as Llama-3 and Breeze; checkpointing recomputes each layer
@pytest.mark.parametrize("num_key_value_heads, checkpointing", [(4, False), (2, False), (4, True)])
def test_packed_and_padded_batches_give_the_same_loss_and_lora_gradients(num_key_value_heads, checkpointing):
    model = lora_model(num_key_value_heads)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
    features = examples([9, 23, 5, 17, 12])
    padded = AnswerOnlyCollator(pad_token_id=2)(features)
    packed = AnswerOnlyCollator(pad_token_id=2, packed=True)(features)
    assert packed["input_ids"].shape == (1, 66)  # every token real, none padding
    assert packed["position_ids"][0, 9:12].tolist() == [0, 1, 2]  # positions restart at each example
    assert packed["cu_seq_lens_q"].tolist() == [0, 9, 32, 37, 54, 66]
    assert packed["shift_labels"].numel() == padded["shift_labels"].ne(-100).sum() == 10
    loss_padded, grads_padded = loss_and_lora_gradients(model, padded, "sdpa")
    loss_packed, grads_packed = loss_and_lora_gradients(model, packed, PACKED_ATTENTION)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    assert grads_padded.abs().max() > 1e-3
    torch.testing.assert_close(grads_packed, grads_padded, rtol=1e-4, atol=1e-6)


def test_no_token_attends_across_packed_examples():
    model = lora_model(4)
    model.set_attn_implementation(PACKED_ATTENTION)
    first, second = examples([8, 11], seed=1), examples([8, 11], seed=2)
    changed = [second[0], first[1]]  # the example in front differs, the one behind it is the same
    hidden = []
    for features in (first, changed):
        batch = without_attention_mask(AnswerOnlyCollator(pad_token_id=2, packed=True)(features))
        batch = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")}
        hidden.append(model(**batch, output_hidden_states=True).hidden_states[-1][0])
    assert not torch.allclose(hidden[0][:8], hidden[1][:8])
    torch.testing.assert_close(hidden[0][8:], hidden[1][8:])  # the second example sees nothing of the first


def test_packed_attention_refuses_a_padded_batch():
    model = lora_model(4)
    model.set_attn_implementation(PACKED_ATTENTION)
    batch = AnswerOnlyCollator(pad_token_id=2)(examples([9, 12]))
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(**without_attention_mask(batch))


@pytest.mark.parametrize("max_examples, max_tokens", [(64, 8192), (5, 2048), (200, 0)])
def test_packed_micro_batches_hold_every_example_once_within_the_limits(max_examples, max_tokens):
    rng = random.Random(0)
    lengths = [rng.randint(150, 512) for _ in range(1000)]  # one group: first-fit decreasing over all
    batches = micro_batches(lengths, max_examples, max_tokens, seed=1, packed=True)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= max_examples for b in batches)
    assert micro_batches(lengths, max_examples, max_tokens, seed=1, packed=True) == batches
    if max_tokens:
        room = [max_tokens - sum(lengths[i] for i in b) for b in batches]
        assert min(room) >= 0
        # No example could have gone into an earlier micro-batch that had room (first fit).
        for later, batch in enumerate(batches):
            for earlier in range(later):
                if len(batches[earlier]) < max_examples:
                    assert all(lengths[i] > room[earlier] for i in batch)
        if max_tokens == 8192:  # many examples a micro-batch: all but the last come out nearly full
            assert sorted(room)[-2] < 150


def test_an_example_longer_than_the_budget_is_packed_alone():
    batches = micro_batches([100, 900, 100, 100], 8, 512, seed=0, packed=True)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2, 3]


@pytest.mark.parametrize("asked", [None, "1"])
def test_compiling_the_layers_turns_off_inductors_cpu_probe_unless_asked_for(monkeypatch, asked):
    """The compiled layers' one CPU kernel (a scalar conversion) needs no vector instructions; inductor's
    probe for them cost about 50 s of every training's compile (BENCHMARKS.md)."""
    import torch._inductor.config as inductor

    if asked:
        monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", asked)
    else:
        monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    with inductor.patch({"cpp.vec_isa_ok": None}):
        assert compile_decoder_layers(lora_model(num_key_value_heads=4)) == 2
        assert inductor.cpp.vec_isa_ok is (None if asked else False)


def test_bitsandbytes_cast_message_is_logged_once(caplog):
    """An 8-bit base logs a cast at every 8-bit product (1,476 lines in the GPU stage check's short run)."""
    import logging

    import mcqa.modeling  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        logger.warning("another message")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization", "another message"]


def gemma3_model(sliding_window: int) -> torch.nn.Module:
    """A tiny Gemma 3 whose first layer sees only the last `sliding_window` tokens, the second all (Gemma 3's
    local and global layers)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, pad_token_id=2,
                              sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(2)
    return Gemma3ForCausalLM(config).eval()


def test_packed_training_and_scoring_keep_a_sliding_window():
    """Gemma's local layers see only the last `sliding_window` tokens: packed training logits and packed
    scoring (prompts longer than the window are scored whole, shorter ones share their prefixes) equal
    transformers' own unpacked passes with its sliding-window masks."""
    from mcqa.scoring import shared_prefix_log_probs

    model = gemma3_model(sliding_window=6)
    features = examples([9, 23, 5, 17])

    def unpacked(prompts: list[list[int]], of: torch.nn.Module = model) -> torch.Tensor:
        of.set_attn_implementation("sdpa")
        with torch.no_grad():
            return torch.cat([of(torch.tensor([ids])).logits[0] for ids in prompts])

    whole = unpacked([f["input_ids"] for f in features])
    # The same weights with a window longer than every example give other logits: the window matters here.
    assert not torch.allclose(unpacked([f["input_ids"] for f in features], gemma3_model(64)), whole, atol=1e-3)
    batch = without_attention_mask(AnswerOnlyCollator(pad_token_id=2, packed=True)(features))
    model.set_attn_implementation(PACKED_ATTENTION)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", "shift_labels", "logits_to_keep")})
    torch.testing.assert_close(packed.logits[0], whole, rtol=1e-4, atol=1e-5)
    answers = [3, 4, 5, 6]
    for lengths in ([7, 19, 1, 2], [2, 3, 1, 2]):  # one group beyond the window and one within it; both within
        tails = [f["input_ids"] for f in examples(lengths, seed=3)]
        prompts = [[5, 6, 7] + tail for tail in tails]  # a prefix shared by the two questions of each group
        scores = shared_prefix_log_probs(model, {0: prompts}, answers, 64, groups=[0, 0, 1, 1])[0]
        ends = torch.tensor(list(map(len, prompts))).cumsum(0) - 1
        expected = torch.log_softmax(unpacked(prompts)[ends], -1)[:, answers]
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
