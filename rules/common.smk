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
# Keys of a run that shape the workflow's jobs rather than a training: they never reach train_lora (what
# `extra` names reaches it as files).
WORKFLOW_KEYS = ("seeds", "train", "refit", "extra", "pseudo_labels")


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
        has_template = (
            (path / "chat_template.jinja").exists()
            or (path / "chat_template.json").exists()
            or (tokenizer_config.exists() and json.loads(tokenizer_config.read_text()).get("chat_template"))
        )
        if not has_template:
            raise WorkflowError(
                f"config prompt_format: chat, but base_model {name} has no chat template (no chat_template in "
                "tokenizer_config.json, no chat_template.jinja); use prompt_format: plain or an instruction-tuned base"
            )


check_chat_template(config["base_model"])
# What answering and evaluation score with.
ANSWERING = {**config["answering"], "prompt_format": config["prompt_format"]}


# A baseline scores the base as it is: what only shapes a training does not apply to it.
BASELINE_CLEARED = {"seeds": [], "refit": False, "select_best": False, "early_stopping_patience": 0}


def requested_settings(run, point=None):
    """The run's training settings as the config asks for them, validated: schema defaults, then the demo's
    sizes (base_model: demo only), then the config's `training` keys, then the run's own, then a sweep point's."""
    demo = config["demo_model"]["training"] if IS_DEMO else {}
    settings = {**config["training"], **demo, **USER_TRAINING, **(config["runs"][run] or {}), **(point or {})}
    return validated(settings, "training.schema.yaml", f"config runs.{run}")


def run_settings(run, point=None):
    """The run's settings as they are used, checked to work together; a baseline's without the settings that
    only shape a training (BASELINE_CLEARED)."""
    settings = requested_settings(run, point)
    if not settings["train"]:
        return {
            **settings,
            **BASELINE_CLEARED,
            "extra": [],
            "pseudo_labels": {**settings["pseudo_labels"], "teacher": None},
            "distill": {**settings["distill"], "teacher": None},
        }
    settings["extra"] = list(EXTRA) if settings["extra"] is None else settings["extra"]
    if unknown := [name for name in settings["extra"] if name not in EXTRA]:
        raise WorkflowError(
            f"config runs.{run}: extra names {', '.join(unknown)}, which data.extra does not define "
            f"(it defines: {', '.join(EXTRA) or 'nothing'}); add the source to data.extra or remove the name"
        )
    if settings["refit"] and not FOLDS:
        raise WorkflowError(
            f"config runs.{run}: refit trains one more model on every row beside the fold models; "
            "it needs data.folds (K >= 2)"
        )
    if settings["refit"] and settings["select_best"]:
        raise WorkflowError(
            f"config runs.{run}: refit trains on every row, so no question is left to select a step "
            "on; set select_best: false, or refit: false"
        )
    if settings["select_best"] and not HAS_VAL:
        raise WorkflowError(
            f"config runs.{run}: select_best picks the adapter by validation accuracy, but data.val_fraction is 0, "
            "so there are no validation questions; hold out a share (e.g. 0.1) or set select_best: false"
        )
    if settings["fp8"] != "none" and settings["load_in"] != "none":
        raise WorkflowError(
            f"config runs.{run}: fp8 {settings['fp8']} runs a bf16 or fp16 base's products in FP8, but load_in "
            f"{settings['load_in']} quantises the base already; set fp8: none or load_in: none"
        )
    if settings["early_stopping_patience"] and not settings["select_best"]:
        raise WorkflowError(f"config runs.{run}: early_stopping_patience needs select_best: true")
    if embedding := [m for m in settings["target_modules"] if m.split(".")[-1] in EMBEDDING_MODULES]:
        raise WorkflowError(
            f"config runs.{run}: target_modules {embedding} names the embedding or output layer; LoRA there "
            "cannot be merged into the base (the merge adds B @ A to linear projections). Leave it out of "
            "target_modules, or train it in full with modules_to_save (on a base whose embeddings are not tied)"
        )
    base = Path(config["base_model"]).expanduser()
    if settings["modules_to_save"] and (base / "config.json").is_file() and tied_embeddings(base):
        raise WorkflowError(
            f"config runs.{run}: {tied_modules_refused(config['base_model'], settings['modules_to_save'])}"
        )
    return settings


