"""Shared-key averaging: each row is the weighted mean over exactly the markets listing it."""

import numpy as np
import pytest

from fedmm_secure.federation.catalogue import PublicCatalogue, apply_keyed_sum, keyed_upload


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
