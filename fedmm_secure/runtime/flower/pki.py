"""TLS settings of a Flower deployment and a throwaway PKI for a loopback one (``flower local --tls``).

:class:`FlowerTLS` names the files a deployment's SuperLink and SuperNodes use.

A fresh CA signs the SuperLink's certificate (SAN ``localhost``, ``127.0.0.1`` and any address
the SuperLink serves on) and every SuperNode gets its own ECDSA P-384 key pair (OpenSSH format,
what ``flwr supernode register`` and ``--auth-supernode-private-key`` take). Keys are generated
here, written with mode 0600 and never reused: this is for exercising the production settings on
one machine, not a CA for a real federation (there, each market keeps its own key and the
operator's CA signs the link).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError

__all__ = ["FlowerTLS", "loopback_tls", "node_key_pair"]


@dataclass(frozen=True)
class FlowerTLS:
    """TLS for the SuperLink and SuperNode authentication (files on disk, PEM / OpenSSH).

    ``ca``: the CA that signed ``cert`` (the SuperLink's certificate; it needs a SAN for
    127.0.0.1); ``node_keys``: market -> (private key, public key) of its SuperNode (ECDSA,
    ``ssh-keygen -t ecdsa -b 384``), registered with the SuperLink before the SuperNode starts.
    """

    ca: Path
    cert: Path
    key: Path
    node_keys: Mapping[str, tuple[Path, Path]]


def _write(path: Path, data: bytes, *, private: bool) -> Path:
    # Created with the final mode, so a private key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def node_key_pair(path: Path) -> tuple[Path, Path]:
    """A SuperNode key: ``path`` (private, OpenSSH) and ``path.pub`` (public, OpenSSH)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    priv = _write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()), private=True)
    pub = _write(path.with_suffix(".pub"), key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH),
                 private=False)
    return priv, pub


def loopback_tls(directory: Path, markets: Iterable[str], *, days: int = 1,
                 hosts: Iterable[str] = ()) -> FlowerTLS:
    """CA, SuperLink certificate and one SuperNode key pair per market, in a new ``directory``;
    the certificate names ``localhost``, 127.0.0.1 and every address in ``hosts``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    if directory.exists():
        raise ConfigError("tls", f"{directory} already exists", allowed="a new directory (keys are never reused)")
    directory.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer_key, issuer: x509.Name, *, ca: bool, san=None) -> x509.Certificate:
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmm-secure loopback CA")])
    ca = cert("fedmm-secure loopback CA", ca_key, ca_key, ca_name, ca=True)
    link_key = ec.generate_private_key(ec.SECP256R1())
    link = cert("localhost", link_key, ca_key, ca_name, ca=False,
                san=[x509.DNSName("localhost"),
                     *(x509.IPAddress(ipaddress.ip_address(h)) for h in dict.fromkeys(["127.0.0.1", *hosts]))])
    pem = serialization.Encoding.PEM
    ca_path = _write(directory / "ca.crt", ca.public_bytes(pem), private=False)
    cert_path = _write(directory / "superlink.crt", link.public_bytes(pem), private=False)
    key_path = _write(directory / "superlink.key",
                      link_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                      private=True)
    nodes = {m: node_key_pair(directory / f"supernode_{m}") for m in markets}
    return FlowerTLS(ca=ca_path, cert=cert_path, key=key_path, node_keys=nodes)