def sweep_points():
    """(name, settings) of each point of the `sweep` grid, named by Snakemake's Paramspace; [("", {})] without one.

    The grid's columns hold Python objects, so a point's name is spelled from its own values alone (1 stays
    `epochs-1` when 1.5 joins the sweep, rather than becoming `epochs-1.0` with the column's dtype).
    """
    if not config["sweep"]:
        return [("", {})]
    known = read_schema(SCHEMAS / "training.schema.yaml")["properties"]
    if unknown := sorted(set(config["sweep"]) - set(known)):
        raise WorkflowError(
            f"config sweep: {', '.join(unknown)} is not a training setting; a sweep varies keys of `training` "
            "(workflow/schemas/training.schema.yaml lists them)"
        )
    import itertools

    import pandas as pd
    from snakemake.utils import Paramspace

    keys = sorted(config["sweep"])
    grid = pd.DataFrame(list(itertools.product(*(config["sweep"][k] for k in keys))), columns=keys, dtype=object)
    space = Paramspace(grid, filename_params="*", param_sep="-", filename_sep="_")
    return [(name, dict(row)) for name, (_, row) in zip(space.instance_patterns, grid.iterrows())]


def expanded_runs():
    """Run name -> settings for every run trained or scored: each config run at each sweep point, and each
    replica of its seeds; and replica -> the run it replicates. A baseline is planned once, whatever the
    sweep and seeds say (with a message). Every name is made once: a config run named like another's
    replica or sweep point is refused, naming both."""
    runs, replicas, made_by = {}, {}, {}

    def claim(name, origin):
        if name in made_by:
            raise WorkflowError(
                f"config runs: the name {name} is made twice, by {made_by[name]} and by {origin}; "
                "rename one of the runs (results/{run}/ would hold one of them only)"
            )
        made_by[name] = origin

    for run in config["runs"]:
        points, requested = sweep_points(), requested_settings(run)
        if not requested["train"]:
            ignored = [key for key, value in BASELINE_CLEARED.items() if requested[key] != value]
            ignored += ["sweep"] * (len(points) > 1)
            if ignored:
                print(
                    f"config runs.{run}: a baseline scores the base once; {', '.join(ignored)} do not apply "
                    "to it and are ignored",
                    file=sys.stderr,
                )
            points = [("", {})]
        for point_name, point in points:
            name = "_".join(filter(None, [run if USER_RUNS or not point_name else "", point_name]))
            settings = run_settings(run, point)
            origin = f"runs.{run}" + (f" at sweep point {point_name}" if point_name else "")
            seeds = settings["seeds"]
            if seeds:
                claim(name, f"{origin} (its seeds' mean)")
            for seed in seeds or [None]:
                replica = f"{name}_seed{seed}" if seed is not None else name
                claim(replica, f"{origin} with seed {seed}" if seed is not None else origin)
                runs[replica] = {**settings, **({"seed": seed} if seed is not None else {})}
                if seed is not None:
                    replicas[replica] = name
    bad = [
        run
        for run in runs
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", run) or run in RESERVED_NAMES or run.endswith(".log")
    ]
    if bad:
        raise WorkflowError(
            f"config sweep: run names {', '.join(bad)} are not plain folder names; use values of "
            "letters, digits, '.', '-' and '_'"
        )
    return runs, replicas


# What results/ and logs/ hold besides runs (the schema refuses them as run names; sweeps must not make them).
RESERVED_NAMES = read_schema(SCHEMAS / "config.schema.yaml")["properties"]["runs"]["propertyNames"]["not"]["anyOf"][0][
    "enum"
]
RUNS, REPLICAS = expanded_runs()
# What is trained: one model a run, or with folds one a fold (and a refit); baselines train nothing.
FOLD_NAMES = [f"fold{k}" for k in range(FOLDS)]
TRAINED = {}  # model -> its run
for run, settings in RUNS.items():
    if settings["train"]:
        units = [f"{run}/{fold}" for fold in FOLD_NAMES] + [f"{run}/refit"] * settings["refit"] if FOLDS else [run]
        TRAINED.update(dict.fromkeys(units, run))
