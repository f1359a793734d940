"""The ledger package stays reviewable: small modules, no private names shared across modules,
no import cycle between its modules."""

from __future__ import annotations

import ast
from pathlib import Path

import fedmm_secure.privacy.ledger as ledger_pkg

PKG = Path(ledger_pkg.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PKG.glob("*.py"))}


def _local_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module inside the package, imported names) for every relative import of a sibling."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.append((node.module.split(".")[0], [a.name for a in node.names]))
            else:  # from . import sibling
                out += [(a.name, []) for a in node.names]
    return out


def test_every_module_is_under_500_lines():
    for p in PKG.glob("*.py"):
        n = len(p.read_text(encoding="utf-8").splitlines())
        assert n < 500, f"{p.name} has {n} lines"


def test_no_private_name_is_imported_from_a_sibling_module():
    for name, tree in _modules().items():
        for module, names in _local_imports(tree):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{name} imports private {private} from {module}"
            assert not module.startswith("_"), f"{name} imports private module {module}"


def test_no_import_cycle_between_the_modules():
    graph = {name: {m for m, _ in _local_imports(tree)} - {name} for name, tree in _modules().items()}
    graph.pop("__init__")   # the package facade imports everything; nothing imports it back
    for deps in graph.values():
        assert "__init__" not in deps
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for start in graph:
        if start not in state:
            visit(start, [start])
