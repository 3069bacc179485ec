"""Config validation fails before any job runs, naming the key; the DAG is as documented."""

from __future__ import annotations

import json
import re
import shlex
import shutil

import pytest
import yaml
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
        ({"sweep": {"lora_rank": [8, 16]}}, "config sweep: lora_rank is not a training setting"),
        ({"sweep": {"extra": [["c3"], []]}}, "config sweep: extra takes lists or blocks"),
        ({"training": {"fp8": "rowwise", "load_in": "8bit"}}, "fp8 rowwise runs a bf16 or fp16 base's products in FP8"),
        ({"training": {"fp8": "tensorwise", "use_dora": True}}, "use_dora reads them in full precision"),
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
        "train_lora": 2, "merge_lora": 2, "answer_questions": 2, "evaluate_answers": 2, "plot_training": 2,
        "ensemble_answers": 1, "evaluate_ensemble": 1, "plot_confusion": 3, "summarize_experiments": 1, "all": 1,
    }


def test_no_validation_split_means_no_evaluation(tmp_path):
    workdir = sample_workdir(tmp_path, data={"val_fraction": 0})
    result = dry_run(workdir)
    assert result.returncode == 0, result.stderr
    assert "evaluate_answers" not in scheduled(result)


def test_reference_documents_every_config_key():
    from conftest import REPO

    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    training = yaml.safe_load((REPO / "workflow/schemas/training.schema.yaml").read_text())
    table = (REPO / "docs/reference.md").read_text().split("## Configuration")[1].split("\n## ")[0]
    keys = [f"training.{k}" for k in training["properties"]]
    for name, spec in schema["properties"].items():
        keys += [f"{name}.{k}" for k in spec.get("properties", {})] or [name]
    for key in keys:
        top, _, leaf = key.partition(".")
        assert f"`{key}`" in table or (f"`{top}." in table and f"`{leaf}`" in table), key


@pytest.mark.parametrize("name", ["..", ".", "data", "ensemble", "../escape", "a b", "experiments.html", "report.html",
                                  "prepare_train_data.log"])
def test_run_name_that_is_not_a_plain_folder_name_is_refused(tmp_path, name):
    """A run named '..' would put its adapter, merged model and answers outside results/."""
    workdir = sample_workdir(tmp_path, runs={name: {}})
    result = dry_run(workdir)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "runs" in output and repr(name) in output, output[-1500:]


def test_fresh_training_never_removes_what_it_did_not_write(tmp_path):
    """Starting afresh clears only train_lora's own files from the checkpoint folder."""
    from mcqa.checkpoints import FINGERPRINT, clear_owned, prepare_checkpoint_dir

    folder = tmp_path / "checkpoints"
    (folder / "checkpoint-40").mkdir(parents=True)
    (folder / FINGERPRINT).write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint-data").mkdir()  # not ours either: checkpoint-N has a step number
    assert prepare_checkpoint_dir(folder, {"settings": 1}) is None
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-data", FINGERPRINT, "notes.txt"]
    clear_owned(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-data", "notes.txt"]


@pytest.mark.parametrize("overrides, shown", [
    ({"answering": {"batch_tokens": 4096.0}}, '"batch_tokens": 4096,'),
    ({"training": {"lora_r": 8.0}}, '"lora_r": 8,'),
    ({"runs": {"r8": {"micro_batch_tokens": 4096.0}}}, '"micro_batch_tokens": 4096,'),
])
def test_integer_settings_written_as_floats_reach_jobs_as_integers(tmp_path, overrides, shown):
    result = dry_run(sample_workdir(tmp_path, **overrides), "-p")
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout and shown.replace(",", ".0,") not in result.stdout


@pytest.mark.parametrize("overrides, needle", [
    ({"answering": {"batch_tokens": 4096.5}}, "batch_tokens"),
    ({"training": {"lora_r": 8.5}}, "lora_r"),
    ({"runs": {"r8": {"checkpoint_steps": 0.5}}}, "runs.r8"),
])
def test_fractional_integer_settings_are_refused_at_config_time(tmp_path, overrides, needle):
    result = dry_run(sample_workdir(tmp_path, **overrides))
    assert result.returncode != 0 and needle in result.stdout + result.stderr


def fake_checkpoint(folder):
    """A folder that passes the config check: a model config and a tokenizer file (contents unread)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_real_model_config_gets_recipe_sized_defaults_and_only_its_runs(tmp_path):
    """A --configfile with base_model, training.epochs and one run, as the README shows:
    none of the demo's sizes and no extra `default` run."""
    base = fake_checkpoint(tmp_path / "models" / "my base")
    workdir = sample_workdir(tmp_path / "work")
    user = workdir / "real.yaml"
    user.write_text(yaml.safe_dump({"base_model": str(base), "training": {"epochs": 2}, "runs": {"r48_2ep": {}}}))
    result = snakemake(workdir, "-n", "-p", configfiles=("config.yaml", "real.yaml"))
    commands = [line for line in result.stdout.splitlines() if "train_lora.py --train" in line]
    assert len(commands) == 1 and "results/r48_2ep/adapter" in commands[0], commands
    settings = json.loads(shlex.split(commands[0].split("--settings ")[1])[0])
    assert (settings["epochs"], settings["learning_rate"], settings["max_seq_length"], settings["micro_batch_size"],
            settings["lora_r"], settings["lora_alpha"]) == (2, 0.0002, 512, 64, 48, 64)
    assert "build_demo_model" not in result.stdout


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp / "no such model", "does not exist"),
    (lambda tmp: (tmp / "empty model").mkdir() or tmp / "empty model", "holds no config.json"),
    # A folder of models whose base is misspelt: not a hub id "models/Breeze-7B" a minute into training.
    (lambda tmp: (tmp / "work" / "models").mkdir(parents=True) or "models/Breeze-7B", "does not exist"),
    (lambda tmp: (fake_checkpoint(tmp / "weights only") / "tokenizer.json").unlink() or tmp / "weights only",
     "holds no tokenizer"),
])
def test_base_model_folder_without_a_model_fails_before_any_job(tmp_path, make, needle):
    base = make(tmp_path)
    result = dry_run(sample_workdir(tmp_path / "work", base_model=str(base)))
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert str(base) in output and needle in output, output[-1500:]


