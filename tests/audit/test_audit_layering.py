"""Layering and randomness rules for the audit package, checked on its source."""

from __future__ import annotations

import ast
from pathlib import Path

import fedmm_secure.audit as audit_pkg

AUDIT_DIR = Path(audit_pkg.__file__).parent
ALLOWED_NP_RANDOM = {"default_rng", "SeedSequence", "Generator"}


def _modules():
    files = sorted(AUDIT_DIR.glob("*.py"))
    assert len(files) >= 8
    return [(f, ast.parse(f.read_text())) for f in files]


def test_audit_never_imports_federation():
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for name in names:
                assert "federation" not in name, f"{path.name} imports {name}"


def test_no_global_numpy_random_state():
    for path, tree in _modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "random" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "np"):
                assert node.attr in ALLOWED_NP_RANDOM, f"{path.name} uses np.random.{node.attr}"


def test_public_api_is_explicit():
    assert len(audit_pkg.__all__) == len(set(audit_pkg.__all__))
    for name in audit_pkg.__all__:
        assert hasattr(audit_pkg, name), name
