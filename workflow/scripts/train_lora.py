"""Fine-tune a causal LM with LoRA on train.json and save the adapter.

    train_lora.py --train train.json --val val.json --base-model PATH --out ADAPTER_DIR \
        --log-jsonl train_log.jsonl --checkpoint-dir CKPT_DIR --settings '{...}'

Loss is on the answer digit and the end token only. Examples are packed end
to end into micro-batches of up to micro_batch_tokens real tokens (or, with
packing off, padded into rows of similar length), at most micro_batch_size
examples each, so that every step does similar work; on CUDA the decoder
layers are compiled. Checkpoints go to --checkpoint-dir every
checkpoint_steps; a rerun with the same weights-deciding settings and data
resumes from the newest one. Launched by torchrun with several GPUs, it
trains data-parallel under DeepSpeed ZeRO-2 (--deepspeed-config).

The recipe reads top to bottom: the data, the model, the trainer, the
checkpoint folder, training, saving. Its pieces live in mcqa (batching,
checkpoints, training, history).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import PrinterCallback, set_seed

from mcqa.bases import tied_modules_refused
from mcqa.batching import AnswerOnlyCollator, MicroBatchDataset, divisible, micro_batches
from mcqa.checkpoints import (CheckpointsInUse, checkpoint_step, clear_owned, fingerprint, hold,
                              prepare_checkpoint_dir, release)
from mcqa.history import NAME as HISTORY
from mcqa.history import append_entry
from mcqa.attention import PACKED_ATTENTION
from mcqa.modeling import load_model, load_tokenizer, resolve_precision
from mcqa.progress import say
from mcqa.prompt import PROMPT_FORMATS, describe_cuts, prompt_frame
from mcqa.records import read_records
from mcqa.scoring import ROTATIONS
from mcqa.shared_inputs import share_inputs
from mcqa.storage import disk_full_message
from mcqa.training import (AnswerOnlyTrainer, Distillation, EarlyStopping, ProgressLog, TrainingDiverged,
                           answer_accuracy, compile_layers, end_with_launcher, end_with_workflow, float8_base,
                           teacher_targets, tensorboard_callback, tokenize, training_arguments)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", default="")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more labelled records trained on beside --train (extra sources), never validated")
    parser.add_argument("--teacher-probs", default="",
                        help="with distill: the teacher's out-of-fold probabilities (keyed by --teacher-records)")
    parser.add_argument("--teacher-records", default="", help="the records --teacher-probs numbers (train.json)")
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
    parser.add_argument("--tensorboard-dir", default="", help="also log the training to TensorBoard files here")
    parser.add_argument("--rotations", type=int, default=1, choices=sorted(ROTATIONS),
                        help="option orders each validation question is scored in by select_best "
                             "(answering.rotations)")
    return parser.parse_args(argv)


def lora_model(args: argparse.Namespace, settings: dict, precision: str):
    """The base with LoRA adapters on it, seeded so that a run is reproducible; None (after an ERROR line)
    for a tied-embedding base asked to train them in full."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    set_seed(settings["seed"])  # before the LoRA weights are initialised
    model = load_model(args.base_model, precision, settings["load_in"], args.trust_remote_code, args.revision,
                       attention=PACKED_ATTENTION if settings["packing"] else "sdpa")
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:  # a hub id, seen only now
        if refused := tied_modules_refused(args.base_model, settings["modules_to_save"]):
            print(f"ERROR {refused}", file=sys.stderr)
            return None
    if settings["load_in"] != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings["gradient_checkpointing"])
    model = get_peft_model(model, LoraConfig(
        r=settings["lora_r"], lora_alpha=settings["lora_alpha"], lora_dropout=settings["lora_dropout"],
        target_modules=settings["target_modules"], modules_to_save=settings["modules_to_save"] or None,
        use_rslora=settings["use_rslora"], use_dora=settings["use_dora"],
        revision=args.revision,  # recorded in adapter_config.json
        task_type="CAUSAL_LM"))
    trainable, total = model.get_nb_trainable_parameters()  # before FP8 turns frozen weights into buffers
    say(f"LoRA: {trainable:,} trainable of {total:,} parameters")
    say(f"fp8: {float8_base(model, settings['fp8'], settings['load_in'])}")
    # after FP8 (its frozen layers keep their own products) and before compiling (the groups are compiled in)
    fused = share_inputs(model) if settings["fuse_shared_inputs"] else "off (fuse_shared_inputs: false)"
    say(f"shared inputs: {fused}")
    if settings["compile"]:
        say(f"torch.compile: {compile_layers(model, settings['load_in'], args.compile_cache)}")
    return model


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = json.loads(args.settings)
    if torch.distributed.is_torchelastic_launched():
        end_with_launcher()
    else:
        # One process trains on one GPU. With more visible the Trainer would wrap the model in
        # DataParallel, which splits the answer-only batches wrongly; several GPUs go through torchrun.
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    end_with_workflow()
    if int(os.environ.get("RANK", "0")):
        return train(args, settings)
    # One lock a training, rank 0's, held until it ends however it ends.
    checkpoint_dir = Path(args.checkpoint_dir)
    try:
        lock = hold(checkpoint_dir)
    except CheckpointsInUse as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 5
    try:
        return train(args, settings)
    finally:
        release(lock, checkpoint_dir)


