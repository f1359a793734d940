"""The examples run, at small sizes, as a user would run them (a fresh process each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, tmp_path: Path) -> dict:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--small"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {"dp_own_model.py", "custom_dataset.py", "custom_backend.py"}


def test_dp_on_your_own_model(tmp_path):
    s = _run("dp_own_model.py", tmp_path)
    assert 0.99 * s["target_epsilon"] <= s["epsilon"] <= s["target_epsilon"]
    assert s["steps"] == 20 and s["test_accuracy"] > 0.6


def test_custom_dataset_with_dp_and_masking(tmp_path):
    s = _run("custom_dataset.py", tmp_path)
    assert s["markets"] == ["de", "fr", "it"]
    assert s["secagg"] == {"backend": "masking", "secure": True, "aggregations": s["secagg"]["aggregations"]}
    assert all(0 < e <= 8.0 for e in s["epsilon"].values())


def test_custom_backend_passes_the_contract(tmp_path):
    s = _run("custom_backend.py", tmp_path)
    assert s["contract"] == "passed" and s["max_abs_error"] <= s["stated_bound"]


@pytest.mark.parametrize("name", ["custom_dataset.py", "custom_backend.py", "dp_own_model.py"])
def test_examples_use_the_public_api(name):
    # Library internals stay internal: examples import the package and its public subpackages.
    text = (EXAMPLES / name).read_text(encoding="utf-8")
    imports = [line for line in text.splitlines() if line.startswith(("import fedmm", "from fedmm"))]
    allowed = ("import fedmm_secure as fm", "from fedmm_secure.errors import", "from fedmm_secure.secagg import")
    assert imports and all(line.startswith(allowed) for line in imports), imports
