"""Typed key objects over pyca/cryptography.

Raw key bytes never cross a module boundary: callers hold :class:`IdentityPrivateKey`,
:class:`AgreementPrivateKey` or :class:`SymmetricKey` objects, and only *public* keys have a
byte form. Secret keys refuse to be printed with their bytes or pickled, so they cannot leak into
a log, a results file or a pickle-based transport by accident.

* Identity keys (Ed25519) are long-term and sign protocol messages.
* Agreement keys (X25519) are per round; :meth:`AgreementPrivateKey.derive` turns an X25519
  shared secret into a :class:`SymmetricKey` through HKDF-SHA256 with an explicit, mandatory
  context label, so the same key pair can never yield the same key for two purposes.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          PublicFormat, load_pem_private_key,
                                                          load_ssh_public_key)

from ..errors import IntegrityError, ProtocolError

__all__ = [
    "IdentityPrivateKey",
    "IdentityPublicKey",
    "AgreementPrivateKey",
    "AgreementPublicKey",
    "SymmetricKey",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "SYMMETRIC_KEY_SIZE",
]

PUBLIC_KEY_SIZE = 32     # Ed25519 and X25519 raw public keys
SIGNATURE_SIZE = 64      # Ed25519
SYMMETRIC_KEY_SIZE = 32  # 256-bit keys for AES-256-GCM / AES-256-CTR

# Fixed HKDF salt: domain separation comes from the mandatory context (RFC 5869 permits a
# constant salt; the X25519 output already has high entropy).
_SALT = b"fedmm-secure/v1/hkdf-salt"

Entropy = Callable[[int], bytes]


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _draw(entropy: Entropy | None, n: int) -> bytes | None:
    if entropy is None:
        return None
    out = entropy(n)
    if not isinstance(out, (bytes, bytearray)) or len(out) != n:
        raise ProtocolError(f"entropy source must return exactly {n} bytes")
    return bytes(out)


def _check_context(context: bytes) -> bytes:
    if not isinstance(context, (bytes, bytearray)) or len(context) == 0:
        raise ProtocolError("a non-empty bytes context label is required for key derivation")
    return bytes(context)


class _Secret:
    """Mixin: secret material is neither printable nor picklable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (secret)>"

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(f"{type(self).__name__} holds secret material and cannot be pickled")

    def __copy__(self) -> object:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __deepcopy__(self, memo: object) -> object:
        raise TypeError(f"{type(self).__name__} cannot be copied")


