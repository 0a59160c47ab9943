# ruff: noqa: RUF001, RUF002, RUF003 (the documents' own characters: ×, –, −)
"""Every figure README.md and benchmarks/README.md quote comes from a committed results file
(issue 19 part 6). Fast: reads the documents and ``benchmarks/results/*.json``, runs nothing.

What counts as a figure:

- a number with a unit of measure: ``2.00x`` / ``25.2×`` (ratios), ``97.4 %`` (shares), and in
  tables ``21.15 M`` (millions) and ``7.05 MB``;
- in the tables of a section that names a results file: every decimal number, and every
  integer of three digits or more (smaller integers there are batch sizes, thread counts and
  skip levels: settings).

Where it must be found: in the results files its section names (``results/NAME.json``, or
``NAME.png`` beside it; a section is a ``##`` heading with its subsections) or, on a table
row, the files of the benchmark script the row names (``NAME.py`` → ``results/NAME*.json``).
It is found when some number in those files, rounded to the figure's decimals, is the figure
(a share may be stored as a fraction; ``M`` and ``MB`` are millions).

Not figures: a number after a comparison sign (a criterion or target: ``≥ 98 %``), the sides
of a size (``224×224``), and ``NOT_MEASURED`` below: each entry the text around a number that
is a setting, a target or a property of the method, with the reason.

Every results file records the date of its run and the thread count it ran with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = ("README.md", "benchmarks/README.md")
RESULTS = REPO / "benchmarks" / "results"
# (document, text around the number as written, why it is no measurement)
NOT_MEASURED = [
    ("benchmarks/README.md", "| met (0.8) |", "the target of the skipnet.py row (realised ≥ 0.8 × predicted)"),
    ("benchmarks/README.md", "| not met (2×) |", "the target of the condensenet.py row"),
    ("benchmarks/README.md", "(1.8×)", "the INT8 speed-up target of the precision.py row"),
    ("benchmarks/README.md", "just short (0.8)", "the target of the early_exit.py row"),
    ("benchmarks/README.md", "one convolution ×1.01 fails", "the perturbation tolerance.py applies (a setting)"),
    ("benchmarks/README.md", "(~65 M FLOPs", "the CondenseNet paper's figure, quoted for comparison"),
    ("benchmarks/README.md", "1×1 MACs 4× (its condense factor)", "CondenseNet's condense factor (an architecture setting)"),
    ("README.md", "105,082 parameters; 15.2 M MACs", "an example of how numbers are written in the output"),
    ("README.md", "(105,082; 15.2 M)", "an example of how numbers are written in the output"),
    ("README.md", "10 × max|ref32 − ref64|", "the factor of the FP32 tolerance rule (a setting)"),
    ("README.md", "167M extra on -A, designed", "MACs of the CondenseNetV2-A architecture, counted from its layers"),
    ("README.md", "for 43M); export stores", "MACs of the CondenseNetV2-A architecture, counted from its layers"),
    ("README.md", "(65M in all on -A, same logits)", "MACs of the CondenseNetV2-A architecture, counted from its layers"),
]

NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
# A number (or a range of two) with a unit; not part of a longer word or number.
WITH_UNIT = re.compile(rf"(?<![\w.,])({NUMBER})(?:\s?[–-]\s?({NUMBER}))?\s?(×|x(?![\w])|%|MB\b|M\b)")
BARE = re.compile(rf"(?<![\w.,×])({NUMBER})(?![\w.,×%]|\s?(?:×|x\b|%|MB\b|M\b))")
COMPARISON = re.compile(r"(?:[≥≤<>]|>=|<=)\s*$")
SIZE = re.compile(rf"(?:{NUMBER})\s?×\s?(?:{NUMBER})")


@dataclass(frozen=True)
class Figure:
    doc: str
    line: int
    text: str  # the number as written
    unit: str  # "×", "%", "M", "MB" or "" (a bare number in a table)
    scope: tuple[str, ...]  # results files (stems) where it must be found
    context: str  # the line around it


def _numbers(node: object) -> list[float]:
    """Every number in a JSON document (strings are not measurements: skipped)."""
    if isinstance(node, dict):
        return [n for value in node.values() for n in _numbers(value)]
    if isinstance(node, list):
        return [n for value in node for n in _numbers(value)]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return [float(node)]
    return []


def results() -> dict[str, list[float]]:
    return {path.stem: _numbers(json.loads(path.read_text())) for path in sorted(RESULTS.glob("*.json"))}


def _sections(text: str) -> list[list[tuple[int, str]]]:
    """The lines of each ``##`` section (with its subsections), numbered from 1."""
    found: list[list[tuple[int, str]]] = [[]]
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"#{1,2} ", line):
            found.append([])
        found[-1].append((number, line))
    return found


