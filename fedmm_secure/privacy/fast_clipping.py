"""Per-unit gradient norms and clipped gradient sums without per-sample gradients (hazmat).

DP-SGD needs, for every privacy unit u in a batch (a record, or a user's group of records),
the norm of u's gradient, then ``sum_u clip(grad_u)``. Opacus materialises ``grad_u`` for every
parameter, which for an embedding table is a ``B x V x D`` tensor; its ghost clipping avoids
that but pays a second full backward pass. Here, in "book-keeping" style, one forward pass
captures each supported layer's inputs and outputs, one backward pass computes only the
gradients w.r.t. those outputs (never the parameters), and then, per layer:

* ``nn.Linear``: unit gradient ``sum_{r in u} g_r a_r^T``; its squared norm is
  ``||a||^2 ||g||^2`` for one row per unit (ghost norm), else
  ``sum_{r,s in u} (a_r.a_s)(g_r.g_s)`` or the explicit ``G x out x in`` tensor, whichever is
  cheaper;
* ``nn.Embedding`` / ``nn.EmbeddingBag``: rows of the unit gradient are sums of output
  gradients over the lookups of that unit with the same index, so group by ``(unit, index)``;
* ``nn.LayerNorm`` and :class:`AddBias`: per-unit gradients are small and built directly.

The clipped sum is then assembled from the same captured tensors (a matmul per Linear layer,
an ``index_add`` per table), so the cost is one forward, one backward and a few small extras.

This module is pure math plus one hook holder; noise, accounting and the optimizer live in
:mod:`fedmm_secure.privacy.dpsgd`.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .clipping_layers import SUPPORTED_LAYERS, AddBias, check_supported, own_trainable
from .unit_norms import clip_factors, embedding_unit_sq_norms, is_identity, linear_unit_sq_norms

__all__ = [
    "AddBias",
    "SUPPORTED_LAYERS",
    "GhostClipper",
    "clip_factors",
    "linear_unit_sq_norms",
    "embedding_unit_sq_norms",
    "check_supported",
]


@dataclass
class _Call:
    module: nn.Module
    inputs: tuple[Any, ...]
    output: torch.Tensor
    version: int
    upstream: tuple[Any, ...] = ()   # grad_fn of each differentiable input


def _params_reached_outside_layers(loss: torch.Tensor, calls: list[_Call],
                                   params: dict[int, str]) -> list[str]:
    """Names of trainable parameters the loss depends on other than through a captured layer
    call (e.g. ``x @ emb.weight.T`` for a tied output layer). Their gradient would be missed by
    the clipped sum, silently voiding the privacy guarantee, so callers must refuse them."""
    stop = {c.output.grad_fn for c in calls if c.output.grad_fn is not None}
    frontier = [loss.grad_fn] + [f for c in calls for f in c.upstream]
    seen: set[Any] = set()
    found: list[str] = []
    while frontier:
        node = frontier.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in params:
            found.append(params[id(var)])
        frontier.extend(n for n, _ in node.next_functions)
    return found


@dataclass
class _Rows:
    """One layer's captured rows over all its calls in a step, tagged with unit ids."""
    kind: str
    gid: torch.Tensor
    identity: bool = False                # row r belongs to unit r (one row per unit)
    a: torch.Tensor | None = None        # Linear inputs / LayerNorm normalised inputs
    g: torch.Tensor | None = None        # output gradients (scaled, for bags)
    idx: torch.Tensor | None = None      # embedding indices


