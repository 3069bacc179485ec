"""After a change, Snakemake schedules exactly the stale jobs; GPU jobs never overlap."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, TWO_RUNS as RUNS, sample_workdir, snakemake

GPU_RULES = {"train_lora", "answer_questions", "evaluate_answers", "score_fold_model"}
# Two runs make an ensemble; its answers rerun with any member's answers, and everything that
# reads validation results (its metrics, confusion matrices, the experiments table) with any member's.
ENSEMBLE = {("ensemble_answers", ""), ("all", "")}
VALIDATION = {("evaluate_ensemble", ""), ("plot_confusion", "ensemble"), ("summarize_experiments", "")}


@pytest.fixture
def finished(two_runs, tmp_path) -> Path:
    """A private copy of the finished two-run workdir (mtimes and Snakemake metadata kept)."""
    copy = tmp_path / "work"
    shutil.copytree(two_runs[0], copy, symlinks=True)
    return copy


def dry_run(workdir) -> tuple[set[tuple[str, str]], str]:
    """{(rule, run wildcard or '')} that a dry run schedules, and its output."""
    output = snakemake(workdir, "-n").stdout
    jobs = set()
    for block in re.split(r"\n(?=\[.*\]\n(?:local)?rule )|\n(?=(?:local)?rule )", output):
        if match := re.search(r"^(?:local)?rule (\w+):", block, re.M):
            wildcard = re.search(r"wildcards: (?:run|member|model)=(\S+)", block)
            jobs.add((match[1], wildcard[1] if wildcard else ""))
    return jobs, output


def edit_config(workdir, edit) -> None:
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    edit(config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False))


def edit_sheet(path: Path, column: str) -> None:
    frame = pd.read_excel(path, dtype=object)
    frame.at[0, column] = str(frame.at[0, column]) + "（修訂）"
    frame.to_excel(path, index=False)


def per_run(*rules: str) -> set[tuple[str, str]]:
    return {(rule, run) for rule in rules for run in RUNS}


def test_nothing_changed_nothing_runs(finished):
    assert "Nothing to be done" in snakemake(finished, "-n").stdout


def test_reordered_config_keys_change_nothing(finished):
    def reorder(config):
        for key in list(config):
            config[key] = config.pop(key)  # first key goes last
        config["training"] = dict(reversed(list(config["training"].items())))
        config["runs"] = dict(reversed(list(config["runs"].items())))
    edit_config(finished, reorder)
    assert "Nothing to be done" in snakemake(finished, "-n").stdout


def test_test_file_changed_reruns_only_test_data_and_answers(finished):
    edit_sheet(finished / "data/test.xlsx", "問題")
    jobs, output = dry_run(finished)
    assert jobs == {("prepare_test_data", ""), ("summarize_data", "")} | ENSEMBLE | per_run("answer_questions")
    assert "reason: Updated input files: data/test.xlsx" in output


def test_train_file_changed_reruns_data_training_and_everything_after(finished):
    edit_sheet(finished / "data/train.xlsx", "文章")
    jobs, _ = dry_run(finished)
    assert jobs == {("prepare_train_data", ""), ("summarize_data", ""), ("build_demo_model", "")} | ENSEMBLE | (
        VALIDATION | per_run("train_lora", "merge_lora", "answer_questions", "evaluate_answers", "plot_training",
                             "plot_confusion"))


def test_lora_setting_of_one_run_reruns_only_that_run(finished):
    edit_config(finished, lambda c: c["runs"]["r8"].update(lora_r=16))
    jobs, output = dry_run(finished)
    assert jobs == ENSEMBLE | VALIDATION | {(rule, "r8") for rule in (
        "train_lora", "merge_lora", "answer_questions", "evaluate_answers", "plot_training", "plot_confusion")}
    assert "params" in output.lower()


def test_new_run_reruns_only_that_run_and_the_ensemble(finished):
    edit_config(finished, lambda c: c["runs"].update(r16={"lora_r": 16}))
    jobs, _ = dry_run(finished)
    assert jobs == ENSEMBLE | VALIDATION | {(rule, "r16") for rule in (
        "train_lora", "merge_lora", "answer_questions", "evaluate_answers", "plot_training", "plot_confusion")}


def test_answering_setting_reruns_only_answers_and_evaluation(finished):
    edit_config(finished, lambda c: c.setdefault("answering", {}).update(batch_tokens=999))
    jobs, _ = dry_run(finished)
    assert jobs == ENSEMBLE | VALIDATION | per_run("answer_questions", "evaluate_answers", "plot_confusion")


def test_a_missing_adapter_is_trained_again(finished):
    """A training killed after `--forcerun train_lora` leaves no adapter (Snakemake removes an incomplete
    output) beside answers made before; the adapter is a product of its own, so a plain run trains it again."""
    shutil.rmtree(finished / "results/r8/adapter")
    jobs, _ = dry_run(finished)
    assert ("train_lora", "r8") in jobs and ("train_lora", "default") not in jobs


def test_touched_but_unchanged_code_reruns_nothing(finished):
    """What a fresh checkout does to file times: scripts newer than results, same content."""
    for script in (REPO / "workflow/scripts").rglob("*.py"):
        os.utime(script)
    assert "Nothing to be done" in snakemake(finished, "-n").stdout


def max_concurrent(output: str, rules: set[str]) -> int:
    """Most jobs of `rules` running at once, from Snakemake's start and finish lines."""
    running, most = set(), 0
    for block in re.split(r"\n(?=\[)", output):
        if (start := re.search(r"^(?:local)?rule (\w+):", block, re.M)) and start[1] in rules:
            running.add(re.search(r"jobid: (\d+)", block)[1])
        for job, rule in re.findall(r"Finished jobid: (\d+) \(Rule: (\w+)\)", block):
            running.discard(job)
        most = max(most, len(running))
    return most


def test_gpu_jobs_never_overlap_with_one_gpu(two_runs):
    _, output = two_runs
    assert output.count("Finished jobid") >= 12
    assert max_concurrent(output, GPU_RULES) == 1
    assert max_concurrent(output, {"plot_training", "merge_lora", "prepare_test_data", "prepare_train_data"}) >= 1


def test_gpu_jobs_do_overlap_with_two_gpus(finished):
    """The same check sees overlap when two GPU slots allow it, so the test above can fail."""
    for run in RUNS:
        shutil.rmtree(finished / f"results/{run}/adapter")
    result = snakemake(finished, *(f"results/{run}/adapter" for run in RUNS), "--cores", "4", "--resources", "gpu=2")
    assert max_concurrent(result.stdout + result.stderr, GPU_RULES) == 2


def test_several_gpus_launch_torchrun_with_threads_shared(tmp_path):
    workdir = sample_workdir(tmp_path, resources={"train": {"gpu": 2, "threads": 8}})
    output = snakemake(workdir, "-n", "-p", "--cores", "8", "--resources", "gpu=2").stdout
    assert "OMP_NUM_THREADS=4 torchrun --standalone --nproc_per_node=2" in output
    assert "--deepspeed-config" in output and "zero2.json" in output
