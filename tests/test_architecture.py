"""The package's architecture, checked on its source with ``ast`` (no module is imported).

Fails on:

(a) an import cycle between modules of the package. Every import counts, also one inside a
    function: a lazy import still makes the two modules depend on each other, it only hides the
    cycle from the interpreter until the function runs;
(b) a private name (``_name``, not a dunder) taken from another module of ours, by
    ``from x import _name`` or ``x._name``: a helper several modules use is public in the module
    that owns it;
(c) a module over :data:`MAX_LINES` lines, except the files in :data:`OVERSIZE_ALLOWED`;
(d) an import against the layer order: ``primitives`` -> ``secagg`` -> ``privacy`` / ``models`` /
    ``data`` / ``audit`` -> ``federation`` -> ``runtime`` -> ``workflows`` -> ``cli`` (:data:`LAYERS`).
    ``errors``, ``config`` and ``registry`` are the shared basics every layer may use.

and on a ``print`` outside ``cli``: library code logs, the CLI owns the terminal.

Importing a package's submodule also runs the package's ``__init__``; that implicit edge is not
counted (a package ``__init__`` re-exporting its submodules is not a cycle).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import fedmm_secure

PACKAGE = "fedmm_secure"
ROOT = Path(fedmm_secure.__file__).parent
MAX_LINES = 500
# Files another change is splitting. This list must only ever shrink: remove an entry as soon as
# its file is under the limit (the test fails on a stale entry), never add one.
OVERSIZE_ALLOWED: frozenset[str] = frozenset()  # the two secagg backends are packages now

# Rank of each top-level part of the package: a module may import modules of its own rank or
# lower, never higher.
LAYERS: dict[str, int] = {
    "errors": 0, "config": 0, "metrics": 0, "registry": 0,
    "primitives": 1,
    "secagg": 2,
    "privacy": 3, "models": 3, "data": 3, "audit": 3, "benchmarks": 3,
    "reports": 4, "federation": 4, "contracts": 4,
    "runtime": 5,
    "workflows": 6,
    "cli": 7,
    "": 8,   # the package's own __init__: the public surface, on top of everything
}
BASICS = {"errors", "config", "registry"}


@dataclass(frozen=True)
class Import:
    source: str       # importing module (dotted)
    target: str       # imported module of ours (dotted)
    line: int
    names: tuple[str, ...] = ()   # for `from target import names`: names that are not modules


def module_name(path: Path, root: Path = ROOT, package: str = PACKAGE) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_package(root: Path = ROOT, package: str = PACKAGE) -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p, root, package): (p, ast.parse(p.read_text(encoding="utf-8"), filename=str(p)))
            for p in sorted(root.rglob("*.py"))}


def _base(source: str, is_package: bool, level: int, module: str | None) -> str:
    parts = source.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[:len(parts) - (level - 1)]
    return ".".join(parts + ([module] if module else []))


def imports_of(source: str, path: Path, tree: ast.Module, modules: set[str],
               package: str = PACKAGE) -> list[Import]:
    """Every import of a module of ours in ``tree``, wherever it appears (module level or not)."""
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    out.append(Import(source, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base(source, is_package, node.level, node.module)
            elif node.module and (node.module == package or node.module.startswith(package + ".")):
                base = node.module
            else:
                continue
            plain = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    out.append(Import(source, sub, node.lineno))
                else:
                    plain.append(alias.name)
            if plain:
                out.append(Import(source, base, node.lineno, tuple(plain)))
    return out


def module_aliases(source: str, path: Path, tree: ast.Module, modules: set[str],
                   package: str = PACKAGE) -> dict[str, str]:
    """Local names bound to modules of ours (``import a.b as x``, ``from a import b``)."""
    is_package = path.name == "__init__.py"
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    names[alias.asname or alias.name.split(".")[0]] = (alias.name if alias.asname else
                                                                        alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = (_base(source, is_package, node.level, node.module) if node.level else node.module or "")
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_uses(source: str, path: Path, tree: ast.Module, modules: set[str],
                 package: str = PACKAGE) -> list[str]:
    """``from x import _name`` and ``x._name`` where ``x`` is another module of ours."""
    found = []
    for imp in imports_of(source, path, tree, modules, package):
        for name in imp.names:
            if _is_private(name) and imp.target != source:
                found.append(f"{path}:{imp.line}: from {imp.target} import {name}")
    aliases = module_aliases(source, path, tree, modules, package)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        chain = _dotted(node)
        if not chain or chain[0] not in aliases:
            continue
        mod = aliases[chain[0]]
        for attr in chain[1:]:
            if f"{mod}.{attr}" in modules:
                mod = f"{mod}.{attr}"
                continue
            if _is_private(attr) and mod != source:
                found.append(f"{path}:{node.lineno}: {mod}.{attr}")
            break
    return sorted(set(found))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:   # Tarjan; the package is small enough for recursion
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def import_graph(package: dict[str, tuple[Path, ast.Module]], pkg: str = PACKAGE) -> dict[str, set[str]]:
    modules = set(package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, tree) in package.items():
        for imp in imports_of(name, path, tree, modules, pkg):
            if imp.target in modules and imp.target != name:
                graph[name].add(imp.target)
    return graph


def part(module: str) -> str:
    """Top-level part of the package a module belongs to (``""`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# ----------------------------------------------------------------------------- the tests
PKG = load_package()
MODULES = set(PKG)
GRAPH = import_graph(PKG)


def _edges(source_part: str) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in GRAPH.items() if part(m) == source_part for t in ts)


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in MODULES} <= set(LAYERS), {part(m) for m in MODULES} - set(LAYERS)


def test_no_import_cycles():
    assert find_cycles(GRAPH) == []


def test_no_private_names_across_modules():
    found = [use for name, (path, tree) in PKG.items()
             for use in private_uses(name, path.relative_to(ROOT.parent), tree, MODULES)]
    assert found == []


def test_no_module_over_the_line_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines()) for p, _ in PKG.values()}
    over = {f: n for f, n in sizes.items() if n > MAX_LINES and f not in OVERSIZE_ALLOWED}
    assert over == {}, f"split these modules (limit {MAX_LINES} lines)"
    stale = {f for f in OVERSIZE_ALLOWED if sizes.get(f, 0) <= MAX_LINES}
    assert stale == set(), "remove these from OVERSIZE_ALLOWED: they are gone or under the limit"


def test_layer_order():
    wrong = [(m, t) for m, ts in GRAPH.items() for t in ts if LAYERS[part(t)] > LAYERS[part(m)]]
    assert wrong == []


def test_primitives_import_nothing_of_ours_but_errors():
    # ``errors`` is the exception vocabulary (a leaf module importing nothing); nothing else.
    assert [(m, t) for m, t in _edges("primitives") if part(t) not in ("primitives", "errors")] == []


def test_secagg_builds_only_on_primitives():
    assert [(m, t) for m, t in _edges("secagg") if part(t) not in ({"secagg", "primitives"} | BASICS)] == []


def test_audit_never_imports_federation():
    assert [(m, t) for m, t in _edges("audit") if part(t) in ("federation", "runtime", "workflows", "cli")] == []


def test_federation_never_imports_a_runtime_or_backend():
    assert [(m, t) for m, t in _edges("federation") if part(t) in ("runtime", "secagg", "primitives")] == []


def test_only_cli_imports_cli_and_nothing_below_workflows_imports_workflows():
    assert [(m, t) for m, ts in GRAPH.items() for t in ts
            if part(t) == "cli" and part(m) not in ("cli", "")] == []
    assert [(m, t) for m, ts in GRAPH.items() for t in ts
            if part(t) == "workflows" and part(m) not in ("workflows", "cli", "")] == []


def test_only_the_cli_prints():
    # Library code logs (``logging.getLogger(__name__)``); the CLI owns the terminal.
    prints = [f"{path.relative_to(ROOT.parent)}:{node.lineno}" for name, (path, tree) in PKG.items()
              if part(name) != "cli" for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
    assert prints == []


def _declares_all(tree: ast.Module) -> bool:
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


def test_layered_modules_declare_their_public_names():
    parts = ("cli", "workflows", "federation", "runtime")
    assert [name for name, (_, tree) in PKG.items() if part(name) in parts and not _declares_all(tree)] == []


# ----------------------------------------------------------------------------- the checker itself
def _package_from(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[Path, ast.Module]]:
    root = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return load_package(root, "pkg")


def test_checker_sees_a_cycle_through_a_lazy_import(tmp_path):
    pkg = _package_from(tmp_path, {"a.py": "from .b import x\n",
                                   "b.py": "def f():\n    from . import a\n    return a\nx = 1\n"})
    assert find_cycles(import_graph(pkg, "pkg")) == [["pkg.a", "pkg.b"]]


def test_checker_sees_private_names_taken_from_other_modules(tmp_path):
    pkg = _package_from(tmp_path, {"a.py": "_x = 1\ny = 2\n",
                                   "b.py": "from .a import _x, y\nfrom . import a\nz = a._x\n",
                                   "sub/__init__.py": "", "sub/c.py": "from ..a import _x\n"})
    found = [u for n, (p, t) in pkg.items() for u in private_uses(n, p, t, set(pkg), "pkg")]
    assert len(found) == 3
    assert any("from pkg.a import _x" in u and "b.py" in u for u in found)
    assert any("pkg.a._x" in u for u in found)
    assert any("c.py" in u for u in found)