def test_chat_prompts_need_a_base_with_a_chat_template(tmp_path):
    demo = dry_run(sample_workdir(tmp_path / "demo", prompt_format="chat"))
    assert demo.returncode != 0 and "the demo model has no chat template" in demo.stdout + demo.stderr
    base = fake_checkpoint(tmp_path / "plain base")
    (base / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    result = dry_run(sample_workdir(tmp_path / "work", base_model=str(base), prompt_format="chat"))
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"base_model {base} has no chat template" in output, output[-1500:]
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}"}')
    assert dry_run(sample_workdir(tmp_path / "work2", base_model=str(base), prompt_format="chat")).returncode == 0


def planned_resources(output: str, rule: str) -> tuple[int, dict[str, str]]:
    """The threads and resources a dry run gives the first job of `rule`."""
    block = output.split(f"rule {rule}:")[1].split("\nrule ")[0]
    threads = int(re.search(r"threads: (\d+)", block)[1])
    return threads, dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block)[1]))


def test_overriding_one_resource_key_keeps_the_stage_defaults(tmp_path):
    """Setting only threads must not reset training's 720 minutes and 64 GB to a generic 120 and 32 GB (a 7B
    training killed at two hours), nor make the merge ask for a GPU."""
    workdir = sample_workdir(tmp_path, resources={"train": {"threads": 6}, "merge": {"threads": 4}})
    output = dry_run(workdir, "--cores", "8").stdout
    threads, train = planned_resources(output, "train_lora")
    assert threads == 6 and (train["gpu"], train["runtime"], train["mem_mb"]) == ("1", "720", "64000")
    threads, merge = planned_resources(output, "merge_lora")
    assert threads == 4 and (merge["gpu"], merge["runtime"], merge["mem_mb"]) == ("0", "120", "32000")
    threads, answer = planned_resources(output, "answer_questions")
    assert threads == 4 and (answer["gpu"], answer["mem_mb"]) == ("1", "32000")


def test_more_training_gpus_than_resources_allow_is_refused_before_any_job(tmp_path):
    """Snakemake caps a job at --resources gpu=N silently: two GPUs asked for would train as one process."""
    workdir = sample_workdir(tmp_path, resources={"train": {"gpu": 2}})
    result = dry_run(workdir)  # --resources gpu=1
    assert result.returncode != 0
    assert "resources.train.gpu: 2, but snakemake was started with --resources gpu=1" in result.stdout + result.stderr
    assert dry_run(workdir, "--resources", "gpu=2").returncode == 0


def test_select_best_training_gets_only_the_answering_setting_it_scores_with(tmp_path):
    """Lowering answering.batch_tokens after an out-of-memory error must not retrain a select_best run: its
    training command carries the rotations it selects with and the prompt format, nothing else of answering."""
    workdir = sample_workdir(tmp_path, runs={"best": {"select_best": True}},
                             answering={"batch_tokens": 777, "precision": "fp32", "rotations": 2})
    output = dry_run(workdir, "-p").stdout
    (command,) = [line for line in output.splitlines() if "train_lora.py --train" in line]
    assert "--rotations 2" in command and "--prompt-format plain" in command
    assert "\"batch_tokens\"" not in command and "\"precision\": \"fp32\"" not in command and "--answering" not in command


