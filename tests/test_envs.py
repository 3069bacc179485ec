"""Deployment files agree: conda envs, pip requirements, rules, lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import yaml
import pytest
from conftest import BIN, REPO, env, snakemake


def requirement_pins() -> dict[str, str]:
    pins = {}
    for path in REPO.glob("requirements*.txt"):
        for line in path.read_text().splitlines():
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip()):
                pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


# conda-forge's name -> the PyPI package of the same code
CONDA_TO_PIP = {"matplotlib-base": "matplotlib"}


def env_pins(path) -> dict[str, str]:
    """PyPI name -> version of everything an env file lists (conda packages under their PyPI names)."""
    spec = yaml.safe_load(path.read_text())
    assert spec["channels"] == ["conda-forge", "nodefaults"], path
    pins = {}
    for dep in spec["dependencies"]:
        entries = dep["pip"] if isinstance(dep, dict) else [dep]
        for entry in entries:
            if match := re.fullmatch(r"([A-Za-z0-9_.-]+)==?([^\s=]+)", entry):
                name = match[1].lower().replace("_", "-")
                pins[CONDA_TO_PIP.get(name, name)] = match[2]
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


@pytest.fixture(scope="module")
def built_once() -> None:
    """A fixture built once per module, as the workflow fixtures are once per session."""


def test_tests_that_share_a_fixture_run_on_one_worker(built_once, request):
    """`make test` groups the tests that share such a fixture (conftest.py) for pytest-xdist's loadgroup,
    which sends a group to one worker only where pytest keeps the group in the test's id: pytest 9.2 drops
    it (pytest-dev/pytest-xdist#1386), and every worker then runs every workflow fixture again."""
    if not request.config.getoption("loadgroup", False):
        pytest.skip("the tests run without pytest-xdist's loadgroup (make test runs them with it)")
    assert request.node.nodeid.endswith("@built_once"), request.node.nodeid


def test_every_file_the_docs_cite_is_committed():
    """The documents cite result files and repository paths; each must be in git
    (benchmarks/results/ was once git-ignored, and every cited result was lost)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    names = {path.rsplit("/", 1)[-1] for path in tracked}
    folders = {path.rsplit("/", 1)[0] for path in tracked if "/" in path}
    missing = []
    for doc in ("BENCHMARKS.md", "benchmarks/HISTORY.md", "README.md", "docs/reference.md"):
        text = (REPO / doc).read_text()
        for cited in set(re.findall(r"\b(\d{4}-\d{2}-\d{2}_[\w.-]+\.(?:jsonl|json|log|tsv|png))\b", text)):
            if cited not in names:
                missing.append(f"{doc}: {cited}")
        if doc.startswith(("BENCHMARKS", "benchmarks/")):  # a result file named short (`_before.json`) is lost too
            for cited in set(re.findall(r"`([\w.-]+\.(?:jsonl|json|log|tsv|png))`", text)):
                if cited not in names:
                    missing.append(f"{doc}: {cited}")
        # A command that reproduces a figure writes the committed file the figure comes from.
        for out in set(re.findall(r"--out (\S+\.json)\b", text)):
            if "<" not in out and out.rsplit("/", 1)[-1] not in names:
                missing.append(f"{doc}: --out {out}")
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


# Packages an env lists for CUDA machines only (8-bit loading, several GPUs, fused kernels), imported by
# the stages only on a GPU: the fresh environments of this CPU-only machine leave them out.
CUDA_ONLY = {"bitsandbytes", "deepspeed", "liger-kernel"}


def rules_by_env() -> dict[str, list[str]]:
    """env name -> the rules that run in it, from the rules' `conda:` directives."""
    found: dict[str, list[str]] = {}
    for block in re.split(r"^rule ", "".join(p.read_text() for p in sorted((REPO / "rules").glob("*.smk"))),
                          flags=re.M)[1:]:
        found.setdefault(re.search(r'conda:\s+"../envs/(\w+).yaml"', block)[1], []).append(block.split(":")[0])
    return found


def shell_commands(workdir) -> dict[str, str]:
    """rule -> the shell command of its first job in a dry run of everything (as the rule runs it)."""
    output = snakemake(workdir, "-n", "-p", "--forceall").stdout
    commands = {}
    for block in re.split(r"\n(?=\[[^\n]*\]\n(?:local)?rule )", output):
        rule, command = re.search(r"^(?:local)?rule (\w+):", block, re.M), re.search(r"^Shell command: (.*)$", block, re.M)
        if rule and command:
            commands.setdefault(rule[1], command[1])
    return commands


ENVS = ("data", "train", "merge", "answer")


@pytest.fixture(scope="module")
def fresh_envs(tmp_path_factory) -> dict:
    """env name -> the python of a fresh environment holding what envs/NAME.yaml lists (pip, conda packages
    under their PyPI names: no conda channel is reachable here), the four installed at once."""
    pythons, installs = {}, {}
    for name in ENVS:
        venv = tmp_path_factory.mktemp(f"env-{name}")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        pins = [f"{package}=={version}" for package, version in env_pins(REPO / "envs" / f"{name}.yaml").items()
                if package != "python" and package not in CUDA_ONLY]
        pythons[name] = venv / "bin/python"
        installs[name] = subprocess.Popen([sys.executable, "-m", "pip", "--python", pythons[name], "install", "-q",
                                           "--no-compile", *pins], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True)
    for name, install in installs.items():
        output, _ = install.communicate()
        assert install.returncode == 0, f"envs/{name}.yaml: {output[-3000:]}"
    return pythons


@pytest.mark.parametrize("name", ENVS)
def test_each_conda_env_runs_its_own_stages(name, fresh_envs, cross_validated, tmp_path):
    """What envs/NAME.yaml lists, installed into a fresh environment, runs every rule that names the env, on
    the cross-validated demo: each rule's own shell command with that environment's python first on PATH
    (the rules of one env run side by side)."""
    workdir = tmp_path / "work"
    shutil.copytree(cross_validated, workdir, symlinks=True)
    commands = shell_commands(workdir)
    rules = rules_by_env()[name]
    assert set(rules) <= set(commands), f"no job of {set(rules) - set(commands)} in the cross-validated demo"
    path = f"{fresh_envs[name].parent}:/usr/bin:/bin"
    jobs = {rule: subprocess.Popen(["bash", "-c", commands[rule]], cwd=workdir, env={**env(), "PATH": path})
            for rule in rules}
    for rule, job in jobs.items():
        log = re.search(r"> (\S+) 2>&1", commands[rule])[1].strip("'")
        assert job.wait() == 0, f"{rule} in envs/{name}.yaml: " + (workdir / log).read_text()[-3000:]
