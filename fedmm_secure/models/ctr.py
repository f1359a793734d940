"""DeepFM-style CTR model over categorical fields.

Fields are (name, cardinality) pairs: user id, item id, and for code-based methods the item's
level-1 and level-2 codes. Only embeddings, linear layers, LayerNorm and activations are used, so
the model is supported by DP-SGD (no BatchNorm).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DeepFM"]


class DeepFM(nn.Module):
    """DeepFM: first-order terms + factorization-machine pairwise terms + an MLP, over one
    embedding per categorical field. Registered as CTR model ``"deepfm"`` (the default).

    ``fields``: ``[(name, cardinality)]`` in input column order; ``dim``: embedding width;
    ``hidden``: MLP hidden widths; ``dropout``: after each hidden layer (0 = none).
    """

    def __init__(self, *, fields: list[tuple[str, int]], dim: int, hidden: tuple[int, ...] = (64, 32),
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.field_names = [n for n, _ in fields]
        embeddings = {n: nn.Embedding(c, dim) for n, c in fields}
        linear = {n: nn.Embedding(c, 1) for n, c in fields}
        for n in self.field_names:
            nn.init.normal_(embeddings[n].weight, std=0.05)
            nn.init.zeros_(linear[n].weight)
        self.embeddings = nn.ModuleDict(embeddings)
        self.linear = nn.ModuleDict(linear)
        layers: list[nn.Module] = []
        width = dim * len(fields)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def selection_groups(self) -> list[list[nn.Module]]:
        """Tables always looked up with the same indices: each field's embedding and its
        first-order weight. Sparse DP-SGD selects their rows together (one contribution map
        entry per field row instead of two; :mod:`fedmm_secure.privacy.sparse_noise`)."""
        return [[self.embeddings[n], self.linear[n]] for n in self.field_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: int64 (B, n_fields) in the order of ``fields``; returns logits (B,)."""
        embs = torch.stack([self.embeddings[n](x[:, i]) for i, n in enumerate(self.field_names)], dim=1)
        first = sum(self.linear[n](x[:, i]) for i, n in enumerate(self.field_names)).squeeze(-1)
        s = embs.sum(1)
        fm = 0.5 * (s * s - (embs * embs).sum(1)).sum(-1)
        deep = self.mlp(embs.flatten(1)).squeeze(-1)
        # No bare bias parameter: the MLP's last Linear carries it (per-sample clipping covers
        # Linear/Embedding/LayerNorm layers, not loose parameters).
        return first + fm + deep