def test_each_rule_depends_on_the_library_modules_it_imports_and_no_others(tmp_path):
    """An edit to mcqa/metrics.py (used by answering, evaluation and the ensemble) must not retrain: every
    rule's inputs are its script's mcqa imports, followed through the modules that import each other."""
    output = dry_run(sample_workdir(tmp_path)).stdout
    inputs = {}
    for block in output.split("\nrule ")[1:]:
        listed = re.search(r"input: (.*)", block)
        inputs[block.split(":")[0]] = {path.rsplit("/", 1)[-1] for path in listed[1].split(", ")} if listed else set()
    assert {"scoring.py", "modeling.py", "prompt.py", "bases.py"} <= inputs["train_lora"]
    assert not {"metrics.py", "spreadsheet.py", "lora.py"} & inputs["train_lora"]  # the merge's arithmetic retrains nothing
    assert {"metrics.py", "scoring.py"} <= inputs["answer_questions"] and "spreadsheet.py" not in inputs["answer_questions"]
    assert {"spreadsheet.py", "prompt.py", "records.py"} <= inputs["prepare_train_data"]
    assert not {"scoring.py", "modeling.py", "metrics.py"} & inputs["prepare_train_data"]
    assert inputs["merge_lora"] & {"prompt.py", "scoring.py", "modeling.py"} == set()


def test_hub_id_is_not_taken_for_a_missing_folder(tmp_path):
    """`org/name` with no folder `org/` here is a hub id, planned as one (downloaded when training starts)."""
    assert dry_run(sample_workdir(tmp_path, base_model="hfl/chinese-llama-2-7b")).returncode == 0


@pytest.mark.parametrize("runs, sweep, both", [
    ({"a": {"seeds": [1]}, "a_seed1": {"lora_r": 8}}, {}, ("runs.a with seed 1", "runs.a_seed1")),
    ({"a_seed1": {"lora_r": 8}, "a": {"seeds": [1]}}, {}, ("runs.a_seed1", "runs.a with seed 1")),
    ({"a": {"seeds": [1]}, "a_seed1": {"seeds": [2]}}, {}, ("runs.a with seed 1", "runs.a_seed1 (its seeds' mean)")),
])
def test_a_run_named_like_a_generated_name_is_refused_naming_both(tmp_path, runs, sweep, both):
    """One results/{run}/ folder for two models: one of them would silently never train."""
    workdir = sample_workdir(tmp_path, runs=runs, sweep=sweep)
    result = dry_run(workdir)
    assert result.returncode != 0
    made_twice = [line for line in (result.stdout + result.stderr).splitlines() if "is made twice" in line]
    assert made_twice and all(origin in made_twice[0] for origin in both), result.stdout[-2000:]
    assert not (workdir / "results").exists()


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens", "model.embed_tokens"])
def test_lora_on_the_embedding_or_output_layer_is_refused_before_training(tmp_path, module):
    workdir = sample_workdir(tmp_path, training={"target_modules": ["q_proj", module]})
    result = dry_run(workdir)
    assert result.returncode != 0
    assert f"target_modules ['{module}'] names the embedding or output layer" in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_a_baseline_is_scored_once_without_training_settings(tmp_path):
    """Seeds, a sweep, refit and select_best shape trainings: a baseline gets one scoring of the base, not one
    a copy, is not flagged as chosen on its questions, and is a reference, not one of the default ensemble's
    members (a zero-shot base at chance was averaged with the trained runs)."""
    workdir = sample_workdir(tmp_path, data={"folds": 2}, training={"seeds": [1, 2], "select_best": True},
                             runs={"a": {"select_best": False}, "base": {"train": False, "refit": True}},
                             sweep={"lora_r": [4, 8]})
    result = dry_run(workdir, "-p")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config runs.base: a baseline scores the base once; seeds, refit, select_best, sweep do not apply" \
        in result.stderr
    jobs = scheduled(result)
    assert jobs["answer_questions"] == jobs["evaluate_answers"] == 1  # the baseline, once
    assert jobs["train_lora"] == 2 * 2 * 2  # a: two sweep points x two seeds x two folds
    (evaluate,) = [line for line in result.stdout.splitlines() if "score_questions.py" in line and
                   "--metrics results/base/metrics.json" in line]
    assert "--selected-step" not in evaluate
    ensemble = re.search(r"--members (.*?) --weights", result.stdout)[1]
    assert ensemble.split() == ["a_lora_r-4_seed1", "a_lora_r-4_seed2", "a_lora_r-8_seed1", "a_lora_r-8_seed2"]
    assert "left out: base (a baseline) (ensemble.runs names the members instead)" in result.stderr


