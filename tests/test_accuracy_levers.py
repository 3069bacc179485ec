"""Rotation scoring, honest validation metrics and ensembles of runs."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import read_csv, run_script, sample_workdir, snakemake
from transformers import AutoModelForCausalLM

from mcqa.metrics import CHOSEN, metrics, paired_difference, wilson_interval
from mcqa.modeling import load_tokenizer
from mcqa.prompt import answer_token_ids, build_input, rotate_input
from mcqa.records import read_records
from mcqa.scoring import combine_rotations, score_rotations


def test_rotated_input_moves_only_the_options():
    options = ["臺北", "臺中", "高雄", "2013"]
    text = build_input("文章。", "問題？", options)
    assert rotate_input(text, options, 1) == build_input("文章。", "問題？", ["臺中", "高雄", "2013", "臺北"])
    assert rotate_input(text, options, 0) == text


def test_rotation_scores_map_back_to_the_original_options():
    """Option i is scored at position (i - k) % 4 under shift k; a position bias cancels exactly."""
    truth = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    bias = torch.tensor([3.0, 0.0, -1.0, 0.5])
    shifted = {k: truth[:, [(j + k) % 4 for j in range(4)]] + bias for k in range(4)}
    torch.testing.assert_close(combine_rotations(shifted), truth.log_softmax(dim=-1))


class BiasedHead(torch.nn.Module):
    """The output layer plus a constant added to one token's logit, as a model with a label prior has."""

    def __init__(self, head, token_id: int, bias: float):
        super().__init__()
        self.head, self.token_id, self.bias = head, token_id, bias
        self.weight = head.weight

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.token_id] += self.bias
        return logits


def test_rotations_undo_a_bias_toward_answer_1(demo_run):
    model_dir = demo_run / "results/default/merged"
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = read_records(demo_run / "results/data/test.json", "test")
    truth = {r["ID"]: int(r["Answer"]) for r in read_csv(demo_run / "data/test_answers.csv")}
    labels = torch.tensor([truth[r["id"]] for r in records])

    def answers(rotations):
        log_probs, _ = score_rotations(model, tokenizer, records, 256, 2048, rotations)
        return log_probs.argmax(dim=-1) + 1

    plain = {n: (answers(n) == labels).float().mean().item() for n in (1, 4)}
    assert plain[1] >= 0.8 and plain[4] >= plain[1], plain
    model.lm_head = BiasedHead(model.lm_head, answer_token_ids(tokenizer)[0], bias=15.0)
    biased_1 = answers(1)
    assert (biased_1 == 1).float().mean() >= 0.9, "the bias must dominate without rotations"
    assert (answers(4) == labels).float().mean().item() >= plain[1] - 0.05


def test_paired_difference_by_hand():
    """Two runs on the same four questions: d = (0, 1, 0, 0), mean 0.25, sample variance 0.25, so the
    interval is 0.25 +- 1.96 * sqrt(0.25 / 4) = 0.25 +- 0.49. With two seed replicas (1,1,0,0) and
    (1,0,0,1), the per-question means (1, .5, 0, .5) give d = (0, .5, 0, .5): variance 1/12 over 4, plus
    the replicas' accuracies (0.5, 0.5) that differ by nothing."""
    one = paired_difference([[1, 1, 0, 0]], [[1, 0, 0, 0]])
    assert one["difference"] == 0.25 and one["seeds"] == [1, 1]
    assert one["ci95"] == pytest.approx([0.25 - 0.49, 0.25 + 0.49])
    two = paired_difference([[1, 1, 0, 0], [1, 0, 0, 1]], [[1, 0, 0, 0]])
    half = 1.96 * (1 / 12 / 4) ** 0.5
    assert two["difference"] == 0.25 and two["ci95"] == pytest.approx([0.25 - half, 0.25 + half])
    # Replicas that disagree (accuracies 0.75 and 0.25) add their spread, a variance of 0.125 over 2
    # replicas = 0.0625, to the questions' part (d = (0, .5, .5, 0): variance 1/12 over 4).
    spread = paired_difference([[1, 1, 1, 0], [1, 0, 0, 0]], [[1, 0, 0, 0]])
    questions = (sum((d - 0.25) ** 2 for d in (0, 0.5, 0.5, 0)) / 3) / 4
    assert spread["ci95"] == pytest.approx([0.25 - 1.96 * (questions + 0.0625) ** 0.5,
                                            0.25 + 1.96 * (questions + 0.0625) ** 0.5])
    with pytest.raises(ValueError, match="same questions"):
        paired_difference([[1, 0]], [[1, 0, 1]])


