"""Collaborative-filtering embeddings trained on clicks.

An item's representation is its ID embedding plus the embeddings of its side features
(category, price band). The side-feature tables have the same meaning in every market, so in
federated methods they are the shared part (summed securely and averaged), which anchors the
markets' otherwise unrelated ID spaces in one coordinate system.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CFModel"]


class CFModel(nn.Module):
    def __init__(self, *, n_users: int, n_items: int, dim: int, item_feature_cards: tuple[int, ...],
                 item_features: torch.Tensor) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.attrs = nn.ModuleList(nn.Embedding(c, dim) for c in item_feature_cards)
        for emb in (self.user, *self.attrs):
            nn.init.normal_(emb.weight, std=0.1)
        # Item ID embeddings start at zero: an item seen rarely (or never) is then represented
        # by its side features alone, instead of by random noise that would also scramble its code.
        nn.init.zeros_(self.item.weight)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.register_buffer("item_features", item_features.long(), persistent=False)

    def item_repr(self, items: torch.Tensor) -> torch.Tensor:
        rep = self.item(items)
        feats = self.item_features[items]
        for f, emb in enumerate(self.attrs):
            rep = rep + emb(feats[:, f])
        return rep

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        u = self.user(users)
        v = self.item_repr(items)
        # Biases live in embedding tables only (no bare parameters), so DP clipping covers them.
        return (u * v).sum(-1) + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1)

    def shared_parameter_names(self) -> list[str]:
        """Parameters whose meaning is the same in every market (federated in FedMM)."""
        return [f"attrs.{f}.weight" for f in range(len(self.attrs))]

    @torch.no_grad()
    def all_item_embeddings(self) -> torch.Tensor:
        return self.item_repr(torch.arange(self.item.num_embeddings))
