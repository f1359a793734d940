"""A FedMM run on a loopback Flower deployment, end to end (``fedmm-secure flower local``).

:func:`flower_local_command` builds the run's config (a tiny synthetic one by default, or the
interrupted run's own on resume), starts a :class:`~fedmm_secure.runtime.flower.local.FlowerLocalDeployment`
(optionally with TLS and SuperNode authentication), waits for the ServerApp's results and writes
the run report. Progress goes to a callback, one line per event; nothing is printed here.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import RunConfig, config_from_dict, load_config
from ..errors import ConfigError
from ..reports.run_report import write_json_atomic, write_run_report
from ..runtime.flower.listings import same_catalogue
from ..runtime.flower.local import FlowerLocalDeployment, same_roster

__all__ = ["flower_local_command", "tiny_flower_config"]


def tiny_flower_config(*, markets: int, rounds: int, secagg: str, seed: int) -> RunConfig:
    """A small synthetic FedMM config with ``markets`` markets (CLI default for ``flower local``)."""
    specs = [{"name": f"m{i}", "n_users": 120 if i == 0 else 80, "n_items": 60 if i == 0 else 45,
              "impressions_per_user": 6 if i == 0 else 5} for i in range(markets)]
    return config_from_dict({
        "seed": seed, "rounds": rounds, "methods": ["fedmm"], "secagg": secagg,
        # Non-private unless --epsilon / --epsilon-budget: this is the runtime's smoke config.
        "privacy": {"enabled": False},
        # Overlapping catalogues (the generator's default): every market worker builds the
        # shared-key list from the markets' public keys, as the embedded run does.
        "synthetic": {"markets": specs},
        "model": {"vq_epochs": 3, "n_global": 8, "n_local": 4, "cf_dim": 8, "latent_dim": 4, "vq_hidden": 8,
                  "ctr_dim": 8, "ctr_hidden": [8]}})


def _resume_config(out: Path) -> RunConfig:
    """The config of the interrupted ``flower local`` run in ``out`` (authoritative on resume)."""
    if not (out / "config.json").exists():
        raise ConfigError("--resume", f"{out} has no config.json (not a `flower local` run directory)")
    if (out / "results.json").exists():
        raise ConfigError("--resume", f"{out} holds a finished run (results.json); nothing to resume",
                          allowed="the directory of an interrupted run")
    return load_config(out / "config.json")


def flower_local_command(*, markets: int, rounds: int, secagg: str, out: Path, seed: int,
                         config: RunConfig | None, timeout: float = 1800.0, epsilon: float | None = None,
                         epsilon_budget: float | None = None, tls: bool = False, resume: bool = False,
                         progress: Callable[[str], None] | None = None,
                         startup_timeout: float | None = None) -> int:
    """``fedmm-secure flower local``: run FedMM on a loopback Flower deployment; 0 on success.

    ``resume=True``: continue the interrupted run in ``out`` with its own config (the other
    run arguments are not used): every market reopens its ledger, so what the interrupted run
    spent stays spent and new rounds are numbered after it; models restart from their initial
    state, as with ``fedmm-secure run --resume``. ``startup_timeout``: seconds the deployment may
    take to come up (default derived from the number of markets,
    :func:`~fedmm_secure.runtime.flower.local.startup_timeout`)."""
    out = Path(out)
    if startup_timeout is not None and not startup_timeout > 0:
        raise ConfigError("--startup-timeout", f"got {startup_timeout!r}", allowed="seconds > 0")
    if resume:
        cfg = _resume_config(out)
        if (out / "error.json").exists():   # the failed attempt's error stays readable
            (out / "error.json").replace(out / "error.previous.json")
        return _run_flower_local(cfg, out, resume=True, timeout=timeout, tls=tls, progress=progress,
                                 startup_timeout=startup_timeout)
    if config is None:
        if not isinstance(markets, int) or markets < 2:
            raise ConfigError("--markets", f"got {markets!r}", allowed="an integer >= 2")
        cfg = tiny_flower_config(markets=markets, rounds=rounds, secagg=secagg, seed=seed)
    else:
        raw = config.to_dict()
        raw.update(rounds=rounds, secagg=secagg, seed=seed, methods=["fedmm"])
        cfg = config_from_dict(raw)
    if epsilon is not None or epsilon_budget is not None:
        raw = cfg.to_dict()
        raw["privacy"] = {**raw["privacy"], "enabled": True,
                          **({"epsilon": epsilon, "noise_multiplier": None} if epsilon is not None else {}),
                          **({"epsilon_budget": epsilon_budget} if epsilon_budget is not None else {})}
        cfg = config_from_dict(raw)
    if (out / "results.json").exists() or (out / "ledgers").exists():
        raise ConfigError("--out", f"{out} already holds a run", allowed="a new directory, or --resume DIR")
    cfg = cfg.resolved()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())   # what --resume reads
    return _run_flower_local(cfg, out, resume=False, timeout=timeout, tls=tls, progress=progress,
                             startup_timeout=startup_timeout)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A ``kill`` (SIGTERM: schedulers, CI timeouts) unwinds like Ctrl-C, so the deployment's
    close() stops every process instead of leaving them running. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@_sigterm_as_interrupt()
def _run_flower_local(cfg: RunConfig, out: Path, *, resume: bool, timeout: float, tls: bool,
                      progress: Callable[[str], None] | None, startup_timeout: float | None = None) -> int:
    log = out / "flower_server.log"
    seen = len(log.read_text(encoding="utf-8").splitlines()) if log.exists() else 0

    def show_progress(dep: FlowerLocalDeployment) -> None:
        # The ServerApp writes one line per secure sum; echo new ones as they come.
        nonlocal seen
        if progress is None or not log.exists():
            return
        lines = log.read_text(encoding="utf-8").splitlines()
        for line in lines[seen:]:
            progress(line)
        seen = len(lines)

    with FlowerLocalDeployment(cfg, out_dir=out, resume=resume, startup_timeout_s=startup_timeout) as dep:
        if tls:
            tls_dir = out / "tls"
            if resume and tls_dir.exists():   # keys are never reused: the old PKI is set aside
                tls_dir.replace(out / f"tls.previous.{int(time.time())}")
            dep.use_loopback_tls(tls_dir)
        if progress is not None:
            if resume:
                progress(f"resuming {out}: every market continues its ledger in {out / 'ledgers'}")
            progress(f"starting SuperLink and {len(dep.markets)} SuperNodes + market workers on 127.0.0.1"
                     + (f" (TLS, SuperNode authentication; PKI in {out / 'tls'})" if tls else ""))
        dep.start()
        dep.submit()
        results = dep.wait(timeout=timeout, on_poll=show_progress)
        show_progress(dep)
        # Every market pinned the identity roster made before the run and refused any per-run
        # roster it does not cover; the per-run rosters the workers recorded must also agree
        # before the results count (a second, after-the-run check).
        roster = same_roster(dep.pinned_rosters())
        results["roster_sha256"] = roster
        results["identity_roster_sha256"] = dep.identity_roster.digest().hex()
        write_json_atomic(out / "results.json", results)   # both digests, next to the run's results
        # Likewise the shared-key lists the markets built from their listings.
        same_catalogue(results.get("catalogue", {}))
        if progress is not None:
            progress(f"every market held the run to the identity roster pinned before it "
                     f"(sha256 {results['identity_roster_sha256']}) and recorded the same per-run roster "
                     f"(sha256 {roster})")
    write_run_report(results, out)
    if progress is not None:
        auc = results.get("summary", {}).get("fedmm", {}).get("mean_auc")
        progress(f"results: {out / 'results.json'}, report: {out / 'report.md'}"
                 + (f"; mean test AUC {auc:.4f}" if auc is not None else "")
                 + (f"; dropped: {results['dropped']}" if results.get("dropped") else ""))
    return 0
