"""DP-SGD wiring: a thin stateful trainer that cannot step without reporting a privacy event.

Every optimisation step on raw interactions goes through :meth:`DPTrainer.step`, which

1. takes a :class:`~fedmm_secure.privacy.sampling.PoissonDraw` from the trainer's own sampler
   (so the sample rate reported is the one actually used),
2. computes ``sum_u clip_C(grad_u)`` over the units (records or users) of the draw, adds
   Gaussian noise of std ``noise_multiplier * C`` to every trainable parameter (dense, the whole
   embedding table included) and divides by the expected batch size ``q * N`` as Opacus does,
   With ``sparse`` (DP-AdaFEST, :mod:`.sparse_noise`) the embedding tables instead get noise
   only on rows selected by a noisy count of the units that looked them up; the other rows
   get no update, and the event carries sigma as the effective multiplier of the split.
3. reports ``SubsampledGaussianEvent(q, sigma, steps=1, unit)`` through ``on_event`` and only
   then lets the wrapped optimizer apply the update. If ``on_event`` raises (for example the
   budget policy refuses), the update is discarded. Alternatively :meth:`DPTrainer.prepay`
   reports one event for ``k`` steps up front (one ledger write per epoch); the next ``k``
   steps consume it. Prepaid steps left unused stay counted: accounting errs only upward.

The wrapped optimizer is sealed: a step pre-hook refuses any ``optimizer.step()`` that does not
come from the trainer after an event was reported, so a training loop cannot bypass the
accountant by stepping the optimizer it still holds a reference to.

Modes: ``"fast"`` (ours, :mod:`fast_clipping`: one forward, one backward, no per-sample
gradient tensors), ``"opacus_hooks"`` (Opacus ``GradSampleModule`` + ``DPOptimizer``, record
level only) and ``"opacus_ghost"`` (Opacus ghost clipping, record level only). The Opacus modes
exist as references for tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, FedMMError
from .events import SubsampledGaussianEvent
from .fast_clipping import AddBias, GhostClipper, check_supported
from .noise import PREFETCH_MIN_PARAMS, NoisePrefetcher
from .sampling import PoissonDraw, PoissonRecordSampler, PoissonUserSampler
from .sparse_noise import SparseEmbeddingNoise, SparseNoiseConfig
from .randomness import RandomSource, SecureRandom, normal_

__all__ = ["AccountingBypassError", "DPTrainer", "LossFn", "MODES", "dp_train_epoch"]

MODES = ("fast", "opacus_hooks", "opacus_ghost")

# loss_fn(model, batch) -> per-record losses, shape (B,), in the order of draw.indices.
LossFn = Callable[[nn.Module, Any], torch.Tensor]


class AccountingBypassError(FedMMError, RuntimeError):
    """An optimizer step on a DP-trained model was attempted without a privacy event."""


def _register_opacus_samplers() -> None:
    """Teach Opacus about :class:`AddBias` (grad sampler and ghost norm sampler)."""
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler
    from opacus.grad_sample.grad_sample_module import GradSampleModule

    if AddBias in GradSampleModule.GRAD_SAMPLERS:
        return

    def per_sample(layer: AddBias, activations: list, backprops: torch.Tensor) -> dict:
        b = backprops.shape[0]
        width = layer.bias.numel()
        return {layer.bias: backprops.reshape(b, -1, width).sum(1).view(b, *layer.bias.shape)}

    def norms(layer: AddBias, activations: list, backprops: torch.Tensor) -> dict:
        b = backprops.shape[0]
        return {layer.bias: backprops.reshape(b, -1, layer.bias.numel()).sum(1).norm(2, dim=1)}

    register_grad_sampler(AddBias)(per_sample)
    register_norm_sampler(AddBias)(norms)


class DPTrainer:
    """Stateful DP-SGD stepper for one market's model.

    ``loss_fn(model, batch)`` must return one loss per record of ``batch`` (shape ``(B,)``,
    e.g. ``F.binary_cross_entropy_with_logits(..., reduction="none")``); the trainer does the
    reduction. ``sampler`` is a :class:`PoissonRecordSampler` (record-level DP) or a
    :class:`PoissonUserSampler` (user-level DP); it fixes ``sample_rate`` and ``unit`` of the
    reported events. ``generator`` drives the noise: a
    :class:`~fedmm_secure.privacy.randomness.SecureRandom` (unpredictable; what runs use) or,
    for the named reproducible mode and the Opacus reference modes, a seeded ``torch.Generator``
    (the same noise stream Opacus draws).

    ``noise_prefetch`` draws the next step's noise on a second thread while a step computes
    (:mod:`~fedmm_secure.privacy.noise`); off by default (on a loaded machine the second
    thread only competes for the same core: measured 0.8x at batch 256, 1.02x at 4096, see
    bench/RESULTS_throughput.md); ``None`` turns it on for models with at least
    :data:`~fedmm_secure.privacy.noise.PREFETCH_MIN_PARAMS` trainable values when the noise
    source is not the sampler's (one stream is never read from two threads).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, loss_fn: LossFn,
                 noise_multiplier: float, max_grad_norm: float,
                 sampler: PoissonRecordSampler | PoissonUserSampler,
                 on_event: Callable[[SubsampledGaussianEvent], None],
                 generator: RandomSource, mode: str = "fast", noise_prefetch: bool | None = False,
                 sparse: SparseNoiseConfig | None = None) -> None:
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier)
                and noise_multiplier > 0):
            raise ConfigError("noise_multiplier",
                              f"must be finite and > 0, got {noise_multiplier!r}")
        if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm)
                and max_grad_norm > 0):
            raise ConfigError("max_grad_norm", f"must be finite and > 0, got {max_grad_norm!r}")
        if not callable(on_event):
            raise ConfigError("on_event", "a callable that records privacy events is required")
        if not callable(loss_fn):
            raise ConfigError("loss_fn", "must be callable(model, batch) -> (B,) losses")
        if not isinstance(sampler, (PoissonRecordSampler, PoissonUserSampler)):
            raise ConfigError("sampler", "must be a Poisson sampler from privacy.sampling",
                              allowed="PoissonRecordSampler, PoissonUserSampler")
        if mode not in MODES:
            raise ConfigError("mode", f"unknown mode {mode!r}", allowed=", ".join(MODES))
        if mode != "fast" and not isinstance(generator, torch.Generator):
            raise ConfigError("generator", f"{mode} draws from a torch.Generator (Opacus's secure RNG needs "
                              "torchcsprng, which has no release for this torch)",
                              allowed="mode='fast' for SecureRandom")
        if mode != "fast" and sampler.unit != "record":
            raise ConfigError("mode", f"{mode} supports record-level DP only", allowed="fast")
        if not isinstance(generator, (SecureRandom, torch.Generator)):
            raise ConfigError("generator", "a SecureRandom or torch.Generator must be passed in (no global RNG)")
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt_params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if {id(p) for p in trainable} != {id(p) for p in opt_params} \
                or len(opt_params) != len(trainable):
            raise ConfigError("optimizer", "must hold exactly the model's trainable parameters "
                              "(clipping norms cover every trainable parameter)")
        check_supported(model)

        self.model = model
        self.loss_fn = loss_fn
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.sampler = sampler
        self.mode = mode
        self.generator = generator
        self.steps_taken = 0
        self._prepaid = 0
        self._on_event = on_event
        self._optimizer = optimizer
        self._params = opt_params  # Opacus's order: param groups, then params
        self._authorized = False
        self._guard = optimizer.register_step_pre_hook(self._refuse_unaccounted_step)
        self._clipper: GhostClipper | None = None
        self._gsm: Any = None
        self._dp_opt: Any = None
        self._lazy_noise = False
        # One gradient buffer per parameter, reused every step: the noise overwrites it whole
        # before the clipped sum is added, and a fresh table-sized allocation per step costs
        # page faults comparable to the noise itself.
        self._buffers: dict[int, torch.Tensor] = {}
        shared_source = generator is sampler.generator
        self._sparse: SparseEmbeddingNoise | None = None
        if sparse is not None:
            if mode != "fast" or noise_prefetch:
                raise ConfigError("sparse", "sparse embedding noise needs mode='fast' without noise_prefetch")
            noise_prefetch = False
            self._sparse = SparseEmbeddingNoise(model, sparse, noise_multiplier=self.noise_multiplier,
                                                max_grad_norm=self.max_grad_norm,
                                                scale=1.0 / sampler.expected_batch_size)
        if noise_prefetch and (mode != "fast" or shared_source):
            raise ConfigError("noise_prefetch", "needs mode='fast' and a noise source of its own "
                              "(not the sampler's generator)")
        if noise_prefetch is None:
            noise_prefetch = (mode == "fast" and not shared_source
                              and sum(p.numel() for p in opt_params) >= PREFETCH_MIN_PARAMS)
        self._prefetch: NoisePrefetcher | None = None
        if noise_prefetch:
            self._prefetch = NoisePrefetcher(opt_params, generator, self._noise_std())
        if mode == "fast":
            self._clipper = GhostClipper(model)
            self._lazy_noise = [id(p) for p in self._clipper.param_order()] == \
                [id(p) for p in self._params]
        else:
            self._setup_opacus(mode)

    # -- sealing -------------------------------------------------------------------------

    def _refuse_unaccounted_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._authorized:
            raise AccountingBypassError(
                "this optimizer belongs to a DPTrainer; step it only through DPTrainer.step, "
                "which reports the privacy event first")

    @property
    def prepaid_steps(self) -> int:
        """Steps already reported through ``on_event`` but not yet taken."""
        return self._prepaid

    def prepay(self, steps: int) -> SubsampledGaussianEvent:
        """Report one event covering the next ``steps`` steps, before any of them runs."""
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ConfigError("steps", f"must be a positive int, got {steps!r}")
        event = self._event(steps)
        self._on_event(event)  # raises -> nothing prepaid
        self._prepaid += steps
        return event

    def _event(self, steps: int) -> SubsampledGaussianEvent:
        split = None if self._sparse is None else self._sparse.split
        return SubsampledGaussianEvent(self.sample_rate, self.noise_multiplier, steps, self.unit, split=split)

    @property
    def sample_rate(self) -> float:
        """Poisson sample rate of every step (what the reported events carry)."""
        return self.sampler.sample_rate

    @property
    def unit(self) -> str:
        """Privacy unit: ``"record"`` or ``"user"``."""
        return self.sampler.unit

    def close(self) -> None:
        """Remove hooks; the optimizer stays sealed (it was used on raw data)."""
        if self._prefetch is not None:
            self._prefetch.close()
        if self._clipper is not None:
            self._clipper.remove()
        if self._gsm is not None:
            self._gsm._close()

    # -- Opacus reference modes ------------------------------------------------------------

    def _setup_opacus(self, mode: str) -> None:
        _register_opacus_samplers()
        common = dict(noise_multiplier=self.noise_multiplier, max_grad_norm=self.max_grad_norm,
                      expected_batch_size=self.sampler.expected_batch_size,
                      loss_reduction="mean", generator=self.generator, secure_mode=False)
        if mode == "opacus_hooks":
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer
            self._gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="mean")
            self._dp_opt = DPOptimizer(self._optimizer, **common)
        else:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            self._gsm = GradSampleModuleFastGradientClipping(
                self.model, batch_first=True, loss_reduction="mean",
                max_grad_norm=self.max_grad_norm, use_ghost_clipping=True)
            self._dp_opt = DPOptimizerFastGradientClipping(self._optimizer, **common)

    def _opacus_grads(self, batch: Any, n: int) -> torch.Tensor:
        loss = self._losses(batch, n)
        if self.mode == "opacus_hooks":
            loss.mean().backward()
        else:
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
            DPTensorFastGradientClipping(self._gsm, self._dp_opt, loss, "mean").backward()
        return loss

    # -- the step ---------------------------------------------------------------------------

    def _losses(self, batch: Any, n: int) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 1 or loss.shape[0] != n:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError("loss_fn", f"must return one loss per record of the draw, shape "
                              f"({n},), got {shape}")
        return loss

    def _noise_into_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        # Opacus: grad = (clipped sum + N(0, (sigma C)^2)) / (q N). The division is folded into
        # the noise std and the clip factors (same noise stream, one pass less per table).
        if self._prefetch is not None:
            return dict(zip(self._params, self._prefetch.take()))
        return {p: self._fill(p) for p in self._params}

    def _fill(self, p: nn.Parameter) -> torch.Tensor:
        """``p``'s buffer holding its dense noise, or zeros for a table under sparse noise
        (its selected rows are noised after the clipped sum)."""
        if self._sparse is not None and self._sparse.is_table(p):
            return self._sparse.zeroed(p, self._buffer(p))
        return normal_(self.generator, self._buffer(p), self._noise_std())

    def _noise_std(self) -> float:
        if self._sparse is not None:
            return self._sparse.gradient_std
        return self.noise_multiplier * self.max_grad_norm / self.sampler.expected_batch_size

    def _buffer(self, p: nn.Parameter) -> torch.Tensor:
        buf = self._buffers.get(id(p))
        if buf is None:
            buf = self._buffers[id(p)] = torch.empty_like(p, memory_format=torch.contiguous_format)
        return buf

    def _fast_grads(self, batch: Any, draw: PoissonDraw) -> torch.Tensor:
        clipper = self._clipper
        assert clipper is not None  # fast mode always builds one
        with clipper.capture():
            loss = self._losses(batch, len(draw))
        if self._lazy_noise and self._prefetch is None:
            # The clipper visits parameters in the optimizer's order: draw each one's noise
            # only when its layer is reached, after the backward pass has freed activations.
            into = self._fill
        else:
            pending: dict[nn.Parameter, torch.Tensor] = {}

            def into(p: nn.Parameter) -> torch.Tensor:
                if not pending:  # noise stream in the optimizer's order, as Opacus draws it
                    pending.update(self._noise_into_grads())
                return pending[p]
        noisy = clipper.clipped_sum(loss, draw.group_ids, draw.num_units,
                                    max_grad_norm=self.max_grad_norm, into=into,
                                    scale=1.0 / self.sampler.expected_batch_size)
        if self._sparse is not None:
            self._sparse.apply_(noisy, clipper.last_lookups, draw.num_units, self.generator)
        for p in self._params:
            p.grad = noisy[p]
        return loss

    def _noise_only_grads(self) -> None:
        grads = self._noise_into_grads()
        if self._sparse is not None:  # no lookups: selection from count noise alone
            self._sparse.apply_(grads, {}, 0, self.generator)
        for p, buf in grads.items():
            p.grad = buf

    def step(self, batch: Any, *, draw: PoissonDraw) -> float:
        """One DP-SGD step on ``batch`` (built from ``draw.indices``, in that order).

        Returns the mean per-record loss of the batch (NaN for an empty draw, which is still a
        step: noise only, and still reported).
        """
        if not isinstance(draw, PoissonDraw) or draw.sampler_id != id(self.sampler):
            raise ConfigError("draw", "must come from this trainer's sampler (trainer.sample())")
        self._optimizer.zero_grad(set_to_none=True)
        n = len(draw)
        try:
            if n == 0:
                if self._clipper is not None:
                    self._clipper.discard()
                self._noise_only_grads()
                loss_value = float("nan")
            elif self.mode == "fast":
                loss_value = float(self._fast_grads(batch, draw).detach().mean())
            else:
                loss_value = float(self._opacus_grads(batch, n).detach().mean())
            if self._prepaid > 0:
                self._prepaid -= 1
            else:
                # Recorded before the update exists anywhere but in .grad: a refusal or crash
                # here leaves the model as it was.
                self._on_event(self._event(1))
        except BaseException:
            self._discard()
            raise
        self._authorized = True
        try:
            if n > 0 and self._dp_opt is not None:
                self._dp_opt.step()
            else:
                self._optimizer.step()
        finally:
            self._authorized = False
            self._discard()
        self.steps_taken += 1
        return loss_value

    def _discard(self) -> None:
        if self._dp_opt is not None:
            self._dp_opt.zero_grad(set_to_none=True)
        self._optimizer.zero_grad(set_to_none=True)
        if self._clipper is not None:
            self._clipper.discard()

    def sample(self) -> PoissonDraw:
        """Draw the next step's batch (indices of records) from the trainer's own sampler."""
        return self.sampler.sample()


def dp_train_epoch(trainer: DPTrainer, make_batch: Callable[[torch.Tensor], Any], *,
                   steps: int | None = None, prepay: bool = True) -> list[float]:
    """Run ``steps`` DP-SGD steps (default ``ceil(1/q)``, one expected pass over the data).

    ``make_batch(record_indices)`` builds the model input for the sampled records, in order.
    Returns the per-step mean losses (NaN for empty draws). With ``prepay`` one event for all
    the steps is reported before the first; otherwise one event per step.
    """
    n_steps = trainer.sampler.steps_per_epoch if steps is None else steps
    if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 0:
        raise ConfigError("steps", f"must be a non-negative int, got {steps!r}")
    if prepay and n_steps > trainer.prepaid_steps:
        trainer.prepay(n_steps - trainer.prepaid_steps)
    losses: list[float] = []
    for _ in range(n_steps):
        draw = trainer.sample()
        batch = make_batch(draw.indices) if len(draw) else None
        losses.append(trainer.step(batch, draw=draw))
    return losses

