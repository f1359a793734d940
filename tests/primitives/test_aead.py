import pytest

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.primitives.aead import NONCE_SIZE, OVERHEAD, open_sealed, seal
from fedmm_secure.primitives.keys import SymmetricKey


def test_roundtrip_and_random_nonce():
    k = SymmetricKey.generate()
    c1 = seal(k, b"secret shares", associated_data=b"ad")
    c2 = seal(k, b"secret shares", associated_data=b"ad")
    assert c1[:NONCE_SIZE] != c2[:NONCE_SIZE] and c1 != c2
    assert len(c1) == len(b"secret shares") + OVERHEAD
    assert open_sealed(k, c1, associated_data=b"ad") == b"secret shares"
    assert open_sealed(k, seal(k, b"", associated_data=b""), associated_data=b"") == b""


def test_every_flipped_bit_position_is_detected():
    k = SymmetricKey.generate()
    ct = seal(k, b"0123456789", associated_data=b"ad")
    for i in range(len(ct)):
        bad = bytearray(ct)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            open_sealed(k, bytes(bad), associated_data=b"ad")


@pytest.mark.parametrize("cut", [0, 1, NONCE_SIZE, OVERHEAD - 1, OVERHEAD + 3])
def test_truncation_is_detected(cut):
    k = SymmetricKey.generate()
    ct = seal(k, b"0123456789", associated_data=b"ad")
    with pytest.raises(IntegrityError):
        open_sealed(k, ct[:cut], associated_data=b"ad")


def test_wrong_key_or_associated_data():
    k = SymmetricKey.generate()
    ct = seal(k, b"x", associated_data=b"ad")
    with pytest.raises(IntegrityError):
        open_sealed(SymmetricKey.generate(), ct, associated_data=b"ad")
    with pytest.raises(IntegrityError):
        open_sealed(k, ct, associated_data=b"ae")
    with pytest.raises(IntegrityError):
        open_sealed(k, ct + b"\x00", associated_data=b"ad")


def test_raw_bytes_are_not_keys():
    with pytest.raises(ProtocolError):
        seal(b"\x00" * 32, b"x", associated_data=b"")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        seal(SymmetricKey.generate(), b"x", associated_data=b"", entropy=lambda n: b"\x00" * (n - 1))
