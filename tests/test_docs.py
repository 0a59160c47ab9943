"""The README and docs/ name only what exists: every ``slimdeploy`` command and option they
write is one the command line takes, every file the Layout section lists is in the package,
and the example CI workflow runs commands that exist. Fast: reads the typer app, runs nothing."""

from __future__ import annotations

import re

import pytest
import typer.main

from slimdeploy.cli import app
from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "docs" / "parity-workflow.yml"]
# Options of other tools that the docs quote next to slimdeploy's (docker, pip, the benchmark scripts).
FOREIGN_OPTIONS = {"--build-arg", "--gpus", "--runtime", "--rm", "--index-url", "--extra-index-url", "--quick", "--models", "--checkpoint"}


def cli_options() -> dict[str, set[str]]:
    """Command ("export", "zoo list", ...) → the option names it takes."""
    root = typer.main.get_command(app)
    found: dict[str, set[str]] = {}

    def walk(command, prefix: str) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            path = f"{prefix} {name}".strip()
            walk(sub, path)
            found[path] = {opt for param in sub.params for opt in param.opts if opt.startswith("--")}

    walk(root, "")
    return found


def code_of(doc) -> str:
    """The code a document shows: bash blocks, the lines of other fenced blocks that run
    slimdeploy, and inline code spans (one per line) of Markdown; the ``run:`` lines of a
    workflow."""
    text = doc.read_text()
    if doc.suffix == ".yml":
        return "\n".join(re.findall(r"^\s+run: (.+)$", text, re.M))
    code, prose = [], []
    # Fences alternate open/close: even pieces are prose, odd ones a block (language first).
    for i, piece in enumerate(re.split(r"^```", text, flags=re.M)):
        if i % 2 == 0:
            prose.append(piece)
            continue
        language, _, body = piece.partition("\n")
        lines = body.splitlines()
        code += lines if language.strip() in ("bash", "sh") else [
            line for line in lines if line.lstrip().startswith(("slimdeploy ", "docker run"))]
    code += re.findall(r"`([^`\n]+)`", "".join(prose))
    return "\n".join(code)


def slimdeploy_invocations(text: str) -> list[tuple[str, list[str]]]:
    """(command, options) of every ``slimdeploy CMD ...`` written in a code span or code line."""
    commands = cli_options()
    calls = []
    for match in re.finditer(r"slimdeploy(?::\w+)? ([a-z]+)(?: ([a-z]+))?([^`\n|]*)", text):
        first, second, rest = match.groups()
        if f"{first} {second}" in commands:
            command = f"{first} {second}"
        else:
            command, rest = first, f" {second or ''}{rest}"
        calls.append((command, re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest)))
    return calls


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_and_options_exist(doc) -> None:
    commands = cli_options()
    text = doc.read_text()
    problems = []
    for command, options in slimdeploy_invocations(code_of(doc)):
        if command not in commands:
            problems.append(f"unknown command 'slimdeploy {command}'")
            continue
        problems += [f"'slimdeploy {command}' has no {opt}" for opt in options if opt not in commands[command]]
    # Options named on their own in code spans (`--dynamic if`) belong to some command.
    every = set().union(*commands.values())
    for opt in re.findall(r"`(--[a-z][a-z0-9-]*)", text):
        if opt not in every and opt not in FOREIGN_OPTIONS:
            problems.append(f"no command takes {opt}")
    assert not problems, f"{doc.name}: " + "; ".join(sorted(set(problems)))


def test_every_command_is_documented_in_the_readme() -> None:
    table = {command for command, _ in slimdeploy_invocations(code_of(REPO / "README.md"))}
    assert set(cli_options()) <= table | {"zoo"}, set(cli_options()) - table


