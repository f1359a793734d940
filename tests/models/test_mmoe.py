"""MMoE for CTR/CTCVR: ESMM factorisation, stable loss, template layout, DP-SGD compatibility."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmm_secure.errors import ConfigError
from fedmm_secure.models.mmoe import MMoE, TemplateExpert, esmm_loss, log1mexp
from fedmm_secure.privacy.fast_clipping import GhostClipper, check_supported



def _model(template: bool = True, seed: int = 0) -> MMoE:
    torch.manual_seed(seed)
    return MMoE(n_users=9, n_items=7, user_feature_cards=(4, 3), item_feature_cards=(5,), dim=4, n_experts=3,
                expert_hidden=(6,), tower_hidden=5, template=template)


def _batch(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cards = (9, 7, 4, 3, 5)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], dim=1)


def test_ctcvr_is_ctr_times_cvr():
    m = _model()
    x = _batch()
    a, b = m(x)
    p = m.predict(x)
    torch.testing.assert_close(p["ctr"], torch.sigmoid(a))
    torch.testing.assert_close(p["cvr"], torch.sigmoid(b))
    torch.testing.assert_close(p["ctcvr"], torch.sigmoid(a) * torch.sigmoid(b))
    assert torch.all(p["ctcvr"] <= p["ctr"])


def test_esmm_loss_matches_naive_bce_over_all_impressions():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    click = (torch.rand(50, generator=g) < 0.5).float()
    conv = click * (torch.rand(50, generator=g) < 0.5).float()
    pctr, pctcvr = torch.sigmoid(a), torch.sigmoid(a) * torch.sigmoid(b)
    naive = (F.binary_cross_entropy(pctr, click, reduction="none")
             + F.binary_cross_entropy(pctcvr, click * conv, reduction="none"))
    loss = esmm_loss(a, b, click, conv)
    assert loss.shape == (50,)
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-5)


def test_esmm_loss_is_finite_for_confident_logits():
    a = torch.tensor([60.0, -60.0, 60.0, 30.0], requires_grad=True)
    b = torch.tensor([60.0, 60.0, -60.0, 30.0], requires_grad=True)
    click = torch.tensor([0.0, 1.0, 1.0, 0.0])
    conv = torch.tensor([0.0, 1.0, 0.0, 0.0])
    loss = esmm_loss(a, b, click, conv)
    loss.sum().backward()
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(a.grad)) and torch.all(torch.isfinite(b.grad))
    assert loss[0] > 50  # confidently wrong: large loss, not inf/nan


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-50.0, max_value=-1e-6))
def test_log1mexp_matches_float64_reference(x):
    got = float(log1mexp(torch.tensor([x], dtype=torch.float64)))
    assert math.isclose(got, math.log(-math.expm1(x)), rel_tol=1e-9, abs_tol=1e-12)


def test_template_expert_starts_at_shared_and_specific_is_separate():
    torch.manual_seed(0)
    e = TemplateExpert(8, (6, 4), template=True)
    assert all(torch.count_nonzero(lin.weight) == 0 for lin in e.specific)
    assert all(lin.bias is None for lin in e.specific)
    x = torch.randn(5, 8)
    ref = x
    for lin, norm in zip(e.shared, e.norm):
        ref = F.relu(norm(lin(ref)))
    torch.testing.assert_close(e(x), ref)
    with torch.no_grad():
        e.specific[0].weight.normal_(std=1.0)  # (a constant shift would be removed by LayerNorm)
    assert not torch.allclose(e(x), ref)  # the specific part does enter the expert
    plain = TemplateExpert(8, (6,), template=False)
    assert plain.specific is None


def test_only_dp_supported_layers_and_no_batchnorm():
    for template in (True, False):
        m = _model(template)
        check_supported(m)  # raises ConfigError on BatchNorm or a bare parameter
        assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
        owners = {type(mod) for mod in m.modules() if list(mod.parameters(recurse=False))}
        assert owners <= {nn.Embedding, nn.Linear, nn.LayerNorm}


def test_fast_clipping_norms_match_per_record_autograd():
    m = _model()
    with torch.no_grad():  # non-zero specific parts so their gradients are exercised too
        for e in m.experts:
            e.specific[0].weight.normal_(std=0.1)
    x = _batch(10)
    click = (torch.arange(10) % 2).float()
    conv = click * (torch.arange(10) % 3 == 0).float()
    params = [p for p in m.parameters() if p.requires_grad]
    a, b = m(x)
    ref_loss = esmm_loss(a, b, click, conv)
    ref = []
    for i in range(10):
        gs = torch.autograd.grad(ref_loss[i], params, retain_graph=True, allow_unused=True)
        ref.append(math.sqrt(sum(float(g.pow(2).sum()) for g in gs if g is not None)))
    clipper = GhostClipper(m)
    with clipper.capture():
        a, b = m(x)
        loss = esmm_loss(a, b, click, conv)
    clipper.clipped_sum(loss, torch.arange(10), 10, max_grad_norm=1.0)
    clipper.remove()
    torch.testing.assert_close(clipper.last_sq_norms.sqrt().double(), torch.tensor(ref, dtype=torch.float64),
                               rtol=1e-4, atol=1e-6)


def test_bad_shapes_are_refused():
    with pytest.raises(ConfigError):
        MMoE(n_users=3, n_items=3, dim=4, n_experts=0, expert_hidden=(4,), tower_hidden=2, template=True)
