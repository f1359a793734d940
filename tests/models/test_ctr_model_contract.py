"""Every registered CTR model passes the CTR model contract (fedmm_secure.contracts.ctr_models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmm_secure.contracts import CTR_MODEL_CHECKS, ContractViolation, check_ctr_model
from fedmm_secure.errors import ConfigError
from fedmm_secure.models.registry import CTR_MODELS, available_ctr_models, create_ctr_model, register_ctr_model


@pytest.mark.parametrize("check", sorted(CTR_MODEL_CHECKS))
@pytest.mark.parametrize("name", available_ctr_models())
def test_registered_ctr_model_passes(name, check):
    CTR_MODEL_CHECKS[check](CTR_MODELS.get(name))


class _BareBias(nn.Module):
    """A model the fast clipping cannot clip: a loose parameter outside any supported layer."""

    def __init__(self, *, fields, dim, hidden):
        super().__init__()
        self.emb = nn.Embedding(sum(c for _, c in fields), 1)
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.emb(x).sum((1, 2)) + self.bias


def test_contract_refuses_a_model_dp_sgd_cannot_clip():
    with pytest.raises(ContractViolation, match="fast clipping does not support"):
        check_ctr_model(_BareBias)


def test_registry_builds_by_name_and_refuses_unknown_names():
    assert "deepfm" in available_ctr_models()
    model = create_ctr_model("deepfm", fields=[("user", 3), ("item", 4)], dim=2, hidden=(4,))
    assert model(torch.tensor([[0, 1], [2, 3]])).shape == (2,)
    with pytest.raises(ConfigError, match="unknown model.ctr_model 'nope'") as info:
        create_ctr_model("nope", fields=[("user", 3)], dim=2, hidden=(4,))
    assert "deepfm" in info.value.allowed
    with pytest.raises(ConfigError, match="already registered"):
        register_ctr_model("deepfm")(_BareBias)
