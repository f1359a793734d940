"""Where a run's markets come from: the dataset registry and :func:`load_data`.

A run config names its data as ``name`` or ``name:PATH`` (``synthetic``, ``xmrec:PATH``,
``movielens:PATH``, ``aliexpress:PATH``, or any name a user registered). Each name maps to a
loader registered with :func:`register_dataset`::

    @register_dataset("mydata")
    def load_mydata(path, *, seed, markets, **options) -> list[MarketData]: ...

after which ``data: "mydata:/srv/logs"`` works in a run config. Every registered loader must pass
the dataset contract (:mod:`fedmm_secure.contracts.datasets`: per-market local ID spaces, labels
in {0, 1}, non-overlapping splits, required fields, determinism under a seed); the test suite
runs it on every registered dataset.

Also the evaluation-only helper :func:`shared_item_pairs`, which reads ``item_keys`` (original
item identifiers) to find the same product in two markets; training code must never call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from ..config import RunConfig, dataclass_from_overrides
from ..errors import ConfigError, DataError
from ..registry import Registry
from .aliexpress import load_aliexpress
from .implicit import ImplicitProtocol
from .market import MarketData
from .movielens import load_movielens
from .synthetic import MarketSpec, SyntheticConfig, generate_markets
from .xmrec import load_xmrec

__all__ = ["DatasetLoader", "DatasetEntry", "register_dataset", "available_datasets", "dataset_entry",
           "load_data", "load_markets", "shared_item_pairs"]


class DatasetLoader(Protocol):
    """``loader(path, *, seed, markets, **options) -> list[MarketData]``.

    ``path`` is the part after ``name:`` (``None`` for a dataset registered with
    ``needs_path=False``); ``seed`` drives every random choice (splits, sampled negatives), so the
    same seed gives the same markets; ``markets`` is the subset of market names asked for, or
    ``None`` for all (a hint: :func:`load_markets` filters the result anyway); ``options`` are
    the loader's own keyword settings. Raise :class:`~fedmm_secure.errors.DataError` for
    unusable data and :class:`~fedmm_secure.errors.ConfigError` for unknown options.
    """

    def __call__(self, path: Path | None, /, *, seed: int, markets: list[str] | None,
                 **options: Any) -> list[MarketData]: ...


L = TypeVar("L", bound=Callable[..., list[MarketData]])


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its loader, whether its spec carries a path, and an optional small
    ``sample()`` the contract suite loads to test it."""

    name: str
    loader: Callable[..., list[MarketData]]
    needs_path: bool = True
    sample: Callable[[], list[MarketData]] | None = None


DATASETS: Registry[DatasetEntry] = Registry("data.source", entry_point_group="fedmm_secure.datasets",
                                             definition=lambda e: e.loader)


def register_dataset(name: str, *, needs_path: bool = True,
                     sample: Callable[[], list[MarketData]] | None = None,
                     replace: bool = False) -> Callable[[L], L]:
    """Decorator: register ``loader`` (a :class:`DatasetLoader`) as dataset ``name``.

    ``needs_path``: the run config names it ``name:PATH`` (True) or plain ``name`` (False).
    ``sample``: a zero-argument callable returning a small instance (a few hundred rows); the
    contract suite runs on it, so a dataset registered with a sample is tested automatically.
    ``replace``: allow taking a name another loader holds. Returns the loader unchanged.
    Raises :class:`~fedmm_secure.errors.ConfigError` for a malformed or taken name.
    """
    def decorate(loader: L) -> L:
        if not callable(loader):
            raise ConfigError("data.source", f"loader for {name!r} must be callable")
        DATASETS.register(name, DatasetEntry(name, loader, bool(needs_path), sample), replace=replace)
        return loader
    return decorate


def available_datasets() -> tuple[str, ...]:
    """Names of every registered dataset (built-ins and plugins), sorted."""
    return DATASETS.names()


def dataset_entry(name: str) -> DatasetEntry:
    """The registration of dataset ``name``; :class:`ConfigError` if unknown."""
    return DATASETS.get(name)


def _allowed() -> str:
    return ", ".join(n if not DATASETS.get(n).needs_path else f"{n}:PATH" for n in DATASETS.names())


