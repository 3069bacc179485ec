"""Beyond the labelled file: extra sources (data.extra) and pseudo-labels (pseudo_labels), trained on only, and
distillation of a cross-validated teacher (distill)."""

from __future__ import annotations

import json
import shlex
import re

import math

import pandas as pd
import pytest
import torch
from conftest import run_script, sample_workdir, snakemake, training_defaults

from mcqa.prompt import INSTRUCTION, build_input

# A C3-like source: Simplified Chinese, its own column names, answers 1-4.
COLUMNS = {"文章": "context", "問題": "question", "選項1": "a", "選項2": "b", "選項3": "c", "選項4": "d",
           "正確答案": "answer"}


def c3_rows() -> list[dict]:
    return [
        {"context": "这个软件的内存不够。", "question": "缺什么？", "a": "内存", "b": "硬盘", "c": "网络", "d": "屏幕",
         "answer": 1},
        # The training file's article once converted, in full-width forms and with other spacing: a leak.
        {"context": " 訓練文章 ＡＢＣ", "question": "哪个？", "a": "甲", "b": "乙", "c": "丙", "d": "丁", "answer": 2},
        # The test file's article once converted: a leak of the test.
        {"context": "测试文章", "question": "什么？", "a": "甲", "b": "乙", "c": "丙", "d": "丁", "answer": 3},
        {"context": "", "question": "空的？", "a": "甲", "b": "乙", "c": "丙", "d": "丁", "answer": 4},
        # The training file's third article in Simplified with other quotes: s2twp writes 台 where it has 臺
        # and “” where it has 「」; the article key folds both.
        {"context": SIMPLIFIED_COPY.replace("对象", "对手"), "question": "哪里？", "a": "甲", "b": "乙", "c": "丙",
         "d": "丁", "answer": 1},
        # The same in Simplified with 对象, which s2twp turns into 物件: a near-copy, not the same key.
        {"context": SIMPLIFIED_COPY, "question": "什么？", "a": "甲", "b": "乙", "c": "丙", "d": "丁", "answer": 2},
    ]


TRADITIONAL = "小明住在臺北，他說：「我每天在公司裡面對電腦。」他的對象很重要，所以他認真工作了十年，從來沒有休假。"
SIMPLIFIED_COPY = "小明住在台北，他说：“我每天在公司里面对电脑。”他的对象很重要，所以他认真工作了十年，从来没有休假。"


def records(path, articles: list[str], with_ids: bool = False) -> str:
    path.write_text(json.dumps([
        {**({"id": str(n)} if with_ids else {"output": "1"}), "instruction": INSTRUCTION,
         "input": build_input(article, "問題？", ["甲", "乙", "丙", "丁"]), "options": ["甲", "乙", "丙", "丁"]}
        for n, article in enumerate(articles)], ensure_ascii=False))
    return str(path)


def prepare_extra(tmp_path, *args: str):
    table = tmp_path / "c3.csv"
    pd.DataFrame(c3_rows()).to_csv(table, index=False)
    train = records(tmp_path / "train.json", ["訓練文章 ABC", "另一篇", TRADITIONAL.replace("對象", "對手")])
    test = records(tmp_path / "test.json", ["測試文章"], with_ids=True)
    out = tmp_path / "out"
    result = run_script("prepare_data.py", "extra", "--input", table, "--name", "c3", "--columns", json.dumps(COLUMNS),
                        "--convert", "s2twp", "--against", train, test, "--out", out / "c3.json",
                        "--report-out", out / "c3_report.json", *args)
    return result, out, table, train, test


def test_an_extra_source_is_mapped_converted_and_leaves_out_what_the_training_and_test_files_hold(tmp_path):
    result, out, table, train, test = prepare_extra(tmp_path, "--on-invalid", "skip")
    assert result.returncode == 0, result.stderr
    kept = json.loads((out / "c3.json").read_text())
    report = json.loads((out / "c3_report.json").read_text())
    # Simplified became Taiwan's Traditional with its phrases (软件 -> 軟體, 内存 -> 記憶體).
    assert len(kept) == 1 and kept[0]["options"][0] == "記憶體" and "軟體" in kept[0]["input"]
    assert kept[0]["output"] == "1"
    assert (report["name"], report["rows_read"], report["rows_kept"], report["rows_skipped"]) == ("c3", 6, 1, 1)
    assert report["rows_converted"] == 5 and report["convert"] == "s2twp"
    assert report["left_out_by_reason"] == {f"copy of an article in {train}": 2, f"copy of an article in {test}": 1,
                                            f"near-copy of an article in {train}": 1}
    assert [e["row"] for e in report["left_out"]] == [3, 4, 6, 7]
    assert "near-copy of one in" in report["left_out"][-1]["reason"]
    assert "context: is empty" in report["skipped"][0]["reasons"][0]  # the file's own column name
    assert report["lengths_chars"]["article"]["count"] == 1


