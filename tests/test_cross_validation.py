"""Cross-validation, seed replicas, a baseline, sweeps and ensembles chosen on out-of-fold probabilities."""

from __future__ import annotations

import csv
import json
from pathlib import Path
import re
import shutil

import pytest
import yaml
from conftest import CV_RUNS, accuracy, read_csv, run_script, sample_workdir, snakemake

from mcqa.prompt import split_input
from mcqa.records import read_records


def scheduled(result) -> dict[str, int]:
    table = result.stdout.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_fold_models_never_train_on_their_held_out_articles(cross_validated):
    data = cross_validated / "results/data"
    everything = read_records(data / "train.json", "labelled")
    folds = json.loads((data / "folds.json").read_text())
    assert sorted(n for fold in folds["held_out"] for n in fold) == list(range(len(everything)))
    for k, held_out in enumerate(folds["held_out"]):
        train = read_records(data / f"fold{k}/train.json", "labelled")
        val = read_records(data / f"fold{k}/val.json", "labelled")
        assert [r["input"] for r in val] == [everything[n]["input"] for n in held_out]
        assert len(train) + len(val) == len(everything)
        assert not {split_input(r["input"])[0] for r in train} & {split_input(r["input"])[0] for r in val}
    log = (cross_validated / "logs/a/fold0/train_lora.log").read_text()
    assert f"fold0/train.json: 0 of {len(everything) - len(folds['held_out'][0])} questions" in log


def test_out_of_fold_probabilities_score_every_training_question_once(cross_validated):
    everything = read_records(cross_validated / "results/data/train.json", "labelled")
    for run in ("a", "b_seed1"):
        rows = read_csv(cross_validated / f"results/{run}/oof_probs.csv")
        assert [int(r["record"]) for r in rows] == list(range(len(everything)))
        assert [int(r["label"]) for r in rows] == [r["label"] for r in everything]
        metrics = json.loads((cross_validated / f"results/{run}/metrics.json").read_text())
        assert metrics["questions"] == len(everything) and len(metrics["fold_accuracy"]) == 2
        correct = sum(max(range(4), key=lambda a: float(r[f"p{a + 1}"])) + 1 == int(r["label"]) for r in rows)
        assert metrics["accuracy"] == correct / len(rows)


def test_a_run_answers_with_the_mean_of_its_fold_models(cross_validated):
    folds = [read_csv(cross_validated / f"results/a/fold{k}/answer_probs.csv") for k in range(2)]
    mean = read_csv(cross_validated / "results/a/answer_probs.csv")
    answers = read_csv(cross_validated / "results/a/answers.csv")
    assert [r["ID"] for r in mean] == [r["ID"] for r in folds[0]] == [r["ID"] for r in answers]
    for n, row in enumerate(mean):
        four = [float(row[f"p{a}"]) for a in "1234"]
        assert four == pytest.approx([(float(folds[0][n][f"p{a}"]) + float(folds[1][n][f"p{a}"])) / 2
                                      for a in "1234"], abs=2e-6)
        assert int(answers[n]["Answer"]) == four.index(max(four)) + 1
    assert len(read_csv(cross_validated / "results/a/refit/answers.csv")) == len(answers)
    assert (cross_validated / "results/a/refit/adapter/adapter_model.safetensors").exists()


