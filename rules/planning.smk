# Run planning: every run's settings (the schema's defaults, the demo's sizes, the config's training keys,
# the run's own, a sweep point's), seed replicas, fold models, baselines, teachers, the ensemble's members
# and what the experiments table shows. Everything here is decided before any job runs.
import re
import sys

from snakemake.exceptions import WorkflowError

# Keys of a run that shape the workflow's jobs rather than a training: they never reach train_lora (what
# `extra` names reaches it as files).
WORKFLOW_KEYS = ("seeds", "train", "refit", "extra", "pseudo_labels")


# A baseline scores the base as it is: what only shapes a training does not apply to it.
BASELINE_CLEARED = {"seeds": [], "refit": False, "select_best": False, "early_stopping_patience": 0}


def layered(*layers):
    """Settings layered in order, later ones winning; a nested block (distill, pseudo_labels) is merged key by
    key, so a run's `distill: {teacher: a}` keeps the weight that `training` set."""
    settings = {}
    for layer in layers:
        for key, value in layer.items():
            nested = isinstance(value, dict) and isinstance(settings.get(key), dict)
            settings[key] = {**settings[key], **value} if nested else value
    return settings


def requested_settings(run, point=None):
    """The run's training settings as the config asks for them, validated: schema defaults, then the demo's
    sizes (base_model: demo only), then the config's `training` keys, then the run's own, then a sweep point's."""
    demo = config["demo_model"]["training"] if IS_DEMO else {}
    settings = layered(config["training"], demo, USER_TRAINING, config["runs"][run] or {}, point or {})
    return validated(settings, "training.schema.yaml", f"config runs.{run}")


# What a run without a teacher trains with: the schema's defaults, whatever `training` says of a teacher's
# weight or threshold, so changing those retrains only the runs that learn from a teacher.
NO_TEACHER = {
    key: read_schema(SCHEMAS / "training.schema.yaml")["properties"][key]["default"]
    for key in ("distill", "pseudo_labels")
}


