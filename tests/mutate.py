"""A small mutation tester for slimdeploy's modules (docs/testing.md says how it is used).

    python tests/mutate.py slimdeploy/parity.py --sample 20 -- tests/test_parity.py
    python tests/mutate.py slimdeploy/engines/staged.py --list          # the mutants, not run

Each mutant changes one operator or constant of the module (the AST is edited, then written back
with ``ast.unparse``): a comparison swapped for its neighbour (``<`` ↔ ``<=``, ``>`` ↔ ``>=``,
``==`` ↔ ``!=``, ``in`` ↔ ``not in``, ``is`` ↔ ``is not``), ``and`` ↔ ``or``, a ``not`` dropped,
``+`` ↔ ``-``, ``*`` ↔ ``/``, an integer ``n`` → ``n + 1``, ``True`` ↔ ``False``. Docstrings,
f-strings, annotations and ``raise`` messages are left alone. For each mutant the module file is
replaced, the tests after ``--`` run in a fresh ``python -m pytest -x -q`` (a failure or a
timeout kills the mutant), and the file is restored, also on Ctrl-C. ``--sample N`` runs N mutants
drawn with a fixed seed (``--seed``); the results go to ``--out`` as JSON (one line per mutant:
its id, line, change and outcome). Mutation tools from PyPI copy or instrument the whole
package; this one edits one file in place, so run it in a checkout of your own, never beside
other work.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
         ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
         ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.And: ast.Or, ast.Or: ast.And}
SYMBOLS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
           ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
           ast.Div: "/", ast.And: "and", ast.Or: "or"}


@dataclass
class Mutant:
    index: int
    line: int
    change: str
    outcome: str = ""  # "killed", "survived" or "timeout"
    seconds: float = 0.0


def _skipped(tree: ast.Module) -> set[int]:
    """ids of the nodes no mutant touches: docstrings, f-strings, annotations, raise statements."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        parts: list[ast.AST] = []
        if isinstance(node, (ast.JoinedStr, ast.Raise)):
            parts = [node]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            parts = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs] if a.annotation]
            parts += [node.returns] if node.returns else []
        elif isinstance(node, ast.AnnAssign):
            parts = [node.annotation]
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            parts.append(node.body[0])
        for part in parts:
            skip |= {id(inner) for inner in ast.walk(part)}
    return skip


def mutation_points(tree: ast.Module) -> list[tuple[ast.AST, str, int | None]]:
    """(node, kind, index within the node) of every mutation, in source order."""
    skip = _skipped(tree)
    points: list[tuple[ast.AST, str, int | None]] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Compare):
            points += [(node, "compare", i) for i, op in enumerate(node.ops) if type(op) in SWAPS]
        elif isinstance(node, (ast.BinOp, ast.BoolOp)) and type(node.op) in SWAPS:
            points.append((node, "operator", None))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            points.append((node, "not", None))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            points.append((node, "bool", None))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            points.append((node, "int", None))
    return sorted(points, key=lambda p: (getattr(p[0], "lineno", 0), getattr(p[0], "col_offset", 0), p[2] or 0))


def mutate(source: str, index: int) -> tuple[str, Mutant]:
    """The module's source with mutation ``index`` applied, and what it changed."""
    tree = ast.parse(source)
    node, kind, position = mutation_points(tree)[index]
    line = getattr(node, "lineno", 0)
    if kind == "compare":
        old = node.ops[position]
        node.ops[position] = SWAPS[type(old)]()
        change = f"{SYMBOLS[type(old)]} -> {SYMBOLS[SWAPS[type(old)]]}"
    elif kind == "operator":
        old = node.op
        node.op = SWAPS[type(old)]()
        change = f"{SYMBOLS[type(old)]} -> {SYMBOLS[SWAPS[type(old)]]}"
    elif kind == "not":
        change = "not dropped"
        _replace(tree, node, node.operand)
    elif kind == "bool":
        change = f"{node.value} -> {not node.value}"
        node.value = not node.value
    else:
        change = f"{node.value} -> {node.value + 1}"
        node.value = node.value + 1
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n", Mutant(index, line, change)


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, field, new)
                return
            if isinstance(value, list) and any(item is old for item in value):
                value[next(i for i, item in enumerate(value) if item is old)] = new
                return


def run(module: Path, tests: list[str], indices: list[int], timeout: float, out: Path | None) -> list[Mutant]:
    original = module.read_text()
    # The baseline must pass, or every mutant would look killed.
    started = time.perf_counter()
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              capture_output=True, text=True)
    if baseline.returncode != 0:
        raise SystemExit(f"the tests fail without any mutant:\n{baseline.stdout[-2000:]}")
    limit = max(timeout, 3 * (time.perf_counter() - started))
    results = []
    try:
        for index in indices:
            source, mutant = mutate(original, index)
            module.write_text(source)
            started = time.perf_counter()
            try:
                done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                      capture_output=True, text=True, timeout=limit)
                mutant.outcome = "survived" if done.returncode == 0 else "killed"
            except subprocess.TimeoutExpired:
                mutant.outcome = "timeout"
            mutant.seconds = round(time.perf_counter() - started, 1)
            results.append(mutant)
            print(f"{module}:{mutant.line} #{index} {mutant.change}: {mutant.outcome} ({mutant.seconds} s)", flush=True)
            if out:
                out.write_text(json.dumps([asdict(m) for m in results], indent=1) + "\n")
    finally:
        module.write_text(original)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    tests = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", type=Path)
    parser.add_argument("--sample", type=int, default=0, help="run this many mutants, drawn with --seed (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant at least (default 120; 3x the baseline if longer)")
    parser.add_argument("--out", type=Path, help="JSON file of the outcomes")
    parser.add_argument("--only", type=lambda text: [int(i) for i in text.split(",")], help="run these mutants (ids from --list)")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    args = parser.parse_args(argv)
    source = args.module.read_text()
    count = len(mutation_points(ast.parse(source)))
    if args.list:
        for index in range(count):
            print(f"#{index} line {mutate(source, index)[1].line}: {mutate(source, index)[1].change}")
        return 0
    if not tests:
        parser.error("name the tests to run after --")
    indices = args.only or list(range(count))
    if args.sample and args.sample < len(indices):
        indices = sorted(random.Random(args.seed).sample(indices, args.sample))
    results = run(args.module, tests, indices, args.timeout, args.out)
    killed = sum(m.outcome != "survived" for m in results)
    print(f"{args.module}: {count} mutants, {len(results)} run, {killed} killed, score {killed / max(len(results), 1):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
