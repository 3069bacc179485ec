"""The whole workflow through Snakemake on the bundled sample and on learnable synthetic data."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from conftest import (INTERRUPTIBLE_TRAINING, accuracy, logged_steps, read_csv, resumed_steps, sample_workdir, snakemake,
                      wait_for_checkpoint)

from mcqa.modeling import load_tokenizer
from mcqa.records import read_records
from mcqa.batching import micro_batches
from mcqa.training import tokenize


def test_default_workflow_writes_every_output(demo_run):
    test_ids = [str(v) for v in pd.read_excel(demo_run / "data/test.xlsx", dtype=object)["題號"]]
    answers = read_csv(demo_run / "results/default/answers.csv")
    assert list(answers[0]) == ["ID", "Answer"]
    assert [a["ID"] for a in answers] == test_ids
    assert {a["Answer"] for a in answers} <= {"1", "2", "3", "4"}
    probs = read_csv(demo_run / "results/default/answer_probs.csv")
    assert [p["ID"] for p in probs] == test_ids
    for p, a in zip(probs, answers):
        four = [float(p[f"p{k}"]) for k in "1234"]
        assert abs(sum(four) - 1) < 1e-4 and four.index(max(four)) + 1 == int(a["Answer"])
    metrics = json.loads((demo_run / "results/default/metrics.json").read_text())
    val = json.loads((demo_run / "results/data/val.json").read_text())
    assert metrics["questions"] == len(val) > 0
    assert sum(sum(row.values()) for row in metrics["confusion"].values()) == len(val)
    report = json.loads((demo_run / "results/data/report.json").read_text())
    assert report["train"]["rows_kept"] == 180 and report["test"]["rows_kept"] == len(test_ids)
    log = [json.loads(line) for line in (demo_run / "results/default/train_log.jsonl").read_text().splitlines()]
    assert any("val_loss" in e for e in log) and all(e["tokens_per_s"] > 0 for e in log if "loss" in e)
    assert (demo_run / "results/default/train_curve.png").read_bytes()[:4] == b"\x89PNG"
    train_log = (demo_run / "logs/default/train_lora.log").read_text()
    assert "tokens/s" in train_log and "ETA" in train_log
    assert not (demo_run / "results/default/checkpoints").exists(), "checkpoints are removed after success"


def test_second_call_schedules_nothing(demo_run):
    result = snakemake(demo_run, "-n", snakefile=demo_run.parent / "流程 copy" / "Snakefile")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_the_end_of_a_run_says_where_its_answers_are(demo_run):
    """Snakemake's own last lines say nothing of the results: the workflow names each answers file with its
    validation accuracy, the experiments table and the report's command (here after a run of one cheap job: a
    call with nothing to do ends before it)."""
    result = snakemake(demo_run, "--forcerun", "summarize_experiments", snakefile=demo_run.parent / "流程 copy" / "Snakefile")
    metrics = json.loads((demo_run / "results/default/metrics.json").read_text())
    low, high = metrics["accuracy_ci95"]
    out = result.stdout + result.stderr
    assert (f"results/default/answers.csv  validation accuracy {metrics['accuracy']:.3f} (95% {low:.3f}-{high:.3f}, "
            f"{metrics['questions']} questions)") in out, out[-2000:]
    assert "Experiments table: results/experiments.html" in out
    assert f"snakemake --report results/report.html --configfile {shlex.quote(str(demo_run / 'config.yaml'))}" in out


def test_a_failed_run_names_the_failed_jobs_logs(tmp_path):
    workdir = sample_workdir(tmp_path, data={"train": "data/bad.csv"})
    columns = "文章,問題,選項1,選項2,選項3,選項4,正確答案"
    (workdir / "data/bad.csv").write_text(f"{columns}\n一篇文章,問題,甲,乙,丙,丁,5\n", encoding="utf-8")
    result = snakemake(workdir, "results/data/train.json", check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Failed jobs and their logs (shown above):\n  prepare_train_data: logs/prepare_train_data.log" in out, out[-3000:]
    assert "is not an answer 1-4" in (workdir / "logs/prepare_train_data.log").read_text()


def test_labels_flow_from_xlsx_to_csv(demo_run):
    """The bundled sample's questions carry a cue that names the answer: the demo model learns it and
    answers held-out questions right (the untrained base is near chance: test_cross_validation's baseline)."""
    truth = demo_run / "data/test_answers.csv"
    assert accuracy(demo_run / "results/default/answers.csv", truth) >= 0.9
    assert json.loads((demo_run / "results/default/metrics.json").read_text())["accuracy"] >= 0.9


WEIGHT_NEUTRAL_CHANGES = {"gradient_checkpointing": True, "checkpoint_steps": 50, "compile": False,
                          "fuse_shared_inputs": False}
# Half the interruptible training (288 steps): killed after its checkpoint at step 80, with 208 steps to spare.
KILLED_TRAINING = {**INTERRUPTIBLE_TRAINING, "epochs": 2}


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory):
    """A training killed after two checkpoints, its newest checkpoint truncated, then rerun.

    Returns the workdir, the complete checkpoints' steps at the kill, and
    the training log of the rerun.
    """
    workdir = sample_workdir(tmp_path_factory.mktemp("killed"), training=KILLED_TRAINING, tracking="tensorboard")
    process = snakemake(workdir, "results/default/adapter", background=True)
    done = wait_for_checkpoint(workdir, process, timeout=300, count=2)
    assert done and process.poll() is None, "training finished before it could be killed"
    training = [psutil.Process(int(pid)) for pid in rank_processes(workdir)]  # its job's shell and itself
    assert training
    # Snakemake alone killed outright, as `kill -9` or a closed terminal would: its job's shell and the
    # training it runs are left behind, and the training must end on its own.
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    gone, alive = psutil.wait_procs(training, timeout=20)
    assert not alive, "the training went on after its Snakemake was killed"
    assert not (workdir / "results/default/adapter").exists()
    checkpoints = workdir / "results/default/checkpoints"
    done = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*") if (p / "trainer_state.json").exists())
    newest = checkpoints / f"checkpoint-{max(done)}/adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a disk that filled up, a copy cut short

    snakemake(workdir, "--unlock")  # a killed Snakemake leaves its lock, as after a power loss
    # What a user changes after an out-of-memory error or a preemption, none of which changes the weights
    # trained: the rerun must still resume.
    sample_workdir(workdir, training={**KILLED_TRAINING, **WEIGHT_NEUTRAL_CHANGES}, tracking="tensorboard")
    snakemake(workdir, "results/default/adapter")
    return workdir, done, (workdir / "logs/default/train_lora.log").read_text()


