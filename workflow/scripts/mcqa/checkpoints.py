"""The checkpoint folder of a training: which checkpoint to resume, what train_lora owns there.

The folder is not a Snakemake output, so it survives a failed job; a rerun
resumes from its newest loadable checkpoint when the fingerprint (what
decides the trained weights) matches, and starts afresh otherwise, saying
why. Only what train_lora put there is ever removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

from .history import NAME as HISTORY
from .history import cut_back
from .progress import say

FINGERPRINT = "fingerprint.json"
LOCK = "in-use.lock"  # held by the training that uses the folder, for its whole life


class CheckpointsInUse(RuntimeError):
    """Another training, still running, uses this checkpoint folder."""


def hold(path: Path):
    """Lock the checkpoint folder for this process's life, or raise CheckpointsInUse naming the process that
    holds it. The lock is the kernel's (flock): it goes with the process however the process ends, so a
    killed training never leaves the folder locked. Keep the returned file open while training."""
    import fcntl
    import os

    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise CheckpointsInUse(
            f"{path} is in use by another training that is still running (process {owner}), such as one that a "
            f"killed Snakemake left behind: stop it (kill {owner}) or let it finish, then run snakemake again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def release(handle, path: Path) -> None:
    """Give up the lock of `hold` at the end of a training, and remove the folder if nothing else is left in
    it (a training that finished, or one refused before it wrote anything)."""
    (path / LOCK).unlink(missing_ok=True)
    handle.close()
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


# Settings that change nothing in the trained weights: a resume goes on when only these differ (turning
# on gradient checkpointing after an out-of-memory error, or checkpointing more often, keeps the hours trained).
WEIGHT_NEUTRAL = ("checkpoint_steps", "logging_steps", "gradient_checkpointing", "compile", "fuse_shared_inputs")


def fingerprint(settings: dict, train: str, val: str, base_model: str, revision: str | None, prompt_format: str,
                rotations: int, processes: int = 1, extra: list[str] = ()) -> dict:
    """What a checkpoint must match to be resumed: what decides the trained weights (settings, prompt format,
    base model, data with the extra records and teacher probabilities trained on, and the number of
    processes, since the data order and the schedule are functions of it) and, with select_best, what decides
    the step kept (eval_steps, the scoring rotations)."""
    digest = hashlib.sha256()
    for path in (train, val, *extra):
        if path:
            digest.update(Path(path).read_bytes())
    neutral = WEIGHT_NEUTRAL + (() if settings["select_best"] else ("eval_steps",))
    return {"settings": {k: v for k, v in sorted(settings.items()) if k not in neutral},
            "prompt_format": prompt_format, "rotations": rotations if settings["select_best"] else None,
            "base_model": base_model, "revision": revision, "data_sha256": digest.hexdigest(), "processes": processes}


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
    return sorted(found, key=checkpoint_step, reverse=True)


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
    """Remove what train_lora.py put in `path`, and `path` itself once empty; never anything else (the lock
    of the training in progress stays: `release` removes it)."""
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
        say(f"not resuming the checkpoints in {path}, which belong to another training: "
            f"{'; '.join(differences(previous, expected))}; starting afresh")
    if previous == expected:
        for checkpoint in checkpoints_newest_first(path):
            if (problem := unloadable(checkpoint)) is None:
                cut_back(path / HISTORY, checkpoint_step(checkpoint))
                return checkpoint
            if (checkpoint / "trainer_state.json").exists():
                aside = path / f"corrupt-{checkpoint.name}"
                shutil.rmtree(aside, ignore_errors=True)
                checkpoint.rename(aside)
                say(f"set aside {checkpoint} as {aside.name}: it cannot be loaded ({problem})")
            else:
                shutil.rmtree(checkpoint)
        say(f"no loadable checkpoint in {path}; starting afresh")
    clear_owned(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(expected, sort_keys=True))
    return None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step of a checkpoint-N folder."""
    return int(OWNED_DIR.fullmatch(Path(checkpoint).name)[2])
