import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.models.codebook import (assign_codes, code_statistics, flatten_stats, perplexity,
                                          unflatten_stats, update_codebook, utilization)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_update_from_summed_market_stats_equals_pooled_update_exactly(n_markets, seed):
    rng = np.random.default_rng(seed)
    k, d = 8, 4
    codebook = rng.normal(size=(k, d))
    zs = [rng.uniform(-1, 1, size=(int(rng.integers(1, 40)), d)) for _ in range(n_markets)]
    per_market = [code_statistics(z, assign_codes(z, codebook), k) for z in zs]
    summed = per_market[0]
    for s in per_market[1:]:
        summed = summed + s
    pooled_z = np.concatenate(zs)
    pooled = code_statistics(pooled_z, assign_codes(pooled_z, codebook), k)
    np.testing.assert_allclose(summed.counts, pooled.counts, rtol=0, atol=0)
    np.testing.assert_allclose(summed.sums, pooled.sums, rtol=1e-12, atol=1e-12)
    a, dead_a = update_codebook(codebook, summed, decay=0.0, dead_threshold=1.0, rng=np.random.default_rng(1))
    b, dead_b = update_codebook(codebook, pooled, decay=0.0, dead_threshold=1.0, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(dead_a, dead_b)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_live_codes_move_to_centroids_and_dead_codes_are_revived():
    codebook = np.array([[0.0, 0.0], [10.0, 10.0], [100.0, 100.0]])
    z = np.array([[1.0, 1.0], [-1.0, 1.0], [9.0, 11.0]])
    stats = code_statistics(z, assign_codes(z, codebook), 3)
    new, dead = update_codebook(codebook, stats, decay=0.0, dead_threshold=1.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(new[0], [0.0, 1.0])
    np.testing.assert_allclose(new[1], [9.0, 11.0])
    assert dead.tolist() == [False, False, True]
    # revived next to a used code, far from its stale position
    assert np.linalg.norm(new[2] - new[:2], axis=1).min() < 1.0


def test_utilization_and_perplexity():
    assert utilization(np.array([0, 0, 1]), 4) == 0.5
    assert perplexity(np.zeros(10, dtype=int), 4) == 1.0
    assert abs(perplexity(np.arange(8) % 4, 4) - 4.0) < 1e-12


def test_flatten_roundtrip():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 3))
    s = code_statistics(z, rng.integers(0, 5, 20), 5)
    t = unflatten_stats(flatten_stats(s), 5, 3)
    np.testing.assert_array_equal(s.counts, t.counts)
    np.testing.assert_array_equal(s.sums, t.sums)
