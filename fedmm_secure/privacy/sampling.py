"""Poisson subsampling of privacy units (records or users) with a known sample rate.

The accountant's subsampled-Gaussian bound assumes every unit joins each step's batch
independently with probability ``q``; these samplers do exactly that, with the generator passed
in, and stamp every draw with the rate so the trainer can report it. The generator is a
:class:`~fedmm_secure.privacy.randomness.SecureRandom` (unpredictable; the default of every run)
or a seeded ``torch.Generator`` (the named reproducible mode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, DataError
from .randomness import RandomSource, SecureRandom, poisson_indices, uniform

__all__ = ["PoissonDraw", "PoissonRecordSampler", "PoissonUserSampler", "capped_sample_rate"]


@dataclass(frozen=True)
class PoissonDraw:
    """One step's sample.

    ``indices``: record indices (into the market's records) in the batch, in batch order
    (ascending for record sampling, grouped by user for user sampling).
    ``group_ids``: for each of those records, its unit id in ``[0, num_units)`` (records of one
    sampled user share an id; for record-level sampling it is ``arange``).
    """

    indices: torch.Tensor
    group_ids: torch.Tensor
    num_units: int
    sample_rate: float
    unit: str
    sampler_id: int

    def __len__(self) -> int:
        return int(self.indices.numel())


def capped_sample_rate(sample_rate: float, max_steps_per_epoch: int | None) -> float:
    """``sample_rate`` raised to ``1 / max_steps_per_epoch`` where it is lower (never above 1).

    Why: at a fixed batch size the number of DP steps per epoch grows with the data, and every
    DP step noises every parameter, so a large market's epoch costs O(N) noisy dense updates.
    Capping the steps makes a large market's expected batch grow with its size instead: the
    sample rate, the step count and hence the noise multiplier for a target epsilon stay those
    of a market with ``max_steps_per_epoch`` batches, while the noise per averaged gradient
    (sigma C / (q N)) falls as the market grows. ``None`` keeps ``sample_rate``.
    """
    if max_steps_per_epoch is None:
        return sample_rate
    if isinstance(max_steps_per_epoch, bool) or not isinstance(max_steps_per_epoch, int) or max_steps_per_epoch < 1:
        raise ConfigError("max_steps_per_epoch", f"must be a positive integer or null, got {max_steps_per_epoch!r}")
    return min(1.0, max(sample_rate, 1.0 / max_steps_per_epoch))


def _check_rate(sample_rate: float) -> float:
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ConfigError("sample_rate", f"must be in (0, 1], got {sample_rate!r}")
    return float(sample_rate)


def _check_generator(generator: object) -> RandomSource:
    if not isinstance(generator, (SecureRandom, torch.Generator)):
        raise ConfigError("generator", "a SecureRandom or torch.Generator must be passed in (no global RNG)")
    return generator


class PoissonRecordSampler:
    """Each record joins a step's batch independently with probability ``sample_rate``."""

    unit = "record"

    def __init__(self, *, num_records: int, sample_rate: float,
                 generator: RandomSource) -> None:
        if not isinstance(num_records, int) or num_records <= 0:
            raise ConfigError("num_records", f"must be a positive int, got {num_records!r}")
        self.num_records = num_records
        self.sample_rate = _check_rate(sample_rate)
        self.generator = _check_generator(generator)

    @property
    def num_units_total(self) -> int:
        return self.num_records

    @property
    def expected_batch_size(self) -> float:
        """Expected number of units per batch, the denominator Opacus uses for the mean."""
        return self.sample_rate * self.num_records

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(1 / self.sample_rate))

    def sample(self) -> PoissonDraw:
        idx = poisson_indices(self.generator, self.num_records, self.sample_rate)
        return PoissonDraw(idx, torch.arange(idx.numel()), int(idx.numel()),
                           self.sample_rate, self.unit, id(self))


class PoissonUserSampler:
    """Each user joins a step's batch independently with probability ``sample_rate``, with all
    of their records (user-level DP: the unit clipped is the user's summed gradient).

    ``max_records_per_user`` bounds the work (not the privacy: the user's gradient is clipped
    whatever its size) spent on very active users: a chosen user with more records contributes
    a fresh uniformly random subset of that many records to the step.
    """

    unit = "user"

    def __init__(self, *, user_of_record: torch.Tensor, sample_rate: float,
                 generator: RandomSource, max_records_per_user: int | None = None,
                 unit: str = "user") -> None:
        # Any grouping of records works the same way: unit="interaction" with an interaction id
        # per record samples interactions (a positive with its sampled negatives) instead.
        self.unit = unit
        if not isinstance(user_of_record, torch.Tensor) or user_of_record.dim() != 1 \
                or user_of_record.numel() == 0 or user_of_record.is_floating_point():
            raise DataError("user_of_record must be a non-empty 1-D integer tensor")
        if int(user_of_record.min()) < 0:
            raise DataError("user_of_record has negative user ids")
        self.sample_rate = _check_rate(sample_rate)
        self.generator = _check_generator(generator)
        if max_records_per_user is not None and (
                not isinstance(max_records_per_user, int) or max_records_per_user <= 0):
            raise ConfigError("max_records_per_user",
                              f"must be a positive int or None, got {max_records_per_user!r}")
        self.max_records_per_user = max_records_per_user
        users, dense = torch.unique(user_of_record.long(), return_inverse=True)
        self.num_users = int(users.numel())
        # Records grouped by user once, so a draw is a gather, not a scan.
        self._order = torch.argsort(dense, stable=True)
        counts = torch.bincount(dense, minlength=self.num_users)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    @property
    def num_units_total(self) -> int:
        return self.num_users

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_users

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(1 / self.sample_rate))

    def sample(self) -> PoissonDraw:
        chosen = poisson_indices(self.generator, self.num_users, self.sample_rate)
        counts = self._counts[chosen]
        group = torch.arange(chosen.numel()).repeat_interleave(counts)
        offset = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[group]
        idx = self._order[self._starts[chosen][group] + offset]
        k = self.max_records_per_user
        if k is not None and group.numel() and int(counts.max()) > k:
            # Random order within each user (group-major), then keep each user's first k.
            order = torch.argsort(group.double() + uniform(self.generator, group.numel()))
            group, idx = group[order], idx[order]
            pos = torch.arange(group.numel()) - (torch.cumsum(counts, 0) - counts)[group]
            keep = pos < k
            group, idx = group[keep], idx[keep]
        return PoissonDraw(idx, group, int(chosen.numel()), self.sample_rate, self.unit,
                           id(self))
