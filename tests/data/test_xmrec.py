from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.data.implicit import ImplicitProtocol
from fedmm_secure.data.xmrec import load_xmrec, read_xmrec_file
from fedmm_secure.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "xmrec"
SMALL = ImplicitProtocol(negatives_per_positive=2, ranking_negatives=5)
HEADER = "userId itemId rate date\n"


def load(root=FIX, seed=0, protocol=SMALL, **kw):
    return load_xmrec(root, seed=seed, protocol=protocol, **kw)


def write(tmp_path, text, name="zz", encoding="utf-8"):
    path = tmp_path / f"{name}.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding=encoding)
    return path


def positives(m):
    out = set()
    for s in (m.train, m.valid, m.test):
        out |= set(zip(s.users[s.click == 1].tolist(), s.items[s.click == 1].tolist()))
    return out


def check_no_future_leakage(m, path):
    """Every held-out positive is no earlier than any of that user's training positives."""
    rows = read_xmrec_file(path)
    ukeys = np.unique(rows.users)
    ikeys = np.unique(rows.items)
    u = np.searchsorted(ukeys, rows.users)
    i = np.searchsorted(ikeys, rows.items)
    first = {}
    for a, b, d in zip(u.tolist(), i.tolist(), rows.day.tolist()):
        first[(a, b)] = min(d, first.get((a, b), d))
    n = m.n_users
    latest_train = np.full(n, -10**9)
    for a, b in zip(m.train.users[m.train.click == 1].tolist(), m.train.items[m.train.click == 1].tolist()):
        latest_train[a] = max(latest_train[a], first[(a, b)])
    valid_day = {}
    for a, b in zip(m.valid.users[m.valid.click == 1].tolist(), m.valid.items[m.valid.click == 1].tolist()):
        assert first[(a, b)] >= latest_train[a]
        valid_day[a] = first[(a, b)]
    for a, b in zip(m.test.users[m.test.click == 1].tolist(), m.test.items[m.test.click == 1].tolist()):
        assert first[(a, b)] >= latest_train[a]
        assert first[(a, b)] >= valid_day[a]


def test_counts_and_ids():
    aa, bb = load()
    assert (aa.name, aa.n_users, aa.n_items) == ("aa", 5, 16)
    assert (bb.name, bb.n_users, bb.n_items) == ("bb", 3, 10)
    assert aa.meta["raw_rows"] == 19 and aa.meta["interactions"] == 18 and aa.meta["duplicates_dropped"] == 1
    assert aa.item_keys.tolist() == [f"P{j:02d}" for j in range(1, 17)]
    for m in (aa, bb):
        ids = np.concatenate([m.train.users, m.valid.users, m.test.users])
        assert set(ids.tolist()) == set(range(m.n_users))  # dense local ids, every user has rows
        assert len(set(m.item_keys.tolist())) == m.n_items


def test_leave_last_out_on_the_fixture():
    aa = load(markets=["aa"])[0]
    # users ua1..ua5 -> 0..4, items P01..P16 -> 0..15
    test = dict(zip(aa.test.users[aa.test.click == 1].tolist(), aa.test.items[aa.test.click == 1].tolist()))
    valid = dict(zip(aa.valid.users[aa.valid.click == 1].tolist(), aa.valid.items[aa.valid.click == 1].tolist()))
    assert test == {0: 3, 1: 4, 3: 11, 4: 14}   # same-day ties resolved by file order (ua1, ua5)
    assert valid == {0: 2, 1: 5, 3: 10, 4: 13}
    assert sorted(aa.train.items[(aa.train.users == 2) & (aa.train.click == 1)].tolist()) == [6, 7]
    conv = dict(zip(aa.test.users[aa.test.click == 1].tolist(), aa.test.conversion[aa.test.click == 1].tolist()))
    # ua2's P05 appears twice; the earliest (rate 5) is kept, so it converts. ua1's P04 is rated 2.
    assert conv == {0: 0.0, 1: 1.0, 3: 1.0, 4: 1.0}
    assert np.array_equal(aa.ranking.items[:, 0], np.array([3, 4, 11, 14]))
    assert aa.ranking.users.tolist() == [0, 1, 3, 4]


def test_labels_and_negatives():
    for m in load():
        pos = positives(m)
        assert len(m.train) == 3 * int(m.train.click.sum())
        for s in (m.train, m.valid, m.test):
            assert np.all(s.conversion <= s.click)
            for a, b in zip(s.users[s.click == 0].tolist(), s.items[s.click == 0].tolist()):
                assert (a, b) not in pos
        for user, row in zip(m.ranking.users.tolist(), m.ranking.items.tolist()):
            assert len(set(row)) == len(row) == 6
            assert not any((user, x) in pos for x in row[1:])
        conv_rate = m.train.conversion.sum() / m.train.click.sum()
        assert 0 < conv_rate < 1


def test_no_future_leakage():
    for m in load():
        check_no_future_leakage(m, FIX / f"{m.name}.txt")


