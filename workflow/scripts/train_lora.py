"""Fine-tune a causal LM with LoRA on train.json and save the adapter.

    train_lora.py --train train.json --val val.json --base-model PATH --out ADAPTER_DIR \
        --log-jsonl train_log.jsonl --checkpoint-dir CKPT_DIR --settings '{...}'

Loss is on the answer digit and EOS only. Examples are packed end to end into
micro-batches of up to micro_batch_tokens real tokens (or, with packing off,
padded into rows of similar length), at most micro_batch_size examples each,
so that every step does similar work; on CUDA the decoder layers are
compiled. Checkpoints go to --checkpoint-dir every checkpoint_steps; a
rerun with the same settings and data resumes from the newest one. Launched
by torchrun with several GPUs, it trains data-parallel under DeepSpeed ZeRO-2
(--deepspeed-config).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from mcqa.bases import tied_modules_refused
from mcqa.batching import divisible, micro_batches
from mcqa.modeling import (DTYPES, PACKED_ATTENTION, compile_decoder_layers, load_model, use_compile_cache,
                            load_tokenizer, pad_right, resolve_precision, without_attention_mask)
from mcqa.progress import format_duration
from mcqa.prompt import (ANSWER_SUFFIX_TOKENS, PROMPT_FORMATS, PromptFrame, describe_cuts, encode_prompts, prompt_frame,
                         training_example)
from mcqa.records import read_records
from mcqa.storage import disk_full_message
from mcqa.scoring import ROTATIONS, encode_rotations, score_prompts

FINGERPRINT = "fingerprint.json"
HISTORY = "train_log.jsonl"  # beside the checkpoints; copied to --log-jsonl at the end


def report(message: str) -> None:
    """A progress line in the log, from the first process only (torchrun starts one per GPU)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(message, file=sys.stderr, flush=True)


def tokenize(records: list[dict], tokenizer, max_seq_length: int,
             frame: PromptFrame | None = None) -> tuple[list[dict], list[str | None]]:
    """Training features (plain format unless `frame` says otherwise) and what each example's prompt lost to fit."""
    frame = frame or prompt_frame(tokenizer, "plain")
    prompts = encode_prompts(tokenizer, [r["instruction"] for r in records], [r["input"] for r in records],
                             max_seq_length - ANSWER_SUFFIX_TOKENS, frame)
    features = []
    for r, prompt in zip(records, prompts):
        ids, labels, _ = training_example(prompt, r["label"], frame)
        features.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return features, [p.cut for p in prompts]


class MicroBatchDataset(torch.utils.data.Dataset):
    """Training features served one whole micro-batch at a time.

    The Trainer shuffles the micro-batches (seeded) every epoch; their
    composition is fixed once, by micro_batches().
    """

    def __init__(self, features: list[dict], batches: list[list[int]]):
        self.features, self.batches = features, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[dict]:
        return [self.features[i] for i in self.batches[index]]


class AnswerOnlyTrainer(Trainer):
    """A Trainer for AnswerOnlyCollator's batches of a causal LM; counts the examples trained on.

    The forward pass gets no attention mask: right-padded rows need none (see
    mcqa.modeling.pad_right for why that changes nothing the loss sees and
    lets attention run its fused causal kernel), and packed rows carry where
    each example starts instead. The mask stays in the batch so the Trainer
    counts real tokens. Examples are counted because micro-batches vary in size.
    """

    examples_trained = 0
    answer_accuracy: Callable[[torch.nn.Module], float] | None = None  # set for select_best

    def training_step(self, model, inputs, num_items_in_batch=None):
        packed = inputs.get("cu_seq_lens_q")  # a packed row holds many examples
        self.examples_trained += len(packed) - 1 if packed is not None else len(inputs["input_ids"])
        return super().training_step(model, inputs, num_items_in_batch)

    def examples_trained_all(self) -> int:
        """Examples trained on by all processes together (every process must call it)."""
        count = torch.tensor(self.examples_trained, device=self.accelerator.device)
        return int(self.accelerator.reduce(count, reduction="sum"))

    def compute_loss(self, model, inputs, *args, **kwargs):
        return super().compute_loss(model, without_attention_mask(inputs), *args, **kwargs)

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        """Validation loss and, with select_best, validation answer accuracy (eval_val_accuracy), among the
        metrics before the Trainer logs them and hands them to its callbacks: the best checkpoint is kept
        and early stopping decides on it."""
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.answer_accuracy is not None:
            output.metrics[f"{metric_key_prefix}_val_accuracy"] = self.answer_accuracy(self.model)
        return output