BASELINES = [run for run, settings in RUNS.items() if not settings["train"]]
SCORED = {**TRAINED, **{run: run for run in BASELINES}}  # what answers and evaluates: model -> its run
FOLDED = [run for run in RUNS if FOLDS and RUNS[run]["train"]]  # runs whose results combine fold models


def teachers_of(run):
    """The runs (or `ensemble`) whose answers a run learns from: pseudo-labels' and distillation's teachers."""
    return [t for t in (RUNS[run]["pseudo_labels"]["teacher"], RUNS[run]["distill"]["teacher"]) if t]


def learns_from(run, teacher):
    """Whether a run learns from `teacher`, directly or through its own teachers."""
    seen, todo = set(), teachers_of(run)
    while todo:
        current = todo.pop()
        if current == teacher:
            return True
        if current not in seen and current in RUNS:
            seen.add(current)
            todo += teachers_of(current)
    return False


def check_teachers():
    """Every teacher is a run of this config or the ensemble, and no run learns from itself; before any job."""
    for run in RUNS:
        for teacher in teachers_of(run):
            key = "pseudo_labels" if teacher == RUNS[run]["pseudo_labels"]["teacher"] else "distill"
            if teacher != "ensemble" and teacher not in RUNS:
                raise WorkflowError(
                    f"config runs.{run}: {key}.teacher {teacher} is not a run of this config "
                    f"({', '.join(RUNS)}) nor `ensemble`"
                )
            if teacher == run or (teacher in RUNS and learns_from(teacher, run)):
                raise WorkflowError(
                    f"config runs.{run}: {key}.teacher {teacher} "
                    + ("is the run itself" if teacher == run else f"learns from {run}")
                    + "; a teacher must be trained before its students"
                )


check_teachers()
# Runs that train on pseudo-labels, each from its teacher's answer_probs.csv.
PSEUDO_LABELLED = [run for run in RUNS if RUNS[run]["pseudo_labels"]["teacher"]]


def is_refit(model):
    """Whether a model is a run's refit on every training row."""
    run, _, unit = model.rpartition("/")
    return bool(run) and unit == "refit"


def run_of(wildcards):
    return SCORED[wildcards.model]


def fold_of(model):
    """The fold a model trains without (its held-out fold), or None."""
    tail = model.rsplit("/", 1)[-1]
    return tail if "/" in model and tail in FOLD_NAMES else None


# Fold models exist only to be scored: one job a fold model scores its held-out fold and the test file from
# the base and its adapter, merged as it loads, so no merged checkpoint is written for them (unless
# merge_fold_models asks for one). Every other model is scored from what is on disk: its merged checkpoint, or
# a baseline's base.
FOLD_MODELS = [model for model in TRAINED if fold_of(model)]
SCORED_AS_SAVED = [model for model in SCORED if model not in FOLD_MODELS]


def training_settings(wildcards):
    """A model's training settings as JSON, without the keys that only shape the workflow."""
    return as_json({k: v for k, v in RUNS[run_of(wildcards)].items() if k not in WORKFLOW_KEYS})


def rotations_flag(wildcards):
    """For runs that pick their best step by validation accuracy, the option orders it is scored in (the one
    answering setting their training uses; the others rerun no training)."""
    return f"--rotations {config['answering']['rotations']}" if RUNS[run_of(wildcards)]["select_best"] else ""


def regex(names):
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    run=regex(RUNS),
    model=regex(SCORED),
    member=regex([*RUNS, "ensemble"]),
    source=regex(EXTRA),


def get_training_data(wildcards):
    """What a model trains on, and validates on during training: its fold's files, all rows for a refit, or
    the single split; and the extra sources its run names, trained on only."""
    fold = fold_of(wildcards.model)
    run = run_of(wildcards)
    extra = {
        "extra": [f"results/data/extra/{name}.json" for name in RUNS[run]["extra"]]
        + [f"results/{run}/pseudo_labels.json"] * (run in PSEUDO_LABELLED)
    }
    if run in DISTILLED:  # the teacher's out-of-fold probabilities, keyed by the records of train.json
        extra.update(teacher=teacher_oof(run), teacher_records="results/data/train.json")
    if fold:
        return {"train": f"results/data/{fold}/train.json", "val": f"results/data/{fold}/val.json", **extra}
    if is_refit(wildcards.model):
        return {"train": "results/data/train.json", **extra}
    return {"train": "results/data/train.json", "val": "results/data/val.json", **extra}


