"""Joint FedMM design: shared-key items get one level-1 code everywhere, methods have the
fields they claim, and the secure sums carry only the documented labels."""

import dataclasses

import numpy as np
import pytest
import torch

from fedmm_secure.config import ModelConfig
from fedmm_secure.data.synthetic import MarketSpec, SyntheticConfig, generate_markets
from fedmm_secure.federation import fedmm
from fedmm_secure.runtime.embedded import EmbeddedSecureSum

SPECS = (MarketSpec("a", 60, 40, 8), MarketSpec("b", 50, 30, 8), MarketSpec("c", 40, 25, 8))
MODEL = ModelConfig(latent_dim=4, n_global=8, n_local=4, ctr_dim=8, ctr_hidden=(8,), batch_size=64,
                    vq_epochs=2, vq_rounds=2)


@pytest.fixture(scope="module")
def markets():
    ms = generate_markets(SyntheticConfig(markets=SPECS), seed=0)
    # Public keys: the first 20 products of every market are the same 20 products; the rest
    # are listed by one market only.
    # A product's public attributes are the same wherever it is listed.
    out = []
    for m in ms:
        keys = np.array([f"p{i}" if i < 20 else f"{m.name}-only-{i}" for i in range(m.n_items)])
        feats = m.item_features.copy()
        feats[:20] = ms[0].item_features[:20]
        out.append(dataclasses.replace(m, item_keys=keys, item_features=feats))
    return out


class _Recording(EmbeddedSecureSum):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.labels: list[str] = []

    def secure_sum(self, *, label, round_id, vectors, max_abs):
        self.labels.append(label)
        return super().secure_sum(label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)


def _run(method, markets, ss=None):
    return fedmm.run_method(method, markets, MODEL, rounds=2, seed=0, secure_sum=ss)


