"""On Flower each market signs its ledger with its persistent identity key, and `budget check
--roster` checks every ledger's signatures against the pinned roster's keys."""

from __future__ import annotations

from fedmm_secure.cli import main
from fedmm_secure.errors import AbortError, ProtocolError
from fedmm_secure.primitives.keys import IdentityPrivateKey
from fedmm_secure.privacy.ledger import Ledger, verify_ledger
from fedmm_secure.reports.run_report import write_json_atomic
from fedmm_secure.runtime.flower.coordinator import Coordinator, InProcessLinks
from fedmm_secure.runtime.flower.keyfiles import write_roster
from fedmm_secure.runtime.flower.worker import MarketWorker
from fedmm_secure.secagg.identity import IdentityRoster

from .reference import CFG, OPTS, private_rules
from .test_coordinator import _private

NAMES = ("m0", "m1", "m2")


def _signed_run(run_dir, *, sign=True):
    cfg = _private(CFG, 4.0)
    ids = {m: IdentityPrivateKey.generate() for m in NAMES}
    agg = IdentityPrivateKey.generate()
    roster = IdentityRoster({m: k.public_key() for m, k in ids.items()}, aggregator=agg.public_key())
    workers = {m: MarketWorker(market=m, rules=private_rules(cfg), ledger_dir=run_dir / "ledgers" / m,
                               identity=ids[m] if sign else None) for m in NAMES}
    res = Coordinator(cfg=cfg, run_id="signed", links=InProcessLinks(workers), stage_timeout=1,
                      step_timeout=60, backend_options=OPTS).run()
    write_json_atomic(run_dir / "results.json", res)
    write_roster(run_dir / "roster.json", roster.markets, roster.aggregator)
    return ids, roster


def _check(run_dir, roster_file, capsys):
    code = main(["budget", "check", str(run_dir), "--max-epsilon", "4", "--roster", str(roster_file)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_flower_ledgers_are_signed_and_checked_against_the_roster(tmp_path, capsys):
    ids, roster = _signed_run(tmp_path)
    for m in NAMES:
        with Ledger.open(tmp_path / "ledgers" / m) as led:
            assert led.signed
        assert verify_ledger(tmp_path / "ledgers" / m, public_key=ids[m].public_key()).signatures_checked
    code, out = _check(tmp_path, tmp_path / "roster.json", capsys)
    assert code == 0, out
    # A roster with m1's key swapped: m1's ledger names another signer, the check fails (exit 1).
    write_roster(tmp_path / "other.json", {**roster.markets, "m1": IdentityPrivateKey.generate().public_key()},
                 roster.aggregator)
    code, out = _check(tmp_path, tmp_path / "other.json", capsys)
    assert code == 1 and "ledgers/m1/ledger.sqlite" in out and "different signer" in out
    # A roster without m2: refused as bad input (exit 2, one line).
    write_roster(tmp_path / "short.json", {m: roster.markets[m] for m in ("m0", "m1")}, roster.aggregator)
    code, out = _check(tmp_path, tmp_path / "short.json", capsys)
    assert code == 2 and "no key on the roster" in out and len(out.strip().splitlines()) == 1


def test_unsigned_flower_ledgers_fail_a_roster_check(tmp_path, capsys):
    # Workers without an identity key keep unsigned ledgers (as before): the chain verifies, but
    # a check that asks for the roster's signatures fails.
    _signed_run(tmp_path, sign=False)
    assert main(["budget", "check", str(tmp_path), "--max-epsilon", "4"]) == 0
    capsys.readouterr()
    code, out = _check(tmp_path, tmp_path / "roster.json", capsys)
    assert code == 1 and "without a signer" in out


class _Errors(InProcessLinks):
    def __init__(self, workers):
        super().__init__(workers)
        self.errors = {m: [] for m in workers}

    def _call(self, m, kind, payload):
        out = super()._call(m, kind, payload)
        if out[0] == "error":
            self.errors[m].append(out[1].decode(errors="replace"))
        return out


def _resume(run_dir, keys):
    cfg = _private(CFG, 4.0)
    workers = {m: MarketWorker(market=m, rules=private_rules(cfg), ledger_dir=run_dir / "ledgers" / m,
                               resume=True, identity=keys[m]) for m in NAMES}
    links = _Errors(workers)
    try:
        Coordinator(cfg=cfg, run_id="signed-resumed", links=links, stage_timeout=1, step_timeout=60,
                    backend_options=OPTS).run()
    except (AbortError, ProtocolError):
        pass
    return links


def test_a_resumed_run_continues_each_ledger_under_its_market_key(tmp_path):
    ids, _ = _signed_run(tmp_path)
    entries = {}
    for m in NAMES:
        with Ledger.open(tmp_path / "ledgers" / m) as led:
            entries[m] = led.entries
    # m0's worker restarted with another key: it refuses to continue its ledger.
    links = _resume(tmp_path, {**ids, "m0": IdentityPrivateKey.generate()})
    assert any("not the one this ledger was created with" in e for e in links.errors["m0"])
    with Ledger.open(tmp_path / "ledgers" / "m0") as led:
        assert led.entries == entries["m0"]
    # With its own key every market continues, and every ledger still verifies under its key.
    links = _resume(tmp_path, ids)
    assert not any(links.errors.values()), links.errors
    for m in NAMES:
        with Ledger.open(tmp_path / "ledgers" / m) as led:
            assert led.entries > entries[m]
        assert verify_ledger(tmp_path / "ledgers" / m, public_key=ids[m].public_key()).ok
