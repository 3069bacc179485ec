"""Training's pieces around the Hugging Face Trainer: the features, a Trainer for answer-only packed
batches, validation accuracy for select_best, early stopping, the progress log, the compile step and the
TrainingArguments of a run's settings. train_lora.py is the recipe that puts them together."""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from .history import append_entry, last_totals, read_history
from .modeling import DTYPES, compile_decoder_layers, use_compile_cache, without_attention_mask
from .progress import format_duration, say
from .prompt import ANSWER_SUFFIX_TOKENS, PromptFrame, encode_prompts, prompt_frame, training_example
from .scoring import encode_rotations, score_prompts


def tokenize(records: list[dict], tokenizer, max_seq_length: int,
             frame: PromptFrame | None = None) -> tuple[list[dict], list[str | None]]:
    """Training features (plain format unless `frame` says otherwise) and what each example's prompt lost to fit;
    a record's teacher_probs (distillation) go with its feature."""
    frame = frame or prompt_frame(tokenizer, "plain")
    prompts = encode_prompts(tokenizer, [r["instruction"] for r in records], [r["input"] for r in records],
                             max_seq_length - ANSWER_SUFFIX_TOKENS, frame)
    features = []
    for r, prompt in zip(records, prompts):
        ids, labels, _ = training_example(prompt, r["label"], frame)
        features.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids),
                         **({"teacher_probs": r["teacher_probs"]} if "teacher_probs" in r else {})})
    return features, [p.cut for p in prompts]


def teacher_targets(records: list[dict], probs_path: str, indexed_path: str) -> list[list[float]]:
    """Each record's teacher probabilities (p1..p4): the teacher's out-of-fold file is keyed by record number
    in `indexed_path` (train.json), and a fold's records are found there by their input. Every record must
    have them: a student's training file is part of the file its teacher was cross-validated on."""
    from .probabilities import read_probs
    from .records import read_records

    _, keys, probs, _ = read_probs(probs_path)
    indexed = read_records(indexed_path, "labelled")
    if len(keys) != len(indexed):
        raise ValueError(f"{probs_path} has {len(keys)} rows for the {len(indexed)} records of {indexed_path}: "
                         "the teacher was cross-validated on other data; rerun it")
    by_input = {indexed[int(key)]["input"]: p for key, p in zip(keys, probs)}
    if missing := [n for n, r in enumerate(records) if r["input"] not in by_input]:
        raise ValueError(f"{len(missing)} training records (the first: record {missing[0]}) are not in "
                         f"{indexed_path}, so {probs_path} has no teacher probabilities for them")
    return [by_input[r["input"]] for r in records]


def restore_cpu_index(storage, location: str):
    """Storage saved at, or mapped to, "cpu:N" is on the CPU.

    Resuming a multi-process training on CPUs, the Trainer loads the
    optimizer state with its device as map_location, which there is
    "cpu:N": a location torch.load knows no deserializer for. Registered
    with torch.serialization below; None leaves every other location to torch.
    """
    return storage if location.startswith("cpu:") else None


torch.serialization.register_package(30, lambda storage: None, restore_cpu_index)