def _named(text: str, stems: list[str]) -> set[str]:
    """Results files ``text`` names: ``results/NAME.json|png``, or a script ``NAME.py``."""
    named = set(re.findall(r"results/(\w+)\.(?:json|png)", text))
    for script in re.findall(r"(\w+)\.py", text):
        named |= {stem for stem in stems if stem == script or stem.startswith(f"{script}_")}
    return named & set(stems)


def _allowed(doc: str, line: str, start: int, end: int) -> bool:
    """A number that is a criterion, a size or listed in ``NOT_MEASURED``."""
    if COMPARISON.search(line[:start]) or any(m.start() <= start < m.end() for m in SIZE.finditer(line)):
        return True
    return any(doc == where and context in line and line.find(context) <= start < line.find(context) + len(context)
               for where, context, _ in NOT_MEASURED)


def figures(doc: str, stems: list[str], root: Path = REPO) -> list[Figure]:
    """The figures of document ``doc`` (a path under ``root``), each with the results files it
    must be found in."""
    found = []
    for section in _sections((root / doc).read_text()):
        section_files = _named("\n".join(line for _, line in section), stems)
        for number, line in section:
            is_table = line.startswith("|") and not set(line) <= set("|-: ")
            scope = section_files | (_named(line, stems) if is_table else set())
            items = []
            for match in WITH_UNIT.finditer(line):
                for group in (1, 2):
                    if match.group(group):
                        items.append((match.group(group), match.group(3), match.start(group), match.end(group)))
            if is_table and section_files:
                covered = [(m.start(), m.end()) for m in WITH_UNIT.finditer(line)]
                items += [(m.group(1), "", m.start(1), m.end(1)) for m in BARE.finditer(line)
                          if ("." in m.group(1) or len(m.group(1).replace(",", "")) >= 3)
                          and not any(a <= m.start(1) < b for a, b in covered)]
            for text, unit, start, end in items:
                if not _allowed(doc, line, start, end):
                    found.append(Figure(doc, number, text, unit.strip(), tuple(sorted(scope)), line.strip()))
    return found


def is_found(figure: Figure, numbers: dict[str, list[float]]) -> bool:
    value = float(figure.text.replace(",", ""))
    decimals = len(figure.text.split(".")[1]) if "." in figure.text else 0
    half = 0.5 * 10 ** -decimals + 1e-9
    scale = {"%": (1.0, 100.0), "M": (1e-6,), "MB": (1e-6,)}.get(figure.unit, (1.0,))
    return any(abs(x * s - value) <= half for stem in figure.scope for x in numbers[stem] for s in scale)


@pytest.mark.parametrize("doc", DOCS)
def test_every_figure_is_in_a_results_file(doc: str) -> None:
    numbers = results()
    found = figures(doc, list(numbers))
    assert len(found) > 30  # the extraction reaches the tables and the prose
    missing = [f"{f.doc}:{f.line} {f.text}{f.unit} (looked in {list(f.scope) or 'no results file named'}): {f.context[:120]}"
               for f in found if not is_found(f, numbers)]
    assert not missing, "figures no results file backs:\n" + "\n".join(missing)


def test_the_check_fails_on_a_figure_that_no_file_holds(tmp_path: Path) -> None:
    numbers = {"runtime": [25.21, 0.974, 7050445.0]}
    doc = tmp_path / "doc.md"
    doc.write_text("## `runtime.py`\n\nFrom `benchmarks/results/runtime.json`: 25.2× faster, 97.4 % agree, "
                   "25.3× (a typo), 97.5 % (another), target ≥ 99 %, inputs 224×224.\n\n"
                   "| model | bytes | ms |\n|---|---|---|\n| a | 7.05 MB | 0.123 |\n")
    found = figures("doc.md", list(numbers), root=tmp_path)
    assert [(f.text, f.unit) for f in found] == [("25.2", "×"), ("97.4", "%"), ("25.3", "×"), ("97.5", "%"), ("7.05", "MB"), ("0.123", "")]
    assert [is_found(f, numbers) for f in found] == [True, True, False, False, True, False]


def test_not_measured_entries_are_used() -> None:
    """Each allowance still matches a line of its document (a stale one would hide nothing)."""
    for doc, context, _ in NOT_MEASURED:
        assert context in (REPO / doc).read_text(), (doc, context)


def test_every_results_file_records_its_date_and_threads() -> None:
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["machine"]["date"]), path.name
        assert isinstance(data["settings"]["threads"], int) and data["settings"]["threads"] >= 1, path.name
