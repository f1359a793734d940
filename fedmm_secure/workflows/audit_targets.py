"""FedMM CTR models as membership-inference audit targets (glue between ``audit`` and ``federation``).

``fedmm_secure.audit`` never imports the federation; this module does, and turns one market of a
run (its ``config.json`` and ``results.json``) into a :class:`~fedmm_secure.audit.MarketAuditTarget`.

**What is audited: the CTR stage of FedMM** (stage 3, the DP-SGD-trained model that reads raw
clicks), as one market trains it, with the item codes held fixed:

* codes: recomputed once by re-running stages 1-2 (CF embeddings, RQ-VAE) with the run's own
  configuration, seeds and DP settings (:func:`fedmm_codes`). Codes are post-processing of
  DP-trained models, and the audited mechanism takes them as a fixed input; that the CF stage
  also read the pool rows is then outside the audited mechanism, not a flaw in the bound;
* the candidate pool: ``pool_size`` of the market's training rows, drawn with the audit seed;
* ``train_fn(mask, seed)``: a fresh DeepFM (the run's architecture) trained locally for
  ``rounds * ctr_epochs`` epochs (no cross-market averaging, no model selection) on the
  non-pool rows plus the pool rows where ``mask`` is true, through the project's own
  :class:`~fedmm_secure.privacy.dpsgd.DPTrainer` with the run's noise multiplier, clipping norm
  and sample rate (read from ``results.json``), or with the plain trainer for a non-private run.

Absent records are trained with loss weight 0 inside the full index space rather than dropped:
the Poisson sampler, the step count and the ``q * N`` normaliser are then identical in every
audit run (data independent, as the accountant assumes), and a record of weight 0 contributes
exactly a zero gradient, i.e. it is not in the dataset.

The accountant epsilon set against the audit is that of exactly this mechanism:
``SubsampledGaussianEvent(q, sigma, steps)`` composed by the PLD accountant at the audit's
delta (:func:`ctr_stage_epsilon`). It is smaller than the whole run's epsilon, which also pays
for the CF stage.

Canaries (``canary`` attack): ``canary_pool_size`` random (user, item) pairs of the market
that are not training rows, with coin-flip labels, added to the *full* training set, each
included with probability 1/2 by the audit's coin.
"""

from __future__ import annotations

import dataclasses

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..audit import MarketAuditTarget, ScoreFn, phi_from_binary_logits
from ..config import RunConfig, config_from_dict
from ..data.loaders import load_data
from ..data.market import MarketData
from ..errors import ConfigError, DataError
from ..federation.fedmm.driver import run_pipelines
from ..federation.fedmm.privacy import privacy_session
from ..federation.hooks import RoundHooks
from ..federation.training import PlainTrainer, TrainSettings, plain_trainers, sample_rate_for
from ..models.registry import create_ctr_model
from ..privacy.accountant import make_accountant
from ..privacy.dpsgd import DPTrainer, dp_train_epoch
from ..privacy.events import SubsampledGaussianEvent
from ..privacy.randomness import SecureRandom
from ..privacy.sampling import PoissonRecordSampler
from ..runtime.embedded import EmbeddedSecureSum

__all__ = ["AuditedRun", "CtrMechanism", "load_run", "ctr_stage_epsilon", "fedmm_codes",
           "fedmm_ctr_targets"]


@dataclass(frozen=True)
class AuditedRun:
    """A finished run as the audit reads it."""

    run_dir: Path
    config: RunConfig
    results: dict

    @property
    def private(self) -> bool:
        return bool(self.config.privacy.enabled and self.results.get("privacy"))