def run_settings(run, point=None):
    """The run's settings as they are used, checked to work together; a baseline's without the settings that
    only shape a training (BASELINE_CLEARED)."""
    settings = requested_settings(run, point)
    if not settings["train"]:
        return {**settings, **BASELINE_CLEARED, **NO_TEACHER, "extra": []}
    settings.update({key: NO_TEACHER[key] for key in NO_TEACHER if not settings[key]["teacher"]})
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
    if settings["fp8"] != "none" and settings["use_dora"]:
        raise WorkflowError(
            f"config runs.{run}: fp8 {settings['fp8']} keeps the frozen weights only in FP8, but use_dora reads "
            "them in full precision at every step; set fp8: none or use_dora: false"
        )
    if settings["early_stopping_patience"] and not settings["select_best"]:
        raise WorkflowError(f"config runs.{run}: early_stopping_patience needs select_best: true")
    if embedding := [m for m in settings["target_modules"] if m.split(".")[-1] in EMBEDDING_MODULES]:
        raise WorkflowError(
            f"config runs.{run}: target_modules {embedding} names the embedding or output layer; LoRA there "
            "cannot be merged into the base (the merge adds B @ A to linear projections). Leave it out of "
            "target_modules, or train it in full with modules_to_save (on a base whose embeddings are not tied)"
        )
    base = Path(BASE_FOLDER).expanduser()
    tied = GGUF_SUMMARY.tied_embeddings if GGUF_SUMMARY else (base / "config.json").is_file() and tied_embeddings(base)
    if settings["modules_to_save"] and tied:
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
    if nested := sorted(k for k, values in config["sweep"].items() if any(isinstance(v, (list, dict)) for v in values)):
        raise WorkflowError(
            f"config sweep: {', '.join(nested)} takes lists or blocks, which a sweep point cannot be named by; "
            "write one run for each value instead (runs: {a: {extra: [c3]}, b: {extra: []}})"
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


def validation_probs(run):
    """The file of a run's validation probabilities: out-of-fold with folds, else the validation split's."""
    return f"results/{run}/oof_probs.csv" if run in FOLDED else f"results/{run}/val_probs.csv"


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
                made = [name for name in RUNS if REPLICAS.get(name) == teacher or name.startswith(f"{teacher}_")]
                hint = (
                    f"; {teacher} is trained as {', '.join(made)} (seed replicas or sweep points): name one of them, "
                    "or `ensemble` to learn from them all"
                    if made
                    else ""
                )
                raise WorkflowError(
                    f"config runs.{run}: {key}.teacher {teacher} is not a run of this config "
                    f"({', '.join(RUNS)}) nor `ensemble`{hint}"
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


def learns_from_held_out(run):
    """Whether a cross-validated run trains on pseudo-labels of a teacher with fold models (a trained run, or
    an ensemble of them), whose fold models trained on the run's held-out questions: its out-of-fold figure
    is then slightly optimistic."""
    teacher = RUNS[run]["pseudo_labels"]["teacher"]
    return bool(FOLDS) and teacher is not None and (teacher == "ensemble" or RUNS[teacher]["train"])


def is_refit(model):
    """Whether a model is a run's refit on every training row."""
    run, _, unit = model.rpartition("/")
    return bool(run) and unit == "refit"


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


def ensemble_members():
    """The runs the ensemble combines ([] when it is off or would have fewer than two); every seed
    replica is a member of its own."""
    settings = config["ensemble"]
    # A baseline is a reference, not a member, unless ensemble.runs names it; a run that learns from the
    # ensemble cannot be one of its members.
    members = settings["runs"] or [run for run in RUNS if RUNS[run]["train"] and not learns_from(run, "ensemble")]
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
    left_out = [run for run in RUNS if run not in members]
    if settings["activate"] and not settings["runs"] and len(members) >= 2 and left_out:
        why = {run: "a baseline" if not RUNS[run]["train"] else "learns from the ensemble" for run in left_out}
        print(
            f"ensemble: members {', '.join(sorted(members))}; left out: "
            + "; ".join(f"{run} ({reason})" for run, reason in why.items())
            + " (ensemble.runs names the members instead)",
            file=sys.stderr,
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
            "probs": validation_probs(run) if HAS_VAL else None,
            "replica_of": REPLICAS.get(run),
            "folds": FOLDS,
            "trained_on": trained_on(run),
            # How many pseudo-labels were kept is known only once they are chosen.
            "pseudo_labels_report": f"results/{run}/pseudo_labels_report.json" if run in PSEUDO_LABELLED else None,
        }
    return manifest


EXPERIMENTS = experiments_manifest()


def exported_models():
    """The models whose merged checkpoints are written as GGUF files (export.gguf): every model with a merged
    checkpoint of the runs export.runs names (all, if it names none); an architecture the export does not
    write is refused before any job (a hub id's, when its export runs)."""
    settings = config["export"]
    if unknown := [run for run in settings["runs"] if run not in RUNS]:
        raise WorkflowError(f"config export.runs: {', '.join(unknown)} not among runs ({', '.join(RUNS)})")
    if not settings["gguf"]:
        return []
    from mcqa.gguf_export import refusal

    base = Path(BASE_FOLDER).expanduser()
    if GGUF_SUMMARY is not None:
        model_type = GGUF_SUMMARY.architecture
    elif (base / "config.json").is_file():
        model_type = json.loads((base / "config.json").read_text()).get("model_type")
    else:
        model_type = None  # a hub id (or the demo, built by the workflow: a Llama)
    if model_type and (reason := refusal({"model_type": model_type}, f"base_model {config['base_model']}")):
        raise WorkflowError(f"config export.gguf: {reason}")
    runs = settings["runs"] or list(RUNS)
    return [model for model, run in TRAINED.items() if run in runs and not fold_of(model)]


EXPORTED = exported_models()


def check_reference():
    """experiments.reference names a run, a run with seeds (the mean of its replicas) or the ensemble."""
    reference = config["experiments"]["reference"]
    known = [*RUNS, *sorted(set(REPLICAS.values())), *(["ensemble"] if ENSEMBLE else [])]
    if reference is not None and reference not in known:
        raise WorkflowError(f"config experiments.reference: {reference} is none of the runs ({', '.join(known)})")


check_reference()
