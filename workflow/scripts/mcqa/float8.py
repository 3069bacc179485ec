"""FP8 products of a frozen base under LoRA, with the base's weights cast to FP8 once.

A LoRA step multiplies by each frozen weight twice: forward (x @ W.T) and backward to the activations
(grad @ W). torchao's float8 training casts the weight to FP8 at every step, in both directions, because it
is written for weights that change; a frozen base's never do, so here each weight is cast once, in the
layouts the products read, and its bf16 copy is dropped. Only the activations and their gradients are cast
each step. No weight gradient is formed at all.

Three scalings (`recipe`), from coarsest to finest: one factor for a tensor (tensorwise), one a row
(rowwise: a token's activations, a weight's output row), one for each 128 values along the dimension a
product sums (blockwise, as DeepSeek-V3 trains: an outlier spoils only its own block's precision). The
backward product to the activations, whose result is what LoRA learns from, can stay in bf16
(`backward_in_float8=False`): it then reads the FP8 weights dequantized, one layer at a time.
"""

from __future__ import annotations

import torch

FLOAT8 = torch.float8_e4m3fn
RECIPES = ("tensorwise", "rowwise", "blockwise")
BLOCK = 128  # blockwise: values along the summed dimension that share a factor (cuBLAS's 1x128 blocks)


