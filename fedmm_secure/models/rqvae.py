"""Residual-quantized VAE with two codebook levels.

Level 1 is the *global* codebook (shared by all markets in FedMM, updated from the secure sum of
every market's statistics); level 2 is the *local* codebook (private to the market) and
quantizes the residual left by level 1. The encoder ends in ``tanh``, so every latent coordinate
lies in [-1, 1]: that known bound is what sizes the secure-aggregation ring for the statistics.

Encoder and decoder are trained by gradient (reconstruction + commitment loss, straight-through
estimator); codebooks are buffers updated from statistics (``codebook.update_codebook``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .codebook import assign_codes

__all__ = ["RQVAE"]


class RQVAE(nn.Module):
    def __init__(self, *, in_dim: int, latent_dim: int, hidden: int, n_global: int, n_local: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        self.register_buffer("global_codebook", 0.5 * torch.randn(n_global, latent_dim, generator=generator))
        self.register_buffer("local_codebook", 0.1 * torch.randn(n_local, latent_dim, generator=generator))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (codes_1, codes_2, residual after level 1, quantized z)."""
        with torch.no_grad():
            zn = z.detach().cpu().numpy()
            c1 = assign_codes(zn, self.global_codebook.cpu().numpy())
            r1 = zn - self.global_codebook.cpu().numpy()[c1]
            c2 = assign_codes(r1, self.local_codebook.cpu().numpy())
        c1t, c2t = torch.from_numpy(c1), torch.from_numpy(c2)
        zq = self.global_codebook[c1t] + self.local_codebook[c2t]
        return c1t, c2t, z - self.global_codebook[c1t], zq

    def forward(self, x: torch.Tensor, *, beta: float) -> tuple[torch.Tensor, dict]:
        z = self.encode(x)
        c1, c2, _, zq = self.quantize(z)
        z_st = z + (zq - z).detach()
        recon = self.decoder(z_st)
        rec_loss = ((recon - x) ** 2).mean()
        commit = ((z - zq.detach()) ** 2).mean()
        return rec_loss + beta * commit, {"recon": float(rec_loss.detach()), "commit": float(commit.detach())}

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(level-1 codes, level-2 codes, latents z, level-1 residuals) as numpy arrays."""
        z = self.encode(x)
        c1, c2, r1, _ = self.quantize(z)
        return c1.numpy(), c2.numpy(), z.numpy().astype(np.float64), r1.numpy().astype(np.float64)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> float:
        z = self.encode(x)
        _, _, _, zq = self.quantize(z)
        return float(((self.decoder(zq) - x) ** 2).mean())
