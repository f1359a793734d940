"""fedmm-secure: privacy-hardened federated multi-market recommendation.

The library surface, in one import::

    import fedmm_secure as fm

    cfg = fm.load_config("run.yaml")                        # or fm.RunConfig(...)
    results = fm.run_experiment(cfg, out_dir=Path("runs/x"))  # FedMM and its baselines
    results = fm.run_pf_experiment(cfg, out_dir=...)          # PF-MSMTrec (cfg.model_family)

plus the building blocks a private pipeline needs: :class:`DPTrainer` (DP-SGD with per-record
clipping and accounted steps), :func:`make_accountant` and :class:`SubsampledGaussianEvent`
(privacy accounting), :class:`Ledger` (the durable record of spent epsilon) and the secure
aggregation registry (:func:`create_backend`, :func:`available_backends`,
:func:`register_backend`). Every error is a :class:`FedMMError`.

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
    from .privacy.accountant import PrivacyAccountant, make_accountant
    from .privacy.dpsgd import DPTrainer, dp_train_epoch
    from .privacy.events import SubsampledGaussianEvent
    from .privacy.ledger import Ledger
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
    "DPTrainer", "dp_train_epoch", "PrivacyAccountant", "make_accountant", "SubsampledGaussianEvent", "Ledger",
    # secure aggregation
    "create_backend", "available_backends", "register_backend",
]

try:
    __version__ = metadata.version("fedmm-secure")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

# Public name -> module that defines it, imported on first use (they pull in torch or crypto).
_LAZY = {
    "run_experiment": ".workflows.fedmm_run",
    "run_pf_experiment": ".workflows.pf_run",
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