def get_validation_data(wildcards):
    """What a model is evaluated on: its held-out fold, the validation split, or for a baseline with folds
    every training row (nothing was trained on them)."""
    fold = fold_of(wildcards.model)
    if fold:
        return f"results/data/{fold}/val.json"
    return "results/data/train.json" if FOLDS else "results/data/val.json"


def get_scoring_model(wildcards):
    """The model a unit answers with: its merged checkpoint, or a baseline's base (built for the demo)."""
    if wildcards.model in TRAINED:
        return f"results/{wildcards.model}/merged"
    return base_model_input(wildcards)


def scoring_model_path(wildcards):
    return f"results/{wildcards.model}/merged" if wildcards.model in TRAINED else base_model_path()


def validation_probs(run):
    """The file of a run's validation probabilities: out-of-fold with folds, else the validation split's."""
    return f"results/{run}/oof_probs.csv" if run in FOLDED else f"results/{run}/val_probs.csv"


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


def files_flag(flag, files):
    """A flag followed by each file, quoted for the shell; nothing when there are no files."""
    return " ".join([flag, *map(shlex.quote, files)]) if files else ""


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
    """The runs the ensemble combines ([] when it is off or would have fewer than two); every seed
    replica is a member of its own."""
    settings = config["ensemble"]
    # A run that learns from the ensemble cannot be one of its members.
    members = settings["runs"] or [run for run in RUNS if not learns_from(run, "ensemble")]
    unknown = [run for run in members if run not in RUNS]
    if unknown:
        raise WorkflowError(f"config ensemble.runs: {', '.join(unknown)} not among runs ({', '.join(RUNS)})")
    if students := [run for run in members if learns_from(run, "ensemble")]:
        raise WorkflowError(
            f"config ensemble.runs: {', '.join(students)} learn(s) from the ensemble, so cannot be among its "
            "members (the ensemble would wait for itself); leave them out of ensemble.runs"
        )
    if settings["runs"] and len(members) < 2:
        raise WorkflowError("config ensemble.runs: an ensemble needs at least two runs")
    if (settings["weights"] == "val_accuracy" or settings["method"] == "greedy") and not HAS_VAL:
        chooser = "method: greedy" if settings["method"] == "greedy" else "weights: val_accuracy"
        raise WorkflowError(
            f"config ensemble.{chooser} needs validation accuracies, but data.val_fraction is 0; set weights: equal "
            "and method: mean_probability, hold out a validation share, or cross-validate with data.folds"
        )
    # Sorted: the order of members changes no mean, so reordering runs in the config reruns nothing.
    return sorted(members) if settings["activate"] and len(members) >= 2 else []


ENSEMBLE = ensemble_members()
if (students := [run for run in RUNS if "ensemble" in teachers_of(run)]) and not ENSEMBLE:
    raise WorkflowError(
        f"config runs.{students[0]}: its teacher is the ensemble, but the ensemble is off or has fewer than two "
        "members; set ensemble.activate: true with two or more runs, or name a run as the teacher"
    )


def check_distillation():
    """A teacher's probability of a training question must come from a model that did not train on it: its
    out-of-fold probabilities, so a cross-validated trained run or an ensemble of them; before any job."""
    for run in DISTILLED:
        teacher = RUNS[run]["distill"]["teacher"]
        why = f"config runs.{run}: distill.teacher {teacher}"
        if not FOLDS:
            raise WorkflowError(
                f"{why}: distillation needs the teacher's probability of every training question from a model "
                "that did not train on it (its out-of-fold probabilities); set data.folds (e.g. 5)"
            )
        members = ENSEMBLE if teacher == "ensemble" else [teacher]
        if untrained := [m for m in members if m not in FOLDED]:
            raise WorkflowError(
                f"{why}: {', '.join(untrained)} trains no fold models (a baseline), so it has no out-of-fold "
                "probabilities to teach with; name a trained run"
            )


