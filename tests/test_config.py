"""Run configuration: family-dependent defaults are resolved explicitly; bad values name the field."""

import pytest

from fedmm_secure.config import DEFAULT_MAX_GRAD_NORM, RunConfig, config_from_dict
from fedmm_secure.errors import ConfigError


def test_clipping_norm_defaults_per_model_family_and_is_written_out():
    fedmm = config_from_dict({"privacy": {"enabled": True, "epsilon": 8.0}})
    pf = config_from_dict({"model_family": "pf-msmtrec", "privacy": {"enabled": True, "epsilon": 8.0}})
    assert fedmm.privacy.max_grad_norm is None and pf.privacy.max_grad_norm is None
    assert fedmm.max_grad_norm() == DEFAULT_MAX_GRAD_NORM["fedmm"] == 1.0
    assert pf.max_grad_norm() == DEFAULT_MAX_GRAD_NORM["pf-msmtrec"] == 2.0
    for cfg in (fedmm, pf):
        r = cfg.resolved()
        assert r.privacy.max_grad_norm == cfg.max_grad_norm()
        assert config_from_dict(r.to_dict()) == r   # what a run directory records round-trips
        assert r.resolved() is r


def test_configured_clipping_norm_wins_over_the_family_default():
    cfg = config_from_dict({"model_family": "pf-msmtrec",
                            "privacy": {"max_grad_norm": 0.5, "epsilon": 8.0, "unit": "record"}})
    assert cfg.max_grad_norm() == 0.5 and cfg.resolved() is cfg
    # A resolved FedMM config moved to another family keeps its explicit value (no silent change).
    moved = config_from_dict({**RunConfig().resolved().to_dict(), "model_family": "pf-msmtrec"})
    assert moved.max_grad_norm() == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, True, "2"])
def test_bad_clipping_norm_names_the_field(bad):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"privacy": {"max_grad_norm": bad}})
    assert e.value.field == "privacy.max_grad_norm"


def test_bad_model_calibrate_names_the_field():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"calibrate": "yes"}})
    assert e.value.field == "model.calibrate"


def test_references_need_synthetic_data():
    assert config_from_dict({"methods": ["fedmm", "fedmm_oracle", "oracle"]}).methods[1] == "fedmm_oracle"
    for ref in ("oracle", "fedmm_oracle"):
        with pytest.raises(ConfigError) as e:
            config_from_dict({"methods": ["fedmm", ref], "data": "xmrec:/nowhere"})
        assert e.value.field == "methods"


@pytest.mark.parametrize("model, field", [({"code_use": "both"}, "model.code_use"),
                                          ({"key_weights": "uniform"}, "model.key_weights"),
                                          ({"serve": "best"}, "model.serve")])
def test_unknown_model_choices_name_the_field(model, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": model})
    assert e.value.field == field


def test_private_by_default_at_the_default_target():
    from fedmm_secure.config import DEFAULT_EPSILON
    p = RunConfig().privacy
    assert p.enabled and p.epsilon is None and p.target_epsilon == DEFAULT_EPSILON
    assert RunConfig().resolved().privacy.epsilon == DEFAULT_EPSILON   # written out to config.json
    # A budget alone caps the target; a noise multiplier replaces it.
    assert config_from_dict({"privacy": {"epsilon_budget": 5}}).privacy.target_epsilon == 5
    assert config_from_dict({"privacy": {"noise_multiplier": 1.0}}).privacy.target_epsilon is None
    assert config_from_dict({"privacy": {"enabled": False}}).privacy.target_epsilon is None


@pytest.mark.parametrize("privacy, field", [
    ({"enabled": False, "epsilon": 8}, "privacy.epsilon"),
    ({"enabled": False, "epsilon_budget": 8}, "privacy.epsilon_budget"),
    ({"epsilon": 8, "noise_multiplier": 1.0}, "privacy.noise_multiplier"),
    ({"epsilon": 8, "epsilon_budget": 5}, "privacy.epsilon"),
    ({"epsilon": float("nan")}, "privacy.epsilon"),
    ({"epsilon": float("inf")}, "privacy.epsilon"),
    ({"delta": float("nan")}, "privacy.delta"),
    ({"enabled": "yes"}, "privacy.enabled"),
    ({"embedding_noise": "sprase"}, "privacy.embedding_noise"),
    ({"sparse_threshold": 2}, "privacy.sparse_threshold"),            # without embedding_noise: sparse
    ({"embedding_noise": "sparse", "sparse_selection_share": 1.0}, "privacy.sparse_selection_share"),
    ({"embedding_noise": "sparse", "sparse_selection_share": True}, "privacy.sparse_selection_share"),
    ({"embedding_noise": "sparse", "sparse_threshold": -1}, "privacy.sparse_threshold"),
    ({"embedding_noise": "sparse", "sparse_threshold": float("nan")}, "privacy.sparse_threshold"),
    ({"enabled": False, "embedding_noise": "sparse"}, "privacy.embedding_noise"),
])
def test_conflicting_or_non_finite_privacy_settings_name_the_field(privacy, field):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"privacy": privacy})
    assert e.value.field == field


def test_sparse_embedding_noise_defaults_and_settings():
    assert config_from_dict({}).privacy.sparse_settings is None
    p = config_from_dict({"privacy": {"embedding_noise": "sparse"}}).privacy
    assert p.sparse_settings == (0.2, 3.0)
    p = config_from_dict({"privacy": {"embedding_noise": "sparse", "sparse_selection_share": 0.4,
                                      "sparse_threshold": 5}}).privacy
    assert p.sparse_settings == (0.4, 5.0)