def test_fold_models_are_scored_from_base_and_adapter_as_their_merged_checkpoint_would_be(cross_validated, tmp_path):
    """No fold model leaves a merged checkpoint (a 7B's is 13.5 GB); one job a fold model scores its held-out
    fold and the test file from the base with the adapter merged as it loads, with the scores that the
    merged checkpoint written by merge_lora.py gives."""
    results = cross_validated / "results"
    assert not list(results.glob("*/fold*/merged")) and (results / "a/refit/merged").is_dir()
    log = (cross_validated / "logs/a/fold1/score_fold_model.log").read_text()
    assert "results/a/fold1/adapter merged into" in log and log.count("model loaded in") == 1
    merged = tmp_path / "merged"
    merge = run_script("merge_lora.py", "--base-model", cross_validated / "resources/models/demo", "--adapter",
                       results / "a/fold1/adapter", "--out", merged)
    assert merge.returncode == 0, merge.stderr
    settings = yaml.safe_load((cross_validated / "config.yaml").read_text()).get("answering", {})
    scored = run_script("score_questions.py", "--model", merged, "--val", results / "data/fold1/val.json",
                        "--metrics", tmp_path / "metrics.json", "--val-probs", tmp_path / "val_probs.csv",
                        "--test", results / "data/test.json", "--answer-probs", tmp_path / "answer_probs.csv",
                        "--max-seq-length", "256", "--settings", json.dumps(
                            {"batch_tokens": 16384, "precision": "auto", "load_in": "none", "rotations": 4,
                             "prompt_format": "plain", "fused_kernels": True, **settings}))
    assert scored.returncode == 0, scored.stderr
    for name in ("val_probs.csv", "answer_probs.csv"):
        ours, written = read_csv(results / "a/fold1" / name), read_csv(tmp_path / name)
        assert [r.get("record", r.get("ID")) for r in ours] == [r.get("record", r.get("ID")) for r in written]
        assert max(abs(float(a[f"p{k}"]) - float(b[f"p{k}"])) for a, b in zip(ours, written) for k in "1234") < 1e-5
    (cross_validated / "keep_merged.yaml").write_text("merge_fold_models: true\n")
    planned = snakemake(cross_validated, "-n", configfiles=("config.yaml", "keep_merged.yaml")).stdout
    assert planned.count("rule merge_lora:") == 4  # the setting that keeps them: every fold model's merge


def test_baseline_scores_the_base_without_training_or_merging(cross_validated):
    output = snakemake(cross_validated, "-n", "-p", "--forcerun", "answer_questions", "evaluate_answers").stdout
    planned = scheduled(snakemake(cross_validated, "-n", "--forceall"))
    trained = sum(1 for run, settings in CV_RUNS.items() if settings.get("train", True)
                  for _ in settings.get("seeds", [None]))
    assert planned["train_lora"] == trained * 2 + 1  # two folds each, a's refit
    assert planned["merge_lora"] == 1 and planned["score_fold_model"] == trained * 2  # only the refit is merged
    commands = [line for line in output.splitlines() if "score_questions.py --model" in line]
    assert any("--model resources/models/demo " in line and "results/base/answers.csv" in line for line in commands)
    assert not (cross_validated / "results/base/adapter").exists()
    metrics = json.loads((cross_validated / "results/base/metrics.json").read_text())
    assert metrics["questions"] == len(read_records(cross_validated / "results/data/train.json", "labelled"))
    # The sample's cue is learnt in training (test_labels_flow_from_xlsx_to_csv): the base alone is near chance.
    assert accuracy(cross_validated / "results/base/answers.csv", cross_validated / "data/test_answers.csv") <= 0.45


