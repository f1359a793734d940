import numpy as np
import pytest

from fedmm_secure.data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from fedmm_secure.errors import ConfigError


@pytest.fixture(scope="module")
def markets():
    return generate_markets(SyntheticConfig(), seed=3)


def test_default_has_one_rich_and_three_sparse_markets(markets):
    assert len(markets) == 4
    per_item = [len(m.train) / m.n_items for m in markets]
    assert per_item[0] > 4 * max(per_item[1:])


def test_ids_are_local_to_each_market(markets):
    for m in markets:
        for split in (m.train, m.valid, m.test):
            assert split.users.min() >= 0 and split.users.max() < m.n_users
            assert split.items.min() >= 0 and split.items.max() < m.n_items
        assert m.item_keys is not None and len(m.item_keys) == m.n_items
        assert len(set(m.item_keys)) == m.n_items  # a market lists a product once


def test_disjoint_catalogues_have_no_keys_and_are_the_old_generator():
    ms = generate_markets(SyntheticConfig(catalogue_overlap=0.0), seed=3)
    assert all(m.item_keys is None for m in ms)
    # Known answer from the generator before catalogue overlap existed (seed 3, default markets).
    assert int(ms[1].train.click.sum()) == 1938 and int(ms[0].train.items[:50].sum()) == 24900


def _listed_elsewhere(ms):
    from collections import Counter
    count = Counter(k for m in ms for k in set(m.item_keys))
    return {m.name: float(np.mean([count[k] > 1 for k in m.item_keys])) for m in ms}


def test_catalogue_overlap_is_the_share_of_products_listed_elsewhere(markets):
    shares = _listed_elsewhere(markets)
    # The largest market lists the whole world catalogue, so every smaller market's world
    # products are listed there: their share is exactly the overlap.
    for name in ("sparse_a", "sparse_b", "sparse_c"):
        assert shares[name] == pytest.approx(0.5, abs=1e-9)
    assert 0.3 < shares["rich"] <= 0.5
    more = _listed_elsewhere(generate_markets(SyntheticConfig(catalogue_overlap=0.9), seed=3))
    assert all(more[k] > shares[k] for k in shares)


def test_same_product_is_the_same_thing_in_every_market(markets):
    # A world product keeps its cluster everywhere (its own component is shared through
    # sqrt(1 - h^2), the rest is the market's view).
    by_key = {}
    for m in markets:
        for i, k in enumerate(m.item_keys):
            by_key.setdefault(k, []).append((m.name, int(m.item_cluster[i])))
    shared = [v for k, v in by_key.items() if len(v) > 1]
    assert shared and all(len({c for _, c in v}) == 1 for v in shared)


def test_same_product_has_the_same_public_attributes_everywhere(markets):
    attrs = {}
    for m in markets:
        for i, k in enumerate(m.item_keys):
            attrs.setdefault(k, set()).add(tuple(m.item_features[i]))
    listed_twice = [k for k in attrs if k.startswith("world/")]
    assert listed_twice and all(len(attrs[k]) == 1 for k in listed_twice)


def test_splits_partition_the_impressions(markets):
    for m in markets:
        n = len(m.train) + len(m.valid) + len(m.test)
        assert n == m.meta["impressions"]
        assert 0.15 < len(m.test) / n < 0.25


def test_label_rates_are_plausible(markets):
    for m in markets:
        ctr = m.train.click.mean()
        assert 0.2 < ctr < 0.6
        conv = m.train.conversion
        assert np.all(conv <= m.train.click)  # post-click conversions only
        assert 0.05 < conv.sum() / m.train.click.sum() < 0.95


def test_deterministic_by_seed():
    a = generate_markets(SyntheticConfig(), seed=11)
    b = generate_markets(SyntheticConfig(), seed=11)
    c = generate_markets(SyntheticConfig(), seed=12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.train.items, y.train.items)
        np.testing.assert_array_equal(x.train.click, y.train.click)
        np.testing.assert_array_equal(x.item_cluster, y.item_cluster)
    assert not np.array_equal(a[0].train.click, c[0].train.click)


