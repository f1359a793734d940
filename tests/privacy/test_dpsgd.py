"""DPTrainer: accounting cannot be bypassed, and its noised updates equal Opacus's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.dpsgd import AccountingBypassError, DPTrainer, dp_train_epoch
from fedmm_secure.privacy.events import SubsampledGaussianEvent
from fedmm_secure.privacy.randomness import SecureRandom
from fedmm_secure.privacy.sampling import PoissonRecordSampler, PoissonUserSampler
from .test_dpsgd_models import TinyCF, TinyCTR, bce_loss, reference_clipped_sum

# Opacus's backward hooks warn when a layer's inputs need no gradient (embedding ids).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")

N = 48


def _data(seed=0, cards=(11, 7, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, c, (N,), generator=g) for c in cards], 1)
    return x, torch.randint(0, 2, (N,), generator=g).float()


def _trainer(model, *, mode="fast", sampler=None, events=None, sigma=0.8, clip=0.5, q=0.25,
             lr=1.0, noise_seed=7):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sampler = sampler or PoissonRecordSampler(num_records=N, sample_rate=q,
                                              generator=torch.Generator().manual_seed(3))
    sink = events if events is not None else []
    return DPTrainer(model, opt, loss_fn=bce_loss, noise_multiplier=sigma, max_grad_norm=clip,
                     sampler=sampler, on_event=sink.append,
                     generator=torch.Generator().manual_seed(noise_seed), mode=mode), opt


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("prepay", [False, True])
def test_every_step_is_reported_and_total_steps_match(prepay):
    x, y = _data()
    events: list[SubsampledGaussianEvent] = []
    trainer, _ = _trainer(TinyCTR(), events=events, q=0.05)  # small q: some draws are empty
    losses = dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=12, prepay=prepay)
    draw = trainer.sample()  # plus steps outside the epoch helper
    trainer.step((x[draw.indices], y[draw.indices]), draw=draw)
    losses += dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=8, prepay=prepay)
    assert len(losses) == 20 and any(l != l for l in losses)  # an empty draw occurred (NaN)
    assert sum(e.steps for e in events) == 21 == trainer.steps_taken
    assert len(events) == (3 if prepay else 21) and trainer.prepaid_steps == 0
    assert {(e.sample_rate, e.noise_multiplier, e.unit) for e in events} == {(0.05, 0.8, "record")}


def test_prepay_is_recorded_before_steps_and_refusal_prepays_nothing():
    x, y = _data()
    log: list[str] = []
    model = TinyCTR()

    def sink(event):
        if event.steps > 5:
            raise RuntimeError("over budget")
        log.append(f"event {event.steps}")

    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=bce_loss,
                        noise_multiplier=1.0, max_grad_norm=1.0,
                        sampler=PoissonRecordSampler(num_records=N, sample_rate=0.3,
                                                     generator=torch.Generator().manual_seed(0)),
                        on_event=sink, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError):
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=6)
    assert trainer.steps_taken == 0 and trainer.prepaid_steps == 0 and log == []
    dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=4)
    assert log == ["event 4"] and trainer.steps_taken == 4


def test_direct_optimizer_step_is_refused_before_and_after_training():
    x, y = _data()
    model = TinyCTR()
    trainer, opt = _trainer(model)
    bce_loss(model, (x, y)).mean().backward()
    before = _flat(model)
    with pytest.raises(AccountingBypassError):
        opt.step()
    draw = trainer.sample()
    trainer.step((x[draw.indices], y[draw.indices]), draw=draw)
    with pytest.raises(AccountingBypassError):
        opt.step()
    assert trainer.steps_taken == 1
    assert not torch.equal(before, _flat(model))


def test_refused_event_leaves_the_model_untouched():
    x, y = _data()
    model = TinyCTR()
    before = _flat(model)

    def refuse(event):
        raise RuntimeError("budget exhausted")

    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=bce_loss,
                        noise_multiplier=1.0, max_grad_norm=1.0,
                        sampler=PoissonRecordSampler(num_records=N, sample_rate=0.5,
                                                     generator=torch.Generator().manual_seed(0)),
                        on_event=refuse, generator=torch.Generator().manual_seed(0))
    draw = trainer.sample()
    with pytest.raises(RuntimeError, match="budget"):
        trainer.step((x[draw.indices], y[draw.indices]), draw=draw)
    assert torch.equal(before, _flat(model)) and trainer.steps_taken == 0
    assert all(p.grad is None for p in model.parameters())


def test_draw_from_a_foreign_sampler_is_refused():
    x, y = _data()
    trainer, _ = _trainer(TinyCTR())
    other = PoissonRecordSampler(num_records=N, sample_rate=0.9,
                                 generator=torch.Generator().manual_seed(0))
    draw = other.sample()
    with pytest.raises(ConfigError, match="draw"):
        trainer.step((x[draw.indices], y[draw.indices]), draw=draw)


def test_required_arguments_and_validation():
    model = TinyCTR()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = PoissonRecordSampler(num_records=N, sample_rate=0.1, generator=torch.Generator())
    with pytest.raises(TypeError):  # no defaults for the privacy-critical knobs
        DPTrainer(model, opt, loss_fn=bce_loss, sampler=s, on_event=print,
                  generator=torch.Generator())
    for bad in ({"noise_multiplier": 0.0}, {"max_grad_norm": float("inf")}, {"on_event": None},
                {"mode": "plain"}):
        kw = dict(loss_fn=bce_loss, noise_multiplier=1.0, max_grad_norm=1.0, sampler=s,
                  on_event=print, generator=torch.Generator()) | bad
        with pytest.raises(ConfigError):
            DPTrainer(model, opt, **kw)
    partial = torch.optim.SGD(list(model.parameters())[:1], lr=0.1)
    with pytest.raises(ConfigError, match="optimizer"):
        DPTrainer(model, partial, loss_fn=bce_loss, noise_multiplier=1.0, max_grad_norm=1.0,
                  sampler=s, on_event=print, generator=torch.Generator())
    users = PoissonUserSampler(user_of_record=torch.arange(N) % 5, sample_rate=0.5,
                               generator=torch.Generator())
    with pytest.raises(ConfigError, match="record-level"):
        DPTrainer(model, opt, loss_fn=bce_loss, noise_multiplier=1.0, max_grad_norm=1.0,
                  sampler=users, on_event=print, generator=torch.Generator(),
                  mode="opacus_hooks")


def test_opacus_reference_modes_refuse_secure_randomness():
    model = TinyCTR()
    with pytest.raises(ConfigError, match="torchcsprng"):
        DPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=bce_loss,
                  noise_multiplier=1.0, max_grad_norm=1.0,
                  sampler=PoissonRecordSampler(num_records=N, sample_rate=0.1,
                                               generator=torch.Generator()),
                  on_event=print, generator=SecureRandom(), mode="opacus_hooks")


def test_secure_randomness_draws_noise_of_the_right_scale_and_never_repeats():
    model = TinyCTR()
    events = []
    source = SecureRandom()
    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=bce_loss,
                        noise_multiplier=2.0, max_grad_norm=0.5,
                        sampler=PoissonRecordSampler(num_records=N, sample_rate=0.1, generator=source),
                        on_event=events.append, generator=source)
    noise = trainer._noise_into_grads()
    flat = torch.cat([v.flatten() for v in noise.values()]).double()
    expected = 2.0 * 0.5 / trainer.sampler.expected_batch_size
    # OS-keyed noise cannot be seeded, so the bounds are statistical: 5 standard errors
    # (false alarm < 1e-6 per run; a wrong scale or a constant offset still fails).
    n = flat.numel()
    assert n >= 100
    assert abs(flat.std().item() / expected - 1) < 5 * (0.5 / n) ** 0.5
    assert abs(flat.mean().item()) < 5 * expected / n ** 0.5
    again = torch.cat([v.flatten() for v in trainer._noise_into_grads().values()])
    assert not torch.equal(again.to(flat.dtype), flat)  # the stream moves on


def test_two_trainers_with_the_same_seeded_model_get_different_noise():
    """The run's seed fixes the model's initial state, never the noise or the sampling."""
    x, y = _data()
    params = []
    for _ in range(2):
        torch.manual_seed(0)
        model = TinyCTR()
        source = SecureRandom()
        trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn=bce_loss,
                            noise_multiplier=1.0, max_grad_norm=1.0,
                            sampler=PoissonRecordSampler(num_records=N, sample_rate=0.25, generator=source),
                            on_event=lambda e: None, generator=source)
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=3)
        params.append(_flat(model))
    assert not torch.equal(params[0], params[1])


@pytest.mark.parametrize("mode", ["opacus_hooks", "opacus_ghost"])
@pytest.mark.parametrize("make", [TinyCTR, TinyCF])
def test_fast_updates_equal_opacus_with_the_same_noise(mode, make):
    """Same draws, same noise generator seed: identical parameters after 3 noisy steps."""
    cards = (11, 7, 5, 11) if make is TinyCTR else (9, 13)
    x, y = _data(cards=cards)
    # Opacus ghost clipping refuses a table looked up twice (tied parameters); untie for it.
    base = make(tied=False) if (make is TinyCTR and mode == "opacus_ghost") else make()
    results = {}
    for m in ("fast", mode):
        model = copy.deepcopy(base)
        trainer, _ = _trainer(model, mode=m)
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=3)
        trainer.close()
        results[m] = _flat(model)
    assert not torch.equal(results["fast"], _flat(base))
    torch.testing.assert_close(results["fast"], results[mode], rtol=1e-5, atol=1e-6)


def test_noise_std_and_scaling_on_an_empty_draw():
    """An empty Poisson draw is a noise-only step: grad = N(0, (sigma C)^2) / (q N)."""
    model = nn.Sequential(nn.Embedding(200, 50), nn.Linear(50, 1))
    sigma, clip, q = 1.5, 2.0, 0.1
    sampler = PoissonRecordSampler(num_records=1000, sample_rate=q,
                                   generator=torch.Generator().manual_seed(0))
    events = []
    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0),
                        loss_fn=lambda m, b: m(b).squeeze(1), noise_multiplier=sigma,
                        max_grad_norm=clip, sampler=sampler, on_event=events.append,
                        generator=torch.Generator().manual_seed(1))
    from fedmm_secure.privacy.sampling import PoissonDraw
    empty = PoissonDraw(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0,
                        q, "record", id(sampler))
    before = model[0].weight.detach().clone()
    trainer.step(None, draw=empty)
    delta = (before - model[0].weight.detach()).flatten()
    expected = sigma * clip / (q * 1000)
    assert abs(float(delta.std()) / expected - 1) < 0.03  # 10,000 samples: ~1% std error
    assert abs(float(delta.mean())) < 4 * expected / 100
    assert len(events) == 1


def test_user_level_step_matches_reference():
    """User-level fast step with sigma tiny equals per-user-summed, clipped reference / (qU)."""
    x, y = _data(cards=(9, 13))
    users = torch.arange(N) % 6
    base = TinyCF()
    model = copy.deepcopy(base)
    sampler = PoissonUserSampler(user_of_record=users, sample_rate=0.5,
                                 generator=torch.Generator().manual_seed(2))
    events = []
    trainer, _ = _trainer(model, sampler=sampler, events=events, sigma=1e-9, clip=0.05)
    draw = trainer.sample()
    assert draw.num_units >= 2 and len(draw) > draw.num_units  # several records per user
    trainer.step((x[draw.indices], y[draw.indices]), draw=draw)
    ref_model = copy.deepcopy(base)
    loss = bce_loss(ref_model, (x[draw.indices], y[draw.indices]))
    ref, norms = reference_clipped_sum(ref_model, loss, draw.group_ids, draw.num_units, 0.05)
    assert (norms > 0.05).all()
    for p_ref, p_new, p_old in zip(ref_model.parameters(), model.parameters(), base.parameters()):
        torch.testing.assert_close(p_old.detach() - p_new.detach(),
                                   ref[p_ref] / (0.5 * 6), rtol=1e-4, atol=1e-7)
    assert events == [SubsampledGaussianEvent(0.5, 1e-9, 1, "user")]


def _largest_op_allocation(step) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max(e.self_cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("mode", ["fast", "opacus_hooks"])
def test_no_batch_by_vocab_by_dim_tensor(mode):
    """No op of a fast step allocates more than a few tables' worth; Opacus hooks mode does
    (its B x V x D per-sample embedding gradients), which shows the probe can see it."""
    vocab, dim, n = 20_000, 8, 512
    model = nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten(), nn.Linear(dim, 1))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, 1), generator=g)
    sampler = PoissonRecordSampler(num_records=n, sample_rate=0.125, generator=g)  # B ~ 64
    trainer = DPTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                        loss_fn=lambda m, b: m(b).squeeze(1).pow(2), noise_multiplier=1.0,
                        max_grad_norm=1.0, sampler=sampler, on_event=lambda e: None,
                        generator=torch.Generator().manual_seed(1), mode=mode)

    def step():
        d = trainer.sample()
        trainer.step(x[d.indices], draw=d)

    step()
    table = vocab * dim * 4
    largest = _largest_op_allocation(step)
    if mode == "fast":
        assert largest <= 2 * table
    else:
        assert largest >= 20 * table


def test_noise_follows_the_optimizer_parameter_order_like_opacus():
    """With param groups in an unusual order the noise stream still matches Opacus's."""
    x, y = _data(cards=(9, 13))
    base = TinyCF()
    out = {}
    for mode in ("fast", "opacus_hooks"):
        model = copy.deepcopy(base)
        params = list(model.parameters())
        opt = torch.optim.SGD([{"params": params[3:]}, {"params": params[:3][::-1]}], lr=1.0)
        trainer = DPTrainer(model, opt, loss_fn=bce_loss, noise_multiplier=0.8,
                            max_grad_norm=0.5,
                            sampler=PoissonRecordSampler(num_records=N, sample_rate=0.25,
                                                         generator=torch.Generator().manual_seed(3)),
                            on_event=lambda e: None, generator=torch.Generator().manual_seed(7),
                            mode=mode)
        assert mode != "fast" or not trainer._lazy_noise
        dp_train_epoch(trainer, lambda idx: (x[idx], y[idx]), steps=2)
        trainer.close()
        out[mode] = _flat(model)
    torch.testing.assert_close(out["fast"], out["opacus_hooks"], rtol=1e-5, atol=1e-6)
