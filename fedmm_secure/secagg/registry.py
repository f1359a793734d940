"""Backend registry: the one place that maps a backend name to its implementation."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .base import SecureAggregator

__all__ = ["register_backend", "create_backend", "available_backends"]

_BACKENDS: dict[str, Callable[..., SecureAggregator]] = {}


def register_backend(name: str, factory: Callable[..., SecureAggregator]) -> None:
    _BACKENDS[name] = factory


def available_backends() -> tuple[str, ...]:
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
    """Build a backend by name. ``plain`` is refused unless ``allow_insecure`` is True, so it
    cannot be selected by accident in a privacy run."""
    names = available_backends()
    if name not in _BACKENDS:
        raise ConfigError("secagg", f"unknown backend {name!r}", allowed=", ".join(names))
    factory = _BACKENDS[name]
    backend_cls = getattr(factory, "secure", None)
    if backend_cls is False and not allow_insecure:
        raise ConfigError("secagg", "backend 'plain' is not secure and must be requested explicitly",
                          allowed="masking, ckks")
    return factory(**options)
