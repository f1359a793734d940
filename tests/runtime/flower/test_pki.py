"""Throwaway loopback PKI: the SuperLink certificate chains to the CA and names 127.0.0.1,
private keys are 0600 from creation, each market has its own SuperNode key, nothing is reused."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmm_secure.errors import ConfigError
from fedmm_secure.runtime.flower.pki import loopback_tls


def test_certificate_chain_keys_and_modes(tmp_path):
    tls = loopback_tls(tmp_path / "pki", ["m0", "m1", "m2"])
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    link = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    link.verify_directly_issued_by(ca)   # raises if the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not link.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == link.public_key().public_numbers()
    assert set(tls.node_keys) == {"m0", "m1", "m2"}
    pubs = set()
    for priv, pub in tls.node_keys.values():
        k = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
        assert isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name == "secp384r1"
        assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(pub.read_bytes()).public_numbers() == k.public_key().public_numbers()
        pubs.add(pub.read_text())
        assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert len(pubs) == 3
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600


def test_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "pki").mkdir()
    with pytest.raises(ConfigError):
        loopback_tls(tmp_path / "pki", ["m0"])
