import ast
import copy
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake_interface_executor_plugins.settings import DeploymentMethod
from snakemake.utils import validate

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
# What the user wrote, before validation fills in defaults: the demo's small
# sizes must not override a training key the user set.
USER_TRAINING = copy.deepcopy(config.get("training") or {})


@functools.cache
def read_schema(path):
    return yaml.safe_load(path.read_text())


def resolve_ref(schema, path):
    """The schema a `$ref` points to (in this file or another in workflow/schemas/), and its file."""
    file, _, pointer = schema["$ref"].partition("#")
    path = path.parent / file if file else path
    target = read_schema(path)
    for part in filter(None, pointer.split("/")):
        target = target[part]
    return target, path


def integers_as_int(data, schema, path):
    """Cast 8.0 to 8 wherever the schema (read from `path`) wants an integer.

    JSON Schema counts 8.0 as an integer (8.5 is refused), but Python code
    given 8.0 for a batch size or rank fails late, after hours of work.
    """
    if "$ref" in schema:
        return integers_as_int(data, *resolve_ref(schema, path))
    if schema.get("type") == "integer" and isinstance(data, float):
        return int(data)
    if isinstance(data, dict):
        extra = schema.get("additionalProperties")
        for key, value in data.items():
            sub = schema.get("properties", {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                data[key] = integers_as_int(value, sub, path)
    return data


def validated(data, schema_file, where):
    """Data checked against a schema in workflow/schemas/ (defaults filled, integers as int)."""
    try:
        validate(data, str(SCHEMAS / schema_file))
    except WorkflowError as exc:
        raise WorkflowError(f"{where}: {exc}") from None
    path = SCHEMAS / schema_file
    return integers_as_int(data, read_schema(path), path)


validated(config, "config.schema.yaml", "config")

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS))
from mcqa.bases import has_tokenizer, install_hint, missing_packages, tied_embeddings, tied_modules_refused, tokenizer_packages