def load_run(run_dir: Path | str) -> AuditedRun:
    """Read ``config.json`` and ``results.json`` of a ``fedmm-secure run`` directory."""
    d = Path(run_dir)
    for name in ("config.json", "results.json"):
        if not (d / name).is_file():
            raise ConfigError("dir", f"{d} has no {name} (not a finished fedmm-secure run directory)")
    try:
        raw_cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        results = json.loads((d / "results.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError("dir", f"{d}: unreadable run files: {e}") from None
    cfg = config_from_dict(raw_cfg)
    if cfg.model_family != "fedmm":
        raise ConfigError("model_family", f"only fedmm runs can be audited, got {cfg.model_family!r}",
                          allowed="fedmm")
    return AuditedRun(d, cfg, results)


@dataclass(frozen=True)
class CtrMechanism:
    """The CTR-stage training procedure of one market: what ``train_fn`` runs and the accountant
    charges. ``noise_multiplier=None`` is non-private training."""

    sample_rate: float
    epochs: int
    lr: float
    batch_size: int
    noise_multiplier: float | None
    max_grad_norm: float | None

    @property
    def steps(self) -> int:
        return self.epochs * max(1, math.ceil(1.0 / self.sample_rate))

    def to_dict(self) -> dict:
        return {"sample_rate": self.sample_rate, "epochs": self.epochs, "steps": self.steps, "lr": self.lr,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm}


def ctr_stage_epsilon(mechanism: CtrMechanism, *, delta: float, accountant: str = "pld") -> float | None:
    """Epsilon of exactly the audited mechanism at ``delta`` (None when non-private)."""
    if mechanism.noise_multiplier is None:
        return None
    acc = make_accountant(accountant)
    acc.compose(SubsampledGaussianEvent(mechanism.sample_rate, mechanism.noise_multiplier, mechanism.steps))
    return float(acc.get_epsilon(delta))


def fedmm_codes(config: RunConfig, markets: list[MarketData]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Item codes (level 1, level 2) per market: stages 1-2 of FedMM re-run with the run's config,
    seed and DP settings. The secure sum is the exact ``plain`` backend (this is an offline
    recomputation inside one process), so codes equal the run's up to the masking backend's
    fixed-point rounding."""
    # Codes as fixed features of the audited CTR mechanism come from the staged design's stages
    # 1-2 (the joint design makes codes inside the CTR training it audits; see threat_model).
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, design="staged"))
    names = [m.name for m in markets]
    secure_sum = EmbeddedSecureSum(backend="plain", markets=names, run_id=f"audit-{config.seed}",
                                   allow_insecure=True)
    trainers, hooks = plain_trainers, RoundHooks()
    if config.privacy.enabled:
        index = config.methods.index("fedmm") if "fedmm" in config.methods else 0
        session = privacy_session(config, markets, method="fedmm", ledger=None, method_index=index)
        trainers, hooks = session, session
    outs = run_pipelines("fedmm", markets, config.model, rounds=config.rounds, seed=config.seed,
                         secure_sum=secure_sum, trainers=trainers, hooks=hooks, codes_only=True)
    runs = {m: out["run"] for m, out in outs.items()}
    return {m: r.codes for m, r in runs.items()}


def _mechanism(run: AuditedRun, market: str, n_train: int, *, epochs: int | None, lr: float | None,
               private: bool | None) -> CtrMechanism:
    cfg = run.config
    mc = cfg.model
    use_dp = run.private if private is None else private
    ep = epochs if epochs is not None else cfg.rounds * mc.ctr_epochs
    if not isinstance(ep, int) or ep < 1:
        raise ConfigError("epochs", f"must be a positive int, got {ep!r}")
    if not use_dp:
        return CtrMechanism(sample_rate_for(n_train, mc.batch_size, mc.max_steps_per_epoch), ep, lr or mc.ctr_lr, mc.batch_size, None, None)
    if not run.private:
        raise ConfigError("private", "the run was not trained with DP: no noise multiplier to audit")
    if cfg.privacy_unit() != "record":
        raise ConfigError("privacy.unit", "the audit's pool records are single rows",
                          allowed="record (user-level runs are not supported by this audit target)")
    p = run.results["privacy"].get(market)
    if p is None:
        raise ConfigError("markets", f"results.json has no privacy entry for market {market!r}")
    q = float(p["sample_rate"])
    expected_q = sample_rate_for(n_train, mc.batch_size, mc.max_steps_per_epoch)
    if not math.isclose(q, expected_q, rel_tol=1e-9):
        raise DataError(f"market {market!r}: results.json sample rate {q} does not match the data "
                        f"({expected_q}): the run directory and the data source disagree")
    return CtrMechanism(q, ep, lr or mc.ctr_lr, mc.batch_size, float(p["noise_multiplier"]),
                        float(p["max_grad_norm"]))


class _CtrScore:
    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: np.ndarray) -> None:
        model.eval()
        with torch.no_grad():
            z = model(x).double().numpy()
        self._phi = phi_from_binary_logits(z, y)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        return self._phi[np.asarray(indices, dtype=np.int64)]


class _CtrTrainFn:
    """Trains the market's CTR model on ``fixed`` rows plus the ``extra`` rows selected by the mask.

    Rows are laid out as ``[fixed ..., extra ...]``; the sampler runs over all of them and the
    mask enters only as a 0/1 loss weight of the extra rows (see the module docstring).
    """

    def __init__(self, *, x_fixed: torch.Tensor, y_fixed: torch.Tensor, x_extra: torch.Tensor,
                 y_extra: torch.Tensor, fields: list[tuple[str, int]], cfg: RunConfig,
                 mechanism: CtrMechanism) -> None:
        self._x = torch.cat([x_fixed, x_extra])
        self._y = torch.cat([y_fixed, y_extra]).float()
        self._n_fixed = len(x_fixed)
        self._x_extra, self._y_extra = x_extra, y_extra.numpy().astype(np.float64)
        self._fields, self._cfg, self._mech = fields, cfg, mechanism

    def __call__(self, member_mask: np.ndarray, seed: int) -> ScoreFn:
        mask = np.asarray(member_mask, dtype=bool)
        if mask.shape != (len(self._x_extra),):
            raise ConfigError("member_mask", f"shape {mask.shape}, pool has {len(self._x_extra)} records")
        weight = torch.cat([torch.ones(self._n_fixed), torch.from_numpy(mask.astype(np.float32))])
        x, y, n = self._x, self._y, len(self._x)
        gen = torch.Generator().manual_seed(int(seed) % 2**63)
        mc, mech = self._cfg.model, self._mech
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            model = create_ctr_model(mc.ctr_model, fields=self._fields, dim=mc.ctr_dim, hidden=tuple(mc.ctr_hidden))

        def loss(mdl, idx):
            return weight[idx] * F.binary_cross_entropy_with_logits(mdl(x[idx]), y[idx], reduction="none")

        if mech.noise_multiplier is None:
            PlainTrainer(model=model, loss_fn=loss, n_records=n,
                         settings=TrainSettings(mech.epochs, mech.batch_size, mech.lr, mc.max_steps_per_epoch),
                         generator=gen).train_epochs(mech.epochs)
        else:
            # Audited as deployed: noise and sampling unknown to the attacker (the seed only fixes
            # the membership draw and the initial model).
            noise_gen = SecureRandom()
            sampler = PoissonRecordSampler(num_records=n, sample_rate=mech.sample_rate, generator=noise_gen)
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=mech.lr)
            steps: list[int] = []
            trainer = DPTrainer(model, optimizer, loss_fn=loss, noise_multiplier=mech.noise_multiplier,
                                max_grad_norm=mech.max_grad_norm, sampler=sampler,
                                on_event=lambda e: steps.append(e.steps), generator=noise_gen)
            try:
                dp_train_epoch(trainer, lambda idx: idx, steps=mech.steps)
            finally:
                trainer.close()
            # The accountant epsilon is computed for mech.steps: refuse a run that took more.
            if sum(steps) != mech.steps:
                raise DataError(f"DP trainer reported {sum(steps)} steps, the audit accounts {mech.steps}")
        return _CtrScore(model, self._x_extra, self._y_extra)


def _ctr_inputs(users: np.ndarray, items: np.ndarray, codes: tuple[np.ndarray, np.ndarray] | None) -> torch.Tensor:
    cols = [users, items]
    if codes is not None:
        cols += [codes[0][items], codes[1][items]]
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))


def _rng(seed: int, market: str, purpose: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(market.encode()),
                                                         zlib.crc32(purpose.encode())]))


def fedmm_ctr_targets(run: AuditedRun, *, markets: list[str] | None, pool_size: int, canary_pool_size: int,
                      delta: float, seed: int, epochs: int | None = None, lr: float | None = None,
                      private: bool | None = None, with_codes: bool = True,
                      data: list[MarketData] | None = None,
                      codes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                      ) -> dict[str, MarketAuditTarget]:
    """One audit target per market: the market's CTR-stage training (module docstring).

    ``epochs``/``lr`` override the run's CTR training length (default ``rounds * ctr_epochs``)
    and learning rate; ``private=False`` audits the same training without DP (a control).
    ``data``/``codes`` skip reloading the markets and re-running stages 1-2 (tests, scripts
    auditing one run several times). Each target's ``accountant_epsilon`` is
    :func:`ctr_stage_epsilon` of its mechanism at ``delta``.
    """
    if data is None:
        data = load_data(run.config)
    by_name = {m.name: m for m in data}
    chosen = list(markets) if markets else list(by_name)
    unknown = [m for m in chosen if m not in by_name]
    if unknown:
        raise ConfigError("markets", f"unknown market(s) {unknown}", allowed=", ".join(sorted(by_name)))
    if with_codes and codes is None:
        codes = fedmm_codes(run.config, data)
    targets: dict[str, MarketAuditTarget] = {}
    for name in chosen:
        m = by_name[name]
        tr = m.train
        n_train = len(tr)
        if not 4 <= pool_size < n_train:
            raise ConfigError("pool_size", f"market {name!r} has {n_train} training rows",
                              allowed=f"4 <= pool_size < {n_train}")
        mech = _mechanism(run, name, n_train, epochs=epochs, lr=lr, private=private)
        mc = codes[name] if with_codes else None
        fields = [("user", m.n_users), ("item", m.n_items)]
        if with_codes:
            fields += [("code1", run.config.model.n_global), ("code2", run.config.model.n_local)]
        x_all = _ctr_inputs(tr.users, tr.items, mc)
        y_all = torch.from_numpy(np.asarray(tr.click, dtype=np.float32))
        pool = np.sort(_rng(seed, name, "pool").choice(n_train, size=pool_size, replace=False))
        rest = np.setdiff1d(np.arange(n_train), pool)
        train_fn = _CtrTrainFn(x_fixed=x_all[rest], y_fixed=y_all[rest], x_extra=x_all[pool], y_extra=y_all[pool],
                               fields=fields, cfg=run.config, mechanism=mech)
        canary_fn = None
        if canary_pool_size:
            cu, ci, cy = _canaries(m, canary_pool_size, _rng(seed, name, "canaries"))
            canary_fn = _CtrTrainFn(x_fixed=x_all, y_fixed=y_all, x_extra=_ctr_inputs(cu, ci, mc),
                                    y_extra=torch.from_numpy(cy), fields=fields, cfg=run.config,
                                    mechanism=mech)
        acc = ctr_stage_epsilon(mech, delta=delta)
        desc = (f"FedMM CTR stage of market {name} ({'codes fixed from stages 1-2' if with_codes else 'ids only'}); "
                + (f"DP-SGD q={mech.sample_rate:.4g}, sigma={mech.noise_multiplier:.4g}, "
                   f"C={mech.max_grad_norm:g}, steps={mech.steps}" if mech.noise_multiplier is not None
                   else f"non-private, q={mech.sample_rate:.4g}, steps={mech.steps}")
                + f", lr={mech.lr:g}; pool {pool_size} of {n_train} training rows")
        targets[name] = MarketAuditTarget(
            name=name, pool_size=pool_size, train_fn=train_fn, accountant_epsilon=acc,
            canary_pool_size=canary_pool_size or None, canary_train_fn=canary_fn, description=desc)
    return targets


def _canaries(m: MarketData, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` distinct (user, item) pairs that are not training rows, with coin-flip labels."""
    seen = set(zip(m.train.users.tolist(), m.train.items.tolist()))
    if m.n_users * m.n_items - len(seen) < 2 * k:
        raise ConfigError("canary_pool_size", f"market {m.name!r} has too few unseen (user, item) pairs for {k}")
    pairs: list[tuple[int, int]] = []
    taken: set[tuple[int, int]] = set()
    while len(pairs) < k:
        u = rng.integers(0, m.n_users, 2 * k)
        i = rng.integers(0, m.n_items, 2 * k)
        for p in zip(u.tolist(), i.tolist()):
            if p not in seen and p not in taken:
                taken.add(p)
                pairs.append(p)
                if len(pairs) == k:
                    break
    arr = np.asarray(pairs, dtype=np.int64)
    return arr[:, 0], arr[:, 1], rng.integers(0, 2, k).astype(np.float32)
