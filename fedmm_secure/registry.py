"""A small named registry: the one mechanism behind every extension point of the library.

Datasets (:func:`fedmm_secure.register_dataset`) and CTR models
(:func:`fedmm_secure.register_ctr_model`) are kept in a :class:`Registry`. Registration is
explicit (a decorator call in the user's code) or, for installed plugins, a Python entry point
in the registry's group: a package that declares, for example::

    [project.entry-points."fedmm_secure.datasets"]
    mydata = "mypackage.data"

has ``mypackage.data`` imported the first time a name is looked up that is not registered yet,
so the command line and the distributed workers (separate processes that never ran the user's
script) find the plugin too. Importing the module is what registers it.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

from .errors import ConfigError

__all__ = ["Registry", "NAME_PATTERN"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Names appear in run configs as ``name`` or ``name:PATH``, so no ':' and no spaces.
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


class Registry(Generic[T]):
    """Name -> implementation, with validation and entry-point discovery.

    ``kind`` names the registry in errors (it is the config field a user got wrong);
    ``entry_point_group`` is the plugin group searched for names not registered yet;
    ``definition(item)`` is the function or class an item was made from (default: the item),
    compared when a name is registered again.
    """

    def __init__(self, kind: str, *, entry_point_group: str | None = None,
                 definition: Callable[[T], object] | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._definition: Callable[[T], object] = definition or (lambda item: item)
        self._items: dict[str, T] = {}
        self._plugins_loaded = entry_point_group is None

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``; returns ``item``.

        Raises :class:`ConfigError` for a malformed name, or for a name already taken by a
        different implementation unless ``replace=True`` (re-registering the same definition,
        as when a module is imported twice, is allowed).
        """
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(self.kind, f"invalid name {name!r}",
                              allowed="lower-case letters, digits, '_' and '-', starting with a letter")
        old = self._items.get(name)
        if old is not None and not replace and not _same_definition(self._definition(old), self._definition(item)):
            raise ConfigError(self.kind, f"{name!r} is already registered ({_describe(old)})",
                              allowed="another name, or replace=True")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests; a no-op if it is not registered)."""
        self._items.pop(name, None)

    def get(self, name: str) -> T:
        """The implementation registered as ``name``; :class:`ConfigError` listing the known
        names if there is none (after loading plugins)."""
        if name not in self._items:
            self.load_plugins()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ConfigError(self.kind, f"unknown {self.kind} {name!r}",
                              allowed=", ".join(self.names()) or "none registered") from None

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted (plugins included)."""
        self.load_plugins()
        return tuple(sorted(self._items))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def load_plugins(self) -> None:
        """Import every module declared in the entry-point group (once). A plugin that fails to
        import is logged and skipped: it must not break runs that do not use it."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group or ""):
            try:
                importlib.import_module(ep.value.split(":")[0])
            except Exception as exc:  # a broken third-party plugin; the error is kept in the log
                log.warning("%s plugin %r (%s) failed to load: %s", self.kind, ep.name, ep.value, exc)


def _same_definition(a: object, b: object) -> bool:
    # The same function or class, or one defined again (a script run twice, a module reloaded).
    if a is b:
        return True
    key: Callable[[object], tuple[str | None, str | None]] = lambda o: (
        getattr(o, "__module__", None), getattr(o, "__qualname__", None))
    return key(a) == key(b) and key(a) != (None, None)


def _describe(item: object) -> str:
    module, qualname = getattr(item, "__module__", None), getattr(item, "__qualname__", None)
    return f"{module}.{qualname}" if qualname else type(item).__name__