def test_killed_training_resumes_from_its_checkpoint(killed_training):
    workdir, done, log = killed_training
    resumed = resumed_steps(workdir)
    assert resumed and resumed[0] >= min(done), log[-2000:]
    assert (workdir / "results/default/adapter/adapter_model.safetensors").exists()
    assert not (workdir / "results/default/checkpoints").exists(), "checkpoints are removed after success"


def test_resume_survives_settings_that_do_not_change_the_weights(killed_training):
    workdir, done, log = killed_training
    assert resumed_steps(workdir) and "not resuming" not in log
    assert '"gradient_checkpointing": true' in log and '"checkpoint_steps": 50' in log  # the rerun's settings


def test_corrupt_newest_checkpoint_is_set_aside(killed_training):
    """A checkpoint that cannot be loaded does not block the resume: the one before it is taken."""
    workdir, done, log = killed_training
    assert f"as corrupt-checkpoint-{max(done)}: it cannot be loaded (adapter_model.safetensors" in log, log[-2000:]
    assert resumed_steps(workdir) == [max(s for s in done if s < max(done))]


def test_training_history_survives_a_resume(killed_training):
    """train_log.jsonl covers every logging step exactly once, before and after the kill."""
    workdir, _, _ = killed_training
    entries = [json.loads(line) for line in (workdir / "results/default/train_log.jsonl").read_text().splitlines()]
    (last,) = [e["step"] for e in entries if "train_runtime_s" in e]
    every = INTERRUPTIBLE_TRAINING["logging_steps"]
    assert [e["step"] for e in entries if "loss" in e] == list(range(every, last + 1, every))
    for total in ("elapsed_s", "tokens_seen", "examples_seen"):
        totals = [e[total] for e in entries if total in e]
        assert totals == sorted(totals) and totals[0] > 0, f"{total} goes on across the resume"


