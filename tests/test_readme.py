"""The README's two set-up commands are the ones CI and the docs use, and the main one works
on a fresh copy of the repository (new virtual environment, nothing pre-installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO


def readme_commands() -> dict[str, str]:
    """The fenced commands after the ``<!-- main-command -->`` and ``<!-- test-command -->``
    markers."""
    text = (REPO / "README.md").read_text()
    found = {}
    for key in ("main", "test"):
        match = re.search(rf"<!-- {key}-command -->\s*```(?:bash|sh)\n(.+?)\n```", text, re.S)
        assert match, f"README lacks the {key} command block"
        found[key] = match.group(1).strip()
    return found


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = readme_commands()
    assert set(commands) == {"main", "test"}
    for command in commands.values():
        assert "\n" not in command, "each set-up command is one line a newcomer can copy"
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 ")


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()["test"] in ci_lines


def test_docs_use_the_same_commands() -> None:
    commands = readme_commands()
    for doc in sorted((REPO / "docs").glob("*.md")):
        text = doc.read_text()
        for line in text.splitlines():
            if "pip install torch==2.13.0" in line and "python3 -m venv" in line:
                assert line.strip() in commands.values(), f"{doc.name} has a set-up command that differs from the README's"


def test_main_command_names_a_shipped_checkpoint() -> None:
    main = readme_commands()["main"]
    match = re.search(r"slimdeploy export zoo:(\S+)", main)
    assert match
    from slimdeploy.zoo import zoo_checkpoint_path

    assert zoo_checkpoint_path(match.group(1)).is_file()


@pytest.mark.slow
def test_main_command_on_a_fresh_copy(tmp_path: Path) -> None:
    """Copy the tracked files (as a clone would have them), then run the README's main command
    in a new virtual environment there."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True)
    copy = tmp_path / "slimdeploy"
    for name in files.stdout.splitlines():
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    command = readme_commands()["main"]
    result = subprocess.run(["bash", "-c", command], cwd=copy, capture_output=True, text=True, timeout=900,
                            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(Path.home()), "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "parity PASSED" in result.stdout
    bundle = copy / re.search(r"--out (\S+)", command).group(1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["model"]["params"] > 0