def test_experiments_table_shows_folds_seeds_and_the_baseline(cross_validated):
    with open(cross_validated / "results/experiments.tsv", encoding="utf-8") as fh:
        rows = {r["run"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert set(rows) == {"a", "b_seed1", "b (mean of 1 seeds)", "base", "ensemble"}
    assert rows["a"]["folds"].startswith("2 (sd ") and rows["base"]["kind"] == "baseline (no training)"
    assert float(rows["b (mean of 1 seeds)"]["val accuracy"]) == float(rows["b_seed1"]["val accuracy"])
    assert rows["ensemble"]["chosen on these questions"] == "weights, teacher"  # b_seed1 is distilled
    # A run's training figures are its fold models', what its out-of-fold accuracy describes; not its refit's.
    from mcqa.history import last_totals, read_history

    seconds = [last_totals(read_history(cross_validated / f"results/a/{model}/train_log.jsonl"))["elapsed_s"]
               for model in ("fold0", "fold1", "refit")]
    assert float(rows["a"]["training minutes"]) == round(sum(seconds[:2]) / 60, 2)


def test_seed_replicas_get_their_mean_and_spread_in_the_table(tmp_path):
    """Three replicas of a run, each with its own out-of-fold accuracy (hand-made metrics): one row of
    their mean, the spread the standard deviation over seeds."""
    import statistics

    from mcqa.metrics import metrics

    manifest = {}
    for seed, right in ((1, 2), (2, 3), (3, 3)):
        result = metrics([[0.7, 0.1, 0.1, 0.1]] * 4, [1] * right + [2] * (4 - right))
        (tmp_path / f"r_seed{seed}.json").write_text(json.dumps(result))
        manifest[f"r_seed{seed}"] = {"settings": {"seed": seed}, "train_logs": [], "replica_of": "r", "folds": 0,
                                     "metrics": str(tmp_path / f"r_seed{seed}.json")}
    out = run_script("summarize_experiments.py", "--manifest", json.dumps(manifest), "--tsv", tmp_path / "t.tsv",
                     "--html", tmp_path / "t.html", "--png", tmp_path / "t.png")
    assert out.returncode == 0, out.stderr
    rows = {r["run"]: r for r in read_csv_tab(tmp_path / "t.tsv")}
    assert float(rows["r (mean of 3 seeds)"]["val accuracy"]) == round(statistics.fmean([0.5, 0.75, 0.75]), 4)
    assert rows["r (mean of 3 seeds)"]["95% interval"] == f"sd {statistics.stdev([0.5, 0.75, 0.75]):.4f} over seeds"


def read_csv_tab(path):
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_greedy_ensemble_is_chosen_on_out_of_fold_probabilities(cross_validated):
    metrics = json.loads((cross_validated / "results/ensemble/metrics.json").read_text())
    assert metrics["method"] == "greedy" and set(metrics["members"]) == {"a", "b_seed1"}  # base: a reference
    assert metrics["questions"] == len(read_records(cross_validated / "results/data/train.json", "labelled"))
    assert sum(metrics["members"].values()) >= 1


def write_probs(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["record", "label", "p1", "p2", "p3", "p4"])
        writer.writerows(rows)
    return path


def forward_selection(members: dict[str, list[list[float]]], labels: list[int], rounds: int) -> dict[str, int]:
    """Caruana's forward selection with replacement, written out plainly: each round add the member that
    makes the mean most accurate (then lowest log-loss, then first); keep the picks of the best round."""
    import math

    picks, best, best_counts = [], None, None
    for _ in range(rounds):
        scored = []
        for name in members:
            chosen = picks + [name]
            mean = [[sum(members[m][q][a] for m in chosen) / len(chosen) for a in range(4)] for q in range(len(labels))]
            right = sum(max(range(4), key=lambda a: row[a]) + 1 == label for row, label in zip(mean, labels))
            loss = -sum(math.log(row[label - 1]) for row, label in zip(mean, labels)) / len(labels)
            scored.append(((right / len(labels), -loss), name))
        score, name = max(scored, key=lambda item: (item[0], -list(members).index(item[1])))
        picks.append(name)
        if best is None or score > best:
            best, best_counts = score, {m: picks.count(m) for m in members}
    return best_counts


def test_greedy_ensemble_of_hand_made_probabilities_is_forward_selection(tmp_path):
    """Three members on four questions: a is right on questions 1 and 2, b on 3, c on 1 and 4, so no one
    member and no equal mean is right on all; the weights must be exactly forward selection's counts."""
    labels = [1, 2, 3, 4]
    members = {"a": [[.7, .1, .1, .1], [.1, .7, .1, .1], [.4, .2, .3, .1], [.4, .2, .1, .3]],
               "b": [[.2, .4, .2, .2], [.4, .3, .2, .1], [.1, .1, .7, .1], [.3, .3, .3, .1]],
               "c": [[.8, .1, .05, .05], [.5, .3, .1, .1], [.3, .1, .2, .4], [.1, .1, .1, .7]]}
    files = [write_probs(tmp_path / f"{name}.csv", [[q, labels[q], *probs[q]] for q in range(4)])
             for name, probs in members.items()]
    out = run_script("ensemble_answers.py", "--members", *members, "--method", "greedy", "--val-probs", *files,
                     "--metrics-out", tmp_path / "metrics.json")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "metrics.json").read_text())
    expected = forward_selection(members, labels, rounds=25)
    assert result["members"] == {name: float(count) for name, count in expected.items()}
    assert len({count for count in expected.values()}) > 1, "the example must tell the members apart"
    assert result["chosen_on_these_questions"].startswith("the members' weights")