class SymmetricKey(_Secret):
    """A 256-bit secret key. Opaque: use it through :mod:`.aead`, :mod:`.prg` or :meth:`derive`."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        # Constructed from bytes only inside primitives (HKDF output, Shamir reconstruction).
        if not isinstance(key, (bytes, bytearray)) or len(key) != SYMMETRIC_KEY_SIZE:
            raise ProtocolError(f"symmetric key must be {SYMMETRIC_KEY_SIZE} bytes")
        self._key = bytes(key)

    @classmethod
    def generate(cls, *, entropy: Entropy | None = None) -> SymmetricKey:
        return cls(_draw(entropy, SYMMETRIC_KEY_SIZE) or os.urandom(SYMMETRIC_KEY_SIZE))

    def derive(self, *, context: bytes) -> SymmetricKey:
        """Sub-key for one purpose (HKDF-SHA256, ``context`` as info)."""
        return SymmetricKey(_hkdf(self._key, _check_context(context)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SymmetricKey):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    __hash__ = None  # type: ignore[assignment]  # keys are not dictionary keys

    # hazmat: raw bytes for the AEAD / PRG / Shamir layers of this package only.
    def _hazmat_bytes(self) -> bytes:
        return self._key


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SYMMETRIC_KEY_SIZE, salt=_SALT, info=info).derive(secret)


class IdentityPublicKey:
    """Long-term Ed25519 verification key (what the roster holds)."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._raw = _raw_public(key)

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityPublicKey:
        if not isinstance(data, (bytes, bytearray)) or len(data) != PUBLIC_KEY_SIZE:
            raise IntegrityError()
        try:
            return cls(Ed25519PublicKey.from_public_bytes(bytes(data)))
        except ValueError:
            raise IntegrityError() from None

    def to_bytes(self) -> bytes:
        return self._raw

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`IntegrityError` unless ``signature`` is valid for ``data``."""
        if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_SIZE:
            raise IntegrityError()
        try:
            self._key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            raise IntegrityError() from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdentityPublicKey) and self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"IdentityPublicKey({self._raw.hex()[:16]}...)"

    def to_openssh(self) -> str:
        """One line, ``ssh-ed25519 AAAA...``: the form key files and roster files hold."""
        return self._key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")

    @classmethod
    def from_openssh(cls, text: str) -> IdentityPublicKey:
        """Parse :meth:`to_openssh` output; anything but an Ed25519 key raises
        :class:`ProtocolError` naming what was found."""
        try:
            key = load_ssh_public_key(str(text).strip().encode("ascii"))
        except Exception:  # ValueError, UnicodeEncodeError, UnsupportedAlgorithm (unknown type)
            raise ProtocolError("not an OpenSSH public key line (ssh-ed25519 AAAA...)") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ProtocolError(f"an identity key must be Ed25519, found {type(key).__name__}")
        return cls(key)


class IdentityPrivateKey(_Secret):
    """Long-term Ed25519 signing key of one market."""

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls, *, entropy: Entropy | None = None) -> IdentityPrivateKey:
        """From OS randomness, or from ``entropy`` (32 bytes; for reproducible tests)."""
        seed = _draw(entropy, 32)
        if seed is None:
            return cls(Ed25519PrivateKey.generate())
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def public_key(self) -> IdentityPublicKey:
        return IdentityPublicKey(self._key.public_key())

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(bytes(data))

    # Deliberate export for a key file (written 0600 by the caller): the only way the long-term
    # secret leaves this object, so a market keeps one identity across runs and its public key
    # can be pinned before any run.
    def to_pkcs8_pem(self) -> bytes:
        """The key as unencrypted PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``)."""
        return self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    @classmethod
    def from_pkcs8_pem(cls, data: bytes) -> IdentityPrivateKey:
        """Parse :meth:`to_pkcs8_pem` output. Corrupt, encrypted or non-Ed25519 keys raise
        :class:`ProtocolError` (never echoing the bytes)."""
        try:
            key = load_pem_private_key(bytes(data), password=None)
        except TypeError:
            raise ProtocolError("the private key is encrypted; identity keys are stored unencrypted "
                                "(protect the file with its mode, 0600)") from None
        except Exception:  # ValueError, UnsupportedAlgorithm: not a PEM private key we can read
            raise ProtocolError("not a PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ProtocolError(f"an identity key must be Ed25519, found {type(key).__name__}")
        return cls(key)


class AgreementPublicKey:
    """X25519 public key (per round)."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: X25519PublicKey) -> None:
        self._key = key
        self._raw = _raw_public(key)

    @classmethod
    def from_bytes(cls, data: bytes) -> AgreementPublicKey:
        if not isinstance(data, (bytes, bytearray)) or len(data) != PUBLIC_KEY_SIZE:
            raise IntegrityError()
        try:
            return cls(X25519PublicKey.from_public_bytes(bytes(data)))
        except ValueError:
            raise IntegrityError() from None

    def to_bytes(self) -> bytes:
        return self._raw

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AgreementPublicKey) and self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"AgreementPublicKey({self._raw.hex()[:16]}...)"


class AgreementPrivateKey(_Secret):
    """X25519 private key (fresh per round)."""

    __slots__ = ("_key",)

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls, *, entropy: Entropy | None = None) -> AgreementPrivateKey:
        seed = _draw(entropy, 32)
        if seed is None:
            return cls(X25519PrivateKey.generate())
        return cls(X25519PrivateKey.from_private_bytes(seed))

    def public_key(self) -> AgreementPublicKey:
        return AgreementPublicKey(self._key.public_key())

    def derive(self, peer: AgreementPublicKey, *, context: bytes) -> SymmetricKey:
        """X25519 with ``peer``, then HKDF-SHA256 with ``context`` as info.

        A low-order peer key gives an all-zero shared secret (contributory behaviour fails);
        that is an attack, not a key, so it raises :class:`IntegrityError`.
        """
        if not isinstance(peer, AgreementPublicKey):
            raise ProtocolError("peer must be an AgreementPublicKey")
        info = _check_context(context)
        try:
            shared = self._key.exchange(peer._key)
        except ValueError:  # OpenSSL rejects the all-zero output itself
            raise IntegrityError() from None
        if not any(shared):
            raise IntegrityError()
        return SymmetricKey(_hkdf(shared, info))

    # hazmat: the 32-byte private scalar, for Shamir-sharing it (dropout recovery).
    def _hazmat_bytes(self) -> bytes:
        return self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    @classmethod
    def _hazmat_from_bytes(cls, data: bytes) -> AgreementPrivateKey:
        if not isinstance(data, (bytes, bytearray)) or len(data) != 32:
            raise IntegrityError()
        return cls(X25519PrivateKey.from_private_bytes(bytes(data)))
