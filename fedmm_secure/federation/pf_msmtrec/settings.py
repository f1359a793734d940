"""PF-MSMTrec settings and methods: which mechanisms each method (or ablation) switches on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

__all__ = ["STAGE", "PFSettings", "Mechanisms", "METHODS"]

STAGE = "mmoe"


@dataclass(frozen=True)
class PFSettings:
    """Model and training settings shared by every method (``cfg.pf`` in a run config)."""

    dim: int = 8
    n_experts: int = 4
    expert_hidden: tuple[int, ...] = (32,)
    tower_hidden: int = 16
    epochs: int = 1                  # local epochs per federated round
    batch_size: int = 256
    # As model.max_steps_per_epoch of FedMM (privacy.sampling.capped_sample_rate); off by default
    # here: PF-MSMTrec's settings were chosen without it (bench/RESULTS_pf_msmtrec.md).
    max_steps_per_epoch: int | None = None
    lr: float = 0.01
    update_bound: float = 0.5        # per-coordinate clip of uploaded updates (sizes the masking ring)
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    select_by: str = "auc"           # local model selection score: "auc" (mean CTR/CTCVR AUC) or "loss"
    # Where each round's local training starts and what is mixed with the global model:
    # "tracked" (train from global; mix global with the previous personal parameters + own
    # update), "global" (train from global; mix with the trained parameters) or "personal"
    # (train from the mix). See the module docstring and bench/RESULTS_pf_msmtrec.md.
    train_from: str = "tracked"
    alpha_memory: float = 0.7        # decay of the per-alpha validation cost accumulated over rounds (0: off)
    alpha_by: str = "select"         # alpha's validation cost: "select" (same as select_by), "auc" or "loss"
    calibrate: bool = True           # Platt-scale the kept model's CTR and CTCVR logits on validation rows

    def __post_init__(self) -> None:
        if self.train_from not in ("personal", "global", "tracked"):
            raise ConfigError("pf.train_from", f"unknown start {self.train_from!r}", allowed="personal, global, tracked")
        if self.select_by not in ("auc", "loss"):
            raise ConfigError("pf.select_by", f"unknown criterion {self.select_by!r}", allowed="auc, loss")
        if not isinstance(self.calibrate, bool):
            raise ConfigError("pf.calibrate", f"must be true or false, got {self.calibrate!r}")
        if self.alpha_by not in ("select", "auc", "loss"):
            raise ConfigError("pf.alpha_by", f"unknown criterion {self.alpha_by!r}", allowed="select, auc, loss")
        for f in ("dim", "n_experts", "tower_hidden", "epochs", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"pf.{f}", f"must be a positive integer, got {v!r}")
        if self.max_steps_per_epoch is not None and (isinstance(self.max_steps_per_epoch, bool) or not isinstance(
                self.max_steps_per_epoch, int) or self.max_steps_per_epoch < 1):
            raise ConfigError("pf.max_steps_per_epoch", f"must be a positive integer or null, got {self.max_steps_per_epoch!r}")
        if (not isinstance(self.expert_hidden, tuple) or not self.expert_hidden
                or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.expert_hidden)):
            raise ConfigError("pf.expert_hidden", "must be a non-empty list of positive integers")
        if (isinstance(self.alpha_memory, bool) or not isinstance(self.alpha_memory, (int, float))
                or not 0 <= self.alpha_memory < 1):
            raise ConfigError("pf.alpha_memory", f"must be in [0, 1), got {self.alpha_memory!r}")
        for f in ("lr", "update_bound"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not np.isfinite(v):
                raise ConfigError(f"pf.{f}", f"must be a positive number, got {v!r}")
        if (not isinstance(self.alpha_grid, tuple) or not self.alpha_grid
                or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1 for a in self.alpha_grid)):
            raise ConfigError("pf.alpha_grid", "must be a non-empty list of numbers in [0, 1]")


@dataclass(frozen=True)
class Mechanisms:
    """Which PF-MSMTrec mechanism is on (ablations switch one off)."""

    federated: bool
    template: bool = False        # scenario-specific expert parameters (and local gates)
    local_norm: bool = False      # normalization affine parameters stay local
    conflict: bool = False        # client-side projection against the global direction
    personal: bool = False        # personalized aggregation of experts
    tower_personal: bool = False  # personalized aggregation of task towers


_PF = Mechanisms(federated=True, template=True, local_norm=True, conflict=True, personal=True, tower_personal=True)
METHODS: dict[str, Mechanisms] = {
    "local": Mechanisms(federated=False),
    "fedavg": Mechanisms(federated=True),
    "pf_msmtrec": _PF,
    "pf_no_template": Mechanisms(True, False, True, True, True, True),
    "pf_no_fednorm": Mechanisms(True, True, False, True, True, True),
    "pf_no_conflict": Mechanisms(True, True, True, False, True, True),
    "pf_no_personal": Mechanisms(True, True, True, True, False, True),
    "pf_no_tower_personal": Mechanisms(True, True, True, True, True, False),
}
