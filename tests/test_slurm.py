"""The Slurm profile against a real Slurm: a one-node cluster on localhost
(tests/slurm/start_local_cluster.sh, started by .ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import datetime

import pytest
import yaml
from conftest import (BIN, INTERRUPTIBLE_TRAINING, REPO, env, resumed_steps, sample_workdir, wait_for_checkpoint,
                      write_config)

LAPTOP_CLUSTER = [  # what a one-node test cluster needs beyond the profile (its partitions are the profile's)
    "--slurm-status-command", "squeue", "--slurm-no-account", "--slurm-init-seconds-before-status-checks", "1",
    "--seconds-between-status-checks", "2",  # a laptop cluster answers at once; a real one is polled every 10 s
    # No conda channels are reachable here; env-modules deploys nothing for rules without modules.
    "--sdm", "env-modules",
]
SMALL = {"train": {"gpu": 1, "mem_mb": 1500, "runtime": 30, "threads": 1},
         "merge": {"gpu": 0, "mem_mb": 1200, "runtime": 20, "threads": 1},
         "answer": {"gpu": 1, "mem_mb": 1300, "runtime": 25, "threads": 1}}


def local_cluster_ready() -> bool:
    if not shutil.which("sbatch"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True)
    return result.returncode == 0 and {"gpu*", "cpu"} <= set(result.stdout.split())


@pytest.fixture(scope="module")
def local_cluster() -> None:
    """The local test cluster, for this module's tests one after the other (the fold trainings' test needs
    the node's two GPUs to itself): under `make test` one worker runs every test that uses it."""
    if not local_cluster_ready():
        pytest.skip("no sbatch or no local test cluster; start one with tests/slurm/start_local_cluster.sh --install")


def slurm_snakemake(workdir, *args, background=False, check=True, snakefile=REPO / "Snakefile"):
    command = [str(BIN / "snakemake"), *args, "-s", str(snakefile), "--directory", str(workdir),
               "--configfile", str(workdir / "config.yaml"), "--profile", str(snakefile.parent / "profiles/slurm"),
               *LAPTOP_CLUSTER]
    if background:
        return subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def jobs_of(workdir) -> list[dict]:
    """Every Slurm job this workdir submitted, with the fields scontrol reports; not those of an earlier test
    session's workdir of the same path that the controller still remembers."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True).stdout
    created = datetime.fromtimestamp((workdir / "config.yaml").stat().st_mtime).replace(microsecond=0)
    jobs = []
    for line in out.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("WorkDir") == str(workdir) and datetime.fromisoformat(fields["SubmitTime"]) >= created:
            jobs.append(fields)
    return jobs


def test_workflow_through_slurm_matches_local_run(local_cluster, demo_run, tmp_path):
    """Only the jobs that need a node are submitted: scoring to the GPU partition, the merge to the CPU
    partition, with the resources config.yaml gives; plots and tables run where Snakemake runs. The local
    demo run's adapter merged and scored again through Slurm gives the same answers. (Training through
    Slurm, with its GPU, memory and time, is the next test's.)"""
    workdir = tmp_path / "work"
    shutil.copytree(demo_run, workdir, symlinks=True)  # mtimes and Snakemake's metadata kept: nothing stale
    write_config(workdir, **{**yaml.safe_load((demo_run / "config.yaml").read_text()), "resources": SMALL})
    slurm_snakemake(workdir, "--forcerun", "merge_lora", snakefile=demo_run.parent / "流程 copy" / "Snakefile")
    submitted = jobs_of(workdir)
    partitions = {re.sub(r"_wildcards_.*", "", j["Comment"]).removeprefix("rule_"): j["Partition"] for j in submitted}
    assert partitions == {"evaluate_answers": "gpu", "answer_questions": "gpu", "merge_lora": "cpu"}, partitions
    assert len(submitted) == 3 and all(j["JobState"] == "COMPLETED" for j in submitted)
    jobs = {j["Comment"]: j for j in submitted}
    answer = jobs["rule_answer_questions_wildcards_default"]
    assert (answer["TresPerJob"], answer["MinMemoryNode"], answer["TimeLimit"]) == ("gres:gpu:1", "1300M", "00:25:00")
    merge = jobs["rule_merge_lora_wildcards_default"]
    assert "gpu" not in merge.get("TresPerJob", "") and merge["MinMemoryNode"] == "1200M"
    assert (workdir / "results/default/answers.csv").read_text() == (demo_run / "results/default/answers.csv").read_text()


