"""The experiments table and the Snakemake report, read as a user sees them: rendered in headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TWO_RUNS, snakemake

PROBE = (Path(__file__).parent / "report" / "probe.html").read_text()
CHROMIUM = shutil.which("chromium")


def test_experiments_table_has_a_row_per_run_and_the_ensemble(two_runs):
    workdir, _ = two_runs
    with open(workdir / "results/experiments.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted(r["run"] for r in rows) == sorted([*TWO_RUNS, "ensemble"])
    accuracies = [float(r["val accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    assert "lora_r" in rows[0] and "lora_alpha" not in rows[0], "only the settings that differ between runs"
    for row in rows:
        metrics = json.loads((workdir / f"results/{row['run']}/metrics.json").read_text())
        assert float(row["val accuracy"]) == round(metrics["accuracy"], 4)
        low, high = metrics["accuracy_ci95"]
        assert row["95% interval"] == f"{low:.3f}-{high:.3f}"
    assert all(float(r["tokens/s"]) > 0 for r in rows if r["run"] != "ensemble")
    assert (workdir / "results/experiments.png").read_bytes()[:4] == b"\x89PNG"
    for member in (*TWO_RUNS, "ensemble"):
        assert (workdir / f"results/{member}/confusion.png").read_bytes()[:4] == b"\x89PNG"


def rendered(report, paths: list[list[str]]) -> dict[str, str]:
    """What the report shows after following each path of clicks (see tests/report/probe.html); the front
    page under "front page". Fails on a docutils system message anywhere in the report (a caption or the
    front page that does not render as written)."""
    source = report.read_text(encoding="utf-8")
    assert "System Message" not in source, source[source.find("System Message") - 600:][:1200]
    paths = [[], *paths]
    probe = report.parent / "probe.html"
    probe.write_text(PROBE.replace("__PATHS__", json.dumps(paths)).replace("__REPORT__", report.name))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                          "--virtual-time-budget=30000", "--dump-dom", str(probe)],
                         capture_output=True, text=True, timeout=180).stdout
    found = re.search(r'<pre id="out">(.*?)</pre>', dom, re.S)
    assert found and found[1], dom[-2000:]
    shown = json.loads(html.unescape(found[1]))
    shown["front page"] = shown.pop("")
    return shown


@pytest.mark.skipif(not CHROMIUM, reason="no chromium (Debian's chromium package; .ci/run installs it)")
def test_report_shows_every_run_figure_and_table_and_reruns_nothing(two_runs, tmp_path):
    workdir, _ = two_runs
    report = tmp_path / "report.html"
    snakemake(workdir, "--report", str(report))
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout, "building the report made something stale"
    shown = rendered(report, [
        ["Validation", "all runs", "show:experiments table"],
        ["Validation", "all runs", "show:accuracy with 95% intervals"],
        ["Validation", "confusion matrices"],
        ["Validation", "metrics"],
        ["Training"],
        ["Data", "show:rows read, kept, fixed, skipped"],
        ["Answers"],
    ])
    assert not [path for path, text in shown.items() if text.startswith("ERROR")], shown
    front = " ".join(shown["front page"].split())
    assert "with 0.2 held out for validation" in front and "Runs trained: default, r8." in front
    assert "Baselines, the base scored as it is without training: none." in front
    assert "the mean of the members' probabilities, equal weights" in front
    table = shown["Validation > all runs > show:experiments table"]
    assert "Experiments, best validation accuracy first" in table and "95% interval" in table
    for run in (*TWO_RUNS, "ensemble"):
        assert re.search(rf"^\s*{run}\s*$", table, re.M), f"{run} missing from the experiments table"
        assert re.search(rf"^{run}\tconfusion matrix", shown["Validation > confusion matrices"], re.M)
        assert re.search(rf"^{run}\tanswers.csv", shown["Answers"], re.M)
    for run in TWO_RUNS:
        assert re.search(rf"^{run}\ttraining curve", shown["Training"], re.M)
        assert re.search(rf"^{run}\tmetrics.json", shown["Validation > metrics"], re.M)
    figure = shown["Validation > all runs > show:accuracy with 95% intervals"]
    assert re.search(r"IMAGES .*\b770x\d+", figure), figure[-300:]  # the accuracy plot, drawn
    assert "rows read" in shown["Data > show:rows read, kept, fixed, skipped"]


@pytest.mark.skipif(not CHROMIUM, reason="no chromium (Debian's chromium package; .ci/run installs it)")
def test_report_of_a_cross_validated_workflow_shows_folds_seeds_and_the_baseline(cross_validated, tmp_path):
    report = tmp_path / "report.html"
    snakemake(cross_validated, "--report", str(report))
    shown = rendered(report, [["Validation", "all runs", "show:experiments table"], ["Answers"], ["Training"]])
    assert not [path for path, text in shown.items() if text.startswith("ERROR")], shown
    front = " ".join(shown["front page"].split())
    assert "Cross-validated in 2 folds by article" in front and "held out for validation" not in front
    assert "Runs trained: a, b." in front and "Baselines, the base scored as it is without training: base." in front
    assert "greedy forward selection on out-of-fold accuracy" in front and "equal weights" not in front
    assert "Extra sources, only ever trained on" in front and "c3 (data/c3.csv, converted: s2twp)" in front
    assert "b also trains on the test questions that base answers confidently (pseudo-labels)" in front
    assert "b learns a's out-of-fold probabilities (distillation" in front
    assert "Its members: every trained run" in front and "baselines are references, not members" in front
    table = shown["Validation > all runs > show:experiments table"]
    assert "b (mean of 1 seeds)" in table and "baseline (no training)" in table and "2 (sd " in table
    weights = json.loads((cross_validated / "results/ensemble/metrics.json").read_text())["members"]
    assert f"ensemble (greedy, weight = times picked): a {weights['a']:.3g}" in table
    assert re.search(r"^a/refit\tanswers.csv", shown["Answers"], re.M) and re.search(r"^base\tanswers.csv",
                                                                                      shown["Answers"], re.M)
    assert not re.search(r"^\S+/fold\d\tanswers.csv", shown["Answers"], re.M), "fold models' answers are no submission"
    assert re.search(r"^a/fold1\ttraining curve", shown["Training"], re.M)


def test_front_page_shows_config_text_as_text_not_markup():
    """File names and the base are config text: reStructuredText markup in them (a link to javascript:, a
    role, emphasis) must reach the report's front page as the characters typed."""
    import types

    import docutils.core
    import jinja2
    import yaml

    from conftest import REPO

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(base_model="org/x** `click <javascript:alert(1)>`_ **", prompt_format="plain",
                  answering={"rotations": 4}, runs={"a_`b <javascript:alert(1)>`_": {}, "base": {"train": False}},
                  training={"train": True}, ensemble={"activate": True, "weights": "equal", "method": "mean_probability"})
    config["data"].update(train="data/`see <javascript:alert(1)>`_.xlsx", test="data/|sub| :math:`x` [1]_.xlsx",
                          split_by="article", val_fraction=0.2, folds=0)
    rst = jinja2.Template((REPO / "workflow/report/workflow.rst").read_text()).render(
        snakemake=types.SimpleNamespace(config=config))
    page = docutils.core.publish_parts(rst, writer="html", settings_overrides={"report_level": 5})["body"]
    assert "<a " not in page and "href" not in page
    assert html.escape("data/`see <javascript:alert(1)>`_.xlsx", quote=False) in page
    assert html.escape("data/|sub| :math:`x` [1]_.xlsx", quote=False) in page
    assert html.escape("org/x** `click <javascript:alert(1)>`_ **", quote=False) in page
    assert html.escape("a_`b <javascript:alert(1)>`_", quote=False) in page