def test_tensorboard_shows_each_step_once_after_a_resume(killed_training):
    """The killed attempt logged steps past the checkpoint the rerun resumed from; TensorBoard must show
    each step once, as train_log.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _, _ = killed_training
    events = EventAccumulator(str(workdir / "results/tensorboard/default")).Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == [step for step in logged_steps(workdir) if step % INTERRUPTIBLE_TRAINING["logging_steps"] == 0]


def test_several_gpus_train_data_parallel_through_torchrun_and_resume_after_a_kill(tmp_path):
    """resources.train.gpu: 2 launches two ranks (here on CPU, with DDP); each sees half the packed
    micro-batches, and the log counts every token and example once, not once per rank. Seven examples a
    micro-batch make an odd number of them (21): both ranks must still step as often (neither waits for the
    other at an epoch's end) and no micro-batch may be trained twice to even them out. The training is
    killed outright after its first checkpoint, as a lost node would be: no rank trains on as an orphan
    (torchrun gives each a session of its own), and the rerun resumes the checkpoint on two processes, the
    optimizer state included, with every count still once."""
    from mcqa.batching import divisible

    workdir = sample_workdir(tmp_path, resources={"train": {"gpu": 2, "threads": 2}},
                             training={"epochs": 3, "micro_batch_size": 7, "checkpoint_steps": 9, "logging_steps": 3})
    process = snakemake(workdir, "results/default/adapter", "--resources", "gpu=2", background=True)
    done = wait_for_checkpoint(workdir, process, timeout=300)
    assert done and process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.time() + 10
    while (ranks := rank_processes(workdir)) and time.time() < deadline:
        time.sleep(0.2)
    assert not ranks, f"ranks left training after their launcher was killed: {ranks}"
    snakemake(workdir, "--unlock", "--resources", "gpu=2")
    snakemake(workdir, "results/default/adapter", "--resources", "gpu=2", timeout=600)

    log = (workdir / "logs/default/train_lora.log").read_text()
    assert resumed_steps(workdir) == [max(done)] and "not resuming" not in log, log[-2000:]
    records = read_records(workdir / "results/data/train.json", "labelled")
    features, _ = tokenize(records, load_tokenizer(str(workdir / "resources/models/demo")), 256)
    lengths = [len(f["input_ids"]) for f in features]
    batches = micro_batches(lengths, 7, 8192, 42, packed=True)
    assert len(batches) % 2 == 1 and len(divisible(batches, 2)) == len(batches) + 1
    steps = (len(batches) + 1) // 2
    assert f"{len(batches) + 1} packed micro-batches" in log
    assert f"about {steps} optimizer steps per epoch on 2 process(es)" in log
    entries = [json.loads(line) for line in (workdir / "results/default/train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(3, 3 * steps + 1, 3))  # each once, across the resume
    assert (workdir / "results/default/adapter/adapter_model.safetensors").exists()
    final = entries[-1]
    assert final["tokens_seen"] == 3 * sum(lengths)
    assert final["examples_seen"] == 3 * len(features)


def rank_processes(workdir) -> list[str]:
    """The train_lora processes whose working directory is `workdir`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if "train_lora.py" in (proc / "cmdline").read_text() and (proc / "cwd").resolve() == workdir.resolve():
                found.append(proc.name)
        except OSError:  # a process that ended while being looked at
            continue
    return found


def test_a_checkpoint_folder_in_use_by_a_live_training_is_refused(tmp_path):
    """A second training of a checkpoint folder stops at once, naming the process that holds it; once that
    process is gone (however it ended), the folder is free."""
    import subprocess
    import sys

    from conftest import SCRIPTS, run_script, training_defaults
    from mcqa.checkpoints import hold, release

    folder = tmp_path / "checkpoints"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from mcqa.checkpoints import hold; lock = hold(__import__('pathlib').Path(sys.argv[2])); "
                               "print('held', flush=True); time.sleep(60)", str(SCRIPTS), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    args = ["--train", tmp_path / "train.json", "--base-model", tmp_path / "base", "--out", tmp_path / "adapter",
            "--log-jsonl", tmp_path / "log.jsonl", "--checkpoint-dir", folder, "--settings",
            json.dumps(training_defaults())]
    refused = run_script("train_lora.py", *args)
    assert refused.returncode == 5
    assert f"{folder} is in use by another training that is still running (process {holder.pid})" in refused.stderr
    holder.kill()  # killed outright: the kernel drops its lock with it
    holder.wait()
    release(hold(folder), folder)


def test_checkpoints_of_another_training_are_not_resumed_and_the_log_says_why(tmp_path, capsys):
    """Steps trained on plain prompts must not be continued on chat prompts (nor select_best's steps scored
    with other rotations); settings that do not change the weights keep the checkpoints."""
    import argparse

    from conftest import training_defaults
    from mcqa.checkpoints import fingerprint, prepare_checkpoint_dir

    (tmp_path / "train.json").write_text("[]")
    args = argparse.Namespace(train=str(tmp_path / "train.json"), val="", base_model="base", revision=None,
                              prompt_format="plain", rotations=4)
    settings = training_defaults()
    folder = tmp_path / "checkpoints"

    def checkpoint_kept(settings, **changes) -> bool:
        (folder / "checkpoint-10").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint-10" / "trainer_state.json").write_text("{}")
        return prepare_checkpoint_dir(folder, expected(settings, **changes)) == folder / "checkpoint-10"

    def expected(settings, **changes) -> dict:
        return fingerprint(settings, **{**vars(args), **changes})

    assert prepare_checkpoint_dir(folder, expected(settings)) is None  # a fresh start
    neutral = {"gradient_checkpointing": True, "checkpoint_steps": 5, "logging_steps": 1, "compile": False,
               "eval_steps": 7}
    assert checkpoint_kept({**settings, **neutral}) and checkpoint_kept(settings, rotations=1)
    assert "not resuming" not in capsys.readouterr().err
    assert not checkpoint_kept(settings, prompt_format="chat")
    assert 'not resuming the checkpoints in' in (err := capsys.readouterr().err) and 'prompt_format "plain" -> "chat"' in err
    # The data order and the schedule depend on the number of processes: 1 -> 2 GPUs starts afresh, saying so.
    prepare_checkpoint_dir(folder, expected(settings))
    assert not checkpoint_kept(settings, processes=2) and "processes 1 -> 2" in capsys.readouterr().err
    best = {**settings, "select_best": True}
    prepare_checkpoint_dir(folder, expected(best))
    assert not checkpoint_kept({**best, "eval_steps": 7})
    assert not checkpoint_kept(best, rotations=1) and 'rotations 4 -> 1' in capsys.readouterr().err
    assert not checkpoint_kept({**best, "lora_r": 8}) and "settings.lora_r 48 -> 8" in capsys.readouterr().err


def test_a_full_disk_while_checkpointing_is_named_as_such(demo_run, tmp_path, monkeypatch, capsys):
    """torch reports a full disk while saving as "unexpected pos ..."; the log must say the disk is full."""
    import transformers

    import train_lora
    from conftest import training_defaults

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", full)
    settings = {**training_defaults(), "micro_batch_size": 8, "max_seq_length": 256, "epochs": 1,
                "checkpoint_steps": 2}
    data = demo_run / "results/data"
    assert train_lora.main([
        "--train", str(data / "train.json"), "--base-model", str(demo_run / "resources/models/demo"),
        "--out", str(tmp_path / "adapter"), "--log-jsonl", str(tmp_path / "log.jsonl"),
        "--checkpoint-dir", str(tmp_path / "checkpoints"), "--settings", json.dumps(settings)]) == 4
    err = capsys.readouterr().err
    assert f"ERROR writing to {tmp_path / 'checkpoints'} failed (RuntimeError: [enforce fail" in err
    assert "MB free, so it is most likely full" in err and "training resumes from its last complete checkpoint" in err
