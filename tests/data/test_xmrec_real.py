"""The real 7-market XMRec Electronics sample; skipped when ../shared/data is absent."""

from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.data.loaders import load_markets, shared_item_pairs
from fedmm_secure.data.xmrec import read_xmrec_file

ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "xmrec-electronics"
# From ../shared/data/README.md: market -> (rows, users, items)
EXPECTED = {
    "ca": (44779, 4668, 5735), "uk": (31547, 3352, 3251), "fr": (17624, 1838, 1879),
    "de": (17300, 1851, 2179), "mx": (17095, 1878, 1645), "jp": (4485, 487, 955), "in": (2015, 239, 470),
}

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} is absent (evaluation data, never committed)"),
]


@pytest.fixture(scope="module")
def markets():
    return load_markets(f"xmrec:{ROOT}", seed=0, negatives_per_positive=4)


def test_counts_match_the_readme(markets):
    assert sorted(m.name for m in markets) == sorted(EXPECTED)
    for m in markets:
        rows, users, items = EXPECTED[m.name]
        assert (m.meta["raw_rows"], m.n_users, m.n_items) == (rows, users, items)
        assert len(m.item_keys) == m.n_items


def test_protocol_holds_on_real_data(markets):
    for m in markets:
        n_pos = sum(int(s.click.sum()) for s in (m.train, m.valid, m.test))
        assert n_pos == m.meta["interactions"]
        assert len(m.train) == 5 * int(m.train.click.sum())
        assert m.ranking.items.shape == (len(m.ranking.users), 100)
        keys = []
        for s in (m.train, m.valid, m.test):
            keys.append(s.users[s.click == 1] * m.n_items + s.items[s.click == 1])
        pos = np.sort(np.concatenate(keys))
        assert len(np.unique(pos)) == len(pos)
        for s in (m.train, m.valid, m.test):
            neg = s.users[s.click == 0] * m.n_items + s.items[s.click == 0]
            assert not np.isin(neg, pos).any()
        rank_neg = m.ranking.users[:, None] * m.n_items + m.ranking.items[:, 1:]
        assert not np.isin(rank_neg, pos).any()
        srt = np.sort(m.ranking.items, axis=1)
        assert not np.any(srt[:, 1:] == srt[:, :-1])


def test_no_future_leakage_on_real_data(markets):
    for m in markets:
        rows = read_xmrec_file(ROOT / f"{m.name}.txt")
        ukeys, u = np.unique(rows.users, return_inverse=True)
        i = np.searchsorted(m.item_keys, rows.items)
        key = u * m.n_items + i
        # earliest day per (user, item): the protocol keeps the earliest copy of a repeated pair
        order = np.lexsort((rows.day, key))
        k_sorted, d_sorted = key[order], rows.day[order]
        first = np.ones(len(k_sorted), bool)
        first[1:] = k_sorted[1:] != k_sorted[:-1]
        uniq_keys, uniq_day = k_sorted[first], d_sorted[first]

        def day(split):
            q = split.users[split.click == 1] * m.n_items + split.items[split.click == 1]
            return split.users[split.click == 1], uniq_day[np.searchsorted(uniq_keys, q)]

        tu, td = day(m.train)
        latest = np.full(m.n_users, np.iinfo(np.int64).min)
        np.maximum.at(latest, tu, td)
        for split in (m.valid, m.test):
            su, sd = day(split)
            assert np.all(sd >= latest[su])
        vu, vd = day(m.valid)
        eu, ed = day(m.test)
        valid_day = np.full(m.n_users, np.iinfo(np.int64).min)
        valid_day[vu] = vd
        assert np.all(ed >= valid_day[eu])


def test_products_overlap_across_markets(markets):
    pairs = shared_item_pairs(markets)
    assert len(pairs) > 1000
    by_name = {m.name: m for m in markets}
    for a, ia, b, ib in pairs[:: max(1, len(pairs) // 200)]:
        assert by_name[a].item_keys[ia] == by_name[b].item_keys[ib]