# Runs distilled from a teacher's out-of-fold probabilities.
DISTILLED = [run for run in RUNS if RUNS[run]["distill"]["teacher"]]
check_distillation()


def teacher_oof(run):
    """The out-of-fold probabilities a distilled run learns from."""
    teacher = RUNS[run]["distill"]["teacher"]
    return "results/ensemble/val_probs.csv" if teacher == "ensemble" else f"results/{teacher}/oof_probs.csv"


def teacher_probs(wildcards):
    """The test probabilities a run's pseudo-labels come from: its teacher's answer_probs.csv."""
    return f"results/{RUNS[wildcards.run]['pseudo_labels']['teacher']}/answer_probs.csv"


def ensemble_chooses():
    """Whether the ensemble's weights are chosen on validation probabilities (which its answers then need)."""
    return config["ensemble"]["method"] == "greedy" or config["ensemble"]["weights"] == "val_accuracy"


def get_ensemble_validation_input(wildcards):
    """The members' validation (with folds out-of-fold) probabilities, when the weights are chosen on them."""
    return [validation_probs(run) for run in ENSEMBLE] if ensemble_chooses() else []


def trained_on(run):
    """What a run trains on besides the training file, in words ("" for the training file alone)."""
    pseudo = RUNS[run]["pseudo_labels"]
    sources = [f"extra {name}" for name in RUNS[run]["extra"]]
    if pseudo["teacher"]:
        sources.append(f"pseudo-labels of {pseudo['teacher']} (p >= {pseudo['min_probability']})")
    if distill := RUNS[run]["distill"]["teacher"]:
        sources.append(f"distilled from {distill}")
    return " + ".join(["training file", *sources]) if sources else ""


def experiments_manifest():
    """What the experiments table shows of each run: its settings, its models' training logs, its metrics
    and, for a seed replica, the run it replicates."""
    manifest = {}
    for run, settings in RUNS.items():
        # With folds, the fold models (what the run's out-of-fold figure describes), not the refit.
        models = [model for model, of in TRAINED.items() if of == run and not is_refit(model)]
        manifest[run] = {
            # What the run trained on is its own column (trained_on), not two settings.
            "settings": {k: v for k, v in settings.items() if k not in ("seeds", "extra", "pseudo_labels", "distill")},
            "train_logs": [f"results/{model}/train_log.jsonl" for model in models],
            "metrics": f"results/{run}/metrics.json" if HAS_VAL else None,
            "replica_of": REPLICAS.get(run),
            "folds": FOLDS,
            "trained_on": trained_on(run),
        }
    return manifest


EXPERIMENTS = experiments_manifest()


def get_experiment_inputs(wildcards):
    """What the experiments table reads: each run's training logs, metrics and the ensemble's metrics."""
    files = {"train_logs": [log for entry in EXPERIMENTS.values() for log in entry["train_logs"]]}
    if HAS_VAL:
        files["metrics"] = expand("results/{run}/metrics.json", run=RUNS)
        if ENSEMBLE:
            files["ensemble"] = "results/ensemble/metrics.json"
    return files


def get_final_output():
    """Everything `snakemake` with no target builds."""
    outputs = ["results/data/report.json", "results/data/report.html", "results/experiments.html"]
    outputs += expand("results/{run}/answers.csv", run=RUNS)
    # The adapter is a product too (peft loads it): a training killed after a --forcerun is trained again.
    outputs += [f"results/{model}/{name}" for model in TRAINED for name in ("adapter", "train_curve.png")]
    outputs += [f"results/{model}/answers.csv" for model in TRAINED if is_refit(model)]
    if config["merge_fold_models"]:
        outputs += [f"results/{model}/merged" for model in FOLD_MODELS]
    members = list(RUNS) + (["ensemble"] if ENSEMBLE else [])
    if HAS_VAL:
        outputs += expand("results/{member}/{name}", member=members, name=["metrics.json", "confusion.png"])
    if ENSEMBLE:
        outputs += ["results/ensemble/answers.csv"]
    return outputs
