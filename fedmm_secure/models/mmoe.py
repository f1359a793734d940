"""Multi-gate Mixture-of-Experts for CTR and CTCVR, with a parameter template on the experts.

Inputs are categorical fields: user id, item id, then the user's and the item's side features,
each embedded and concatenated. Experts read that vector; one softmax gate per task (CTR, CVR)
mixes the experts; one tower per task turns the mixture into a logit. As in ESMM, the CVR tower
is never trained on clicked impressions alone: ``pCTCVR = pCTR * pCVR`` is supervised over the
whole impression space with ``click * conversion``, so the loss per record is
``BCE(pCTR, click) + BCE(pCTCVR, click * conversion)``.

**Parameter template.** With ``template=True`` every expert layer is the sum of a *shared*
Linear (federated) and a *scenario-specific* Linear without bias (never leaves the client),
followed by a LayerNorm whose statistics are per record and whose affine parameters are local
(federated batch normalization without batch statistics, so DP-SGD's per-record clipping still
holds). The specific part starts at zero, so every client starts from the shared expert.

Only ``nn.Embedding``, ``nn.Linear``, ``nn.LayerNorm`` and activations: every trainable
parameter lives in a layer DP-SGD's fast clipping supports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["TASKS", "TemplateExpert", "MMoE", "esmm_loss", "log1mexp", "ctcvr_logit"]

TASKS = ("ctr", "cvr")


class TemplateExpert(nn.Module):
    """``LayerNorm(shared(x) + specific(x))`` then ReLU, per hidden layer."""

    def __init__(self, in_width: int, hidden: Sequence[int], *, template: bool) -> None:
        super().__init__()
        widths = [in_width, *hidden]
        self.shared = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.specific = (nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
                         if template else None)
        if self.specific is not None:
            for lin in self.specific:
                nn.init.zeros_(lin.weight)
        self.norm = nn.ModuleList(nn.LayerNorm(b) for b in widths[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, lin in enumerate(self.shared):
            h = lin(x)
            if self.specific is not None:
                h = h + self.specific[i](x)
            x = F.relu(self.norm[i](h))
        return x


class MMoE(nn.Module):
    def __init__(self, *, n_users: int, n_items: int, user_feature_cards: Sequence[int] = (),
                 item_feature_cards: Sequence[int] = (), dim: int, n_experts: int, expert_hidden: Sequence[int],
                 tower_hidden: int, template: bool) -> None:
        super().__init__()
        if n_experts < 1 or dim < 1 or tower_hidden < 1 or not expert_hidden:
            raise ConfigError("model", "n_experts, dim, tower_hidden must be >= 1 and expert_hidden non-empty")
        self.template = template
        self.user_id = nn.Embedding(n_users, dim)
        self.item_id = nn.Embedding(n_items, dim)
        self.user_side = nn.ModuleList(nn.Embedding(int(c), dim) for c in user_feature_cards)
        self.item_side = nn.ModuleList(nn.Embedding(int(c), dim) for c in item_feature_cards)
        for emb in [self.user_id, self.item_id, *self.user_side, *self.item_side]:
            nn.init.normal_(emb.weight, std=0.05)
        # Field embeddings plus their pairwise-interaction vector (FM bi-interaction pooling,
        # ``0.5 * ((sum e)^2 - sum e^2)``): user x item affinity is multiplicative, which an MLP
        # over concatenated embeddings learns slowly from few records. No extra parameters.
        width = dim * (3 + len(self.user_side) + len(self.item_side))
        self.experts = nn.ModuleList(TemplateExpert(width, expert_hidden, template=template) for _ in range(n_experts))
        self.gates = nn.ModuleDict({t: nn.Linear(width, n_experts) for t in TASKS})
        out = expert_hidden[-1]
        self.towers = nn.ModuleDict({t: nn.Sequential(nn.Linear(out, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, 1))
                                     for t in TASKS})
        self.n_fields = 2 + len(self.user_side) + len(self.item_side)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: int64 (B, fields) = user, item, user side features, item side features.
        Returns the CTR and CVR logits, each (B,)."""
        nu = len(self.user_side)
        cols = [self.user_id(x[:, 0]), self.item_id(x[:, 1])]
        cols += [e(x[:, 2 + i]) for i, e in enumerate(self.user_side)]
        cols += [e(x[:, 2 + nu + i]) for i, e in enumerate(self.item_side)]
        stacked = torch.stack(cols, dim=1)
        s = stacked.sum(1)
        h = torch.cat(cols + [0.5 * (s * s - (stacked * stacked).sum(1))], dim=1)
        experts = torch.stack([e(h) for e in self.experts], dim=1)          # (B, E, H)
        logits = []
        for t in TASKS:
            g = torch.softmax(self.gates[t](h), dim=-1).unsqueeze(-1)         # (B, E, 1)
            logits.append(self.towers[t]((g * experts).sum(1)).squeeze(-1))
        return logits[0], logits[1]

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CTR and CVR logits in eval mode (the module's train/eval mode is restored)."""
        was = self.training
        self.eval()
        a, b = self(x)
        self.train(was)
        return a, b

    @staticmethod
    def probabilities(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> dict[str, torch.Tensor]:
        """pCTR, pCVR and pCTCVR = pCTR * pCVR from the two logits."""
        pctr, pcvr = torch.sigmoid(ctr_logit), torch.sigmoid(cvr_logit)
        return {"ctr": pctr, "cvr": pcvr, "ctcvr": pctr * pcvr}

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """pCTR, pCVR and pCTCVR = pCTR * pCVR."""
        return self.probabilities(*self.logits(x))


def ctcvr_logit(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> torch.Tensor:
    """``logit(pCTR * pCVR)`` in float64, computed in log space (no rounding through 0 or 1)."""
    log_p = F.logsigmoid(ctr_logit.double()) + F.logsigmoid(cvr_logit.double())
    return log_p - log1mexp(log_p)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler's split at -log 2)."""
    x = torch.clamp(x, max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def esmm_loss(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, click: torch.Tensor,
              conversion: torch.Tensor) -> torch.Tensor:
    """Per-record ``BCE(pCTR, click) + BCE(pCTR * pCVR, click * conversion)``, shape (B,).

    log pCTCVR = logsigmoid(a) + logsigmoid(b) is exact; log(1 - pCTCVR) goes through
    :func:`log1mexp`, so neither term saturates for confident predictions.
    """
    ctr = F.binary_cross_entropy_with_logits(ctr_logit, click, reduction="none")
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    y = click * conversion
    ctcvr = -(y * log_p + (1 - y) * log1mexp(log_p))
    return ctr + ctcvr