def end_with_launcher() -> None:
    """Have the kernel kill this process when the process that launched it dies (Linux).

    torchrun starts every rank in a session of its own, so when the launcher
    is killed outright (SIGKILL, a lost job step) the ranks would train on
    as orphans, and on finishing remove the checkpoints that the rerun is
    resuming from.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the line above
        os._exit(1)


def end_with_workflow(every: float = 2.0) -> None:
    """End this process when the Snakemake that started it is gone.

    Killed outright (SIGKILL, a closed terminal), Snakemake leaves its job's
    shell and this training running: the rerun would resume from checkpoints
    this orphan still writes, and the orphan, on finishing, would remove them
    under the rerun. A daemon thread watches the nearest ancestor process
    whose command runs snakemake and ends this one (as a kill would: the
    checkpoints stay for the rerun) once it is gone. Run by hand, nothing is
    watched.
    """
    import os
    import threading

    import psutil

    try:
        launcher = next((p for p in psutil.Process().parents() if "snakemake" in " ".join(p.cmdline())), None)
    except psutil.Error:  # an ancestor gone or not readable: nothing to watch
        return
    if launcher is None:
        return

    def watch() -> None:
        while launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE:
            time.sleep(every)
        say(f"the Snakemake that started this training (process {launcher.pid}) is gone: stopping; the "
            "checkpoints stay for the rerun to resume")
        os._exit(1)

    threading.Thread(target=watch, name="end-with-workflow", daemon=True).start()


@dataclass(frozen=True)
class Distillation:
    """How a student learns from its teacher's four answer probabilities (training.distill)."""

    answer_ids: list[int]
    weight: float
    temperature: float