def compile_layers(model: torch.nn.Module, load_in: str, cache: str) -> str:
    """Compile the decoder layers where that pays, keeping what the compiler makes in `cache` so that the
    next training of the same shape on the same machine (or shared file system) reuses it; says what was
    done, for the log."""
    if not torch.cuda.is_available():
        return "off on a CPU (compiling would take longer than a CPU run trains)"
    if load_in != "none":
        return f"off with a {load_in} base (bitsandbytes layers are not compiled)"
    if cache:
        use_compile_cache(Path(cache))
    return (f"{compile_decoder_layers(model)} decoder layers compiled, cache {cache or 'torch default'}; "
            "the first step waits for it")


def answer_accuracy(records: list[dict], tokenizer, frame: PromptFrame, max_seq_length: int, batch_tokens: int,
                    rotations: int, precision: str) -> Callable[[torch.nn.Module], float]:
    """A function giving a model's validation accuracy, scored as evaluate_answers scores it (same prompts
    and rotations, packed scoring; half precision through autocast as in training, the layers uncompiled)."""
    labels = torch.tensor([r["label"] for r in records])
    prompts = encode_rotations(tokenizer, records, max_seq_length, rotations, frame)

    def accuracy(model: torch.nn.Module) -> float:
        was_training = model.training
        model.eval()
        autocast = torch.autocast("cuda", dtype=DTYPES[precision]) if precision != "fp32" and torch.cuda.is_available() \
            else contextlib.nullcontext()
        with autocast, torch.compiler.set_stance("force_eager"):  # scoring rows are not training's shapes
            log_probs, _ = score_prompts(model, records, prompts, frame.answer_ids, batch_tokens)
        model.train(was_training)
        return (log_probs.argmax(dim=-1) + 1 == labels).sum().item() / len(labels)  # as metrics.json has it, not float32

    return accuracy


class EarlyStopping(EarlyStoppingCallback):
    """The Trainer's early stopping on validation accuracy, saying in the log when and why it stops."""

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if control.should_training_stop:
            report(f"early stopping at step {state.global_step}: validation accuracy has not improved for "
                   f"{self.early_stopping_patience} evaluation(s); the best was {state.best_metric:.4f}")


class TrainingDiverged(RuntimeError):
    """The loss or gradient stopped being a number; continuing would waste GPU hours."""


class AnswerOnlyCollator:
    """Collates a micro-batch and asks the model for logits only where the loss is.

    The loss sees only answer and EOS, so projecting every prompt position onto
    the vocabulary (and upcasting those logits to fp32) would be wasted work
    and memory. `logits_to_keep` takes the positions that predict a label, and
    `shift_labels` gives the target at those positions (-100 where a row has
    none).

    Padded, examples are right-padded rows: right padding, as in answering,
    leaves no fully masked attention rows, which can turn half-precision
    gradients into NaN, and makes the attention mask unnecessary (pad_right).
    Packed, they lie end to end in one row with no padding at all: position
    ids restart at each example, and `cu_seq_lens_q`/`_k` (where each example
    starts) reach mcqa.modeling.packed_attention, so no token attends across
    examples. Either way the loss and gradients are the same (tests/test_packing.py).
    The attention mask (all ones when packed) is only for the Trainer's count
    of real tokens.
    """

    def __init__(self, pad_token_id: int, packed: bool = False, multiple_of: int = 8):
        self.pad_token_id, self.packed, self.multiple_of = pad_token_id, packed, multiple_of

    def __call__(self, features: list) -> dict:
        if isinstance(features[0], list):  # one micro-batch from MicroBatchDataset
            features = [f for batch in features for f in batch]
        if self.packed:
            batch, targets = self.pack(features)
        else:
            batch = {key: pad_right([f[key] for f in features], value, self.multiple_of)
                     for key, value in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100))}
            targets = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], dim=1)
        keep = (targets != -100).any(dim=0).nonzero().flatten()
        return {**batch, "logits_to_keep": keep, "shift_labels": targets[:, keep]}

    @staticmethod
    def pack(features: list[dict]) -> tuple[dict, torch.Tensor]:
        """One row of the examples end to end, and each token's target (its example's next label)."""
        lengths = [len(f["input_ids"]) for f in features]
        starts = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)

        def row(values) -> torch.Tensor:
            return torch.tensor([v for vs in values for v in vs], dtype=torch.long).unsqueeze(0)

        batch = {
            "input_ids": row(f["input_ids"] for f in features),
            "attention_mask": row(f["attention_mask"] for f in features),
            "labels": row(f["labels"] for f in features),
            "position_ids": row(range(n) for n in lengths),
            "cu_seq_lens_q": starts, "cu_seq_lens_k": starts,
            "max_length_q": max(lengths), "max_length_k": max(lengths),
        }
        return batch, row(f["labels"][1:] + [-100] for f in features)


