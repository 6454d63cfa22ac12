"""The import rules of STYLE §2, checked on the source."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "facetrt"
STDLIB = set(sys.stdlib_module_names)

# layer -> third-party modules and facetrt modules it may import
RULES: dict[str, tuple[set[str], set[str]]] = {
    "client": ({"anyio", "msgpack"}, {"_errors", "_values", "protocol", "client"}),
    "protocol": ({"msgpack"}, {"_errors", "_ids", "_values", "protocol"}),
    "storage": ({"lmdb"}, {"_errors", "_ids", "storage"}),
    "data": (
        {"lmdb", "msgpack", "trio"},
        {"_errors", "_ids", "_json", "_values", "config", "storage", "runtime", "data"},
    ),
    "runtime": (
        {"trio", "outcome", "msgpack"},
        {"_errors", "_fetch", "_ids", "_values", "config", "storage", "runtime"},
    ),
    "policy": (
        {"trio", "lmdb", "httpx", "httpcore", "h11", "pydantic", "cryptography"},
        {"_errors", "_fetch", "_ids", "storage", "policy"},
    ),
}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute facetrt-relative or third-party module, level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    third_party, internal = RULES[layer]
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for module, level in _imports(path):
            top = module.split(".")[0]
            if level == 0:
                if top == "facetrt":
                    top = module.split(".")[1]
                    assert top in internal, f"{path.name} imports facetrt.{top}"
                else:
                    assert top in STDLIB | third_party | {"__future__"}, f"{path.name}: {module}"
            elif level == 1:
                continue  # same package
            else:
                assert top in internal, f"{path.name} imports ..{module}"


def test_no_module_level_print_or_global_registry() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "print", f"print in {path}"
