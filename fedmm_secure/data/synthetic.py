"""Seeded synthetic multi-market generator (no downloads).

Items and users of every market are drawn from a set of latent clusters shared by all markets
("what a product is") plus a market-specific component whose size is the heterogeneity knob
("how this market sees it"). Click probability follows the user-item affinity in the latent
space; conversions happen after clicks with a market-specific propensity. ID spaces are disjoint
by construction: each market numbers its own users and items from 0, and nothing links an item in
one market to an item in another except the latent cluster it was drawn from, which is kept as
ground truth (``item_cluster``) for measuring code quality, never for training.

Side features are shared in *meaning* across markets (a coarse category derived noisily from the
cluster, a price band; for users an age band and a device type), which is what lets federated
models align the disjoint ID spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .market import MarketData, MarketSplit

__all__ = ["MarketSpec", "SyntheticConfig", "generate_markets"]


@dataclass(frozen=True)
class MarketSpec:
    name: str
    n_users: int
    n_items: int
    impressions_per_user: int


def _default_markets() -> tuple[MarketSpec, ...]:
    # One rich market and three sparse ones, as in real multi-market data.
    return (
        MarketSpec("rich", 2000, 800, 40),
        MarketSpec("sparse_a", 900, 600, 8),
        MarketSpec("sparse_b", 800, 500, 8),
        MarketSpec("sparse_c", 700, 450, 8),
    )


@dataclass(frozen=True)
class SyntheticConfig:
    markets: tuple[MarketSpec, ...] = field(default_factory=_default_markets)
    n_clusters: int = 16
    latent_dim: int = 16
    heterogeneity: float = 0.5       # std of the market-specific component relative to the shared one
    item_noise: float = 0.6          # idiosyncratic item component
    user_noise: float = 0.6
    affinity_scale: float = 2.2
    base_click_logit: float = -1.4
    category_noise: float = 0.3      # probability that an item's category is not its cluster's
    n_categories: int = 8
    conversion_logit: float = -0.5
    valid_fraction: float = 0.1
    test_fraction: float = 0.2
    # Size multiplier: every market's users and items times ``scale`` (impressions per user
    # unchanged), so rows grow linearly while density and the click model stay the same. Lets
    # anyone reproduce a run of real size (millions of rows) without downloading data.
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.markets:
            raise ConfigError("data.markets", "at least one market is required")
        names = [m.name for m in self.markets]
        if len(set(names)) != len(names):
            raise ConfigError("data.markets", "market names must be unique")
        for m in self.markets:
            if m.n_users < 2 or m.n_items < 2 or m.impressions_per_user < 1:
                raise ConfigError("data.markets", f"market {m.name!r} is too small",
                                  allowed="n_users >= 2, n_items >= 2, impressions_per_user >= 1")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not 0 < self.scale <= 10_000:
            raise ConfigError("synthetic.scale", f"must be a number in (0, 10000], got {self.scale!r}")
        if self.n_clusters < 2:
            raise ConfigError("data.n_clusters", "must be >= 2")
        if self.heterogeneity < 0:
            raise ConfigError("data.heterogeneity", "must be >= 0")
        if not 0 <= self.category_noise <= 1:
            raise ConfigError("data.category_noise", "must be in [0, 1]")
        if not (0 < self.valid_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise ConfigError("data.test_fraction", "valid and test fractions must be in (0, 0.5)")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_markets(cfg: SyntheticConfig, *, seed: int) -> list[MarketData]:
    """Generate every market of ``cfg`` deterministically from ``seed``."""
    root = np.random.default_rng(seed)
    d = cfg.latent_dim
    centers = root.normal(size=(cfg.n_clusters, d))
    # Category is a coarse, shared-meaning view of the cluster (several clusters per category).
    cluster_category = root.integers(0, cfg.n_categories, size=cfg.n_clusters)
    cluster_price = root.integers(0, 4, size=cfg.n_clusters)
    conv_direction = root.normal(size=d) / np.sqrt(d)
    out = []
    for spec in _scaled(cfg.markets, cfg.scale):
        rng = np.random.default_rng(root.integers(0, 2**63 - 1))
        out.append(_one_market(cfg, spec, rng, centers, cluster_category, cluster_price, conv_direction))
    return out


def _scaled(markets: tuple[MarketSpec, ...], scale: float) -> tuple[MarketSpec, ...]:
    if scale == 1:
        return markets  # bit-identical to the generator before scaling existed
    return tuple(MarketSpec(m.name, max(2, round(m.n_users * scale)), max(2, round(m.n_items * scale)),
                            m.impressions_per_user) for m in markets)


def _one_market(cfg, spec, rng, centers, cluster_category, cluster_price, conv_direction) -> MarketData:
    k, d = centers.shape
    # Market-specific view of each shared cluster, and market-specific cluster popularity.
    market_shift = rng.normal(scale=cfg.heterogeneity, size=(k, d))
    cluster_pop = rng.dirichlet(np.full(k, 2.0))
    item_cluster = rng.choice(k, size=spec.n_items, p=cluster_pop)
    item_vec = (centers[item_cluster] + market_shift[item_cluster]
                + rng.normal(scale=cfg.item_noise, size=(spec.n_items, d)))
    item_bias = rng.normal(scale=0.5, size=spec.n_items)
    # Users like one main cluster and a bit of a second.
    fav = rng.choice(k, size=(spec.n_users, 2), p=cluster_pop)
    user_vec = (0.8 * (centers[fav[:, 0]] + market_shift[fav[:, 0]])
                + 0.4 * (centers[fav[:, 1]] + market_shift[fav[:, 1]])
                + rng.normal(scale=cfg.user_noise, size=(spec.n_users, d)))
    market_conv = rng.normal(scale=0.5)

    # Impressions: popularity-skewed exposure, so sparse markets have a long tail of rare items.
    exposure = rng.zipf(1.6, size=spec.n_items).astype(np.float64)
    exposure = np.minimum(exposure, 50.0)
    exposure /= exposure.sum()
    n = spec.n_users * spec.impressions_per_user
    users = np.repeat(np.arange(spec.n_users), spec.impressions_per_user)
    items = rng.choice(spec.n_items, size=n, p=exposure)
    aff = np.einsum("nd,nd->n", user_vec[users], item_vec[items]) / np.sqrt(d)
    p_click = _sigmoid(cfg.base_click_logit + cfg.affinity_scale * aff / np.sqrt(2.0) + item_bias[items])
    click = (rng.random(n) < p_click).astype(np.float32)
    p_conv = _sigmoid(cfg.conversion_logit + market_conv + 2.0 * item_vec[items] @ conv_direction / np.sqrt(d))
    conversion = (click * (rng.random(n) < p_conv)).astype(np.float32)

    # Side features with shared meaning across markets.
    noisy = rng.random(spec.n_items) < cfg.category_noise
    category = np.where(noisy, rng.integers(0, cfg.n_categories, spec.n_items), cluster_category[item_cluster])
    price = np.clip(cluster_price[item_cluster] + rng.integers(-1, 2, spec.n_items), 0, 3)
    item_features = np.stack([category, price], axis=1).astype(np.int64)
    user_features = np.stack([rng.integers(0, 6, spec.n_users), rng.integers(0, 3, spec.n_users)],
                             axis=1).astype(np.int64)

    perm = rng.permutation(n)
    n_test = int(round(cfg.test_fraction * n))
    n_valid = int(round(cfg.valid_fraction * n))
    test_idx, valid_idx, train_idx = perm[:n_test], perm[n_test:n_test + n_valid], perm[n_test + n_valid:]
    full = MarketSplit(users.astype(np.int64), items.astype(np.int64), click, conversion)
    return MarketData(
        name=spec.name,
        n_users=spec.n_users,
        n_items=spec.n_items,
        train=full.subset(np.sort(train_idx)),
        valid=full.subset(np.sort(valid_idx)),
        test=full.subset(np.sort(test_idx)),
        user_features=user_features,
        item_features=item_features,
        user_feature_cards=(6, 3),
        item_feature_cards=(cfg.n_categories, 4),
        item_cluster=item_cluster.astype(np.int64),
        meta={"source": "synthetic", "impressions": n},
    )