def test_a_sweep_point_is_named_by_its_own_values(tmp_path):
    """Adding 1.5 to epochs [1, 2] must not rename (and so retrain) the points 1 and 2."""
    names = []
    for values in ([1, 2], [1, 2, 1.5]):
        workdir = sample_workdir(tmp_path / str(len(values)), sweep={"epochs": values})
        result = dry_run(workdir)
        assert result.returncode == 0, result.stderr[-2000:]
        names.append(set(re.findall(r"model=(\S+)", result.stdout)))
    assert names[0] == {"epochs-1", "epochs-2"}
    assert names[1] == names[0] | {"epochs-1.5"}


def readme_configs() -> dict[str, str]:
    """The config files the README writes out: each fenced yaml block, by the file name it gives."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    configs = {}
    parts = readme.split("```yaml\n")
    for before, part in zip(parts, parts[1:]):
        block = part.split("```")[0]
        named = re.match(r"# (\S+\.yaml)\n", block)  # else the file the text before the block names last
        configs[named.group(1) if named else re.findall(r"`(\w+\.yaml)`", before)[-1]] = block
    return configs


def test_every_command_of_the_readme_plans_its_jobs(tmp_path):
    """Each snakemake command the README shows, with the config file it writes out, plans the jobs it
    promises in a dry run (the real data's paths given copies of the sample, the hub id base as written;
    the Slurm profile only tells the plugin how to submit, so its dry run is planned without it)."""
    from conftest import REPO, SAMPLE

    readme = (REPO / "README.md").read_text()
    configs = readme_configs()
    assert set(configs) == {"my.yaml", "cv.yaml"}, configs
    commands = re.findall(r"^    (snakemake .*)$", readme, re.M)
    assert len(commands) == 2, commands
    for n, command in enumerate(commands):
        args = shlex.split(command)[1:]
        name = args[args.index("--configfile") + 1]
        assert set(args) - {name} <= {"--cores", "8", "--resources", "gpu=1", "--profile", "profiles/slurm",
                                      "--configfile"}, command
        workdir = sample_workdir(tmp_path / str(n))
        config = yaml.safe_load(configs[name])
        for key, sample in (("train", "train.xlsx"), ("test", "test.xlsx")):
            (workdir / config["data"][key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(SAMPLE / sample, workdir / config["data"][key])
        (workdir / name).write_text(configs[name])
        planned = snakemake(workdir, "-n", configfiles=("config.yaml", name)).stdout
        assert "build_demo_model" not in planned
        if name == "cv.yaml":
            assert "split_folds" in planned and "score_fold_model" in planned, planned[-3000:]
            assert "results/r48_seed2/fold4" in planned and "results/base/answers.csv" in planned
        else:
            assert "results/r48_2ep_best/answers.csv" in planned and "results/r48_2ep/answers.csv" in planned


def test_every_link_of_the_readme_reaches_a_heading():
    """The README keeps its reference in docs/reference.md; each link to a section there must land on one."""
    from conftest import REPO

    def anchors(markdown: str) -> set[str]:
        headings = re.findall(r"^#+ (.+)$", markdown, re.M)
        return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}

    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([\w./]+\.md)(?:#([\w-]+))?\)", readme)
    assert len(links) >= 8, links
    for path, anchor in links:
        assert (REPO / path).is_file(), path
        assert not anchor or anchor in anchors((REPO / path).read_text()), f"{path}#{anchor}"


def test_gguf_export_is_planned_for_the_runs_with_a_merged_checkpoint(tmp_path):
    """export.gguf writes a file a type for every run with a merged checkpoint (export.runs names some): a
    refit's, never a fold model's."""
    workdir = sample_workdir(tmp_path / "split", runs={"a": {}, "b": {"lora_r": 8}}, export={"gguf": ["f16", "q8_0"]})
    result = dry_run(workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert scheduled(result)["export_gguf"] == 4
    workdir = sample_workdir(tmp_path / "folds", data={"folds": 2}, runs={"a": {"refit": True}, "b": {}},
                             export={"gguf": ["q8_0"], "runs": ["a"]})
    result = dry_run(workdir, "-p")
    exports = re.findall(r"--out (\S+\.gguf)", result.stdout)
    assert sorted(set(exports)) == ["results/a/refit/model-q8_0.gguf"], exports


def test_gguf_export_of_an_architecture_it_does_not_write_is_refused_before_any_job(tmp_path):
    base = tmp_path / "gemma-base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}))
    (base / "tokenizer.json").write_text("{}")
    workdir = sample_workdir(tmp_path / "work", base_model=str(base), export={"gguf": ["q8_0"]})
    result = dry_run(workdir)
    assert result.returncode != 0
    assert f"config export.gguf: base_model {base} is a gemma3_text model; the GGUF export writes llama, mistral, " \
           "qwen2 models" in result.stdout + result.stderr
    assert not (workdir / "results").exists()
