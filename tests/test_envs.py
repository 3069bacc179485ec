"""Deployment files agree: conda envs, pip requirements, rules, lint."""

from __future__ import annotations

import re
import subprocess

import yaml
from conftest import BIN, REPO, env


def requirement_pins() -> dict[str, str]:
    pins = {}
    for path in REPO.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip()):
                pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def env_pins(path) -> dict[str, str]:
    spec = yaml.safe_load(path.read_text())
    assert spec["channels"] == ["conda-forge", "nodefaults"], path
    pins = {}
    for dep in spec["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        for entry in entries:
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==?([^\s=]+)", entry):
                pins[match[1].lower().replace("_", "-")] = match[2]
            else:
                assert entry == "pip", f"{path.name}: {entry!r} is not pinned"
    return pins


def test_every_env_pin_matches_the_pip_requirements():
    required = requirement_pins()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert {p.stem for p in envs} == {"data", "train", "merge", "answer"}
    for path in envs:
        for name, version in env_pins(path).items():
            if name == "python":
                continue
            assert required.get(name) == version, f"{path.name} pins {name} {version}, requirements say {required.get(name)}"


def test_every_rule_has_a_conda_env_and_a_log():
    rules = "".join(p.read_text() for p in (REPO / "rules").glob("*.smk"))
    blocks = re.split(r"^rule ", rules, flags=re.M)[1:]
    assert len(blocks) >= 9
    for block in blocks:
        name = block.split(":")[0]
        assert "\n    conda:" in block and "\n    log:" in block, name
        assert re.fullmatch(r"[a-z]+(_[a-z]+)+", name), name


def test_lint_is_clean():
    result = subprocess.run([str(BIN / "snakemake"), "--lint"], cwd=REPO, capture_output=True, text=True, env=env())
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr, result.stdout


def test_every_file_the_docs_cite_is_committed():
    """BENCHMARKS.md and the README cite result files and repository paths; each must be in git
    (benchmarks/results/ was once git-ignored, and every cited result was lost)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    names = {path.rsplit("/", 1)[-1] for path in tracked}
    folders = {path.rsplit("/", 1)[0] for path in tracked if "/" in path}
    missing = []
    for doc in ("BENCHMARKS.md", "README.md"):
        text = (REPO / doc).read_text()
        for cited in set(re.findall(r"\b(\d{4}-\d{2}-\d{2}_[\w.-]+\.(?:jsonl|json|log|tsv|png))\b", text)):
            if cited not in names:
                missing.append(f"{doc}: {cited}")
        for path in set(re.findall(r"`((?:benchmarks|resources|workflow|rules|profiles|tests|envs)/[\w./-]+)`", text)):
            path = path.rstrip("/")
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0  # an output
            if "NAME" not in path and not ignored and path not in tracked and path not in folders:
                missing.append(f"{doc}: {path}")
    assert not missing, missing


def test_the_fused_kernels_hint_names_the_pinned_liger():
    from mcqa.modeling import LIGER

    name, version = LIGER.split("==")
    assert requirement_pins()[name] == version
    assert env_pins(REPO / "envs/answer.yaml")[name] == version
