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


def test_ids_are_local_and_disjoint_by_construction(markets):
    for m in markets:
        for split in (m.train, m.valid, m.test):
            assert split.users.min() >= 0 and split.users.max() < m.n_users
            assert split.items.min() >= 0 and split.items.max() < m.n_items
        # nothing in the data links one market's items to another's except ground truth
        assert m.item_keys is None


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
    cfg1 = SyntheticConfig(heterogeneity=2.0)
    a = generate_markets(cfg0, seed=1)
    b = generate_markets(cfg1, seed=1)
    assert not np.array_equal(a[1].train.click, b[1].train.click)


@pytest.mark.parametrize("kwargs", [
    {"markets": ()},
    {"markets": (MarketSpec("a", 10, 10, 2), MarketSpec("a", 10, 10, 2))},
    {"n_clusters": 1},
    {"heterogeneity": -1.0},
    {"category_noise": 2.0},
])
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ConfigError):
        SyntheticConfig(**kwargs)


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
