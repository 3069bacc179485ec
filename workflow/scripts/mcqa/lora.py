"""A LoRA adapter read for merging, and the merge arithmetic: one home for the streaming merge of a checkpoint
(merge_lora.py) and the merge of a loaded model on its device (scoring a fold model from base and adapter).

For every base weight with a LoRA pair, W' = W + scale * B @ A is computed in
fp32 and rounded once to W's dtype (DoRA then rescales each output row of W'
to its learnt magnitude: m * W' / ||W'||); modules_to_save weights replace
the base ones. Only adapters whose every adapter_config.json field is one the
merge reproduces exactly are read (ACCEPTED); any other is refused, naming
the field, rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."


class MergeError(Exception):
    """The adapter cannot be merged exactly into this base; the message says why."""


# adapter_config.json fields the merge reads, or that decide only which layers were adapted (the tensors
# say that) or how training ran: any value is merged exactly (tests/test_model_stages.py checks each
# against peft's merge_and_unload).
ANY_VALUE = {
    "peft_type", "r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora", "fan_in_fan_out",
    "modules_to_save", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "runtime_config", "megatron_core", "qalora_group_size",
}
# Fields with the values the merge reproduces exactly; any other value changes what the adapter computes
# (a bias on B, weights that moved the base at initialisation, layers added or quantisation-aware scaling)
# in a way W + scale * B @ A does not hold.
ONLY_VALUES = {
    "bias": ["none"], "lora_bias": [False], "init_lora_weights": [True, False, "gaussian"], "use_qalora": [False],
    "layer_replication": [None], "trainable_token_indices": [None], "target_parameters": [None],
    "alora_invocation_tokens": [None], "megatron_config": [None], "loftq_config": [{}, None],
    "eva_config": [None], "corda_config": [None], "lora_ga_config": [None], "velora_config": [None],
    "monteclora_config": [None], "use_bdlora": [None, False], "arrow_config": [None], "kasa_config": [None],
    "ensure_weight_tying": [False],
}


def refused_fields(config: dict) -> list[str]:
    """The adapter_config.json fields (with their values) that the merge cannot reproduce exactly. A field
    peft adds later is accepted only at an empty value (None, False, {} or [])."""
    refused = []
    for field, value in sorted(config.items()):
        if field in ANY_VALUE:
            continue
        allowed = ONLY_VALUES.get(field, [None, False, {}, []])
        if value not in allowed:
            refused.append(f"{field}: {json.dumps(value)} (merged exactly only with "
                           f"{' or '.join(json.dumps(v) for v in allowed)})")
    return refused


def pattern_value(patterns: dict, module: str, default):
    """The value of peft's rank_pattern or alpha_pattern for a module: the first key that matches the end of
    its name as a regular expression (peft's get_pattern_key), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, dict], dict[str, torch.Tensor]]:
    """(adapter config, {base weight name: {'A', 'B', 'scale', 'transpose'[, 'magnitude']}},
    {base weight name: replacement}), or MergeError naming what cannot be merged exactly."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{adapter_dir}: peft_type {config.get('peft_type')!r}; only LORA adapters can be merged here")
    if refused := refused_fields(config):
        raise MergeError(f"{adapter_dir}/adapter_config.json: the merge cannot reproduce this adapter exactly: "
                         + "; ".join(refused) + ". Merge it with peft's merge_and_unload instead.")
    if config.get("use_dora") and config.get("fan_in_fan_out"):
        raise MergeError(f"{adapter_dir}: a DoRA adapter on transposed (fan_in_fan_out) layers normalises columns, "
                         "which the row-by-row merge cannot do; merge it with peft's merge_and_unload instead")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_embedding_" in name:
            raise MergeError(f"{adapter_dir}: {key} is LoRA on an embedding layer, which this merge does not "
                             "handle; train the embedding in full (modules_to_save) or leave it out of target_modules")
        if name.endswith(".lora_magnitude_vector"):  # DoRA: the magnitude of each output row
            pairs.setdefault(name[: -len(".lora_magnitude_vector")] + ".weight", {})["magnitude"] = value.float()
        elif match := re.fullmatch(r"(.+)\.lora_([AB])\.(\w+)", name):
            module, part, kind = match.groups()
            if kind != "weight":
                raise MergeError(f"{adapter_dir}: {key} is not a LoRA weight (a bias?), which this merge cannot add")
            pairs.setdefault(module + ".weight", {})[part] = value.float()
        else:
            replacements[name] = value
    for weight, pair in pairs.items():
        if not {"A", "B"} <= set(pair):
            raise MergeError(f"{adapter_dir}: {weight} lacks lora_A or lora_B (has {', '.join(sorted(pair))})")
        module = weight[: -len(".weight")]
        rank = pair["A"].shape[0]
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        pair["scale"] = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pair["transpose"] = bool(config.get("fan_in_fan_out"))
    return config, pairs, replacements


def fit_problems(shapes: dict[str, tuple[int, ...]], pairs: dict, replacements: dict) -> list[str]:
    """Why the adapter does not fit a base whose weights have `shapes` (name -> shape); [] if it does."""
    problems = []
    for weight, pair in pairs.items():
        if weight not in shapes:
            problems.append(f"LoRA module {weight[:-7]} does not exist in the base model")
            continue
        out_features, in_features = pair["B"].shape[0], pair["A"].shape[1]
        expected = (in_features, out_features) if pair["transpose"] else (out_features, in_features)
        if shapes[weight] != expected:
            problems.append(f"{weight}: adapter expects shape {expected}, base has {shapes[weight]}")
    for weight, value in replacements.items():
        if weight not in shapes:
            problems.append(f"saved module weight {weight} does not exist in the base model")
        elif shapes[weight] != tuple(value.shape):
            hint = " (different vocabulary size: was the adapter trained on another base or tokenizer?)" if (
                "embed" in weight or "lm_head" in weight
            ) else ""
            problems.append(f"{weight}: adapter has shape {tuple(value.shape)}, base has {shapes[weight]}{hint}")
    return problems


def merge_tensor(name: str, weight: torch.Tensor, pairs: dict, replacements: dict, first_row: int = 0,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Rows first_row: of the merged weight, written over `weight` (those rows of the base) and returned.

    The sum is taken in fp32 on the weight's device (in `scratch` when it is
    big enough) and rounded once to the base dtype; the pair's tensors must
    be on that device.
    """
    rows = slice(first_row, first_row + weight.shape[0])
    if name in replacements:
        return weight.copy_(replacements[name].reshape(-1, *weight.shape[1:])[rows])
    if name not in pairs:
        return weight
    pair = pairs[name]
    fits = scratch is not None and scratch.numel() >= weight.numel()
    merged = scratch[: weight.numel()].view(weight.shape) if fits else torch.empty(weight.shape, device=weight.device)
    merged.copy_(weight)
    # W' rows = W rows + scale * (B @ A) rows; with fan_in_fan_out W is stored transposed.
    if pair["transpose"]:
        merged.addmm_(pair["A"][:, rows].T, pair["B"].T, alpha=pair["scale"])
    else:
        merged.addmm_(pair["B"][rows], pair["A"], alpha=pair["scale"])
    if "magnitude" in pair:
        merged.mul_((pair["magnitude"][rows] / torch.linalg.norm(merged, dim=1)).unsqueeze(1))
    return weight.copy_(merged)


@torch.no_grad()
def merge_into(model: torch.nn.Module, adapter_dir: Path) -> int:
    """Merge an adapter into a loaded, unquantised model's weights in place, on their device, with
    merge_tensor (so the weights equal those merge_lora.py writes, up to the device's fp32 rounding of
    B @ A); returns how many weights changed. MergeError if the adapter does not fit."""
    _, pairs, replacements = read_adapter(adapter_dir)
    params = dict(model.named_parameters())
    if problems := fit_problems({n: tuple(p.shape) for n, p in params.items()}, pairs, replacements):
        raise MergeError("the adapter does not fit this base model:\n  " + "\n  ".join(problems))
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # no TF32 for B @ A: merge_lora.py's arithmetic
    try:
        for name, pair in pairs.items():
            weight = params[name].data
            merge_tensor(name, weight, {name: {k: v.to(weight.device) if torch.is_tensor(v) else v
                                               for k, v in pair.items()}}, {})
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    for name, value in replacements.items():
        params[name].data.copy_(value)
    return len(pairs) + len(replacements)


def apply_adapter(model: torch.nn.Module, adapter: Path) -> tuple[torch.nn.Module, str]:
    """A loaded base with a LoRA adapter put in, and how, for the log.

    Plain weights get the adapter merged in place on their device, with the
    arithmetic of merge_lora.py (merge_into): the model then scores
    as the merged checkpoint would, up to the device's rounding, without one
    being written. An 8-bit or 4-bit base cannot take a merge without losing
    it to the quantisation, so there peft runs the adapter's layers unmerged.
    """
    if getattr(model, "hf_quantizer", None) is None:
        changed = merge_into(model, adapter)
        return model, f"{adapter} merged into {changed} weights on {model.device} as the base loaded"
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).get_base_model(), \
        f"{adapter} run unmerged by peft over the quantised base"
