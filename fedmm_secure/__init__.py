"""fedmm-secure: privacy-hardened federated multi-market recommendation.

The library surface, in one import::

    import fedmm_secure as fm

    cfg = fm.load_config("run.yaml")                        # or fm.RunConfig(...)
    results = fm.run_experiment(cfg, out_dir=Path("runs/x"))  # FedMM and its baselines
    results = fm.run_pf_experiment(cfg, out_dir=...)          # PF-MSMTrec (cfg.model_family)

DP-SGD for your own PyTorch model in one call (:func:`make_private`)::

    trainer, privacy = fm.make_private(model, optimizer, loss_fn=per_record_loss,
                                       data_size=len(x), batch_size=64, epochs=5,
                                       target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0)
    for _ in range(privacy.plan.epochs):
        fm.dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]))

Extension points, each a registry with a contract suite every implementation must pass:
datasets (:func:`register_dataset`, :func:`check_dataset`), CTR models
(:func:`register_ctr_model`, :func:`check_ctr_model`) and secure-aggregation backends
(:func:`register_backend`, :func:`check_backend`).

Plus the building blocks a private pipeline needs: :class:`DPTrainer` (DP-SGD with per-record
clipping and accounted steps), :func:`make_accountant` and :class:`SubsampledGaussianEvent`
(privacy accounting), :class:`Ledger` (the durable record of spent epsilon). Every error is a
:class:`FedMMError`.

``import fedmm_secure`` loads only the config and the errors; everything else (torch, Opacus,
the secure-aggregation backends) is imported the first time its name is used.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

from .config import ModelConfig, PrivacyConfig, RunConfig, config_from_dict, load_config
from .errors import (AbortError, BudgetExceededError, ConfigError, DataError, FedMMError, IntegrityError,
                     LedgerError, ProtocolError)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from .contracts import ContractViolation, check_backend, check_ctr_model, check_dataset
    from .data.loaders import available_datasets, load_markets, register_dataset
    from .data.market import MarketData, MarketSplit
    from .models.registry import available_ctr_models, create_ctr_model, register_ctr_model
    from .privacy.private import PrivacyPlan, PrivateTraining, make_private
    from .privacy.accountant import PrivacyAccountant, make_accountant
    from .privacy.dpsgd import DPTrainer, dp_train_epoch
    from .privacy.events import SubsampledGaussianEvent
    from .privacy.ledger import Ledger
    from .secagg.base import SecureAggregator
    from .secagg.registry import available_backends, create_backend, register_backend
    from .workflows.fedmm_run import run_experiment
    from .workflows.pf_run import run_pf_experiment

__all__ = [
    "__version__",
    # configuration
    "RunConfig", "ModelConfig", "PrivacyConfig", "load_config", "config_from_dict",
    # errors
    "FedMMError", "ConfigError", "DataError", "ProtocolError", "IntegrityError", "AbortError",
    "BudgetExceededError", "LedgerError",
    # one call per run
    "run_experiment", "run_pf_experiment",
    # privacy
    "make_private", "PrivacyPlan", "PrivateTraining",
    "DPTrainer", "dp_train_epoch", "PrivacyAccountant", "make_accountant", "SubsampledGaussianEvent", "Ledger",
    # data
    "MarketData", "MarketSplit", "register_dataset", "available_datasets", "load_markets",
    # CTR models
    "register_ctr_model", "available_ctr_models", "create_ctr_model",
    # secure aggregation
    "SecureAggregator", "create_backend", "available_backends", "register_backend",
    # contracts
    "ContractViolation", "check_dataset", "check_ctr_model", "check_backend",
]

try:
    __version__ = metadata.version("fedmm-secure")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> module that defines it, imported on first use (they pull in torch or crypto).
_LAZY = {
    "run_experiment": ".workflows.fedmm_run",
    "run_pf_experiment": ".workflows.pf_run",
    "make_private": ".privacy.private",
    "PrivacyPlan": ".privacy.private",
    "PrivateTraining": ".privacy.private",
    "MarketData": ".data.market",
    "MarketSplit": ".data.market",
    "register_dataset": ".data.loaders",
    "available_datasets": ".data.loaders",
    "load_markets": ".data.loaders",
    "register_ctr_model": ".models.registry",
    "available_ctr_models": ".models.registry",
    "create_ctr_model": ".models.registry",
    "SecureAggregator": ".secagg.base",
    "ContractViolation": ".contracts",
    "check_dataset": ".contracts",
    "check_ctr_model": ".contracts",
    "check_backend": ".contracts",
    "DPTrainer": ".privacy.dpsgd",
    "dp_train_epoch": ".privacy.dpsgd",
    "PrivacyAccountant": ".privacy.accountant",
    "make_accountant": ".privacy.accountant",
    "SubsampledGaussianEvent": ".privacy.events",
    "Ledger": ".privacy.ledger",
    "create_backend": ".secagg.registry",
    "available_backends": ".secagg.registry",
    "register_backend": ".secagg.registry",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value   # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
