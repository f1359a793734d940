"""The named registry behind the extension points: names, re-registration, plugins."""

from __future__ import annotations

import sys
import types
from importlib import metadata

import pytest

from fedmm_secure import registry as registry_module
from fedmm_secure.config import config_from_dict
from fedmm_secure.data.loaders import DATASETS, load_data, register_dataset
from fedmm_secure.errors import ConfigError
from fedmm_secure.registry import Registry


def f():
    return 1


def test_names_and_re_registration():
    reg: Registry = Registry("thing")
    reg.register("a-1", f)
    reg.register("a-1", f)                       # the same definition again: fine
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("a-1", lambda: 2)
    reg.register("a-1", len, replace=True)
    assert reg.get("a-1") is len and reg.names() == ("a-1",) and "a-1" in reg
    for bad in ("", "A", "1x", "x:y", "x y", None):
        with pytest.raises(ConfigError, match="invalid name"):
            reg.register(bad, f)
    with pytest.raises(ConfigError, match="unknown thing 'b'") as info:
        reg.get("b")
    assert info.value.allowed == "a-1"


def test_plugins_are_imported_on_first_lookup(monkeypatch, tmp_path):
    reg: Registry = Registry("thing", entry_point_group="fedmm_secure.things")
    holder = types.ModuleType("registry_holder")
    holder.__dict__["reg"] = reg
    monkeypatch.setitem(sys.modules, "registry_holder", holder)
    # An installed plugin: importing its module is what registers it.
    (tmp_path / "fake_plugin.py").write_text("import registry_holder\nregistry_holder.reg.register('from-plugin', len)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [metadata.EntryPoint("from-plugin", "fake_plugin", "fedmm_secure.things"),
           metadata.EntryPoint("broken", "no_such_module_anywhere", "fedmm_secure.things")]
    monkeypatch.setattr(registry_module.metadata, "entry_points",
                        lambda group: [e for e in eps if e.group == group])
    assert reg.get("from-plugin") is len          # the broken plugin is logged and skipped
    assert reg.names() == ("from-plugin",)
    sys.modules.pop("fake_plugin", None)


def test_a_registered_dataset_works_in_a_run_config(tmp_path):
    from fedmm_secure.data.loaders import dataset_entry

    sample = dataset_entry("synthetic").sample
    register_dataset("registry-demo")(lambda path, *, seed, markets: sample())
    try:
        cfg = config_from_dict({"data": f"registry-demo:{tmp_path}", "markets": ["b"]})
        assert [m.name for m in load_data(cfg)] == ["b"]
        with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
            load_data(config_from_dict({"data": "nope:x"}))
    finally:
        DATASETS.unregister("registry-demo")