def test_an_extra_source_is_checked_against_a_new_test_file(tmp_path):
    """A test file that gains an article of an extra source (or a near-copy) stops the run, saying how to
    screen the source again; one that does not passes."""
    result, out, table, train, test = prepare_extra(tmp_path, "--on-invalid", "skip")
    assert result.returncode == 0, result.stderr
    kept = json.loads((out / "c3.json").read_text())
    article = kept[0]["input"].split("\n\n")[0].removeprefix("文章：")
    for name, articles, code in (("same", ["測試文章"], 0), ("gained", ["測試文章", article + "。"], 2)):
        checked = run_script("prepare_data.py", "extra-check", "--records", out / "c3.json", "--against",
                             records(tmp_path / f"{name}.json", articles, with_ids=True), "--out",
                             tmp_path / f"{name}_check.json")
        assert checked.returncode == code, checked.stderr
    assert "1 of its records (the first: record 0) have an article of" in checked.stderr
    assert "snakemake --forcerun prepare_extra_data" in checked.stderr


def test_repeated_rows_of_an_extra_source_are_counted(tmp_path):
    table = tmp_path / "c3.csv"
    pd.DataFrame([c3_rows()[0]] * 3).to_csv(table, index=False)
    result = run_script("prepare_data.py", "extra", "--input", table, "--name", "c3", "--columns", json.dumps(COLUMNS),
                        "--out", tmp_path / "c3.json", "--report-out", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["duplicates"]["rows"] == 2
    assert "kept 3 to train on, 2 of them repeating an earlier row" in result.stderr


def test_a_bad_row_of_an_extra_source_stops_the_run_naming_its_file_row_and_column(tmp_path):
    result, out, table, *_ = prepare_extra(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{table}: 1 invalid row(s)" in result.stderr and "row 5, column context: is empty" in result.stderr
    assert not (out / "c3.json").exists()


def test_a_missing_mapped_column_is_named_as_the_file_calls_it(tmp_path):
    table = tmp_path / "c3.csv"
    pd.DataFrame(c3_rows()).drop(columns=["answer"]).to_csv(table, index=False)
    result = run_script("prepare_data.py", "extra", "--input", table, "--name", "c3", "--columns", json.dumps(COLUMNS),
                        "--out", tmp_path / "c3.json", "--report-out", tmp_path / "r.json")
    assert result.returncode == 2 and "missing column(s) answer" in result.stderr
    assert "fix the mapping" in result.stderr and "正確答案: answer" in result.stderr  # not only "edit the file"


def planned_commands(workdir, *args: str) -> list[str]:
    """The shell commands of a dry run."""
    output = snakemake(workdir, "-n", "-p", *args).stdout
    return [line for line in output.splitlines() if line.startswith("python ") or " python " in line]


def commands_of(commands: list[str], script: str) -> list[str]:
    return [c for c in commands if f"{script} " in c or f"{script}' " in c]


def with_c3(tmp_path, **overrides):
    table = tmp_path / "c3.csv"
    pd.DataFrame(c3_rows()[:1]).to_csv(table, index=False)
    data = {"extra": [{"name": "c3", "path": str(table), "convert": "s2twp", "columns": COLUMNS}],
            **overrides.pop("data", {})}
    return sample_workdir(tmp_path / "work", data=data, **overrides)


def test_extra_sources_only_ever_train(tmp_path):
    """A run trains on the sources its `extra` names (all by default); no split, fold, evaluation, scoring or
    baseline reads them."""
    workdir = with_c3(tmp_path, data={"folds": 2}, runs={"all": {}, "none": {"extra": []}, "base": {"train": False}})
    commands = planned_commands(workdir)
    training = commands_of(commands, "train_lora.py")
    assert len(training) == 4  # two runs, two folds each
    for command in training:
        has_extra = "--extra results/data/extra/c3.json" in command
        assert has_extra == ("results/all/" in command), command
    extra = commands_of(commands, "prepare_data.py")
    assert any(" extra " in c and "--convert s2twp" in c for c in extra)
    for command in commands:
        if "extra/c3.json" in command:
            assert "train_lora.py" in command or " extra " in command or " extra-check " in command, command
    assert any("--extra results/data/extra/c3_report.json" in c for c in commands_of(commands, "summarize_data.py"))


@pytest.mark.parametrize("runs, needle", [
    ({"r": {"extra": ["c4"]}}, "extra names c4, which data.extra does not define (it defines: c3)"),
    ({"r": {"pseudo_labels": {"teacher": "nobody"}}}, "pseudo_labels.teacher nobody is not a run of this config"),
    ({"r": {"pseudo_labels": {"teacher": "r"}}}, "pseudo_labels.teacher r is the run itself"),
    ({"r": {"pseudo_labels": {"teacher": "s"}}, "s": {"pseudo_labels": {"teacher": "r"}}},
     "pseudo_labels.teacher s learns from r"),
    ({"r": {"pseudo_labels": {"teacher": "ensemble"}}, "s": {}}, "its teacher is the ensemble, but the ensemble is off"),
    ({"r": {"pseudo_labels": {"teacher": "s"}}, "s": {"seeds": [1, 2]}},
     "s is trained as s_seed1, s_seed2 (seed replicas or sweep points): name one of them, or `ensemble`"),
])
def test_sources_and_teachers_that_cannot_work_are_refused_before_any_job(tmp_path, runs, needle):
    result = snakemake(with_c3(tmp_path, runs=runs), "-n", check=False)
    assert result.returncode != 0 and needle in result.stdout + result.stderr


def test_two_sources_of_one_name_are_refused(tmp_path):
    workdir = with_c3(tmp_path)
    config = workdir / "config.yaml"
    config.write_text(config.read_text().replace("  extra:\n", "  extra:\n  - {name: c3, path: x.csv}\n", 1))
    result = snakemake(workdir, "-n", check=False)
    assert "two sources are named c3" in result.stdout + result.stderr


def test_pseudo_labels_come_from_the_teacher_and_only_train(tmp_path):
    """A student of the ensemble trains on the ensemble's confident test answers, is no member of it, and
    nothing but its training reads them."""
    workdir = with_c3(tmp_path, runs={"a": {}, "b": {"lora_r": 8},
                                      "student": {"pseudo_labels": {"teacher": "ensemble", "min_probability": 0.6}}})
    commands = planned_commands(workdir)
    [select] = commands_of(commands, "select_pseudo_labels.py")
    assert "--teacher-probs results/ensemble/answer_probs.csv" in select and "--min-probability 0.6" in select
    [ensemble] = [c for c in commands_of(commands, "ensemble_answers.py") if "--answers" in c]
    assert "student" not in ensemble  # a student of the ensemble is not one of its members
    for command in commands:
        if "pseudo_labels.json" in command:
            assert "select_pseudo_labels.py" in command or (
                "train_lora.py" in command and "results/student/adapter" in command), command
    [student] = [c for c in commands_of(commands, "train_lora.py") if "results/student/" in c]
    assert "results/student/pseudo_labels.json" in student
    assert any("--pseudo-labels results/student/pseudo_labels_report.json" in c
               for c in commands_of(commands, "summarize_data.py"))


def test_select_pseudo_labels_keeps_confident_answers_and_reports_their_spread(tmp_path):
    test = records(tmp_path / "test.json", ["一", "二", "三", "四"], with_ids=True)
    probs = tmp_path / "answer_probs.csv"
    probs.write_text("ID,p1,p2,p3,p4\n0,0.95,0.02,0.02,0.01\n1,0.4,0.3,0.2,0.1\n2,0.01,0.01,0.9,0.08\n"
                     "3,0.05,0.05,0.05,0.85\n")
    out = tmp_path / "pseudo.json"
    result = run_script("select_pseudo_labels.py", "--test", test, "--teacher-probs", probs, "--teacher", "ens",
                        "--min-probability", "0.9", "--out", out, "--report-out", tmp_path / "report.json")
    assert result.returncode == 0, result.stderr
    kept = json.loads(out.read_text())
    assert [r["output"] for r in kept] == ["1", "3"] and all("id" not in r for r in kept)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kept"] == 2 and report["answer_spread"] == {"1": 1, "2": 0, "3": 1, "4": 0}
    assert report["mean_teacher_probability"] == 0.925 and "2 of 4 test questions" in result.stderr
    # A teacher scored on another test file is refused, not silently misaligned.
    probs.write_text("ID,p1,p2,p3,p4\n9,0.95,0.02,0.02,0.01\n")
    result = run_script("select_pseudo_labels.py", "--test", test, "--teacher-probs", probs, "--teacher", "ens",
                        "--min-probability", "0.9", "--out", out, "--report-out", tmp_path / "report.json")
    assert result.returncode == 2 and "does not answer the questions of" in result.stderr


def test_train_lora_trains_on_extra_records_and_distils_its_teacher(demo_run, tmp_path):
    """One short training with an extra file and a teacher: the extra records join training (label only), the
    training file's records get their teacher's probabilities, and a resume needs the same extra data."""
    from mcqa.checkpoints import fingerprint

    data = demo_run / "results/data"
    extra = tmp_path / "extra.json"
    extra.write_text((data / "val.json").read_text())
    train = json.loads((data / "train.json").read_text())
    teacher = tmp_path / "oof_probs.csv"
    teacher.write_text("record,label,p1,p2,p3,p4\n" + "".join(f"{n},{r['output']},0.7,0.1,0.1,0.1\n"
                                                             for n, r in enumerate(train)))
    settings = {**training_defaults(), "epochs": 0.01, "micro_batch_size": 8, "max_seq_length": 256,
                "compile": False, "distill": {"teacher": "t", "weight": 0.5, "temperature": 2.0}}
    out = tmp_path / "run"
    result = run_script("train_lora.py", "--train", data / "train.json", "--extra", extra, "--teacher-probs", teacher,
                        "--teacher-records", data / "train.json", "--base-model", demo_run / "resources/models/demo",
                        "--out", out / "adapter", "--log-jsonl", out / "log.jsonl", "--checkpoint-dir",
                        out / "checkpoints", "--settings", json.dumps(settings))
    assert result.returncode == 0, result.stderr
    val = len(json.loads((data / "val.json").read_text()))
    assert f"{extra}: {val} more records to train on" in result.stderr
    assert re.search(rf"train {len(train) + val} examples", result.stderr), result.stderr
    assert f"distilling t (weight 0.5, temperature 2.0): teacher probabilities for the {len(train)} records" \
        in result.stderr
    assert (out / "adapter/adapter_model.safetensors").exists()
    args = (settings, str(data / "train.json"), "", "base", None, "plain", 1, 1)
    assert fingerprint(*args, [str(extra)])["data_sha256"] != fingerprint(*args)["data_sha256"]
    # A teacher file of other data is refused, naming it.
    teacher.write_text("record,label,p1,p2,p3,p4\n0,1,0.7,0.1,0.1,0.1\n")
    result = run_script("train_lora.py", "--train", data / "train.json", "--teacher-probs", teacher,
                        "--teacher-records", data / "train.json", "--base-model", demo_run / "resources/models/demo",
                        "--out", out / "adapter2", "--log-jsonl", out / "log2.jsonl", "--checkpoint-dir",
                        out / "checkpoints2", "--settings", json.dumps(settings))
    assert result.returncode == 2 and f"{teacher} has 1 rows for the {len(train)} records" in result.stderr


def test_the_distilled_loss_mixes_label_and_teacher_at_the_answer_digit_only():
    from mcqa.training import Distillation, distilled_loss_sum

    torch.manual_seed(0)
    answer_ids, end = [5, 6, 7, 8], 9
    # A packed micro-batch of three examples: each has its digit then its end token among the kept positions.
    targets = torch.tensor([[6, end, 8, end, 5, end]])
    logits = torch.randn(1, 6, 12)
    teacher = torch.tensor([[0.1, 0.6, 0.2, 0.1], [math.nan] * 4, [0.25, 0.25, 0.25, 0.25]])
    ce = torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none")
    plain = distilled_loss_sum(logits, targets, teacher, Distillation(answer_ids, 0.0, 2.0))
    assert torch.allclose(plain, ce.sum())
    t, w = 2.0, 0.3
    mixed = distilled_loss_sum(logits, targets, teacher, Distillation(answer_ids, w, t))
    expected = ce[[1, 3, 5]].sum() + ce[2]  # end tokens, and the example without a teacher: label alone
    for position, row in ((0, 0), (4, 2)):
        soft = torch.softmax(teacher[row].log() / t, dim=-1)
        student = torch.log_softmax(logits[0, position, answer_ids] / t, dim=-1)
        expected += (1 - w) * ce[position] + w * t * t * (soft * (soft.log() - student)).sum()
    assert torch.allclose(mixed, expected)
    # A student whose softened answer probabilities are the teacher's pays no KL.
    matched = logits.clone()
    matched[0, 0, answer_ids] = teacher[0].log() + 3.0
    only_label = distilled_loss_sum(matched, targets, teacher[:1].repeat(3, 1) * torch.tensor([[1.0], [math.nan], [1.0]]),
                                    Distillation(answer_ids, 1.0, 1.0))
    ce_matched = torch.nn.functional.cross_entropy(matched[0], targets[0], reduction="none")
    kl_last = (teacher[0] * (teacher[0].log() - torch.log_softmax(matched[0, 4, answer_ids], -1))).sum()
    assert torch.allclose(only_label, ce_matched[[1, 2, 3, 5]].sum() + kl_last)
    with pytest.raises(ValueError, match="2 answer positions for 3 teacher rows"):
        distilled_loss_sum(logits[:, :4], targets[:, :4], teacher, Distillation(answer_ids, w, t))


@pytest.mark.parametrize("temperature", [0.1, 0.25, 1.0])
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_distilled_loss_stays_finite_where_the_teacher_wrote_zero(temperature, weight):
    """A teacher probability written as 0.000000 and sharpened by a low temperature underflows to 0: the loss
    and its gradient stay finite (it was NaN at T <= 0.25, even at weight 0), and the zero adds nothing to
    the divergence, which is the one over the teacher's other answers."""
    from mcqa.training import Distillation, distilled_loss_sum

    answer_ids, end = [5, 6, 7, 8], 9
    targets = torch.tensor([[6, end]])
    logits = torch.randn(1, 2, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    loss = distilled_loss_sum(logits, targets, teacher, Distillation(answer_ids, weight, temperature))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    ce = torch.nn.functional.cross_entropy(logits[0].detach(), targets[0], reduction="none")
    kl = -torch.log_softmax(logits[0, 0, answer_ids].detach() / temperature, -1)[1]  # all mass on answer 2
    expected = ce[1] + (1 - weight) * ce[0] + weight * temperature ** 2 * kl
    assert torch.allclose(loss.detach(), expected, atol=1e-5)


@pytest.mark.parametrize("body, needle", [("0,1,0.1,0.2\n", "line 2: 4 fields for the header's 6"),
                                          ("0,1,0.1,0.2,0.3,x\n", "line 2: could not convert string to float"),
                                          ("", "")])
def test_a_damaged_probability_file_is_named_with_its_line(tmp_path, body, needle):
    """A teacher's (or a member's) probability file cut short or edited by hand: an error naming the file and
    line (it was an IndexError); a file with no rows at all is read as having none."""
    from mcqa.probabilities import ProbabilityFileError, read_probs

    path = tmp_path / "oof_probs.csv"
    path.write_text("record,label,p1,p2,p3,p4\n" + body)
    if not needle:
        assert read_probs(str(path)) == ("record", [], [], [])
        return
    with pytest.raises(ProbabilityFileError, match=f"oof_probs.csv, {needle}"):
        read_probs(str(path))


def test_the_collator_carries_each_examples_teacher_in_order():
    from mcqa.batching import AnswerOnlyCollator

    features = [{"input_ids": [1, 2, 3], "labels": [-100, -100, 3], "attention_mask": [1] * 3,
                 "teacher_probs": [0.4, 0.3, 0.2, 0.1]},
                {"input_ids": [1, 4], "labels": [-100, 4], "attention_mask": [1] * 2}]
    for packed in (True, False):
        batch = AnswerOnlyCollator(0, packed=packed)([features])
        assert batch["teacher_probs"][0].tolist() == pytest.approx([0.4, 0.3, 0.2, 0.1])
        assert batch["teacher_probs"][1].isnan().all()
    assert "teacher_probs" not in AnswerOnlyCollator(0, packed=True)([[features[1]]])


def test_teacher_settings_merge_key_by_key_and_reach_only_students(tmp_path):
    """`training: {distill: {weight: 0.9}}` holds for a run whose own distill names only its teacher (it used
    to train at the schema's 0.5), and a run without a teacher trains with the schema's teacher settings,
    so changing the weight reruns the students alone."""
    def settings_of(weight: float) -> dict[str, dict]:
        workdir = sample_workdir(tmp_path / str(weight), data={"folds": 2},
                                 training={"distill": {"weight": weight, "temperature": 3.0}},
                                 runs={"a": {}, "student": {"distill": {"teacher": "a"}}})
        trainings = commands_of(planned_commands(workdir), "train_lora.py")
        return {re.search(r"--out results/([^/]+)/", c)[1]: json.loads(shlex.split(c.split("--settings ")[1])[0])
                for c in trainings}

    first, second = settings_of(0.9), settings_of(0.7)
    assert first["student"]["distill"] == {"teacher": "a", "weight": 0.9, "temperature": 3.0}
    assert first["a"]["distill"] == {"teacher": None, "weight": 0.5, "temperature": 2.0}
    assert first["a"] == second["a"] and first["student"] != second["student"]


def test_a_student_of_a_cross_validated_teachers_pseudo_labels_is_marked_optimistic(tmp_path):
    """Its fold models train on test answers of a teacher whose fold models trained on their held-out
    questions; a baseline teacher trained on nothing."""
    workdir = sample_workdir(tmp_path, data={"folds": 2}, runs={
        "a": {}, "base": {"train": False}, "of_a": {"pseudo_labels": {"teacher": "a"}},
        "of_base": {"pseudo_labels": {"teacher": "base"}}})
    combines = commands_of(planned_commands(workdir), "combine_folds.py")
    marked = sorted(re.search(r"--oof results/([^/]+)/", c)[1] for c in combines if "--pseudo-labelled" in c)
    assert marked == ["of_a"] and len(combines) == 3


def test_distillation_learns_from_out_of_fold_probabilities_only(tmp_path):
    """A distilled student's fold models read the teacher's out-of-fold probabilities (an ensemble's are the
    weighted mean of its members'); its own figure says the teacher saw its held-out questions; a teacher
    without them is refused before any job runs."""
    workdir = sample_workdir(tmp_path / "cv", data={"folds": 2},
                             runs={"a": {}, "b": {"lora_r": 8}, "student": {"distill": {"teacher": "ensemble"}}})
    commands = planned_commands(workdir)
    students = [c for c in commands_of(commands, "train_lora.py") if "results/student/" in c]
    assert len(students) == 2 and all("--teacher-probs results/ensemble/val_probs.csv --teacher-records "
                                      "results/data/train.json" in c for c in students)
    assert all("--teacher-probs" not in c for c in commands_of(commands, "train_lora.py") if "results/student/" not in c)
    [evaluate] = [c for c in commands_of(commands, "ensemble_answers.py") if "--metrics-out" in c]
    assert "--val-probs-out results/ensemble/val_probs.csv" in evaluate and "student" not in evaluate
    assert [c for c in commands_of(commands, "combine_folds.py") if "--distilled" in c] == [
        c for c in commands_of(commands, "combine_folds.py") if "results/student/" in c]
    refused = {
        "no folds": ({}, {"student": {"distill": {"teacher": "a"}}, "a": {}}, "distillation needs the teacher's "
                     "probability of every training question from a model that did not train on it"),
        "baseline": ({"folds": 2}, {"student": {"distill": {"teacher": "base"}}, "base": {"train": False}},
                     "base trains no fold models (a baseline)"),
    }
    for name, (data, runs, needle) in refused.items():
        result = snakemake(sample_workdir(tmp_path / name.replace(" ", "_"), data=data, runs=runs), "-n", check=False)
        assert result.returncode != 0 and needle in result.stdout + result.stderr, name


def test_the_ensemble_writes_its_out_of_fold_probabilities(tmp_path):
    for name, p in (("a", "0.6,0.2,0.1,0.1"), ("b", "0.2,0.6,0.1,0.1")):
        (tmp_path / f"{name}.csv").write_text(f"record,label,p1,p2,p3,p4\n0,1,{p}\n1,2,{p}\n")
    result = run_script("ensemble_answers.py", "--members", "a", "b", "--val-probs", tmp_path / "a.csv",
                        tmp_path / "b.csv", "--metrics-out", tmp_path / "m.json", "--val-probs-out", tmp_path / "v.csv")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "v.csv").read_text().splitlines() == [
        "record,label,p1,p2,p3,p4", "0,1,0.400000,0.400000,0.100000,0.100000", "1,2,0.400000,0.400000,0.100000,0.100000"]


def test_the_data_report_and_the_experiments_table_show_what_each_run_trained_on(tmp_path):
    part = {"file": "c3.csv", "sheets_read": [], "sheets_left_out": [], "rows_read": 4, "rows_kept": 1,
            "rows_skipped": 1, "fixed": {}, "fixed_where": {}, "skipped": [], "name": "c3", "convert": "s2twp",
            "rows_converted": 3, "left_out": [{"row": 3, "reason": "its article is also in test.json"}],
            "left_out_by_reason": {"its article is also in test.json": 1},
            "lengths_chars": {"article": {"count": 1, "mean": 9.0, "median": 9, "p95": 9, "max": 9}}}
    reports = {"train": {**part, "file": "train.xlsx"}, "test": {**part, "file": "test.xlsx"}}
    for name in ("train", "test"):
        (tmp_path / f"{name}.json").write_text(json.dumps({k: v for k, v in reports[name].items()
                                                           if k not in ("name", "convert")}))
    (tmp_path / "c3.json").write_text(json.dumps(part))
    (tmp_path / "student").mkdir()
    (tmp_path / "student/pseudo_labels_report.json").write_text(json.dumps(
        {"teacher": "ensemble", "min_probability": 0.9, "test_questions": 10, "kept": 7,
         "answer_spread": {"1": 4, "2": 1, "3": 2, "4": 0}, "mean_teacher_probability": 0.95}))
    result = run_script("summarize_data.py", "--train", tmp_path / "train.json", "--test", tmp_path / "test.json",
                        "--extra", tmp_path / "c3.json", "--pseudo-labels", tmp_path / "student/pseudo_labels_report.json",
                        "--out", tmp_path / "report.json", "--html", tmp_path / "report.html")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["extra c3"]["rows_kept"] == 1 and report["pseudo-labels student"]["kept"] == 7
    page = (tmp_path / "report.html").read_text()
    for shown in ("rows converted (s2twp)</th><td>3", "left out: its article is also in test.json</th><td>1",
                  "kept as pseudo-labels</th><td>7", "(1, 2, 3, 4)</th><td>4, 1, 2, 0"):
        assert shown in page, shown

    manifest = {run: {"settings": {"lora_r": 8}, "train_logs": [], "metrics": None, "replica_of": None, "folds": 0,
                      "trained_on": trained_on} for run, trained_on in
                (("plain", ""), ("student", "training file + extra c3 + pseudo-labels of ensemble (p >= 0.9) + "
                                            "distilled from a"))}
    manifest["student"]["metrics"] = str(tmp_path / "metrics.json")
    manifest["student"]["pseudo_labels_report"] = str(tmp_path / "pseudo_labels_report.json")
    (tmp_path / "pseudo_labels_report.json").write_text(json.dumps({"kept": 0}))  # none sure enough
    manifest["plain"]["metrics"] = str(tmp_path / "metrics_plain.json")
    from mcqa.metrics import CHOSEN, metrics
    for path, extra in (("metrics.json", {"teacher_saw_these_questions": CHOSEN["teacher"]}), ("metrics_plain.json", {})):
        (tmp_path / path).write_text(json.dumps({**metrics([[0.7, 0.1, 0.1, 0.1]] * 4, [1, 1, 2, 1]), **extra}))
    result = run_script("summarize_experiments.py", "--manifest", json.dumps(manifest), "--tsv", tmp_path / "e.tsv",
                        "--html", tmp_path / "e.html", "--png", tmp_path / "e.png")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "e.tsv", sep="\t", keep_default_na=False)
    assert dict(zip(table["run"], table["trained on"])) == {
        "plain": "", "student": "training file + extra c3 + pseudo-labels of ensemble (p >= 0.9): none kept + "
                                "distilled from a"}
    assert dict(zip(table["run"], table["chosen on these questions"])) == {"plain": "", "student": "teacher"}
    page = (tmp_path / "e.html").read_text()
    assert "a distilled run learnt from a teacher" in page
    assert "a distilled run&#x27;s includes its weighted divergence from the teacher" in page

