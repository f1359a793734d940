"""A party's long-term identity key on disk, and the roster file a market pins.

``fedmm-secure keys new --out FILE`` writes ``FILE`` (the Ed25519 private key, PKCS#8 PEM, mode
0600, created with that mode so it is never readable by others even briefly) and ``FILE.pub``
(one line, ``ssh-ed25519 AAAA...``). Loading refuses, with one :class:`ConfigError` line each, a
missing file, a file that group or others may read or write (as ``ssh`` does: a key others could
read is a key others may hold), a corrupt or encrypted file and a key that is not Ed25519.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from ...errors import ConfigError, ProtocolError
from ...primitives.keys import IdentityPrivateKey, IdentityPublicKey
from ...secagg.identity import IdentityRoster

__all__ = ["write_identity_key", "read_identity_key", "read_public_key", "read_roster", "write_roster",
           "public_key_path"]


def public_key_path(private: Path) -> Path:
    """Where the public half of ``private`` lives: the same name plus ``.pub``."""
    return private.with_name(private.name + ".pub")


def _create(path: Path, data: bytes, mode: int, what: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(what, f"{path} already exists", allowed="a new path (keys are never overwritten)") from None
    except OSError as e:
        raise ConfigError(what, f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_identity_key(path: Path, key: IdentityPrivateKey | None = None) -> tuple[Path, IdentityPublicKey]:
    """A new identity key (or ``key``) at ``path`` (0600) and its public key at ``path.pub``;
    returns the public key file and the public key. Existing files are never overwritten."""
    path = Path(path)
    key = IdentityPrivateKey.generate() if key is None else key
    pub = public_key_path(path)
    if pub.exists():
        raise ConfigError("--out", f"{pub} already exists", allowed="a new path (keys are never overwritten)")
    _create(path, key.to_pkcs8_pem(), 0o600, "--out")
    public = key.public_key()
    _create(pub, (public.to_openssh() + "\n").encode("ascii"), 0o644, "--out")
    return pub, public


def read_identity_key(path: Path, *, flag: str = "--identity-key") -> IdentityPrivateKey:
    """The identity key in ``path``; :class:`ConfigError` (one line) when it is missing, open to
    group or others, corrupt, encrypted or not Ed25519."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(flag, f"{path} does not exist", allowed="a key file from `fedmm-secure keys new`") from None
    except OSError as e:
        raise ConfigError(flag, f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(flag, f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(flag, f"{path} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o})",
                          allowed="mode 0600: chmod 600 the file")
    try:
        return IdentityPrivateKey.from_pkcs8_pem(path.read_bytes())
    except ProtocolError as e:
        raise ConfigError(flag, f"{path}: {e}") from None
    except OSError as e:
        raise ConfigError(flag, f"cannot read {path}: {e.strerror}") from None


def _read_text(path: Path, *, flag: str, encoding: str) -> str:
    # Public files (keys, rosters): one ConfigError line naming the flag for every way reading fails.
    try:
        return path.read_text(encoding=encoding)
    except FileNotFoundError:
        raise ConfigError(flag, f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or f"not {'ASCII' if encoding == 'ascii' else encoding.upper()}"
        raise ConfigError(flag, f"cannot read {path}: {reason}") from None


def read_public_key(path: Path, *, flag: str = "--market") -> IdentityPublicKey:
    """The public key in ``path`` (a ``.pub`` file from ``keys new``)."""
    path = Path(path)
    text = _read_text(path, flag=flag, encoding="ascii")
    try:
        return IdentityPublicKey.from_openssh(text)
    except ProtocolError as e:
        raise ConfigError(flag, f"{path}: {e}") from None


def read_roster(path: Path, *, flag: str = "--roster") -> IdentityRoster:
    """The identity roster in ``path`` (JSON, :meth:`IdentityRoster.to_json`)."""
    path = Path(path)
    text = _read_text(path, flag=flag, encoding="utf-8")
    try:
        return IdentityRoster.from_json(text)
    except ConfigError as e:
        raise ConfigError(flag, f"{path}: {e}") from None


def write_roster(path: Path, markets: Mapping[str, IdentityPublicKey], aggregator: IdentityPublicKey) -> IdentityRoster:
    """An identity roster of ``markets`` and ``aggregator`` written to ``path`` (public, 0644)."""
    roster = IdentityRoster(dict(markets), aggregator=aggregator)
    Path(path).write_text(roster.to_json(), encoding="utf-8")
    return roster