def test_sweep_expands_a_grid_into_runs_named_by_their_settings(tmp_path):
    workdir = sample_workdir(tmp_path, sweep={"lora_r": [8, 16], "learning_rate": [0.001, 0.002]})
    output = snakemake(workdir, "-n", "-p").stdout
    trainings = {re.search(r"results/(\S+)/adapter", line)[1]: json.loads(line.split("--settings '")[1].split("'")[0])
                 for line in output.splitlines() if "train_lora.py --train" in line}
    assert set(trainings) == {f"learning_rate-{lr}_lora_r-{r}" for lr in (0.001, 0.002) for r in (8, 16)}
    assert trainings["learning_rate-0.002_lora_r-8"]["lora_r"] == 8
    assert trainings["learning_rate-0.002_lora_r-8"]["learning_rate"] == 0.002
    named = sample_workdir(tmp_path / "named", runs={"r": {"epochs": 2}}, sweep={"lora_r": [8, 16]})
    assert "results/r_lora_r-16/adapter" in snakemake(named, "-n", "-p").stdout


def test_folds_and_a_validation_share_together_are_refused(tmp_path):
    result = snakemake(sample_workdir(tmp_path, data={"folds": 5, "val_fraction": 0.2}), "-n", check=False)
    assert result.returncode != 0
    assert "folds 5 and val_fraction 0.2 together" in result.stdout + result.stderr
    assert snakemake(sample_workdir(tmp_path / "one", data={"folds": 1}), "-n", check=False).returncode != 0


