"""Noise drawn on a second thread is the same noise, step for step, as noise drawn inline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedmm_secure.errors import ConfigError
from fedmm_secure.models.ctr import DeepFM
from fedmm_secure.models.optim import adam
from fedmm_secure.privacy.dpsgd import DPTrainer
from fedmm_secure.privacy.randomness import SecureRandom
from fedmm_secure.privacy.sampling import PoissonRecordSampler

N = 400
X = torch.stack([torch.arange(N) % 50, torch.arange(N) % 30], 1)
Y = (torch.arange(N) % 3 == 0).float()


def _trainer(prefetch: bool, *, shared: bool = False) -> DPTrainer:
    torch.manual_seed(0)
    model = DeepFM(fields=[("user", 50), ("item", 30)], dim=4, hidden=(8,))
    sample_gen = torch.Generator().manual_seed(1)
    noise_gen = sample_gen if shared else torch.Generator().manual_seed(2)
    return DPTrainer(model, adam(model.parameters(), lr=0.01),
                     loss_fn=lambda m, idx: F.binary_cross_entropy_with_logits(m(X[idx]), Y[idx], reduction="none"),
                     noise_multiplier=1.0, max_grad_norm=1.0,
                     sampler=PoissonRecordSampler(num_records=N, sample_rate=0.05, generator=sample_gen),
                     on_event=lambda e: None, generator=noise_gen, noise_prefetch=prefetch)


def test_prefetched_noise_gives_the_same_steps():
    a, b = _trainer(False), _trainer(True)
    assert b._prefetch is not None
    for _ in range(4):
        for t in (a, b):
            d = t.sample()
            t.step(d.indices, draw=d)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    b.close()


def test_prefetch_refuses_a_source_shared_with_the_sampler():
    with pytest.raises(ConfigError, match="noise_prefetch"):
        _trainer(True, shared=True)
    src = SecureRandom()
    torch.manual_seed(0)
    model = DeepFM(fields=[("user", 50), ("item", 30)], dim=4, hidden=(8,))
    t = DPTrainer(model, adam(model.parameters(), lr=0.01), loss_fn=lambda m, idx: m(X[idx]),
                  noise_multiplier=1.0, max_grad_norm=1.0,
                  sampler=PoissonRecordSampler(num_records=N, sample_rate=0.05, generator=src),
                  on_event=lambda e: None, generator=src, noise_prefetch=None)
    assert t._prefetch is None  # auto: never with one stream for both
