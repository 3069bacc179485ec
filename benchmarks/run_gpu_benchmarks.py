"""GPU benchmarks of the workflow's stages against the reference recipe, on one card, in one run.

    python benchmarks/run_gpu_benchmarks.py --train-xlsx AI.xlsx --test-xlsx AI1000.xlsx \
        --work benchmarks/work --out benchmarks/results/<name>.json [--stages setup,train,merge,answer]

The model is Llama-2-7B's shape (hidden 4096, 32 layers, MLP 11008, vocab
55,296 as Chinese-LLaMA-2) with random weights, saved in 2 GB shards; the
tokenizer is trained on the training file so token lengths are realistic.
Each stage runs the workflow's own script in a subprocess, then the recipe's
way of doing the same work. Stages can run in separate calls; results
accumulate in WORK/results.json. `--shape tiny` runs the whole harness on a CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))

from mcqa.demo_model import build_model, train_tokenizer  # noqa: E402
from mcqa.float8 import RECIPES  # noqa: E402
from mcqa.history import logging_steps, read_history  # noqa: E402
from mcqa.modeling import load_tokenizer  # noqa: E402
from mcqa.prompt import prompt_text  # noqa: E402
from mcqa.records import read_records  # noqa: E402
from mcqa.scoring import encode_all  # noqa: E402
from mcqa.batching import micro_batches  # noqa: E402
from mcqa.training import tokenize  # noqa: E402

SHAPES = {
    "7b": dict(vocab_size=55296, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
    "tiny": dict(vocab_size=3000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4),
    # the 7B's depth at a width a CPU runs in seconds (fp8_check: how rounding errors grow with depth)
    "deep_narrow": dict(vocab_size=3000, hidden_size=256, intermediate_size=672, num_layers=32, num_heads=4),
}
# The workflow's default training settings (the schema's), checkpoints and evaluations off.
DEFAULTS = {key: spec["default"] for key, spec in
            yaml.safe_load((REPO / "workflow/schemas/training.schema.yaml").read_text())["properties"].items()}
LORA = {**DEFAULTS, "checkpoint_steps": 10**6, "eval_steps": 10**6}
FUSED_KERNELS = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())[
    "properties"]["answering"]["properties"]["fused_kernels"]["default"]
# How the recipe trained: micro-batch 1, 8 accumulated, fp16 on an 8-bit base, gradient checkpointing.
RECIPE = {"micro_batch_size": 1, "micro_batch_tokens": 0, "gradient_accumulation_steps": 8, "packing": False,
          "compile": False, "gradient_checkpointing": True}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class CommandFailed(SystemExit):
    """A stage's command exited non-zero; `last_line` is the last line of its log (the error, as a rule)."""

    def __init__(self, message: str, last_line: str) -> None:
        super().__init__(message)
        self.last_line = last_line


def run(command: list, log_file: Path, environment: dict | None = None) -> None:
    log(" ".join(map(str, command))[:300] + (f" with {environment}" if environment else ""))
    with open(log_file, "w") as fh:
        code = subprocess.call([str(c) for c in command], stdout=fh, stderr=subprocess.STDOUT,
                               env={**os.environ, **(environment or {})})
    if code:
        text = log_file.read_text()
        raise CommandFailed(f"failed ({code}): see {log_file}\n" + text[-3000:],
                            next((line for line in reversed(text.splitlines()) if line.strip()), "")[:400])


def cuda() -> bool:
    return torch.cuda.is_available()


