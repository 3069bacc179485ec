"""Config validation fails before any job runs, naming the key; the DAG is as documented."""

from __future__ import annotations

import re

import pytest
from conftest import sample_workdir, snakemake


def dry_run(workdir, *args):
    return snakemake(workdir, "-n", *args, check=False)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"data": {"val_fraction": "a fifth"}}, "val_fraction"),
        ({"data": {"split_by": "question"}}, "split_by"),
        ({"answering": {"batchsize": 8}}, "batchsize"),
        ({"unknown_block": 1}, "unknown_block"),
        ({"training": {"lora_r": 0}}, "lora_r"),
        ({"runs": {"r8": {"lora_rank": 8}}}, "lora_rank"),
        ({"runs": {"r8": {"epochs": "two"}}}, "runs.r8"),
    ],
)
def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, overrides, needle):
    workdir = sample_workdir(tmp_path, **overrides)
    result = dry_run(workdir)
    assert result.returncode != 0
    assert needle in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def scheduled(result) -> dict[str, int]:
    """Rule name -> job count from a dry run's 'Job stats' table."""
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_schedules_every_stage_once_per_run(tmp_path):
    workdir = sample_workdir(tmp_path, runs={"default": {}, "r8": {"lora_r": 8}})
    result = dry_run(workdir)
    assert result.returncode == 0, result.stderr
    assert scheduled(result) == {
        "prepare_train_data": 1, "prepare_test_data": 1, "summarize_data": 1, "build_demo_model": 1,
        "train_lora": 2, "merge_lora": 2, "answer_questions": 2, "evaluate_answers": 2, "plot_training": 2, "all": 1,
    }


def test_no_validation_split_means_no_evaluation(tmp_path):
    workdir = sample_workdir(tmp_path, data={"val_fraction": 0})
    result = dry_run(workdir)
    assert result.returncode == 0, result.stderr
    assert "evaluate_answers" not in scheduled(result)


def test_readme_documents_every_config_key():
    import yaml
    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    training = yaml.safe_load((REPO / "workflow/schemas/training.schema.yaml").read_text())
    table = (REPO / "README.md").read_text().split("## Configuration")[1].split("\n## ")[0]
    keys = [f"training.{k}" for k in training["properties"]]
    for name, spec in schema["properties"].items():
        keys += [f"{name}.{k}" for k in spec.get("properties", {})] or [name]
    for key in keys:
        top, _, leaf = key.partition(".")
        assert f"`{key}`" in table or (f"`{top}." in table and f"`{leaf}`" in table), key
