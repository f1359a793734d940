"""The CTR model contract: what every registered CTR model factory must build.

A check takes ``factory`` (a :class:`~fedmm_secure.models.registry.CTRModelFactory`). The rules:

* **forward shape**: ``model(x)`` for int64 ``x`` of shape ``(B, n_fields)`` returns finite float
  logits of shape ``(B,)``, also for ``B = 1``;
* **DP-SGD support**: every trainable parameter lives in a layer the fast clipping supports
  (:func:`~fedmm_secure.privacy.fast_clipping.check_supported`), and the clipped per-record
  gradient sum it computes from one backward pass equals the one computed record by record with
  autograd: the per-record loss works with the DP trainer; a DP-SGD step runs and updates;
* **seeded init**: the same torch seed builds the same weights, another seed other weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..privacy.dpsgd import DPTrainer
from ..privacy.events import SubsampledGaussianEvent
from ..privacy.fast_clipping import GhostClipper, check_supported
from ..privacy.sampling import PoissonRecordSampler
from .base import ContractViolation, require

__all__ = ["CTR_MODEL_CHECKS", "check_ctr_model"]

Factory = Callable[..., nn.Module]

FIELDS = [("user", 7), ("item", 11), ("code1", 5)]
DIM, HIDDEN = 4, (8,)


def _build(factory: Factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        model = factory(fields=list(FIELDS), dim=DIM, hidden=HIDDEN)
    require(isinstance(model, nn.Module), f"the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _inputs(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for _, c in FIELDS], dim=1)


def _labels(n: int) -> torch.Tensor:
    return (torch.arange(n) % 2).float()


def check_forward_shape(factory: Factory) -> None:
    model = _build(factory)
    for n in (6, 1):
        out = model(_inputs(n))
        require(isinstance(out, torch.Tensor) and out.shape == (n,),
                f"forward must return logits of shape ({n},), got "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        require(out.is_floating_point() and bool(torch.isfinite(out).all()), "logits must be finite floats")


def check_fast_clipping_matches_autograd(factory: Factory) -> None:
    model = _build(factory)
    try:
        check_supported(model)
    except Exception as exc:
        raise ContractViolation(f"the DP trainer's fast clipping does not support this model: {exc}") from exc
    x, y, c = _inputs(8), _labels(8), 0.05   # a small C so that clipping is active
    clipper = GhostClipper(model)
    try:
        with clipper.capture():
            loss = F.binary_cross_entropy_with_logits(model(x), y, reduction="none")
        fast = clipper.clipped_sum(loss, torch.arange(8), 8, max_grad_norm=c)
    finally:
        clipper.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    want = [torch.zeros_like(p) for p in params]
    for i in range(8):
        li = F.binary_cross_entropy_with_logits(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        raw = torch.autograd.grad(li, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(raw, params)]
        norm = torch.sqrt(torch.stack([(g * g).sum() for g in grads]).sum())
        factor = min(1.0, c / (float(norm) + 1e-6))
        for w, g in zip(want, grads):
            w.add_(g, alpha=factor)
    for p, w in zip(params, want):
        require(torch.allclose(fast[p], w, rtol=1e-4, atol=1e-6),
                "the clipped per-record gradient sum of fast clipping differs from autograd's "
                "(a parameter is used in a way per-record clipping does not see)")


def check_dp_step_runs(factory: Factory) -> None:
    model = _build(factory)
    x, y = _inputs(32), _labels(32)
    events: list[SubsampledGaussianEvent] = []
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)   # reproducible for the check only; runs use SecureRandom
    trainer = DPTrainer(model, opt, loss_fn=lambda m, idx: F.binary_cross_entropy_with_logits(
                            m(x[idx]), y[idx], reduction="none"),
                        noise_multiplier=1.0, max_grad_norm=1.0,
                        sampler=PoissonRecordSampler(num_records=32, sample_rate=0.5, generator=gen),
                        on_event=events.append, generator=gen)
    try:
        draw = trainer.sample()
        trainer.step(draw.indices, draw=draw)
    finally:
        trainer.close()
    require(len(events) == 1 and events[0].steps == 1, "one DP step must report one privacy event")
    after = list(model.parameters())
    require(all(bool(torch.isfinite(p).all()) for p in after), "parameters must stay finite after a DP step")
    require(any(not torch.equal(a, b) for a, b in zip(after, before)), "a DP step must update the parameters")


def check_seeded_init(factory: Factory) -> None:
    a, b, c = _build(factory, 0).state_dict(), _build(factory, 0).state_dict(), _build(factory, 1).state_dict()
    require(list(a) == list(b), "the same seed must build the same parameter names")
    require(all(torch.equal(a[k], b[k]) for k in a), "the same torch seed must build the same initial weights")
    require(any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point()),
            "another seed must build other initial weights (initialisation must use torch's RNG)")


CTR_MODEL_CHECKS: dict[str, Callable[[Factory], None]] = {
    "forward_shape": check_forward_shape,
    "fast_clipping_matches_autograd": check_fast_clipping_matches_autograd,
    "dp_step_runs": check_dp_step_runs,
    "seeded_init": check_seeded_init,
}


def check_ctr_model(factory: Factory) -> None:
    """Run every CTR model check on ``factory``; raises :class:`ContractViolation` on the first
    broken rule."""
    for check in CTR_MODEL_CHECKS.values():
        check(factory)
