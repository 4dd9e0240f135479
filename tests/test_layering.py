"""Issue 26's edges, checked from the source: strategies receive their companion models (never load
one, never import the API), and the runtime reads the declared cache contract (no getattr probes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import argen
from argen.engine import Request
from argen.errors import InvalidRequestError
from argen.sampling import SamplingParams
from argen.strategies import make_strategy

SRC = Path(argen.__file__).parent


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.append((node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_strategies_never_import_the_api_nor_load_a_model():
    """Guards against a strategy that loads its own draft or guide (`shared_model`, `load_model`) or
    imports `argen.api` to recognize a Generator: the import circle issue 26 removed."""
    for path in sorted((SRC / "strategies").rglob("*.py")):
        for module, names in _imports(path):
            assert module != "argen.api", f"{path.name} imports argen.api"
            assert not {"shared_model", "load_model"} & set(names), f"{path.name} imports a model loader"


def test_the_native_runtime_reads_the_cache_contract_without_probes():
    """Guards against `getattr(seg.cache, ...)` probes in the runtime: it reads PagedKV's declared members."""
    for path in (SRC / "models" / "llama.py", SRC / "models" / "hf.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr":
                assert "cache" not in ast.unparse(node.args[0]), f"{path.name}: {ast.unparse(node)}"


def test_a_strategy_made_by_hand_says_how_to_resolve_its_companion(tiny):
    """A draft-model strategy nobody resolved fails with a message naming the way, instead of loading
    the model itself."""
    strategy = make_strategy({"name": "draft-model", "draft": "tiny-random@1"})
    request = Request(tiny.encode("x", chat=False), SamplingParams(max_new_tokens=2), strategy)
    with pytest.raises(InvalidRequestError, match="prepare_strategy"):
        tiny.engine.run([request])
    prepared = tiny.prepare_strategy({"name": "draft-model", "draft": "tiny-random@1"})
    request = Request(tiny.encode("x", chat=False), SamplingParams(max_new_tokens=2), prepared)
    assert len(tiny.engine.run([request])[0].token_ids) == 2
