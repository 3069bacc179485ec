# What the rules read: input functions, the settings and flags passed to scripts, the final targets.
import ast
import functools
import json
import re
import shlex
from pathlib import Path


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


def run_of(wildcards):
    return SCORED[wildcards.model]


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


def as_json(settings):
    """Settings as one string with sorted keys: reordering config keys changes nothing."""
    return json.dumps(settings, sort_keys=True, ensure_ascii=False)


def base_model_path():
    return BASE_FOLDER


def base_model_input(wildcards):
    """The demo model and a converted GGUF are built by the workflow; another base is a path or hub id the
    user owns."""
    return BASE_FOLDER if BUILT_BASE else []


def revision_flag():
    revision = config["base_model_revision"]
    return f"--revision {shlex.quote(revision)}" if revision and not BUILT_BASE else ""


def files_flag(flag, files):
    """A flag followed by each file, quoted for the shell; nothing when there are no files."""
    return " ".join([flag, *map(shlex.quote, files)]) if files else ""


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


def get_experiment_inputs(wildcards):
    """What the experiments table reads: each run's training logs, metrics and the ensemble's metrics."""
    files = {
        "train_logs": [log for entry in EXPERIMENTS.values() for log in entry["train_logs"]],
        "pseudo_labels": [
            entry["pseudo_labels_report"] for entry in EXPERIMENTS.values() if entry["pseudo_labels_report"]
        ],
    }
    if HAS_VAL:
        files["metrics"] = expand("results/{run}/metrics.json", run=RUNS)
        files["probs"] = [validation_probs(run) for run in RUNS]
        if ENSEMBLE:
            files["ensemble"] = "results/ensemble/metrics.json"
            files["ensemble_probs"] = "results/ensemble/val_probs.csv"
    return files


def get_final_output():
    """Everything `snakemake` with no target builds."""
    outputs = ["results/data/report.json", "results/data/report.html", "results/experiments.html"]
    outputs += expand("results/data/extra/{source}_test_check.json", source=EXTRA)
    outputs += expand("results/{run}/answers.csv", run=RUNS)
    # The adapter is a product too (peft loads it): a training killed after a --forcerun is trained again.
    outputs += [f"results/{model}/{name}" for model in TRAINED for name in ("adapter", "train_curve.png")]
    outputs += [f"results/{model}/answers.csv" for model in TRAINED if is_refit(model)]
    if config["merge_fold_models"]:
        outputs += [f"results/{model}/merged" for model in FOLD_MODELS]
    outputs += expand("results/{model}/model-{type}.gguf", model=EXPORTED, type=config["export"]["gguf"])
    members = list(RUNS) + (["ensemble"] if ENSEMBLE else [])
    if HAS_VAL:
        outputs += expand("results/{member}/{name}", member=members, name=["metrics.json", "confusion.png"])
    if ENSEMBLE:
        outputs += ["results/ensemble/answers.csv"]
    return outputs


def end_of_run_summary():
    """What a finished run made, in a few lines: each answers file with its validation accuracy (best
    first) when there is validation, marked where something was chosen on those questions, each refit's
    answers (which no figure describes), the experiments table and how to build the report. Only files that
    exist are named: a run of some targets made only some."""
    lines = []
    for member in [*RUNS, *(["ensemble"] if ENSEMBLE else [])]:
        answers = Path(f"results/{member}/answers.csv")
        metrics = Path(f"results/{member}/metrics.json")
        if not answers.exists():
            continue
        accuracy = json.loads(metrics.read_text()) if HAS_VAL and metrics.exists() else None
        lines.append((-accuracy["accuracy"] if accuracy else 0, str(answers), accuracy))
    refits = [path for model in TRAINED if is_refit(model) and (path := Path(f"results/{model}/answers.csv")).exists()]
    if not lines and not refits:
        return ""
    width = max(len(path) for path in [*(path for _, path, _ in lines), *map(str, refits)])
    validated_on = "out-of-fold" if FOLDS else "validation"
    summary = ["", "Answers, one row per test question" + (", best first:" if HAS_VAL else ":")]
    for _, path, accuracy in sorted(lines):
        score = ""
        if accuracy:
            low, high = accuracy["accuracy_ci95"]
            score = (
                f"  {validated_on} accuracy {accuracy['accuracy']:.3f} (95% {low:.3f}-{high:.3f}, "
                f"{accuracy['questions']} questions)"
            )
            if accuracy.get("chosen_on_these_questions") or accuracy.get("teacher_saw_these_questions"):
                score += " optimistic: " + "; ".join(
                    filter(
                        None, [accuracy.get("chosen_on_these_questions"), accuracy.get("teacher_saw_these_questions")]
                    )
                )
        summary.append(f"  {path:<{width}}{score}")
    summary += [f"  {str(path):<{width}}  a refit on every training row: no figure describes it" for path in refits]
    if Path("results/experiments.html").exists():
        summary.append("Experiments table: results/experiments.html (and experiments.tsv, experiments.png)")
    configfiles = "".join(f" --configfile {shlex.quote(str(f))}" for f in workflow.config_settings.configfiles)
    summary.append(f"Every result in one page: snakemake --report results/report.html{configfiles}")
    return "\n".join(summary)


def failed_job_logs(snakemake_logs):
    """The logs of the jobs that failed, read from Snakemake's own logs of this run."""
    text = "".join(Path(log).read_text(errors="replace") for log in snakemake_logs if Path(log).is_file())
    failed = re.findall(r"^Error in rule\s(\S+?):\n(?:    .*\n)*?    log: (.+?) \(check log", text, re.MULTILINE)
    lines = [f"  {rule}: {logs}" for rule, logs in dict.fromkeys(failed)]
    where = "\n".join(["", "Failed jobs and their logs (shown above):", *lines]) if lines else ""
    return f"{where}\nSnakemake's own log of this run: {', '.join(map(str, snakemake_logs))}"
