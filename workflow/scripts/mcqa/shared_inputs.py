"""One product for the adapted projections of a layer that read the same input (q, k, v; gate, up), in training.

A decoder layer multiplies its normed input by q's, k's and v's weights, and later its MLP input by gate's and
up's; under LoRA each projection also multiplies the same input by its own A (rank r). Apart, that is five
frozen products and five skinny A products (each reading the whole input again) where two of each would do,
and backward the same again plus the sums of their gradients to the shared input. Here each such group's
frozen weights are concatenated once (the projections' own weights become views of the concatenation: no
memory is added) and its A matrices at every step (r rows each), so that a group costs one frozen product and
one A product each way. Each output is the same sum; only kernels' summation order can differ.

The first projection of a group that the layer calls computes the group's outputs for that input and leaves
the others theirs; each of the others takes its own if it is called with that same input tensor, and computes
alone otherwise. What is saved (the adapter, its checkpoints) does not change: only the LoRA layers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
ADAPTER = "default"


def groups_of(module: torch.nn.Module, adapted: str) -> list[list[torch.nn.Module]]:
    """The LoRA layers among `module`'s children that read one input, for each group of SHARED_INPUTS that has
    two or more of them, adapted with `adapted` and nothing that would make them differ (dropout, DoRA or
    another variant, a second adapter). peft's bitsandbytes layers (an 8-bit or 4-bit base) forward otherwise
    and are not taken."""
    from peft.tuners.lora import Linear as LoraLinear

    groups = []
    for names in SHARED_INPUTS:
        layers = [getattr(module, name, None) for name in names]
        layers = [layer for layer in layers if type(layer) is LoraLinear and fusable(layer, adapted)]
        if len(layers) > 1:
            groups.append(layers)
    return groups


def fusable(layer: torch.nn.Module, adapted: str) -> bool:
    return (list(layer.lora_A) == [adapted] and not layer.lora_variant and not layer.fan_in_fan_out
            and isinstance(layer.lora_dropout[adapted], torch.nn.Identity))


def fused_base(layers: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The group's frozen weights (and biases) concatenated, the layers' own made views of them; None where the
    frozen layers are not plain linear ones of one dtype with nothing trained in them (FP8: those keep their
    own products)."""
    bases = [layer.base_layer for layer in layers]
    weights = [base.weight for base in bases] if all(type(base) is torch.nn.Linear for base in bases) else []
    if not weights or any(w.requires_grad or w.dtype != weights[0].dtype for w in weights):
        return None
    biases = [base.bias for base in bases]
    if len({b is None for b in biases}) > 1 or any(b is not None and b.requires_grad for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat(weights)
        bias = None if biases[0] is None else torch.cat(biases)
    start = 0
    for base in bases:
        rows = slice(start, start + base.out_features)
        base.weight = torch.nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            base.bias = torch.nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


class SharedInputGroup(torch.nn.Module):
    """A group's concatenated frozen weights (buffers, not saved) and the product its LoRA layers share."""

    def __init__(self, layers: list[torch.nn.Module], adapted: str):
        super().__init__()
        self.layers = layers  # a plain list: they stay submodules of their own parent only
        self.adapted = adapted
        self.sizes = [layer.base_layer.out_features for layer in layers]
        base = fused_base(layers)
        self.register_buffer("weight", None if base is None else base[0], persistent=False)
        self.register_buffer("bias", None if base is None else base[1], persistent=False)
        self.waiting: list[torch.Tensor | None] = [None] * len(layers)
        self.waiting_input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output for `x`, as peft's forward gives it: frozen product plus scaled B(A(x))."""
        if self.weight is None:
            bases = [layer.base_layer(x) for layer in self.layers]
        else:
            bases = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        first = self.layers[0]
        lora_x = first._cast_input_dtype(x, first.lora_A[self.adapted].weight.dtype)
        a = torch.cat([layer.lora_A[self.adapted].weight for layer in self.layers])
        hidden = F.linear(lora_x, a).split([layer.r[self.adapted] for layer in self.layers], dim=-1)
        return [(base + layer.lora_B[self.adapted](h) * layer.scaling[self.adapted]).to(base.dtype)
                for base, layer, h in zip(bases, self.layers, hidden)]

    def output_of(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `index`'s output for `x`: left by the group's product if it read this very tensor, otherwise
        the group's product now, the others' outputs left for them. Nothing is held once all are taken."""
        if self.waiting[index] is not None and self.waiting_input is x:
            output, self.waiting[index] = self.waiting[index], None
        else:
            outputs = self(x)
            output, self.waiting = outputs[index], [None if i == index else o for i, o in enumerate(outputs)]
            self.waiting_input = x
        if all(w is None for w in self.waiting):
            self.waiting_input = None
        return output


def shared_forward(layer: torch.nn.Module, group: SharedInputGroup, index: int):
    """`layer`'s forward as a member of `group`; peft's own where the call is not a plain adapted one."""
    alone = layer.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [group.adapted]:
            return alone(x, *args, **kwargs)
        return group.output_of(index, x)

    return forward


def share_inputs(model: torch.nn.Module, adapted: str = ADAPTER) -> str:
    """Give the LoRA layers of `model` (a peft model) that read one input one product a group (module doc);
    says what was done, for the log."""
    fused = {"frozen and LoRA": 0, "LoRA only": 0}
    for module in list(model.modules()):
        for layers in groups_of(module, adapted):
            group = SharedInputGroup(layers, adapted)
            names = "_".join(name for name, child in module.named_children() if child in layers)
            module.add_module(f"shared_input_{names}", group)
            for index, layer in enumerate(layers):
                layer.forward = shared_forward(layer, group, index)
            fused["LoRA only" if group.weight is None else "frozen and LoRA"] += 1
    if not any(fused.values()):
        return "none (no two adapted projections read one input without dropout)"
    return ", ".join(f"{n} groups {what}" for what, n in fused.items() if n)
