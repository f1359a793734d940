"""Identity key files and roster files: written private, refused when open, corrupt or foreign."""

from __future__ import annotations

import os

import pytest

from fedmm_secure.errors import ConfigError
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.runtime.flower import worker
from fedmm_secure.runtime.flower.keyfiles import (public_key_path, read_identity_key, read_public_key,
                                                  read_roster, write_identity_key, write_roster)


def test_key_file_round_trip_with_mode_0600(tmp_path):
    key = IdentityPrivateKey.generate()
    pub_path, public = write_identity_key(tmp_path / "us.key", key)
    assert pub_path == public_key_path(tmp_path / "us.key") == tmp_path / "us.key.pub"
    assert os.stat(tmp_path / "us.key").st_mode & 0o777 == 0o600
    loaded = read_identity_key(tmp_path / "us.key")
    assert loaded.public_key() == key.public_key() == public == read_public_key(pub_path)
    sig = loaded.sign(b"m")
    key.public_key().verify(sig, b"m")   # the same secret, not just the same public key


def test_key_files_are_never_overwritten(tmp_path):
    write_identity_key(tmp_path / "k")
    with pytest.raises(ConfigError, match="already exists"):
        write_identity_key(tmp_path / "k")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_open_to_group_or_others_is_refused(tmp_path, mode):
    write_identity_key(tmp_path / "k")
    os.chmod(tmp_path / "k", mode)
    with pytest.raises(ConfigError, match="group or others"):
        read_identity_key(tmp_path / "k")


def _foreign_keys():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
    pem = serialization.Encoding.PEM
    fmt, enc = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    return {
        "not Ed25519 (EC)": ec.generate_private_key(ec.SECP256R1()).private_bytes(pem, fmt, enc),
        "not Ed25519 (X25519)": x25519.X25519PrivateKey.generate().private_bytes(pem, fmt, enc),
        "encrypted": ed25519.Ed25519PrivateKey.generate().private_bytes(
            pem, fmt, serialization.BestAvailableEncryption(b"pw")),
        "corrupt": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "empty": b"",
        "a public key": IdentityPrivateKey.generate().public_key().to_openssh().encode(),
    }


@pytest.mark.parametrize("what", list(_foreign_keys()))
def test_corrupt_or_wrong_type_key_files_are_refused(tmp_path, what):
    path = tmp_path / "k"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, _foreign_keys()[what])
    os.close(fd)
    with pytest.raises(ConfigError) as e:
        read_identity_key(path)
    assert "--identity-key" in str(e.value) and "\n" not in str(e.value)
    assert "PRIVATE" not in str(e.value)   # the key's bytes are never echoed


def test_missing_key_and_directory_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_identity_key(tmp_path / "nope")
    (tmp_path / "d").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_identity_key(tmp_path / "d")


def test_roster_file_round_trip_and_bad_rosters(tmp_path):
    keys = {m: IdentityPrivateKey.generate().public_key() for m in ("US", "DE", "FR")}
    agg = IdentityPrivateKey.generate().public_key()
    roster = write_roster(tmp_path / "roster.json", keys, agg)
    assert read_roster(tmp_path / "roster.json").digest() == roster.digest()
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not an identity roster"):
        read_roster(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        read_roster(tmp_path / "junk.json")
    with pytest.raises(ConfigError, match="share one identity key"):
        write_roster(tmp_path / "dup.json", {"US": keys["US"], "DE": keys["US"]}, agg)


def _worker_args(tmp_path, *extra):
    return ["--market", "m0", "--listen", "127.0.0.1:1", *extra]


@pytest.mark.parametrize("setup, flags, needle", [
    ("open", ["--identity-key", "{k}"], "group or others"),
    ("corrupt", ["--identity-key", "{k}"], "not a PEM private key"),
    ("missing", ["--identity-key", "{k}"], "does not exist"),
    ("ok", ["--identity-key", "{k}", "--roster-sha256", "zz"], "64 hex digits"),
    ("ok", ["--roster", "{k}.pub"], "not JSON"),
    ("ok", ["--roster-sha256", "00" * 32], "needs its identity key"),
    ("ok", ["--privacy-json", "nope"], "--privacy-json: not JSON"),
])
def test_worker_refuses_bad_key_material_with_one_line_exit_2(tmp_path, capsys, setup, flags, needle):
    k = tmp_path / "k"
    if setup in ("open", "ok"):
        write_identity_key(k)
        if setup == "open":
            os.chmod(k, 0o644)
    elif setup == "corrupt":
        fd = os.open(k, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"garbage")
        os.close(fd)
    with pytest.raises(SystemExit) as e:
        worker.main(_worker_args(tmp_path, *[f.format(k=k) for f in flags]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
