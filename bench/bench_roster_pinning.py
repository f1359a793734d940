"""What pre-run roster pinning costs a market, against one masking round in the same process.

Per run, a pinning market parses the identity roster the aggregator's ``hello`` carries and checks
its digest, signs its per-run bundle (one Ed25519 signature), and at ``start`` checks n market
endorsements and the aggregator's (n + 1 verifications). ``flower local`` also makes n + 1 key
files and the roster before it starts anything. The anchor is the median market's CPU time for
one masking round of the Flower benchmark's size (n markets, 16 640 values:
``bench/bench_flower.py``), measured interleaved with the pinning work (7 repeats, medians),
all as CPU time of this thread (other jobs' time slices excluded).

    .venv/bin/python -m pytest bench/bench_roster_pinning.py -s -p no:cacheprovider
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from fedmm_secure.benchmarks.masking import time_round
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.runtime.flower.keyfiles import write_identity_key, write_roster
from fedmm_secure.runtime.flower.rules import MarketRules, pinned_roster_at_hello
from fedmm_secure.secagg import Roster
from fedmm_secure.secagg.identity import AGGREGATOR_ROLE, IdentityRoster, check_session_roster, endorse

LENGTH = 256 * 64 + 256
REPEATS = 7


def _cpu(fn) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def _pinning_work(n: int):
    names = [f"m{i}" for i in range(n)]
    ids = {m: IdentityPrivateKey.generate() for m in names}
    agg = IdentityPrivateKey.generate()
    roster = IdentityRoster({m: k.public_key() for m, k in ids.items()}, aggregator=agg.public_key())
    offered = roster.to_json()
    bundles = {m: IdentityPrivateKey.generate().public_key().to_bytes() for m in names}
    agg_bundle = IdentityPrivateKey.generate().public_key().to_bytes()
    ends = {m: endorse(ids[m], run_id="r", backend="masking", name=m, bundle=bundles[m]) for m in names}
    agg_end = endorse(agg, run_id="r", backend="masking", name=AGGREGATOR_ROLE, bundle=agg_bundle,
                      role=AGGREGATOR_ROLE)
    session = Roster(bundles, aggregator=agg_bundle)
    rules = MarketRules(roster_digest=roster.digest())

    def market() -> None:   # one market's whole pinning work in one run
        pinned_roster_at_hello(rules, offered, market="m0", identity=ids["m0"])
        endorse(ids["m0"], run_id="r", backend="masking", name="m0", bundle=bundles["m0"])
        check_session_roster(roster, session, ends, aggregator_endorsement=agg_end, run_id="r",
                             backend="masking")

    def launcher() -> None:  # flower local's keys and roster, made before any process starts
        with tempfile.TemporaryDirectory() as d:
            pubs = {m: write_identity_key(Path(d) / m)[1] for m in names}
            _, a = write_identity_key(Path(d) / "aggregator")
            write_roster(Path(d) / "roster.json", pubs, a)

    return market, launcher


def test_roster_pinning_cost_against_one_masking_round():
    load_before = os.getloadavg()[0]
    rows = []
    for n in (5, 10):
        market, launcher = _pinning_work(n)
        time_round(n, LENGTH)   # warm-up
        anchor, pin, launch = [], [], []
        for _ in range(REPEATS):
            anchor.append(time_round(n, LENGTH)["client_cpu_s"])
            pin.append(_cpu(market))
            launch.append(_cpu(launcher))
        ratio = statistics.median(p / a for p, a in zip(pin, anchor))
        rows.append((n, statistics.median(anchor) * 1e3, statistics.median(pin) * 1e3, ratio,
                     statistics.median(launch) * 1e3))
        assert ratio < 1.0, "pinning should cost less than one secure round per run"
    load_after = os.getloadavg()[0]
    print(f"\nroster pinning, CPU time of this thread, {REPEATS} interleaved repeats, medians; "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    print("| n | one masking round, market (ms) | pinning per market per run (ms) | ratio | flower local keys + roster (ms) |")
    print("|---|---|---|---|---|")
    for n, a, p, r, lnc in rows:
        print(f"| {n} | {a:.2f} | {p:.2f} | {r:.2f}x | {lnc:.2f} |")