def test_wilson_interval_and_metrics_by_hand():
    assert wilson_interval(8, 10) == [0.4902, 0.9433]
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    probs = [[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.4, 0.1]]
    result = metrics(probs, [1, 2, 4, 3])
    assert result["accuracy"] == 0.75
    assert result["predicted_counts"] == {"1": 2, "2": 0, "3": 1, "4": 1}
    assert result["recall"] == {"1": 1.0, "2": 0.0, "3": 1.0, "4": 1.0}
    assert result["log_loss"] == pytest.approx(-(torch.tensor([0.7, 0.2, 0.6, 0.4]).log().mean().item()))


def test_evaluation_writes_validation_probabilities(demo_run):
    rows = read_csv(demo_run / "results/default/val_probs.csv")
    val = read_records(demo_run / "results/data/val.json", "labelled")
    assert [int(r["record"]) for r in rows] == list(range(len(val)))
    assert [int(r["label"]) for r in rows] == [r["label"] for r in val]
    assert all(abs(sum(float(r[f"p{a}"]) for a in "1234") - 1) < 1e-4 for r in rows)
    result = json.loads((demo_run / "results/default/metrics.json").read_text())
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high and result["rotations"] == 4
    assert sum(result["predicted_counts"].values()) == len(val)


def write_probs(path, key, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([key, *(["label"] if key == "record" else []), "p1", "p2", "p3", "p4"])
        writer.writerows(rows)
    return path


def ensemble(tmp_path, *extra):
    return run_script("ensemble_answers.py", "--answers", tmp_path / "answers.csv", "--probs",
                      tmp_path / "probs.csv", *extra)


def test_ensemble_is_the_mean_of_its_members(tmp_path):
    a = write_probs(tmp_path / "a.csv", "ID", [["q1", 0.7, 0.1, 0.1, 0.1], ["q2", 0.1, 0.5, 0.3, 0.1]])
    b = write_probs(tmp_path / "b.csv", "ID", [["q1", 0.1, 0.8, 0.05, 0.05], ["q2", 0.1, 0.1, 0.7, 0.1]])
    va = write_probs(tmp_path / "va.csv", "record", [[0, 1, 0.6, 0.2, 0.1, 0.1], [1, 3, 0.3, 0.3, 0.2, 0.2]])
    vb = write_probs(tmp_path / "vb.csv", "record", [[0, 1, 0.2, 0.5, 0.2, 0.1], [1, 3, 0.1, 0.1, 0.7, 0.1]])
    result = ensemble(tmp_path, "--members", "a", "b", "--test-probs", a, b, "--val-probs", va, vb,
                      "--metrics-out", tmp_path / "metrics.json")
    assert result.returncode == 0, result.stderr
    assert read_csv(tmp_path / "answers.csv") == [{"ID": "q1", "Answer": "2"}, {"ID": "q2", "Answer": "3"}]
    assert [float(p) for p in read_csv(tmp_path / "probs.csv")[0].values() if p != "q1"] == [0.4, 0.45, 0.075, 0.075]
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["accuracy"] == 1.0  # means (0.4, 0.35, ...) and (0.2, 0.2, 0.45, 0.15)
    assert result["log_loss"] == pytest.approx(-(torch.tensor([0.4, 0.45]).log().mean().item()))


def test_ensemble_refuses_members_of_other_questions(tmp_path):
    a = write_probs(tmp_path / "a.csv", "ID", [["q1", 0.7, 0.1, 0.1, 0.1], ["q2", 0.1, 0.5, 0.3, 0.1]])
    b = write_probs(tmp_path / "b.csv", "ID", [["q2", 0.1, 0.5, 0.3, 0.1], ["q1", 0.7, 0.1, 0.1, 0.1]])
    result = ensemble(tmp_path, "--members", "a", "b", "--test-probs", a, b)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{b} does not cover the same questions in the same order as {a}" in result.stderr
    assert "first difference at row 1" in result.stderr
    assert not (tmp_path / "answers.csv").exists()


def test_ensemble_weights_by_accuracy_need_a_validation_split(tmp_path):
    workdir = sample_workdir(tmp_path, data={"val_fraction": 0}, runs={"a": {}, "b": {"lora_r": 8}},
                             ensemble={"weights": "val_accuracy"})
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert "ensemble.weights: val_accuracy needs validation accuracies" in result.stdout + result.stderr


def test_best_checkpoint_on_validation_accuracy_is_the_one_kept(tmp_path):
    """A learning rate that warms up far too high makes late steps worse: the saved adapter is the
    best step's, and evaluate_answers scores it exactly as training did."""
    workdir = sample_workdir(tmp_path, answering={"rotations": 1}, training={
        "select_best": True, "eval_steps": 12, "logging_steps": 12, "learning_rate": 0.01, "warmup_ratio": 0.9,
        "lr_scheduler": "linear", "epochs": 10})
    snakemake(workdir, "results/default/metrics.json")
    log = [json.loads(line) for line in (workdir / "results/default/train_log.jsonl").read_text().splitlines()]
    accuracies = {e["step"]: e["val_accuracy"] for e in log if "val_accuracy" in e}
    (best,) = [e for e in log if "best_step" in e]
    assert best["best_step"] == max(accuracies, key=accuracies.get) < max(accuracies)
    assert best["best_val_accuracy"] == max(accuracies.values()) > accuracies[max(accuracies)] + 0.2, accuracies
    result = json.loads((workdir / "results/default/metrics.json").read_text())
    assert result["accuracy"] == best["best_val_accuracy"]
    assert result["chosen_on_these_questions"] == CHOSEN["step"], "an accuracy picked on these questions says so"
    assert f"at step {best['best_step']} of" in (workdir / "logs/default/train_lora.log").read_text()


def test_select_best_without_validation_fails_at_config_time(tmp_path):
    workdir = sample_workdir(tmp_path, data={"val_fraction": 0}, runs={"best": {"select_best": True}})
    result = snakemake(workdir, "-n", check=False)
    assert result.returncode != 0
    assert "runs.best: select_best picks the adapter by validation accuracy, but data.val_fraction is 0" in (
        result.stdout + result.stderr)


def test_lora_variants_and_revision_reach_training(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")
    workdir = sample_workdir(tmp_path / "work", base_model=str(base), base_model_revision="v1.0",
                             runs={"dora": {"use_dora": True, "use_rslora": True}})
    output = snakemake(workdir, "-n", "-p").stdout
    command = next(line for line in output.splitlines() if "train_lora.py --train" in line)
    assert '"use_dora": true' in command and '"use_rslora": true' in command and "--revision v1.0" in command


@torch.inference_mode()
def full_passes(model, prompts: list[list[int]], answer_ids) -> torch.Tensor:
    """The answers' log-probabilities after each prompt, one unpadded, unpacked forward pass a prompt."""
    return torch.stack([torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)[list(answer_ids)]
                        for ids in prompts])


@pytest.mark.parametrize("batch_tokens", [64, 700, 100_000])
@pytest.mark.parametrize("by_article", [False, True])
def test_packed_scoring_equals_full_passes(demo_run, batch_tokens, by_article):
    """Prompts packed end to end into rows (one group a row at 64 tokens, all in one at 100,000), with
    position ids restarting per prompt, and the questions of an article sharing its tokens: the scores of
    one full pass per prompt."""
    from mcqa.prompt import split_input
    from mcqa.scoring import encode_all, shared_prefix_log_probs

    model_dir = demo_run / "results/default/merged"
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = read_records(demo_run / "results/data/val.json", "labelled")
    prompts = [p.ids for p in encode_all(tokenizer, records, 256)]
    articles = [split_input(r["input"])[0] for r in records]
    assert len(set(articles)) < len(articles), "the sample has articles with several questions"
    answers = answer_token_ids(tokenizer)
    scores = shared_prefix_log_probs(model, {0: prompts}, answers, batch_tokens, articles if by_article else None)
    torch.testing.assert_close(scores[0], full_passes(model, prompts, answers), rtol=0, atol=2e-4)


def test_rotations_compute_the_shared_prefix_once_with_the_same_scores(demo_run):
    """The article and question, shared by the four orders, run once (their keys and values kept): the
    same log-probabilities as scoring each order's full prompts."""
    from mcqa.scoring import encode_all, shared_prefix, shared_prefix_log_probs

    model_dir = demo_run / "results/default/merged"
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = read_records(demo_run / "results/data/test.json", "test")
    prompts = {k: [p.ids for p in encode_all(tokenizer, records, 256, k)] for k in range(4)}
    shared = sum(shared_prefix([prompts[k][i] for k in range(4)]) for i in range(len(records)))
    assert shared > 0.5 * sum(map(len, prompts[0])), "most of a prompt is shared by its four orders"
    cached = shared_prefix_log_probs(model, prompts, answer_token_ids(tokenizer), batch_tokens=700)
    for k in range(4):
        torch.testing.assert_close(cached[k], full_passes(model, prompts[k], answer_token_ids(tokenizer)), rtol=0,
                                   atol=2e-4)


def test_early_stopping_stops_after_patience_evaluations_without_improvement(demo_run, tmp_path, monkeypatch, capsys):
    """Validation accuracy 0.36, 0.11, ... at patience 1: training stops at the second evaluation, says so,
    and keeps the first (it used to run every step: the accuracy reached the callbacks too late)."""
    import train_lora
    from conftest import training_defaults

    scripted = iter([0.36, 0.11, 0.47, 0.50, 0.52, 0.61, 0.7, 0.8, 0.9])
    monkeypatch.setattr(train_lora, "answer_accuracy", lambda *args, **kwargs: lambda model: next(scripted))
    settings = {**training_defaults(), "micro_batch_size": 8, "max_seq_length": 256, "learning_rate": 0.002,
                "epochs": 1, "select_best": True, "early_stopping_patience": 1, "eval_steps": 2, "logging_steps": 2}
    data = demo_run / "results/data"
    assert train_lora.main([
        "--train", str(data / "train.json"), "--val", str(data / "val.json"),
        "--base-model", str(demo_run / "resources/models/demo"), "--out", str(tmp_path / "adapter"),
        "--log-jsonl", str(tmp_path / "train_log.jsonl"), "--checkpoint-dir", str(tmp_path / "checkpoints"),
        "--settings", json.dumps(settings), "--rotations", "1"]) == 0
    history = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["val_accuracy"] for e in history if "val_accuracy" in e] == [0.36, 0.11]
    assert max(e["step"] for e in history) == 4 < 144 // 8
    assert history[-1]["best_step"] == 2 and history[-1]["best_val_accuracy"] == 0.36
    assert "early stopping at step 4: validation accuracy has not improved for 1 evaluation(s)" in capsys.readouterr().err


