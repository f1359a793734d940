"""The privacy report of a run that trained several DP methods (``local``, ``fedavg``, ``fedmm``
on the same markets) shows every method's ledger, round by round, in the HTML, Markdown and JSON
outputs, and its per-market summary keeps the deployed method's spend next to the total over
methods: no baseline ledger's spend replaces the deployed one's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedmm_secure.privacy.events import SubsampledGaussianEvent
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.reports.report_data import gather_privacy_report
from fedmm_secure.reports.run_verification import RunVerification, require_verified_run

from .test_html_report import BUDGETED, _page, _run

METHODS = ["local", "fedavg", "fedmm"]
# fedavg exists in the joint design only; the budget still refuses a round of the small market.
THREE = dict(BUDGETED, methods=METHODS, model=dict(BUDGETED["model"], design="joint"))
LEDGERS = {"fedmm": "ledger.sqlite", "local": "baselines/local/ledger.sqlite",
           "fedavg": "baselines/fedavg/ledger.sqlite"}


@pytest.fixture(scope="module")
def three_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("three"), THREE)


def _ledger_epsilons(run: Path) -> dict[tuple[str, str, int], float]:
    out = {}
    for method, rel in LEDGERS.items():
        with Ledger.open(run / rel) as led:
            out.update({(method, r.market, r.round): r.epsilon for r in led.epsilons()})
    return out


def test_every_ledgers_rounds_are_in_html_json_and_markdown(three_run):
    eps = _ledger_epsilons(three_run)
    assert {k[0] for k in eps} == set(METHODS)
    # HTML: method, market, round, stage, status, q, sigma, steps, unit, epsilon after, decision, refusal
    cells = [c for _, c in _page(three_run).tables["rounds"]]
    assert {(c[0], c[1], int(c[2])): c[9] for c in cells} == {k: f"{v:.4f}" for k, v in eps.items()}
    assert len(cells) == len(eps)
    data = json.loads((three_run / "privacy_report.json").read_text())
    assert {(r["method"], r["market"], r["round"]): r["epsilon_after"] for r in data["rounds"]} == eps
    assert {r["method"]: r["ledger"] for r in data["rounds"]} == LEDGERS
    md = (three_run / "privacy_report.md").read_text()
    for (method, market, rnd), e in eps.items():
        # Training rounds, and each market's full-batch releases (the shared-key counts of the
        # sharing methods, validation reads) in rounds of their own.
        assert any(f"| {method} | `{LEDGERS[method]}` | {market} | {rnd} | {stage} |" in md
                   for stage in ("CTR", "KEY-COUNTS", "CTR-SELECT", "CALIBRATE"))
    # Each method's refused round is shown as refused, in its own group.
    refused = {(c[0], c[1]) for cls, c in _page(three_run).tables["rounds"] if "refused" in cls}
    assert refused == {(m, "small") for m in METHODS}


def test_rows_are_grouped_deployed_method_first_then_market_then_round(three_run):
    rows = json.loads((three_run / "privacy_report.json").read_text())["rounds"]
    keys = [(r["method"], r["market"], r["round"]) for r in rows]
    order = {"fedmm": 0, "local": 1, "fedavg": 2}
    assert keys == sorted(keys, key=lambda k: (order[k[0]], k[1], k[2]))
    classes = [cls for cls, _ in _page(three_run).tables["rounds"]]
    groups = [(k[0], k[1]) for k in keys]
    starts = [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]]
    assert [i for i, c in enumerate(classes) if "group" in c.split()] == starts


def test_market_summary_is_the_deployed_spend_next_to_the_total(three_run):
    data = json.loads((three_run / "privacy_report.json").read_text())
    total = json.loads((three_run / "results.json").read_text())["accounting"]["total"]
    with Ledger.open(three_run) as led:
        deployed = {m: rep.epsilon for m, rep in led.spent().items()}
    assert data["deployed_method"] == "fedmm" and data["methods"] == ["fedmm", "local", "fedavg"]
    for m, v in data["markets"].items():
        assert v["epsilon"] == deployed[m] and v["method"] == "fedmm"
        assert v["total_epsilon"] == pytest.approx(total[m]["epsilon"]) and v["total_epsilon"] > v["epsilon"]
        assert set(v["by_method"]) == set(METHODS)
        # The deployed ledger's rounds of this market, not the sum over ledgers: 2 CTR rounds, the
        # per-product count release, the Platt fit (the served ensemble compares nothing).
        assert v["rounds"] == 2 + 1 + 1
    row = {c[0]: c for _, c in _page(three_run).tables["markets"]}["big"]
    assert row[1] == f"{deployed['big']:.4f}" and row[2] == f"{total['big']['epsilon']:.4f}"


def test_a_baseline_ledger_that_spent_more_does_not_replace_the_deployed_spend(three_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_run, run)
    base = run / LEDGERS["local"]
    with Ledger.open(base) as led:
        last = max(r.round for r in led.rounds())
        led.record_round_start(last + 1, ["big"])
        led.record_event("big", last + 1, SubsampledGaussianEvent(0.5, 0.6, 500, "record"))
        led.commit_round(last + 1)
    verified = require_verified_run(three_run)   # the copy's heads no longer match results.json
    data = gather_privacy_report(run, RunVerification(ok=True, problem=None, ledgers=verified.ledgers))
    with Ledger.open(run) as led:
        deployed = led.spent()["big"].epsilon
    with Ledger.open(base) as led:
        local = led.spent()["big"].epsilon
    big = data["markets"]["big"]
    assert local > deployed + 1
    assert big["epsilon"] == deployed and big["by_method"]["local"]["epsilon"] == local
    assert big["by_method"]["fedmm"]["epsilon"] == deployed
