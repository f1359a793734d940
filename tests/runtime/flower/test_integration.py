"""Real Flower Deployment Engine on loopback: SuperLink + 4 SuperNodes (+ market workers) as
processes, FedMM with masking; one market's processes are SIGKILLed in the middle of a masking
round and the round finishes through the masking dropout path.

Four markets, not three: each market's own rules (minimum cohort, threshold rule 2t > n + c with
the default c = 1) need t = 3, so of three markets none may drop and a killed market rightly
aborts the round. With four, t = 3 and the minimum cohort 3 leave room for one dropout.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("flwr")

from fedmm_secure.runtime.flower.local import FlowerLocalDeployment  # noqa: E402
from fedmm_secure.runtime.flower.processes import group_exists, marked_pids  # noqa: E402
from fedmm_secure.federation.fedmm.protocol import codebook_digest  # noqa: E402
from fedmm_secure.workflows.flower_local import tiny_flower_config  # noqa: E402

from .reference import DROP, embedded_codebooks  # noqa: E402

CFG4 = tiny_flower_config(markets=4, rounds=2, secagg="masking", seed=3)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flower_fedmm_with_killed_supernode(tmp_path):
    market, label, rnd, stage = DROP
    ref, _ = embedded_codebooks(CFG4)
    dep = FlowerLocalDeployment(CFG4, out_dir=tmp_path, stage_timeout=15.0, step_timeout=300.0,
                                hang_at={market: f"{label}:{rnd}:{stage}"})

    def kill_when_hung(d: FlowerLocalDeployment) -> None:
        if d.hang_marker(market).exists() and market not in d._killed:
            d.kill_market(market)

    t0 = time.monotonic()
    try:
        dep.start()
        dep.submit()
        res = dep.wait(timeout=500.0, on_poll=kill_when_hung)
    finally:
        groups = [p.pid for p in dep.groups.values()]
        dep.close()
    elapsed = time.monotonic() - t0
    print(f"flower integration: {elapsed:.1f} s")

    assert not [g for g in groups if group_exists(g)], "processes left behind"
    # including those Flower detaches from our groups (the SuperLink's SuperExec and ServerApp)
    assert not marked_pids(dep.marker), "detached Flower processes left behind"
    assert res["runtime"] == "flower"
    assert res["dropped"] == {market: f"{label} round {rnd} stage {stage}"}
    cb = [r for r in res["secagg"]["rounds"] if (r["label"], r["round_id"]) == (label, rnd)][0]
    assert cb["participants"] == ["m0", "m1", "m2", "m3"] and cb["survivors"] == ["m0", "m1", "m3"]
    assert set(k for k, v in res["markets"].items() if v) == {"m0", "m1", "m3"}
    for m in ("m0", "m1", "m3"):
        assert res["markets"][m]["fedmm"]["global_codebook_sha256"] == codebook_digest(ref[m])
