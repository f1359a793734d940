"""`fedmm-secure report` writes a self-contained HTML page and a JSON twin of it: on real small
runs, the per-round table is the ledger's, the plot is embedded, nothing external is loaded,
text from files is escaped, and a NOT PRIVATE / NOT SECURE run says so. With a Chromium on
PATH the page is also rendered by a real browser and the screenshot must not be blank."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedmm_secure.cli import main
from fedmm_secure.privacy.ledger import Ledger
from fedmm_secure.reports.html_report import render_html_report

from ..cli.test_resume import TINY

ROUNDS = 2   # FedMM: CF rounds 0..1 on the ledger, then CTR rounds 2..3
# A budget the small market reaches during the CTR stage, so the run has refused rounds.
BUDGETED = dict(TINY, rounds=ROUNDS, methods=["local", "fedmm"], model=dict(TINY["model"], vq_epochs=2, design="staged"),
                privacy=dict(TINY["privacy"], epsilon_budget=5.0))
INSECURE = dict(TINY, rounds=1, model=dict(TINY["model"], vq_epochs=1), secagg="plain",
                privacy=dict(TINY["privacy"], randomness="reproducible"))
HOSTILE = '<script>alert("x")</script><img src="https://example.invalid/x.png">'


def _run(root: Path, cfg: dict) -> Path:
    (root / "cfg.json").write_text(json.dumps(cfg))
    assert main(["run", "--config", str(root / "cfg.json"), "--out", str(root / "run"), "--quiet"]) == 0
    assert main(["report", str(root / "run")]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def budgeted_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("budgeted"), BUDGETED)


@pytest.fixture(scope="module")
def insecure_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("insecure"), INSECURE)


class _Page(HTMLParser):
    """Tables by id (rows of cell texts, with each row's class), every src/href, every tag."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, list[str]]]] = {}
        self.refs: list[str] = []
        self.tags: set[str] = set()
        self._table: str | None = None
        self._row: list[str] | None = None
        self._row_class = ""
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table:
            self._row, self._row_class = [], a.get("class") or ""
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row:
                self.tables.setdefault(self._table, []).append((self._row_class, self._row))
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _page(run: Path) -> _Page:
    p = _Page()
    p.feed((run / "privacy_report.html").read_text(encoding="utf-8"))
    return p


def test_round_rows_are_the_ledgers(budgeted_run):
    page = _page(budgeted_run)
    rows = page.tables["rounds"]
    with Ledger.open(budgeted_run) as led:
        eps = {(r.round, r.market): r.epsilon for r in led.epsilons()}
        refused = {(d.round, d.market) for d in led.decisions() if not d.allowed}
        steps: dict[tuple[int, str], int] = {}
        full_batch = set()   # validation releases (model selection, calibration): q = 1
        for e in led.event_records():
            steps[(e.round, e.market)] = steps.get((e.round, e.market), 0) + e.event.steps
            if e.event.sample_rate == 1:
                full_batch.add(e.round)
    # method, market, round, stage, status, q, sigma, steps, unit, epsilon after, decision, refusal
    seen = {(int(c[2]), c[1]): (cls, c) for cls, c in rows if c[0] == "fedmm"}
    assert {c[0] for _, c in rows} == {"fedmm", "local"}   # the baseline's ledger rounds are shown too
    assert set(seen) == set(eps)
    assert refused, "the budget was meant to refuse some CTR rounds"
    training = sorted({r for r, _ in eps} - full_batch)
    for key, (cls, cells) in seen.items():
        if key[0] in full_batch:
            assert cells[3] == ("CALIBRATE" if cells[7] == "3" else "CTR-SELECT") and cells[5] == "1"
        else:
            assert cells[3] == ("CF" if training.index(key[0]) < ROUNDS else "CTR")
        assert cells[9] == f"{eps[key]:.4f}"
        assert cells[7] == str(steps.get(key, 0))
        assert ("REFUSED" in cells[10]) == (key in refused) == ("refused" in cls.split())
        if key not in refused:
            assert cells[8] == "record" and (cells[6] == "1") == (key[0] not in full_batch)
    # The JSON twin holds the same rows, unformatted.
    data = json.loads((budgeted_run / "privacy_report.json").read_text())
    mine = [r for r in data["rounds"] if r["method"] == "fedmm"]
    assert {(r["round"], r["market"]): r["epsilon_after"] for r in mine} == eps
    assert {(r["round"], r["market"]) for r in mine if r["refused"]} == refused
    res = json.loads((budgeted_run / "results.json").read_text())
    assert data["privacy_by_method"] == res["privacy_by_method"]
    assert [c[0] for _, c in page.tables["by-method"]] == ["local", "fedmm"]


def test_page_is_self_contained_and_states_chain_and_settings(budgeted_run):
    page = _page(budgeted_run)
    assert "script" not in page.tags and "link" not in page.tags
    assert page.refs and all(r.startswith("data:image/png;base64,") for r in page.refs)
    for ref in page.refs:
        assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # One row per ledger: the deployed method's, then each baseline's (every DP method is accounted).
    rows = {c[0]: c for _, c in page.tables["ledgers"]}
    assert set(rows) == {"ledger.sqlite", "baselines/local/ledger.sqlite"}
    assert rows["baselines/local/ledger.sqlite"][1] == "verified"
    ledger = rows["ledger.sqlite"]
    with Ledger.open(budgeted_run) as led:
        assert ledger[0] == "ledger.sqlite" and ledger[1] == "verified"
        assert ledger[2] == str(led.entries) and ledger[3] == led.head_hash and ledger[5] == "unsigned"
    text = " ".join(page.text)
    assert "NOT PRIVATE" not in text and "NOT SECURE" not in text
    guarantee = {c[0]: c[1] for _, c in page.tables["guarantee"]}
    assert guarantee["unit of privacy"] == "record-level" and guarantee["delta"] == "1e-05"
    assert guarantee["accountant"] == "pld (certified upper bound)" and guarantee["certified"] == "yes"
    assert guarantee["secure aggregation"].startswith("masking")
    assert (budgeted_run / "epsilon_per_round.png").stat().st_size > 10_000


def test_not_private_and_not_secure_run_says_so(insecure_run):
    text = " ".join(_page(insecure_run).text)
    assert "NOT PRIVATE" in text and "NOT SECURE" in text
    data = json.loads((insecure_run / "privacy_report.json").read_text())
    assert data["randomness"]["private"] is False and data["secure_aggregation"]["secure"] is False


def test_audits_in_the_run_are_listed_and_file_text_is_escaped(budgeted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(budgeted_run, run)
    (run / "audits").mkdir()
    (run / "audits" / "mine.json").write_text(json.dumps({
        "kind": "fedmm_secure.audit_report", "attack": "loss", "delta": 1e-5, "confidence": 0.95,
        "any_violation": False, "results": [{"market": "big", "attack": HOSTILE, "auc": 0.51,
                                             "epsilon_lower_bound": {"epsilon_lower_bound": 0.42},
                                             "accountant_epsilon": 2.5, "violation": False, "verdict": HOSTILE}]}))
    assert main(["report", str(run)]) == 0
    page = _page(run)
    assert "script" not in page.tags and all(r.startswith("data:") for r in page.refs)
    [(_, row)] = page.tables["audits"]
    assert row[:2] == ["audits/mine.json", "big"] and row[4:6] == ["0.420", "2.500"] and HOSTILE in row


def test_any_shape_of_cross_method_totals_renders(budgeted_run):
    data = json.loads((budgeted_run / "privacy_report.json").read_text())
    data["privacy_totals"] = {"privacy_total": {"big": {"epsilon": 4.5, "methods": ["local", "fedmm"]},
                                                "small": HOSTILE}}
    data["total_across_methods"] = {"deployed_method": "fedmm", "markets": {
        "big": {"epsilon": 4.25, "infinite": False, "deployed_epsilon": 3.5, "delta": 1e-5, "accountant": "pld",
                "certified": True, "unit": "record", "dp_methods": {"local": 10, "fedmm": 20},
                "non_private_methods": []},
        "small": {"epsilon": None, "infinite": True, "dp_methods": {}, "non_private_methods": ["centralized"]}}}
    out = render_html_report(data, b"\x89PNG\r\n\x1a\n")
    assert "privacy_total" in out and "4.5000" in out and "<script>" not in out
    page = _Page()
    page.feed(out)
    rows = [c for _, c in page.tables["total"]]
    assert rows[0][:3] == ["big", "3.5000", "4.2500"] and rows[0][7] == "local: 10 steps, fedmm: 20 steps"
    assert rows[1][2] == "INFINITE" and rows[1][8] == "centralized"


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on PATH")
def test_browser_renders_a_non_blank_page(budgeted_run, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "page.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2000", (budgeted_run / "privacy_report.html").resolve().as_uri()],
                   check=True, timeout=180, capture_output=True)
    assert shot.stat().st_size > 50_000
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1280)
    # Text, tables and the plot: a blank or error page is nearly uniform.
    assert img.std() > 0.1 and (img.mean(axis=2) < 0.9).mean() > 0.03