def train(args: argparse.Namespace, settings: dict) -> int:
    """Train the run's adapter (rank 0 holding the checkpoint folder's lock); 0, or the exit status of an
    ERROR line."""
    checkpoint_dir = Path(args.checkpoint_dir)
    # Micro-batch shapes change every step; expandable segments keep the CUDA
    # allocator from fragmenting (read at the first CUDA allocation, below).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    precision = resolve_precision(settings["precision"])
    # The resolved run in full, first, so a log says exactly what was trained (as torchtune recipes do).
    say("run " + json.dumps({"settings": settings, "base_model": args.base_model, "revision": args.revision,
                             "prompt_format": args.prompt_format, "precision": precision}, sort_keys=True))

    # The data.
    try:  # a tokenizer that cannot load, has no chat template or no one-token digits: say so, no traceback
        tokenizer = load_tokenizer(args.base_model, args.trust_remote_code, args.revision)
        frame = prompt_frame(tokenizer, args.prompt_format)
    except ValueError as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 2
    train_records = read_records(args.train, "labelled")
    distill = settings["distill"]
    if distill["teacher"]:
        if not args.teacher_probs:
            print(f"ERROR distill.teacher {distill['teacher']} needs --teacher-probs", file=sys.stderr)
            return 2
        try:
            teacher = teacher_targets(train_records, args.teacher_probs, args.teacher_records)
        except ValueError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            return 2
        train_records = [{**r, "teacher_probs": p} for r, p in zip(train_records, teacher)]
        say(f"distilling {distill['teacher']} (weight {distill['weight']}, temperature {distill['temperature']}): "
            f"teacher probabilities for the {len(train_records)} records of {args.train}")
    sources = [(args.train, len(train_records))]  # each file's share of train_records, in order
    for path in args.extra:
        extra = read_records(path, "labelled")
        say(f"{path}: {len(extra)} more records to train on")
        train_records += extra
        sources.append((path, len(extra)))
    val_records = read_records(args.val, "labelled") if args.val else []
    train_features, train_cuts = tokenize(train_records, tokenizer, settings["max_seq_length"], frame)
    val_features, val_cuts = tokenize(val_records, tokenizer, settings["max_seq_length"], frame)
    if not train_features:
        print(f"ERROR {args.train} has no records to train on", file=sys.stderr)
        return 2
    if settings["select_best"] and not val_records:
        print("ERROR select_best needs validation records (--val)", file=sys.stderr)
        return 2
    lengths = [len(f["input_ids"]) for f in train_features]
    # As many micro-batches on every process, each example once: no process waits at the end of an epoch
    # for another, and none trains a micro-batch twice.
    batches = divisible(micro_batches(lengths, settings["micro_batch_size"], settings["micro_batch_tokens"],
                                      settings["seed"], settings["packing"]), int(os.environ.get("WORLD_SIZE", 1)))
    # What the model is trained on, special tokens shown, so a user can check a new base's prompt at a glance.
    say("first training example, decoded: "
        + json.dumps(tokenizer.decode(train_features[0]["input_ids"]), ensure_ascii=False))
    starts = [sum(count for _, count in sources[:n]) for n in range(len(sources))]
    cuts_by_file = [(path, train_cuts[start:start + count]) for (path, count), start in zip(sources, starts)]
    for path, cuts in cuts_by_file + ([(args.val, val_cuts)] if args.val else []):
        say(f"{path}: " + describe_cuts(cuts, [f"record {n}" for n in range(len(cuts))], settings["max_seq_length"]))
    say(f"train {len(train_features)} examples ({sum(lengths):,} tokens, longest {max(lengths)}), "
        f"val {len(val_features)}; precision {precision}, base loaded as {settings['load_in']}; "
        f"{len(batches)} {'packed' if settings['packing'] else 'padded'} micro-batches of "
        f"{len(train_features) / len(batches):.1f} examples on average")

    # The model and the trainer.
    model = lora_model(args, settings, precision)
    if model is None:
        return 2
    history = checkpoint_dir / HISTORY
    trainer = AnswerOnlyTrainer(
        model=model,
        args=training_arguments(settings, args.checkpoint_dir, args.deepspeed_config, precision, bool(val_features)),
        train_dataset=MicroBatchDataset(train_features, batches),
        eval_dataset=val_features or None,
        data_collator=AnswerOnlyCollator(tokenizer.pad_token_id, packed=settings["packing"]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # ProgressLog prints a readable line instead
    trainer.add_callback(ProgressLog(history, trainer.trained_all))
    if distill["teacher"]:
        trainer.distill = Distillation(frame.answer_ids, distill["weight"], distill["temperature"])
    if settings["select_best"]:
        # Scored in rows of the training's own token budget, which fit beside the training's memory.
        trainer.answer_accuracy = answer_accuracy(
            val_records, tokenizer, frame, settings["max_seq_length"],
            settings["micro_batch_tokens"] or settings["micro_batch_size"] * settings["max_seq_length"],
            args.rotations, precision)
        if settings["early_stopping_patience"]:
            trainer.add_callback(EarlyStopping(early_stopping_patience=settings["early_stopping_patience"]))

    # The checkpoint folder: rank 0 decides whether to resume (and cleans up); the Trainer has set up the
    # process group, so every rank then follows the same decision.
    expected = fingerprint(settings, args.train, args.val, args.base_model, args.revision, args.prompt_format,
                           args.rotations, trainer.args.world_size, [*args.extra, *filter(None, [args.teacher_probs])])
    resume = [prepare_checkpoint_dir(checkpoint_dir, expected) if trainer.is_world_process_zero() else None]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(resume)
    resume = resume[0]
    if args.tensorboard_dir and trainer.is_world_process_zero():
        trainer.add_callback(tensorboard_callback(Path(args.tensorboard_dir), checkpoint_step(resume) if resume else None))

    # Training.
    world = trainer.args.world_size
    say(f"about {math.ceil(len(batches) / (settings['gradient_accumulation_steps'] * world))} optimizer steps per "
        f"epoch on {world} process(es)")
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except TrainingDiverged as exc:
        print(f"ERROR {exc}", file=sys.stderr)
        return 3
    except (RuntimeError, OSError) as exc:
        full = disk_full_message(exc, checkpoint_dir,
                                 "run snakemake again: training resumes from its last complete checkpoint")
        if full is None:
            raise
        print(f"ERROR {full}", file=sys.stderr)
        return 4

    # Saving.
    if trainer.is_world_process_zero():
        if settings["select_best"]:
            best_step = checkpoint_step(trainer.state.best_model_checkpoint)
            append_entry(history, {"step": trainer.state.global_step, "best_step": best_step,
                                   "best_val_accuracy": trainer.state.best_metric})
            say(f"best validation accuracy {trainer.state.best_metric:.4f} at step {best_step} of "
                f"{trainer.state.global_step}: the adapter saved is that step's")
        model.save_pretrained(args.out)
        tokenizer.save_pretrained(args.out)
        shutil.copyfile(history, args.log_jsonl)
        clear_owned(checkpoint_dir)
        print(f"adapter saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
