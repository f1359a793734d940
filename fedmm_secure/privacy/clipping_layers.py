"""Which layers per-unit clipping supports, and the check that a model uses only those (hazmat).

Split from :mod:`fast_clipping` (which re-exports these names): the support rules are shared
by the clipper, the DP trainer and the CTR model contract.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["AddBias", "SUPPORTED_LAYERS", "check_supported", "own_trainable"]


class AddBias(nn.Module):
    """``x + bias``: a free-standing bias as a layer, so its per-unit gradient is known.

    A bare ``nn.Parameter`` used inside a model's ``forward`` cannot be clipped per sample
    (nothing tells how it enters the computation); wrap it in this layer instead.
    """

    def __init__(self, shape: int | tuple[int, ...] = 1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, AddBias)

# Layers that mix the records of a batch: per-sample gradients are meaningless with them.
_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm,)


def own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def check_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return the (name, layer) pairs owning trainable parameters; raise on anything else."""
    layers: list[tuple[str, nn.Module]] = []
    allowed = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, _BATCH_MIXING):
            raise ConfigError("model", f"layer {label!r} ({type(module).__name__}) mixes the "
                              "records of a batch, which breaks per-sample clipping; use "
                              "nn.LayerNorm", allowed=allowed)
        own = own_trainable(module)
        if not own:
            continue
        if type(module) not in SUPPORTED_LAYERS:
            extra = (" (a bare nn.Parameter: wrap it in fedmm_secure.privacy.fast_clipping."
                     "AddBias)" if not isinstance(module, SUPPORTED_LAYERS) else "")
            raise ConfigError("model", f"layer {label!r} of type {type(module).__name__} owns "
                              f"trainable parameters {[n for n, _ in own]} but per-sample "
                              f"clipping is not implemented for it{extra}", allowed=allowed)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            if module.max_norm is not None:
                raise ConfigError("model", f"embedding {label!r} uses max_norm, which rewrites "
                                  "weights during the forward pass", allowed="max_norm=None")
            if module.scale_grad_by_freq:
                raise ConfigError("model", f"embedding {label!r} uses scale_grad_by_freq, which "
                                  "couples records", allowed="scale_grad_by_freq=False")
            if module.sparse:
                raise ConfigError("model", f"embedding {label!r} is sparse; DP noise makes every "
                                  "gradient dense", allowed="sparse=False")
        if isinstance(module, nn.EmbeddingBag) and module.mode == "max":
            raise ConfigError("model", f"embedding bag {label!r} uses mode='max'",
                              allowed="'sum', 'mean'")
        layers.append((label, module))
    return layers