def test_questions_too_long_for_max_seq_length_are_scored_in_every_order_and_named(demo_run, tmp_path):
    """max_seq_length below instruction + question + options: the four orders share no prefix any more
    (each lost its own first tokens). Scoring must not crash, must equal full passes, and the log names the
    questions whose question or options were cut."""
    from mcqa.prompt import QUESTION_CUT
    from mcqa.scoring import encode_all, shared_prefix_log_probs

    model_dir = demo_run / "results/default/merged"
    tokenizer = load_tokenizer(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    records = read_records(demo_run / "results/data/test.json", "test")[:6]
    prompts = {k: encode_all(tokenizer, records, 40, k) for k in range(4)}
    assert all(p.cut == QUESTION_CUT for p in prompts[0])
    ids = {k: [p.ids for p in encoded] for k, encoded in prompts.items()}
    cached = shared_prefix_log_probs(model, ids, answer_token_ids(tokenizer), batch_tokens=100)
    for k in range(4):
        torch.testing.assert_close(cached[k], full_passes(model, ids[k], answer_token_ids(tokenizer)), rtol=0, atol=2e-4)
    (tmp_path / "test.json").write_text(json.dumps(records, ensure_ascii=False))
    result = run_script("score_questions.py", "--model", model_dir, "--test", tmp_path / "test.json", "--answers",
                        tmp_path / "answers.csv", "--answer-probs", tmp_path / "probs.csv", "--max-seq-length", "42",
                        "--settings", json.dumps({"batch_tokens": 100, "precision": "fp32", "load_in": "none",
                                                  "rotations": 4, "prompt_format": "plain", "fused_kernels": True}))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNING 6 of them did not fit even without their article" in result.stderr
    assert ", ".join(r["id"] for r in records) in result.stderr
    assert len(read_csv(tmp_path / "answers.csv")) == 6


def test_ensemble_weights_by_accuracy_refuse_all_zero_and_name_a_zero_member(tmp_path):
    a = write_probs(tmp_path / "a.csv", "ID", [["q1", 0.7, 0.1, 0.1, 0.1]])
    b = write_probs(tmp_path / "b.csv", "ID", [["q1", 0.1, 0.8, 0.05, 0.05]])

    def weighted(label_a, label_b):
        """Validation on one question: a member is right (accuracy 1) when its label is its top answer."""
        va = write_probs(tmp_path / "va.csv", "record", [[0, label_a, 0.6, 0.2, 0.1, 0.1]])
        vb = write_probs(tmp_path / "vb.csv", "record", [[0, label_b, 0.2, 0.5, 0.2, 0.1]])
        return ensemble(tmp_path, "--members", "a", "b", "--weights", "val_accuracy", "--test-probs", a, b,
                        "--val-probs", va, vb, "--metrics-out", tmp_path / "metrics.json")

    result = weighted(3, 3)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "every member (a, b) has validation accuracy 0" in result.stderr and "ensemble.weights: equal" in result.stderr
    result = weighted(2, 2)  # a answers 1 (wrong), b answers 2 (right)
    assert result.returncode == 0 and "WARNING member a gets no weight (validation accuracy 0)" in result.stderr
    assert read_csv(tmp_path / "answers.csv") == [{"ID": "q1", "Answer": "2"}]
    assert json.loads((tmp_path / "metrics.json").read_text())["chosen_on_these_questions"] == CHOSEN["weights"]


def test_experiments_table_says_which_accuracies_were_chosen_on_their_own_questions(tmp_path):
    """select_best's best of 10 evaluations on 3 questions can read 1.0: ranked beside runs that chose
    nothing, the table and the figure must say so; the settings that differ read as in a config."""
    manifest = {}
    for run, chosen in (("plain", None), ("best", CHOSEN["step"])):
        (tmp_path / f"{run}.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0, "elapsed_s": 5.0,
                                                           "tokens_seen": 100}) + "\n")
        result = {**metrics([[0.7, 0.1, 0.1, 0.1]] * 3, [1, 1, 2]), **({"chosen_on_these_questions": chosen}
                                                                       if chosen else {})}
        (tmp_path / f"{run}.json").write_text(json.dumps(result))
        manifest[run] = {"settings": {"select_best": bool(chosen), "fp8": "rowwise" if chosen else "none"},
                         "train_logs": [str(tmp_path / f"{run}.jsonl")],
                         "metrics": str(tmp_path / f"{run}.json"), "replica_of": None, "folds": 0}
    out = run_script("summarize_experiments.py", "--manifest", json.dumps(manifest), "--tsv", tmp_path / "t.tsv",
                     "--html", tmp_path / "t.html", "--png", tmp_path / "t.png")
    assert out.returncode == 0, out.stderr
    rows = {r["run"]: r for r in csv.DictReader(open(tmp_path / "t.tsv", encoding="utf-8"), delimiter="\t")}
    assert rows["best"]["chosen on these questions"] == "step" and rows["plain"]["chosen on these questions"] == ""
    assert "so its accuracy is optimistic" in (tmp_path / "t.html").read_text()
    # the settings that differ, as a config writes them: a string plain, not quoted JSON inside the TSV's quotes
    assert (rows["best"]["fp8"], rows["best"]["select_best"]) == ("rowwise", "true"), rows["best"]


