import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.data.aliexpress import CATEGORICAL, NUMERICAL, load_aliexpress
from fedmm_secure.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures" / "aliexpress"
HEADER = ["search_id", *CATEGORICAL, *NUMERICAL, "click", "conversion"]


def raw(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows


def row(sid=1, cat1="7", click="1", conv="0", num="0.5"):
    values = [str(sid), cat1, *(["2"] * 15), *([num] * 63), click, conv]
    return ",".join(values)


def test_folder_layout():
    (nl,) = load_aliexpress(FIX / "by_folder", seed=0)
    assert nl.name == "NL"   # the AliExpress_ prefix is dropped
    train, test = raw(FIX / "by_folder/AliExpress_NL/train.csv"), raw(FIX / "by_folder/AliExpress_NL/test.csv")
    assert len(nl.train) + len(nl.valid) == len(train) and len(nl.test) == len(test)
    assert len(nl.valid) > 0
    # Test rows are the test file, in order, with its explicit labels.
    assert nl.item_keys[nl.test.items].tolist() == [r["categorical_1"] for r in test]
    assert nl.test.click.tolist() == [float(r["click"]) for r in test]
    assert nl.test.conversion.tolist() == [float(r["conversion"]) for r in test]
    clicks = sum(float(r["click"]) for r in train)
    assert nl.train.click.sum() + nl.valid.click.sum() == clicks
    # Whole sessions go to one side.
    assert not set(nl.train.users.tolist()) & set(nl.valid.users.tolist())
    assert nl.ranking is None and nl.meta["item_column"] == "categorical_1"


def test_file_layout_splits_sessions_three_ways():
    es, fr = load_aliexpress(FIX / "by_file", seed=0)
    assert (es.name, fr.name) == ("ES", "FR")
    for m, n in ((es, 45), (fr, 30)):
        assert len(m.train) + len(m.valid) + len(m.test) == n == m.meta["raw_rows"]
        sets = [set(s.users.tolist()) for s in (m.train, m.valid, m.test)]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert len(sets[2]) > 0
        assert m.n_users == len(set().union(*sets))


def test_row_features_use_train_only_statistics(tmp_path):
    root = tmp_path / "x"
    shutil.copytree(FIX / "by_folder", root)
    (a,) = load_aliexpress(root, seed=0)
    f = a.meta["row_features"]
    cards = np.asarray(a.meta["row_feature_cards"])
    assert f["train"].shape == (len(a.train), 15 + 63) and len(a.meta["row_feature_names"]) == 78
    assert "categorical_1" not in a.meta["row_feature_names"]
    for split in ("train", "valid", "test"):
        assert np.all((f[split] >= 0) & (f[split] < cards))
    assert np.all(f["train"][:, :15] > 0)  # 0 is reserved for values unseen in training
    assert np.array_equal(a.meta["numerical"]["test"][:, 0],
                          np.asarray([float(r["numerical_1"]) for r in raw(root / "AliExpress_NL/test.csv")],
                                     dtype=np.float32))
    # Rewrite the test file with extreme numericals and unseen categoricals: train features and
    # train bin edges must not move, test rows land in the outer bin / the unseen index.
    lines = [",".join(HEADER)] + [row(sid=9000 + j, num="1e9") for j in range(3)]
    (root / "AliExpress_NL/test.csv").write_text("\n".join(lines).replace(",2,", ",99,") + "\n")
    (b,) = load_aliexpress(root, seed=0)
    assert np.array_equal(b.meta["row_features"]["train"], f["train"])
    assert np.all(b.meta["row_features"]["test"][:, 15:] == 7)   # numerical_bins - 1
    assert np.any(b.meta["row_features"]["test"][:, :15] == 0)


def test_item_column_and_bins_are_configurable():
    (nl,) = load_aliexpress(FIX / "by_folder", seed=0, item_column="categorical_16", numerical_bins=4)
    assert nl.meta["item_column"] == "categorical_16" and nl.n_items <= 4
    assert set(nl.meta["row_feature_cards"][15:]) == {4}
    with pytest.raises(ConfigError, match="item_column"):
        load_aliexpress(FIX / "by_folder", seed=0, item_column="search_id")
    with pytest.raises(ConfigError, match="numerical_bins"):
        load_aliexpress(FIX / "by_folder", seed=0, numerical_bins=1)
    with pytest.raises(ConfigError, match="valid_fraction"):
        load_aliexpress(FIX / "by_file", seed=0, test_fraction=0.7)


def test_determinism_by_seed():
    a = load_aliexpress(FIX / "by_file", seed=1)
    b = load_aliexpress(FIX / "by_file", seed=1)
    for x, y in zip(a, b):
        assert np.array_equal(x.train.users, y.train.users)
        assert np.array_equal(x.meta["row_features"]["test"], y.meta["row_features"]["test"])
    others = [load_aliexpress(FIX / "by_file", seed=s)[0] for s in (2, 3, 4)]
    assert any(len(o.test) != len(a[0].test) or not np.array_equal(o.test.items, a[0].test.items)
               for o in others)
    alone = load_aliexpress(FIX / "by_file", seed=1, markets=["FR"])[0]
    assert np.array_equal(alone.test.items, a[1].test.items)


def single(tmp_path, lines):
    root = tmp_path / "one"
    root.mkdir(exist_ok=True)
    (root / "DE.csv").write_text("\n".join(lines) + "\n")
    return root


GOOD = [row(sid=s) for s in range(1, 31)]


@pytest.mark.parametrize("lines, message", [
    ([], r"DE\.csv: empty file"),
    ([",".join(HEADER)], r"DE\.csv: no data rows"),
    ([",".join(HEADER[:-1])] + GOOD, r"DE\.csv:1: header lacks column\(s\) conversion"),
    ([",".join(h for h in HEADER if not h.startswith("numerical"))] + GOOD,
     r"DE\.csv:1: header lacks column\(s\) numerical_1, numerical_2, numerical_3, numerical_4, numerical_5 and 58 more"),
    ([",".join(HEADER)] + GOOD + [row(click="0", conv="1")], r"DE\.csv:32: conversion without a click"),
    ([",".join(HEADER)] + GOOD + [row(click="2")], r"DE\.csv:32: column 'click': '2' is not 0 or 1"),
    ([",".join(HEADER)] + GOOD + [row(num="abc")], r"DE\.csv:32: column 'numerical_1': 'abc' is not a finite number"),
    ([",".join(HEADER)] + GOOD + [row(num="inf")], r"DE\.csv:32: column 'numerical_1': 'inf'"),
    ([",".join(HEADER)] + GOOD + [row(cat1="")], r"DE\.csv:32: column 'categorical_1' is empty"),
    ([",".join(HEADER)] + GOOD + ["1,2,3"], r"DE\.csv:32: expected 82 ','-separated fields, got 3"),
    ([",".join(HEADER)] + GOOD + ['"1,' + row()[2:]], r"DE\.csv:\d+: (malformed CSV|expected 82)"),
    ([",".join(HEADER)] + GOOD[:3] + ['"1",' + row()[2:], "1,2"], r"DE\.csv:6: expected 82 ','-separated fields, got 2"),
    (["", ",".join(HEADER)] + GOOD + ["1,2"], r"DE\.csv:33: expected 82"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_aliexpress(single(tmp_path, lines), seed=0)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        load_aliexpress(tmp_path / "nowhere", seed=0)
    with pytest.raises(DataError, match="no AliExpress market found"):
        load_aliexpress(tmp_path, seed=0)
    root = single(tmp_path, [",".join(HEADER)] + GOOD)
    with pytest.raises(DataError, match=r"no market 'NL' \(available: DE\)"):
        load_aliexpress(root, seed=0, markets=["NL"])
    (root / "AliExpress_NL").mkdir()
    (root / "AliExpress_NL/train.csv").write_text("\n".join([",".join(HEADER)] + GOOD) + "\n")
    with pytest.raises(DataError, match="mixes"):
        load_aliexpress(root, seed=0)
    (root / "DE.csv").unlink()
    with pytest.raises(DataError, match=r"AliExpress_NL/test\.csv: missing"):
        load_aliexpress(root, seed=0)


def test_a_single_session_cannot_make_a_test_split(tmp_path):
    root = single(tmp_path, [",".join(HEADER)] + [row(sid=1)] * 5)
    with pytest.raises(DataError, match="empty (train|test) split"):
        load_aliexpress(root, seed=0)