class ProgressLog(TrainerCallback):
    """Writes the training history and a readable progress line (step, loss, lr, tokens/s, ETA).

    Each entry is appended to `path` (kept beside the checkpoints, so a
    resumed training continues the history its checkpoint belongs to).
    Rates are over the interval since the previous line; the running totals
    `elapsed_s`, `tokens_seen` (real tokens) and `examples_seen`, all
    processes together, go on across a resume, so a reader can take any
    interval. `examples_trained` must be called on every process (it sums
    over them), so on_log does its counting before rank 0 alone writes.
    """

    def __init__(self, path: Path, examples_trained: Callable[[], int]):
        self.path, self.examples_trained = path, examples_trained
        self.start = self.last_time = None
        self.last_tokens = self.last_examples = 0
        self.first_step = 0
        self.elapsed_before = self.examples_before = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens, self.last_examples = state.num_input_tokens_seen, self.examples_trained()
        self.first_step = state.global_step
        if state.global_step:
            totals = [e for e in read_history(self.path) if "elapsed_s" in e]
            if totals:
                self.elapsed_before, self.examples_before = totals[-1]["elapsed_s"], totals[-1]["examples_seen"]
            report(f"resumed from checkpoint at step {state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        examples = self.examples_trained() if "loss" in logs or "train_runtime" in logs else 0
        if not state.is_world_process_zero:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen  # the Trainer sums it over processes
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        totals = {"elapsed_s": round(self.elapsed_before + now - self.start, 3), "tokens_seen": tokens,
                  "examples_seen": self.examples_before + examples}
        if "loss" in logs:
            if not all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "grad_norm")):
                raise TrainingDiverged(
                    f"training diverged at step {state.global_step} (loss {logs['loss']}, gradient norm "
                    f"{logs.get('grad_norm')}); lower learning_rate, or try precision fp32 to see if half precision overflows"
                )
            elapsed = max(now - self.last_time, 1e-9)
            done = state.global_step - self.first_step
            eta = (now - self.start) / max(done, 1) * (state.max_steps - state.global_step)
            entry.update(
                loss=logs["loss"],
                grad_norm=logs.get("grad_norm"),
                learning_rate=logs.get("learning_rate"),
                tokens_per_s=round((tokens - self.last_tokens) / elapsed, 1),
                samples_per_s=round((examples - self.last_examples) / elapsed, 2),
                eta_s=round(eta, 1),
                **totals,
            )
            if torch.cuda.is_available():
                entry["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.last_time, self.last_tokens, self.last_examples = now, tokens, examples
            memory = f"  {entry['peak_gpu_mem_gb']} GiB peak" if "peak_gpu_mem_gb" in entry else ""
            print(
                f"step {state.global_step}/{state.max_steps}  loss {entry['loss']:.4f}  "
                f"lr {entry['learning_rate']:.2e}  {entry['tokens_per_s']:,.0f} tokens/s{memory}  "
                f"ETA {format_duration(eta)}",
                file=sys.stderr,
                flush=True,
            )
        elif "eval_loss" in logs:
            entry["val_loss"] = logs["eval_loss"]
            line = f"step {state.global_step}  validation loss {logs['eval_loss']:.4f}"
            if "eval_val_accuracy" in logs:
                entry["val_accuracy"] = logs["eval_val_accuracy"]
                line += f"  validation accuracy {logs['eval_val_accuracy']:.4f}"
            print(line, file=sys.stderr, flush=True)
        elif "train_runtime" in logs:
            entry.update(train_runtime_s=logs["train_runtime"], **totals)
        else:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")


def read_history(path: Path) -> list[dict]:
    """The entries of a training history file ([] if there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Settings that change nothing in the trained weights: a resume goes on when only these differ (turning
# on gradient checkpointing after an out-of-memory error, or checkpointing more often, keeps the hours trained).
WEIGHT_NEUTRAL = ("checkpoint_steps", "logging_steps", "gradient_checkpointing", "compile")


def fingerprint(settings: dict, args: argparse.Namespace) -> dict:
    """What a checkpoint must match to be resumed: what decides the trained weights (settings, prompt format,
    base model, data) and, with select_best, what decides the step kept (eval_steps, the scoring rotations)."""
    digest = hashlib.sha256()
    for path in (args.train, args.val):
        if path:
            digest.update(Path(path).read_bytes())
    neutral = WEIGHT_NEUTRAL + (() if settings["select_best"] else ("eval_steps",))
    return {"settings": {k: v for k, v in sorted(settings.items()) if k not in neutral},
            "prompt_format": args.prompt_format, "rotations": args.rotations if settings["select_best"] else None,
            "base_model": args.base_model, "revision": args.revision, "data_sha256": digest.hexdigest()}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two fingerprints, one readable item per setting."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "unset"), new.get(key, "unset")
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append("the training or validation data" if key == "data_sha256" else
                         f"{prefix}{key} {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}")
    return found


# What train_lora.py writes into --checkpoint-dir besides these two files; nothing else there is ever removed.
OWNED_DIR = re.compile(r"(corrupt-)?checkpoint-(\d+)")


def checkpoints_newest_first(path: Path) -> list[Path]:
    """The Trainer's checkpoint-N folders in `path`, highest step first."""
    found = [p for p in path.glob("checkpoint-*") if OWNED_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(OWNED_DIR.fullmatch(p.name)[2]), reverse=True)


def unloadable(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, or None if every file in it reads back whole.

    JSON must parse, safetensors must load, and torch's .pt/.pth/.bin files
    (zip archives) must pass their CRC check, which catches truncation
    without unpickling anything.
    """
    from safetensors import safe_open

    if not (checkpoint / "trainer_state.json").exists():
        return "no trainer_state.json (killed while saving)"
    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt") as tensors:
                    for key in tensors.keys():
                        tensors.get_tensor(key)
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if (bad := archive.testzip()) is not None:
                        raise ValueError(f"member {bad} fails its CRC check")
        except Exception as exc:  # any failure to read means the resume would fail the same way
            return f"{file.relative_to(checkpoint)}: {type(exc).__name__}: {exc}"
    return None


def clear_owned(path: Path) -> None:
    """Remove what train_lora.py put in `path`, and `path` itself once empty; never anything else."""
    if not path.is_dir():
        return
    for entry in path.iterdir():
        if OWNED_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name in (FINGERPRINT, HISTORY) and not entry.is_dir():
            entry.unlink()
    if not any(path.iterdir()):
        path.rmdir()


def prepare_checkpoint_dir(path: Path, expected: dict) -> Path | None:
    """The newest loadable checkpoint of this very training, or None to start afresh.

    A checkpoint a job was killed while saving (no trainer_state.json,
    written last) is removed; one that is complete but does not read back
    (a truncated file) is set aside as corrupt-checkpoint-N, with a log line,
    and the one before it is taken. The training history is cut back to the
    chosen checkpoint's step, so steps trained again are logged once.
    """
    marker = path / FINGERPRINT
    previous = json.loads(marker.read_text()) if marker.exists() else None
    if previous is not None and previous != expected:
        report(f"not resuming the checkpoints in {path}, which belong to another training: "
               f"{'; '.join(differences(previous, expected))}; starting afresh")
    if previous == expected:
        for checkpoint in checkpoints_newest_first(path):
            if (problem := unloadable(checkpoint)) is None:
                step = int(OWNED_DIR.fullmatch(checkpoint.name)[2])
                history = [e for e in read_history(path / HISTORY) if e["step"] <= step]
                (path / HISTORY).write_text("".join(json.dumps(e) + "\n" for e in history), encoding="utf-8")
                return checkpoint
            if (checkpoint / "trainer_state.json").exists():
                aside = path / f"corrupt-{checkpoint.name}"
                shutil.rmtree(aside, ignore_errors=True)
                checkpoint.rename(aside)
                report(f"set aside {checkpoint} as {aside.name}: it cannot be loaded ({problem})")
            else:
                shutil.rmtree(checkpoint)
        report(f"no loadable checkpoint in {path}; starting afresh")
    clear_owned(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(expected, sort_keys=True))
    return None


def training_arguments(s: dict, args: argparse.Namespace, precision: str, has_val: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=args.checkpoint_dir,
        per_device_train_batch_size=1,  # one item of MicroBatchDataset is a whole micro-batch
        per_device_eval_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        num_train_epochs=s["epochs"],
        learning_rate=s["learning_rate"],
        warmup_steps=s["warmup_ratio"],
        lr_scheduler_type=s["lr_scheduler"],
        weight_decay=s["weight_decay"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=s["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if s["gradient_checkpointing"] else None,
        logging_steps=s["logging_steps"],
        save_strategy="steps",
        # select_best keeps a checkpoint of every evaluation until the best is known (the Trainer keeps the best and the newest)
        save_steps=s["eval_steps"] if s["select_best"] else s["checkpoint_steps"],
        save_total_limit=2,
        eval_strategy="steps" if has_val else "no",
        eval_steps=s["eval_steps"],
        load_best_model_at_end=s["select_best"],
        metric_for_best_model="val_accuracy" if s["select_best"] else None,
        greater_is_better=True if s["select_best"] else None,
        seed=s["seed"],
        data_seed=s["seed"],
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # ZeRO-2 across GPUs; several CPU processes (tests) fall back to plain DDP.
        deepspeed=args.deepspeed_config if args.deepspeed_config and torch.distributed.is_torchelastic_launched()
        and torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", default="")
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--out", required=True, help="adapter directory")
    parser.add_argument("--log-jsonl", required=True)
    parser.add_argument("--checkpoint-dir", required=True)
    parser.add_argument("--settings", required=True, help="JSON of the run's training settings")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--revision", default=None, help="hub commit, branch or tag of the base model")
    parser.add_argument("--deepspeed-config", default="", help="used when launched by torchrun on several GPUs")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="plain")
    parser.add_argument("--compile-cache", default="", help="folder for torch.compile's caches (kept across runs)")
    parser.add_argument("--rotations", type=int, default=1, choices=sorted(ROTATIONS),
                        help="option orders each validation question is scored in by select_best (answering.rotations)")
    args = parser.parse_args(argv)
    s = json.loads(args.settings)
    if not torch.distributed.is_torchelastic_launched():
        # One process trains on one GPU. With more visible the Trainer would wrap the model in
        # DataParallel, which splits the answer-only batches wrongly; several GPUs go through torchrun.
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # Micro-batch shapes change every step; expandable segments keep the CUDA
    # allocator from fragmenting (read at the first CUDA allocation, below).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    precision = resolve_precision(s["precision"])
    # The resolved run in full, first, so a log says exactly what was trained (as torchtune recipes do).
    report("run " + json.dumps({"settings": s, "base_model": args.base_model, "revision": args.revision,
                                "prompt_format": args.prompt_format, "precision": precision}, sort_keys=True))
    try:  # a tokenizer that cannot load, has no chat template or no one-token digits: say so, no traceback
        tokenizer = load_tokenizer(args.base_model, args.trust_remote_code, args.revision)
        frame = prompt_frame(tokenizer, args.prompt_format)
    except ValueError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    train_records = read_records(args.train, "labelled")
    val_records = read_records(args.val, "labelled") if args.val else []
    train_features, train_cuts = tokenize(train_records, tokenizer, s["max_seq_length"], frame)
    val_features, val_cuts = tokenize(val_records, tokenizer, s["max_seq_length"], frame)
    if not train_features:
        print(f"ERROR {args.train} has no records to train on", file=sys.stderr)
        return 2
    lengths = [len(f["input_ids"]) for f in train_features]
    # As many micro-batches on every process, each example once: no process waits at the end of an epoch
    # for another, and none trains a micro-batch twice.
    batches = divisible(micro_batches(lengths, s["micro_batch_size"], s["micro_batch_tokens"], s["seed"], s["packing"]),
                        int(os.environ.get("WORLD_SIZE", 1)))
    train_dataset = MicroBatchDataset(train_features, batches)
    # What the model is trained on, special tokens shown, so a user can check a new base's prompt at a glance.
    report("first training example, decoded: "
           + json.dumps(tokenizer.decode(train_features[0]["input_ids"]), ensure_ascii=False))
    for path, cuts in ((args.train, train_cuts), (args.val, val_cuts)):
        report(f"{path}: " + describe_cuts(cuts, [f"record {n}" for n in range(len(cuts))], s["max_seq_length"]))
    report(
        f"train {len(train_features)} examples ({sum(lengths):,} tokens, longest {max(lengths)}), "
        f"val {len(val_features)}; precision {precision}, base loaded as {s['load_in']}; "
        f"{len(batches)} {'packed' if s['packing'] else 'padded'} micro-batches of "
        f"{len(train_features) / len(batches):.1f} examples on average"
    )

    set_seed(s["seed"])  # before the LoRA weights are initialised, so a run is reproducible
    model = load_model(args.base_model, precision, s["load_in"], args.trust_remote_code, args.revision,
                       attention=PACKED_ATTENTION if s["packing"] else "sdpa")
    tied = (output := model.get_output_embeddings()) is not None and output.weight is model.get_input_embeddings().weight
    if tied and (refused := tied_modules_refused(args.base_model, s["modules_to_save"])):  # a hub id, seen only now
        print(f"ERROR {refused}", file=sys.stderr)
        return 2
    if s["load_in"] != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gradient_checkpointing"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=s["lora_r"],
            lora_alpha=s["lora_alpha"],
            lora_dropout=s["lora_dropout"],
            target_modules=s["target_modules"],
            modules_to_save=s["modules_to_save"] or None,
            use_rslora=s["use_rslora"],
            use_dora=s["use_dora"],
            revision=args.revision,  # recorded in adapter_config.json
            task_type="CAUSAL_LM",
        ),
    )
    if s["compile"]:
        report(f"torch.compile: {compile_layers(model, s['load_in'], args.compile_cache)}")
    trainable, total = model.get_nb_trainable_parameters()
    report(f"LoRA: {trainable:,} trainable of {total:,} parameters")

    checkpoint_dir = Path(args.checkpoint_dir)
    history = checkpoint_dir / HISTORY
    trainer = AnswerOnlyTrainer(
        model=model,
        args=training_arguments(s, args, precision, bool(val_features)),
        train_dataset=train_dataset,
        eval_dataset=val_features or None,
        data_collator=AnswerOnlyCollator(tokenizer.pad_token_id, packed=s["packing"]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLog prints a readable line instead
    trainer.add_callback(ProgressLog(history, trainer.examples_trained_all))
    if s["select_best"]:
        if not val_records:
            print("ERROR select_best needs validation records (--val)", file=sys.stderr)
            return 2
        # Scored in rows of the training's own token budget, which fit beside the training's memory.
        trainer.answer_accuracy = answer_accuracy(val_records, tokenizer, frame, s["max_seq_length"],
                                                  s["micro_batch_tokens"] or s["micro_batch_size"] * s["max_seq_length"],
                                                  args.rotations, precision)
        if s["early_stopping_patience"]:
            trainer.add_callback(EarlyStopping(early_stopping_patience=s["early_stopping_patience"]))
    # Rank 0 decides whether to resume (and cleans up); the Trainer has set up
    # the process group, so every rank then follows the same decision.
    resume = [prepare_checkpoint_dir(checkpoint_dir, fingerprint(s, args)) if trainer.is_world_process_zero() else None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(resume)
    resume = resume[0]
    world = trainer.args.world_size
    steps_per_epoch = math.ceil(len(batches) / (s["gradient_accumulation_steps"] * world))
    report(f"about {steps_per_epoch} optimizer steps per epoch on {world} process(es)")
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except TrainingDiverged as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 3
    except (RuntimeError, OSError) as exc:
        if (full := disk_full_message(exc, checkpoint_dir, "run snakemake again: training resumes from its last "
                                                           "complete checkpoint")) is None:
            raise
        print(f"ERROR {full}", file=sys.stderr)
        return 4
    if trainer.is_world_process_zero():
        if s["select_best"]:
            best_step = int(OWNED_DIR.fullmatch(Path(trainer.state.best_model_checkpoint).name)[2])
            with open(history, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": trainer.state.global_step, "best_step": best_step,
                                     "best_val_accuracy": trainer.state.best_metric}) + "\n")
            report(f"best validation accuracy {trainer.state.best_metric:.4f} at step {best_step} of "
                   f"{trainer.state.global_step}: the adapter saved is that step's")
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        shutil.copyfile(history, args.log_jsonl)
        clear_owned(checkpoint_dir)
        print(f"adapter saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
