"""Evaluation harness: methods x seeds x privacy settings on one dataset, paired statistics.

One command runs every (privacy setting, seed) once with all requested methods, then writes

* ``RESULTS.md``  -- per-market means over seeds, paired per-seed differences of the target
  method against every other method with 95% t-intervals over seeds, code alignment, epsilon;
* ``results.json`` -- the same numbers plus every run's per-seed values;
* ``paired.png``  -- the paired differences per market with their intervals;
* with several privacy settings, a privacy-utility section in both (every method's mean AUC
  per epsilon, and what privacy costs it: the method at epsilon minus the same method without
  DP, paired over seeds; :mod:`fedmm_secure.reports.privacy_utility`) and
  ``privacy_utility.png``;

and records the exact command line. Examples::

    python bench/eval_harness.py --data synthetic --seeds 5-9 --privacy none,8 --out runs/h_dev
    python bench/eval_harness.py --data xmrec:DIR --seeds 0-4 --privacy none,8 \
        --methods local,fedavg,fedmm --out runs/h_xmrec

``--workers N`` runs N (seed, setting) runs at a time (default: one per usable core), each in
its own process with ``--threads`` torch threads (default 1); results do not depend on it
(``fedmm_secure.workflows.run_batch``). On the 2-core reference machine the XMRec harness
(5 seeds, every method, no DP and epsilon 8) is timed in ``bench/RESULTS_throughput.md``.

Choose designs on development seeds (e.g. ``--seeds 5-9``) and confirm on held-out ones
(``--seeds 0-4``, ``10-14``); the seed list is written into every output. ``--reuse`` keeps a
finished run's ``results.json`` instead of training again (same directory, same config).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmm_secure.config import METHODS, REFERENCE_METHODS
from fedmm_secure.workflows.run_batch import RunJob, run_jobs
from fedmm_secure.reports.paired import paired_difference, parse_seeds
from fedmm_secure.reports.privacy_utility import plot_utility_curve, utility_curve, utility_markdown

__all__ = ["main", "summarize", "render_markdown"]


def _setting_name(p: str) -> str:
    return "no_dp" if p in ("none", "inf") else f"eps{float(p):g}"


def _privacy(p: str, base: dict) -> dict:
    if p in ("none", "inf"):
        return {"enabled": False}
    return dict(base, enabled=True, epsilon=float(p))


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _metric(run: dict, market: str, method: str, key: str = "auc") -> float:
    v = run["markets"].get(market, {}).get(method, {}).get(key)
    return float("nan") if v is None else float(v)


def summarize(runs: dict[int, dict], *, methods: list[str], target: str, sparse: list[str] | None) -> dict:
    """Per-market means and paired differences ``target - other`` for one privacy setting.

    ``runs``: seed -> that run's results.json. Rows: every market, ``mean`` (over markets)
    and, when ``sparse`` is given, ``sparse_mean``.
    """
    seeds = sorted(runs)
    markets = list(runs[seeds[0]]["markets"])
    rows: dict[str, dict[str, list[float]]] = {}
    for mk in markets:
        rows[mk] = {m: [_metric(runs[s], mk, m) for s in seeds] for m in methods}
    rows["mean"] = {m: [float(np.nanmean([_metric(runs[s], mk, m) for mk in markets])) for s in seeds]
                    for m in methods}
    if sparse:
        rows["sparse_mean"] = {m: [float(np.nanmean([_metric(runs[s], mk, m) for mk in sparse])) for s in seeds]
                               for m in methods}
    out: dict[str, Any] = {"seeds": seeds, "markets": markets, "sparse_markets": sparse or [],
                           "auc": {r: {m: {"per_seed": v, "mean": float(np.nanmean(v)),
                                           "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else float("nan")}
                                       for m, v in cols.items()} for r, cols in rows.items()},
                           "paired": {}}
    if target in methods:
        for other in (m for m in methods if m != target):
            out["paired"][f"{target} - {other}"] = {
                r: paired_difference(cols[target], cols[other]).as_dict() for r, cols in rows.items()}
    extras: dict[str, Any] = {}
    for m in methods:
        al = [runs[s].get("code_alignment", {}).get(m) for s in seeds]
        if all(a and "same_code_rate" in a for a in al):
            extras.setdefault("same_key_level1_agreement", {})[m] = {
                "mean": float(np.mean([a["same_code_rate"] for a in al])),
                "chance": float(np.mean([a["chance_rate"] for a in al])), "pairs": al[0]["pairs"]}
        nmi = [runs[s].get("nmi_level1_pooled", {}).get(m) for s in seeds]
        if all(v is not None for v in nmi):
            extras.setdefault("nmi_level1_pooled", {})[m] = float(np.mean(nmi))
        eps = [runs[s].get("privacy_by_method", {}).get(m) for s in seeds]
        if all(eps):
            extras.setdefault("max_epsilon", {})[m] = float(max(max(e.values()) for e in eps))
        t = [runs[s].get("timing_s", {}).get(m) for s in seeds]
        if all(v is not None for v in t):
            extras.setdefault("mean_time_s", {})[m] = float(np.mean(t))
    refs = [runs[s].get("reference") for s in seeds]
    if all(refs):
        extras["reference"] = {k: {mk: float(np.mean([r[k][mk] for r in refs])) for mk in refs[0][k]}
                               for k in refs[0]}
    out["extras"] = extras
    return out


def _fmt_ci(d: dict) -> str:
    if d["n"] < 2:
        return f"{d['mean']:+.4f}"
    star = " *" if d["ci_low"] > 0 or d["ci_high"] < 0 else ""
    return f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] ({d['wins']}/{d['n']}){star}"


def render_markdown(report: dict) -> str:
    lines = [f"# Evaluation harness: {report['data']}", "",
             f"Command: `{report['command']}`", "",
             f"Commit {report['commit']}, {report['started']} UTC, {report['wall_s']:.0f} s, "
             f"load average at start {report['load_start']}, at end {report['load_end']}; "
             f"seeds {report['seeds_spec']} ({report['seed_role']}); {report.get('workers', 1)} worker process(es) "
             f"x {report.get('threads', 1)} torch thread(s).", ""]
    for setting, summ in report["settings"].items():
        methods = report["methods"]
        lines += [f"## {setting}: test AUC, mean ± sd over {len(summ['seeds'])} seeds", "",
                  "| market | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        ref = summ["extras"].get("reference", {})
        for r, cols in summ["auc"].items():
            lines.append(f"| {r} | " + " | ".join(f"{cols[m]['mean']:.4f} ± {cols[m]['sd']:.4f}" for m in methods) + " |")
        if ref:
            lines += ["", "Reference (not methods; same test rows): " + "; ".join(
                f"{k}: " + ", ".join(f"{mk} {v:.4f}" for mk, v in vals.items()) for k, vals in ref.items())]
        if summ["paired"]:
            pairs = list(summ["paired"])
            lines += ["", "Paired differences, mean [95% t-interval over seeds] (seeds won); * = interval excludes 0", "",
                      "| market | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
            for r in summ["auc"]:
                lines.append(f"| {r} | " + " | ".join(_fmt_ci(summ["paired"][p][r]) for p in pairs) + " |")
        ex = summ["extras"]
        if "same_key_level1_agreement" in ex:
            lines += ["", "Same public key, same level-1 code across markets: " + ", ".join(
                f"{m} {v['mean']:.1%} (chance {v['chance']:.1%}, {v['pairs']} pairs)"
                for m, v in ex["same_key_level1_agreement"].items())]
        if "nmi_level1_pooled" in ex:
            lines += ["", "NMI of level-1 codes with true clusters (all markets pooled): " + ", ".join(
                f"{m} {v:.3f}" for m, v in ex["nmi_level1_pooled"].items())]
        if "max_epsilon" in ex:
            lines += ["", "Largest per-market epsilon reported: " + ", ".join(
                f"{m} {v:.3f}" for m, v in ex["max_epsilon"].items())]
        if "mean_time_s" in ex:
            lines += ["", "Mean time per run (s): " + ", ".join(f"{m} {v:.0f}" for m, v in ex["mean_time_s"].items())]
        lines.append("")
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in report["settings"] if report["settings"][s]["paired"]]
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings):
        summ = report["settings"][s]
        rows = list(summ["auc"])
        pairs = list(summ["paired"])
        width = 0.8 / len(pairs)
        for j, p in enumerate(pairs):
            d = [summ["paired"][p][r] for r in rows]
            mean = np.array([x["mean"] for x in d])
            err = np.array([[x["mean"] - x["ci_low"] for x in d], [x["ci_high"] - x["mean"] for x in d]])
            ax.bar(np.arange(len(rows)) + j * width, mean, width, yerr=np.nan_to_num(err), capsize=2, label=p)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, rows, rotation=45, ha="right")
        ax.set_title(f"{s}: paired AUC difference, 95% CI")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return v


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except Exception:  # not a checkout: the command line still identifies the run
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="synthetic", help="synthetic or xmrec:PATH (any loader spec)")
    ap.add_argument("--methods", default=None,
                    help="comma list (default: local,local_codes,fedavg,fedmm,centralized, and on synthetic "
                         "data also the references oracle and fedmm_oracle, so the headroom is shown)")
    ap.add_argument("--target", default="fedmm", help="method compared against every other one")
    ap.add_argument("--seeds", default="5-9", help="e.g. 0-4, 5,7,9")
    ap.add_argument("--seed-role", default="dev", help="dev or held-out: written into the report")
    ap.add_argument("--privacy", default="none,8", help="comma list of 'none' and epsilons")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--config", default=None, help="JSON file or inline JSON merged into every run's config")
    ap.add_argument("--out", default="runs/eval_harness")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs' results.json")
    ap.add_argument("--no-train", action="store_true",
                    help="summarise the finished runs under --out only (seeds without results.json are left out)")
    ap.add_argument("--workers", type=_positive_int, default=None,
                    help="runs at a time, each in its own process (results do not depend on it; "
                         "default: one per usable core)")
    ap.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads per run")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.workers is None:
        # One single-threaded run per core: the runs are independent, so this uses the machine
        # better than one run with a thread per core (small DeepFM steps scale poorly on threads).
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    seeds = parse_seeds(args.seeds)
    if args.methods is None:
        args.methods = ",".join(METHODS + (REFERENCE_METHODS if args.data == "synthetic" else ()))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [p.strip() for p in args.privacy.split(",") if p.strip()]
    extra: dict = {}
    if args.config:
        text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
        extra = json.loads(text)
    base: dict = {"data": args.data, "methods": methods}
    if args.rounds is not None:
        base["rounds"] = args.rounds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in ["python", "bench/eval_harness.py", *(argv if argv is not None else sys.argv[1:])])
    t0, started = time.perf_counter(), _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    jobs = [(p, s) for p in settings for s in seeds]
    runs: dict[str, dict[int, dict]] = {_setting_name(p): {} for p in settings}

    todo: list[RunJob] = []
    where: dict[Path, tuple[str, int]] = {}
    for p, s in jobs:
        name = _setting_name(p)
        d = out / "runs" / name / f"seed{s}"
        if args.no_train and not (d / "results.json").exists():
            continue
        if (args.reuse or args.no_train) and (d / "results.json").exists():
            runs[name][s] = json.loads((d / "results.json").read_text())
            continue
        shutil.rmtree(d, ignore_errors=True)
        raw = _merge(_merge(base, extra), {"seed": s})
        raw["privacy"] = _privacy(p, dict(extra.get("privacy", {}), delta=args.delta))
        todo.append(RunJob(config=raw, out_dir=d, label=f"{name} seed {s}"))
        where[d] = (name, s)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=args.quiet) as bar:
        task = bar.add_task(f"{len(todo)} runs, {args.workers} worker(s)", total=len(todo))

        def done(job: RunJob, res: dict) -> None:
            name, s = where[job.out_dir]
            runs[name][s] = res
            bar.advance(task)

        def tick(job: RunJob, msg: str) -> None:
            bar.update(task, description=f"{job.label}: {msg}")

        run_jobs(todo, workers=args.workers, threads=args.threads, on_done=done, progress=tick)
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        print("no finished runs to summarise", file=sys.stderr)
        return 1
    first = next(iter(next(iter(runs.values())).values()))
    names = list(first["markets"])
    sparse = names[1:] if args.data == "synthetic" else None
    report = {"data": args.data, "command": command, "commit": _git_commit(), "started": started,
              "wall_s": time.perf_counter() - t0, "load_start": load_start,
              "load_end": " ".join(f"{x:.1f}" for x in os.getloadavg()), "seeds_spec": args.seeds,
              "seed_role": args.seed_role, "workers": args.workers, "threads": args.threads, "methods": methods, "target": args.target, "extra_config": extra,
              "settings": {n: summarize(r, methods=methods, target=args.target, sparse=sparse)
                           for n, r in runs.items()}}
    curves = {}
    if len(report["settings"]) > 1:
        # Several settings: what each epsilon costs every method (paired against no DP).
        rows = ["mean"] + (["sparse_mean"] if sparse else [])
        curves = {r: utility_curve(report["settings"], methods=methods, row=r) for r in rows}
        report["privacy_utility"] = {r: [p.as_dict() for p in pts] for r, pts in curves.items()}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    text = render_markdown(report)
    for r, pts in curves.items():
        text += f"\n## Privacy-utility ({r})\n\n" + utility_markdown(pts, row=r) + "\n"
    if any(not np.isinf(p.epsilon) for p in curves.get("mean", [])):
        plot_utility_curve(curves["mean"], out / "privacy_utility.png", title=f"{args.data.split(':')[0]}: mean AUC over markets")
    (out / "RESULTS.md").write_text(text + "\n")
    _plot(report, out / "paired.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
