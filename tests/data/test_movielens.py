import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.data.implicit import ImplicitProtocol
from fedmm_secure.data.movielens import load_movielens, market_of_zip
from fedmm_secure.errors import DataError

FIX = Path(__file__).parent / "fixtures"
SMALL = ImplicitProtocol(negatives_per_positive=2, ranking_negatives=3)
REGION_USERS = {"zip0": [1, 6], "zip1": [2, 7], "zip9": [3, 5], "zip_other": [4, 8]}


def load(root, seed=0, protocol=SMALL, **kw):
    return load_movielens(root, seed=seed, protocol=protocol, **kw)


def raw_ratings():
    out = {}
    for line in (FIX / "ml-100k" / "u.data").read_text().splitlines():
        u, i, r, t = map(int, line.split("\t"))
        out[(u, i)] = (r, t)
    return out


def key_maps(m, raw):
    users = REGION_USERS[m.name]
    user_keys = sorted(u for u in users if any(r >= 4 for (uu, _), (r, _) in raw.items() if uu == u))
    return np.asarray(user_keys), m.item_keys


def test_markets_are_zip_regions():
    assert market_of_zip("02138") == "zip0" and market_of_zip("94110-1234") == "zip9"
    assert market_of_zip("T8H 1N5") == "zip_other" and market_of_zip("") == "zip_other"
    assert market_of_zip("\u0663123") == "zip_other"  # non-ASCII digits are not US zip codes
    for variant in ("ml-100k", "ml-1m"):
        ms = load(FIX / variant)
        assert [m.name for m in ms] == ["zip0", "zip1", "zip9", "zip_other"]
        assert [m.n_users for m in ms] == [2, 2, 2, 2]
        assert [m.n_items for m in ms] == [10, 10, 9, 9]
        assert ms[0].item_keys.tolist() == [10, 11, 12, 13, 14, 29, 30, 31, 32, 33]
        assert ms[0].meta["source"] == f"movielens-{variant[3:]}"


def test_labels_follow_ratings_and_negatives_avoid_every_rated_item():
    raw = raw_ratings()
    for m in load(FIX / "ml-100k"):
        ukeys, ikeys = key_maps(m, raw)
        for s in (m.train, m.valid, m.test):
            for u, i, c, v in zip(s.users, s.items, s.click, s.conversion):
                pair = (int(ukeys[u]), int(ikeys[i]))
                if c == 1:
                    assert raw[pair][0] >= 4 and v == (raw[pair][0] == 5)
                else:
                    assert pair not in raw  # neither a positive nor a low-rated movie
        for u, row in zip(m.ranking.users, m.ranking.items):
            assert raw[(int(ukeys[u]), int(ikeys[row[0]]))][0] >= 4
            assert all((int(ukeys[u]), int(ikeys[x])) not in raw for x in row[1:])
        n_pos = sum(1 for (u, _), (r, _) in raw.items() if u in ukeys and r >= 4)
        assert int(sum(s.click.sum() for s in (m.train, m.valid, m.test))) == n_pos


def test_time_split_has_no_future_leakage():
    raw = raw_ratings()
    for m in load(FIX / "ml-1m"):
        ukeys, ikeys = key_maps(m, raw)
        t = lambda s: {(int(ukeys[u]), int(ikeys[i])): raw[(int(ukeys[u]), int(ikeys[i]))][1]
                       for u, i in zip(s.users[s.click == 1], s.items[s.click == 1])}
        tr, va, te = t(m.train), t(m.valid), t(m.test)
        for u in ukeys:
            train_times = [v for (uu, _), v in tr.items() if uu == u]
            held = [v for (uu, _), v in list(va.items()) + list(te.items()) if uu == u]
            assert len(held) == 2 and min(held) >= max(train_times)


def test_user_features_share_one_vocabulary():
    ml100, ml1m = load(FIX / "ml-100k"), load(FIX / "ml-1m")
    for a, b in zip(ml100, ml1m):
        assert a.user_feature_cards[:2] == (7, 2) and b.user_feature_cards == (7, 2, 21)
        # Same users, ages bucketed the ML-1M way, same genders.
        assert np.array_equal(a.user_features[:, :2], b.user_features[:, :2])
        assert np.all(a.user_features < np.asarray(a.user_feature_cards))
        # Same ratings in both layouts: identical labels for the same seed.
        assert np.array_equal(a.train.items, b.train.items)
        assert np.array_equal(a.ranking.items, b.ranking.items)
    zip0 = ml1m[0]
    assert zip0.user_features.tolist() == [[1, 0, 17], [4, 0, 7]]  # users 1 and 6


