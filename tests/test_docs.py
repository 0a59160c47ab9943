"""The README and docs/ name only what exists: every ``slimdeploy`` command and option they
write is one the command line takes, every file the Layout section lists is in the package,
and the example CI workflow runs commands that exist. Fast: reads the typer app, runs nothing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import typer.main

from slimdeploy.cli import app
from tests.conftest import REPO

DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md")),
        REPO / "docs" / "parity-workflow.yml"]
# Options of other tools that the docs quote next to slimdeploy's (docker, pip, the benchmark
# scripts, tests/mutate.py).
FOREIGN_OPTIONS = {"--build-arg", "--gpus", "--runtime", "--rm", "--index-url", "--extra-index-url", "--quick", "--models", "--checkpoint",
                   "--sample", "--seed", "--only"}


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
    """The README's Python block, as written (on the shipped SPConv ResNet-20 checkpoint, with a
    short parity run), exports, checks and runs a bundle under bundles/ of the current folder."""
    code = re.search(r"## Python\s*```python\n(.+?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert 'zoo_checkpoint_path("spconv_resnet20_digits")' in code, "the example says where its checkpoint comes from"
    assert code.count("force=True)") == 1
    code = code.replace("force=True)", "force=True, samples=8)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"] and namespace["logits"].shape == (4, 10)
    golden = namespace["np"].load(tmp_path / "bundles" / "python-example" / "golden.npz")
    assert namespace["np"].array_equal(namespace["logits"].argmax(1), golden["ref_logits"][:4].argmax(1))


# What names a place outside the repository: the sibling folder the project once read, absolute
# paths of the machine it was developed on, documents that live only there, and the folder above
# the repository root. Built from pieces so that this file does not name them itself.
OUTSIDE_NAMES = re.compile("|".join([
    r"\.\./" + "shared", "/" + "work/", "upstream" + "-kit", "DESIGN" + r"\.md",
    "reference/" + r"(?:tensorrt-facts|trt_ops|upstream|style-anchors)", r"\b(?:REPO|ROOT)\.parent" + r"\b",
]))
RELATIVE_PATH = re.compile(r"(?<![\w.])((?:\.\./)+[\w.-]+(?:/[\w.-]+)*)")
PARENTS_OF_FILE = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]")
IGNORED_PARTS = {".git", ".venv", "__pycache__", "bundles", "build", "dist"}


def repository_files(root: Path) -> list[Path]:
    """The tracked files of the checkout at ``root`` (every file but ignored folders when it is
    not a git checkout, e.g. a copy)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        return [root / name for name in listed.stdout.decode().split("\0") if name]
    return [path for path in sorted(root.rglob("*")) if path.is_file()
            and not IGNORED_PARTS & set(path.relative_to(root).parts)
            and not any(part.endswith(".egg-info") for part in path.relative_to(root).parts)]


def outside_paths(root: Path) -> list[str]:
    """``file:line: text`` for every text file under ``root`` that names a path outside ``root``:
    a known outside name, a ``../`` path that leaves the repository from both the file's folder
    and the root, or ``Path(__file__).parents[N]`` above the root."""
    found = []
    for path in repository_files(root):
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary: checkpoints, arrays
        try:
            text = data.decode()
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(root)
        for number, line in enumerate(text.splitlines(), 1):
            problems = [match.group(0) for match in OUTSIDE_NAMES.finditer(line)]
            for match in RELATIVE_PATH.finditer(line):
                targets = [(path.parent / match.group(1)).resolve(), (root / match.group(1)).resolve()]
                if not any(target.is_relative_to(root.resolve()) for target in targets):
                    problems.append(match.group(1))
            for match in PARENTS_OF_FILE.finditer(line):
                # parents[len(parts) - 1] of a file is the root; anything higher is outside.
                if int(match.group(1)) >= len(relative.parts):
                    problems.append(match.group(0))
            found += [f"{relative}:{number}: {problem}" for problem in problems]
    return found


def test_no_file_names_a_path_outside_the_repository() -> None:
    """Code, docs, tests, benchmarks and data read nothing outside the checkout: the design and
    the facts live in docs/, the official-code fixtures in tests/fixtures/."""
    assert not outside_paths(REPO)


def test_the_outside_path_check_finds_each_kind(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "docs").mkdir()
    (repo / "docs" / "ok.md").write_text("See [the design](design.md) and `../docs/ok.md`.\n")
    (repo / "tests" / "ok.py").write_text("REPO = Path(__file__).resolve().parents[1]\n")
    (repo / "model.pt").write_bytes(b"\0" + b"../" + b"shared")
    assert outside_paths(repo) == []
    # The offending names are assembled here so that this file does not contain them.
    sibling = "../" + "shared/" + "DESIGN" + ".md"
    elsewhere = "../" * 2 + "elsewhere/notes.txt"
    above = "Path(__file__).resolve().parents[" + "2]"
    (repo / "README.md").write_text(f"See `{sibling}`.\nAnd `{elsewhere}`.\n")
    (repo / "tests" / "bad.py").write_text(f"KIT = {above} / 'kit'\n"
                                            "FALLBACK = '/" + "work/kit/checkpoint.pth.tar'\n"
                                            "SHARED = REPO." + "parent / 'shared'\n")
    assert sorted(outside_paths(repo)) == sorted([
        "README.md:1: ../" + "shared",
        "README.md:1: DESIGN" + ".md",
        f"README.md:1: {sibling}",
        f"README.md:2: {elsewhere}",
        f"tests/bad.py:1: {above}",
        "tests/bad.py:2: /" + "work/",
        "tests/bad.py:3: REPO." + "parent",
    ])


def bash_blocks(doc: Path) -> list[list[str]]:
    """The lines of each ``bash``/``sh`` fenced block of a Markdown document."""
    pieces = re.split(r"^```", doc.read_text(), flags=re.M)
    return [piece.partition("\n")[2].splitlines() for i, piece in enumerate(pieces)
            if i % 2 and piece.partition("\n")[0].strip() in ("bash", "sh")]


def test_readme_examples_use_shipped_models_write_under_bundles_and_name_their_extras() -> None:
    """Every command of the README's examples runs as written after the README's install: a
    ``zoo:`` checkpoint it names is shipped, what it writes goes under ``bundles/`` (never into
    the repository root), and a command that needs an extra has the extra's install beside it."""
    from slimdeploy.zoo import zoo_checkpoint_path

    extras = {"--plot": "[plot]", "--ray": "[ray]"}
    problems = []
    for block in bash_blocks(REPO / "README.md"):
        for number, line in enumerate(block):
            if "slimdeploy " not in line:
                continue
            for name in re.findall(r"zoo:(\w+)", line):
                if not zoo_checkpoint_path(name).is_file():
                    problems.append(f"{line!r} names zoo:{name}, which is not shipped")
            for option, path in re.findall(r"(--out|--plot|--json|--junit) (\S+)", line):
                if path != "-" and not path.startswith("bundles/"):
                    problems.append(f"{line!r} writes {option} {path} outside bundles/")
            for option, extra in extras.items():
                if option in line and not any("pip install" in before and extra in before for before in block[:number]):
                    problems.append(f"{line!r} needs the {extra} extra and its block does not install it first")
    assert not problems, "; ".join(problems)