def test_ground_truth_clusters_are_shared_across_markets(markets):
    k = SyntheticConfig().n_clusters
    for m in markets:
        assert m.item_cluster.shape == (m.n_items,)
        assert m.item_cluster.max() < k
    # side features carry shared meaning: category agrees with the cluster's category mostly
    cats = {}
    for m in markets:
        for c, cat in zip(m.item_cluster, m.item_features[:, 0]):
            cats.setdefault(int(c), []).append(int(cat))
    agree = np.mean([np.mean(np.array(v) == np.bincount(v).argmax()) for v in cats.values()])
    assert agree > 0.6


def test_heterogeneity_knob_changes_market_views():
    cfg0 = SyntheticConfig(heterogeneity=0.0)
    cfg1 = SyntheticConfig(heterogeneity=1.0)
    a = generate_markets(cfg0, seed=1)
    b = generate_markets(cfg1, seed=1)
    assert not np.array_equal(a[1].train.click, b[1].train.click)


@pytest.mark.parametrize("kwargs", [
    {"markets": ()},
    {"markets": (MarketSpec("a", 10, 10, 2), MarketSpec("a", 10, 10, 2))},
    {"n_clusters": 1},
    {"heterogeneity": -1.0},
    {"category_noise": 2.0},
    {"catalogue_overlap": 1.5},
    {"catalogue_overlap": -0.1},
    {"catalogue_overlap": True},
])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        SyntheticConfig(**kwargs)


def test_heterogeneity_keeps_signal_strength():
    # Variance-preserving mix: the spread of true click probabilities (how much signal there is)
    # does not grow or shrink with h, only which items are liked changes.
    spreads = []
    for h in (0.0, 0.5, 1.0):
        ms = generate_markets(SyntheticConfig(heterogeneity=h), seed=2)
        spreads.append(np.mean([np.std(m.meta["test_p_click"]) for m in ms]))
    assert max(spreads) / min(spreads) < 1.15


def test_user_attributes_carry_meaning(markets):
    # Interest segment is the category of the user's favourite cluster (most of the time), so it
    # predicts which items the user clicks: click rate on items of that category is higher.
    for m in markets[:1]:
        seg = m.user_features[m.train.users, 0]
        same = seg == m.item_features[m.train.items, 0]
        assert m.train.click[same].mean() > m.train.click[~same].mean() + 0.05


def test_bayes_reference_is_kept_for_test_rows(markets):
    for m in markets:
        p = m.meta["test_p_click"]
        assert p.shape == (len(m.test),) and np.all((p > 0) & (p < 1))


def test_scale_multiplies_users_items_and_rows():
    base = SyntheticConfig(markets=(MarketSpec("a", 40, 20, 5), MarketSpec("b", 30, 10, 4)))
    one = generate_markets(base, seed=1)
    three = generate_markets(SyntheticConfig(markets=base.markets, scale=3), seed=1)
    for m1, m3 in zip(one, three):
        assert (m3.n_users, m3.n_items) == (3 * m1.n_users, 3 * m1.n_items)
        rows1 = len(m1.train) + len(m1.valid) + len(m1.test)
        assert len(m3.train) + len(m3.valid) + len(m3.test) == 3 * rows1
    # scale 1 is the generator as it was (bit for bit)
    again = generate_markets(SyntheticConfig(markets=base.markets, scale=1.0), seed=1)
    assert all(np.array_equal(a.train.click, b.train.click) for a, b in zip(one, again))


@pytest.mark.parametrize("scale", [0, -1, True, "2", 1e9])
def test_bad_scale_is_rejected(scale):
    with pytest.raises(ConfigError, match="synthetic.scale"):
        SyntheticConfig(scale=scale)
