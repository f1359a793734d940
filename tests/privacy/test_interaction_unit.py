"""The ``interaction`` unit: on implicit feedback one interaction becomes a positive row plus its
sampled negatives; DP must protect all of them together, so DP-SGD Poisson-samples interactions
(whole groups) and clips each group's summed gradient, and that is the default for XMRec and
MovieLens data (synthetic impressions keep ``record``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmm_secure.config import PrivacyConfig, RunConfig, config_from_dict
from fedmm_secure.data.implicit import ImplicitProtocol, build_implicit_market, labelled_split
from fedmm_secure.errors import ConfigError
from fedmm_secure.federation.training import TrainSettings
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.privacy.session import PrivacySession, plan_markets
from fedmm_secure.workflows.fedmm_run import run_experiment


SETTINGS = TrainSettings(epochs=1, batch_size=40, lr=1e-2)


def test_every_row_carries_the_interaction_it_derives_from():
    split = labelled_split(np.array([3, 5]), np.array([7, 9]), np.array([False, True]),
                           np.array([[1, 2, 4], [0, 6, 8]]))
    assert split.interaction.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert split.click.tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert split.n_interactions == 2
    assert split.subset(np.array([4, 5])).interaction.tolist() == [1, 1]


def _implicit_market(rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    users = np.repeat(np.arange(30), 6)
    items = np.concatenate([rng.choice(120, 6, replace=False) for _ in range(30)])
    return build_implicit_market("m", users=users, items=items, times=np.tile(np.arange(6), 30),
                                 conversion=np.zeros(len(users), bool), n_users=30, n_items=120,
                                 protocol=ImplicitProtocol(negatives_per_positive=4, ranking_negatives=20),
                                 rng=np.random.default_rng(1))


def test_implicit_markets_group_each_positive_with_its_negatives():
    m = _implicit_market()
    ids = m.train.interaction
    assert len(ids) == len(m.train) == 5 * m.train.n_interactions
    for g in np.unique(ids):
        rows = np.flatnonzero(ids == g)
        assert len(rows) == 5 and m.train.click[rows].sum() == 1      # one positive, four negatives
        assert len(set(m.train.users[rows])) == 1


@pytest.mark.parametrize("data, unit", [("synthetic", "record"), ("xmrec:somewhere", "interaction"),
                                        ("movielens:somewhere", "interaction"),
                                        ("aliexpress:somewhere", "record")])
def test_the_default_unit_follows_the_data(data, unit):
    assert RunConfig(data=data).resolved().privacy.unit == unit
    # An explicit unit is kept.
    assert RunConfig(data=data, privacy=PrivacyConfig(unit="user")).resolved().privacy.unit == "user"


def test_unknown_units_are_refused():
    with pytest.raises(ConfigError):
        PrivacyConfig(unit="row")


def test_interaction_sampling_takes_whole_interactions_and_reports_the_unit():
    m = _implicit_market()
    n = len(m.train)
    plans = plan_markets(unit="interaction", batch_size=40, epochs={"ctr": 1}, rounds=1, n_records={"m": n},
                         n_users={"m": m.n_users}, n_interactions={"m": m.train.n_interactions})
    # The same expected number of rows per step as record level, reached by sampling interactions.
    assert plans["m"].sample_rate == pytest.approx(40 / 5 / m.train.n_interactions)
    session = PrivacySession(unit="interaction", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure",
                             interactions={"m": m.train.interaction_ids()})
    model = torch.nn.Linear(1, 1)
    x = torch.randn(n, 1)
    y = torch.from_numpy(m.train.click)
    trainer = session(market="m", stage="ctr", model=model,
                      loss_fn=lambda mdl, idx: torch.nn.functional.binary_cross_entropy_with_logits(
                          mdl(x[idx]).squeeze(1), y[idx], reduction="none"),
                      n_records=n, users=torch.from_numpy(m.train.users), settings=SETTINGS,
                      generator=torch.Generator().manual_seed(0))
    sampler = trainer.trainer.sampler
    assert sampler.unit == "interaction" and sampler.num_units_total == m.train.n_interactions
    ids = m.train.interaction
    for _ in range(20):
        draw = sampler.sample()
        got = draw.indices.numpy()
        for g in np.unique(ids[got]):   # a sampled interaction brings every one of its rows
            assert set(np.flatnonzero(ids == g)) <= set(got)
        # one clipping group per interaction
        assert len(np.unique(draw.group_ids.numpy())) == len(np.unique(ids[got])) == draw.num_units
    trainer.train_epochs(1)
    session.before_release("ctr", 0)
    events = list(session.accountants["m"].events)
    assert events and all(e.unit == "interaction" for e in events)
    assert session.summary()["m"]["unit"] == "interaction"


def test_interaction_ids_must_match_the_rows_trained_on():
    plans = plan_markets(unit="interaction", batch_size=4, epochs={"ctr": 1}, rounds=1, n_records={"m": 10},
                         n_users={"m": 2})
    session = PrivacySession(unit="interaction", delta=1e-5, max_grad_norm=1.0, plans=plans, noise_multiplier=1.0,
                             target_epsilon=None, accountant="pld", policy=None, ledger=None, randomness="secure",
                             interactions={"m": np.arange(8)})
    with pytest.raises(ConfigError, match="interaction ids"):
        session(market="m", stage="ctr", model=torch.nn.Linear(1, 1), loss_fn=None, n_records=10,
                users=torch.zeros(10, dtype=torch.long), settings=SETTINGS, generator=torch.Generator())


def _xmrec_dir(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    for name in ("aa", "bb"):
        lines = ["userId itemId rate date"]
        for u in range(40):
            for i in rng.choice(150, size=6, replace=False):
                lines.append(f"U{name}{u} I{name}{i} {rng.integers(1, 6)} 2020-01-{rng.integers(1, 28):02d}")
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_an_xmrec_run_protects_interactions_end_to_end(tmp_path):
    raw = {"rounds": 1, "methods": ["fedmm"], "data": f"xmrec:{_xmrec_dir(tmp_path / 'xm')}",
           "model": {"vq_epochs": 2, "cf_dim": 8, "latent_dim": 4, "n_global": 8, "n_local": 4, "ctr_dim": 8,
                     "ctr_hidden": [8], "batch_size": 32},
           "privacy": {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5}}
    out = tmp_path / "run"
    res = run_experiment(config_from_dict(raw), out_dir=out)
    assert res["config"]["privacy"]["unit"] == "interaction"
    assert json.loads((out / "config.json").read_text())["privacy"]["unit"] == "interaction"
    assert {p["unit"] for p in res["privacy"].values()} == {"interaction"}
    with Ledger.open(out) as led:
        units = {e.unit for evs in led.spent_events().values() for e in evs}
    assert units == {"interaction"}
    assert "**interaction**-level" in _report(out)


def _report(run: Path) -> str:
    from fedmm_secure.cli import main
    assert main(["report", str(run)]) == 0
    return (run / "privacy_report.md").read_text()
