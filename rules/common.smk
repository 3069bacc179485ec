import json
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, "../workflow/schemas/config.schema.yaml")

SCRIPTS = Path(workflow.basedir) / "workflow" / "scripts"
# Every model and data script imports the shared mcqa package; an edit to it
# must make their outputs stale, so it is an input of each rule.
LIB = sorted(str(p) for p in (SCRIPTS / "mcqa").glob("*.py"))
DEMO_MODEL = "resources/models/demo"
HAS_VAL = config["data"]["val_fraction"] > 0


def run_settings(run):
    """The run's training settings: config `training` with the run's overrides, validated."""
    settings = {**config["training"], **(config["runs"][run] or {})}
    try:
        validate(settings, "../workflow/schemas/training.schema.yaml")
    except WorkflowError as exc:
        raise WorkflowError(f"config runs.{run}: {exc}") from None
    return settings


RUNS = {run: run_settings(run) for run in config["runs"]}


wildcard_constraints:
    run="|".join(re.escape(run) for run in RUNS),


def as_json(settings):
    """Settings as one string with sorted keys: reordering config keys changes nothing."""
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def base_model_path():
    return DEMO_MODEL if config["base_model"] == "demo" else config["base_model"]


def base_model_input(wildcards):
    """The demo model is built by the workflow; another base is a path or hub id the user owns."""
    return DEMO_MODEL if config["base_model"] == "demo" else []


def remote_code_flag():
    return "--trust-remote-code" if config["trust_remote_code"] else ""


def train_launcher(wildcards, resources, threads):
    """torchrun with one rank per GPU (and the CPU threads shared out), else plain python."""
    if resources.gpu > 1:
        return (
            f"OMP_NUM_THREADS={max(1, threads // resources.gpu)} "
            f"torchrun --standalone --nproc_per_node={resources.gpu}"
        )
    return "python"
