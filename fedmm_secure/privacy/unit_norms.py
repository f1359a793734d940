"""Per-unit squared gradient norms from captured layer inputs and output gradients (hazmat).

Split from :mod:`fast_clipping` (which re-exports the public names): pure tensor functions,
no hooks and no state.
"""

from __future__ import annotations

import torch

__all__ = ["clip_factors", "embedding_unit_sq_norms", "is_identity", "linear_unit_sq_norms", "padded_by_unit"]

# Same stabiliser as Opacus (DPOptimizer.clip_and_accumulate), so results agree bit for bit
# where the arithmetic order allows.
_CLIP_EPS = 1e-6


def clip_factors(sq_norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's flat clipping factor ``min(1, C / (||g|| + 1e-6))`` per unit."""
    return (max_grad_norm / (sq_norms.sqrt() + _CLIP_EPS)).clamp(max=1.0)


def padded_by_unit(rows: torch.Tensor, gid: torch.Tensor, num_units: int) -> torch.Tensor:
    """Rows grouped by unit into a zero-padded ``(G, L, d)`` tensor (L = largest group)."""
    counts = torch.bincount(gid, minlength=num_units)
    order = torch.argsort(gid, stable=True)
    sorted_gid = gid[order]
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(gid.numel(), device=gid.device) - starts[sorted_gid]
    length = int(counts.max()) if gid.numel() else 0
    out = rows.new_zeros((num_units, length, rows.shape[-1]))
    out[sorted_gid, pos] = rows[order]
    return out


def is_identity(gid: torch.Tensor, num_units: int) -> bool:
    return gid.numel() == num_units and bool(
        torch.equal(gid, torch.arange(num_units, device=gid.device)))


def linear_unit_sq_norms(a: torch.Tensor, g: torch.Tensor, gid: torch.Tensor,
                         num_units: int, *, identity: bool | None = None) -> torch.Tensor:
    """Squared Frobenius norm per unit of ``sum_{r: gid[r]=u} g_r a_r^T`` (weight only).

    ``a``: (R, in) layer inputs, ``g``: (R, out) output gradients, ``gid``: (R,) unit ids;
    ``identity`` says ``gid == arange(num_units)`` when the caller knows it.
    """
    if identity is None:
        identity = is_identity(gid, num_units)
    if identity:
        return a.pow(2).sum(1) * g.pow(2).sum(1)
    ap, gp = padded_by_unit(a, gid, num_units), padded_by_unit(g, gid, num_units)
    length, d_in, d_out = ap.shape[1], a.shape[1], g.shape[1]
    if length * (d_in + d_out) <= d_in * d_out:
        # Ghost form: the unit gradient's squared norm from the two Gram matrices.
        return (torch.bmm(ap, ap.transpose(1, 2)) * torch.bmm(gp, gp.transpose(1, 2))).sum((1, 2))
    return torch.bmm(gp.transpose(1, 2), ap).pow(2).sum((1, 2))


def embedding_unit_sq_norms(idx: torch.Tensor, g: torch.Tensor, gid: torch.Tensor,
                            num_units: int, num_embeddings: int, *,
                            identity: bool = False) -> torch.Tensor:
    """Squared norm per unit of an embedding table's gradient.

    Row ``v`` of unit ``u``'s gradient is the sum of ``g_r`` over lookups ``r`` of ``u`` with
    ``idx[r] = v``; lookups sharing (unit, index) are summed before squaring.
    """
    if identity:  # one lookup per unit: nothing to merge
        return g.pow(2).sum(1)
    out = g.new_zeros(num_units)
    if idx.numel() == 0:
        return out
    key = gid * num_embeddings + idx
    uniq, inverse = torch.unique(key, return_inverse=True)
    if uniq.numel() == key.numel():
        return out.index_add_(0, gid, g.pow(2).sum(1))
    summed = g.new_zeros((uniq.numel(), g.shape[1])).index_add_(0, inverse, g)
    return out.index_add_(0, torch.div(uniq, num_embeddings, rounding_mode="floor"),
                          summed.pow(2).sum(1))
