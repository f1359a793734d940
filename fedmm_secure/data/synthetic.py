"""Seeded synthetic multi-market generator (no downloads).

Items and users of every market are drawn from a set of latent clusters shared by all markets
("what a product is") mixed with a market-specific component ("how this market sees it"):
a market's view of cluster ``c`` is ``sqrt(1 - h^2) * shared_c + h * specific_c`` with both
parts standard normal, so the heterogeneity ``h`` in [0, 1] changes *how* markets differ, never
*how much* signal there is (the view's variance is the same for every ``h``). Click probability follows the user-item affinity in the latent
space; conversions happen after clicks with a market-specific propensity. Each market numbers its
own users and items from 0; the latent cluster an item was drawn from is kept as ground truth
(``item_cluster``) for measuring code quality, never for training.

Catalogues overlap as real ones do. A fraction ``catalogue_overlap`` of each market's products is
drawn from one world catalogue under a public key (``item_keys``, like an ASIN); the rest are
listed by that market alone (key ``"<market>/<id>"``). A world product has the same cluster, the
same public attributes and the same own component in every market listing it, mixed with the
market's view exactly like the clusters (``sqrt(1 - h^2) * product + h * market-specific``, vector
and bias): the same thing everywhere, seen through each market's eyes. The default 0.5 is below
what real multi-market catalogues show (XMRec Electronics: 46% to 93% of a market's products are
listed in another market); it was set from that statistic, not from any method's results. With 0
the catalogues are disjoint, no keys exist, and the data are bit-identical to the generator
before overlap existed.

Side features are public and shared in *meaning* across markets: for items a coarse category
derived noisily from the cluster and a price band; for users an interest segment (the category of
their favourite cluster, noisily) and a price sensitivity (their favourite cluster's price band,
noisily). With the public keys, they are what lets federated models align the markets' ID spaces.

References for judging methods (never training inputs): ``meta["test_p_click"]`` holds the true
click probability of every test row (its AUC is the Bayes AUC), ``item_cluster`` the true shared
cluster of every item (codes equal to it are the oracle codes).
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
    heterogeneity: float = 0.5       # h in [0, 1]: weight of the market-specific view (variance-preserving)
    user_attr_noise: float = 0.3     # probability that a user attribute is random instead of meaningful
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
    # Fraction of each market's products drawn from the world catalogue (public keys, listed by
    # several markets); 0 = disjoint catalogues without keys.
    catalogue_overlap: float = 0.5

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
        if isinstance(self.catalogue_overlap, bool) or not isinstance(self.catalogue_overlap, (int, float)) \
                or not 0 <= self.catalogue_overlap <= 1:
            raise ConfigError("synthetic.catalogue_overlap", f"must be a number in [0, 1], got {self.catalogue_overlap!r}")
        if not 0 <= self.heterogeneity <= 1:
            raise ConfigError("data.heterogeneity", "must be in [0, 1]")
        if not 0 <= self.user_attr_noise <= 1:
            raise ConfigError("data.user_attr_noise", "must be in [0, 1]")
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
    specs = _scaled(cfg.markets, cfg.scale)
    # The world catalogue has its own generator, so disjoint catalogues (overlap 0) draw exactly
    # what they drew before overlap existed.
    world = _world_catalogue(cfg, specs, np.random.default_rng([seed, 1]), cluster_category, cluster_price) if cfg.catalogue_overlap > 0 else None
    out = []
    for spec in specs:
        rng = np.random.default_rng(root.integers(0, 2**63 - 1))
        out.append(_one_market(cfg, spec, rng, centers, cluster_category, cluster_price, conv_direction, world))
    return out


def _world_catalogue(cfg: SyntheticConfig, specs: tuple[MarketSpec, ...], rng: np.random.Generator,
                     cluster_category: np.ndarray, cluster_price: np.ndarray) -> dict:
    """Products several markets may list: cluster, own component and bias, shared everywhere.

    The world holds as many products as the largest market takes from it, so the largest market
    lists all of them and every smaller market's world products are also listed there.
    """
    n_world = max(_n_listed_from_world(cfg, s) for s in specs)
    pop = rng.dirichlet(np.full(cfg.n_clusters, 2.0))
    cluster = rng.choice(cfg.n_clusters, size=n_world, p=pop)
    # Public attributes, drawn as for a market's own products (same noise), once per product.
    noisy = rng.random(n_world) < cfg.category_noise
    return {
        "rng": rng,
        "cluster": cluster,
        "vec": rng.normal(scale=cfg.item_noise, size=(n_world, cfg.latent_dim)),
        "bias": rng.normal(scale=0.5, size=n_world),
        "category": np.where(noisy, rng.integers(0, cfg.n_categories, n_world), cluster_category[cluster]),
        "price": np.clip(cluster_price[cluster] + rng.integers(-1, 2, n_world), 0, 3),
    }


def _n_listed_from_world(cfg: SyntheticConfig, spec: MarketSpec) -> int:
    return min(spec.n_items, int(round(cfg.catalogue_overlap * spec.n_items)))


def _scaled(markets: tuple[MarketSpec, ...], scale: float) -> tuple[MarketSpec, ...]:
    if scale == 1:
        return markets  # bit-identical to the generator before scaling existed
    return tuple(MarketSpec(m.name, max(2, round(m.n_users * scale)), max(2, round(m.n_items * scale)),
                            m.impressions_per_user) for m in markets)


def _one_market(cfg, spec, rng, centers, cluster_category, cluster_price, conv_direction, world) -> MarketData:
    k, d = centers.shape
    # Market-specific view of each shared cluster: a variance-preserving mix, so heterogeneity
    # moves the markets apart without making any market's signal weaker or stronger.
    h = cfg.heterogeneity
    view = np.sqrt(1.0 - h * h) * centers + h * rng.normal(size=(k, d))
    cluster_pop = rng.dirichlet(np.full(k, 2.0))
    item_cluster = rng.choice(k, size=spec.n_items, p=cluster_pop)
    item_vec = view[item_cluster] + rng.normal(scale=cfg.item_noise, size=(spec.n_items, d))
    item_bias = rng.normal(scale=0.5, size=spec.n_items)
    item_keys = world_slots = world_products = None
    if world is not None:
        item_cluster, item_vec, item_bias, item_keys, world_slots, world_products = _list_world_products(
            cfg, spec, world, view, item_cluster, item_vec, item_bias)
    # Users like one main cluster and a bit of a second.
    fav = rng.choice(k, size=(spec.n_users, 2), p=cluster_pop)
    user_vec = (0.8 * view[fav[:, 0]] + 0.4 * view[fav[:, 1]]
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
    if world_slots is not None:
        # A product's public attributes are catalogue data: the same in every market listing it.
        category[world_slots] = world["category"][world_products]
        price[world_slots] = world["price"][world_products]
    item_features = np.stack([category, price], axis=1).astype(np.int64)
    # User attributes mean something: interest segment = favourite cluster's category, price
    # sensitivity = favourite cluster's price band, each replaced by a random value sometimes.
    seg = np.where(rng.random(spec.n_users) < cfg.user_attr_noise, rng.integers(0, cfg.n_categories, spec.n_users),
                   cluster_category[fav[:, 0]])
    band = np.where(rng.random(spec.n_users) < cfg.user_attr_noise, rng.integers(0, 4, spec.n_users),
                    cluster_price[fav[:, 0]])
    user_features = np.stack([seg, band], axis=1).astype(np.int64)

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
        user_feature_cards=(cfg.n_categories, 4),
        item_feature_cards=(cfg.n_categories, 4),
        item_cluster=item_cluster.astype(np.int64),
        item_keys=item_keys,
        # Evaluation only: the Bayes reference (true click probability of every test row).
        meta={"source": "synthetic", "impressions": n, "test_p_click": p_click[np.sort(test_idx)]},
    )


def _list_world_products(cfg, spec, world, view, item_cluster, item_vec, item_bias):
    """Replace a random ``catalogue_overlap`` share of the market's products by world products.

    A world product keeps its cluster and its own component everywhere; the market mixes in its
    own view exactly as for clusters (variance-preserving), so heterogeneity changes how markets
    see a product, never how much signal it carries. Which slots hold world products, and which
    world products they are, are drawn from the world's generator so every market's choice is
    independent of its other draws.
    """
    h = cfg.heterogeneity
    wrng = world["rng"]
    n_world = len(world["cluster"])
    take = _n_listed_from_world(cfg, spec)
    slots = wrng.choice(spec.n_items, size=take, replace=False)
    products = wrng.choice(n_world, size=take, replace=False)
    own_vec = wrng.normal(scale=cfg.item_noise, size=(take, view.shape[1]))
    own_bias = wrng.normal(scale=0.5, size=take)
    item_cluster = item_cluster.copy()
    item_vec = item_vec.copy()
    item_bias = item_bias.copy()
    clusters = world["cluster"][products]
    item_cluster[slots] = clusters
    item_vec[slots] = view[clusters] + np.sqrt(1.0 - h * h) * world["vec"][products] + h * own_vec
    item_bias[slots] = np.sqrt(1.0 - h * h) * world["bias"][products] + h * own_bias
    keys = np.array([f"{spec.name}/{i}" for i in range(spec.n_items)], dtype=object)
    keys[slots] = [f"world/{p}" for p in products]
    return item_cluster, item_vec, item_bias, keys, slots, products
