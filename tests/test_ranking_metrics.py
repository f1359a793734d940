import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedmm_secure.errors import ConfigError, DataError
from fedmm_secure.metrics import hit_rate_at_k, ndcg_at_k, positive_ranks


def test_hand_computed_ranks_and_metrics():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3],   # rank 0
        [0.5, 0.6, 0.1, 0.2],   # rank 1
        [0.1, 0.6, 0.7, 0.8],   # rank 3
    ])
    assert positive_ranks(scores).tolist() == [0, 1, 3]
    assert hit_rate_at_k(scores, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(scores, 2) == pytest.approx(2 / 3)
    assert ndcg_at_k(scores, 2) == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert ndcg_at_k(scores, 4) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)


def test_ties_count_against_the_positive():
    constant = np.zeros((5, 100))
    assert hit_rate_at_k(constant, 10) == 0.0
    assert ndcg_at_k(constant, 10) == 0.0
    one_tie = np.array([[1.0, 1.0, 0.0, 0.0]])
    assert positive_ranks(one_tie).tolist() == [1]


def test_random_scorer_hits_at_chance():
    rng = np.random.default_rng(0)
    scores = rng.random((20000, 100))
    assert hit_rate_at_k(scores, 10) == pytest.approx(0.10, abs=0.01)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 8), st.integers(2, 12)),
              elements=st.floats(-5, 5, allow_nan=False)), st.data())
def test_metrics_are_bounded_and_monotone(scores, data):
    width = scores.shape[1]
    k = data.draw(st.integers(1, width))
    hr, nd = hit_rate_at_k(scores, k), ndcg_at_k(scores, k)
    assert 0.0 <= nd <= hr <= 1.0
    if k < width:
        assert hit_rate_at_k(scores, k + 1) >= hr
    assert hit_rate_at_k(scores, width) == 1.0 or np.any(scores[:, 1:] >= scores[:, :1])


@pytest.mark.parametrize("k", [0, 5, 2.0, True])
def test_bad_k_is_a_config_error(k):
    with pytest.raises(ConfigError, match="k"):
        hit_rate_at_k(np.zeros((2, 4)), k)


@pytest.mark.parametrize("scores", [np.zeros(4), np.zeros((2, 1)), np.zeros((0, 5)),
                                    np.array([[np.nan, 1.0]])])
def test_bad_scores_are_a_data_error(scores):
    with pytest.raises(DataError):
        ndcg_at_k(scores, 1)
