"""DEMO TARGET ONLY: a self-contained synthetic CTR model to exercise the audit end to end.

This is not FedMM and not the project's DP-SGD (that is Opacus in ``privacy``/``models``). It
is a small numpy logistic CTR model over one-hot user, item and hashed user x item cross
features (the cross table lets it memorise individual records, as real CTR models with
large embedding tables do), trained with Adagrad either non-privately or with a plain DP-SGD
(Poisson sampling, per-example clipping, Gaussian noise on the sum). Its epsilon comes from
Google's ``dp_accounting`` PLD accountant (pessimistic, a certified upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .target import MarketAuditTarget, ScoreFn

__all__ = ["DemoCtrData", "DemoTraining", "make_demo_ctr_data", "demo_epsilon", "train_demo_model",
           "demo_targets"]


@dataclass(frozen=True)
class DemoCtrData:
    """Records as feature ids (user, item, cross bucket) and click labels."""

    user: np.ndarray
    item: np.ndarray
    cross: np.ndarray
    y: np.ndarray
    n_users: int
    n_items: int
    n_cross: int

    @property
    def n_features(self) -> int:
        return self.n_users + self.n_items + self.n_cross + 1  # + bias

    def take(self, idx: np.ndarray) -> "DemoCtrData":
        return DemoCtrData(self.user[idx], self.item[idx], self.cross[idx], self.y[idx],
                           self.n_users, self.n_items, self.n_cross)

    def concat(self, other: "DemoCtrData") -> "DemoCtrData":
        return DemoCtrData(np.r_[self.user, other.user], np.r_[self.item, other.item],
                           np.r_[self.cross, other.cross], np.r_[self.y, other.y],
                           self.n_users, self.n_items, self.n_cross)

    def columns(self) -> np.ndarray:
        """(n, 4) parameter index of each active one-hot feature."""
        u0, i0 = 0, self.n_users
        c0 = i0 + self.n_items
        bias = c0 + self.n_cross
        return np.stack([self.user + u0, self.item + i0, self.cross + c0,
                         np.full(self.user.size, bias)], axis=1)


@dataclass(frozen=True)
class DemoTraining:
    """``noise_multiplier=None`` trains non-privately (full batch); otherwise DP-SGD."""

    steps: int
    learning_rate: float = 0.5
    noise_multiplier: float | None = None
    sample_rate: float = 0.1
    clip_norm: float = 1.0


def make_demo_ctr_data(*, n_records: int, n_users: int, n_items: int, n_cross: int,
                       rng: np.random.Generator, label_noise: float = 0.3) -> DemoCtrData:
    """Clicks from user and item propensities; ``label_noise`` of labels are coin flips, which
    is what a memorising model can be caught fitting."""
    user = rng.integers(0, n_users, n_records)
    item = rng.integers(0, n_items, n_records)
    u_eff = rng.normal(0, 1, n_users)
    i_eff = rng.normal(0, 1, n_items)
    p = 1 / (1 + np.exp(-(u_eff[user] + i_eff[item] - 0.5)))
    y = (rng.random(n_records) < p).astype(np.int8)
    flip = rng.random(n_records) < label_noise
    y = np.where(flip, rng.integers(0, 2, n_records), y).astype(np.int8)
    cross = (user.astype(np.int64) * 1_000_003 + item.astype(np.int64) * 7_919) % n_cross
    return DemoCtrData(user, item, cross, y, n_users, n_items, n_cross)


def demo_epsilon(training: DemoTraining, *, delta: float) -> float | None:
    """PLD epsilon (pessimistic) of the DP-SGD configuration, None when non-private."""
    if training.noise_multiplier is None:
        return None
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(training.sample_rate,
                                            dp_accounting.GaussianDpEvent(training.noise_multiplier)),
        training.steps)
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def train_demo_model(data: DemoCtrData, training: DemoTraining, *, rng: np.random.Generator,
                     expected_dataset_size: int) -> np.ndarray:
    """Return the weight vector. Per-example gradients of logistic loss on 4 one-hot features are
    (sigmoid(z) - y) on each of the 4 columns, norm 2|sigmoid(z) - y|, so clipping is exact and
    cheap. DP-SGD divides the noisy sum by the *expected* batch size (fixed, data independent)."""
    if training.steps < 1:
        raise ConfigError("steps", f"must be >= 1, got {training.steps}")
    cols = data.columns()
    y = data.y.astype(float)
    d = data.n_features
    w = np.zeros(d)
    accum = np.full(d, 1e-8)
    private = training.noise_multiplier is not None
    denom = training.sample_rate * expected_dataset_size if private else max(1, y.size)
    for _ in range(training.steps):
        if private:
            batch = np.nonzero(rng.random(y.size) < training.sample_rate)[0]
        else:
            batch = np.arange(y.size)
        bc = cols[batch]
        z = w[bc].sum(axis=1)
        resid = 1 / (1 + np.exp(-z)) - y[batch]
        if private:
            norms = 2 * np.abs(resid)
            resid = resid * np.minimum(1.0, training.clip_norm / np.maximum(norms, 1e-12))
        grad = np.bincount(bc.reshape(-1), weights=np.repeat(resid, 4), minlength=d)
        if private:
            grad = grad + rng.normal(0, training.noise_multiplier * training.clip_norm, d)
        grad /= denom
        accum += grad**2
        w -= training.learning_rate * grad / np.sqrt(accum)
    return w


class _DemoScore:
    def __init__(self, w: np.ndarray, pool: DemoCtrData) -> None:
        self._w = w
        self._cols = pool.columns()
        self._sign = 2.0 * pool.y - 1.0

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        return self._sign[idx] * self._w[self._cols[idx]].sum(axis=1)


class _DemoTrainFn:
    def __init__(self, base: DemoCtrData, pool: DemoCtrData, training: DemoTraining) -> None:
        self._base, self._pool, self._training = base, pool, training
        self._expected = base.y.size + pool.y.size // 2

    def __call__(self, member_mask: np.ndarray, seed: int) -> ScoreFn:
        mask = np.asarray(member_mask, dtype=bool)
        if mask.shape != self._pool.y.shape:
            raise ConfigError("member_mask", f"shape {mask.shape}, pool has {self._pool.y.size} records")
        data = self._base.concat(self._pool.take(np.nonzero(mask)[0]))
        w = train_demo_model(data, self._training, rng=np.random.default_rng(seed),
                             expected_dataset_size=self._expected)
        return _DemoScore(w, self._pool)


def demo_targets(*, seed: int, private: bool, delta: float, quick: bool = True,
                 noise_multiplier: float = 1.0,
                 accountant: Callable[[DemoTraining], float | None] | None = None,
                 ) -> dict[str, MarketAuditTarget]:
    """Two synthetic markets (a rich one and a sparse one) as audit targets.

    Each market has a fixed base training set, a candidate pool (loss/LiRA) and a pool of
    crafted canaries (records with random labels in their own cross buckets) for the canary
    audit. ``private`` selects DP-SGD with ``noise_multiplier`` and the PLD epsilon at ``delta``.
    ``accountant`` replaces the PLD accountant (tests use it to plant a mis-accounted run).
    """
    if accountant is None:
        def accountant(training: DemoTraining) -> float | None:
            return demo_epsilon(training, delta=delta)

    rng = np.random.default_rng(seed)
    targets: dict[str, MarketAuditTarget] = {}
    sizes = {"demo-rich": (1500, 1000), "demo-sparse": (600, 1000)} if quick else \
        {"demo-rich": (6000, 2000), "demo-sparse": (2000, 2000)}
    for name, (n_base, n_pool) in sizes.items():
        n_users, n_items = 150, 200
        n_cross = 8 * (n_base + 2 * n_pool)
        data = make_demo_ctr_data(n_records=n_base + n_pool, n_users=n_users, n_items=n_items,
                                  n_cross=n_cross, rng=rng)
        base, pool = data.take(np.arange(n_base)), data.take(np.arange(n_base, n_base + n_pool))
        # Canaries: real user/item ids, a fresh cross bucket each (an unusual pair), coin-flip label.
        cu = rng.integers(0, n_users, n_pool)
        ci = rng.integers(0, n_items, n_pool)
        canaries = DemoCtrData(cu, ci, rng.permutation(n_cross)[:n_pool], rng.integers(0, 2, n_pool).astype(np.int8),
                               n_users, n_items, n_cross)
        steps = 150 if quick else 400
        training = DemoTraining(steps=steps, noise_multiplier=noise_multiplier if private else None)
        targets[name] = MarketAuditTarget(
            name=name, pool_size=n_pool, train_fn=_DemoTrainFn(base, pool, training),
            accountant_epsilon=accountant(training),
            canary_pool_size=n_pool, canary_train_fn=_DemoTrainFn(base, canaries, training),
            description=("DEMO synthetic CTR logistic model, "
                         + (f"DP-SGD sigma={noise_multiplier}, q={training.sample_rate}, steps={steps}"
                            if private else "non-private")))
    return targets
