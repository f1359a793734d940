"""The documented production settings on loopback: SuperLink with TLS and SuperNode
authentication, SuperNodes with the CA and their registered ECDSA keys. A secure sum runs; a
SuperNode with an unregistered key, and one without TLS, are refused by the SuperLink."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from fedmm_secure.runtime.flower_local import (  # noqa: E402
    FlowerLocalDeployment,
    FlowerTLS,
    _free_port,
    _killpg,
    _tool,
    tiny_flower_config,
)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_key, issuer_name, *, ca: bool, san=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _node_key(path: Path) -> tuple[Path, Path]:
    k = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption()))
    pub = path.with_suffix(".pub")
    pub.write_bytes(k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return path, pub


def _tls_files(d: Path, markets) -> tuple[FlowerTLS, tuple[Path, Path]]:
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmm test CA")])
    ca = _cert("fedmm test CA", ca_key, ca_key, ca_name, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", srv_key, ca_key, ca_name, ca=False,
                san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(_pem_key(srv_key))
    keys = {m: _node_key(d / f"node_{m}") for m in markets}
    return FlowerTLS(ca=d / "ca.crt", cert=d / "server.crt", key=d / "server.key", node_keys=keys), \
        _node_key(d / "rogue")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tls_and_supernode_authentication(tmp_path):
    cfg = tiny_flower_config(markets=2, rounds=1, secagg="masking", seed=0)
    tls, rogue_key = _tls_files(tmp_path / "pki", ["m0", "m1"])
    with FlowerLocalDeployment(cfg, out_dir=tmp_path / "out", tls=tls,
                               workload={"name": "secure-sum", "length": 200, "rounds": 2}) as dep:
        dep.start()
        intruders = {
            "rogue": [_tool("flower-supernode"), "--root-certificates", str(tls.ca),
                      "--auth-supernode-private-key", str(rogue_key[0])],
            "plain": [_tool("flower-supernode"), "--insecure"],
        }
        procs = {name: dep._spawn(name, [*cmd, "--superlink", f"127.0.0.1:{dep.link_port}", "--host", "127.0.0.1",
                                         "--port", str(_free_port()), "--isolation", "process", "--max-retries", "2"],
                                  env=dep._env(name))
                 for name, cmd in intruders.items()}
        try:
            dep.submit()
            res = dep.wait(timeout=200)
            deadline = time.monotonic() + 60
            while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for p in procs.values():
                _killpg(p.pid, signal.SIGKILL)
    assert res["dropped"] == {} and set(res["markets"]) == {"m0", "m1"}
    for m in ("m0", "m1"):
        assert res["markets"][m]["rounds"] == 2 and res["markets"][m]["max_abs_error"] < 1e-6
    # Only the two registered SuperNodes took part; the others were refused and gave up.
    assert all(p.returncode not in (None, 0, -signal.SIGKILL) for p in procs.values())
    assert "Failed to activate SuperNode" in (tmp_path / "out" / "flower_logs" / "rogue.log").read_text()
