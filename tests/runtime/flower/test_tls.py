"""The documented production settings on loopback: SuperLink with TLS and SuperNode
authentication, SuperNodes with the CA and their registered ECDSA keys. A secure sum runs; a
SuperNode with an unregistered key, and one without TLS, are refused by the SuperLink."""

from __future__ import annotations

import signal
import time

import pytest

pytest.importorskip("flwr")

from fedmm_secure.runtime.flower.local import FlowerLocalDeployment  # noqa: E402
from fedmm_secure.runtime.flower.pki import node_key_pair  # noqa: E402
from fedmm_secure.runtime.flower.processes import free_port, killpg, tool  # noqa: E402
from fedmm_secure.workflows.flower_local import tiny_flower_config  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tls_and_supernode_authentication(tmp_path):
    cfg = tiny_flower_config(markets=2, rounds=1, secagg="masking", seed=0)
    rogue_key = node_key_pair(tmp_path / "rogue")
    with FlowerLocalDeployment(cfg, out_dir=tmp_path / "out",
                               workload={"name": "secure-sum", "length": 200, "rounds": 2}) as dep:
        tls = dep.use_loopback_tls(tmp_path / "pki")
        dep.start()
        intruders = {
            "rogue": [tool("flower-supernode"), "--root-certificates", str(tls.ca),
                      "--auth-supernode-private-key", str(rogue_key[0])],
            "plain": [tool("flower-supernode"), "--insecure"],
        }
        procs = {name: dep._spawn(name, [*cmd, "--superlink", f"127.0.0.1:{dep.link_port}", "--host", "127.0.0.1",
                                         "--port", str(free_port()), "--isolation", "process", "--max-retries", "2"],
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
                killpg(p.pid, signal.SIGKILL)
    assert res["dropped"] == {} and set(res["markets"]) == {"m0", "m1"}
    for m in ("m0", "m1"):
        assert res["markets"][m]["rounds"] == 2 and res["markets"][m]["max_abs_error"] < 1e-6
    # Only the two registered SuperNodes took part; the others were refused and gave up.
    assert all(p.returncode not in (None, 0, -signal.SIGKILL) for p in procs.values())
    assert "Failed to activate SuperNode" in (tmp_path / "out" / "flower_logs" / "rogue.log").read_text()
