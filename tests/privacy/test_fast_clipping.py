"""Fast per-unit clipping equals the per-record reference (and Opacus's per-sample grads)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from fedmm_secure.errors import ConfigError
from fedmm_secure.privacy.fast_clipping import (
    AddBias,
    GhostClipper,
    embedding_unit_sq_norms,
    linear_unit_sq_norms,
)
from .test_dpsgd_models import TinyCF, TinyCTR, TinyMMoE, bce_loss, reference_clipped_sum

# Opacus's backward hooks warn when a layer's inputs need no gradient (embedding ids).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")


def _fast(model, loss_fn, batch, gid, num_units, c):
    clipper = GhostClipper(model)
    with clipper.capture():
        loss = loss_fn(model, batch)
    out = clipper.clipped_sum(loss, gid, num_units, max_grad_norm=c)
    clipper.remove()
    return out, clipper.last_sq_norms.sqrt()


def _check(model, loss_fn, batch, gid, num_units, c=0.3):
    fast, fast_norms = _fast(model, loss_fn, batch, gid, num_units, c)
    ref, ref_norms = reference_clipped_sum(model, loss_fn(model, batch), gid, num_units, c)
    torch.testing.assert_close(fast_norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert set(fast) == set(ref)
    for p in ref:
        torch.testing.assert_close(fast[p], ref[p], rtol=1e-4, atol=1e-6)
    # The clip must actually bind for some units, or the test would not test clipping.
    return ref_norms


def _record(n):
    return torch.arange(n), n


def test_linear_rows_and_sequences():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    loss_fn = lambda m, b: (m(b[0]) - b[1]).pow(2).sum(1)  # noqa: E731
    norms = _check(model, loss_fn, (x, y), *_record(6), c=3.0)
    assert (norms > 3.0).any() and (norms < 3.0).any()  # some units clipped, some not
    # (B, T, d) inputs: a unit's gradient sums over positions before the norm.
    xs = torch.randn(6, 3, 5)
    _check(model, lambda m, b: m(b).pow(2).sum((1, 2)), xs, *_record(6))


def test_embedding_repeated_indices_and_padding():
    torch.manual_seed(1)
    emb = nn.Embedding(5, 3, padding_idx=0)
    head = nn.Linear(3 * 4, 1)
    model = nn.ModuleDict({"emb": emb, "head": head})
    x = torch.tensor([[1, 1, 1, 2], [0, 3, 3, 0], [4, 2, 4, 2], [0, 0, 0, 0]])

    def loss_fn(m, b):
        return m["head"](m["emb"](b).flatten(1)).squeeze(1).pow(2)

    _check(model, loss_fn, x, *_record(4), c=0.05)
    sums = _fast(model, loss_fn, x, *_record(4), 0.05)[0]
    assert torch.count_nonzero(sums[emb.weight][0]) == 0  # padding row gets no gradient


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_2d_offsets_and_weights(mode):
    torch.manual_seed(2)
    bag = nn.EmbeddingBag(6, 3, mode=mode, padding_idx=5)
    model = nn.ModuleDict({"bag": bag, "head": nn.Linear(3, 1)})
    x2 = torch.tensor([[1, 1, 2], [5, 3, 3], [4, 4, 4]])
    _check(model, lambda m, b: m["head"](m["bag"](b)).squeeze(1).pow(2), x2, *_record(3), c=0.1)
    flat = torch.tensor([1, 2, 2, 3, 0, 5, 4])
    offsets = torch.tensor([0, 3, 3, 5])  # an empty bag included
    _check(model, lambda m, b: m["head"](m["bag"](b, offsets)).squeeze(1).pow(2), flat,
           *_record(4), c=0.1)
    if mode == "sum":
        w = torch.rand(7)
        _check(model, lambda m, b: m["head"](m["bag"](b, offsets, per_sample_weights=w))
               .squeeze(1).pow(2), flat, *_record(4), c=0.1)


def test_layernorm_and_addbias():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), AddBias(6), nn.Linear(6, 2),
                          AddBias(1))
    x = torch.randn(5, 4)
    _check(model, lambda m, b: m(b).pow(2).sum(1), x, *_record(5))
    xs = torch.randn(5, 2, 4)  # LayerNorm over positions
    _check(model, lambda m, b: m(b).pow(2).sum((1, 2)), xs, *_record(5))


@pytest.mark.parametrize("make", [TinyCTR, TinyCF, TinyMMoE])
def test_full_models_record_level(make):
    torch.manual_seed(4)
    model = make()
    n = 8
    cards = [11, 7, 5, 11] if make is TinyCTR else ([9, 13] if make is TinyCF else [11, 7])
    x = torch.stack([torch.randint(0, c, (n,)) for c in cards], 1)
    x[1] = x[0]  # two identical records: still two units
    y = torch.randint(0, 2, (n,)).float()
    _check(make and model, bce_loss, (x, y), *_record(n), c=0.2)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=10), st.integers(0, 1000),
       st.floats(0.01, 5.0))
def test_user_level_groups_match_reference(users, seed, clip):
    """User-level: a unit's gradient is the sum of its records' gradients, then clipped."""
    torch.manual_seed(seed)
    model = TinyCTR()
    n = len(users)
    _, gid = torch.unique(torch.tensor(users), return_inverse=True)
    num_units = int(gid.max()) + 1
    x = torch.stack([torch.randint(0, c, (n,)) for c in [11, 7, 5, 11]], 1)
    y = torch.randint(0, 2, (n,)).float()
    _check(model, bce_loss, (x, y), gid, num_units, c=clip)


def test_matches_opacus_grad_sample_module():
    from opacus import GradSampleModule

    torch.manual_seed(5)
    model = TinyCF()
    x = torch.stack([torch.randint(0, 9, (7,)), torch.randint(0, 13, (7,))], 1)
    y = torch.randint(0, 2, (7,)).float()
    fast, _ = _fast(model, bce_loss, (x, y), *_record(7), 0.1)
    from fedmm_secure.privacy.dpsgd import _register_opacus_samplers
    _register_opacus_samplers()
    gsm = GradSampleModule(model, loss_reduction="sum")
    bce_loss(gsm, (x, y)).sum().backward()
    params = [p for p in model.parameters()]
    flat = torch.cat([p.grad_sample.reshape(7, -1) for p in params], 1)
    factors = (0.1 / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    for p in params:
        ref = torch.einsum("i,i...->...", factors, p.grad_sample)
        torch.testing.assert_close(fast[p], ref, rtol=1e-4, atol=1e-7)
    gsm._close()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 12), st.integers(1, 12),
       st.integers(0, 10_000))
@example(3, 2, 8, 8, 0)   # Gram ("ghost") form: L (in + out) <= in out
@example(3, 3, 2, 2, 0)   # explicit G x out x in form
@example(4, 1, 3, 2, 0)   # one row per unit
def test_linear_norm_forms_agree(units, per_unit, d_in, d_out, seed):
    """Ghost (Gram) form, explicit form and the identity fast path give the same norms."""
    g = torch.Generator().manual_seed(seed)
    rows = units * per_unit
    a, go = torch.randn(rows, d_in, generator=g), torch.randn(rows, d_out, generator=g)
    gid = torch.arange(units).repeat_interleave(per_unit)
    got = linear_unit_sq_norms(a, go, gid, units)
    want = torch.stack([(go[gid == u].t() @ a[gid == u]).pow(2).sum() for u in range(units)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_embedding_norm_groups_duplicates():
    g = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    idx, gid = torch.tensor([4, 4, 4]), torch.tensor([0, 0, 1])
    # Unit 0 looks row 4 up twice: (1+2)^2 = 9, not 1 + 4.
    assert embedding_unit_sq_norms(idx, g, gid, 2, 5).tolist() == [9.0, 9.0]


def test_unsupported_layers_are_refused():
    with pytest.raises(ConfigError, match="Conv1d"):
        GhostClipper(nn.Sequential(nn.Conv1d(1, 1, 2)))
    with pytest.raises(ConfigError, match="BatchNorm"):
        GhostClipper(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False)))

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1)
            self.bias = nn.Parameter(torch.zeros(1))

    with pytest.raises(ConfigError, match="AddBias"):
        GhostClipper(Bare())
    with pytest.raises(ConfigError, match="sparse"):
        GhostClipper(nn.Embedding(3, 2, sparse=True))


def test_inplace_modification_of_a_captured_output_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True), nn.Linear(3, 1))
    clipper = GhostClipper(model)
    with clipper.capture():
        loss = model(torch.randn(4, 3)).squeeze(1)
    with pytest.raises(ConfigError, match="in place"):
        clipper.clipped_sum(loss, torch.arange(4), 4, max_grad_norm=1.0)


def test_loss_must_be_one_value_per_record():
    model = nn.Linear(3, 1)
    clipper = GhostClipper(model)
    with clipper.capture():
        loss = model(torch.randn(4, 3)).sum()
    with pytest.raises(ConfigError, match="one value per record"):
        clipper.clipped_sum(loss.reshape(1), torch.arange(4), 4, max_grad_norm=1.0)


def test_parameter_used_outside_its_layer_is_refused():
    """A tied output layer reading ``emb.weight`` directly would escape clipping: refuse."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3)

        def forward(self, x):
            return (self.emb(x) @ self.emb.weight.t()).sum(1)

    model = Tied()
    clipper = GhostClipper(model)
    with clipper.capture():
        loss = model(torch.tensor([1, 2, 3]))
    with pytest.raises(ConfigError, match="emb.weight"):
        clipper.clipped_sum(loss, torch.arange(3), 3, max_grad_norm=1.0)