def test_a_new_seed_reruns_only_its_own_jobs_and_changing_folds_retrains_only_the_folds(cross_validated, tmp_path):
    import shutil

    import yaml

    copy = tmp_path / "cv"
    shutil.copytree(cross_validated, copy, symlinks=True)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["runs"]["b"]["seeds"] = [1, 2]
    (copy / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    output = snakemake(copy, "-n").stdout
    runs = {m[1] for m in re.finditer(r"wildcards: (?:model|run|member)=([^,\s]+)", output)}
    assert {run.split("/")[0] for run in runs} == {"b_seed2", "ensemble"}
    config["data"]["folds"] = 3
    (copy / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    output = snakemake(copy, "-n").stdout
    assert scheduled(snakemake(copy, "-n"))["train_lora"] == 3 * 3  # a, b_seed1, b_seed2, three folds each
    # What the folds do not decide stays: train.json is not rewritten, so the refit, the baseline and the
    # demo base are not stale.
    jobs = {(m[1], m[2]) for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    wildcards: \w+=(\S+)", output, re.M)}
    assert ("train_lora", "a/fold2") in jobs and not {job for job in jobs if job[1] in ("a/refit", "base")}, jobs
    assert not {"prepare_train_data", "build_demo_model"} & set(scheduled(snakemake(copy, "-n")))


def test_the_refit_is_exported_as_gguf_and_no_fold_model_is(cross_validated):
    from mcqa.gguf_base import read_summary

    summary = read_summary(cross_validated / "results/a/refit/model-q8_0.gguf")
    assert summary.architecture == "llama" and set(summary.tensor_types) == {"Q8_0", "F32"}
    assert summary.special_ids["eos_token"] == 1 and summary.add_bos is True  # the demo tokenizer's </s> and <s>
    assert sorted(p.relative_to(cross_validated) for p in (cross_validated / "results").rglob("*.gguf")) == [
        Path("results/a/refit/model-q8_0.gguf")]


def test_the_end_of_a_run_marks_optimistic_figures_and_names_the_refit(cross_validated, tmp_path):
    """The summary ranks answers files by their figures: the greedy ensemble's weights, and the distilled
    run's teacher, saw the questions they are scored on, which it says; the refit's answers have no figure
    and are named too."""
    import shutil

    copy = tmp_path / "cv"
    shutil.copytree(cross_validated, copy, symlinks=True)
    result = snakemake(copy, "--forcerun", "summarize_experiments")  # a run with nothing to do says nothing
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  results/")}
    assert "optimistic: the members' weights" in lines["results/ensemble/answers.csv"]
    assert "optimistic: the teacher distilled" in lines["results/b_seed1/answers.csv"]
    assert "optimistic" not in lines["results/a/answers.csv"] + lines["results/base/answers.csv"]
    assert "a refit on every training row: no figure describes it" in lines["results/a/refit/answers.csv"]


def test_a_new_test_file_retrains_nothing_that_trains_on_an_extra_source(cross_validated, tmp_path):
    """The extra source was screened against the test file; a new test file checks it again (a small job)
    instead of screening it again, which would retrain every run that trains on it: only b_seed1 trains
    again, whose pseudo-labels come from the test file."""
    import shutil

    import pandas as pd

    copy = tmp_path / "cv"
    shutil.copytree(cross_validated, copy, symlinks=True)
    frame = pd.read_excel(copy / "data/test.xlsx", dtype=object)
    frame.at[0, "問題"] = str(frame.at[0, "問題"]) + "（修訂）"
    frame.to_excel(copy / "data/test.xlsx", index=False)
    output = snakemake(copy, "-n").stdout
    jobs = scheduled(snakemake(copy, "-n"))
    assert {"prepare_test_data", "check_extra_data", "score_fold_model"} <= set(jobs), jobs
    assert "prepare_extra_data" not in jobs, jobs
    trained = {m[1] for m in re.finditer(r"^rule train_lora:\n(?:    .*\n)*?    wildcards: model=(\S+)", output, re.M)}
    assert trained == {"b_seed1/fold0", "b_seed1/fold1"}, trained


def test_tensorboard_tracking_writes_one_run_a_fold_model(cross_validated, tmp_path):
    """tracking: tensorboard hands each training's metrics to TensorBoard as local files, one folder a
    fold model (and refit), named by run and fold so that they line up side by side."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folders = sorted(str(p.parent.relative_to(cross_validated / "results/tensorboard"))
                     for p in (cross_validated / "results/tensorboard").glob("*/*/events.out.tfevents.*"))
    assert folders == ["a/fold0", "a/fold1", "a/refit", "b_seed1/fold0", "b_seed1/fold1"], folders
    scalars = EventAccumulator(str(cross_validated / "results/tensorboard/a/fold0")).Reload().Tags()["scalars"]
    assert "train/loss" in scalars
    # Trained again from scratch: the folder starts afresh, not with a second set of the same steps.
    workdir = tmp_path / "work"
    shutil.copytree(cross_validated, workdir, symlinks=True)
    snakemake(workdir, "results/a/fold0/adapter", "--force")
    assert len(list((workdir / "results/tensorboard/a/fold0").glob("events.out.tfevents.*"))) == 1


def test_folds_that_cannot_be_made_or_come_out_uneven_say_so(tmp_path):
    """Folds hold whole articles out: one article makes no two folds (and 2 is already the fewest), and one
    long article beside short ones makes folds as uneven as 37 and 3 questions, which the log warns about."""
    from mcqa.prompt import INSTRUCTION, build_input

    def records(sizes):
        return [{"instruction": INSTRUCTION, "input": build_input(f"文章{a}", f"問題{q}", ["1", "2", "3", "4"]),
                 "options": ["1", "2", "3", "4"], "output": "1"} for a, size in enumerate(sizes) for q in range(size)]

    def split(sizes, folds):
        (tmp_path / "train.json").write_text(json.dumps(records(sizes), ensure_ascii=False))
        return run_script("prepare_data.py", "folds", "--train", tmp_path / "train.json", "--folds", str(folds),
                          "--out-dir", tmp_path / "folds")

    one = split([40], 2)
    assert one.returncode == 2 and "40 records in 1 articles cannot make 2 folds" in one.stderr
    assert "cross-validation needs at least two; use data.val_fraction" in one.stderr and "lower" not in one.stderr
    assert "lower data.folds" in split([40, 3], 3).stderr
    uneven = split([37, 1, 1, 1], 2)
    sizes = json.loads((tmp_path / "folds/folds.json").read_text())["fold_records"]
    assert sum(sizes) == 40 and min(sizes) < max(sizes) / 2
    assert uneven.returncode == 0 and f"WARNING the folds are uneven ({sizes[0]}, {sizes[1]} records)" in uneven.stderr
    assert "WARNING" not in split([10, 10, 10, 10], 2).stderr


def test_a_new_student_trains_only_itself_and_learns_from_the_finished_teacher(cross_validated):
    """Teachers and students are ordinary runs: adding a student of a finished cross-validated run plans the
    student's fold models (reading the teacher's out-of-fold file) and what combines runs, no teacher job."""
    (cross_validated / "student.yaml").write_text(yaml.safe_dump(
        {"runs": {"student": {"distill": {"teacher": "a", "weight": 0.3}}}}))
    result = snakemake(cross_validated, "-n", "-p", configfiles=("config.yaml", "student.yaml"))
    planned = scheduled(result)
    assert planned["train_lora"] == 2 and planned["score_fold_model"] == 2 and planned["combine_folds"] == 1
    trainings = [line for line in result.stdout.splitlines() if "train_lora.py" in line and "--settings" in line]
    assert all("results/student/fold" in line and "--teacher-probs results/a/oof_probs.csv" in line
               and '"weight": 0.3' in line for line in trainings), trainings
    assert (cross_validated / "results/a/oof_probs.csv").exists()  # the teacher is finished: only read


def test_a_cross_validated_run_trains_on_extras_and_pseudo_labels_and_learns_its_teacher(cross_validated):
    """The demo's whole chain: the extra source converted and trained on by every trained model, the baseline's
    pseudo-labels and a's out-of-fold probabilities in b's fold models, and b's figure marked optimistic."""
    report = json.loads((cross_validated / "results/data/report.json").read_text())
    assert report["extra c3"]["rows_kept"] == 2 and report["extra c3"]["rows_converted"] == 2
    test_questions = len(read_records(cross_validated / "results/data/test.json", "test"))
    assert report["pseudo-labels b_seed1"]["kept"] == test_questions  # min_probability 0.25 keeps every answer
    for model in ("a/fold0", "a/refit", "b_seed1/fold1"):
        log = (cross_validated / f"logs/{model}/train_lora.log").read_text()
        assert "results/data/extra/c3.json: 2 more records to train on" in log, model
    log = (cross_validated / "logs/b_seed1/fold1/train_lora.log").read_text()
    assert f"results/b_seed1/pseudo_labels.json: {test_questions} more records to train on" in log
    assert "distilling a (weight 0.5, temperature 2.0)" in log
    assert "teacher_saw_these_questions" in json.loads((cross_validated / "results/b_seed1/metrics.json").read_text())
    assert "teacher_saw_these_questions" not in json.loads((cross_validated / "results/a/metrics.json").read_text())