def test_same_key_same_level1_code_by_construction(markets):
    ss = _Recording(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    out = _run("fedmm", markets, ss)
    assert out["code_alignment"]["pairs"] == 3 * 20
    assert out["code_alignment"]["same_code_rate"] == 1.0
    assert set(ss.labels) == {"ctr-init", "ctr-keys", "ctr-shared", "code-input-stats", "rqvae-shared",
                              "codebook-l1"} - {"ctr-init"}  # broadcasts are not sums


def test_methods_have_the_fields_they_claim(markets):
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fields = {meth: [n for n, *_ in _run(meth, markets, ss if meth in ("fedavg", "fedmm") else None)
                     ["runs"]["a"].columns] for meth in ("local", "local_codes", "fedavg", "fedmm")}
    attrs = ["iattr0", "iattr1", "uattr0", "uattr1"]
    assert fields["local"] == ["user", "item", *attrs]             # public attributes, no sharing
    assert fields["fedavg"] == ["user", "item", *attrs, "key"]     # shared keys, no codes
    assert fields["local_codes"] == ["user", "item", *attrs, "key", "code1", "code2"]
    assert fields["fedmm"] == ["user", "item", *attrs, "key", "code1", "code2"]


def test_level1_code_is_a_field_of_every_item_and_its_table_is_shared(markets):
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    assert MODEL.code_use == "field"   # the default
    # Serve the last averaged model, so every shared table is the average in every market.
    cfg = dataclasses.replace(MODEL, select_by_validation=False, serve="select")
    out = fedmm.run_method("fedmm", markets, cfg, rounds=3, seed=0, secure_sum=ss)
    n_shared = 20
    for m in markets:
        r = out["runs"][m.name]
        cols = {n: (c, card) for n, _, c, card in r.columns}
        np.testing.assert_array_equal(cols["code1"][0], r.codes[0])
        assert cols["code1"][1] == MODEL.n_global
        # The key table holds shared products and the "listed only here" row, no code rows.
        assert cols["key"][1] == n_shared + 1
        assert np.all(cols["key"][0][:20] < n_shared) and np.all(cols["key"][0][20:] == n_shared)
    tables = {m.name: out["runs"][m.name].ctr for m in markets}
    first = tables["a"]
    for name in ("b", "c"):
        for part in ("embeddings", "linear"):
            torch.testing.assert_close(getattr(tables[name], part)["code1"].weight,
                                       getattr(first, part)["code1"].weight)
        # The level-2 code table is the market's own.
        assert not torch.equal(tables[name].embeddings["code2"].weight, first.embeddings["code2"].weight)


def test_code_use_key_backs_unshared_items_by_their_level1_code_row(markets):
    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    cfg = dataclasses.replace(MODEL, code_use="key")
    out = fedmm.run_method("fedmm", markets, cfg, rounds=3, seed=0, secure_sum=ss)
    r = out["runs"]["a"]
    assert [n for n, *_ in r.columns][-2:] == ["key", "code2"]
    key = dict((n, c) for n, _, c, _ in r.columns)["key"]
    n_shared = 20
    np.testing.assert_array_equal(key[20:], n_shared + 1 + r.codes[0][20:])
    assert np.all(key[:20] < n_shared)


class _Keys(EmbeddedSecureSum):
    """Records every market's shared-key upload."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.uploads: list[dict] = []

    def secure_sum(self, *, label, round_id, vectors, max_abs):
        if label == "ctr-keys":
            self.uploads.append({m: np.array(v) for m, v in vectors.items()})
        return super().secure_sum(label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)


def test_count_weights_are_each_markets_interactions_with_the_product(markets):
    from fedmm_secure.federation.catalogue import count_weights

    ss = _Keys(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    assert MODEL.key_weights == "counts"   # the default
    out = fedmm.run_method("fedmm", markets, MODEL, rounds=2, seed=0, secure_sum=ss)
    n_shared = 20
    for m in markets:
        r = out["runs"][m.name]
        assert r.history["key_weights"] == "counts"
        key = dict((n, c) for n, _, c, _ in r.columns)["key"]
        pos = m.train.click > 0
        counts = np.bincount(key[m.train.items[pos]], minlength=key.max() + 1)[:n_shared]
        for up in ss.uploads:   # every round's upload carries the same weights
            weights = up[m.name][-(len(up[m.name]) // (MODEL.ctr_dim + 2)):]
            np.testing.assert_allclose(weights[:n_shared], count_weights(counts))
    # Size weights are one number per market, whatever the product.
    ss = _Keys(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    fedmm.run_method("fedmm", markets, dataclasses.replace(MODEL, key_weights="size"), rounds=1, seed=0, secure_sum=ss)
    w = ss.uploads[0]["a"][-(len(ss.uploads[0]["a"]) // (MODEL.ctr_dim + 2)):]
    assert np.unique(w[:n_shared]).size == 1


def test_fedmm_oracle_reads_the_true_clusters_as_level1_codes(markets):
    from fedmm_secure.errors import ConfigError

    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    k = int(max(m.item_cluster.max() for m in markets)) + 1
    cfg = dataclasses.replace(MODEL, n_global=k, select_by_validation=False, serve="select")   # serve the coded model
    out = fedmm.run_method("fedmm_oracle", markets, cfg, rounds=2, seed=0, secure_sum=ss)
    assert out["nmi_level1_pooled"] == 1.0
    for m in markets:
        r = out["runs"][m.name]
        np.testing.assert_array_equal(r.codes[0], m.item_cluster)
        np.testing.assert_array_equal(dict((n, c) for n, _, c, _ in r.columns)["code1"], m.item_cluster)
    with pytest.raises(ConfigError, match="n_global"):
        fedmm.run_method("fedmm_oracle", markets, dataclasses.replace(MODEL, n_global=k - 1), rounds=1, seed=0,
                         secure_sum=ss)
    with pytest.raises(ConfigError, match="joint design"):
        fedmm.run_method("fedmm_oracle", markets, dataclasses.replace(cfg, design="staged"), rounds=1, seed=0,
                         secure_sum=ss)
    no_truth = [dataclasses.replace(m, item_cluster=None) for m in markets]
    with pytest.raises(ConfigError, match="ground-truth"):
        fedmm.run_method("fedmm_oracle", no_truth, cfg, rounds=1, seed=0, secure_sum=ss)


def test_a_federated_market_serves_the_logit_mean_of_a_rounds_local_and_averaged_models(markets):
    from fedmm_secure.federation.fedmm.evaluation import logits
    from fedmm_secure.federation.fedmm.features import ctr_inputs
    from fedmm_secure.models import LogitMean

    ss = EmbeddedSecureSum(backend="plain", markets=[m.name for m in markets], run_id="t", allow_insecure=True)
    assert MODEL.serve == "ensemble"   # the default
    # Selection off: every market serves its last round's pair.
    cfg = dataclasses.replace(MODEL, select_by_validation=False)
    out = fedmm.run_method("fedmm", markets, cfg, rounds=2, seed=0, secure_sum=ss)
    shared = {m.name: out["runs"][m.name].ctr.members[1] for m in markets}
    for m in markets:
        r = out["runs"][m.name]
        assert isinstance(r.ctr, LogitMean) and len(r.ctr.members) == 2
        local, averaged = r.ctr.members
        x = ctr_inputs(r, m.test, True)
        np.testing.assert_allclose(logits(r.ctr, x), (logits(local, x) + logits(averaged, x)) / 2, rtol=1e-5, atol=1e-6)
        # The same round's pair: the market's own tables are equal, the averaged ones are not.
        torch.testing.assert_close(local.embeddings["item"].weight, averaged.embeddings["item"].weight)
        torch.testing.assert_close(local.embeddings["user"].weight, averaged.embeddings["user"].weight)
        assert not torch.equal(local.embeddings["code1"].weight, averaged.embeddings["code1"].weight)
        torch.testing.assert_close(averaged.embeddings["code1"].weight, shared["a"].embeddings["code1"].weight)
    # Without DP comparisons are exact and free: each round offers its local model, its averaged
    # model and their ensemble, every candidate after the first compared with the kept one.
    exact = fedmm.run_method("fedmm", markets, MODEL, rounds=2, seed=0, secure_sum=ss)
    for m in markets:
        assert len(exact["runs"][m.name].history["valid_selection"]) == 3 * 2 - 1
    # Without federation there is one model a round: `local` serves a plain CTR model.
    alone = fedmm.run_method("local", markets, MODEL, rounds=2, seed=0, secure_sum=ss)
    assert not any(isinstance(alone["runs"][m.name].ctr, LogitMean) for m in markets)
