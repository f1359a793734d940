"""`centralized` per-market fine-tuning: each market continues from the pooled model on its own
training rows only, selects on its own validation split only, and the per-market metrics keep
the shape they had (results.json unchanged)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmm_secure.data.market import MarketSplit
from fedmm_secure.data.synthetic import SyntheticConfig, generate_markets
from fedmm_secure.federation import fedmm
from fedmm_secure.federation.fedmm.evaluation import predict, split_pooled
from fedmm_secure.federation.fedmm.features import ctr_inputs
from fedmm_secure.federation.fedmm.finetune import finetune_market, finetune_pooled, shifted
from fedmm_secure.federation.training import plain_trainers
from fedmm_secure.metrics import evaluate_ctr

from .test_joint import MODEL, SPECS

ROUNDS = 2


@pytest.fixture(scope="module")
def pooled_run():
    ms = generate_markets(SyntheticConfig(markets=SPECS), seed=0)
    pooled = fedmm.pool_markets(ms, market_field=True)
    outs = fedmm.run_pipelines("local_codes", [pooled], MODEL, rounds=ROUNDS, seed=0, secure_sum=None)
    return ms, pooled, outs["pooled"]["run"]


def _poison(split: MarketSplit, rows: np.ndarray) -> MarketSplit:
    """NaN labels on ``rows``, moved onto user 0 and item 0 (valid IDs of every market and of
    the pool, so they pass validation): reading any of them changes or breaks training."""
    users, items, click = split.users.copy(), split.items.copy(), split.click.copy()
    users[rows], items[rows], click[rows] = 0, 0, np.nan
    return MarketSplit(users, items, click, split.conversion)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fine_tuning_reads_only_its_own_markets_training_rows(pooled_run):
    ms, pooled, run = pooled_run
    clean = finetune_market(run, ms[0], 0, MODEL, rounds=ROUNDS, seed=0)
    assert clean.chosen > 0, "the fixture should make fine-tuning win on validation"
    # Every other market's rows poisoned, in the pooled data and in the markets themselves.
    uo = pooled.meta["user_offsets"]
    others = np.flatnonzero(pooled.train.users >= uo[1])
    bad_run = dataclasses.replace(run, data=dataclasses.replace(pooled, train=_poison(pooled.train, others)))
    bad_markets = [ms[0]] + [dataclasses.replace(m, train=_poison(m.train, np.arange(len(m.train)))) for m in ms[1:]]
    again = finetune_market(bad_run, ms[0], 0, MODEL, rounds=ROUNDS, seed=0)
    assert _same(again.model, clean.model) and again.valid_auc == clean.valid_auc
    tuned = finetune_pooled(bad_run, [ms[0]], MODEL, rounds=ROUNDS, seed=0)["a"]
    assert _same(tuned.model, clean.model)
    seen = []

    def recording(**kw):
        seen.append((kw["market"], kw["n_records"], kw["users"].min().item(), kw["users"].max().item()))
        return plain_trainers(**kw)

    finetune_market(run, bad_markets[0], 0, MODEL, rounds=ROUNDS, seed=0, trainers=recording)
    assert seen == [("a", len(ms[0].train), int(ms[0].train.users.min()), int(ms[0].train.users.max()))]


def test_selection_reads_validation_only(pooled_run):
    ms, pooled, run = pooled_run
    for i, m in enumerate(ms):
        t = finetune_market(run, m, i, MODEL, rounds=ROUNDS, seed=0)
        # Garbage test rows (NaN labels, all on user 0 and item 0) change nothing.
        garbage = dataclasses.replace(m, test=_poison(m.test, np.arange(len(m.test))))
        g = finetune_market(run, garbage, i, MODEL, rounds=ROUNDS, seed=0)
        assert g.chosen == t.chosen and g.valid_auc == t.valid_auc and _same(g.model, t.model)
        # The kept candidate is the first best on validation, and it is the returned model.
        assert t.chosen == int(np.argmax(t.valid_auc)) and len(t.valid_auc) == ROUNDS + 1
        v = shifted(m.valid, pooled.meta["user_offsets"][i], pooled.meta["item_offsets"][i])
        kept = evaluate_ctr(m.valid.click, predict(t.model, ctr_inputs(run, v, True)))["auc"]
        assert kept == pytest.approx(t.valid_auc[t.chosen])
        if t.chosen == 0:
            assert _same(t.model, run.ctr)


def test_centralized_results_keep_their_shape(pooled_run):
    ms, pooled, run = pooled_run
    out = fedmm.run_method("centralized", ms, MODEL, rounds=ROUNDS, seed=0, secure_sum=None)
    pooled_only = split_pooled({"runs": {"pooled": run}, "markets": {}}, pooled, ms, calibrate=MODEL.calibrate)

    def shape(x):
        return {k: shape(v) for k, v in x.items()} if isinstance(x, dict) else type(x).__name__

    assert list(out["markets"]) == [m.name for m in ms]
    assert shape(out["markets"]) == shape(pooled_only["markets"])
    assert set(out) == {"markets", "runs"} and list(out["runs"]) == ["pooled"]
    assert set(out["runs"]["pooled"].history["finetune"]) == {m.name for m in ms}
