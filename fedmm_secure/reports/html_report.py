"""The privacy report as one self-contained HTML page a reviewer can read, print and sign.

Rendered from :func:`.report_data.gather_privacy_report`'s data and the epsilon plot's PNG
bytes: the plot is embedded as a ``data:`` URI, styles are inline, there is no script and no
external asset, so the file can be archived, mailed or opened offline as it is. Every value
taken from the run directory is HTML-escaped (market names, reasons and audit verdicts are
text from files anyone with write access to the run could have put there).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["render_html_report", "write_html_report"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d1d1f;max-width:1180px;
 margin:24px auto;padding:0 20px;line-height:1.4;font-size:14px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc;padding-bottom:3px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #c8c8c8;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f0f0f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.refused td{background:#fdecea}tr.group td{border-top:2px solid #888}code{font-size:12px;word-break:break-all}
.muted{color:#666}.status{display:inline-block;padding:1px 7px;border-radius:3px;font-weight:600}
.ok{background:#e3f4e5;color:#17642a}.bad{background:#fbe2e0;color:#a3160b}.warn{background:#fff3d6;color:#7a5200}
code.path{white-space:nowrap;word-break:normal}ul.summary{list-style:none;padding-left:0}ul.summary li{margin:3px 0}
.sign td{height:34px;min-width:260px}img.plot{max-width:100%;border:1px solid #ddd}
@media print{body{margin:0;max-width:none}h2{page-break-after:avoid}tr{page-break-inside:avoid}}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _num(x: Any, fmt: str = ".4f") -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else _e(x)
    return _e(format(x, fmt))


def _badge(text: str, kind: str) -> str:
    return f'<span class="status {kind}">{_e(text)}</span>'


def _table(headers: Iterable[str] | None, rows: Iterable[Iterable[str]], *,
           row_classes: Iterable[str] | None = None, table_id: str | None = None, css: str | None = None) -> str:
    """A table of already-escaped cells (callers escape: some cells hold badges); ``headers``
    None for a key/value table whose first column says what each row is."""
    classes = list(row_classes) if row_classes is not None else None
    attrs = (f' id="{_e(table_id)}"' if table_id else "") + (f' class="{_e(css)}"' if css else "")
    head = "" if headers is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>"
    out = [f"<table{attrs}>{head}<tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(c if c.startswith("<td") else f"<td>{c}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _td_num(x: Any, fmt: str = ".4f") -> str:
    return f'<td class="num">{_num(x, fmt)}</td>'


def _td_many(values: list[Any], fmt: str = ".4g") -> str:
    """Event parameters of one round and market: one value, or each distinct one."""
    return f'<td class="num">{"; ".join(_num(v, fmt) for v in values) if values else "-"}</td>'



def _mapping(data: Any) -> str:
    """Any JSON value from results.json as nested tables (its shape is not fixed here)."""
    if isinstance(data, Mapping):
        if not data:
            return '<span class="muted">empty</span>'
        return _table(["key", "value"], [[_e(k), _mapping(v)] for k, v in data.items()])
    if isinstance(data, list):
        return ", ".join(_mapping(v) for v in data) or "-"
    return _num(data) if isinstance(data, float) else _e(data)


def _after(prefix: str, note: str) -> str:
    """A note without the prefix its badge already says."""
    return note[len(prefix):].lstrip(": ") if note.startswith(prefix) else note


def _summary(data: dict) -> str:
    ver = data["verification"]
    items = [
        (_badge("LEDGER VERIFIED", "ok") if ver["ok"] else _badge("LEDGER NOT VERIFIED", "bad"))
        + " hash chain recomputed, head compared with results.json, epsilons recomputed from the DP events",
        (_badge("NOT PRIVATE", "bad") + " " + _e(_after("NOT PRIVATE", data["randomness"]["note"]))) if not data["randomness"]["private"]
        else _badge("DP RANDOMNESS SECURE", "ok") + " " + _e(data["randomness"]["note"]),
        (_badge("NOT SECURE", "bad") + " " + _e(_after("NOT SECURE", data["secure_aggregation"]["note"])))
        if data["secure_aggregation"]["backend"] == "plain" else
        _badge("SECURE AGGREGATION", "ok" if data["secure_aggregation"]["secure"] else "warn")
        + f" backend <b>{_e(data['secure_aggregation']['backend'])}</b>: {_e(data['secure_aggregation']['note'])}",
        (_badge("CERTIFIED", "ok") if data["accountant"]["certified"] else _badge("NOT CERTIFIED", "warn"))
        + f" accountant <b>{_e(data['accountant']['name'])}</b> ({_e(data['accountant']['bound'])})",
    ]
    over = [m for m, v in data["markets"].items() if v["budget_status"] == "OVER BUDGET"]
    refused = sum(len(v["refused_rounds"]) for v in data["markets"].values())
    if data["budget"] is None:
        items.append(_badge("NO BUDGET", "warn") + " no epsilon budget was set for this run")
    else:
        items.append((_badge("OVER BUDGET", "bad") + " " + _e(", ".join(over))) if over else
                     _badge("WITHIN BUDGET", "ok") + f" every market at or below epsilon {_num(data['budget'], 'g')}")
    if refused:
        items.append(_badge("REFUSED ROUNDS", "warn") + f" {refused} market-round(s) refused by the budget "
                     "(those markets trained less than planned)")
    return '<ul class="summary">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _ledgers(data: dict) -> str:
    rows = [[f'<code class="path">{_e(c["path"])}</code>', _badge("verified", "ok") if c["ok"] else _badge("FAILED", "bad"),
             f'<td class="num">{_e(c["entries"])}</td>', f"<code>{_e(c['head_hash'])}</code>",
             "yes" if c["anchored"] else "no",
             ("signed, signatures verified" if c["signatures_checked"] else
              "signed, signatures not checked" if c["signed"] else "unsigned"),
             f"<code>{_e(c['run_id'])}</code>"] for c in data["verification"]["ledgers"]]
    return _table(["ledger", "chain", "entries", "head hash (SHA-256)", "head matches results.json",
                   "signatures", "run id"], rows, table_id="ledgers")


def _markets(data: dict) -> str:
    def total(v: dict) -> str:
        return _badge("INFINITE", "bad") if v.get("total_infinite") else _td_num(v.get("total_epsilon"))

    def per_method(v: dict) -> str:
        return _e(", ".join(f"{k}: {_num(x.get('epsilon'))}" for k, x in (v.get("by_method") or {}).items()) or "-")

    rows = [[_e(m), _td_num(v["epsilon"]), total(v), per_method(v), _td_num(v["delta"], "g"), _e(v["accountant"]),
             "yes" if v["certified"] else "no", _e(v["unit"]), _td_num(v["noise_multiplier"], ".4g"),
             _td_num(v["max_grad_norm"], "g"), _td_num(v["sample_rate"], ".4g"), _td_num(v["steps"], "d"),
             _td_num(v["budget"], "g"),
             _badge(v["budget_status"], "bad" if v["budget_status"] == "OVER BUDGET" else "ok"
                    if v["budget_status"] == "within" else "warn"),
             _e(", ".join(str(r) for r in v["refused_rounds"]) or "none")]
            for m, v in data["markets"].items()]
    deployed = data.get("deployed_method") or "deployed"
    return (f"<p>epsilon, sigma, q, DP steps, status and refused rounds: the deployed method "
            f"(<b>{_e(deployed)}</b>); total: composed over every method the run trained on the market's data; "
            "per method: each method's own ledger.</p>"
            + _table(["market", f"epsilon ({deployed})", "total epsilon (all methods)", "epsilon per method",
                      "delta", "accountant", "certified", "unit", "sigma", "clip norm", "q", "DP steps", "budget",
                      "status", "refused rounds"], rows, table_id="markets"))


def _rounds(data: dict) -> str:
    # A ledger column only when one method has several ledgers (Flower: one per market).
    multi = len({r["ledger"] for r in data["rounds"]}) > len({r.get("method") for r in data["rounds"]})
    rows, classes = [], []
    previous = None
    for r in data["rounds"]:
        d = r["decision"]
        decision = ("-" if d is None else
                    (_badge("allowed", "ok") if d["allowed"] else _badge("REFUSED", "bad"))
                    + f" (would reach {_num(d['epsilon_if_run'])} / budget {_num(d['epsilon_budget'], 'g')})")
        rows.append([f'<span title="{_e(r["ledger"])}">{_e(r.get("method", "-"))}</span>']
                    + ([f'<code class="path">{_e(r["ledger"])}</code>'] if multi else [])
                    + [_e(r["market"]), f'<td class="num">{_e(r["round"])}</td>', _e(r["stage"].upper()),
                       _e(r["round_status"]), _td_many(r["sample_rate"]), _td_many(r["noise_multiplier"]),
                       f'<td class="num">{_e(r["steps"])}</td>', _e(", ".join(r["unit"]) or "-"),
                       _td_num(r["epsilon_after"]), decision, _e(r["refusal_reason"] or "")])
        # A rule above the first row of each (method, market) group.
        group = (r.get("method"), r["market"])
        classes.append(" ".join(c for c in ("refused" if r["refused"] else "",
                                             "group" if previous not in (None, group) else "") if c))
        previous = group
    return _table(["method"] + (["ledger"] if multi else []) + ["market", "round", "stage", "round status", "q",
                                                                "sigma", "steps", "unit", "epsilon after",
                                                                "budget decision", "refusal"],
                  rows, row_classes=classes, table_id="rounds")


def _total_across_methods(data: dict) -> list[str]:
    total = data.get("total_across_methods") or {}
    markets = total.get("markets") or {}
    if not markets:
        return []
    rows = []
    for m, t in markets.items():
        dp = t.get("dp_methods") if isinstance(t.get("dp_methods"), Mapping) else {}
        rows.append([_e(m), _td_num(t.get("deployed_epsilon")),
                     _badge("INFINITE", "bad") if t.get("infinite") else _td_num(t.get("epsilon")),
                     _td_num(t.get("delta"), "g"), _e(t.get("accountant")), "yes" if t.get("certified") else "no",
                     _e(t.get("unit")), _e(", ".join(f"{k}: {v} steps" for k, v in dp.items()) or "-"),
                     _e(", ".join(map(str, t.get("non_private_methods") or [])) or "none")])
    return [f"<p>Total epsilon spent on each market's data, composed over every method the run trained on it "
            f"(the deployed model is <b>{_e(total.get('deployed_method') or 'n/a')}</b>); infinite when a "
            "method read raw rows without DP.</p>",
            _table(["market", "deployed epsilon", "total epsilon", "delta", "accountant", "certified", "unit",
                    "DP methods", "non-private methods"], rows, table_id="total")]


def _methods(data: dict) -> str:
    by_method = data.get("privacy_by_method") or {}
    out = _total_across_methods(data)
    if by_method:
        markets = list(dict.fromkeys(m for per in by_method.values() if isinstance(per, Mapping) for m in per))
        rows = [[_e(meth)] + [_td_num(per.get(m)) if isinstance(per, Mapping) else _e(per) for m in markets]
                for meth, per in by_method.items()]
        out += ["<p>Epsilon each method spent on each market's data, as results.json reports it (only the "
                "ledger-backed method's epsilon is verified above; methods are separate releases).</p>",
                _table(["method", *markets], rows, table_id="by-method")]
    for key, value in (data.get("privacy_totals") or {}).items():
        out += [f"<h3>{_e(key)}</h3>", _mapping(value)]
    return "".join(out) or '<p class="muted">results.json holds no per-method epsilons.</p>'


def _audits(data: dict) -> str:
    if not data["audits"]:
        return ('<p class="muted">No audit found in the run directory (run <code>fedmm-secure audit DIR</code>; '
                "its JSON is picked up wherever it is written inside DIR).</p>")
    rows, classes = [], []
    for a in data["audits"]:
        for r in a["results"]:
            rows.append([f'<code class="path">{_e(a["file"])}</code>', _e(r["market"]), _e(r["attack"]), _td_num(r["auc"], ".3f"),
                         _td_num(r["epsilon_lower_bound"], ".3f"), _td_num(r["accountant_epsilon"], ".3f"),
                         _td_num(r["run_epsilon_whole_run"], ".3f"),
                         _badge("VIOLATION", "bad") if r["violation"] else _badge("consistent", "ok")
                         if r["accountant_epsilon"] is not None else _badge("no ceiling", "warn"),
                         _e(r["verdict"])])
            classes.append("refused" if r["violation"] else "")
    return ("<p>Empirical epsilon lower bounds from membership-inference audits, held against the accountant's "
            "epsilon for the audited training (the ceiling). Audit files are not covered by the ledger's hash "
            "chain.</p>" + _table(["file", "market", "attack", "AUC", "empirical eps >=", "ceiling (accountant eps)",
                                    "run eps (whole run)", "check", "verdict"], rows, row_classes=classes,
                                   table_id="audits"))


def _steps(data: dict) -> str:
    steps = data.get("accounting_steps") or {}
    rows = [[_e(s), _e(why)] for s, why in steps.get("accounted", [])]
    rows += [[_e(s), "post-processing (no epsilon): " + _e(why)] for s, why in steps.get("post_processing", [])]
    return _table(["step", "accounting"], rows) if rows else ""


def _sign_off(data: dict) -> str:
    heads = ", ".join(f"<code>{_e(c['head_hash'])}</code>" for c in data["verification"]["ledgers"])
    return (f"<p>I have reviewed this report for the ledger head(s) {heads}.</p>"
            + _table(None, [["Reviewer (name, role)", ""], ["Date", ""], ["Signature", ""]], css="sign"))


def render_html_report(data: dict, plot_png: bytes, *, generated_by: str = "fedmm-secure") -> str:
    """The whole page as a string; ``plot_png`` is embedded as a ``data:`` URI."""
    png = base64.b64encode(plot_png).decode("ascii")
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    delta = data["delta"] if not isinstance(data["delta"], list) else ", ".join(map(str, data["delta"]))
    unit = data["unit"] if not isinstance(data["unit"], list) else ", ".join(data["unit"])
    body = [
        f"<h1>Privacy report: {_e(data['run_dir'])}</h1>",
        f'<p class="muted">Generated {_e(when)} by {_e(generated_by)} from the run\'s ledger(s), the source of '
        "truth: every epsilon below is recomputed from the DP events they hold.</p>",
        "<h2>Summary</h2>", _summary(data),
        "<h2>Privacy guarantee</h2>",
        _table(None, [["unit of privacy", f"<b>{_e(unit)}</b>-level"], ["delta", _e(delta)],
                          ["accountant", f"{_e(data['accountant']['name'])} ({_e(data['accountant']['bound'])})"],
                          ["certified", "yes" if data["accountant"]["certified"] else "<b>no</b>"],
                          ["budget per market", _num(data["budget"], "g") if data["budget"] is not None else "none set"],
                          ["DP randomness", _e(data["randomness"]["note"])],
                          ["secure aggregation", f"{_e(data['secure_aggregation']['backend'])}: "
                                                 f"{_e(data['secure_aggregation']['note'])}"]], table_id="guarantee"),
        "<h2>Ledger chain</h2>", _ledgers(data),
        "<h2>Epsilon per market</h2>", _markets(data),
        '<p class="muted">epsilon: the ledger\'s events recomputed, or the largest epsilon the run recorded if '
        "that is larger (the PLD grid depends on the composition history, so the two can differ in the fourth "
        "digit; both are certified upper bounds).</p>",
        "<h2>Across methods</h2>", _methods(data),
        "<h2>Epsilon per round</h2>",
        f'<img class="plot" alt="epsilon after each round per market, stages shaded, refused rounds marked x, '
        f'budget dashed" src="data:image/png;base64,{png}">',
        "<h2>Rounds</h2><p>One row per ledger round and market: the DP event the round recorded (q: Poisson "
        "sampling rate, sigma: noise multiplier, steps), the epsilon after it and the budget decision taken "
        "before it. Refused rows are shaded.</p>", _rounds(data),
        "<h2>Audits</h2>", _audits(data),
        "<h2>Which steps cost epsilon</h2>", _steps(data),
        "<p>Test-set metrics are computed on held-out data and are not covered by DP.</p>",
        "<h2>Sign-off</h2>", _sign_off(data),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Privacy report: {_e(data['run_dir'])}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_html_report(data: dict, plot_png: bytes, path: Path, *, generated_by: str = "fedmm-secure") -> Path:
    path.write_text(render_html_report(data, plot_png, generated_by=generated_by), encoding="utf-8")
    return path
