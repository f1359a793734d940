import copy
import pickle

import pytest

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.primitives.keys import (AgreementPrivateKey, AgreementPublicKey,
                                          IdentityPrivateKey, IdentityPublicKey, SymmetricKey)


def test_agreement_is_symmetric_and_context_bound():
    a, b = AgreementPrivateKey.generate(), AgreementPrivateKey.generate()
    k_ab = a.derive(b.public_key(), context=b"ctx-1")
    assert k_ab == b.derive(a.public_key(), context=b"ctx-1")
    assert k_ab != a.derive(b.public_key(), context=b"ctx-2")
    c = AgreementPrivateKey.generate()
    assert k_ab != a.derive(c.public_key(), context=b"ctx-1")


def test_derive_requires_context():
    a, b = AgreementPrivateKey.generate(), AgreementPrivateKey.generate()
    with pytest.raises(ProtocolError):
        a.derive(b.public_key(), context=b"")
    with pytest.raises(ProtocolError):
        SymmetricKey.generate().derive(context=b"")


def test_low_order_peer_key_is_rejected():
    a = AgreementPrivateKey.generate()
    with pytest.raises(IntegrityError):
        a.derive(AgreementPublicKey.from_bytes(bytes(32)), context=b"x")


@pytest.mark.parametrize("cls", [AgreementPublicKey, IdentityPublicKey])
@pytest.mark.parametrize("data", [b"", bytes(31), bytes(33), "x" * 32])
def test_public_keys_check_length(cls, data):
    with pytest.raises(IntegrityError):
        cls.from_bytes(data)


def test_public_key_roundtrip():
    a = AgreementPrivateKey.generate().public_key()
    assert AgreementPublicKey.from_bytes(a.to_bytes()) == a
    i = IdentityPrivateKey.generate().public_key()
    assert IdentityPublicKey.from_bytes(i.to_bytes()) == i


def test_sign_verify_and_tamper():
    sk = IdentityPrivateKey.generate()
    pk = IdentityPublicKey.from_bytes(sk.public_key().to_bytes())
    sig = sk.sign(b"message")
    pk.verify(sig, b"message")
    with pytest.raises(IntegrityError):
        pk.verify(sig, b"messagf")
    bad = bytearray(sig)
    bad[5] ^= 1
    with pytest.raises(IntegrityError):
        pk.verify(bytes(bad), b"message")
    with pytest.raises(IntegrityError):
        pk.verify(sig[:-1], b"message")
    with pytest.raises(IntegrityError):
        IdentityPrivateKey.generate().public_key().verify(sig, b"message")


def test_secrets_do_not_leak_via_repr_pickle_or_copy():
    key = SymmetricKey.generate()
    raw = key._hazmat_bytes()
    for secret in (key, AgreementPrivateKey.generate(), IdentityPrivateKey.generate()):
        assert "secret" in repr(secret)
        with pytest.raises(TypeError):
            pickle.dumps(secret)
        with pytest.raises(TypeError):
            copy.deepcopy(secret)
    assert raw.hex() not in repr(key) and raw.hex() not in str(key)


def test_entropy_makes_generation_reproducible_and_is_checked():
    src = lambda n: b"\x07" * n  # noqa: E731
    a1 = AgreementPrivateKey.generate(entropy=src)
    a2 = AgreementPrivateKey.generate(entropy=src)
    assert a1.public_key() == a2.public_key()
    assert IdentityPrivateKey.generate(entropy=src).public_key() == \
        IdentityPrivateKey.generate(entropy=src).public_key()
    assert SymmetricKey.generate(entropy=src) == SymmetricKey(b"\x07" * 32)
    with pytest.raises(ProtocolError):
        SymmetricKey.generate(entropy=lambda n: b"\x00")


def test_subkeys_differ_by_context():
    k = SymmetricKey.generate()
    assert k.derive(context=b"a") != k.derive(context=b"b")
    assert k.derive(context=b"a") == k.derive(context=b"a")
    assert k.derive(context=b"a") != k
    with pytest.raises(ProtocolError):
        SymmetricKey(b"short")


# -- persistent identity keys (key files) --------------------------------------------------------

def test_identity_key_pem_and_public_line_round_trip():
    key = IdentityPrivateKey.generate()
    again = IdentityPrivateKey.from_pkcs8_pem(key.to_pkcs8_pem())
    key.public_key().verify(again.sign(b"x"), b"x")
    line = key.public_key().to_openssh()
    assert line.startswith("ssh-ed25519 ") and "\n" not in line
    assert IdentityPublicKey.from_openssh(line + "\n") == key.public_key()


def test_foreign_key_material_is_refused_without_echoing_it():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    with pytest.raises(ProtocolError, match="must be Ed25519"):
        IdentityPrivateKey.from_pkcs8_pem(pem)
    ssh = ec_key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(ProtocolError, match="must be Ed25519"):
        IdentityPublicKey.from_openssh(ssh)
    for junk in (b"", b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"):
        with pytest.raises(ProtocolError) as e:
            IdentityPrivateKey.from_pkcs8_pem(junk)
        assert "AA==" not in str(e.value)
    with pytest.raises(ProtocolError, match="OpenSSH"):
        IdentityPublicKey.from_openssh("ssh-ed25519 not-base64!")
