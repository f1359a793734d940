"""`budget check` and `report` verify the run's ledger before they read an epsilon: on a real small
private run, every kind of tampering fails (exit 1, one line naming the first bad entry, never
PASS); an untouched run and a resumed run pass; a missing directory is bad input (exit 2)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmm_secure.cli import main
from fedmm_secure.privacy.events import SubsampledGaussianEvent
from fedmm_secure.privacy.ledger import Ledger

from ..privacy.ledger_tamper import (TABLES, drop_triggers, entries, forge_append, rechain, tamper,
                                     write_v1_ledger)
from .test_resume import TINY

SMALL = dict(TINY, rounds=2, model=dict(TINY["model"], vq_epochs=2))
STAGE_ROUNDS = SMALL["rounds"]   # FedMM: CF rounds 0..R-1 on the ledger, then CTR rounds R..2R-1


@pytest.fixture(scope="module")
def private_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("private-run")
    cfg = root / "cfg.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["run", "--config", str(cfg), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


@pytest.fixture
def run(private_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(private_run, copy)
    return copy


def _budget_check(capsys, run: Path, *extra: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = main(["budget", "check", str(run), "--max-epsilon", "1000", *extra])
    cap = capsys.readouterr()
    return code, cap.out, [ln for ln in cap.err.splitlines() if ln.strip()]


def _index(run: Path, table: str, pick: Callable[[list[tuple[int, dict]]], tuple[int, dict]]) -> int:
    return pick([(i, v) for i, t, v in entries(run) if t == table])[0]


def _index_and_row(run: Path, table: str, k: int) -> tuple[int, dict]:
    return [(i, v) for i, t, v in entries(run) if t == table][k]


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _write_results(run: Path, res: dict) -> None:
    (run / "results.json").write_text(json.dumps(res))


def test_untouched_run_passes_and_says_what_was_verified(run, capsys):
    code, out, err = _budget_check(capsys, run)
    assert code == 0 and err == []
    assert "-> PASS" in out and re.search(r"ledger ledger\.sqlite: verified: \d+ entries, head [0-9a-f]{16}, "
                                          r"head matches results\.json, unsigned", out)
    assert main(["report", str(run)]) == 0
    assert "hash-chained" in (run / "privacy_report.md").read_text()


# Each case tampers with the run and returns (what stderr must name, table or None).
def _edit_value(run):
    idx, ev = _index_and_row(run, "events", -1)
    fewer = {**json.loads(ev["event_json"]), "steps": 1}   # spend less than was spent
    tamper(run, ("UPDATE events SET event_json = ? WHERE id = ?", (json.dumps(fewer, sort_keys=True), idx)))
    return rf"entry {idx} \(events\): content does not match its hash"


def _delete_middle_row(run):
    idx = _index(run, "epsilons", lambda rows: rows[len(rows) // 2])
    tamper(run, ("DELETE FROM epsilons WHERE id = ?", (idx,)))
    return rf"entry {idx}: missing: deleted"


def _delete_last_rows(run):
    n = len(entries(run))
    tamper(run, *[f"DELETE FROM {t} WHERE id >= {n - 3}" for t in TABLES])
    return rf"entry {n - 3}: missing: the ledger ends after {n - 3} entries but results\.json anchors {n}"


def _swap_ids(run):
    ids = [i for i, t, _ in entries(run) if t == "events"]
    a, b = ids[1], ids[-1]
    tamper(run, f"UPDATE events SET id = -7 WHERE id = {a}", f"UPDATE events SET id = {a} WHERE id = {b}",
           f"UPDATE events SET id = {b} WHERE id = -7")
    return rf"entry {a} \(events\)"


def _insert_forged_row(run):
    ev = SubsampledGaussianEvent(0.01, 5.0, 1, "record")
    idx = forge_append(run, "events", {"round": 0, "market": "big", "event_json": json.dumps(ev.to_dict()),
                                       "at": 0.0})
    return rf"entry {idx} \(events\): entries after the {idx} results\.json anchors"


def _drop_triggers(run):
    drop_triggers(run)
    return r"schema \(\w+\): trigger \w+ is missing \(the append-only triggers were dropped\)"


def _review_attack(run):
    """The adversarial review's case: the CTR stage's events deleted, triggers dropped."""
    first = _index(run, "events", lambda rows: next(r for r in rows if r[1]["round"] >= STAGE_ROUNDS))
    tamper(run, f"DELETE FROM events WHERE round >= {STAGE_ROUNDS}")
    drop_triggers(run)
    return rf"entry {first}: missing: deleted"


def _rewritten_chain_old_anchor(run):
    tamper(run, f"DELETE FROM events WHERE round >= {STAGE_ROUNDS}")
    rechain(run)
    n = len(entries(run))
    return rf"entry {n}: missing: the ledger ends after {n} entries"


def _rewritten_chain_and_anchor(run):
    """A forger without any key rewrites the chain and the anchor but not the epsilons: the
    recorded epsilons no longer follow from the remaining events."""
    tamper(run, f"DELETE FROM events WHERE round >= {STAGE_ROUNDS}")
    rechain(run)
    res = _results(run)
    with Ledger.open(run) as led:
        res["ledger"].update(entries=led.entries, head=led.head_hash)
    _write_results(run, res)
    last_eps = _index(run, "epsilons", lambda rows: [r for r in rows if r[1]["market"] == "big"][-1])
    return rf"entry {last_eps} \(epsilons\): big reported epsilon [\d.]+ but the ledger's \d+ DP events give"


def _results_epsilon(run):
    res = _results(run)
    res["privacy"]["small"]["epsilon"] *= 0.8
    _write_results(run, res)
    idx = _index(run, "epsilons", lambda rows: [r for r in rows if r[1]["market"] == "small"][-1])
    return rf"entry {idx} \(epsilons\): results\.json reports for small epsilon"


def _results_per_round(run):
    res = _results(run)
    res["privacy"]["big"]["epsilon_per_round"][0] /= 2
    _write_results(run, res)
    return r"\(epsilons\): results\.json reports for big per-round epsilons that are not the ledger's"


def _results_steps(run):
    res = _results(run)
    res["privacy"]["big"]["steps"] -= 1
    _write_results(run, res)
    return r"\(epsilons\): results\.json reports for big \d+ DP steps"


def _results_without_anchor(run):
    res = _results(run)
    del res["ledger"]
    _write_results(run, res)
    return r"ledger\.sqlite: results\.json holds no head for this ledger"


def _results_missing(run):
    (run / "results.json").unlink()
    return r"results\.json is missing"


def _old_ledger(run):
    (run / "ledger.sqlite").unlink()
    write_v1_ledger(run)
    return r"ledger\.sqlite: ledger has no hash chain \(written by an older version\)"


CASES = [_edit_value, _delete_middle_row, _delete_last_rows, _swap_ids, _insert_forged_row, _drop_triggers,
         _review_attack, _rewritten_chain_old_anchor, _rewritten_chain_and_anchor, _results_epsilon,
         _results_per_round, _results_steps, _results_without_anchor, _results_missing, _old_ledger]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.strip("_") for c in CASES])
def test_tampering_fails_budget_check_and_report_naming_the_first_bad_entry(case, run, capsys):
    expected = case(run)
    code, out, err = _budget_check(capsys, run)
    assert code == 1, (out, err)
    assert "PASS" not in out and out.strip() == ""
    assert len(err) == 1 and err[0].startswith("fedmm-secure: error: ledger verification FAILED: "), err
    assert re.search(expected, err[0]), err[0]
    code = main(["report", str(run)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and re.search(expected, err[0])
    assert not (run / "privacy_report.md").exists()


def test_missing_directory_is_bad_input(tmp_path, capsys):
    code, _, err = _budget_check(capsys, tmp_path / "nowhere")
    assert code == 2 and len(err) == 1 and "no such directory" in err[0]


def test_over_budget_still_exits_1_after_verification(run, capsys):
    capsys.readouterr()
    assert main(["budget", "check", str(run), "--max-epsilon", "0.01"]) == 1
    assert "-> FAIL" in capsys.readouterr().out


def test_crashed_run_fails_until_resumed_then_passes(tmp_path, capsys, monkeypatch):
    """A run that crashed has no results.json to anchor its ledger: FAIL. `run --resume`
    continues the same chain and releases its head: PASS."""
    from fedmm_secure.runtime.embedded import EmbeddedSecureSum

    real = EmbeddedSecureSum.secure_sum

    def crash_in_round_1(self, *, label, round_id, vectors, max_abs):
        if round_id == 1:
            raise RuntimeError("simulated crash mid-round")
        return real(self, label=label, round_id=round_id, vectors=vectors, max_abs=max_abs)

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(SMALL))
    out = tmp_path / "run"
    monkeypatch.setattr(EmbeddedSecureSum, "secure_sum", crash_in_round_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["run", "--config", str(cfg), "--out", str(out), "--quiet"])
    monkeypatch.setattr(EmbeddedSecureSum, "secure_sum", real)
    before = len(entries(out))
    code, _, err = _budget_check(capsys, out)
    assert code == 1 and "results.json is missing" in err[0]

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    code, stdout, err = _budget_check(capsys, out)
    assert code == 0 and "-> PASS" in stdout and err == []
    rows = entries(out)
    assert [(i, v["kind"]) for i, t, v in rows if t == "runs"] == [(0, "create"), (before, "resume")]
    assert _results(out)["ledger"]["entries"] == len(rows)


def test_editing_config_json_does_not_make_a_reproducible_noise_run_pass(tmp_path, capsys):
    """config.json is outside the chain; the configuration the ledger's first entry commits to
    still says the noise was seeded."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**SMALL, "privacy": {**SMALL["privacy"], "randomness": "reproducible"}}))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "config.json").read_text())
    written["privacy"]["randomness"] = "secure"
    (out / "config.json").write_text(json.dumps(written))
    code, stdout, _ = _budget_check(capsys, out)
    assert code == 1 and "NOT PRIVATE" in stdout and "-> FAIL" in stdout