@functools.cache
def imported_modules(path):
    """The mcqa modules a script or module imports, directly or through one another."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("mcqa")):
            parent = (node.module or "").removeprefix("mcqa").lstrip(".")
            names = [parent] if parent else [alias.name for alias in node.names]
            found |= {SCRIPTS / "mcqa" / f"{name}.py" for name in names}
    found = {module for module in found if module.is_file()}
    return frozenset(found.union(*(imported_modules(module) for module in found)))


def library_of(script):
    """The mcqa modules a stage script uses: an edit to one of them makes exactly those stages' outputs
    stale (a comment in metrics.py retrains nothing)."""
    return sorted(str(module) for module in imported_modules(SCRIPTS / script) | {SCRIPTS / "mcqa" / "__init__.py"})
DEMO_MODEL = "resources/models/demo"
IS_DEMO = config["base_model"] == "demo"
HAS_VAL = config["data"]["val_fraction"] > 0


def check_base_model(name):
    """A base_model that names a local folder must hold a Hugging Face checkpoint; say so before any job runs.

    Absolute paths, paths starting with . or ~, paths with two or more
    slashes, paths whose first folder exists here (models/Breeze-7B beside a
    models/ folder) and anything that exists are local; any other `org/name`
    or `name` is a hub id.
    """
    if name == "demo":
        return
    path = Path(name).expanduser()
    local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or path.exists()
    if not (local or (len(path.parts) == 2 and Path(path.parts[0]).is_dir())):
        return
    if not path.is_dir():
        raise WorkflowError(
            f"config base_model: {name} does not exist. Point it at a folder holding a Hugging Face "
            "checkpoint (config.json, *.safetensors, tokenizer files), or at a hub id such as hfl/chinese-llama-2-7b."
        )
    if not (path / "config.json").is_file():
        raise WorkflowError(
            f"config base_model: {name} holds no config.json, so it is not a Hugging Face checkpoint "
            f"(it holds: {', '.join(sorted(p.name for p in path.iterdir())[:10]) or 'nothing'}). "
            "Point base_model at the folder that save_pretrained wrote."
        )
    if not has_tokenizer(path):
        raise WorkflowError(
            f"config base_model: {name} holds no tokenizer (no tokenizer.json, tokenizer.model or vocab.json); "
            "copy the tokenizer files of the base into it (tokenizer.save_pretrained writes them)."
        )
    # With --sdm conda the jobs run in envs/*.yaml, which pin what tokenizers need; else in this Python.
    if DeploymentMethod.CONDA not in workflow.deployment_settings.deployment_method:
        if missing := missing_packages(tokenizer_packages(path)):
            raise WorkflowError(f"config base_model: {install_hint(name, missing)}")


check_base_model(config["base_model"])


def check_chat_template(name):
    """prompt_format: chat needs a chat template; a local base or the demo is checked before any job runs
    (a hub id is checked when training loads its tokenizer)."""
    if config["prompt_format"] != "chat":
        return
    if name == "demo":
        raise WorkflowError("config prompt_format: chat, but the demo model has no chat template; use plain")
    path = Path(name).expanduser()
    if path.is_dir():
        tokenizer_config = path / "tokenizer_config.json"
        has_template = (path / "chat_template.jinja").exists() or (path / "chat_template.json").exists() or (
            tokenizer_config.exists() and json.loads(tokenizer_config.read_text()).get("chat_template"))
        if not has_template:
            raise WorkflowError(
                f"config prompt_format: chat, but base_model {name} has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use prompt_format: plain or an instruction-tuned base"
            )


check_chat_template(config["base_model"])
# What answering and evaluation score with.
ANSWERING = {**config["answering"], "prompt_format": config["prompt_format"]}


def run_settings(run):
    """The run's training settings, validated: schema defaults, then the demo's sizes
    (base_model: demo only), then the config's `training` keys, then the run's own."""
    demo = config["demo_model"]["training"] if IS_DEMO else {}
    settings = {**config["training"], **demo, **USER_TRAINING, **(config["runs"][run] or {})}
    settings = validated(settings, "training.schema.yaml", f"config runs.{run}")
    if settings["select_best"] and not HAS_VAL:
        raise WorkflowError(
            f"config runs.{run}: select_best picks the adapter by validation accuracy, but data.val_fraction is 0, "
            "so there are no validation questions; hold out a share (e.g. 0.1) or set select_best: false"
        )
    if settings["early_stopping_patience"] and not settings["select_best"]:
        raise WorkflowError(f"config runs.{run}: early_stopping_patience needs select_best: true")
    base = Path(config["base_model"]).expanduser()
    if settings["modules_to_save"] and (base / "config.json").is_file() and tied_embeddings(base):
        raise WorkflowError(f"config runs.{run}: {tied_modules_refused(config['base_model'], settings['modules_to_save'])}")
    return settings


def rotations_flag(wildcards):
    """For runs that pick their best step by validation accuracy, the option orders it is scored in (the one
    answering setting their training uses; the others rerun no training)."""
    return f"--rotations {config['answering']['rotations']}" if RUNS[wildcards.run]["select_best"] else ""


RUNS = {run: run_settings(run) for run in config["runs"]}


wildcard_constraints:
    run="|".join(re.escape(run) for run in RUNS),
    member="|".join(re.escape(run) for run in [*RUNS, "ensemble"]),


def as_json(settings):
    """Settings as one string with sorted keys: reordering config keys changes nothing."""
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def base_model_path():
    return DEMO_MODEL if IS_DEMO else config["base_model"]


def base_model_input(wildcards):
    """The demo model is built by the workflow; another base is a path or hub id the user owns."""
    return DEMO_MODEL if IS_DEMO else []


def revision_flag():
    revision = config["base_model_revision"]
    return f"--revision {shlex.quote(revision)}" if revision and not IS_DEMO else ""


def remote_code_flag():
    return "--trust-remote-code" if config["trust_remote_code"] else ""


def check_gpu_limit():
    """A training that asks for more GPUs than `--resources gpu=N` allows would be capped by Snakemake without
    a word and train as fewer processes; refuse it before any job runs."""
    wanted = config["resources"]["train"]["gpu"]
    if "gpu" in workflow.global_resources and (limit := workflow.global_resources["gpu"].value) is not None:
        if wanted > limit >= 1:
            raise WorkflowError(
                f"config resources.train.gpu: {wanted}, but snakemake was started with --resources gpu={limit}: "
                f"it would give each training {limit} GPU(s), so it would train as {limit} process(es). Start it "
                f"with --resources gpu={wanted} (or more), or set resources.train.gpu: {limit}."
            )


check_gpu_limit()


def train_launcher(wildcards, resources, threads):
    """torchrun with one rank per GPU (and the CPU threads shared out), else plain python."""
    if resources.gpu > 1:
        return (
            f"OMP_NUM_THREADS={max(1, threads // resources.gpu)} "
            f"torchrun --standalone --nproc_per_node={resources.gpu}"
        )
    return "python"


def ensemble_members():
    """The runs the ensemble combines ([] when it is off or would have fewer than two)."""
    settings = config["ensemble"]
    members = settings["runs"] or list(RUNS)
    unknown = [run for run in members if run not in RUNS]
    if unknown:
        raise WorkflowError(f"config ensemble.runs: {', '.join(unknown)} not among runs ({', '.join(RUNS)})")
    if settings["runs"] and len(members) < 2:
        raise WorkflowError("config ensemble.runs: an ensemble needs at least two runs")
    if settings["weights"] == "val_accuracy" and not HAS_VAL:
        raise WorkflowError(
            "config ensemble.weights: val_accuracy needs validation accuracies, but data.val_fraction is 0; "
            "set weights: equal or hold out a validation share"
        )
    # Sorted: the order of members changes no mean, so reordering runs in the config reruns nothing.
    return sorted(members) if settings["activate"] and len(members) >= 2 else []


ENSEMBLE = ensemble_members()


def get_ensemble_weights_input(wildcards):
    """The members' metrics.json when the ensemble weighs them by validation accuracy (else nothing)."""
    return expand("results/{run}/metrics.json", run=ENSEMBLE) if config["ensemble"]["weights"] == "val_accuracy" else []


def get_experiment_inputs(wildcards):
    """What the experiments table reads: each run's training log, metrics and the ensemble's metrics."""
    files = {"train_logs": expand("results/{run}/train_log.jsonl", run=RUNS)}
    if HAS_VAL:
        files["metrics"] = expand("results/{run}/metrics.json", run=RUNS)
        if ENSEMBLE:
            files["ensemble"] = "results/ensemble/metrics.json"
    return files


def get_final_output():
    """Everything `snakemake` with no target builds."""
    outputs = ["results/data/report.json", "results/data/report.html", "results/experiments.html"]
    outputs += expand("results/{run}/{name}", run=RUNS, name=["answers.csv", "train_curve.png"])
    members = list(RUNS) + (["ensemble"] if ENSEMBLE else [])
    if HAS_VAL:
        outputs += expand("results/{member}/{name}", member=members, name=["metrics.json", "confusion.png"])
    if ENSEMBLE:
        outputs += ["results/ensemble/answers.csv"]
    return outputs
