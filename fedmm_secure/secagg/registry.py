"""Backend registry: the one place that maps a backend name to its implementation.

Extension point: a secure-aggregation backend is a :class:`~fedmm_secure.secagg.base.SecureAggregator`
subclass (``name``, ``secure``, ``create_market``, ``create_aggregator``) registered with
:func:`register_backend`; a run selects it by name (``secagg`` in the run config, or
:func:`create_backend`). Every registered backend must pass the backend contract
(:mod:`fedmm_secure.contracts.backends`): the decoded sum equals the plain sum within the error
bound its rounds report (``max_abs_error_bound``), malformed inputs and messages are refused, and
a backend that is not secure is refused unless requested by name with ``allow_insecure=True``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import ConfigError
from .base import SecureAggregator

__all__ = ["register_backend", "create_backend", "available_backends"]

_BACKENDS: dict[str, Callable[..., SecureAggregator]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


def register_backend(name: str, factory: Callable[..., SecureAggregator]) -> None:
    """Register ``factory(**options) -> SecureAggregator`` (usually the class) as backend ``name``.

    Registering a name again replaces the factory (backends register themselves on import).
    Raises :class:`~fedmm_secure.errors.ConfigError` for a malformed name or a factory that is
    not callable.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError("secagg", f"invalid backend name {name!r}",
                          allowed="lower-case letters, digits, '_' and '-', starting with a letter")
    if not callable(factory):
        raise ConfigError("secagg", f"factory of backend {name!r} must be callable")
    _BACKENDS[name] = factory


def available_backends() -> tuple[str, ...]:
    """Names of every registered backend (built-ins whose optional dependency is installed,
    and every backend registered so far), sorted."""
    _load_builtin()
    return tuple(sorted(_BACKENDS))


def _load_builtin() -> None:
    if "plain" not in _BACKENDS:
        from .plain import PlainAggregator
        register_backend("plain", PlainAggregator)
    # Optional backends register themselves on import; a missing optional dependency only
    # removes that backend from the list.
    for mod in ("masking", "ckks"):
        if mod not in _BACKENDS:
            try:
                __import__(f"{__package__}.{mod}")
            except ImportError:
                pass


def create_backend(name: str, *, allow_insecure: bool, **options) -> SecureAggregator:
    """Build backend ``name`` with its ``options`` (keyword arguments of its factory).

    A backend that is not secure (``secure = False``: ``plain``, which sends vectors in the
    clear) is refused unless ``allow_insecure`` is True, so it cannot be selected by accident in
    a privacy run. Raises :class:`~fedmm_secure.errors.ConfigError` for an unknown name, a
    refused insecure backend, or a factory that does not build a ``SecureAggregator``.
    """
    names = available_backends()
    if name not in _BACKENDS:
        raise ConfigError("secagg", f"unknown backend {name!r}", allowed=", ".join(names))
    factory = _BACKENDS[name]
    refused = ConfigError("secagg", f"backend {name!r} is not secure and must be requested explicitly",
                          allowed=", ".join(n for n in names if getattr(_BACKENDS[n], "secure", None) is not False))
    if getattr(factory, "secure", None) is False and not allow_insecure:
        raise refused
    backend = factory(**options)
    if not isinstance(backend, SecureAggregator):
        raise ConfigError("secagg", f"backend {name!r} built {type(backend).__name__}, not a SecureAggregator")
    # A factory function hides the class's flag until it has run: check the built object too.
    if backend.secure is not True and not allow_insecure:
        raise refused
    return backend
