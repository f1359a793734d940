"""DPTrainer with sparse embedding noise (DP-AdaFEST): what a step actually does to the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedmm_secure.errors import ConfigError
from fedmm_secure.models.ctr import DeepFM
from fedmm_secure.privacy import sparse_noise
from fedmm_secure.privacy.dpsgd import DPTrainer
from fedmm_secure.privacy.events import SubsampledGaussianEvent, event_from_dict
from fedmm_secure.privacy.sampling import PoissonRecordSampler, PoissonUserSampler
from fedmm_secure.privacy.sparse_noise import SparseNoiseConfig, selection_groups
from fedmm_secure.privacy.sparse_selection import contribution_counts

N_USERS, N_ITEMS = 400, 3000


def _data(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Items 0-19 are popular (most records), the rest rare.
    popular = torch.randint(0, 20, (n,), generator=g)
    rare = torch.randint(20, N_ITEMS, (n,), generator=g)
    item = torch.where(torch.rand(n, generator=g) < 0.8, popular, rare)
    x = torch.stack([torch.randint(0, N_USERS, (n,), generator=g), item], 1)
    return x, torch.randint(0, 2, (n,), generator=g).float()


def _trainer(x, y, *, sparse=SparseNoiseConfig(0.3, 3.0), sigma=0.8, q=0.05, user=False, seed=1, noise=None):
    model = DeepFM(fields=[("user", N_USERS), ("item", N_ITEMS)], dim=8, hidden=(8,))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    gen = torch.Generator().manual_seed(seed)
    sampler = (PoissonUserSampler(user_of_record=x[:, 0], sample_rate=q, generator=gen) if user
               else PoissonRecordSampler(num_records=len(x), sample_rate=q, generator=gen))
    events: list[SubsampledGaussianEvent] = []
    trainer = DPTrainer(model, opt, noise_multiplier=sigma, max_grad_norm=1.0, sampler=sampler,
                        loss_fn=lambda m, idx: F.binary_cross_entropy_with_logits(m(x[idx]), y[idx], reduction="none"),
                        on_event=events.append, generator=noise or torch.Generator().manual_seed(seed + 100),
                        sparse=sparse)
    return trainer, model, events


def _tables(model: DeepFM) -> list[torch.Tensor]:
    return [model.embeddings["user"].weight, model.linear["user"].weight,
            model.embeddings["item"].weight, model.linear["item"].weight]


def _step(trainer):
    model = trainer.model
    before = [t.detach().clone() for t in _tables(model)]
    draw = trainer.sample()
    trainer.step(draw.indices, draw=draw)
    return draw, [t.detach() - b for t, b in zip(_tables(model), before)]


def test_unselected_rows_do_not_move_and_selected_rows_do():
    x, y = _data()
    trainer, model, events = _trainer(x, y, q=0.2)
    for _ in range(3):  # later steps reuse the gradient buffers, clearing only last step's rows
        draw, deltas = _step(trainer)
        sel = trainer._sparse.last_selected  # groups in field order: user, item
        for delta, s in zip(deltas, [sel[0], sel[0], sel[1], sel[1]]):
            assert bool((delta[~s] == 0).all())
            assert bool((delta[s] != 0).all())
    # Popular items (~32 records each, count ~22 against tau 3 and sigma1 1.46) are selected;
    # looked-up rare items (count 0.7-1.4) rarely are: ~8% expected over ~600 of them, so above
    # 20% has probability < 1e-12 (seeded anyway).
    assert bool(sel[1][:20].all())
    rare_seen = torch.unique(x[draw.indices, 1])
    rare_seen = rare_seen[rare_seen >= 20]
    assert float(sel[1][rare_seen].float().mean()) < 0.2
    e = events[0]
    assert e.split is not None and math.isclose(e.split.effective_noise_multiplier, 0.8, rel_tol=1e-12)


def test_selected_rows_get_sigma2_c2_noise_and_dense_params_too():
    # A noise-only step (empty draw, q tiny): selected rows move by -lr * noise exactly.
    # ~half of 3400 rows x 9 columns selected at threshold ~0: ~15 000 draws, sd of the sample
    # std's ratio 0.006, so a 4% band fails with probability < 1e-10 (seeded anyway).
    x, y = _data(200)
    trainer, model, _ = _trainer(x, y, sparse=SparseNoiseConfig(0.5, 1e-9), q=1e-6)
    draw, deltas = _step(trainer)
    assert len(draw) == 0
    sp = trainer._sparse
    expected = sp.sigma2 * 1.0 / trainer.sampler.expected_batch_size
    selected_values = torch.cat([d[s].flatten() for d, s in zip(deltas, [sp.last_selected[i] for i in (0, 0, 1, 1)])])
    assert selected_values.numel() > 10_000
    assert abs(float(selected_values.std()) / expected - 1) < 0.04
    assert math.isclose(sp.gradient_std, expected, rel_tol=1e-12)
    assert math.isclose(sp.sigma2, 0.8 / math.sqrt(0.5), rel_tol=1e-12)


def _selection_noise_ratio(trainer) -> float:
    """Measured std of the count noise over the known std sigma1 * C1 (noise-only step)."""
    _step(trainer)
    sp = trainer._sparse
    noise = torch.cat(sp.last_noisy_counts)  # counts are zero: the draw is empty
    return float(noise.std()) / (sp.sigma1 * sp.config.contribution_clip)


def _assert_selection_noise_ok(ratio: float) -> None:
    # 3400 count draws: the sample std's ratio has sd 1/sqrt(6800) = 0.012; a 7% band fails
    # with probability < 1e-8 (and the trainer is seeded).
    assert abs(ratio - 1) < 0.07, ratio


def test_selection_noise_has_std_sigma1_c1_on_every_row():
    x, y = _data(200)
    trainer, _, _ = _trainer(x, y, q=1e-6)
    _assert_selection_noise_ok(_selection_noise_ratio(trainer))
    assert [c.numel() for c in trainer._sparse.last_noisy_counts] == [N_USERS, N_ITEMS]


def test_planted_bug_selection_without_noise_is_caught(monkeypatch):
    # The bug the check above exists for: counts thresholded without noise (exact counts leak
    # which rows the batch touched). The same check must fail on it.
    monkeypatch.setattr(sparse_noise, "noisy_counts", lambda counts, *, std, source: counts.clone())
    x, y = _data(200)
    trainer, _, _ = _trainer(x, y, q=1e-6)
    with pytest.raises(AssertionError):
        _assert_selection_noise_ok(_selection_noise_ratio(trainer))


def test_a_user_with_1000_distinct_items_counts_as_norm_c1():
    x = torch.stack([torch.zeros(1000, dtype=torch.int64), torch.arange(1000)], 1)
    y = torch.ones(1000)
    trainer, model, _ = _trainer(x, y, user=True, q=1.0)
    _step(trainer)
    lookups = trainer._clipper.last_lookups
    sp = trainer._sparse
    calls = [(sp._group_of[id(t.weight)], *lookups[id(t)]) for g in sp.groups for t in g]
    counts = torch.cat(contribution_counts(calls, sp.sizes, 1, 1.0))
    assert math.isclose(float(counts.pow(2).sum()), 1.0, rel_tol=1e-5)  # not 1001


def test_events_carry_the_split_through_the_ledger_form():
    x, y = _data(200)
    trainer, _, events = _trainer(x, y)
    trainer.prepay(3)
    e = events[0]
    assert e.steps == 3 and e.noise_multiplier == 0.8
    assert event_from_dict(e.to_dict()) == e
    dense = SubsampledGaussianEvent(0.1, 0.8, 1, "record")
    assert "split" not in dense.to_dict()  # dense events hash as before
    with pytest.raises(ConfigError, match="split"):
        SubsampledGaussianEvent(0.1, 0.5, 1, "record", split=e.split)  # does not compose to 0.5


def test_groups_pair_each_fields_tables_and_refuse_bad_declarations():
    model = DeepFM(fields=[("user", 5), ("item", 7)], dim=4)
    groups = selection_groups(model)
    assert [[t.weight.shape for t in g] for g in groups] == [[(5, 4), (5, 1)], [(7, 4), (7, 1)]]
    model.linear["user"].weight.requires_grad_(False)  # frozen: leaves its group
    assert [[t.weight.shape for t in g] for g in selection_groups(model)] == [[(5, 4)], [(7, 4), (7, 1)]]
    model.selection_groups = lambda: [[model.embeddings["user"], model.linear["item"]]]
    with pytest.raises(ConfigError):
        selection_groups(model)


@pytest.mark.parametrize("kw", [dict(selection_share=0.0, threshold=1.0), dict(selection_share=1.0, threshold=1.0),
                                dict(selection_share=0.2, threshold=0.0),
                                dict(selection_share=0.2, threshold=float("inf")),
                                dict(selection_share=0.2, threshold=1.0, contribution_clip=-1.0)])
def test_sparse_config_refuses_bad_values(kw):
    with pytest.raises(ConfigError):
        SparseNoiseConfig(**kw)


def test_sparse_needs_the_fast_mode():
    x, y = _data(200)
    model = DeepFM(fields=[("user", N_USERS), ("item", N_ITEMS)], dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="sparse"):
        DPTrainer(model, opt, noise_multiplier=1.0, max_grad_norm=1.0, loss_fn=lambda m, i: m(x[i]),
                  sampler=PoissonRecordSampler(num_records=200, sample_rate=0.1, generator=torch.Generator()),
                  on_event=lambda e: None, generator=torch.Generator(), mode="opacus_hooks",
                  sparse=SparseNoiseConfig(0.2, 3.0))


def test_reproducible_mode_repeats_bit_for_bit_and_the_secure_source_works():
    x, y = _data()
    a, ma, _ = _trainer(x, y, q=0.1, seed=4)
    b, mb, _ = _trainer(x, y, q=0.1, seed=4)
    ma.load_state_dict(mb.state_dict())
    for t in (a, b):
        for _ in range(3):
            _step(t)
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))
    from fedmm_secure.privacy.randomness import SecureRandom
    c, mc, _ = _trainer(x, y, q=0.1, noise=SecureRandom())
    _, deltas = _step(c)
    sel = c._sparse.last_selected
    assert all(bool((d[~s] == 0).all()) for d, s in zip(deltas, [sel[0], sel[0], sel[1], sel[1]]))
