"""Fixture files are required where tests are meant to run: ``require_fixture`` and the
``needs_fixture`` marker skip a test whose fixture is missing on a developer's machine, fail it
when the ``CI`` environment variable is set, and never hide a test whose fixture is there. The
fixtures the suite needs are in the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, UPSTREAM, in_ci, require_fixture

UPSTREAM_FILES = ("checkpoint.pth.tar", "input.pt", "ref_outputs.pt", "keys.txt", "meta.json")


@pytest.mark.parametrize(("value", "expected"), [(None, False), ("", False), ("0", False), ("false", False),
                                                 ("False", False), ("true", True), ("1", True), ("yes", True)])
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_an_existing_fixture_is_returned_in_and_out_of_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("", "true"):
        monkeypatch.setenv("CI", value)
        assert require_fixture(UPSTREAM) == UPSTREAM


def test_a_missing_fixture_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = UPSTREAM / "no_such_model"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="tests/fixtures/upstream/no_such_model is missing"):
        require_fixture(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no_such_model is missing; CI is set"):
        require_fixture(missing)


def run_pytest_on(test_file: Path, ci: str | None) -> tuple[int, str]:
    """Run pytest on ``test_file`` with this suite's conftest as a plugin: (exit code, summary
    line)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(test_file.parent), "-o", "addopts=", str(test_file)],
        capture_output=True, text=True, cwd=test_file.parent, env=env, timeout=300,
    )
    return done.returncode, done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_marker_and_the_helper_in_a_real_pytest_run(tmp_path: Path) -> None:
    """Three tests: one marked with a missing fixture, one asking ``require_fixture`` for a
    missing file inside a fixture, one marked with a fixture that exists."""
    missing = tmp_path / "gone" / "checkpoint.pth.tar"
    present = tmp_path / "here.txt"
    present.write_text("data")
    test_file = tmp_path / "test_example.py"
    test_file.write_text(
        "import pytest\n"
        "from pathlib import Path\n"
        "from tests.conftest import require_fixture\n\n"
        f"MISSING = Path({str(missing)!r})\n"
        f"PRESENT = Path({str(present)!r})\n\n"
        "@pytest.fixture\n"
        "def data():\n"
        "    return require_fixture(MISSING).read_bytes()\n\n"
        "@pytest.mark.needs_fixture(MISSING)\n"
        "def test_marked_missing():\n"
        "    raise AssertionError('the body must not run without its fixture')\n\n"
        "def test_helper_missing(data):\n"
        "    raise AssertionError('the body must not run without its fixture')\n\n"
        "@pytest.mark.needs_fixture(PRESENT)\n"
        "def test_marked_present():\n"
        "    assert PRESENT.read_text() == 'data'\n"
    )
    for ci in (None, "false"):
        code, summary = run_pytest_on(test_file, ci)
        assert code == 0 and re.fullmatch(r"1 passed, 2 skipped in .*", summary), (ci, code, summary)
    # Under CI the missing fixture fails the test in its setup (pytest counts an error), so the
    # run fails; nothing is skipped.
    code, summary = run_pytest_on(test_file, "true")
    assert code == 1 and re.fullmatch(r"1 passed, 2 errors in .*", summary), (code, summary)


@pytest.mark.parametrize("name", ["skipnet_cifar10_feedforward_38", "skipnet_cifar10_rnn_gate_38", "condensenet_cifar10_small"])
def test_the_upstream_fixtures_are_in_the_repository(name: str) -> None:
    folder = UPSTREAM / name
    files = UPSTREAM_FILES + (("converted_checkpoint.pth.tar",) if name.startswith("condensenet") else ())
    for file in files:
        assert (folder / file).is_file(), folder / file
    tracked = subprocess.run(["git", "ls-files", str(folder)], cwd=REPO, capture_output=True, text=True).stdout
    if tracked:  # in a git checkout: the files are committed, not just present here
        assert {Path(line).name for line in tracked.splitlines()} >= set(files)
    assert name in (UPSTREAM / "README.md").read_text()


def test_no_test_skips_silently_on_a_missing_file() -> None:
    """Fixture-dependent tests go through require_fixture / needs_fixture, not a skipif on the
    path's existence or a pytest.skip after testing it, which would stay silent in CI."""
    silent = re.compile(r"skipif\(\s*not\s+[\w.()\"' /]+\.(?:is_dir|is_file|exists)\(\)"
                        r"|if not [\w.()\"' /]+\.(?:is_dir|is_file|exists)\(\):\s*\n\s*pytest\.skip")
    offenders = [path.name for path in sorted((REPO / "tests").glob("test_*.py")) if silent.search(path.read_text())]
    assert not offenders, offenders