def matmul_peak_tflops() -> float:
    """Measured bf16 matmul rate on random 8192^3 products (median of 10 after warm-up)."""
    if not cuda():
        return float("nan")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def device_info() -> dict:
    import peft
    import transformers

    info = {"device": torch.cuda.get_device_name() if cuda() else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    return info


def setup(args, work: Path, shape: dict) -> dict:
    data = work / "data"
    run([sys.executable, SCRIPTS / "prepare_data.py", "train", "--input", args.train_xlsx, "--train-out",
         data / "train.json", "--val-out", data / "val.json", "--report-out", data / "train_report.json",
         "--val-fraction", "0"], work / "prepare_train.log")
    run([sys.executable, SCRIPTS / "prepare_data.py", "test", "--input", args.test_xlsx, "--out",
         data / "test.json", "--report-out", data / "test_report.json"], work / "prepare_test.log")
    records = read_records(data / "train.json", "labelled")
    log(f"training tokenizer (vocab {shape['vocab_size']}) on {len(records)} records")
    # At most two Chinese characters a token, like Chinese-LLaMA-2's vocabulary,
    # so that prompts have realistic lengths rather than this corpus's own words.
    tokenizer = train_tokenizer([r["instruction"] + r["input"] for r in records], shape["vocab_size"],
                                max_token_length=6)
    log(f"building {shape} model")
    device, dtype = ("cuda", torch.bfloat16) if cuda() else ("cpu", torch.float32)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise a 7B model in fp32
    # The embedding keeps the shape's vocabulary (55,296 for 7B) even where the
    # tokenizer trained here is smaller: speed depends on the shape, not the ids.
    model = build_model(vocab_size=max(len(tokenizer), shape["vocab_size"]), seed=0, dtype=dtype, device=device,
                        init_std=0.02, **{
        k: shape[k] for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads")})
    torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    model_vocab = model.config.vocab_size
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    start = time.perf_counter()
    model.save_pretrained(work / "base", max_shard_size="2GB" if shape is SHAPES["7b"] else "200KB")
    tokenizer.save_pretrained(work / "base")
    log(f"saved {params / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f} s")
    del model
    torch.cuda.empty_cache() if cuda() else None
    lengths = [len(p.ids) for p in encode_all(tokenizer, records, 512)]
    return {"params": params, "linear_params": linear, "vocab_size": model_vocab, "tokenizer_vocab": len(tokenizer),
            "train_examples": len(records), "train_mean_prompt_tokens": round(statistics.fmean(lengths), 1),
            "matmul_peak_tflops": round(matmul_peak_tflops(), 1)}


def train_rate(log_jsonl: Path, skip: int, leave: int = 0) -> dict:
    """Throughput from the logged step `skip` (the end of warm-up) to the last logged step before the last
    `leave` steps."""
    entries = read_history(log_jsonl)
    steps = logging_steps(entries)
    first = next(e for e in steps if e["step"] >= skip)
    last = [e for e in steps if e["step"] <= steps[-1]["step"] - leave][-1]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    return {"first_step_at_s": steps[0]["elapsed_s"],  # the clock starts after loading: the first step and its compiling
            "tokens_per_s": round((last["tokens_seen"] - first["tokens_seen"]) / seconds, 1),
            "samples_per_s": round((last["examples_seen"] - first["examples_seen"]) / seconds, 2),
            "peak_gpu_mem_gb": max((e.get("peak_gpu_mem_gb", 0) for e in entries), default=0),
            "steps_timed": last["step"] - first["step"], "seconds_timed": round(seconds, 2)}


def train_command(work: Path, out: Path, settings: dict, gpus: int) -> list:
    """train_lora.py as the train_lora rule launches it: plain python, or torchrun with ZeRO-2 on several GPUs."""
    launcher = [sys.executable] + ([] if gpus == 1 else
                                   ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"])
    command = [*launcher, SCRIPTS / "train_lora.py", "--train", work / "data/train.json", "--base-model",
               work / "base", "--out", out / "adapter", "--log-jsonl", out / "train_log.jsonl", "--checkpoint-dir",
               out / "checkpoints", "--settings", json.dumps(settings), "--compile-cache", work / "compile_cache"]
    return command + (["--deepspeed-config", REPO / "resources/deepspeed/zero2.json"] if gpus > 1 else [])


def epoch_batches(work: Path, settings: dict) -> tuple[list[int], list[list[int]]]:
    """Token lengths of the training examples and the micro-batches train_lora cuts them into."""
    features, _ = tokenize(read_records(work / "data/train.json", "labelled"), load_tokenizer(str(work / "base")),
                           settings["max_seq_length"])
    lengths = [len(f["input_ids"]) for f in features]
    return lengths, micro_batches(lengths, settings["micro_batch_size"], settings["micro_batch_tokens"], settings["seed"],
                                  settings["packing"])


def flops_per_token(shape: dict, linear_params: int, mean_context: float, settings: dict) -> float:
    """FLOPs a LoRA training step does per real token: 4N for the frozen linear layers (the forward products
    and the backward ones to the activations; a frozen weight gets no gradient), 6 for each LoRA parameter
    (forward, and the backward to its input and to its weights), and causal attention forward and backward
    (3 x 4 x hidden x the mean context a token attends to, per layer). The output layer runs at the answer
    positions only and is left out. "6N" counts weight gradients LoRA never computes: it is the conventional
    figure, not the work done."""
    sizes = {"q_proj": (shape["hidden_size"],) * 2, "k_proj": (shape["hidden_size"],) * 2,
             "v_proj": (shape["hidden_size"],) * 2, "o_proj": (shape["hidden_size"],) * 2,
             "gate_proj": (shape["hidden_size"], shape["intermediate_size"]),
             "up_proj": (shape["hidden_size"], shape["intermediate_size"]),
             "down_proj": (shape["intermediate_size"], shape["hidden_size"])}
    lora_params = shape["num_layers"] * sum(settings["lora_r"] * sum(sizes[m]) for m in settings["target_modules"])
    attention = 12 * shape["num_layers"] * shape["hidden_size"] * mean_context
    return 4 * linear_params + 6 * lora_params + attention


def train_once(work: Path, name: str, settings: dict, steps: int, skip: int, gpus: int = 1,
               profile: int = 0, log_every: int = 1, environment: dict | None = None) -> dict:
    """Train `steps` optimizer steps (a fraction of an epoch) with the given settings, logging every
    `log_every` steps (a logged step waits for the GPU), the process given `environment`'s variables too;
    with `profile`, the last that many steps run under torch.profiler (profile.json) and are not timed."""
    settings = {**LORA, **settings, "logging_steps": log_every}
    lengths, batches = epoch_batches(work, settings)
    settings["epochs"] = steps * settings["gradient_accumulation_steps"] * gpus / len(batches)
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    start = time.perf_counter()
    command = train_command(work, out, settings, gpus)
    if profile:
        command = [sys.executable, REPO / "benchmarks/profile_training.py", "--out", out / "profile.json",
                   "--first-step", steps - profile + 1, "--steps", profile, "--", *command[2:]]
    run(command, out / "train.log", environment)
    result = train_rate(out / "train_log.jsonl", skip=skip, leave=profile)
    if profile:
        result["profile"] = json.loads((out / "profile.json").read_text())
    result.update(wall_s=round(time.perf_counter() - start, 1), epoch_tokens=sum(lengths), gpus=gpus,
                  epoch_steps=math.ceil(len(batches) / (settings["gradient_accumulation_steps"] * gpus)),
                  micro_batches=len(batches), settings={k: settings[k] for k in (
                      "micro_batch_size", "micro_batch_tokens", "gradient_accumulation_steps", "precision", "load_in",
                      "gradient_checkpointing", "packing", "compile", "fp8", "lora_dropout", "fuse_shared_inputs")})
    if environment:
        result["environment"] = environment
    result["epoch_minutes"] = round(result["epoch_tokens"] / result["tokens_per_s"] / 60, 2)
    result["mean_context"] = round(sum(n * (n + 1) / 2 for n in lengths) / sum(lengths), 1)  # what a token attends to
    result["losses"] = [e["loss"] for e in logging_steps(read_history(out / "train_log.jsonl"))]
    log(f"{name}: {result}")
    return result


def train(args, work: Path, results: dict) -> dict:
    """Our training at the default settings (for each --micro-batch-tokens), each --variants entry, several
    GPUs (--gpus), and the recipe, all in one run. A variant whose training fails (out of memory, say) is
    recorded with its log's last line, and the rest still run."""
    precision = "bf16" if cuda() else "fp32"
    peak = results["setup"]["matmul_peak_tflops"] * 1e12

    def ours(name: str, overrides: dict, gpus: int = 1) -> dict:
        overrides = dict(overrides)
        environment = overrides.pop("environment", None)  # not a setting: variables for the training's process
        result = train_once(work, name, {"precision": precision, **overrides}, steps=args.train_steps,
                            # the first steps warm up (allocator, kernels, compilation)
                            skip=10, gpus=gpus, profile=args.profile_steps if gpus == 1 else 0,
                            log_every=args.logging_steps, environment=environment)
        rate = result["tokens_per_s"] / gpus
        result["flops_per_token"] = flops_per_token(SHAPES[args.shape], results["setup"]["linear_params"],
                                                    result["mean_context"], {**LORA, **overrides})
        result["tflops_done"] = round(result["flops_per_token"] * rate / 1e12, 1)
        result["utilisation_4n_lora_attention"] = round(result["flops_per_token"] * rate / peak, 3)
        result["conventional_mfu_6n"] = round(6 * results["setup"]["params"] * rate / peak, 3)
        return result

    by_budget = {budget: ours(f"train_ours_{budget}", {"micro_batch_tokens": budget})
                 for budget in args.micro_batch_tokens}
    best = max(by_budget, key=lambda b: by_budget[b]["tokens_per_s"])
    default = by_budget[best]
    result = {"ours_by_micro_batch_tokens": by_budget, "ours_micro_batch_tokens": best,
              "ours_tokens_per_s": default["tokens_per_s"], "ours_samples_per_s": default["samples_per_s"],
              "ours_peak_gpu_mem_gb": default["peak_gpu_mem_gb"],
              "ours_utilisation_4n_lora_attention": default["utilisation_4n_lora_attention"],
              "ours_conventional_mfu_6n": default["conventional_mfu_6n"],
              "ours_epoch_minutes": default["epoch_minutes"]}
    if args.variants:
        result["variants"] = {}
        for name, overrides in args.variants.items():
            try:
                variant = ours(f"train_variant_{name}", {"micro_batch_tokens": best, **overrides})
            except CommandFailed as failure:  # e.g. out of GPU memory: the other variants and the recipe still run
                log(f"train_variant_{name} failed: {failure.last_line}")
                result["variants"][name] = {"failed": failure.last_line}
                continue
            variant["tokens_per_s_vs_default"] = round(variant["tokens_per_s"] / default["tokens_per_s"], 3)
            variant["loss_vs_default"] = loss_difference(default["losses"], variant["losses"])
            result["variants"][name] = variant
    if args.gpus > 1:  # the same run on several GPUs, as resources.train.gpu launches it
        several = ours(f"train_ours_{best}_{args.gpus}gpus", {"micro_batch_tokens": best}, gpus=args.gpus)
        result.update({f"ours_{args.gpus}_gpus": several,
                       "scaling_tokens_per_s": round(several["tokens_per_s"] / default["tokens_per_s"], 2),
                       "scaling_samples_per_s": round(several["samples_per_s"] / default["samples_per_s"], 2)})
    if args.recipe_steps:
        try:
            recipe = train_once(work, "train_recipe", {
                **RECIPE, "precision": "fp16" if cuda() else "fp32", "load_in": "8bit" if cuda() else "none"},
                steps=args.recipe_steps, skip=2)
        except CommandFailed as failure:  # e.g. bitsandbytes missing: what ran before is still written
            log(f"train_recipe failed: {failure.last_line}")
            return {**result, "recipe": {"failed": failure.last_line}}
        result.update(recipe=recipe, recipe_tokens_per_s=recipe["tokens_per_s"],
                      speedup=round(result["ours_tokens_per_s"] / recipe["tokens_per_s"], 2))
    return result


def loss_difference(reference: list[float], other: list[float]) -> dict:
    """Two trainings from the same seed, step by step: the largest difference of their running-mean losses
    (the mean of every step so far) and of their single steps' losses."""
    steps = min(len(reference), len(other))
    running = [(sum(reference[:n]) / n, sum(other[:n]) / n) for n in range(1, steps + 1)]
    return {"steps": steps, "running_mean_max_abs": round(max(abs(a - b) for a, b in running), 4),
            "running_mean_final": [round(v, 4) for v in running[-1]],
            "step_max_abs": round(max(abs(a - b) for a, b in zip(reference, other)), 4)}


def check_features(work: Path, examples: int) -> list[dict]:
    """The first training examples, tokenized as training does: the batch the precision checks compare on."""
    features, _ = tokenize(read_records(work / "data/train.json", "labelled")[:examples],
                           load_tokenizer(str(work / "base")), LORA["max_seq_length"])
    return features


def with_lora(model):
    """The benchmark's LoRA on a loaded base, as a trained adapter (B = 0 would give A no gradient): the same
    adapter on every call."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # before A is drawn: the same adapter on every call
    model = get_peft_model(model, LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def loss_and_lora_gradients(model, features: list[dict], attention: str = "sdpa",
                            packed: bool = False) -> tuple[float, torch.Tensor]:
    """The loss of the examples as one batch (padded, or packed) and the gradient of every LoRA weight."""
    from mcqa.batching import AnswerOnlyCollator
    from mcqa.modeling import without_attention_mask

    model.set_attn_implementation(attention)
    batch = AnswerOnlyCollator(pad_token_id=0, packed=packed)([features])
    device = next(model.parameters()).device
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in without_attention_mask(batch).items()}
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n])


def against(reference: torch.Tensor, gradients: torch.Tensor) -> dict:
    """How far LoRA gradients are from the reference's: relative error and cosine, both in float64
    (torch's cosine_similarity over millions of entries read 1.002 for a vector against its near copy)."""
    gradients, reference = gradients.double(), reference.double()
    cosine = gradients @ reference / (gradients.norm() * reference.norm())
    return {"relative_error": float(f"{((gradients - reference).norm() / reference.norm()).item():.3g}"),
            "cosine": float(f"{cosine.item():.4g}")}


def packing_check(args, work: Path, examples: int = 8) -> dict:
    """Loss and LoRA gradients of the same examples, padded (SDPA) and packed (the varlen kernel), on the
    benchmark's base in half precision, each against the same padded batch in fp32: packing is right when
    the packed batch is no further from fp32 than the padded one is (half precision's own error)."""
    from mcqa.attention import PACKED_ATTENTION
    from mcqa.modeling import load_model

    precision = "bf16" if cuda() else "fp32"
    features = check_features(work, examples)
    model = with_lora(load_model(str(work / "base"), precision))
    padded_loss, padded = loss_and_lora_gradients(model, features)
    packed_loss, packed = loss_and_lora_gradients(model, features, PACKED_ATTENTION, packed=True)
    model.float()
    reference_loss, reference = loss_and_lora_gradients(model, features)
    del model
    torch.cuda.empty_cache() if cuda() else None
    result = {"examples": examples, "tokens": sum(len(f["input_ids"]) for f in features), "precision": precision,
              "loss_fp32_padded": reference_loss, f"loss_{precision}_padded": padded_loss,
              f"loss_{precision}_packed": packed_loss,
              f"lora_grad_relative_error_{precision}_padded": against(reference, padded)["relative_error"],
              f"lora_grad_relative_error_{precision}_packed": against(reference, packed)["relative_error"]}
    log(f"packing check: {result}")
    return result


class RoundedToFloat8(torch.autograd.Function):
    """x rounded to the FP8 values rowwise scaling gives it, the gradient passed through unchanged."""

    @staticmethod
    def forward(ctx, x):
        from mcqa.float8 import as_float8_saw_it

        return as_float8_saw_it(x.reshape(-1, x.shape[-1]), "rowwise").reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def rounded_alone(model, rounded: str) -> int:
    """Round only the weights, or only the inputs, of the layers fp8 rowwise would run in FP8 (a peft model's
    frozen base layers) to their FP8 values, the products staying in bf16; returns how many layers."""
    from mcqa.float8 import as_float8_saw_it, float8_lora_layers

    layers = [module.base_layer for module in float8_lora_layers(model)]
    for layer in layers:
        if rounded == "weights":
            with torch.no_grad():
                layer.weight.copy_(as_float8_saw_it(layer.weight, "rowwise"))
        else:
            layer.register_forward_pre_hook(lambda module, inputs: (RoundedToFloat8.apply(inputs[0]),))
    return len(layers)


def fp8_check(args, work: Path, examples: int = 8) -> dict:
    """Loss and LoRA gradients of the same examples with the base's products in bf16 and in FP8 (each
    recipe of training.fp8, as train_lora applies it), each against the same batch in fp32: what FP8 costs in
    the gradients that training follows, beside bf16's own error; then rowwise's two roundings each alone
    (the weights', the activations'), the products in bf16. WORK/base may be a real model (a converted GGUF)
    with WORK/data/train.json beside it."""
    from mcqa.modeling import load_model
    from mcqa.training import float8_base

    features = check_features(work, examples)
    model = with_lora(load_model(str(work / "base"), "fp32"))
    reference_loss, reference = loss_and_lora_gradients(model, features)
    del model
    result = {"examples": examples, "tokens": sum(len(f["input_ids"]) for f in features),
              "loss_fp32": round(reference_loss, 5)}
    for recipe in ("none", *RECIPES):
        torch.cuda.empty_cache() if cuda() else None
        model = load_model(str(work / "base"), "bf16")
        model = with_lora(model)
        applied = float8_base(model, recipe, "none", on_any_device=not cuda())
        loss, gradients = loss_and_lora_gradients(model, features)
        name = "bf16" if recipe == "none" else f"fp8_{recipe}"
        result[name] = {"fp8": applied, "loss": round(loss, 5), **against(reference, gradients)}
        log(f"fp8 check {name}: {result[name]}")
        del model
    for rounded in ("weights", "activations"):  # where rowwise's error comes from: each rounding alone
        model = with_lora(load_model(str(work / "base"), "bf16"))
        count = rounded_alone(model, rounded)
        loss, gradients = loss_and_lora_gradients(model, features)
        name = f"fp8_rowwise_{rounded}_only"
        result[name] = {"rounded": f"{count} layers' {rounded} to FP8 (rowwise), the products in bf16",
                        "loss": round(loss, 5), **against(reference, gradients)}
        log(f"fp8 check {name}: {result[name]}")
        del model
    log(f"fp8 check: {result}")
    return result


def fp8_learning(args, work: Path) -> dict:
    """The demo's learning proof with each training.fp8 setting: the bundled sample, the demo model built from
    it and the demo's training settings, as `make run` trains them (compiled, bf16 on a GPU), then its
    validation questions scored from the base and the adapter. The 7B shape's weights are random; this is the
    one model here that learns something, so it shows whether FP8 costs what it learns."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]
    demo = schema["demo_model"]["properties"]
    shape = {k: spec["default"] for k, spec in demo.items() if k != "training"}
    demo_training = {k: spec["default"] for k, spec in demo["training"]["properties"].items()}
    answering = {**{k: spec["default"] for k, spec in schema["answering"]["properties"].items()},
                 "prompt_format": "plain"}
    out = work / "fp8_learning"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run([sys.executable, SCRIPTS / "prepare_data.py", "train", "--input", REPO / "resources/sample/train.xlsx",
         "--train-out", out / "train.json", "--val-out", out / "val.json", "--report-out", out / "report.json",
         "--val-fraction", "0.2"], out / "prepare.log")
    run([sys.executable, SCRIPTS / "build_demo_model.py", "--train", out / "train.json", "--out", out / "base",
         "--settings", json.dumps(shape)], out / "build.log")
    result = {"validation_questions": len(read_records(out / "val.json", "labelled"))}
    for recipe in ("none", *RECIPES):
        name = f"fp8_{recipe}"
        settings = {**DEFAULTS, **demo_training, "precision": "bf16" if cuda() else "fp32", "fp8": recipe}
        run([sys.executable, SCRIPTS / "train_lora.py", "--train", out / "train.json", "--base-model", out / "base",
             "--out", out / name / "adapter", "--log-jsonl", out / name / "train_log.jsonl", "--checkpoint-dir",
             out / name / "checkpoints", "--settings", json.dumps(settings), "--compile-cache",
             work / "compile_cache"], out / f"{name}_train.log")
        run([sys.executable, SCRIPTS / "score_questions.py", "--model", out / "base", "--adapter",
             out / name / "adapter", "--val", out / "val.json", "--metrics", out / name / "metrics.json",
             "--val-probs", out / name / "val_probs.csv", "--max-seq-length", str(settings["max_seq_length"]),
             "--settings", json.dumps(answering)], out / f"{name}_score.log")
        losses = [e["loss"] for e in logging_steps(read_history(out / name / "train_log.jsonl"))]
        applied = [line.split("fp8: ", 1)[1] for line in (out / f"{name}_train.log").read_text().splitlines()
                   if "fp8: " in line]
        result[name] = {"fp8": applied[0] if applied else None, "steps": len(losses),
                        "first_loss": losses[0], "last_loss": losses[-1],
                        "val_accuracy": json.loads((out / name / "metrics.json").read_text())["accuracy"]}
        if recipe != "none":
            result[name]["loss_vs_fp8_none"] = loss_difference(result["fp8_none"]["losses"], losses)
        result[name]["losses"] = losses
    log(f"fp8 learning: {result}")
    return result


def measured(command: list, name: str, work: Path) -> dict:
    stats = work / f"{name}.rss.json"
    run([sys.executable, REPO / "benchmarks/peak_rss.py", stats, "--", *command], work / f"{name}.log")
    return json.loads(stats.read_text())


def random_adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter of the benchmark's shape with random weights, for timing a merge without training."""
    from safetensors.torch import save_file

    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    targets = [n for n in index if n.endswith(".weight") and n.split(".")[-2] in LORA["target_modules"]]
    config = json.loads((base / "config.json").read_text())
    hidden, mlp = config["hidden_size"], config["intermediate_size"]
    sizes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
             "o_proj": (hidden, hidden), "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp)}
    r = LORA["lora_r"]
    tensors = {}
    for name in targets:
        rows, cols = sizes[name.split(".")[-2]]
        module = "base_model.model." + name[: -len(".weight")]
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, cols) * 0.01
        tensors[f"{module}.lora_B.weight"] = torch.randn(rows, r) * 0.01
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": LORA["lora_alpha"], "target_modules": LORA["target_modules"]}))
    return out


def merge(args, work: Path, results: dict) -> dict:
    trained = sorted(work.glob("train_ours_*/adapter"))  # the values do not change the speed
    adapter = trained[0] if trained else random_adapter(work / "base", work / "random_adapter")
    shards = sorted((work / "base").glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards) / 2**30
    adapter_gb = (adapter / "adapter_model.safetensors").stat().st_size / 2**30
    copy_dir = work / "copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir()
    start = time.perf_counter()
    for p in shards:
        shutil.copyfile(p, copy_dir / p.name)
    copy_seconds = time.perf_counter() - start
    shutil.rmtree(copy_dir)
    ours = measured([sys.executable, SCRIPTS / "merge_lora.py", "--base-model", work / "base", "--adapter", adapter,
                     "--out", work / "merged_ours", "--threads", len(os.sched_getaffinity(0))], "merge_ours", work)
    reference = {"seconds": None, "peak_rss_gb": None}
    if not args.skip_reference_merge:
        reference = measured([sys.executable, REPO / "benchmarks/reference_merge.py", work / "base", adapter,
                              work / "merged_reference"], "merge_reference", work)
        shutil.rmtree(work / "merged_reference", ignore_errors=True)
    result = {"adapter": str(adapter.relative_to(work)), "ours_seconds": ours["seconds"], "ours_peak_rss_gb": ours["peak_rss_gb"],
              "reference_seconds": reference["seconds"], "reference_peak_rss_gb": reference["peak_rss_gb"],
              "copy_seconds": round(copy_seconds, 2), "largest_shard_gb": round(largest, 3),
              "adapter_gb": round(adapter_gb, 3), "checkpoint_gb": round(sum(p.stat().st_size for p in shards) / 2**30, 2)}
    result["rss_target_gb"] = round(1.5 * (largest + adapter_gb), 2)
    result["time_target_s"] = round(1.5 * copy_seconds, 2)
    log(f"merge: {result}")
    return result


def scoring_flops(setup_result: dict, lengths: list[int], layers: int, hidden: int) -> float:
    """Useful FLOPs of scoring: linear layers on every real token, causal attention, one output row."""
    linear = 2 * setup_result["linear_params"] * sum(lengths)
    attention = sum(2 * layers * hidden * n * n for n in lengths)  # QK^T and AV, causal half of 4*n^2*h
    head = 2 * hidden * setup_result["vocab_size"] * len(lengths)
    return linear + attention + head


def recipe_answer(work: Path, records: list[dict], questions: int) -> dict:
    """One sampled generate() per question in fp16, as the recipe did."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    tokenizer = load_tokenizer(str(work / "base"))
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float16 if cuda() else torch.float32,
                                                 device_map={"": "cuda" if cuda() else "cpu"}).eval()
    load_seconds = time.perf_counter() - start
    invalid = 0
    for i, r in enumerate(records[: questions + 3]):
        if i == 3:
            torch.cuda.synchronize() if cuda() else None
            start = time.perf_counter()
        ids = tokenizer(prompt_text(r["instruction"], r["input"]), return_tensors="pt").to(model.device)
        out = model.generate(**ids, max_new_tokens=1, do_sample=True, temperature=0.2, top_p=0.9, top_k=40,
                             repetition_penalty=1.1, pad_token_id=tokenizer.pad_token_id)
        invalid += tokenizer.decode(out[0, -1:]).strip() not in ("1", "2", "3", "4")
    seconds = time.perf_counter() - start
    rate = questions / seconds
    del model
    torch.cuda.empty_cache() if cuda() else None
    return {"questions_per_s": round(rate, 2), "questions_timed": questions, "load_seconds": round(load_seconds, 1),
            "end_to_end_seconds_1000": round(load_seconds + len(records) / rate, 1), "non_digit_answers": invalid}


def score_stage(work: Path, part: str, records: Path, name: str, batch_tokens: int, rotations: int,
                fused_kernels: bool = FUSED_KERNELS) -> dict:
    """score_questions.py on test or val questions (`part`) as the answer_questions and evaluate_answers rules
    run it, timed from process start to the file written; the script's own account of where the time went
    comes back as data (--stats)."""
    settings = json.dumps({"batch_tokens": batch_tokens, "precision": "bf16" if cuda() else "fp32", "load_in": "none",
                           "rotations": rotations, "prompt_format": "plain", "fused_kernels": fused_kernels})
    outputs = (["--test", records, "--answers", work / f"answers_{name}.csv", "--answer-probs", work / f"probs_{name}.csv"]
               if part == "test" else
               ["--val", records, "--metrics", work / f"metrics_{name}.json", "--val-probs", work / f"probs_{name}.csv"])
    start = time.perf_counter()
    run([sys.executable, SCRIPTS / "score_questions.py", "--model", work / "base", *outputs, "--max-seq-length", "512",
         "--settings", settings, "--stats", work / f"{name}.stats.json"], work / f"{name}.log")
    return {**json.loads((work / f"{name}.stats.json").read_text())[part], "batch_tokens": batch_tokens,
            "end_to_end_s": round(time.perf_counter() - start, 1)}


def answer(args, work: Path, results: dict) -> dict:
    """Answering the test questions at each --answer-batch-tokens with one option order, then four orders
    at the fastest budget, evaluation of a validation-sized set with four orders, and the recipe."""
    shape = SHAPES[args.shape]
    records = read_records(work / "data/test.json", "test")
    lengths = [len(p.ids) for p in encode_all(load_tokenizer(str(work / "base")), records, 512)]
    flops = scoring_flops(results["setup"], lengths, shape["num_layers"], shape["hidden_size"])
    peak = results["setup"]["matmul_peak_tflops"]

    def ours(batch_tokens: int, rotations: int) -> dict:
        result = score_stage(work, "test", work / "data/test.json", f"answer_{batch_tokens}_r{rotations}",
                             batch_tokens, rotations)
        if rotations == 1:  # with more, the shared prefix runs once: no simple count of useful work
            result["tflops"] = round(flops / result["scoring_s"] / 1e12, 1)
            result["fraction_of_peak"] = round(result["tflops"] / peak, 3) if peak == peak else None
        log(f"answer {batch_tokens} tokens, rotations {rotations}: {result}")
        return result

    by_budget = {budget: ours(budget, 1) for budget in args.answer_batch_tokens}
    best = max(by_budget, key=lambda b: by_budget[b]["questions_per_s"])
    rotated = ours(best, 4)
    # A validation set of the real split's size (20% of the training rows) from the training questions.
    validation = work / "data/val_sized.json"
    labelled = read_records(work / "data/train.json", "labelled")
    validation.write_text(json.dumps(labelled[: round(0.2 * len(labelled))], ensure_ascii=False))
    evaluated = score_stage(work, "val", validation, "evaluate_r4", best, 4)
    log(f"evaluate {evaluated['questions']} questions, rotations 4: {evaluated}")
    other = score_stage(work, "val", validation, "evaluate_r4_other_kernels", best, 4,
                        fused_kernels=not FUSED_KERNELS)
    log(f"the same with answering.fused_kernels {not FUSED_KERNELS}: {other}")
    result = {"ours_by_batch_tokens": by_budget, "ours_batch_tokens": best,
              "ours_questions_per_s": by_budget[best]["questions_per_s"], "ours_tflops": by_budget[best]["tflops"],
              "ours_fraction_of_peak": by_budget[best]["fraction_of_peak"], "rotations_4": rotated,
              "rotations_4_cost": round(rotated["scoring_s"] / by_budget[best]["scoring_s"], 2),
              "evaluate_rotations_4": evaluated, "evaluate_rotations_4_other_kernels": other,
              "mean_prompt_tokens": round(statistics.fmean(lengths), 1),
              "scoring_tflop": round(flops / 1e12, 2)}
    if args.recipe_questions:
        recipe = recipe_answer(work, records, args.recipe_questions)
        log(f"recipe answering: {recipe}")
        result.update(recipe=recipe, recipe_questions_per_s=recipe["questions_per_s"],
                      speedup=round(by_budget[best]["questions_per_s"] / recipe["questions_per_s"], 1))
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a lost node would, and wait until they are gone."""
    import psutil

    parent = psutil.Process(pid)
    processes = [parent, *parent.children(recursive=True)]
    for process in processes:
        process.kill()
    psutil.wait_procs(processes, timeout=120)


def resume(args, work: Path) -> dict:
    """Kill a training on --gpus GPUs right after its first checkpoint, rerun it, and check that it resumed
    from that checkpoint and that its history holds every step once."""
    settings = {**LORA, "micro_batch_tokens": args.micro_batch_tokens[0], "precision": "bf16" if cuda() else "fp32",
                "logging_steps": 1, "checkpoint_steps": 10}
    _, batches = epoch_batches(work, settings)
    settings["epochs"] = 30 * args.gpus / len(batches)
    out = work / f"resume_{args.gpus}gpus"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    command = [str(c) for c in train_command(work, out, settings, args.gpus)]
    with open(out / "first.log", "w") as fh:
        process = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        while process.poll() is None and not (out / "checkpoints/checkpoint-10/trainer_state.json").exists():
            time.sleep(0.5)
        kill_tree(process.pid)  # torchrun starts its ranks in sessions of their own
        process.wait()
    killed_at = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    log(f"killed with {killed_at}")
    run(command, out / "second.log")
    resumed = [line for line in (out / "second.log").read_text().splitlines() if "resumed from checkpoint" in line]
    steps = [entry["step"] for entry in logging_steps(read_history(out / "train_log.jsonl"))]
    return {"gpus": args.gpus, "checkpoints_at_kill": killed_at, "resumed": resumed,
            "logged_steps_once_each": steps == list(range(1, max(steps) + 1)), "last_step": max(steps),
            "adapter_saved": (out / "adapter/adapter_model.safetensors").exists()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-xlsx", required=True)
    parser.add_argument("--test-xlsx", required=True)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks/work")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", default="setup,train,merge,answer")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="7b")
    parser.add_argument("--micro-batch-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[8192],
                        help="token budgets per micro-batch to try for our training (the fastest is reported)")
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--logging-steps", type=int, default=10,
                        help="our trainings log every N steps, as training.logging_steps (1 gives per-step losses, "
                             "at the cost of a wait for the GPU every step)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile the last N steps of each one-GPU training of ours (benchmarks/profile_training.py)")
    parser.add_argument("--variants", type=json.loads, default={},
                        help='JSON of named setting overrides also trained, e.g. \'{"padded": {"packing": false}}\'; '
                             'a variant\'s "environment" holds variables for its process, e.g. '
                             '\'{"cpp_wrapper": {"environment": {"TORCHINDUCTOR_CPP_WRAPPER": "1"}}}\'')
    parser.add_argument("--recipe-steps", type=int, default=10, help="0 skips the recipe's training")
    parser.add_argument("--answer-batch-tokens", type=lambda s: [int(x) for x in s.split(",")], default=[16384],
                        help="answering.batch_tokens to try (the fastest is reported, and used with 4 orders)")
    parser.add_argument("--recipe-questions", type=int, default=200, help="0 skips the recipe's answering")
    parser.add_argument("--skip-reference-merge", action="store_true", help="time only our merge (and the copy)")
    parser.add_argument("--gpus", type=int, default=1,
                        help="with more than 1, train also runs on that many GPUs (torchrun, ZeRO-2) and resume checks a kill")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    state = args.work / "results.json"
    results = json.loads(state.read_text()) if state.exists() else {}
    results.update(device_info())
    stages = {"setup": lambda: setup(args, args.work, SHAPES[args.shape]), "train": lambda: train(args, args.work, results),
              "merge": lambda: merge(args, args.work, results), "answer": lambda: answer(args, args.work, results),
              "resume": lambda: resume(args, args.work), "packing_check": lambda: packing_check(args, args.work),
              "fp8_check": lambda: fp8_check(args, args.work), "fp8_learning": lambda: fp8_learning(args, args.work)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        log(f"stage {stage}")
        results[stage] = stages[stage]()
        for path in (state, args.out):  # after every stage, so a run cut short keeps what it measured
            path.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("device", "setup", "train", "packing_check", "fp8_check", "fp8_learning",
                                                "merge", "answer")
                      if k in results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
