# The config: read, validated against workflow/schemas/ (defaults filled in), and checked before any job
# runs: the base model, the data settings that work together, the GPU limit.
import copy
import functools
import json
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
# What the user wrote, before validation fills in defaults: the demo's small
# sizes must not override a training key the user set.
USER_TRAINING = copy.deepcopy(config.get("training") or {})
USER_DATA = copy.deepcopy(config.get("data") or {})
USER_RUNS = "runs" in config  # else the single `default` run of the schema


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
from mcqa.bases import (
    EMBEDDING_MODULES,
    has_tokenizer,
    install_hint,
    missing_packages,
    tied_embeddings,
    tied_modules_refused,
    tokenizer_packages,
)

DEMO_MODEL = "resources/models/demo"
IS_DEMO = config["base_model"] == "demo"
IS_GGUF = config["base_model"].lower().endswith(".gguf")
# The folder every stage reads the base from: one the workflow builds (the demo, or a GGUF file converted
# once) or the folder or hub id that base_model names.
BASE_FOLDER = (
    DEMO_MODEL
    if IS_DEMO
    else f"resources/models/gguf/{Path(config['base_model']).stem}" if IS_GGUF else config["base_model"]
)
BUILT_BASE = IS_DEMO or IS_GGUF
FOLDS = config["data"]["folds"]
if FOLDS and USER_DATA.get("val_fraction"):
    raise WorkflowError(
        f"config data: folds {FOLDS} and val_fraction {USER_DATA['val_fraction']} together: with folds every training "
        "question is validated once, by the fold model that did not train on it. Remove data.val_fraction (or set "
        "it to 0) to cross-validate, or set data.folds: 0 to hold out one share."
    )
if FOLDS:
    config["data"]["val_fraction"] = 0  # the schema's default share is not held out when folds are
HAS_VAL = bool(FOLDS) or config["data"]["val_fraction"] > 0


def extra_sources():
    """data.extra by name; a name given twice is refused."""
    sources = {}
    for source in config["data"]["extra"]:
        if source["name"] in sources:
            raise WorkflowError(f"config data.extra: two sources are named {source['name']}; give each its own name")
        sources[source["name"]] = source
    return sources


EXTRA = extra_sources()


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


def check_gguf_base(name):
    """A GGUF base must be a GGUF file of an architecture and tensor types that the conversion reads; say so
    before any job runs. Returns what the file holds, or None where its converted folder is already up to
    date (then that folder is checked as any base is; reading a 262,144-token vocabulary takes 10 s)."""
    from mcqa.gguf_base import read_summary, refusal

    path, folder = Path(name).expanduser(), Path(BASE_FOLDER)
    if not path.is_file():
        raise WorkflowError(
            f"config base_model: {name} does not exist. Point it at a GGUF file (llama.cpp's format, e.g. "
            "model.Q4_K_M.gguf), or at a Hugging Face folder or hub id."
        )
    if (folder / "config.json").is_file() and folder.stat().st_mtime >= path.stat().st_mtime:
        return None
    try:
        summary = read_summary(path)
    except (ValueError, OSError) as exc:
        raise WorkflowError(f"config base_model: {name} cannot be read as a GGUF file ({exc})") from None
    if reason := refusal(summary, name):
        raise WorkflowError(f"config base_model: {reason}")
    return summary


GGUF_SUMMARY = check_gguf_base(config["base_model"]) if IS_GGUF else None
if not IS_GGUF or GGUF_SUMMARY is None:  # a GGUF converted already: its folder is checked as any base's
    check_base_model(BASE_FOLDER if IS_GGUF else config["base_model"])


def check_chat_template():
    """prompt_format: chat needs a chat template; a local base, a GGUF file or the demo is checked before any
    job runs (a hub id is checked when training loads its tokenizer)."""
    if config["prompt_format"] != "chat":
        return
    if IS_DEMO:
        raise WorkflowError("config prompt_format: chat, but the demo model has no chat template; use plain")
    if GGUF_SUMMARY is not None and not GGUF_SUMMARY.chat_template:
        raise WorkflowError(
            f"config prompt_format: chat, but base_model {config['base_model']} has no chat template in its "
            "metadata (tokenizer.chat_template); use prompt_format: plain or an instruction-tuned base"
        )
    path = Path(BASE_FOLDER).expanduser()
    if path.is_dir():
        tokenizer_config = path / "tokenizer_config.json"
        has_template = (
            (path / "chat_template.jinja").exists()
            or (path / "chat_template.json").exists()
            or (tokenizer_config.exists() and json.loads(tokenizer_config.read_text()).get("chat_template"))
        )
        if not has_template:
            raise WorkflowError(
                f"config prompt_format: chat, but base_model {config['base_model']} has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use prompt_format: plain or an instruction-tuned base"
            )


check_chat_template()
# What answering and evaluation score with.
ANSWERING = {**config["answering"], "prompt_format": config["prompt_format"]}


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