def load_markets(spec: str, *, seed: int, markets: list[str] | None = None, **options: Any) -> list[MarketData]:
    """The markets of dataset ``spec`` (``name`` or ``name:PATH``), restricted to ``markets``.

    ``options`` go to the dataset's loader (the file formats: ``encoding``; XMRec and MovieLens:
    ``negatives_per_positive``, ``ranking_negatives``, ``min_user_interactions``; AliExpress:
    ``item_column``, ``numerical_bins``, ``valid_fraction``, ``test_fraction``; synthetic:
    ``overrides``, a mapping of :class:`~fedmm_secure.data.synthetic.SyntheticConfig` fields). Raises ConfigError (field
    ``data.source``) for an unknown name or a malformed spec, DataError for what the loader
    returns if it is not a non-empty list of uniquely named markets.
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError("data.source", f"{spec!r} is not a dataset name", allowed=_allowed())
    name, colon, path = spec.partition(":")
    if name not in DATASETS:
        raise ConfigError("data.source", f"unknown dataset {name!r}", allowed=_allowed())
    entry = DATASETS.get(name)
    if entry.needs_path and not colon:
        raise ConfigError("data.source", f"{spec!r} is not of the form {name}:PATH", allowed=_allowed())
    if entry.needs_path and not path:
        raise ConfigError("data.source", f"{spec!r} has an empty path", allowed=_allowed())
    if not entry.needs_path and colon:
        raise ConfigError("data.source", f"dataset {name!r} takes no path", allowed=_allowed())
    if markets is not None and len(set(markets)) != len(markets):
        raise ConfigError("data.markets", "market names must be unique")
    out = entry.loader(Path(path).expanduser() if entry.needs_path else None, seed=seed, markets=markets,
                       **options)
    if not isinstance(out, list) or not out or not all(isinstance(m, MarketData) for m in out):
        raise DataError(f"dataset {name!r}: the loader must return a non-empty list of MarketData")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise DataError(f"dataset {name!r}: market names are not unique: {names}")
    if markets is not None:
        missing = [m for m in markets if m not in names]
        if missing:
            raise ConfigError("markets", f"unknown market(s) {missing}", allowed=", ".join(sorted(names)))
        out = [m for m in out if m.name in markets]
    return out


def load_data(cfg: RunConfig, *, synthetic: Callable[[], list[MarketData]] | None = None) -> list[MarketData]:
    """The run's markets: from ``cfg.data`` (``synthetic`` uses ``cfg.synthetic`` as its
    overrides; the ``synthetic`` argument replaces that generator), restricted to ``cfg.markets``."""
    markets = list(cfg.markets) if cfg.markets else None
    if cfg.data == "synthetic":
        if synthetic is not None:
            return load_markets("synthetic", seed=cfg.seed, markets=markets, generator=synthetic)
        return load_markets("synthetic", seed=cfg.seed, markets=markets, overrides=cfg.synthetic)
    return load_markets(cfg.data, seed=cfg.seed, markets=markets)


# ----------------------------------------------------------------------------- built-in datasets
def _implicit(loader: Callable[..., list[MarketData]]) -> Callable[..., list[MarketData]]:
    def load(path: Path, *, seed: int, markets: list[str] | None, negatives_per_positive: int = 4,
             ranking_negatives: int = 99, min_user_interactions: int = 3, encoding: str = "utf-8",
             **options: Any) -> list[MarketData]:
        if options:
            raise ConfigError("data.options", f"unknown option(s) {', '.join(sorted(options))}",
                              allowed="negatives_per_positive, ranking_negatives, min_user_interactions, encoding")
        protocol = ImplicitProtocol(negatives_per_positive=negatives_per_positive,
                                    ranking_negatives=ranking_negatives,
                                    min_user_interactions=min_user_interactions)
        return loader(path, seed=seed, markets=markets, protocol=protocol, encoding=encoding)
    load.__qualname__ = load.__name__ = f"load_{loader.__name__.removeprefix('load_')}_implicit"
    return load


def _aliexpress(path: Path, *, seed: int, markets: list[str] | None, encoding: str = "utf-8",
                **options: Any) -> list[MarketData]:
    # Explicit labels: the implicit-feedback protocol settings do not apply.
    allowed = {"item_column", "numerical_bins", "valid_fraction", "test_fraction"}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError("data.options", f"unknown option(s) {', '.join(sorted(unknown))}",
                          allowed=", ".join(sorted(allowed)))
    return load_aliexpress(path, seed=seed, markets=markets, encoding=encoding, **options)


def _synthetic(path: None, *, seed: int, markets: list[str] | None, overrides: dict[str, Any] | None = None,
               generator: Callable[[], list[MarketData]] | None = None) -> list[MarketData]:
    # ``markets`` (the subset asked for) is left to load_markets, which filters every dataset.
    out: list[MarketData]
    if generator is not None:  # another family's generator (PF-MSMTrec scenarios)
        out = generator()
    else:
        cfg = dataclass_from_overrides(SyntheticConfig, dict(overrides or {}), prefix="synthetic",
                                       nested={"markets": MarketSpec})
        out = generate_markets(cfg, seed=seed)
    for m in out:  # impressions are drawn with replacement: a pair may be shown (and clicked) again
        m.meta.setdefault("repeated_impressions", True)
    return out


def _small_synthetic() -> list[MarketData]:
    small = {"markets": [{"name": "a", "n_users": 60, "n_items": 40, "impressions_per_user": 8},
                         {"name": "b", "n_users": 40, "n_items": 30, "impressions_per_user": 6}]}
    return _synthetic(None, seed=0, markets=None, overrides=small)


register_dataset("synthetic", needs_path=False, sample=_small_synthetic)(_synthetic)
register_dataset("xmrec")(_implicit(load_xmrec))
register_dataset("movielens")(_implicit(load_movielens))
register_dataset("aliexpress")(_aliexpress)


def shared_item_pairs(markets: list[MarketData]) -> list[tuple[str, int, str, int]]:
    """``(market_a, local_item_a, market_b, local_item_b)`` for every item key present in two
    markets (each unordered pair of markets once, in list order). Evaluation only."""
    pairs: list[tuple[str, int, str, int]] = []
    for m in markets:
        if m.item_keys is None:
            raise DataError(f"market {m.name!r} has no item_keys; cross-market pairs are unknown")
        if len(m.item_keys) != m.n_items:
            raise DataError(f"market {m.name!r}: item_keys has {len(m.item_keys)} entries, expected {m.n_items}")
    for a in range(len(markets)):
        for b in range(a + 1, len(markets)):
            ma, mb = markets[a], markets[b]
            ka, kb = np.asarray(ma.item_keys), np.asarray(mb.item_keys)
            if ka.dtype.kind != kb.dtype.kind:
                ka, kb = ka.astype(str), kb.astype(str)
            _, ia, ib = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
            pairs.extend(zip([ma.name] * len(ia), ia.tolist(), [mb.name] * len(ib), ib.tolist()))
    return pairs
