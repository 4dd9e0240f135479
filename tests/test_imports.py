"""Issue 26's import rules, checked from the source: no import circles among argen's modules (from
grimp's import graph), and no argen import hidden inside a function unless a comment says why."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import grimp
import pytest

import argen

SRC = Path(argen.__file__).parent


def _graph() -> dict[str, set[str]]:
    """Each argen module -> the argen modules it imports when it runs (imports under `if
    TYPE_CHECKING:` are annotations only: they never run, so they close no circle)."""
    graph = grimp.build_graph("argen", exclude_type_checking_imports=True)
    return {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_no_import_circles():
    """Guards against module A importing B while B (or a module B imports) imports A, inside a
    function too (the way cliargs.py imported back from cli.py before issue 26)."""
    assert (cycle := _cycle(_graph())) is None, "import circle: " + " -> ".join(reversed(cycle))


def test_the_circle_check_finds_a_circle():
    graph = _graph()
    graph["argen.errors"] = graph["argen.errors"] | {"argen.api"}  # api imports errors: a circle
    assert _cycle(graph) is not None


def _function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source) of each argen import inside a function that neither its line nor the one
    above carries a comment."""
    text = path.read_text()
    lines = text.splitlines()
    found = []
    for fn in ast.walk(ast.parse(text)):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if not any(name == "argen" or name.startswith("argen.") for name in names):
                continue
            line, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
            if "#" not in line and not above.startswith("#"):
                found.append((node.lineno, line.strip()))
    return found


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_argen_imports_inside_functions_say_why(path):
    """Guards against hidden imports: an argen import inside a function needs a comment on its line
    or the line above saying why (an optional dependency, start-up cost, a circle it avoids)."""
    assert _function_imports(path) == [], f"{path.name}: say why each of these is not at the top of the module"


def test_only_command_lines_use_argparse():
    """Guards against an argparse Namespace travelling into library code (jobs, distributed, chat,
    server took one before issue 26): outside `argen.cli`, only a module that is a command of its
    own (`python -m ...`) may import argparse."""
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).parts
        if parts[0] in ("cli", "bench"):
            continue
        imported = {module for module, _ in _imports(path)}
        if "argparse" in imported:
            assert 'if __name__ == "__main__":' in path.read_text(), f"{path.relative_to(SRC)} imports argparse"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_nothing_outside_the_server_imports_its_private_names():
    """Guards against reaching into the server's internals (jobs/runner.py imported `_Shape` and
    `_generation_error` from server/app.py before issue 26; the shapes are `server/responses.py`'s)."""
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "server":
            continue
        for module, names in _imports(path):
            if module.startswith("argen.server"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(SRC)} imports {private} from {module}"
