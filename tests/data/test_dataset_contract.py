"""Every registered dataset passes the dataset contract (fedmm_secure.contracts.datasets).

Parametrized over the registry: a dataset registered with a ``sample`` is tested without a new
test; the file formats are loaded from the fixtures here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmm_secure.contracts import DATASET_CHECKS, ContractViolation, check_dataset
from fedmm_secure.data.loaders import DATASETS, available_datasets, dataset_entry, load_markets, register_dataset
from fedmm_secure.data.market import MarketData, MarketSplit
from fedmm_secure.errors import ConfigError

FIX = Path(__file__).parent / "fixtures"
FIXTURE_SPECS = {
    "xmrec": (f"xmrec:{FIX / 'xmrec'}", {"negatives_per_positive": 1, "ranking_negatives": 2}),
    "movielens": (f"movielens:{FIX / 'ml-1m'}", {"negatives_per_positive": 1, "ranking_negatives": 2}),
    "aliexpress": (f"aliexpress:{FIX / 'aliexpress/by_file'}", {}),
}


def _loader(name: str):
    if name in FIXTURE_SPECS:
        spec, options = FIXTURE_SPECS[name]
        return lambda: load_markets(spec, seed=0, **options)
    sample = dataset_entry(name).sample
    assert sample is not None, f"dataset {name!r} needs a fixture here or register_dataset(..., sample=...)"
    return sample


@pytest.mark.parametrize("check", sorted(DATASET_CHECKS))
@pytest.mark.parametrize("name", available_datasets())
def test_registered_dataset_passes(name, check):
    DATASET_CHECKS[check](_loader(name))


def _market(name="m", users=(0, 1, 1, 0), items=(0, 1, 2, 1), click=(1, 0, 1, 1)) -> MarketData:
    split = MarketSplit(np.array(users, np.int64), np.array(items, np.int64), np.array(click, np.float32),
                        np.zeros(len(users), np.float32))
    return MarketData(name=name, n_users=2, n_items=3, train=split, valid=split.subset(np.array([2])),
                      test=split.subset(np.array([3])))


def test_contract_catches_leaking_splits_and_global_ids():
    with pytest.raises(ContractViolation, match="also train positives"):
        check_dataset(lambda: [_market()])
    # Users 0..1 of a 5-user space that other markets share: ids are not the market's own.
    leaky = _market()
    wide = MarketData(name="m", n_users=5, n_items=3, train=leaky.train, valid=leaky.test, test=leaky.test)
    with pytest.raises(ContractViolation, match="own 0..n_users-1"):
        DATASET_CHECKS["local_id_spaces"](lambda: [wide])


@pytest.fixture
def demo_name():
    yield "contract-demo"
    DATASETS.unregister("contract-demo")


def test_a_user_dataset_plugs_into_load_markets(tmp_path, demo_name):
    seen = {}

    @register_dataset("contract-demo", sample=lambda: [_market()])
    def load(path, *, seed, markets, scale=1):
        seen.update(path=path, seed=seed, markets=markets, scale=scale)
        return [_market("x"), _market("y")]

    assert "contract-demo" in available_datasets()
    out = load_markets(f"contract-demo:{tmp_path}", seed=3, markets=["y"], scale=2)
    assert [m.name for m in out] == ["y"] and seen == {"path": tmp_path, "seed": 3, "markets": ["y"], "scale": 2}
    with pytest.raises(ConfigError, match="already registered"):
        register_dataset("contract-demo")(lambda path, **kw: [])
    with pytest.raises(ConfigError, match="invalid name"):
        register_dataset("Bad:Name")(load)
    with pytest.raises(ConfigError, match="unknown market"):
        load_markets(f"contract-demo:{tmp_path}", seed=0, markets=["z"])