@pytest.mark.parametrize("batch_tokens", [90, 100_000])
def test_packed_rotation_scoring_with_grouped_query_attention(batch_tokens):
    """Two key-value heads for four query heads (Llama-3, Qwen2.5, Breeze): the shared prefixes' keys and
    values serve every order's tokens exactly as in full passes, also for prompts that share nothing, and
    in one row where only some sequences continue a prefix (100,000 tokens: all groups together, among
    them an article of one question, whose orders share nothing after it, and whose keys come first)."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from mcqa.scoring import shared_prefix_log_probs

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    rng = random.Random(0)
    prompts, articles = {k: [] for k in range(4)}, []
    # one to three questions an article; the first article has no tokens of its own
    for article in (0, 0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 4):
        rng_article = random.Random(article)
        length = {0: 0, 1: 60}.get(article, rng_article.randrange(3, 30))  # the article of one question longest
        shared = [rng_article.randrange(5, 50) for _ in range(length)]
        shared += [rng.randrange(5, 50) for _ in range(rng.randrange(0, 12))]
        articles.append(article)
        for k in range(4):
            prompts[k].append(shared + [rng.randrange(5, 50) for _ in range(rng.randrange(1, 9))])
    answers = (1, 2, 3, 4)
    for groups in (None, articles):
        cached = shared_prefix_log_probs(model, prompts, answers, batch_tokens, groups=groups)
        for k in range(4):
            torch.testing.assert_close(cached[k], full_passes(model, prompts[k], answers), rtol=0, atol=2e-5)


def test_fused_kernels_apply_only_where_they_can_and_say_why_not(monkeypatch):
    """Liger's kernels need a CUDA GPU, half precision, unquantised weights, the package and an architecture
    it covers; the log line names what is missing. (The kernels themselves are checked against fp32 on a
    GPU: benchmarks/scoring_check.py.)"""
    import sys
    import types

    from transformers import LlamaConfig, LlamaForCausalLM

    from mcqa.modeling import LIGER, fuse_kernels

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fuse_kernels(model) == "off: no CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fuse_kernels(model) == "off: the model is in torch.float32, not bf16 or fp16"
    model.to(torch.bfloat16)
    model.hf_quantizer = object()  # as transformers marks a model loaded in 8 or 4 bits
    assert fuse_kernels(model) == "off: an 8-bit or 4-bit model"
    del model.hf_quantizer
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed
    assert fuse_kernels(model) == f"off: liger-kernel is not installed (pip install {LIGER}, as `make run GPU=1` does)"

    calls = []
    package, transformers_part, monkey_patch = (types.ModuleType(name) for name in (
        "liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch"))
    transformers_part._apply_liger_kernel_to_instance = lambda model, **kwargs: calls.append((model, kwargs))
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": None, "qwen2": None}
    for module in (package, transformers_part, monkey_patch):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    assert fuse_kernels(model) == "Liger's fused RMSNorm, RoPE and SwiGLU (llama)"
    assert calls == [(model, {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                              "fused_linear_cross_entropy": False})]
    model.config.model_type = "gpt_neox"
    assert fuse_kernels(model) == "off: Liger has no kernels for gpt_neox models"
    assert len(calls) == 1