def test_readme_layout_lists_the_package() -> None:
    """Every module and subpackage of slimdeploy/ is in the Layout block, and everything the
    block names exists."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Layout.*?```\n(.+?)```", text, re.S).group(1)
    package = REPO / "slimdeploy"
    actual = {p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
              if not p.name.startswith(("__", ".")) and (p.is_dir() or p.suffix == ".py")}
    listed_top = set(re.findall(r"^  (\S+)", block, re.M))
    assert actual <= listed_top, f"missing from the Layout: {sorted(actual - listed_top)}"
    for name in listed_top:
        assert (package / name.rstrip("/")).exists(), f"the Layout lists slimdeploy/{name}, which does not exist"
    for top in re.findall(r"^(\w+)/", block, re.M):
        assert (REPO / top).is_dir(), f"the Layout lists {top}/, which does not exist"
    # Files named inside an entry's description (train_gated.py, trt_build.py, ...) exist too.
    for line in block.splitlines():
        for name in re.findall(r"([\w-]+\.(?:py|md|yml|Dockerfile))\b", line):
            found = [p for top in ("slimdeploy", "docs", "docker", "tests", "benchmarks") for p in (REPO / top).rglob(name)]
            assert found, f"the Layout names {name}, which does not exist"


def test_parity_workflow_runs_existing_commands() -> None:
    """The example workflow installs torch from the CPU index (not PyPI's CUDA build), installs
    slimdeploy from somewhere pip can reach (it is not on PyPI), runs real commands, and
    publishes the reports even when a step failed."""
    text = (REPO / "docs" / "parity-workflow.yml").read_text()
    runs = re.findall(r"^\s+run: (.+)$", text, re.M)
    install = next(run for run in runs if "pip install" in run)
    assert "download.pytorch.org/whl/cpu" in install
    assert not re.search(r"pip install[^\n]*'slimdeploy\[export\]'(?! @)", install), \
        "slimdeploy is not on PyPI: the workflow must install it from a git URL, a path or a wheel"
    commands = cli_options()
    invoked = [call for run in runs for call in slimdeploy_invocations(run)]
    assert {"export", "check"} <= {command for command, _ in invoked}
    for command, options in invoked:
        assert command in commands and set(options) <= commands[command], (command, options)
    upload = text[text.index("actions/upload-artifact") - 200:]
    assert "if: always()" in upload


def option_help(command: str, option: str) -> str:
    root = typer.main.get_command(app)
    for name in command.split():
        root = root.commands[name]
    (param,) = [p for p in root.params if option in p.opts]
    return param.help or ""


def test_help_states_the_library_defaults() -> None:
    """The defaults that --help writes in words are the ones the library applies."""
    from slimdeploy.bench import DEFAULT_SWEEP
    from slimdeploy.calibration.readers import DEFAULT_SIZE
    from slimdeploy.engines.trt_build import BuildSpec
    from slimdeploy.export.options import DEFAULT_SAMPLES, DEFAULT_SAMPLES_REDUCED
    from slimdeploy.exporters.onnx_export import DEFAULT_OPSET
    from slimdeploy.parity import DEFAULT_TOLERANCES

    assert f"default {DEFAULT_SAMPLES}; {DEFAULT_SAMPLES_REDUCED} for fp16/int8" in option_help("export", "--samples")
    assert f"default {DEFAULT_OPSET}" in option_help("export", "--opset")
    assert f"default {DEFAULT_SIZE}" in option_help("export", "--calib-size")
    assert ",".join(f"{v:g}" for v in DEFAULT_SWEEP) in option_help("bench", "--sweep")
    for option, index in (("--atol", 0), ("--rtol", 1)):
        stated = dict(re.findall(r"(fp32|fp16|int8) ([0-9.e-]+)[,)]", option_help("export", option)))
        assert {p: float(v) for p, v in stated.items()} == {p: t[""][index] for p, t in DEFAULT_TOLERANCES.items()}
    spec = BuildSpec()
    for option, value in (("--min-batch", spec.min_batch), ("--opt-batch", spec.opt_batch),
                          ("--max-batch", spec.max_batch), ("--workspace", spec.workspace_mb)):
        assert f"export: {value};" in option_help("export", option)


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch) -> None:
    """The README's Python block, on the shipped SPConv ResNet-20 checkpoint in place of
    model.pt (a short parity run), exports, checks and runs a bundle."""
    from slimdeploy.zoo import zoo_checkpoint_path

    code = re.search(r"## Python\s*```python\n(.+?)```", (REPO / "README.md").read_text(), re.S).group(1)
    checkpoint = zoo_checkpoint_path("spconv_resnet20_digits")
    code = code.replace('"model.pt", "bundle/", arch=', f'"{checkpoint}", "bundle/", samples=8, arch=')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"] and namespace["logits"].shape == (4, 10)
    golden = namespace["np"].load(tmp_path / "bundle" / "golden.npz")
    assert namespace["np"].array_equal(namespace["logits"].argmax(1), golden["ref_logits"][:4].argmax(1))
