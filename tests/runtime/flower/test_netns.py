"""The aggregator and every market on a machine of its own, as far as the network goes.

Each part of the deployment runs in its own Linux network namespace: the SuperLink (with its
ServerApp and the ``flwr`` CLI) in one, each market's SuperNode and worker in another, joined
by veth pairs to a bridge in the SuperLink's namespace, on a private subnet. Markets reach the
SuperLink only over those veth addresses, with TLS and SuperNode authentication, as separate
machines on a LAN would; a market's SuperNode and worker talk over their own namespace's
loopback. Needs root and ``ip netns`` (skipped elsewhere); every namespace the test creates is
deleted in a ``finally``, and no traffic leaves them (no address or route in the host's).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedmm_secure.runtime.flower.local import FlowerLocalDeployment, Placement  # noqa: E402
from fedmm_secure.workflows.flower_local import tiny_flower_config  # noqa: E402


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    probe = f"fedmm-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if r.returncode != 0:
        return f"ip netns unavailable: {r.stderr.decode(errors='replace').strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_WHY = _netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=str(_WHY))]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _net_ns_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


@pytest.mark.timeout(600)
def test_aggregator_and_markets_in_separate_network_namespaces_with_tls(tmp_path):
    markets = ["m0", "m1", "m2"]
    tag = uuid.uuid4().hex[:6]
    link_ns, ns = f"fedmm-{tag}-link", {m: f"fedmm-{tag}-{m}" for m in markets}
    subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
    link_ip = f"{subnet}.1"
    created: list[str] = []
    try:
        for name in (link_ns, *ns.values()):
            _ip("netns", "add", name)
            created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", link_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", link_ns, "addr", "add", f"{link_ip}/24", "dev", "br0")
        _ip("-n", link_ns, "link", "set", "br0", "up")
        for i, m in enumerate(markets):
            # Both ends are made inside the namespaces: nothing appears in the host's.
            _ip("-n", link_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns[m])
            _ip("-n", link_ns, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", ns[m], "addr", "add", f"{subnet}.{10 + i}/24", "dev", "eth0")
            _ip("-n", ns[m], "link", "set", "eth0", "up")
        # The SuperLink serves on the bridge address only: a market cannot reach it on loopback.
        placement = Placement(link_host=link_ip,
                              prefix={"superlink": ["ip", "netns", "exec", link_ns],
                                      **{m: ["ip", "netns", "exec", ns[m]] for m in markets}})
        cfg = tiny_flower_config(markets=len(markets), rounds=1, secagg="masking", seed=0)
        with FlowerLocalDeployment(cfg, out_dir=tmp_path / "out", placement=placement,
                                   workload={"name": "secure-sum", "length": 300, "rounds": 2}) as dep:
            dep.use_loopback_tls(tmp_path / "pki")
            dep.start()
            dep.submit()
            res = dep.wait(timeout=400)
            where = {name: _net_ns_of(p.pid) for name, p in dep.groups.items()}
            dials = {m: Path(f"/proc/{dep.groups[f'supernode-{m}'].pid}/cmdline").read_bytes().split(b"\0")
                     for m in markets}
            pinned = dep.pinned_rosters()
        assert res["dropped"] == {} and set(res["markets"]) == set(markets)
        for m in markets:
            assert res["markets"][m]["rounds"] == 2 and res["markets"][m]["max_abs_error"] < 1e-6
        # Every market's processes share a namespace of their own, none the SuperLink's or ours.
        ours = _net_ns_of(os.getpid())
        spaces = {where["superlink"], *(where[f"worker-{m}"] for m in markets)}
        assert len(spaces) == 1 + len(markets) and ours not in spaces
        assert all(where[f"supernode-{m}"] == where[f"worker-{m}"] for m in markets)
        assert len(set(pinned.values())) == 1 and None not in pinned.values()
        # ... and dialled the SuperLink at its veth address, over TLS.
        for m in markets:
            args = dials[m]
            assert args[args.index(b"--superlink") + 1].startswith(f"{link_ip}:".encode())
            assert b"--root-certificates" in args and b"--insecure" not in args
    finally:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert not any(n.startswith(f"fedmm-{tag}") for n in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
