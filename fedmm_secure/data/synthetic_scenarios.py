"""Seeded synthetic multi-scenario data for multi-task (CTR + CTCVR) recommendation.

The idea of :mod:`fedmm_secure.data.synthetic`, shaped for PF-MSMTrec: every scenario (a market,
one federated client) draws users and items from latent clusters shared by all scenarios plus a
scenario-specific shift, so what a product *is* and what a user *likes* is common knowledge a
federation can pool. Scenarios differ where a multi-scenario model has to personalise:

* **traffic**: users, items and impressions per user differ (one rich scenario, smaller ones);
* **click behaviour**: a scenario-specific base click rate;
* **conversion behaviour**: the post-click conversion logit mixes a direction shared by all
  scenarios with a scenario-specific one (``conversion_heterogeneity``), plus a scenario-specific
  base rate and price sensitivity. Conversions are only drawn for clicked impressions, so a
  conversion always implies a click (the ESMM setting).

Side features have the same meaning in every scenario (which is what federating the non-ID part
of a model relies on): item category (a noisy view of the item's cluster) and price band; user
interest segment (a noisy view of the category the user likes most) and age band. User and item
ids are numbered from 0 in every scenario: the spaces are disjoint by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .market import MarketData, MarketSplit

__all__ = ["ScenarioSpec", "ScenarioConfig", "generate_scenarios"]


@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    n_users: int
    n_items: int
    impressions_per_user: int


def _default_scenarios() -> tuple[ScenarioSpec, ...]:
    # Different traffic: one rich scenario and three smaller ones (about 82k impressions in all).
    # 20-40 impressions per user and test sets of 1200-9600 rows: with 8-16 impressions and
    # 480-3840 test rows the method comparison was within run-to-run noise (see
    # bench/RESULTS_pf_msmtrec.md); a 3-method DP run still takes under a minute on an idle core.
    return (
        ScenarioSpec("s_main", 1200, 400, 40),
        ScenarioSpec("s_mid", 600, 300, 30),
        ScenarioSpec("s_small", 400, 250, 25),
        ScenarioSpec("s_tiny", 300, 200, 20),
    )


@dataclass(frozen=True)
class ScenarioConfig:
    scenarios: tuple[ScenarioSpec, ...] = field(default_factory=_default_scenarios)
    n_clusters: int = 12
    latent_dim: int = 12
    heterogeneity: float = 0.4            # scenario-specific shift of the shared clusters
    item_noise: float = 0.6
    user_noise: float = 0.6
    affinity_scale: float = 2.2
    base_click_logit: float = -1.2
    click_rate_spread: float = 0.4        # std of the scenario-specific click base rate
    conversion_logit: float = -0.3
    conversion_rate_spread: float = 0.6   # std of the scenario-specific conversion base rate
    conversion_strength: float = 2.0
    conversion_heterogeneity: float = 0.8 # weight of the scenario-specific conversion direction
    price_effect_spread: float = 0.6      # std of the scenario-specific price sensitivity
    n_categories: int = 8
    category_noise: float = 0.3
    segment_noise: float = 0.3
    valid_fraction: float = 0.2           # validation drives checkpoint and alpha choices: not too small
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not self.scenarios:
            raise ConfigError("data.scenarios", "at least one scenario is required")
        names = [s.name for s in self.scenarios]
        if len(set(names)) != len(names):
            raise ConfigError("data.scenarios", "scenario names must be unique")
        for s in self.scenarios:
            if s.n_users < 2 or s.n_items < 2 or s.impressions_per_user < 1:
                raise ConfigError("data.scenarios", f"scenario {s.name!r} is too small",
                                  allowed="n_users >= 2, n_items >= 2, impressions_per_user >= 1")
        if self.n_clusters < 2 or self.latent_dim < 1 or self.n_categories < 2:
            raise ConfigError("data.n_clusters", "n_clusters and n_categories must be >= 2, latent_dim >= 1")
        for f in ("heterogeneity", "item_noise", "user_noise", "click_rate_spread", "conversion_rate_spread",
                  "conversion_heterogeneity", "price_effect_spread"):
            if getattr(self, f) < 0:
                raise ConfigError(f"data.{f}", "must be >= 0")
        for f in ("category_noise", "segment_noise"):
            if not 0 <= getattr(self, f) <= 1:
                raise ConfigError(f"data.{f}", "must be in [0, 1]")
        if not (0 < self.valid_fraction < 0.5 and 0 < self.test_fraction < 0.5):
            raise ConfigError("data.test_fraction", "valid and test fractions must be in (0, 0.5)")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_scenarios(cfg: ScenarioConfig, *, seed: int) -> list[MarketData]:
    """Every scenario of ``cfg``, deterministically from ``seed`` (one ``MarketData`` each)."""
    root = np.random.default_rng([seed, 2002])
    k, d = cfg.n_clusters, cfg.latent_dim
    shared = {
        "centers": root.normal(size=(k, d)),
        "category": root.integers(0, cfg.n_categories, size=k),
        "price": root.integers(0, 4, size=k),
        "conv_dir": root.normal(size=d) / np.sqrt(d),
    }
    out = []
    for spec in cfg.scenarios:
        rng = np.random.default_rng(root.integers(0, 2**63 - 1))
        out.append(_one_scenario(cfg, spec, rng, shared))
    return out


def _one_scenario(cfg: ScenarioConfig, spec: ScenarioSpec, rng: np.random.Generator, shared: dict) -> MarketData:
    centers = shared["centers"]
    k, d = centers.shape
    shift = rng.normal(scale=cfg.heterogeneity, size=(k, d))
    pop = rng.dirichlet(np.full(k, 2.0))
    item_cluster = rng.choice(k, size=spec.n_items, p=pop)
    item_vec = centers[item_cluster] + shift[item_cluster] + rng.normal(scale=cfg.item_noise, size=(spec.n_items, d))
    item_bias = rng.normal(scale=0.5, size=spec.n_items)
    fav = rng.choice(k, size=(spec.n_users, 2), p=pop)
    user_vec = (0.8 * (centers[fav[:, 0]] + shift[fav[:, 0]]) + 0.4 * (centers[fav[:, 1]] + shift[fav[:, 1]])
                + rng.normal(scale=cfg.user_noise, size=(spec.n_users, d)))

    # Side features with one meaning everywhere.
    noisy = rng.random(spec.n_items) < cfg.category_noise
    category = np.where(noisy, rng.integers(0, cfg.n_categories, spec.n_items), shared["category"][item_cluster])
    price = np.clip(shared["price"][item_cluster] + rng.integers(-1, 2, spec.n_items), 0, 3)
    seg_noisy = rng.random(spec.n_users) < cfg.segment_noise
    segment = np.where(seg_noisy, rng.integers(0, cfg.n_categories, spec.n_users), shared["category"][fav[:, 0]])
    age = rng.integers(0, 5, spec.n_users)

    # Scenario-specific behaviour.
    click_base = cfg.base_click_logit + rng.normal(scale=cfg.click_rate_spread)
    conv_base = cfg.conversion_logit + rng.normal(scale=cfg.conversion_rate_spread)
    own_dir = rng.normal(size=d) / np.sqrt(d)
    conv_dir = (shared["conv_dir"] + cfg.conversion_heterogeneity * own_dir) / np.sqrt(1 + cfg.conversion_heterogeneity ** 2)
    price_effect = rng.normal(scale=cfg.price_effect_spread)
    age_effect = rng.normal(scale=0.3)

    exposure = np.minimum(rng.zipf(1.6, size=spec.n_items).astype(np.float64), 50.0)
    exposure /= exposure.sum()
    n = spec.n_users * spec.impressions_per_user
    users = np.repeat(np.arange(spec.n_users), spec.impressions_per_user)
    items = rng.choice(spec.n_items, size=n, p=exposure)
    aff = np.einsum("nd,nd->n", user_vec[users], item_vec[items]) / np.sqrt(d)
    p_click = _sigmoid(click_base + cfg.affinity_scale * aff / np.sqrt(2.0) + item_bias[items])
    click = (rng.random(n) < p_click).astype(np.float32)
    conv_logit = (conv_base + cfg.conversion_strength * item_vec[items] @ conv_dir / np.sqrt(d)
                  + price_effect * (price[items] - 1.5) + age_effect * (age[users] - 2))
    conversion = (click * (rng.random(n) < _sigmoid(conv_logit))).astype(np.float32)

    perm = rng.permutation(n)
    n_test = int(round(cfg.test_fraction * n))
    n_valid = int(round(cfg.valid_fraction * n))
    full = MarketSplit(users.astype(np.int64), items.astype(np.int64), click, conversion)
    return MarketData(
        name=spec.name, n_users=spec.n_users, n_items=spec.n_items,
        train=full.subset(np.sort(perm[n_test + n_valid:])),
        valid=full.subset(np.sort(perm[n_test:n_test + n_valid])),
        test=full.subset(np.sort(perm[:n_test])),
        user_features=np.stack([segment, age], axis=1).astype(np.int64),
        item_features=np.stack([category, price], axis=1).astype(np.int64),
        user_feature_cards=(cfg.n_categories, 5),
        item_feature_cards=(cfg.n_categories, 4),
        item_cluster=item_cluster.astype(np.int64),
        meta={"source": "synthetic-scenarios", "impressions": n,
              "click_rate": float(click.mean()), "ctcvr_rate": float(conversion.mean())},
    )
