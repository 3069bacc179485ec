"""FP8 products of a frozen base under LoRA, with the base's weights cast to FP8 once.

A LoRA step multiplies by each frozen weight twice: forward (x @ W.T) and backward to the activations
(grad @ W). torchao's float8 training casts the weight to FP8 at every step, in both directions, because it
is written for weights that change; a frozen base's never do, so here each weight is cast once, in the two
layouts the two products read, and its bf16 copy is dropped (the same memory: two bytes a weight). Only the
activations and their gradients are cast each step. No weight gradient is formed at all.
"""

from __future__ import annotations

import torch

FLOAT8 = torch.float8_e4m3fn
RECIPES = ("tensorwise", "rowwise")


def to_float8(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor in FP8 (e4m3) and the float32 factor that restores its scale: one a row (rowwise, each row
    over the dimension a product sums) or one for the tensor. The factors are powers of two, so scaling adds
    no rounding of its own and survives a cast to bf16 unchanged."""
    # Read here, not from a module-level float: compiled with dynamic shapes, a global float becomes an input
    # of the graph, which dynamo (torch 2.11-2.13) fails to lift into the second FP8 product of a layer.
    largest = torch.finfo(FLOAT8).max
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = torch.exp2(torch.floor(torch.log2(largest / amax.float().clamp(min=1e-12))))
    return (x.float() * scale).clamp(-largest, largest).to(FLOAT8), scale.reciprocal()


def float8_product(a: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor, rowwise: bool,
                   fast_accumulation: bool) -> torch.Tensor:
    """a (M x K, high precision) @ b.T in FP8, where b (N x K) is given in FP8 as `b_rows` with its factors."""
    a8, a_scale = to_float8(a, rowwise)
    return torch._scaled_mm(a8, b_rows.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accumulation)


class FrozenFloat8Product(torch.autograd.Function):
    """x @ W.T with W frozen in FP8: the gradient goes to x alone. As torchao does, the forward product
    accumulates fast and the backward one exactly (its gradients are what LoRA learns from)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, weight_t, weight_t_scale, rowwise):
        ctx.save_for_backward(weight_t, weight_t_scale)
        ctx.rowwise = rowwise
        return float8_product(x, weight, weight_scale, rowwise, fast_accumulation=True)

    @staticmethod
    def backward(ctx, grad):
        weight_t, weight_t_scale = ctx.saved_tensors
        grad_x = float8_product(grad.contiguous(), weight_t, weight_t_scale, ctx.rowwise, fast_accumulation=False)
        return grad_x, None, None, None, None, None


class FrozenFloat8Linear(torch.nn.Module):
    """A frozen nn.Linear whose products run in FP8 (`recipe`: tensorwise or rowwise scaling).

    The FP8 weights are kept as bytes (uint8) and their factors are powers of two: a whole-model cast such as
    DeepSpeed's .bfloat16() converts every floating-point buffer, and would otherwise turn the FP8 weights
    into bf16 numbers the FP8 product cannot read.
    """

    def __init__(self, linear: torch.nn.Linear, recipe: str):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"fp8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
        self.in_features, self.out_features, self.recipe = linear.in_features, linear.out_features, recipe
        weight = linear.weight.detach()
        for name, rows in (("weight", weight), ("weight_t", weight.t())):  # forward reads W, backward W.T
            data, scale = to_float8(rows.contiguous(), recipe == "rowwise")
            self.register_buffer(f"{name}_float8", data.view(torch.uint8))
            self.register_buffer(f"{name}_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = FrozenFloat8Product.apply(rows, self.weight_float8.view(FLOAT8), self.weight_scale.float(),
                                      self.weight_t_float8.view(FLOAT8), self.weight_t_scale.float(),
                                      self.recipe == "rowwise")
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}"


def takes_float8(linear: torch.nn.Module) -> bool:
    """Whether a layer's products can run in FP8: a plain linear layer whose sizes are multiples of 16 (every
    7B projection's are). The layers that cannot stay as they are."""
    return type(linear) is torch.nn.Linear and linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def as_float8_saw_it(weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """A 2-D tensor rounded to the values its FP8 forward product reads, in bf16 (which holds them exactly:
    e4m3 times a power of two)."""
    data, factor = to_float8(weight, recipe == "rowwise")
    return (data.float() * factor).to(torch.bfloat16)


def float8_lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's LoRA layers whose frozen layer training.fp8 runs in FP8: one that takes_float8 and is not
    trained."""
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)
            and takes_float8(module.base_layer) and not module.base_layer.weight.requires_grad]


def float8_frozen_base(model: torch.nn.Module, recipe: str) -> int:
    """Swap the frozen layer under each of float8_lora_layers for a FrozenFloat8Linear (after peft has wrapped
    them: peft reads the base layer's weight when it builds the adapter); returns how many."""
    layers = float8_lora_layers(model)
    for module in layers:
        module.base_layer = FrozenFloat8Linear(module.base_layer, recipe)
    return len(layers)
