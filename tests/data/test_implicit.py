import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.data.implicit import (
    ImplicitProtocol,
    InteractionIndex,
    build_implicit_market,
    first_occurrences,
    labelled_split,
    leave_last_out,
    market_rng,
    sample_negatives,
)
from fedmm_secure.errors import ConfigError, DataError

interactions = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 4)), min_size=1, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(interactions, st.integers(3, 5))
def test_leave_last_out_never_puts_the_future_in_training(rows, min_inter):
    users = np.array([r[0] for r in rows])
    times = np.array([r[2] for r in rows])
    tr, va, te = leave_last_out(users, times, min_user_interactions=min_inter)
    assert np.array_equal(np.sort(np.concatenate([tr, va, te])), np.arange(len(rows)))
    for u in np.unique(users):
        n = int(np.sum(users == u))
        t_tr, t_va, t_te = times[tr][users[tr] == u], times[va][users[va] == u], times[te][users[te] == u]
        if n < min_inter:
            assert len(t_tr) == n and len(t_va) == 0 and len(t_te) == 0
            continue
        assert len(t_va) == 1 and len(t_te) == 1
        assert t_te[0] >= t_va[0]
        assert np.all(t_tr <= t_va[0])


def test_leave_last_out_breaks_ties_by_row_order():
    users = np.array([0, 0, 0, 0])
    times = np.array([5, 5, 5, 1])
    tr, va, te = leave_last_out(users, times, min_user_interactions=3)
    # Among the rows at time 5, the later row in the file is the later interaction.
    assert te.tolist() == [2] and va.tolist() == [1] and sorted(tr.tolist()) == [0, 3]


def test_first_occurrences_keeps_the_earliest_copy():
    users = np.array([0, 0, 1, 0, 0])
    items = np.array([3, 3, 3, 4, 3])
    times = np.array([9, 2, 1, 1, 2])
    assert first_occurrences(users, items, times).tolist() == [1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 39)), max_size=80),
    st.integers(1, 6),
    st.integers(0, 2**32 - 1),
)
def test_negatives_avoid_interactions_and_repeat_nothing(n_items, pairs, k, seed):
    pairs = [(u, i % n_items) for u, i in pairs]
    u = np.array([p[0] for p in pairs], dtype=np.int64)
    i = np.array([p[1] for p in pairs], dtype=np.int64)
    index = InteractionIndex(u, i, n_users=4, n_items=n_items)
    query = np.array([0, 1, 2, 3, 0, 1], dtype=np.int64)
    rng = np.random.default_rng(seed)
    pool = n_items - index.counts[query]
    if np.any(pool < k):
        with pytest.raises(DataError, match="never interacted"):
            sample_negatives(query, k, interacted=index, rng=rng, context="m")
        return
    neg = sample_negatives(query, k, interacted=index, rng=rng, context="m")
    assert neg.shape == (len(query), k)
    assert neg.min() >= 0 and neg.max() < n_items
    seen = set(pairs)
    for row, user in zip(neg, query):
        assert len(set(row.tolist())) == k
        assert not any((int(user), int(x)) in seen for x in row)


def test_negatives_are_uniform_over_the_users_complement():
    n_items = 20
    index = InteractionIndex(np.array([0, 0, 0]), np.array([1, 5, 7]), n_users=1, n_items=n_items)
    neg = sample_negatives(np.zeros(20000, dtype=np.int64), 1, interacted=index,
                           rng=np.random.default_rng(0), context="m")
    counts = np.bincount(neg.ravel(), minlength=n_items)
    assert counts[[1, 5, 7]].sum() == 0
    allowed = np.delete(counts, [1, 5, 7])
    expected = 20000 / 17
    # 17 cells, chi-square critical value at p = 1e-4 is about 42.
    assert np.sum((allowed - expected) ** 2 / expected) < 42


def test_dense_users_take_the_exact_path_and_stay_correct():
    n_items = 12
    items = np.arange(9)  # 9 of 12 items interacted: rejection would be slow, exact path is used
    index = InteractionIndex(np.zeros(9, dtype=np.int64), items, n_users=1, n_items=n_items)
    neg = sample_negatives(np.zeros(50, dtype=np.int64), 3, interacted=index,
                           rng=np.random.default_rng(1), context="m")
    assert np.all(np.sort(neg, axis=1) == np.array([9, 10, 11]))


