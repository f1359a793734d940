"""The CTR model registry: which network scores a (user, item, codes, ...) row.

A CTR model is built by a factory ``factory(*, fields, dim, hidden) -> nn.Module``:

* ``fields``: ``[(name, cardinality), ...]``, the categorical input fields in column order;
* ``dim``: embedding width; ``hidden``: widths of the interaction network's hidden layers;

and its ``forward(x)`` maps an int64 tensor ``(B, len(fields))`` to logits of shape ``(B,)``.
Register one with :func:`register_ctr_model` and select it with ``model.ctr_model`` in a run
config. Every registered model must pass the CTR model contract
(:mod:`fedmm_secure.contracts.ctr_models`): forward shape, per-record losses the DP trainer's
fast clipping supports (only ``nn.Linear``, ``nn.Embedding``, ``nn.EmbeddingBag``,
``nn.LayerNorm`` and :class:`~fedmm_secure.privacy.fast_clipping.AddBias` may own trainable
parameters, no BatchNorm), and the same initial weights under the same torch seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .ctr import DeepFM

__all__ = ["CTRModelFactory", "register_ctr_model", "available_ctr_models", "create_ctr_model"]


class CTRModelFactory(Protocol):
    """``factory(*, fields, dim, hidden) -> nn.Module`` (a class with that constructor works)."""

    def __call__(self, *, fields: list[tuple[str, int]], dim: int, hidden: tuple[int, ...]) -> nn.Module: ...


F = TypeVar("F", bound=Callable[..., nn.Module])

CTR_MODELS: Registry[Callable[..., nn.Module]] = Registry("model.ctr_model",
                                                          entry_point_group="fedmm_secure.ctr_models")


def register_ctr_model(name: str, *, replace: bool = False) -> Callable[[F], F]:
    """Decorator: register a :class:`CTRModelFactory` (function or class) as CTR model ``name``.

    Returns the factory unchanged. Raises :class:`~fedmm_secure.errors.ConfigError` for a
    malformed name or one taken by another factory (unless ``replace=True``).
    """
    def decorate(factory: F) -> F:
        if not callable(factory):
            raise ConfigError("model.ctr_model", f"factory for {name!r} must be callable")
        CTR_MODELS.register(name, factory, replace=replace)
        return factory
    return decorate


def available_ctr_models() -> tuple[str, ...]:
    """Names of every registered CTR model, sorted."""
    return CTR_MODELS.names()


def create_ctr_model(name: str, *, fields: Sequence[tuple[str, int]], dim: int,
                     hidden: Sequence[int]) -> nn.Module:
    """Build CTR model ``name`` for ``fields``. Initial weights come from torch's global RNG,
    so seed it (or fork it) around this call for a reproducible model.

    Raises :class:`~fedmm_secure.errors.ConfigError` for an unknown name or a factory that does
    not return an ``nn.Module``.
    """
    model = CTR_MODELS.get(name)(fields=list(fields), dim=int(dim), hidden=tuple(hidden))
    if not isinstance(model, nn.Module):
        raise ConfigError("model.ctr_model", f"factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


register_ctr_model("deepfm")(DeepFM)