def test_fold_trainings_run_at_once_one_killed_resumes_on_retry_and_a_failing_job_is_not_retried(local_cluster,
                                                                                                    tmp_path):
    """Each fold's training is its own Slurm job, with a GPU and config.yaml's memory and time, and they run
    side by side (the test node has two GPUs), as on a cluster of many nodes; one cancelled as a preemption
    or time-out would resumes on the retry. Only training is retried: scoring a base with 8-bit loading on a
    machine without CUDA fails at once, every time, and is submitted once; it asks for no GPU here, so the
    two trainings have the node's two GPUs whatever the order of submission and the machine's load (it once
    took one, and the second training started only after the first was cancelled). (One call for both: the
    plugin's status checks back off while jobs run, so every call waits a while for its last job.)"""
    resources = {**SMALL, "answer": {**SMALL["answer"], "gpu": 0}}
    workdir = sample_workdir(tmp_path, data={"folds": 2}, training=INTERRUPTIBLE_TRAINING, resources=resources,
                             runs={"default": {}, "base": {"train": False}}, answering={"load_in": "8bit"})
    process = slurm_snakemake(workdir, "--keep-going", "results/default/fold0/adapter",
                              "results/default/fold1/adapter", "results/base/answers.csv", background=True)
    wait_for_checkpoint(workdir, process, timeout=600, model="default/fold0")
    running = [j for j in jobs_of(workdir) if j["Comment"].startswith("rule_train_lora") and "fold0" in j["Comment"]
               and j["JobState"] == "RUNNING"]
    assert running, "fold 0's training finished before it could be cancelled"
    subprocess.run(["scancel", running[0]["JobId"]], check=True)
    output, _ = process.communicate(timeout=900)
    assert process.returncode != 0, output[-5000:]  # the failing job

    trainings = sorted((j for j in jobs_of(workdir) if j["Comment"].startswith("rule_train_lora")),
                       key=lambda j: int(j["JobId"]))
    assert {(j["TresPerJob"], j["MinMemoryNode"], j["TimeLimit"]) for j in trainings} == {
        ("gres:gpu:1", "1500M", "00:30:00")}, trainings
    fold0 = [j for j in trainings if "fold0" in j["Comment"]]
    fold1 = [j for j in trainings if "fold1" in j["Comment"]]
    assert [j["JobState"] for j in fold1] == ["COMPLETED"], trainings
    assert [j["JobState"] for j in fold0][0] == "CANCELLED" and fold0[-1]["JobState"] == "COMPLETED", trainings
    starts, ends = ([datetime.fromisoformat(j[key]) for j in (fold0[0], fold1[0])] for key in ("StartTime", "EndTime"))
    assert max(starts) < min(ends), f"the fold trainings ran one after the other: {starts} -> {ends}"
    resumed = resumed_steps(workdir, "default/fold0")
    assert resumed and resumed[0] > 0, (workdir / "logs/default/fold0/train_lora.log").read_text()[-2000:]
    for fold in (0, 1):
        assert (workdir / f"results/default/fold{fold}/adapter/adapter_model.safetensors").exists()
    scoring = [j["Comment"] for j in jobs_of(workdir) if not j["Comment"].startswith("rule_train_lora")]
    assert scoring == ["rule_answer_questions_wildcards_base"], scoring
    assert "load_in: 8bit needs a CUDA GPU" in (workdir / "logs/base/answer_questions.log").read_text()