def test_determinism_by_seed_and_market_independence():
    a, b = load(seed=5), load(seed=5)
    for x, y in zip(a, b):
        for s in ("train", "valid", "test"):
            assert np.array_equal(getattr(x, s).items, getattr(y, s).items)
        assert np.array_equal(x.ranking.items, y.ranking.items)
    c = load(seed=6)
    assert not all(np.array_equal(x.train.items, z.train.items) for x, z in zip(a, c))
    alone = load(seed=5, markets=["bb"])[0]
    assert np.array_equal(alone.train.items, a[1].train.items)
    assert np.array_equal(alone.ranking.items, a[1].ranking.items)


def test_layout_tolerance(tmp_path):
    # CRLF line ends, blank lines, reordered columns, tabs between fields.
    text = "date\trate userId itemId\r\n\r\n"
    rows = [("2020-01-0%d" % d, "5.0", "u1", "i%d" % d) for d in range(1, 4)]
    rows += [("2020-01-0%d" % d, "4", "u2", "i%d" % (d + 3)) for d in range(1, 4)]
    text += "".join(" ".join(r) + "\r\n" for r in rows) + "\r\n"
    write(tmp_path, text)
    m = load(tmp_path, protocol=ImplicitProtocol(negatives_per_positive=1, ranking_negatives=2))[0]
    assert (m.n_users, m.n_items) == (2, 6)
    assert m.ranking.items[:, 0].tolist() == [2, 5]


def test_latin1_is_opt_in(tmp_path):
    rows = "".join(f"us\xe9r{u} it\xe9m{u}{i} 5 2020-01-0{i}\n" for u in range(2) for i in range(1, 5))
    write(tmp_path, HEADER + rows, encoding="latin-1")
    with pytest.raises(DataError, match=r"zz\.txt:2: byte 0xe9 is not valid utf-8"):
        load(tmp_path)
    m = load(tmp_path, encoding="latin-1", protocol=ImplicitProtocol(negatives_per_positive=1, ranking_negatives=1))[0]
    assert "it\xe9m01" in m.item_keys.tolist()
    with pytest.raises(ConfigError, match="encoding"):
        load(tmp_path, encoding="utf-16")


GOOD = "u1 i1 5 2020-01-01\nu1 i2 4 2020-01-02\nu1 i3 3 2020-01-03\n"


@pytest.mark.parametrize("text, message", [
    ("", r"zz\.txt: empty file"),
    (HEADER, r"zz\.txt: no data rows"),
    ("userId itemId rate\n" + GOOD, r"zz\.txt:1: header lacks column\(s\) date"),
    ("userId itemId rate date rate\n" + GOOD, r"zz\.txt:1: duplicate column"),
    (HEADER + GOOD + "u2 i1 5\n", r"zz\.txt:5: expected 4 space-separated fields, got 3"),
    (HEADER + GOOD + "u2 i1 five 2020-01-01\n", r"zz\.txt:5: column 'rate': 'five' is not a rating"),
    (HEADER + GOOD + "u2 i1 nan 2020-01-01\n", r"zz\.txt:5: column 'rate'"),
    (HEADER + GOOD + "u2 i1 6 2020-01-01\n", r"zz\.txt:5: column 'rate': '6'"),
    (HEADER + GOOD + "u2 i1 0 2020-01-01\n", r"zz\.txt:5: column 'rate': '0'"),
    (HEADER + "\n" + GOOD + "u2 i1 5 2020-13-01\n", r"zz\.txt:6: column 'date': '2020-13-01' is not a date"),
    (HEADER + GOOD + "u2 i1 5 2020\n", r"zz\.txt:5: column 'date': '2020'"),
    (HEADER + GOOD + "u2 i1 5 NaT-NaT-NA\n", r"zz\.txt:5: column 'date'"),
    (HEADER.encode() + GOOD.encode() + b"u2 \xff\xfe 5 2020-01-01\n", r"zz\.txt:5: byte 0xff is not valid utf-8"),
    (HEADER.encode() + b"u1 i1 5 2020-01-01\x00\n", r"zz\.txt:2: NUL byte"),
])
def test_malformed_files_name_file_and_line(tmp_path, text, message):
    write(tmp_path, text)
    with pytest.raises(DataError, match=message):
        load(tmp_path)


def test_missing_paths_and_markets(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no <market>.txt files"):
        load(tmp_path)
    write(tmp_path, HEADER + GOOD)
    with pytest.raises(DataError, match=r"not a directory"):
        load(tmp_path / "zz.txt")
    with pytest.raises(DataError, match=r"yy\.txt: no such market file \(available: zz\)"):
        load(tmp_path, markets=["yy"])


def test_too_small_markets_are_refused(tmp_path):
    # Two users with two interactions each: nobody can be held out.
    write(tmp_path, HEADER + "u1 i1 5 2020-01-01\nu1 i2 5 2020-01-02\nu2 i1 5 2020-01-01\nu2 i3 4 2020-01-05\n")
    with pytest.raises(DataError, match=r"market 'zz': only 0 users have >= 3"):
        load(tmp_path)
    # Duplicates do not count twice.
    write(tmp_path, HEADER + "u1 i1 5 2020-01-01\nu1 i1 5 2020-01-02\nu1 i2 5 2020-01-03\n")
    with pytest.raises(DataError, match="only 0 users"):
        load(tmp_path)
    # Asking for more distinct negatives than the catalogue allows.
    write(tmp_path, HEADER + GOOD)
    with pytest.raises(DataError, match="never interacted"):
        load(tmp_path)