def _bag_rows(module: nn.EmbeddingBag, inputs: tuple[Any, ...], grad: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expand an EmbeddingBag call into (index, bag, per-lookup gradient) rows."""
    inp, offsets, psw = (list(inputs) + [None, None])[:3]
    num_bags = grad.shape[0]
    if inp.dim() == 2:
        bag = torch.arange(inp.shape[0], device=inp.device).repeat_interleave(inp.shape[1])
        idx = inp.reshape(-1)
    else:
        idx = inp
        offs = offsets.to(torch.long)
        bounds = offs if module.include_last_offset else torch.cat(
            [offs, offs.new_tensor([idx.numel()])])
        counts = bounds[1:] - bounds[:-1]
        bag = torch.arange(num_bags, device=inp.device).repeat_interleave(counts)
    scale = grad.new_ones(idx.shape)
    if psw is not None:
        scale = psw.reshape(-1).to(grad.dtype)
    keep = torch.ones_like(idx, dtype=torch.bool)
    if module.padding_idx is not None:
        keep = idx != module.padding_idx
    if module.mode == "mean":
        sizes = torch.zeros(num_bags, dtype=grad.dtype, device=grad.device).index_add_(
            0, bag, keep.to(grad.dtype))
        scale = scale / sizes.clamp(min=1)[bag]
    idx, bag, scale = idx[keep], bag[keep], scale[keep]
    return idx, bag, grad[bag] * scale[:, None]


class GhostClipper:
    """Forward hooks on a model's trainable layers; turns one backward into clipped sums.

    Use::

        clipper = GhostClipper(model)
        with clipper.capture():
            loss = loss_fn(model, batch)          # (B,) per-record losses
        grads = clipper.clipped_sum(loss, gid, num_units, max_grad_norm=C)

    ``grads`` maps each trainable parameter to ``sum_u clip_C(grad_u)``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = check_supported(model)
        self._calls: list[_Call] = []
        self._active = False
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True)
                         for _, m in self.layers]
        self._param_names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        # Per-layer parameter lists and lookup, fixed at construction like the optimizer's
        # parameter set (walking named_parameters every step was a visible share of small steps).
        self._own = {id(m): [p for _, p in own_trainable(m)] for _, m in self.layers}
        self._by_id = {id(m): m for _, m in self.layers}
        self.last_sq_norms: torch.Tensor | None = None
        # id(table) -> (rows looked up, unit of each lookup) of the last clipped_sum: what
        # sparse DP-SGD selects rows from (privacy.sparse_noise).
        self.last_lookups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def param_order(self) -> list[nn.Parameter]:
        """Trainable parameters in the order ``clipped_sum`` visits them."""
        return [p for _, m in self.layers for p in self._own[id(m)]]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        if not self._active or not torch.is_grad_enabled():
            return
        if isinstance(module, nn.EmbeddingBag):
            names = ("input", "offsets", "per_sample_weights")
            full = list(args) + [kwargs.get(n) for n in names[len(args):]]
            raw = tuple(full)
        else:
            raw = (args[0] if args else kwargs["input"],)
        inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in raw)
        upstream = tuple(t.grad_fn for t in raw
                         if isinstance(t, torch.Tensor) and t.grad_fn is not None)
        self._calls.append(_Call(module, inputs, output, output._version, upstream))

    class _Capture:
        def __init__(self, owner: "GhostClipper") -> None:
            self.owner = owner

        def __enter__(self) -> None:
            self.owner._calls = []
            self.owner._active = True

        def __exit__(self, *exc: object) -> None:
            self.owner._active = False

    def capture(self) -> "GhostClipper._Capture":
        return GhostClipper._Capture(self)

    def discard(self) -> None:
        self._calls = []

    def _rows(self, call: _Call, grad: torch.Tensor, gid: torch.Tensor,
              record_level: bool) -> _Rows:
        m, batch = call.module, gid.shape[0]
        lead = grad.shape[0]
        if lead != batch:
            raise ConfigError("model", f"layer {type(m).__name__} saw a batch of {lead} rows "
                              f"but the loss has {batch} records; every layer must be "
                              "batch-first and the loss one value per record")
        if isinstance(m, nn.Embedding):
            idx = call.inputs[0]
            per = idx[0].numel() if idx.dim() > 0 and idx.shape[0] else 1
            idx = idx.reshape(-1)
            g = grad.reshape(-1, m.embedding_dim)
            rgid = gid.repeat_interleave(per) if per != 1 else gid
            ident = record_level and per == 1
            if m.padding_idx is not None:
                keep = idx != m.padding_idx
                if not bool(keep.all()):
                    idx, g, rgid, ident = idx[keep], g[keep], rgid[keep], False
            return _Rows("emb", rgid, ident, g=g, idx=idx)
        if isinstance(m, nn.EmbeddingBag):
            idx, bag, g = _bag_rows(m, call.inputs, grad)
            return _Rows("emb", gid[bag], g=g, idx=idx)
        x = call.inputs[0]
        if isinstance(m, nn.Linear):
            per = x[0].numel() // m.in_features if batch else 1
            rgid = gid.repeat_interleave(per) if per != 1 else gid
            return _Rows("linear", rgid, record_level and per == 1, a=x.reshape(-1, m.in_features),
                         g=grad.reshape(-1, m.out_features))
        if isinstance(m, nn.LayerNorm):
            nd = len(m.normalized_shape)
            dims = tuple(range(x.dim() - nd, x.dim()))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            xhat = (x - mean) / torch.sqrt(var + m.eps)
            width = _prod(m.normalized_shape)
            per = (x[0].numel() // width) if batch else 1
            rgid = gid.repeat_interleave(per) if per != 1 else gid
            return _Rows("layernorm", rgid, record_level and per == 1, a=xhat.reshape(-1, width),
                         g=grad.reshape(-1, width))
        if isinstance(m, AddBias):
            width = m.bias.numel()
            per = (grad[0].numel() // width) if batch else 1
            rgid = gid.repeat_interleave(per) if per != 1 else gid
            return _Rows("bias", rgid, record_level and per == 1, g=grad.reshape(-1, width))
        raise ConfigError("model", f"unsupported layer {type(m).__name__}")

    def clipped_sum(self, loss: torch.Tensor, gid: torch.Tensor, num_units: int, *,
                    max_grad_norm: float,
                    into: Callable[[nn.Parameter], torch.Tensor] | None = None,
                    scale: float = 1.0) -> dict[nn.Parameter, torch.Tensor]:
        """Backward once and return ``{param: sum_u clip(grad_u)}`` for every trainable param.

        ``loss``: (B,) per-record losses; ``gid``: (B,) unit id of each record in
        ``[0, num_units)``. Parameters get no ``.grad``. ``into(p)``, called after the backward
        pass for each parameter in :meth:`param_order`, returns a buffer (e.g. ``p``'s noise)
        the clipped sum is added to in place, which saves one parameter-sized buffer per
        embedding table; the rows captured for a layer are freed as soon as it is done. The clipped sum is multiplied by ``scale``
        (folding e.g. the 1/(q N) of a mean into the clip factors saves a pass per table).
        """
        calls, self._calls = self._calls, []
        if loss.dim() != 1 or loss.shape[0] != gid.shape[0]:
            raise ConfigError("loss", f"must be one value per record, shape ({gid.shape[0]},), "
                              f"got {tuple(loss.shape)}")
        for c in calls:
            if c.output._version != c.version:
                raise ConfigError("model", f"the output of a {type(c.module).__name__} layer "
                                  "was modified in place (e.g. ReLU(inplace=True)); per-sample "
                                  "clipping needs it intact", allowed="inplace=False")
        stray = _params_reached_outside_layers(loss, calls, self._param_names)
        if stray:
            raise ConfigError("model", f"parameters {sorted(set(stray))} are used outside the "
                              "forward of their own layer (e.g. a weight read directly); their "
                              "per-sample gradients cannot be clipped")
        live = [c for c in calls if c.output.requires_grad]
        outs = torch.autograd.grad(loss.sum(), [c.output for c in live], allow_unused=True) \
            if live else []
        record_level = is_identity(gid, num_units)
        per_layer: dict[int, list[_Rows]] = {}
        for c, go in zip(live, outs):
            if go is None:
                continue
            per_layer.setdefault(id(c.module), []).append(
                self._rows(c, go.detach(), gid, record_level))

        sq = loss.new_zeros(num_units, dtype=torch.float32 if not loss.is_floating_point()
                            else loss.dtype).detach()
        merged: dict[int, _Rows] = {}
        lookups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_lookups = lookups
        for key, rows in per_layer.items():
            module = self._by_id[key]
            r = rows[0] if len(rows) == 1 else _Rows(
                rows[0].kind, torch.cat([x.gid for x in rows]), False,
                a=None if rows[0].a is None else torch.cat([x.a for x in rows]),
                g=torch.cat([x.g for x in rows]),
                idx=None if rows[0].idx is None else torch.cat([x.idx for x in rows]))
            merged[key] = r
            if r.kind == "emb":
                lookups[key] = (r.idx, r.gid)
            sq = sq + self._sq_norms(module, r, num_units)
        per_layer.clear()
        self.last_sq_norms = sq
        factors = clip_factors(sq, max_grad_norm)
        if scale != 1.0:
            factors = factors * scale
        del calls, live, outs

        # Dense layers first, into small buffers, so their captured rows (activations and
        # output gradients, O(B x width)) are freed before the tables' noise is drawn.
        small: dict[nn.Parameter, torch.Tensor] = {}
        for _, module in self.layers:
            if not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                for p in self._own[id(module)]:
                    small[p] = torch.zeros_like(p)
                r = merged.pop(id(module), None)
                if r is not None:
                    self._accumulate(module, r, factors[r.gid], small)
                    del r
        grads: dict[nn.Parameter, torch.Tensor] = {}
        for _, module in self.layers:
            for p in self._own[id(module)]:
                if into is None:
                    grads[p] = small.pop(p) if p in small else torch.zeros_like(p)
                else:
                    grads[p] = into(p)
                    if p in small:
                        grads[p].add_(small.pop(p))
            r = merged.pop(id(module), None)
            if r is not None:  # table rows, added straight into the buffer
                self._accumulate(module, r, factors[r.gid], grads)
                del r
        return grads

    @staticmethod
    def _sq_norms(m: nn.Module, r: _Rows, num_units: int) -> torch.Tensor:
        if r.kind == "emb":
            if not m.weight.requires_grad:
                return r.g.new_zeros(num_units)
            return embedding_unit_sq_norms(r.idx, r.g, r.gid, num_units, m.weight.shape[0],
                                           identity=r.identity)
        if r.kind == "linear":
            out = r.g.new_zeros(num_units)
            if m.weight.requires_grad:
                out = out + linear_unit_sq_norms(r.a, r.g, r.gid, num_units, identity=r.identity)
            if m.bias is not None and m.bias.requires_grad:
                out = out + _group_sum(r, r.g, num_units).pow(2).sum(1)
            return out
        if r.kind == "layernorm":
            out = r.g.new_zeros(num_units)
            if m.weight is not None and m.weight.requires_grad:
                out = out + _group_sum(r, r.a * r.g, num_units).pow(2).sum(1)
            if m.bias is not None and m.bias.requires_grad:
                out = out + _group_sum(r, r.g, num_units).pow(2).sum(1)
            return out
        return _group_sum(r, r.g, num_units).pow(2).sum(1)

    @staticmethod
    def _accumulate(m: nn.Module, r: _Rows, c: torch.Tensor,
                    grads: dict[nn.Parameter, torch.Tensor]) -> None:
        gc = r.g * c[:, None]
        if r.kind == "emb":
            if m.weight.requires_grad:
                grads[m.weight].index_add_(0, r.idx, gc)
        elif r.kind == "linear":
            if m.weight.requires_grad:
                grads[m.weight].addmm_(gc.t(), r.a)
            if m.bias is not None and m.bias.requires_grad:
                grads[m.bias].add_(gc.sum(0))
        elif r.kind == "layernorm":
            if m.weight is not None and m.weight.requires_grad:
                grads[m.weight].add_((r.a * gc).sum(0).view_as(m.weight))
            if m.bias is not None and m.bias.requires_grad:
                grads[m.bias].add_(gc.sum(0).view_as(m.bias))
        else:
            grads[m.bias].add_(gc.sum(0).view_as(m.bias))


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _group_sum(r: _Rows, rows: torch.Tensor, num_units: int) -> torch.Tensor:
    if r.identity:
        return rows
    return rows.new_zeros((num_units, rows.shape[1])).index_add_(0, r.gid, rows)