def to_float8(x: torch.Tensor, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor (rows x K) in FP8 (e4m3) and the float32 factors that restore its scale: one for the
    tensor (0-d), one a row (rows x 1) or one a block of BLOCK along K (rows x K/BLOCK). The factors are powers
    of two, so scaling adds no rounding of its own and survives a cast to bf16 unchanged."""
    # Read here, not from a module-level float: compiled with dynamic shapes, a global float becomes an input
    # of the graph, which dynamo (torch 2.11-2.13) fails to lift into the second FP8 product of a layer.
    largest = torch.finfo(FLOAT8).max
    values = x.float()
    if recipe == "blockwise":
        values = values.unflatten(-1, (-1, BLOCK))
    amax = values.abs().amax() if recipe == "tensorwise" else values.abs().amax(dim=-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(largest / amax.clamp(min=1e-12))))
    data = (values * scale).clamp(-largest, largest).to(FLOAT8)
    if recipe == "blockwise":
        return data.flatten(-2), scale.squeeze(-1).reciprocal()
    return data, scale.reciprocal()


def weight_scale_for_product(factor: torch.Tensor, recipe: str) -> torch.Tensor:
    """The factors of a weight b (N x K) as torch._scaled_mm reads them for the product a @ b.T: a scalar,
    1 x N (rowwise) or K/BLOCK x N (blockwise), contiguous."""
    return factor if recipe == "tensorwise" else factor.t().contiguous()


def dequantized(data: torch.Tensor, scale: torch.Tensor, recipe: str) -> torch.Tensor:
    """A weight (N x K) from its FP8 bytes and its product-layout factors, in bf16 (exact: e4m3 times a power
    of two fits bf16's 8 exponent and 7 mantissa bits)."""
    factor = scale if recipe == "tensorwise" else scale.t()
    if recipe == "blockwise":
        factor = factor.repeat_interleave(BLOCK, dim=-1)
    return (data.float() * factor).to(torch.bfloat16)


def float8_product(a: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor, recipe: str,
                   fast_accumulation: bool) -> torch.Tensor:
    """a (M x K, high precision) @ b.T in FP8, where b (N x K) is given in FP8 as `b_rows` with its factors
    (weight_scale_for_product's layout)."""
    if recipe == "blockwise":
        if a.device.type != "cuda":
            # cuBLAS alone has blockwise products (CUDA 12.9, Hopper); elsewhere, the same numbers (FP8 values
            # times their factors, summed in float32), as the tests and the CPU precision check read them
            a8, a_factor = to_float8(a, recipe)
            return dequantized(a8, weight_scale_for_product(a_factor, recipe), recipe).float().mm(
                dequantized(b_rows, b_scale, recipe).float().t()).to(torch.bfloat16)
        # cuBLAS reads a's block factors M-major, the rows a multiple of 4 (16 here: aligned for any kernel);
        # it sums each block in float32 (no fast accumulation)
        rows = a.shape[0]
        a8, a_factor = to_float8(torch.nn.functional.pad(a, (0, 0, 0, -rows % 16)), recipe)
        return torch._scaled_mm(a8, b_rows.t(), scale_a=a_factor.t().contiguous().t(), scale_b=b_scale,
                                out_dtype=torch.bfloat16)[:rows]
    a8, a_factor = to_float8(a, recipe)
    return torch._scaled_mm(a8, b_rows.t(), scale_a=a_factor, scale_b=b_scale, out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accumulation)


class FrozenFloat8Product(torch.autograd.Function):
    """x @ W.T with W frozen in FP8: the gradient goes to x alone. As torchao does, the forward product
    accumulates fast and the backward one exactly (its gradients are what LoRA learns from). Without W.T in
    FP8 (`weight_t` None), the backward product runs in bf16 on W dequantized."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, weight_t, weight_t_scale, recipe):
        ctx.save_for_backward(weight, weight_scale, weight_t, weight_t_scale)
        ctx.recipe = recipe
        return float8_product(x, weight, weight_scale, recipe, fast_accumulation=True)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale, weight_t, weight_t_scale = ctx.saved_tensors
        if weight_t is None:
            grad_x = grad.to(torch.bfloat16).mm(dequantized(weight, weight_scale, ctx.recipe))
        else:
            grad_x = float8_product(grad.contiguous(), weight_t, weight_t_scale, ctx.recipe,
                                    fast_accumulation=False)
        return grad_x, None, None, None, None, None


class FrozenFloat8Linear(torch.nn.Module):
    """A frozen nn.Linear whose products run in FP8 (`recipe`: tensorwise, rowwise or blockwise scaling; with
    `backward_in_float8` False, the forward product only, one FP8 copy of the weight instead of two).

    The FP8 weights are kept as bytes (uint8) and their factors are powers of two: a whole-model cast such as
    DeepSpeed's .bfloat16() converts every floating-point buffer, and would otherwise turn the FP8 weights
    into bf16 numbers the FP8 product cannot read.
    """

    def __init__(self, linear: torch.nn.Linear, recipe: str, backward_in_float8: bool = True):
        super().__init__()
        if recipe not in RECIPES:
            raise ValueError(f"fp8 recipe {recipe!r}: use one of {', '.join(RECIPES)}")
        if not takes_float8(linear, recipe):
            raise ValueError(f"{linear}: fp8 {recipe} needs a linear layer whose sizes are multiples of "
                             f"{BLOCK if recipe == 'blockwise' else 16}")
        self.in_features, self.out_features, self.recipe = linear.in_features, linear.out_features, recipe
        weight = linear.weight.detach()
        layouts = {"weight": weight, "weight_t": weight.t()}  # forward reads W, backward W.T
        for name, rows in layouts.items():
            data, scale = (None, None)
            if name == "weight" or backward_in_float8:
                data, factor = to_float8(rows.contiguous(), recipe)
                data, scale = data.view(torch.uint8), weight_scale_for_product(factor, recipe)
            self.register_buffer(f"{name}_float8", data)
            self.register_buffer(f"{name}_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        backward = self.weight_t_float8 is not None
        y = FrozenFloat8Product.apply(rows, self.weight_float8.view(FLOAT8), self.weight_scale.float(),
                                      self.weight_t_float8.view(FLOAT8) if backward else None,
                                      self.weight_t_scale.float() if backward else None, self.recipe)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        backward = "FP8" if self.weight_t_float8 is not None else "bf16"
        return (f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe}, "
                f"backward={backward}")


def takes_float8(linear: torch.nn.Module, recipe: str) -> bool:
    """Whether a layer's products can run in FP8 with `recipe`: a plain linear layer whose sizes are multiples
    of 16 (FP8 products; every 7B projection's are), for blockwise ones of its blocks of 128 (11008 = 86 x 128).
    The layers that cannot stay as they are."""
    multiple = BLOCK if recipe == "blockwise" else 16
    return (type(linear) is torch.nn.Linear and linear.in_features % multiple == 0
            and linear.out_features % multiple == 0)


def as_float8_saw_it(weight: torch.Tensor, recipe: str) -> torch.Tensor:
    """A weight (N x K) rounded to the values its forward FP8 product reads (bf16 holds them exactly)."""
    data, factor = to_float8(weight, recipe)
    return dequantized(data, weight_scale_for_product(factor, recipe), recipe)


def float8_frozen_base(model: torch.nn.Module, recipe: str, backward_in_float8: bool = True) -> int:
    """Swap the frozen linear layer under each of the model's LoRA layers that takes_float8 for a
    FrozenFloat8Linear (after peft has wrapped them: peft reads the base layer's weight when it builds the
    adapter); returns how many."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(module, LoraLayer) and takes_float8(base, recipe) and not base.weight.requires_grad:
            module.base_layer = FrozenFloat8Linear(base, recipe, backward_in_float8)
            swapped += 1
    return swapped
