from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.data.loaders import available_datasets, load_markets, shared_item_pairs
from fedmm_secure.data.market import MarketData, MarketSplit
from fedmm_secure.errors import ConfigError, DataError

FIX = Path(__file__).parent / "fixtures"


def test_every_scheme_dispatches():
    assert {"synthetic", "xmrec", "movielens", "aliexpress"} <= set(available_datasets())
    xm = load_markets(f"xmrec:{FIX / 'xmrec'}", seed=0, negatives_per_positive=3, ranking_negatives=4)
    assert [m.name for m in xm] == ["aa", "bb"]
    assert len(xm[0].train) == 4 * int(xm[0].train.click.sum()) and xm[0].ranking.items.shape[1] == 5
    ml = load_markets(f"movielens:{FIX / 'ml-1m'}", markets=["zip1"], seed=0, negatives_per_positive=1,
                      ranking_negatives=2)
    assert [m.name for m in ml] == ["zip1"]
    ae = load_markets(f"aliexpress:{FIX / 'aliexpress/by_file'}", seed=0, numerical_bins=3)
    assert set(ae[0].meta["row_feature_cards"][15:]) == {3}


@pytest.mark.parametrize("spec, message", [
    ("parquet:/x", "unknown dataset 'parquet'"),
    ("/just/a/path", "unknown dataset '/just/a/path'"),
    ("xmrec", "not of the form xmrec:PATH"),
    ("xmrec:", "empty path"),
    ("synthetic:/x", "takes no path"),
])
def test_bad_specs_name_the_allowed_schemes(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_markets(spec, seed=0)
    assert info.value.field == "data.source"
    assert {"xmrec:PATH", "movielens:PATH", "aliexpress:PATH", "synthetic"} <= set(info.value.allowed.split(", "))


def test_bad_options():
    with pytest.raises(ConfigError, match="unknown option"):
        load_markets(f"xmrec:{FIX / 'xmrec'}", seed=0, item_column="categorical_2")
    with pytest.raises(ConfigError, match="unknown option"):
        load_markets(f"aliexpress:{FIX / 'aliexpress/by_file'}", seed=0, colour="red")
    with pytest.raises(ConfigError, match="unique"):
        load_markets(f"xmrec:{FIX / 'xmrec'}", seed=0, markets=["aa", "aa"])
    with pytest.raises(ConfigError, match="negatives_per_positive"):
        load_markets(f"xmrec:{FIX / 'xmrec'}", seed=0, negatives_per_positive=0)
    with pytest.raises(DataError, match="missing-dir: no such directory"):
        load_markets(f"movielens:{FIX / 'missing-dir'}", seed=0)


def test_shared_item_pairs_finds_the_same_product():
    aa, bb = load_markets(f"xmrec:{FIX / 'xmrec'}", seed=0, negatives_per_positive=1, ranking_negatives=2)
    # P01 and P05 are sold in both fixture markets.
    assert shared_item_pairs([aa, bb]) == [("aa", 0, "bb", 0), ("aa", 4, "bb", 1)]
    assert shared_item_pairs([bb, aa]) == [("bb", 0, "aa", 0), ("bb", 1, "aa", 4)]
    for a, ia, b, ib in shared_item_pairs([aa, bb]):
        assert aa.item_keys[ia] == bb.item_keys[ib]
    ml = load_markets(f"movielens:{FIX / 'ml-100k'}", seed=0, negatives_per_positive=1, ranking_negatives=2)
    pairs = shared_item_pairs(ml)
    # Movie 10 is rated in zip0, zip1 and zip_other; 11 in zip0 and zip9; 12 only in zip0.
    keys = {(a, b, int(ml[[m.name for m in ml].index(a)].item_keys[ia])) for a, ia, b, _ in pairs}
    assert keys == {("zip0", "zip1", 10), ("zip0", "zip_other", 10), ("zip1", "zip_other", 10),
                    ("zip0", "zip9", 11)}


def test_shared_item_pairs_needs_item_keys():
    split = MarketSplit(np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones(1, np.float32),
                        np.zeros(1, np.float32))
    synthetic = MarketData("s", 1, 1, split, split, split)
    with pytest.raises(DataError, match="no item_keys"):
        shared_item_pairs([synthetic])
