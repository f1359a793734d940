"""The library surface: ``import fedmm_secure`` is light, names what it exports, and knows its version."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import fedmm_secure


def test_every_exported_name_resolves():
    assert len(fedmm_secure.__all__) == len(set(fedmm_secure.__all__))
    for name in fedmm_secure.__all__:
        assert getattr(fedmm_secure, name) is not None, name
    assert set(fedmm_secure.__all__) <= set(dir(fedmm_secure))


def test_version_comes_from_the_installed_metadata():
    assert fedmm_secure.__version__ == metadata.version("fedmm-secure")


def test_the_package_ships_its_type_hints():
    assert (Path(fedmm_secure.__file__).parent / "py.typed").is_file()


def test_import_loads_neither_torch_nor_the_backends():
    code = ("import sys, fedmm_secure; "
            "print(sorted(m for m in ('torch', 'opacus', 'numpy', 'fedmm_secure.secagg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_entry_points_are_the_workflows():
    from fedmm_secure.workflows.fedmm_run import run_experiment
    from fedmm_secure.workflows.pf_run import run_pf_experiment

    assert fedmm_secure.run_experiment is run_experiment
    assert fedmm_secure.run_pf_experiment is run_pf_experiment