def distilled_loss_sum(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor,
                       distill: Distillation) -> torch.Tensor:
    """The summed loss of a micro-batch's label tokens, the answer digit's distilled.

    `logits` and `targets` are the kept positions (AnswerOnlyCollator: rows x positions); each example has
    one answer-digit target, met in the order of `teacher` (examples x 4 probabilities, NaN for an example
    without a teacher, such as an extra source's). A digit's loss is (1 - weight) x its cross-entropy +
    weight x T^2 x KL(teacher_T || student_T) over the four answer tokens, where _T is softened by the
    temperature T; without a teacher, its cross-entropy alone. Every other label token (the end token)
    keeps its cross-entropy. Weight 0 gives the summed cross-entropy of plain training.
    """
    flat_logits = logits.float().reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    cross_entropy = torch.nn.functional.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")
    answer_ids = torch.tensor(distill.answer_ids, device=flat_targets.device)
    is_answer = torch.isin(flat_targets, answer_ids)
    if int(is_answer.sum()) != len(teacher):
        raise ValueError(f"{int(is_answer.sum())} answer positions for {len(teacher)} teacher rows")
    has_teacher = ~teacher.isnan().any(dim=1)
    t = distill.temperature
    # In log space: a low temperature sharpens a small teacher probability to exactly 0, whose log would be
    # -inf and 0 * -inf NaN; its log-softmax stays finite, and its share of the divergence is 0.
    teacher_log = torch.log_softmax(teacher.nan_to_num(0.25).clamp_min(1e-12).log() / t, dim=-1)
    student_log = torch.log_softmax(flat_logits[is_answer][:, answer_ids] / t, dim=-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(dim=-1)
    weight = distill.weight * has_teacher.float()
    answer_loss = (1 - weight) * cross_entropy[is_answer] + weight * t * t * kl
    return cross_entropy[~is_answer].sum() + answer_loss.sum()


class AnswerOnlyTrainer(Trainer):
    """A Trainer for AnswerOnlyCollator's batches of a causal LM; counts the examples and real tokens trained on.

    The forward pass gets no attention mask: right-padded rows need none (see
    mcqa.modeling.pad_right for why that changes nothing the loss sees and
    lets attention run its fused causal kernel), and packed rows carry where
    each example starts instead. The mask stays in the batch to count real
    tokens. Examples are counted because micro-batches vary in size. Tokens are
    summed on the device and read only when ProgressLog needs them: the
    Trainer's own count reads each micro-batch's sum on the host, a wait for
    the GPU every step that left it idle while the next step was prepared.
    """

    examples_trained = 0
    tokens_trained: torch.Tensor | int = 0  # on the device
    answer_accuracy: Callable[[torch.nn.Module], float] | None = None  # set for select_best
    distill: Distillation | None = None  # set for training.distill

    def training_step(self, model, inputs, num_items_in_batch=None):
        packed = inputs.get("cu_seq_lens_q")  # a packed row holds many examples
        self.examples_trained += len(packed) - 1 if packed is not None else len(inputs["input_ids"])
        self.tokens_trained = inputs["attention_mask"].sum() + self.tokens_trained
        return super().training_step(model, inputs, num_items_in_batch)

    def trained_all(self) -> tuple[int, int]:
        """Examples and real tokens trained on since this process started, by all processes together, in one reduction
        (every process must call it)."""
        counts = torch.stack([torch.as_tensor(self.examples_trained, device=self.accelerator.device),
                              torch.as_tensor(self.tokens_trained, device=self.accelerator.device)])
        examples, tokens = self.accelerator.reduce(counts, reduction="sum").tolist()
        return int(examples), int(tokens)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = without_attention_mask(inputs)
        teacher = inputs.pop("teacher_probs", None)
        if self.distill is None or teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs.pop("shift_labels")
        inputs.pop("labels")
        outputs = model(**inputs)
        # Normalised as the Trainer normalises the plain loss: by the label tokens of the accumulated batch,
        # which with average_tokens_across_devices counts every process's.
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
        loss = distilled_loss_sum(outputs.logits, targets, teacher, self.distill) / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

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
    # The frozen embedding's output does not require grad while every later layer's input does: dynamo
    # would compile the first layer's graph a second time for it (a recompile that doubled the wait).
    model.enable_input_require_grads()
    return (f"{compile_decoder_layers(model)} decoder layers compiled, cache {cache or 'torch default'}; "
            "the first step waits for it")


def float8_base(model: torch.nn.Module, recipe: str, load_in: str, on_any_device: bool = False) -> str:
    """Run the products of the frozen layers under the LoRA layers of `model` (a peft model) in FP8 with the
    `recipe`'s scaling (tensorwise or rowwise), their weights cast once (mcqa.float8). Says what was done, or
    why not, for the log. `on_any_device` applies it on a CPU too (a test: torch has FP8 products there)."""
    if recipe == "none":
        return "off (fp8: none)"
    if load_in != "none":
        return f"off with a {load_in} base (its weights are quantised already)"
    if not on_any_device:
        if not torch.cuda.is_available():
            return "off on a CPU (FP8 products need a CUDA GPU)"
        if torch.cuda.get_device_capability() < (8, 9):
            name = torch.cuda.get_device_name()
            return f"off on {name} (FP8 products need compute capability 8.9: Ada, Hopper or newer)"
    from .float8 import float8_frozen_base

    return f"{float8_frozen_base(model, recipe)} linear layers of the base in FP8 ({recipe} scaling, weights cast once)"


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
            say(f"early stopping at step {state.global_step}: validation accuracy has not improved for "
                f"{self.early_stopping_patience} evaluation(s); the best was {state.best_metric:.4f}")


class TrainingDiverged(RuntimeError):
    """The loss or gradient stopped being a number; continuing would waste GPU hours."""


class ProgressLog(TrainerCallback):
    """Writes the training history and a readable progress line (step, loss, lr, tokens/s, ETA).

    Each entry is appended to `path` (kept beside the checkpoints, so a
    resumed training continues the history its checkpoint belongs to).
    Rates are over the interval since the previous line; the running totals
    `elapsed_s`, `tokens_seen` (real tokens) and `examples_seen`, all
    processes together, go on across a resume, so a reader can take any
    interval. `trained` (the examples and tokens since this start) must be called on
    every process (it sums over them), and reading it waits for the GPU, so it
    is read, on every process, only at steps that log, evaluate or save, before
    rank 0 alone writes. The tokens seen are then kept in the Trainer's state,
    so a checkpoint holds them and a resume goes on from them.
    """

    def __init__(self, path: Path, trained: Callable[[], tuple[int, int]]):
        self.path, self.trained = path, trained
        self.start = self.last_time = None
        self.last_tokens = self.last_examples = self.tokens_before = self.examples = 0
        self.first_step = 0
        self.elapsed_before = self.examples_before = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.tokens_before = state.num_input_tokens_seen  # from the checkpoint when resuming
        self.last_tokens = state.num_input_tokens_seen
        self.first_step = state.global_step
        if state.global_step:
            if totals := last_totals(read_history(self.path)):
                self.elapsed_before, self.examples_before = totals["elapsed_s"], totals["examples_seen"]
            say(f"resumed from checkpoint at step {state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self.examples, tokens = self.trained()
            state.num_input_tokens_seen = self.tokens_before + tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        examples = self.examples
        if not state.is_world_process_zero:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen  # all processes', kept current by on_step_end
        entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        totals = {"elapsed_s": round(self.elapsed_before + now - self.start, 3), "tokens_seen": tokens,
                  "examples_seen": self.examples_before + examples}
        if "loss" in logs:
            if not all(math.isfinite(logs.get(k, 0.0)) for k in ("loss", "grad_norm")):
                advice = ("lower learning_rate, or try precision fp32 to see if half precision overflows"
                          if args.bf16 or args.fp16 else "lower learning_rate (this training is in fp32 already)")
                raise TrainingDiverged(f"training diverged at step {state.global_step} (loss {logs['loss']}, gradient "
                                       f"norm {logs.get('grad_norm')}); {advice}")
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
        append_entry(self.path, entry)


def tensorboard_callback(folder: Path, resume_step: int | None) -> TrainerCallback:
    """The Trainer's TensorBoard callback writing to `folder` (for the first process alone to add): a fresh
    training starts the folder afresh; a resume continues its own files, and the steps after its checkpoint,
    logged by the attempt that was killed and trained again now, are purged from them (purge_step)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if resume_step is None:
        shutil.rmtree(folder, ignore_errors=True)
    return TensorBoardCallback(SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1))


def training_arguments(settings: dict, checkpoint_dir: str, deepspeed_config: str, precision: str,
                       has_val: bool) -> TrainingArguments:
    """The Trainer's arguments for a run's settings (one micro-batch an item of MicroBatchDataset)."""
    return TrainingArguments(
        output_dir=checkpoint_dir,
        per_device_train_batch_size=1,  # one item of MicroBatchDataset is a whole micro-batch
        per_device_eval_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        num_train_epochs=settings["epochs"],
        learning_rate=settings["learning_rate"],
        warmup_steps=settings["warmup_ratio"],
        lr_scheduler_type=settings["lr_scheduler"],
        weight_decay=settings["weight_decay"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=settings["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False} if settings["gradient_checkpointing"] else None,
        logging_steps=settings["logging_steps"],
        save_strategy="steps",
        # select_best keeps a checkpoint of every evaluation until the best is known (the Trainer keeps the best and the newest)
        save_steps=settings["eval_steps"] if settings["select_best"] else settings["checkpoint_steps"],
        save_total_limit=2,
        eval_strategy="steps" if has_val else "no",
        eval_steps=settings["eval_steps"],
        load_best_model_at_end=settings["select_best"],
        metric_for_best_model="val_accuracy" if settings["select_best"] else None,
        greater_is_better=True if settings["select_best"] else None,
        seed=settings["seed"],
        data_seed=settings["seed"],
        # No step waits for the GPU: ProgressLog counts tokens (AnswerOnlyTrainer.trained_all), batches are
        # copied to the GPU without waiting (from pinned memory), and a loss that is not a number is logged as
        # it is, which stops the training (TrainingDiverged), instead of being checked on the host every step.
        include_num_input_tokens_seen="no",
        accelerator_config={"non_blocking": True},
        logging_nan_inf_filter=False,
        remove_unused_columns=False,
        report_to="none",  # TensorBoard, when tracked, through tensorboard_callback
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        # ZeRO-2 across GPUs; several CPU processes (tests) fall back to plain DDP.
        deepspeed=deepspeed_config if deepspeed_config and torch.distributed.is_torchelastic_launched()
        and torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
    )
