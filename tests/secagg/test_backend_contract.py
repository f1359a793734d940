"""Every registered secure-aggregation backend passes the backend contract
(fedmm_secure.contracts.backends), plus the registry's own guards."""

from __future__ import annotations

import pytest

from fedmm_secure.contracts import BACKEND_CHECKS
from fedmm_secure.secagg import registry
from fedmm_secure.errors import ConfigError
from fedmm_secure.secagg import available_backends, create_backend, register_backend
from fedmm_secure.secagg.plain import PlainAggregator


@pytest.mark.parametrize("check", sorted(BACKEND_CHECKS))
@pytest.mark.parametrize("name", available_backends())
def test_registered_backend_passes(name, check):
    BACKEND_CHECKS[check](name, {})


@pytest.fixture
def scratch_registry(monkeypatch):
    """Backends registered by a test vanish after it."""
    available_backends()
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))


def test_an_insecure_backend_behind_a_factory_function_is_still_refused(scratch_registry):
    # The factory hides the class's `secure = False`; the registry checks the built object too.
    register_backend("contract-insecure", lambda **kw: PlainAggregator(**kw))
    with pytest.raises(ConfigError, match="not secure"):
        create_backend("contract-insecure", allow_insecure=False)
    BACKEND_CHECKS["insecure_only_by_name"]("contract-insecure", {})


def test_registry_refuses_bad_names_and_non_backends(scratch_registry):
    with pytest.raises(ConfigError, match="invalid backend name"):
        register_backend("Not A Name", PlainAggregator)
    register_backend("contract-object", lambda **kw: object())
    with pytest.raises(ConfigError, match="not a SecureAggregator"):
        create_backend("contract-object", allow_insecure=True)