def test_sampling_is_a_function_of_the_generator_state():
    index = InteractionIndex(np.array([0, 1]), np.array([2, 3]), n_users=2, n_items=50)
    q = np.array([0, 1, 0, 1])
    a = sample_negatives(q, 4, interacted=index, rng=np.random.default_rng(7), context="m")
    b = sample_negatives(q, 4, interacted=index, rng=np.random.default_rng(7), context="m")
    c = sample_negatives(q, 4, interacted=index, rng=np.random.default_rng(8), context="m")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_labelled_split_puts_each_positive_before_its_negatives():
    split = labelled_split(np.array([3, 4]), np.array([10, 11]), np.array([True, False]),
                           np.array([[1, 2], [5, 6]]))
    assert split.users.tolist() == [3, 3, 3, 4, 4, 4]
    assert split.items.tolist() == [10, 1, 2, 11, 5, 6]
    assert split.click.tolist() == [1, 0, 0, 1, 0, 0]
    assert split.conversion.tolist() == [1, 0, 0, 0, 0, 0]
    assert split.click.dtype == np.float32


def test_market_rng_is_per_market_and_reproducible():
    a = market_rng(3, "ca").integers(0, 2**62, size=4)
    assert np.array_equal(a, market_rng(3, "ca").integers(0, 2**62, size=4))
    assert not np.array_equal(a, market_rng(3, "de").integers(0, 2**62, size=4))
    assert not np.array_equal(a, market_rng(4, "ca").integers(0, 2**62, size=4))
    with pytest.raises(ConfigError, match="seed"):
        market_rng(-1, "ca")


@pytest.mark.parametrize("kwargs, field", [
    ({"negatives_per_positive": 0}, "negatives_per_positive"),
    ({"ranking_negatives": 0}, "ranking_negatives"),
    ({"min_user_interactions": 2}, "min_user_interactions"),
    ({"min_test_users": 0}, "min_test_users"),
    ({"negatives_per_positive": 1.5}, "negatives_per_positive"),
])
def test_protocol_rejects_bad_settings(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        ImplicitProtocol(**kwargs)


def _market(protocol, **kw):
    args = dict(users=np.array([0, 0, 0, 1, 1, 1, 1]), items=np.array([0, 1, 2, 3, 4, 0, 5]),
                times=np.array([1, 2, 3, 1, 2, 3, 4]), conversion=np.array([1, 0, 1, 0, 0, 1, 1], bool),
                n_users=2, n_items=30)
    args.update(kw)
    return build_implicit_market("m", protocol=protocol, rng=np.random.default_rng(0), **args)


def test_build_market_splits_labels_and_ranks():
    p = ImplicitProtocol(negatives_per_positive=3, ranking_negatives=9)
    m = _market(p)
    assert m.meta["positives"] == {"train": 3, "valid": 2, "test": 2}
    assert len(m.train) == 3 * 4 and len(m.test) == 2 * 4
    assert m.ranking.items.shape == (2, 10)
    assert m.ranking.items[:, 0].tolist() == [2, 5]   # each user's last interaction
    assert m.meta["valid_ranking"].items[:, 0].tolist() == [1, 0]
    assert m.test.conversion[m.test.click == 1].tolist() == [1, 1]


def test_build_market_respects_also_interacted():
    p = ImplicitProtocol(negatives_per_positive=2, ranking_negatives=3)
    # User 0 also saw items 6..29 without clicking: only items 3, 4, 5 remain as negatives.
    m = _market(p, also_interacted=(np.zeros(24, dtype=np.int64), np.arange(6, 30)))
    for split in (m.train, m.valid, m.test):
        neg = split.items[(split.users == 0) & (split.click == 0)]
        assert set(neg.tolist()) <= {3, 4, 5}
    with pytest.raises(DataError, match="never interacted"):
        _market(ImplicitProtocol(ranking_negatives=4),
                also_interacted=(np.zeros(24, dtype=np.int64), np.arange(6, 30)))


def test_build_market_refuses_markets_without_test_users():
    with pytest.raises(DataError, match="at least 3 needed"):
        _market(ImplicitProtocol(negatives_per_positive=1, ranking_negatives=5, min_test_users=3))
    with pytest.raises(DataError, match="no positive"):
        _market(ImplicitProtocol(), users=np.array([], np.int64), items=np.array([], np.int64),
                times=np.array([], np.int64), conversion=np.array([], bool))
