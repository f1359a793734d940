"""The stateful side of sparsity-preserving DP-SGD (DP-AdaFEST) for one trainer.

:class:`SparseEmbeddingNoise` knows a model's embedding tables and how they are grouped, splits
the trainer's calibrated noise multiplier into a selection part and a gradient part, and after
the clipped sum of a step selects rows and noises only those (the math is in
:mod:`.sparse_selection`). :class:`~fedmm_secure.privacy.dpsgd.DPTrainer` drives it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import PrivacyConfig
from ..errors import ConfigError
from .events import NoiseSplit
from .randomness import RandomSource
from .sparse_selection import contribution_counts, noisy_counts, sparse_noise_, split_noise_multiplier

__all__ = ["SparseNoiseConfig", "SparseEmbeddingNoise", "selection_groups", "sparse_noise_config"]

log = logging.getLogger(__name__)

_TABLES = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class SparseNoiseConfig:
    """``selection_share`` f in (0, 1): the share of the noise precision spent on selecting rows;
    ``threshold``: a row is selected when its noisy count is at least ``threshold * C1`` (with
    the default ``contribution_clip`` C1 = 1: at least ``threshold`` units that each touch one
    row); ``contribution_clip``: the L2 bound C1 of one unit's contribution map."""

    selection_share: float
    threshold: float
    contribution_clip: float = 1.0

    def __post_init__(self) -> None:
        f = self.selection_share
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < 1):
            raise ConfigError("privacy.sparse_selection_share", f"must be in (0, 1), got {f!r}")
        for name, v in (("privacy.sparse_threshold", self.threshold),
                        ("privacy.sparse_contribution_clip", self.contribution_clip)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ConfigError(name, f"must be finite and > 0, got {v!r}")

    def split(self, noise_multiplier: float) -> NoiseSplit:
        """How a calibrated (effective) ``noise_multiplier`` is split under this config: what
        the trainer runs and what its ledger events record."""
        sigma1, sigma2 = split_noise_multiplier(noise_multiplier, self.selection_share)
        return NoiseSplit(sigma1, sigma2, float(self.threshold), float(self.contribution_clip))


def sparse_noise_config(privacy: PrivacyConfig) -> SparseNoiseConfig | None:
    """The run config's ``privacy.embedding_noise`` settings (None for dense noise)."""
    settings = privacy.sparse_settings
    return None if settings is None else SparseNoiseConfig(*settings)


def selection_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The model's trainable tables, grouped: ``model.selection_groups()`` when it defines one
    (tables always looked up with the same indices), else one group per table. Every group's
    tables must have the same number of rows, and every trainable table must be in one group."""
    tables = [m for m in model.modules() if isinstance(m, _TABLES) and m.weight.requires_grad]
    declared = getattr(model, "selection_groups", None)
    # Frozen tables get no gradient and no noise: they drop out of a declared group.
    groups = ([[t for t in g if t.weight.requires_grad] for g in declared()] if callable(declared)
              else [[t] for t in tables])
    seen = [id(t) for g in groups for t in g]
    if sorted(seen) != sorted(id(t) for t in tables) or len(set(seen)) != len(seen):
        raise ConfigError("model", "selection_groups() must list every trainable embedding table exactly once")
    for g in groups:
        if len({t.weight.shape[0] for t in g}) != 1:
            raise ConfigError("model", "tables of one selection group must have the same number of rows")
    return [g for g in groups if g]


class SparseEmbeddingNoise:
    """Row selection and selected-row noise for one DP trainer's model.

    ``noise_multiplier`` is the calibrated (effective) multiplier the trainer's events carry;
    ``max_grad_norm`` C2; ``scale`` the factor the trainer folds into its gradients (1/(q N)).
    """

    def __init__(self, model: nn.Module, config: SparseNoiseConfig, *, noise_multiplier: float,
                 max_grad_norm: float, scale: float) -> None:
        if not isinstance(config, SparseNoiseConfig):
            raise ConfigError("sparse", f"must be a SparseNoiseConfig, got {type(config).__name__}")
        self.config = config
        self.split = config.split(noise_multiplier)
        self.sigma1, self.sigma2 = self.split.selection_noise_multiplier, self.split.gradient_noise_multiplier
        if not math.isclose(self.split.effective_noise_multiplier, noise_multiplier, rel_tol=1e-9):
            raise ConfigError("sparse", "the selection/gradient split does not compose to the noise multiplier")
        self.groups = selection_groups(model)
        self._group_of = {id(t.weight): i for i, g in enumerate(self.groups) for t in g}
        self._module_of = {id(t.weight): t for g in self.groups for t in g}
        self.sizes = [g[0].weight.shape[0] for g in self.groups]
        # Std of the gradient noise on dense parameters and selected rows, in the trainer's scale.
        self.gradient_std = self.sigma2 * max_grad_norm * scale
        self.selection_std = self.sigma1 * config.contribution_clip
        self.last_selected: list[torch.Tensor] = []
        # Rows of each table's gradient buffer left non-zero by the last step (its selected
        # rows: everything else was zeroed), so the next step clears those instead of the table.
        self._dirty: dict[int, torch.Tensor] = {}
        self.last_noisy_counts: list[torch.Tensor] = []

    def is_table(self, p: nn.Parameter) -> bool:
        """Whether ``p`` is a table weight that gets selected-row noise (else dense noise)."""
        return id(p) in self._group_of

    def zeroed(self, p: nn.Parameter, buf: torch.Tensor) -> torch.Tensor:
        """``buf`` (``p``'s reused gradient buffer) all zeros: only the rows the last
        :meth:`apply_` left non-zero are cleared once the buffer is known, else the whole."""
        rows = self._dirty.pop(id(p), None)
        if rows is None:
            return buf.zero_()
        return buf.index_fill_(0, rows, 0.0)

    def apply_(self, grads: dict[nn.Parameter, torch.Tensor], lookups: dict[int, tuple[torch.Tensor, torch.Tensor]],
               num_units: int, source: RandomSource) -> None:
        """Select rows from this step's lookups and noise the table gradients in ``grads`` in
        place. Table gradients must hold the clipped sum alone (zero where nothing was looked
        up); ``lookups``: ``id(table) -> (rows, unit ids)`` of the step (empty for an empty draw)."""
        calls = [(self._group_of[id(t.weight)], *lookups[id(t)]) for g in self.groups for t in g if id(t) in lookups]
        counts = contribution_counts(calls, self.sizes, num_units, self.config.contribution_clip)
        tau = self.config.threshold * self.config.contribution_clip
        # Every row of every group gets count noise, in group order: which rows are candidates
        # must not depend on the data.
        self.last_noisy_counts = [noisy_counts(c, std=self.selection_std, source=source) for c in counts]
        self.last_selected = [n >= tau for n in self.last_noisy_counts]
        for p, grad in grads.items():
            g = self._group_of.get(id(p))
            if g is None:
                continue
            table = self._module_of[id(p)]
            touched = lookups[id(table)][0] if id(table) in lookups else torch.empty(0, dtype=torch.int64)
            sparse_noise_(grad, self.last_selected[g], touched, std=self.gradient_std, source=source)
            self._dirty[id(p)] = self.last_selected[g].nonzero().flatten()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sparse DP step: %s of %s rows selected per group",
                      [int(s.sum()) for s in self.last_selected], self.sizes)