def test_market_selection_and_seed():
    one = load(FIX / "ml-100k", markets=["zip9"], seed=3)
    assert [m.name for m in one] == ["zip9"]
    again = [m for m in load(FIX / "ml-100k", seed=3) if m.name == "zip9"][0]
    assert np.array_equal(one[0].train.items, again.train.items)
    with pytest.raises(DataError, match=r"no ratings for market 'zip5' \(available: zip0, zip1, zip9, zip_other\)"):
        load(FIX / "ml-100k", markets=["zip5"])


def copy_variant(tmp_path, variant):
    dst = tmp_path / variant
    shutil.copytree(FIX / variant, dst)
    return dst


def append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


@pytest.mark.parametrize("variant, file, text, message", [
    ("ml-100k", "u.data", "9\t10\t5\t881250949\n", r"u\.data:41: user 9 is not in the users file"),
    ("ml-100k", "u.data", "1\t10\t6\t881250949\n", r"u\.data:41: column 'rating': '6' is not an integer in \[1, 5\]"),
    ("ml-100k", "u.data", "1\t10\t4.5\t881250949\n", r"u\.data:41: column 'rating': '4.5'"),
    ("ml-100k", "u.data", "1\t10\t5\tyesterday\n", r"u\.data:41: column 'timestamp': 'yesterday'"),
    ("ml-100k", "u.data", "1\t10\t5\n", r"u\.data:41: expected 4 '\\t'-separated fields, got 3"),
    ("ml-100k", "u.user", "1|30|M|writer|12345\n", r"u\.user:9: user 1 listed twice"),
    ("ml-100k", "u.user", "9|30|X|writer|12345\n", r"u\.user:9: gender 'X' is not 'M' or 'F'"),
    ("ml-100k", "u.user", "9|old|M|writer|12345\n", r"u\.user:9: column 'age': 'old'"),
    ("ml-100k", "u.user", "9|30|M||12345\n", r"u\.user:9: empty occupation"),
    ("ml-1m", "users.dat", "9::M::30::1::12345\n", r"users\.dat:9: age code 30 is not one of"),
    ("ml-1m", "users.dat", "9::M::25::21::12345\n", r"users\.dat:9: column 'occupation': '21'"),
    ("ml-1m", "ratings.dat", "1::10::5::-3\n", r"ratings\.dat:41: column 'timestamp': '-3'"),
    ("ml-1m", "ratings.dat", "1::10::5::3::4\n", r"ratings\.dat:41: expected 4 '::'-separated fields"),
])
def test_malformed_files_name_file_and_line(tmp_path, variant, file, text, message):
    root = copy_variant(tmp_path, variant)
    append(root / file, text)
    with pytest.raises(DataError, match=message):
        load(root)


def test_missing_files_and_encodings(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load(tmp_path / "nowhere")
    with pytest.raises(DataError, match="neither MovieLens 100K"):
        load(tmp_path)
    root = copy_variant(tmp_path, "ml-100k")
    (root / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user: no such file"):
        load(root)
    root = copy_variant(tmp_path, "ml-1m")
    (root / "users.dat").write_bytes((FIX / "ml-1m" / "users.dat").read_bytes() + b"9::F::25::1::Z\xe9rich\n")
    with pytest.raises(DataError, match=r"users\.dat:9: byte 0xe9 is not valid utf-8"):
        load(root)
    assert len(load(root, encoding="latin-1")) == 4
    (root / "ratings.dat").write_text("\n\n")
    with pytest.raises(DataError, match=r"ratings\.dat: no data rows"):
        load(root, encoding="latin-1")


def test_regions_without_positives_or_test_users_are_refused(tmp_path):
    root = copy_variant(tmp_path, "ml-100k")
    append(root / "u.user", "9|30|M|writer|55455\n")
    append(root / "u.data", "9\t10\t2\t881250949\n9\t11\t3\t881250950\n")
    with pytest.raises(DataError, match=r"market 'zip5' has no ratings >= 4"):
        load(root)
    append(root / "u.data", "9\t12\t5\t881250951\n")
    with pytest.raises(DataError, match=r"market 'zip5': only 0 users"):
        load(root, markets=["zip5"])
    assert len(load(root, markets=["zip0", "zip1"])) == 2
