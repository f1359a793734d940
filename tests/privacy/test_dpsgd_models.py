"""Small reference models of the project's shapes (CTR, CF, MMoE) and a per-record reference
for DP tests; imported by test_fast_clipping.py and test_dpsgd.py (holds no tests itself)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedmm_secure.privacy.fast_clipping import AddBias


class TinyCTR(nn.Module):
    """Field embeddings (one table shared by two fields), FM interaction, LayerNorm MLP."""

    def __init__(self, cards=(11, 7, 5), dim=4, tied: bool = True) -> None:
        super().__init__()
        self.tied = tied
        self.history = None if tied else nn.Embedding(cards[0], dim)
        self.emb = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        self.lin = nn.ModuleList(nn.Embedding(c, 1) for c in cards)
        width = dim * (len(cards) + 1)
        self.mlp = nn.Sequential(nn.Linear(width, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 1))
        self.bias = AddBias(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Field 0 is looked up twice (as itself and as a "history" copy): a shared table.
        extra = self.emb[0] if self.tied else self.history
        fields = [t(x[:, i]) for i, t in enumerate(self.emb)] + [extra(x[:, -1])]
        e = torch.stack(fields, 1)
        fm = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1, keepdim=True)
        first = sum(t(x[:, i]) for i, t in enumerate(self.lin))
        return self.bias(self.mlp(e.flatten(1)) + fm + first).squeeze(1)


class TinyCF(nn.Module):
    def __init__(self, n_users=9, n_items=13, dim=4) -> None:
        super().__init__()
        self.user, self.item = nn.Embedding(n_users, dim), nn.Embedding(n_items, dim)
        self.user_bias, self.item_bias = nn.Embedding(n_users, 1), nn.Embedding(n_items, 1)
        self.bias = AddBias(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, i = x[:, 0], x[:, 1]
        dot = (self.user(u) * self.item(i)).sum(1, keepdim=True)
        return self.bias(dot + self.user_bias(u) + self.item_bias(i)).squeeze(1)


class TinyMMoE(nn.Module):
    def __init__(self, cards=(11, 7), dim=4, experts=3) -> None:
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        width = dim * len(cards)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 6), nn.ReLU())
                                     for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(width, experts) for _ in range(2))
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([t(x[:, i]) for i, t in enumerate(self.emb)], 1)
        ex = torch.stack([e(h) for e in self.experts], 1)
        outs = [tower((torch.softmax(g(h), 1).unsqueeze(2) * ex).sum(1)).squeeze(1)
                for g, tower in zip(self.gates, self.towers)]
        return torch.stack(outs, 1)


def bce_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    out = model(x)
    if out.dim() == 2:  # multi-task: sum of task losses per record
        return F.binary_cross_entropy_with_logits(out, y.unsqueeze(1).expand_as(out),
                                                  reduction="none").sum(1)
    return F.binary_cross_entropy_with_logits(out, y, reduction="none")


def per_record_grads(model: nn.Module, loss: torch.Tensor) -> list[list[torch.Tensor]]:
    """Honest reference: one autograd call per record."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(loss.shape[0]):
        gs = torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    return out


def reference_clipped_sum(model, loss, gid, num_units, max_grad_norm):
    """Per-record grads -> summed per unit -> clipped (Opacus's factor) -> summed."""
    recs = per_record_grads(model, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    units = [[torch.zeros_like(p) for p in params] for _ in range(num_units)]
    for r, g in zip(recs, gid.tolist()):
        for k, t in enumerate(r):
            units[g][k] += t
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for u in units:
        norm = torch.sqrt(sum(t.pow(2).sum() for t in u))
        norms.append(norm)
        c = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for k, t in enumerate(u):
            total[k] += c * t
    return dict(zip(params, total)), torch.stack(norms)
