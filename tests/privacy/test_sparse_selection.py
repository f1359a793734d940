"""DP-AdaFEST math: the noise split, clipped contribution maps, selected-row noise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.sparse_selection import (contribution_counts, effective_noise_multiplier, noisy_counts,
                                                   sparse_noise_, split_noise_multiplier)


@given(sigma=st.floats(0.05, 50.0), share=st.floats(0.01, 0.99))
def test_split_composes_back_to_the_calibrated_multiplier(sigma, share):
    s1, s2 = split_noise_multiplier(sigma, share)
    assert math.isclose(effective_noise_multiplier(s1, s2), sigma, rel_tol=1e-12)
    assert math.isclose(sigma ** 2 / s1 ** 2, share, rel_tol=1e-12)
    assert s1 > sigma and s2 > sigma  # each part alone is noisier than the whole


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, float("nan")])
def test_split_refuses_a_share_outside_the_open_interval(share):
    with pytest.raises(ConfigError, match="sparse_selection_share"):
        split_noise_multiplier(1.0, share)


def _unit_norms(counts: list[torch.Tensor], lookups, sizes, num_units, clip) -> list[float]:
    """L2 norm of each unit's own map (counts computed for that unit alone)."""
    out = []
    for u in range(num_units):
        mine = [(g, idx[gid == u], torch.zeros(int((gid == u).sum()), dtype=torch.int64)) for g, idx, gid in lookups]
        own = contribution_counts(mine, sizes, 1, clip)
        out.append(float(torch.cat(own).pow(2).sum().sqrt()))
    return out


def test_a_user_with_1000_distinct_items_contributes_norm_c1_not_1000():
    items = torch.arange(1000)
    lookups = [(0, items, torch.zeros(1000, dtype=torch.int64)),                # the heavy user
               (0, torch.tensor([1500, 1500, 3]), torch.ones(3, dtype=torch.int64))]  # a light one
    counts = contribution_counts(lookups, [2000], 2, contribution_clip=1.0)[0]
    heavy = counts[:1000].clone()
    heavy[3] -= 1 / math.sqrt(2)  # the light unit's share of row 3
    assert math.isclose(float(heavy.pow(2).sum()), 1.0, rel_tol=1e-5)
    assert math.isclose(float(counts[500]), 1 / math.sqrt(1000), rel_tol=1e-6)
    # The light unit's repeated lookup of 1500 is one entry of an indicator (2 entries: 1/sqrt 2).
    assert math.isclose(float(counts[1500]), 1 / math.sqrt(2), rel_tol=1e-6)
    assert float(counts.sum()) < 1000 ** 0.5 + 1.5


def test_the_clip_is_joint_over_tables_not_per_table():
    # One unit touches 4 rows in each of 4 groups: 16 entries, so each gets 1/4 (per-table
    # clipping would give 1/2 each and a norm of 2 = C1 sqrt(T)).
    lookups = [(g, torch.arange(4), torch.zeros(4, dtype=torch.int64)) for g in range(4)]
    counts = contribution_counts(lookups, [10, 10, 10, 10], 1, contribution_clip=1.0)
    assert all(torch.allclose(c[:4], torch.full((4,), 0.25)) for c in counts)
    assert math.isclose(float(torch.cat(counts).pow(2).sum()), 1.0, rel_tol=1e-6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), num_units=st.integers(1, 6), clip=st.floats(0.1, 5.0))
def test_every_units_map_is_clipped_and_counts_add_up(data, num_units, clip):
    sizes = data.draw(st.lists(st.integers(1, 30), min_size=1, max_size=3))
    lookups = []
    for g, n in enumerate(sizes):
        k = data.draw(st.integers(0, 40))
        idx = torch.tensor(data.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k)), dtype=torch.int64)
        gid = torch.tensor(data.draw(st.lists(st.integers(0, num_units - 1), min_size=k, max_size=k)),
                           dtype=torch.int64)
        lookups.append((g, idx, gid))
    counts = contribution_counts(lookups, sizes, num_units, clip)
    assert [c.numel() for c in counts] == sizes
    norms = _unit_norms(counts, lookups, sizes, num_units, clip)
    assert all(n <= clip * (1 + 1e-5) for n in norms)
    # The batch's counts are the sum of the units' own maps (nothing else enters).
    total = sum(float(torch.cat(contribution_counts(
        [(g, i[gd == u], torch.zeros(int((gd == u).sum()), dtype=torch.int64)) for g, i, gd in lookups],
        sizes, 1, clip)).sum()) for u in range(num_units))
    assert math.isclose(float(torch.cat(counts).sum()), total, rel_tol=1e-5, abs_tol=1e-5)


def test_count_noise_has_std_sigma1_c1_on_every_row():
    # Seeded (reproducible mode). 200 000 draws: the sample std's relative error has sd
    # 1/sqrt(2n) = 0.0016, so a 1.5% band fails with probability < 1e-20 for any seed.
    counts = torch.zeros(200_000)
    counts[:10] = 50.0
    noisy = noisy_counts(counts, std=2.5, source=torch.Generator().manual_seed(3))
    assert noisy.shape == counts.shape
    assert abs(float(noisy[10:].std()) / 2.5 - 1) < 0.015
    assert bool((noisy[:10] > 30).all())


def _grad_with_touched(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    touched = torch.tensor([1, 4, 4, 7, 9])
    grad = torch.zeros(12, 3)
    grad[touched] = torch.randn(5, 3, generator=g)
    return grad, touched


def test_unselected_rows_are_exactly_zero_and_selected_rows_get_noise():
    grad, touched = _grad_with_touched()
    selected = torch.zeros(12, dtype=torch.bool)
    selected[[4, 5]] = True   # 4 touched, 5 not
    before = grad.clone()
    sparse_noise_(grad, selected, touched, std=0.3, source=torch.Generator().manual_seed(1))
    assert bool((grad[~selected] == 0).all())
    assert not torch.equal(grad[4], before[4]) and bool((grad[5] != 0).all())


def test_nothing_about_unselected_rows_reaches_the_update():
    # Two gradients that differ only on rows that are not selected: identical outputs, bit for bit.
    a, touched = _grad_with_touched(0)
    b = a.clone()
    b[[1, 7, 9]] += 100.0
    selected = torch.zeros(12, dtype=torch.bool)
    selected[[0, 4]] = True
    out_a = sparse_noise_(a, selected, touched, std=0.5, source=torch.Generator().manual_seed(9))
    out_b = sparse_noise_(b, selected, touched, std=0.5, source=torch.Generator().manual_seed(9))
    assert torch.equal(out_a, out_b)


def test_selected_row_noise_has_the_gradient_std():
    # 4000 x 64 = 256 000 draws on selected rows with zero gradient: relative sd of the sample
    # std 0.0014, a 1.5% band fails with probability < 1e-20 (seeded anyway).
    grad = torch.zeros(8000, 64)
    selected = torch.zeros(8000, dtype=torch.bool)
    selected[::2] = True
    sparse_noise_(grad, selected, torch.empty(0, dtype=torch.int64), std=0.7, source=torch.Generator().manual_seed(5))
    assert abs(float(grad[selected].std()) / 0.7 - 1) < 0.015
    assert bool((grad[~selected] == 0).all())
