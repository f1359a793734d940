"""One entry point for a run's markets: :func:`load_data` (synthetic or real, from a run config)
and, for real data, ``load_markets("xmrec:PATH", seed=...)`` and friends.

Also the evaluation-only helper :func:`shared_item_pairs`, which reads ``item_keys`` (original
item identifiers) to find the same product in two markets; training code must never call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..config import RunConfig, dataclass_from_overrides
from ..errors import ConfigError, DataError
from .aliexpress import load_aliexpress
from .implicit import ImplicitProtocol
from .market import MarketData
from .movielens import load_movielens
from .synthetic import MarketSpec, SyntheticConfig, generate_markets
from .xmrec import load_xmrec

__all__ = ["SCHEMES", "load_data", "load_markets", "shared_item_pairs"]


def _implicit(loader: Callable[..., list[MarketData]]) -> Callable[..., list[MarketData]]:
    def run(path, *, markets, seed, negatives_per_positive, ranking_negatives, min_user_interactions,
            encoding, **options):
        if options:
            raise ConfigError("data.options", f"unknown option(s) {', '.join(sorted(options))}",
                              allowed="none for this format")
        protocol = ImplicitProtocol(negatives_per_positive=negatives_per_positive,
                                    ranking_negatives=ranking_negatives,
                                    min_user_interactions=min_user_interactions)
        return loader(path, seed=seed, markets=markets, protocol=protocol, encoding=encoding)
    return run


def _aliexpress(path, *, markets, seed, negatives_per_positive, ranking_negatives, min_user_interactions,
                encoding, **options):
    # Explicit labels: the implicit-feedback protocol settings do not apply and are ignored.
    allowed = {"item_column", "numerical_bins", "valid_fraction", "test_fraction"}
    unknown = set(options) - allowed
    if unknown:
        raise ConfigError("data.options", f"unknown option(s) {', '.join(sorted(unknown))}",
                          allowed=", ".join(sorted(allowed)))
    return load_aliexpress(path, seed=seed, markets=markets, encoding=encoding, **options)


SCHEMES: dict[str, Callable[..., list[MarketData]]] = {
    "xmrec": _implicit(load_xmrec),
    "movielens": _implicit(load_movielens),
    "aliexpress": _aliexpress,
}


def load_markets(
    spec: str,
    *,
    seed: int,
    markets: list[str] | None = None,
    negatives_per_positive: int = 4,
    ranking_negatives: int = 99,
    min_user_interactions: int = 3,
    encoding: str = "utf-8",
    **format_options,
) -> list[MarketData]:
    """Load real markets from ``spec`` = ``SCHEME:PATH`` (``xmrec``, ``movielens``, ``aliexpress``).

    ``format_options`` go to the format's loader (AliExpress: ``item_column``, ``numerical_bins``,
    ``valid_fraction``, ``test_fraction``).
    """
    allowed = ", ".join(f"{s}:PATH" for s in SCHEMES)
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError("data.source", f"{spec!r} is not of the form SCHEME:PATH", allowed=allowed)
    scheme, _, path = spec.partition(":")
    if scheme not in SCHEMES:
        raise ConfigError("data.source", f"unknown data scheme {scheme!r}", allowed=allowed)
    if not path:
        raise ConfigError("data.source", f"{spec!r} has an empty path", allowed=allowed)
    if markets is not None and len(set(markets)) != len(markets):
        raise ConfigError("data.markets", "market names must be unique")
    return SCHEMES[scheme](Path(path).expanduser(), markets=markets, seed=seed,
                           negatives_per_positive=negatives_per_positive,
                           ranking_negatives=ranking_negatives,
                           min_user_interactions=min_user_interactions,
                           encoding=encoding, **format_options)


def _synthetic_config(overrides: dict) -> SyntheticConfig:
    return dataclass_from_overrides(SyntheticConfig, overrides, prefix="synthetic", nested={"markets": MarketSpec})


def load_data(cfg: RunConfig, *, synthetic: Callable[[], list[MarketData]] | None = None) -> list[MarketData]:
    """The run's markets: generated (``synthetic`` overrides the default generator) or loaded
    from ``cfg.data``, restricted to ``cfg.markets``."""
    if cfg.data == "synthetic":
        markets = (synthetic() if synthetic is not None
                   else generate_markets(_synthetic_config(cfg.synthetic), seed=cfg.seed))
    else:
        markets = load_markets(cfg.data, seed=cfg.seed, markets=list(cfg.markets) if cfg.markets else None)
    if cfg.markets and cfg.data == "synthetic":
        names = {m.name for m in markets}
        missing = [m for m in cfg.markets if m not in names]
        if missing:
            raise ConfigError("markets", f"unknown market(s) {missing}", allowed=", ".join(sorted(names)))
        markets = [m for m in markets if m.name in cfg.markets]
    return markets


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
