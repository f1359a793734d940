"""Shared-key averaging: each row is the weighted mean over exactly the markets listing it."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.federation.catalogue import (COUNT_CAP, PublicCatalogue, apply_keyed_sum, count_weights,
                                               key_counts, keyed_upload)


def test_shared_keys_are_those_listed_by_two_markets():
    cat = PublicCatalogue.from_listings({"a": ["x", "y", "z"], "b": ["y", "z", "w"], "c": ["z", "v"]})
    assert cat.shared_keys == ("y", "z")
    np.testing.assert_array_equal(cat.key_column(["x", "y", "z"]), [2, 0, 1])
    np.testing.assert_array_equal(cat.listed_rows(["x", "y", "z"]), [1, 1, 1])
    np.testing.assert_array_equal(cat.listed_rows(["y", "z"]), [1, 1, 0])


def test_rowwise_average_matches_direct_computation():
    rng = np.random.default_rng(0)
    listings = {"a": ["k0", "k1", "p_a"], "b": ["k0", "k2"], "c": ["k1", "k2", "k0", "p_c"]}
    cat = PublicCatalogue.from_listings(listings)
    tables = {m: rng.normal(size=(cat.n_rows, 3)) for m in listings}
    weights = {"a": 1.0, "b": 0.25, "c": 0.5}
    listed = {m: cat.listed_rows(k) for m, k in listings.items()}
    total = sum(keyed_upload(tables[m], listed[m], weights[m]) for m in listings)
    for m in listings:
        got = apply_keyed_sum(tables[m], listed[m], total)
        for r in range(cat.n_rows):
            owners = [o for o in listings if listed[o][r]]
            if not listed[m][r]:
                np.testing.assert_array_equal(got[r], tables[m][r])  # never read: untouched
                continue
            want = sum(weights[o] * tables[o][r] for o in owners) / sum(weights[o] for o in owners)
            np.testing.assert_allclose(got[r], want)
    # the same product ends at the same place in every market that lists it
    k0 = cat.shared_keys.index("k0")
    rows = [apply_keyed_sum(tables[m], listed[m], total)[k0] for m in listings]
    np.testing.assert_allclose(rows[0], rows[1])
    np.testing.assert_allclose(rows[0], rows[2])


def test_a_market_that_does_not_list_a_row_adds_nothing_to_it():
    cat = PublicCatalogue(("k",))
    noise_only = np.full((2, 2), 100.0)   # what DP noise alone would leave in an unlisted row
    own = np.ones((2, 2))
    total = keyed_upload(own, np.array([1.0, 1.0]), 1.0) + keyed_upload(noise_only, np.array([0.0, 1.0]), 1.0)
    out = apply_keyed_sum(own, np.array([1.0, 1.0]), total)
    np.testing.assert_allclose(out[0], [1.0, 1.0])
    assert cat.n_rows == 2


def test_shape_errors():
    with pytest.raises(ValueError):
        keyed_upload(np.zeros((3, 2)), np.zeros(2), 1.0)
    with pytest.raises(ValueError):
        apply_keyed_sum(np.zeros((3, 2)), np.zeros(3), np.zeros(5))


def test_per_row_weights_give_each_row_its_own_weighted_average():
    rng = np.random.default_rng(1)
    tables = [rng.normal(size=(3, 2)) for _ in range(3)]
    listed = [np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0])]
    weights = [np.array([0.5, 0.1, 1.0]), np.array([0.25, 1.0, 0.2]), np.array([0.01, 0.3, 0.6])]
    total = sum(keyed_upload(t, lst, w) for t, lst, w in zip(tables, listed, weights))
    got = apply_keyed_sum(tables[2], listed[2], total)
    for r in range(3):
        owners = [i for i in range(3) if listed[i][r]]
        want = sum(weights[i][r] * tables[i][r] for i in owners) / sum(weights[i][r] for i in owners)
        np.testing.assert_allclose(got[r], want)
    with pytest.raises(ValueError):
        keyed_upload(tables[0], listed[0], np.array([0.5, 1.5, 0.2]))   # above the announced bound
    with pytest.raises(ValueError):
        keyed_upload(tables[0], listed[0], np.array([0.5, 0.5]))


def test_key_counts_count_positive_rows_and_share_one_per_unit():
    rows = np.array([0, 0, 1, 1, 2, 0])
    positive = np.array([1, 1, 0, 1, 1, 1])
    # records: one unit per row; negatives (row 2) and rows beyond the table (row 4) count nothing
    np.testing.assert_allclose(key_counts(rows, positive, np.arange(6), 6, 2), [3.0, 1.0])
    # users: a user's positive rows share 1 (user 0 has three: 1/3 each; user 1's other row is a
    # negative, so its one positive counts 1)
    users = np.array([0, 0, 1, 0, 2, 1])
    np.testing.assert_allclose(key_counts(rows, positive, users, 3, 2), [2 / 3 + 1, 1 / 3])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=40),
       st.integers(0, 5))
def test_one_unit_moves_the_counts_by_at_most_one_in_l2(data, removed):
    # Sensitivity 1 is what the count release's noise is calibrated for (add/remove one unit).
    rows, positive, unit = (np.array(c) for c in zip(*data))
    with_all = key_counts(rows, positive, unit, 6, 4)
    keep = unit != removed
    without = key_counts(rows[keep], positive[keep], unit[keep], 6, 4)
    assert np.linalg.norm(with_all - without) <= 1.0 + 1e-12


def test_count_weights_are_in_the_announced_range_and_keep_order():
    w = count_weights(np.array([-5.0, 0.0, 1.0, 10.0, 100.0, 1e6]))
    assert np.all((w > 1e-3) & (w <= 1.0))   # above apply_keyed_sum's guard, within the bound
    assert w[0] == w[1] == w[2] == 1.0 / COUNT_CAP and w[-1] == 1.0
    assert np.all(np.diff(w) >= 0)
