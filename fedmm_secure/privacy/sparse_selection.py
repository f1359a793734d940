"""Sparsity-preserving DP-SGD for embedding tables: the math of DP-AdaFEST (hazmat).

Ghazi et al., "Sparsity-Preserving Differentially Private Training of Large Embedding Models"
(NeurIPS 2023). Dense DP-SGD adds noise to every row of every table, so a row no record of the
batch touched still moves, and a rare user's or item's row ends up mostly noise. DP-AdaFEST
selects rows first, privately, and noises only those. Per step, on the Poisson sample:

1. every unit's *contribution map* (the indicator of the rows its records look up, over all
   tables; the union over the unit's records) is scaled to L2 norm at most ``C1``
   (:func:`contribution_counts`), the maps are summed per row, and every row's count gets
   ``N(0, (sigma1 C1)^2)`` (:func:`noisy_counts`: V values per table, never V x D; noising only
   rows that appear would make the candidate set depend on the data). Rows whose noisy count is
   at least ``threshold * C1`` are selected.
2. the clipped gradient sum (clip ``C2``) gets ``N(0, (sigma2 C2)^2)`` on every dense parameter
   and on the *selected* rows of each table; the other rows are zeroed
   (:func:`sparse_noise_`), so an unselected row gets no update at all.

Privacy: the two releases read the same sample, and each unit moves the pair (counts / (sigma1 C1),
gradient / (sigma2 C2)) by at most ``sqrt(1/sigma1^2 + 1/sigma2^2)`` in whitened L2 norm, so the
step is one subsampled Gaussian mechanism with multiplier
``sigma_eff = (sigma1^-2 + sigma2^-2)^-1/2`` (:func:`effective_noise_multiplier`). The
accountant calibrates ``sigma_eff`` as for dense noise, and :func:`split_noise_multiplier`
gives the selection a share ``f`` of the precision: ``1/sigma1^2 = f / sigma_eff^2``,
``1/sigma2^2 = (1 - f) / sigma_eff^2``.

The contribution map is clipped jointly over all tables (the norm of the concatenated
indicators), not per table: per-table clipping would give the selection a sensitivity of
``C1 sqrt(T)`` for T tables. Tables that are always looked up with the same indices (a field's
embedding and its first-order weight in DeepFM) can share one map and one selection (a
*group*), which halves the entries a unit spreads its norm over; the grouping is fixed by the
model, never by the data.

Pure functions only; the stateful side (buffers, noise sources, the step) is
:class:`fedmm_secure.privacy.sparse_noise.SparseEmbeddingNoise`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import ConfigError
from .randomness import RandomSource, normal_

__all__ = ["contribution_counts", "effective_noise_multiplier", "noisy_counts", "sparse_noise_",
           "split_noise_multiplier"]


def split_noise_multiplier(sigma_eff: float, selection_share: float) -> tuple[float, float]:
    """``(sigma1, sigma2)`` with ``1/sigma1^2 = f/sigma_eff^2`` and ``1/sigma2^2 = (1-f)/sigma_eff^2``."""
    if not (math.isfinite(sigma_eff) and sigma_eff > 0):
        raise ConfigError("noise_multiplier", f"must be finite and > 0, got {sigma_eff!r}")
    if not (0 < selection_share < 1):
        raise ConfigError("privacy.sparse_selection_share", f"must be in (0, 1), got {selection_share!r}")
    return sigma_eff / math.sqrt(selection_share), sigma_eff / math.sqrt(1.0 - selection_share)


def effective_noise_multiplier(sigma1: float, sigma2: float) -> float:
    """The one Gaussian mechanism two Gaussians on the same sample amount to."""
    return (sigma1 ** -2 + sigma2 ** -2) ** -0.5


def contribution_counts(lookups: Sequence[tuple[int, torch.Tensor, torch.Tensor]], sizes: Sequence[int],
                        num_units: int, contribution_clip: float) -> list[torch.Tensor]:
    """Per group, the sum over units of each unit's clipped contribution map (float32, one
    value per row).

    ``lookups``: ``(group, rows, unit_ids)`` per table call, ``rows[i]`` looked up by unit
    ``unit_ids[i]`` (in ``[0, num_units)``); ``sizes[g]``: rows of group ``g``. A unit touching
    ``k`` distinct (group, row) entries contributes ``min(1, C1 / sqrt(k))`` to each, so its map
    has L2 norm ``min(sqrt(k), C1) <= C1`` however many rows it touches.
    """
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += int(n)
    counts = torch.zeros(total, dtype=torch.float32)
    parts = [gid.to(torch.int64) * total + (idx.to(torch.int64) + offsets[g]) for g, idx, gid in lookups]
    if parts and num_units > 0:
        keys = torch.unique(torch.cat(parts))  # each (unit, entry) once: a map is an indicator
        unit = torch.div(keys, total, rounding_mode="floor")
        per_unit = torch.bincount(unit, minlength=num_units).to(torch.float64)
        weight = (contribution_clip / per_unit.clamp(min=1).sqrt()).clamp(max=1.0).to(torch.float32)
        counts.index_add_(0, keys - unit * total, weight[unit])
    return list(counts.split([int(n) for n in sizes]))


def noisy_counts(counts: torch.Tensor, *, std: float, source: RandomSource) -> torch.Tensor:
    """``counts`` plus independent ``N(0, std^2)`` on every row (a new tensor)."""
    return normal_(source, torch.empty_like(counts), std).add_(counts)


def sparse_noise_(grad: torch.Tensor, selected: torch.Tensor, touched: torch.Tensor, *, std: float,
                  source: RandomSource) -> torch.Tensor:
    """In place: zero the rows of ``grad`` not ``selected`` and add ``N(0, std^2)`` to every
    entry of the selected rows.

    ``touched``: every row where ``grad`` may be non-zero (the rows the batch looked up); rows
    outside it must already be zero, so only touched rows are cleared (no pass over the table).
    """
    touched = touched.to(torch.int64)
    dropped = touched[~selected[touched]]
    if dropped.numel():
        grad.index_fill_(0, dropped, 0.0)
    rows = selected.nonzero().flatten()
    if rows.numel():
        noise = normal_(source, grad.new_empty((rows.numel(), *grad.shape[1:])), std)
        grad.index_add_(0, rows, noise)
    return grad
