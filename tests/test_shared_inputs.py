"""The projections that read one input train as one product (training.fuse_shared_inputs) exactly as peft trains
them apart (CPU)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from mcqa.attention import PACKED_ATTENTION
from mcqa.batching import AnswerOnlyCollator
from mcqa.float8 import FrozenFloat8Linear
from mcqa.modeling import without_attention_mask
from mcqa.shared_inputs import SharedInputGroup, share_inputs
from mcqa.training import float8_base
from test_packing import examples, loss_and_lora_gradients

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(architecture: str) -> torch.nn.Module:
    torch.manual_seed(1)
    if architecture == "gemma3":  # q and k normed after their products, a GELU MLP, one key-value head
        return Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=8, pad_token_id=2, layer_types=["sliding_attention", "full_attention"]))
    return LlamaForCausalLM(LlamaConfig(  # "bias": q, k and v with biases, as Qwen2's
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=2, tie_word_embeddings=False, attention_bias=architecture == "bias"))


def lora(architecture: str, targets=TARGETS, dropout: float = 0.0, fp8: str = "none") -> torch.nn.Module:
    model = get_peft_model(base(architecture), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                          target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained adapter: with B = 0, A would get no gradient to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    float8_base(model, fp8, "none", on_any_device=True)
    model.set_attn_implementation(PACKED_ATTENTION)
    return model


BATCH = without_attention_mask(AnswerOnlyCollator(pad_token_id=2, packed=True)(examples([9, 23, 5, 17, 12])))
# On a CPU, packed attention breaks a compiled layer's graph (its variable-length kernel is CUDA's): padded rows
PADDED = AnswerOnlyCollator(pad_token_id=2)(examples([9, 23, 5, 17, 12]))


def packed_loss_and_lora_gradients(model) -> tuple[torch.Tensor, torch.Tensor]:
    return loss_and_lora_gradients(model, BATCH, PACKED_ATTENTION)


def storage_bytes(model) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


@pytest.mark.parametrize("architecture, checkpointing", [("llama", False), ("bias", False), ("gemma3", False),
                                                         ("llama", True)])
def test_one_product_a_group_trains_as_each_projection_alone(architecture, checkpointing):
    """The loss and every LoRA gradient as peft's own projections give them (grouped-query attention, q/k/v
    biases, Gemma's norms after q and k, activations recomputed); the frozen weights become views of the
    groups' (no byte added) and the adapter saves the same tensors under the same names."""
    apart, fused = lora(architecture), lora(architecture)
    before = storage_bytes(fused)
    assert share_inputs(fused) == "4 groups frozen and LoRA"
    assert storage_bytes(fused) == before
    q_proj = fused.base_model.model.model.layers[0].self_attn.q_proj
    group = fused.base_model.model.model.layers[0].self_attn.shared_input_q_proj_k_proj_v_proj
    assert q_proj.base_layer.weight.data_ptr() == group.weight.data_ptr()
    for model in (apart, fused) if checkpointing else ():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
    loss_apart, grads_apart = packed_loss_and_lora_gradients(apart)
    loss, grads = packed_loss_and_lora_gradients(fused)
    torch.testing.assert_close(loss, loss_apart, rtol=1e-5, atol=1e-6)
    assert grads_apart.abs().max() > 1e-3
    torch.testing.assert_close(grads, grads_apart, rtol=1e-4, atol=1e-6)
    saved, saved_apart = get_peft_model_state_dict(fused), get_peft_model_state_dict(apart)
    assert saved.keys() == saved_apart.keys() and all(torch.equal(saved[k], saved_apart[k]) for k in saved)
    # nothing left waiting after a pass: no activation outlives the step
    assert all(g.waiting_input is None and g.waiting == [None] * len(g.waiting)
               for g in fused.modules() if isinstance(g, SharedInputGroup))


def test_fp8_frozen_layers_keep_their_products_and_share_loras():
    """Under FP8 the frozen layers' products stay each their own (cast once, FP8 weights not concatenated); the
    LoRA A products are still one a group, and the gradients are FP8's own."""
    apart, fused = lora("llama", fp8="rowwise"), lora("llama", fp8="rowwise")
    assert share_inputs(fused) == "4 groups LoRA only"
    assert isinstance(fused.base_model.model.model.layers[0].mlp.up_proj.base_layer, FrozenFloat8Linear)
    for got, want in zip(packed_loss_and_lora_gradients(fused), packed_loss_and_lora_gradients(apart)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_what_cannot_share_an_input_is_left_alone():
    """Dropout draws a mask a projection, so those are not fused; a projection that is the only adapted one of
    its group has nothing to share; frozen layers whose biases train keep their own products; the layers' log
    line says so."""
    assert share_inputs(lora("llama", dropout=0.1)).startswith("none")
    assert share_inputs(lora("llama", targets=["q_proj", "o_proj", "up_proj"])).startswith("none")
    assert share_inputs(lora("llama", targets=["q_proj", "v_proj"])) == "2 groups frozen and LoRA"
    trained_biases = lora("bias")
    for name, p in trained_biases.named_parameters():
        p.requires_grad_(p.requires_grad or name.endswith("base_layer.bias"))  # as peft's bias="all" trains them
    assert share_inputs(trained_biases) == "2 groups frozen and LoRA, 2 groups LoRA only"  # q, k, v: LoRA only


def test_a_projection_called_on_another_input_or_without_its_adapter_computes_alone():
    """k called on a tensor other than the one q's group product read gets its own product of that tensor; with
    the adapter disabled each projection is the frozen layer alone."""
    apart, fused = lora("llama"), lora("llama")
    share_inputs(fused)
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    attention, attention_apart = (m.base_model.model.model.layers[1].self_attn for m in (fused, apart))
    for layer, inputs in (("q_proj", x), ("k_proj", other), ("v_proj", x), ("k_proj", x)):
        torch.testing.assert_close(getattr(attention, layer)(inputs), getattr(attention_apart, layer)(inputs))
    with fused.disable_adapter(), apart.disable_adapter():
        torch.testing.assert_close(fused(**BATCH).logits, apart(**BATCH).logits)


def test_a_group_compiles_into_the_layers_graph_with_fewer_products():
    """Dynamo traces the groups into each decoder layer's graph without a break, as training compiles the
    layers: a layer's 21 linear products (7 frozen, 7 A, 7 B) become 15 (4 frozen, 4 A, 7 B), and the
    compiled gradients are those of the projections apart."""
    graphs = []

    def backend(graph: torch.fx.GraphModule, _):
        graphs.append(graph)
        return graph.forward

    apart, fused = lora("llama"), lora("llama")
    _, grads_apart = loss_and_lora_gradients(apart, PADDED, "sdpa")
    torch._dynamo.reset()
    share_inputs(fused)
    fused.enable_input_require_grads()
    for layer in fused.base_model.model.model.layers:
        layer.compile(backend=backend, dynamic=True)
    _, grads = loss_and_lora_gradients(fused, PADDED, "sdpa")
    torch._dynamo.reset()
    assert len(graphs) == 2  # one a layer: no graph break
    for graph in graphs:
        assert sum("linear" in str(node.target) for node in graph.graph.nodes) == 15
    torch.testing.assert_close(grads, grads_apart, rtol=1e-4, atol=1e-6)
