"""Validation-based choices of a FedMM market (model selection, served Platt map): exact without
DP, noisy and accounted with DP, and not reading validation rows at all when switched off."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmm_secure.config import ModelConfig, PrivacyConfig, RunConfig
from fedmm_secure.data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from fedmm_secure.federation import fedmm
from fedmm_secure.federation.fedmm.features import MarketRun
from fedmm_secure.federation.fedmm.privacy import privacy_session
from fedmm_secure.federation.fedmm.selection import ModelSelector, served_calibration
from fedmm_secure.federation.hooks import RoundHooks
from fedmm_secure.metrics import evaluate_ctr
from fedmm_secure.models.calibration import PlattScaling, fit_platt
from fedmm_secure.privacy.validation import ValidationAccess
from fedmm_secure.runtime.embedded import EmbeddedSecureSum

SPECS = (MarketSpec("a", 80, 40, 8), MarketSpec("b", 50, 30, 6))
# Size weights for shared keys: these tests count validation releases only (the per-product count
# release reads training rows; tests/federation/test_joint.py and test_run_accounting.py cover it).
MODEL = ModelConfig(vq_epochs=1, cf_dim=8, latent_dim=4, n_global=8, n_local=4, ctr_dim=8, ctr_hidden=(8,),
                    batch_size=32, vq_rounds=1, key_weights="size")


@pytest.fixture(scope="module")
def markets():
    return generate_markets(SyntheticConfig(markets=SPECS), seed=0)


class _Fixed(RoundHooks):
    """Hands out one fixed access and counts the requests."""

    def __init__(self, access: ValidationAccess) -> None:
        self.access, self.asked = access, []

    def validation_access(self, market, purpose, releases=1):
        self.asked.append((market, purpose, releases))
        return self.access


def _offer(selector: ModelSelector, candidates: list[np.ndarray]) -> object:
    for i, p in enumerate(candidates):
        selector.consider(lambda p=p: p, lambda i=i: i)
    return selector.kept()


def test_exact_selection_keeps_the_highest_auc_and_exact_calibration_is_the_ml_fit(markets):
    r = MarketRun(markets[0], torch.Generator())
    y = r.data.valid.click
    rng = np.random.default_rng(0)
    good, noise = np.clip(y * 0.6 + rng.random(len(y)) * 0.4, 0, 1), rng.random(len(y))
    assert evaluate_ctr(y, good)["auc"] > evaluate_ctr(y, noise)["auc"]
    assert _offer(ModelSelector(r, RoundHooks(), enabled=True), [noise, good, noise]) == 1
    z = rng.normal(size=len(y))
    assert served_calibration(r, RoundHooks(), z) == fit_platt(z, y)


def test_private_selection_with_little_noise_keeps_the_better_brier_score(markets):
    r = MarketRun(markets[0], torch.Generator())
    y = r.data.valid.click
    good, bad = 0.8 * y + 0.1, 0.5 * np.ones(len(y))
    hooks = _Fixed(ValidationAccess("private", 1e-6, torch.Generator().manual_seed(0)))
    assert _offer(ModelSelector(r, hooks, enabled=True), [bad, good, bad]) == 1
    # One release per comparison: every candidate after the first.
    assert hooks.asked == [("a", "ctr-select", 1)] * 2


def test_refused_or_switched_off_selection_keeps_the_newest_model(markets):
    r = MarketRun(markets[0], torch.Generator())
    y = r.data.valid.click
    good, bad = 0.8 * y + 0.1, 0.5 * np.ones(len(y))
    assert _offer(ModelSelector(r, _Fixed(ValidationAccess("refused")), enabled=True), [good, bad]) == 1
    off = _Fixed(ValidationAccess("refused"))
    assert _offer(ModelSelector(r, off, enabled=False), [good, bad]) is None and off.asked == []
    assert served_calibration(r, _Fixed(ValidationAccess("refused")), np.zeros(len(y))) == PlattScaling()


def _flip(m):
    # Conversions are post-click: none survive a flip of the clicks.
    valid = dataclasses.replace(m.valid, click=(1.0 - m.valid.click).astype(np.float32),
                                conversion=np.zeros_like(m.valid.conversion))
    return dataclasses.replace(m, valid=valid)


def _private_run(markets, model: ModelConfig) -> tuple[dict, dict]:
    # Reproducible randomness (NOT private): the same noise in both runs, so any difference comes
    # from the validation labels.
    cfg = RunConfig(rounds=2, model=model, privacy=PrivacyConfig(enabled=True, epsilon=3.0, randomness="reproducible"))
    session = privacy_session(cfg, markets, method="fedmm", ledger=None, method_index=0)
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    out = fedmm.run_method("fedmm", markets, model, rounds=2, seed=0, secure_sum=ss, trainers=session, hooks=session)
    return out["markets"], session.summary()


def test_flipping_validation_labels_changes_nothing_when_selection_and_calibration_are_off(markets):
    off = dataclasses.replace(MODEL, select_by_validation=False, calibrate=False)
    flipped = [_flip(m) for m in markets]
    base, base_priv = _private_run(markets, off)
    other, other_priv = _private_run(flipped, off)
    for m in ("a", "b"):
        assert base[m]["auc"] == other[m]["auc"] and base[m]["logloss"] == other[m]["logloss"]
        assert base_priv[m]["epsilon"] == other_priv[m]["epsilon"]
        assert base_priv[m]["validation"]["releases_planned"] == 0
    # The control: with selection and calibration on, the same flip does change the served model.
    select = dataclasses.replace(MODEL, serve="select")
    on_base, on_priv = _private_run(markets, select)
    on_other, _ = _private_run(flipped, select)
    assert any(on_base[m]["logloss"] != on_other[m]["logloss"] or on_base[m]["auc"] != on_other[m]["auc"]
               for m in ("a", "b"))
    assert all(on_priv[m]["validation"]["releases_used"] == 1 + 3 for m in ("a", "b"))


def test_a_private_ensemble_compares_nothing_so_its_ranking_ignores_the_validation_labels(markets):
    # model.serve: ensemble (the default): a round's two models are one candidate, so a private
    # federated market makes no comparison; only the Platt fit reads validation rows.
    assert MODEL.serve == "ensemble"
    flipped = [_flip(m) for m in markets]
    base, base_priv = _private_run(markets, MODEL)
    other, _ = _private_run(flipped, MODEL)
    for m in ("a", "b"):
        assert base[m]["auc"] == other[m]["auc"]
        assert base_priv[m]["validation"]["releases_planned"] == base_priv[m]["validation"]["releases_used"] == 3
    # The calibration still reads them: the flip moves the served LogLoss.
    assert any(base[m]["logloss"] != other[m]["logloss"] for m in ("a", "b"))
