"""The whole workflow through Snakemake on the bundled sample and on learnable synthetic data."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pandas as pd
from conftest import (INTERRUPTIBLE_TRAINING, REPO, logged_steps, resumed_steps, sample_workdir, snakemake,
                      wait_for_checkpoint)


def read_csv(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


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
    result = snakemake(demo_run, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_labels_flow_from_xlsx_to_csv(tmp_path):
    """With a cue in the question that names the answer, the trained demo model
    answers held-out questions right; the untrained base is near chance."""
    cue = tmp_path / "cue"
    made = subprocess.run([sys.executable, REPO / "resources/sample/make_sample.py", "--out-dir", cue, "--cue",
                           "--train-articles", "200", "--test-articles", "40"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    workdir = sample_workdir(tmp_path / "work", source=cue, data={"val_fraction": 0.1})
    snakemake(workdir)
    truth = {r["ID"]: r["Answer"] for r in read_csv(cue / "test_answers.csv")}
    answers = read_csv(workdir / "results/default/answers.csv")
    accuracy = sum(truth[a["ID"]] == a["Answer"] for a in answers) / len(answers)
    assert len(answers) == 120 and accuracy >= 0.9, accuracy

    untrained = sample_workdir(tmp_path / "untrained", source=cue, data={"val_fraction": 0.1},
                               training={"epochs": 0.01})
    snakemake(untrained)
    answers = read_csv(untrained / "results/default/answers.csv")
    chance = sum(truth[a["ID"]] == a["Answer"] for a in answers) / len(answers)
    assert chance <= 0.45, chance


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    workdir = sample_workdir(tmp_path, training=INTERRUPTIBLE_TRAINING)
    process = snakemake(workdir, "results/default/adapter", background=True)
    done = wait_for_checkpoint(workdir, process, timeout=300)
    assert done and process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)  # as a lost node or a Slurm preemption would
    process.wait()
    assert not (workdir / "results/default/adapter").exists()

    snakemake(workdir, "--unlock")  # a killed Snakemake leaves its lock, as after a power loss
    snakemake(workdir, "results/default/adapter")
    resumed = resumed_steps(workdir)
    assert resumed and resumed[0] >= max(done), (workdir / "logs/default/train_lora.log").read_text()[-2000:]
    assert min(logged_steps(workdir)) > resumed[0]
    assert (workdir / "results/default/adapter/adapter_model.safetensors").exists()


def test_several_gpus_train_data_parallel_through_torchrun(tmp_path):
    """resources.train.gpu: 2 launches two ranks (here on CPU, with DDP); each sees half the data."""
    workdir = sample_workdir(tmp_path, resources={"train": {"gpu": 2, "threads": 2}})
    snakemake(workdir, "results/default/adapter", "--resources", "gpu=2")
    log = (workdir / "logs/default/train_lora.log").read_text()
    assert "about 9 optimizer steps per epoch on 2 process(es)" in log  # 144 examples / (8 x 2)
    assert max(logged_steps(workdir)) == 27  # 3 epochs
    assert (workdir / "results/default/adapter/adapter_model.safetensors").exists()
