"""Local Flower deployment on loopback: one SuperLink, one SuperNode (+ worker) per market.

:class:`FlowerLocalDeployment` starts real ``flower-superlink`` / ``flower-supernode``
processes (``--insecure``, 127.0.0.1 only, free ports picked at start), submits the app with
``flwr run`` and waits for the ServerApp to write ``results.json``. Every process it starts
lives in a process group of its own (one group for the SuperLink, one per market: SuperNode,
its SuperExec and ClientApp processes, and the market worker), and every group is terminated
in a ``finally``: on success, on failure, on timeout and on Ctrl-C. Flower 1.40's SuperLink
starts its SuperExec (and so the ServerApp) in a new session, outside our groups; those
processes carry the deployment's environment marker and are killed by it
(:mod:`.processes`).

:func:`fedmm_secure.workflows.flower_local.flower_local_command` (``fedmm-secure flower local``)
runs a FedMM run on one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ...config import RunConfig, config_from_dict
from ...data.loaders import load_data
from ...errors import AbortError, ConfigError
from .pki import FlowerTLS, loopback_tls
from .processes import BIN, MARKER, free_port, group_exists, killpg, marked_pids, tool

__all__ = ["APP_PYPROJECT", "FlowerLocalDeployment", "Placement", "same_roster", "startup_timeout",
           "write_app_dir"]

# Start-up cost per market on a small machine: its worker imports torch and builds its data, its
# SuperNode starts Flower (together ~10 s of CPU, measured on 2 shared cores under load 3-5); all
# markets start at once and queue for the same cores, so the wait grows with their number.
STARTUP_BASE_S = 60.0
STARTUP_PER_MARKET_S = 20.0
# How often the SuperLink's SuperExec looks for the ServerApp to launch (once per run).
SERVERAPP_LAUNCH_POLL_S = 0.5
# A worker woken by its SuperNode's doorbell polls for tasks only in case a ring is lost.
DOORBELL_FALLBACK_POLL_S = 0.5
_UNIX_PATH_MAX = 100   # sun_path holds 104-108 bytes


def startup_timeout(n_markets: int) -> float:
    """How long a deployment of ``n_markets`` markets may take to come up (every wait before
    the run's first message: workers ready, SuperNode keys registered, ``flwr run`` accepted,
    every SuperNode joined): ``STARTUP_BASE_S + STARTUP_PER_MARKET_S * n_markets``."""
    return STARTUP_BASE_S + STARTUP_PER_MARKET_S * max(1, int(n_markets))

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedmm-flower"
version = "1.0.0"
description = "fedmm-secure over Flower: our secure aggregation carried as Flower messages"
license = "Apache-2.0"
dependencies = ["flwr>=1.40,<1.43"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedmm"

[tool.flwr.app.components]
serverapp = "fedmm_secure.runtime.flower.app:server_app"
clientapp = "fedmm_secure.runtime.flower.app:client_app"

[tool.flwr.app.config]
config-json = "{}"
out-dir = ""
expected-markets = 1
stage-timeout = 30.0
step-timeout = 600.0
join-timeout = 60.0
poll-interval = 0.05
workload-json = '{"name": "fedmm"}'
identity-key = ""
roster = ""
"""


@dataclass(frozen=True)
class Placement:
    """Where the deployment's parts run, when not all on this machine's loopback.

    ``link_host``: the address the SuperLink serves on and the SuperNodes dial (TLS names it in
    the SuperLink's certificate). ``prefix``: a command prefix per part (``"superlink"`` for the
    SuperLink, its ServerApp and the ``flwr`` CLI; a market's name for its SuperNode and worker),
    e.g. ``["ip", "netns", "exec", NS]``. A market's SuperNode and worker share one prefix and
    talk over that place's own loopback.
    """

    link_host: str = "127.0.0.1"
    prefix: Mapping[str, Sequence[str]] = field(default_factory=dict)


def same_roster(pinned: Mapping[str, str | None]) -> str:
    """The roster digest every market that took part pinned (hex); :class:`AbortError` if they
    differ (the aggregator showed the markets different rosters, say a puppet market added for
    some) or none recorded one. A market that never got to ``start`` (``None``: refused the run,
    or was stopped before) pinned nothing and is left out. What markets without a digest
    obtained in advance can check, after the fact."""
    recorded = {m: d for m, d in pinned.items() if d}
    if not recorded:
        raise AbortError("no market recorded the roster it pinned")
    digests = set(recorded.values())
    if len(digests) != 1:
        detail = ", ".join(f"{m}: {d[:16]}" for m, d in sorted(recorded.items()))
        raise AbortError(f"the markets pinned different rosters ({detail}); do not use this run's results")
    return digests.pop()


def write_app_dir(path: Path) -> Path:
    """The Flower app project (a FAB is built from it); the code itself is the installed package."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(APP_PYPROJECT, encoding="utf-8")
    (path / "fedmm_flower_app.py").write_text(
        '"""Entry points live in fedmm_secure.runtime.flower.app (installed package)."""\n', encoding="utf-8")
    return path


class FlowerLocalDeployment:
    """A throwaway Flower deployment for ``cfg``'s markets on 127.0.0.1."""

    def _market_rules(self) -> list[str]:
        """Each market's own rules, which this launcher sets as the operator of every market:
        the run's backend and privacy settings, and a minimum cohort that lets the run go on
        after one dropout (at least 2 markets: a local demo, not a private federation of 2).
        The threshold rule 2t > n + c (default c = 1) still applies on top: with 3 markets t = 3,
        so a dropout aborts the round; from 4 markets on, one dropout is recovered."""
        n = len(self.markets)
        args = ["--allow-backend", self.cfg.secagg, "--min-cohort", str(max(2, min(n - 1, -(-2 * n // 3))))]
        if self.cfg.privacy.enabled:
            args += ["--privacy-json", json.dumps(dataclasses.asdict(self.cfg.privacy))]
        if self._listings is not None:
            path = self.work / "public_listings.json"
            path.write_text(json.dumps(self._listings), encoding="utf-8")
            args += ["--listings", str(path)]
        return args

    def __init__(self, cfg: RunConfig, *, out_dir: Path, stage_timeout: float = 30.0, step_timeout: float = 600.0,
                 hang_at: dict[str, str] | None = None, poll_interval: float = 0.05, stock: bool = False,
                 workload: dict | None = None, node_poll: float = 0.1, tls: FlowerTLS | None = None,
                 resume: bool = False, startup_timeout_s: float | None = None,
                 placement: Placement | None = None) -> None:
        self.out_dir = Path(out_dir)
        loaded = load_data(cfg)
        self.markets = [m.name for m in loaded]
        # Real data: every market's public catalogue (its item keys), handed to each market's
        # worker as that market's own listings (synthetic workers generate them from the seed).
        self._listings = ({m.name: [str(k) for k in m.item_keys] for m in loaded}
                          if cfg.data != "synthetic" and all(m.item_keys is not None for m in loaded) else None)
        del loaded
        if startup_timeout_s is not None and not startup_timeout_s > 0:
            raise ConfigError("startup-timeout", f"got {startup_timeout_s!r}", allowed="seconds > 0")
        # Derived from the number of markets unless the operator says otherwise.
        self.startup_timeout_s = (startup_timeout(len(self.markets)) if startup_timeout_s is None
                                  else float(startup_timeout_s))
        if cfg.data != "synthetic" and not cfg.markets:
            # Each market loads only its own data (node config), so the run config must give
            # the market order.
            cfg = config_from_dict({**cfg.to_dict(), "markets": self.markets})
        self.cfg = cfg
        self.stage_timeout, self.step_timeout = stage_timeout, step_timeout
        self.hang_at = dict(hang_at or {})
        self.poll_interval = poll_interval
        self.stock = stock
        # The SuperNode's idle poll hits the SuperLink (one process for every market): 0.1 s
        # keeps it off the critical path's CPU on a small machine; see bench/RESULTS_flower.md.
        self.node_poll = node_poll
        self.placement = placement or Placement()
        self.tls = tls
        if tls is not None and set(tls.node_keys) != set(self.markets):
            raise ConfigError("tls.node_keys", "one SuperNode key pair per market is required",
                              allowed=", ".join(self.markets))
        self.workload = dict(workload or {"name": "fedmm"})
        self.resume = resume   # workers continue the ledgers under out_dir/ledgers/ (interrupted run)
        self._started = False
        self._tmp = tempfile.TemporaryDirectory(prefix="fedmm-flower-")
        self.work = Path(self._tmp.name)
        self._make_identities()
        self.logs = self.out_dir / "flower_logs"
        self.groups: dict[str, subprocess.Popen] = {}   # name -> group leader
        self._files: list = []
        self._killed: set[str] = set()
        # Every process of this deployment inherits this value; close() finds the ones that left
        # our process groups with it (the SuperLink starts its SuperExec in a new session, and
        # that SuperExec's ServerApp can outlive a killed SuperLink while it retries to report).
        self.marker = uuid.uuid4().hex

    # ------------------------------------------------------------------ processes
    def _spawn(self, name: str, cmd: Sequence[str], *, env: dict | None = None,
               where: str | None = None) -> subprocess.Popen:
        cmd = [*self.placement.prefix.get(where or name, ()), *cmd]
        log = (self.logs / f"{name}.log").open("ab")
        self._files.append(log)
        # A session (hence process group) per process: its children (SuperExec, ClientApps,
        # ServerApp) stay in the group, so killpg reaches them all.
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=self.work, start_new_session=True)

    def _env(self, home: str) -> dict:
        h = self.work / home
        h.mkdir(exist_ok=True)
        return {"FLWR_HOME": str(h), "FLWR_TELEMETRY_ENABLED": "0", MARKER: self.marker,
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(self.poll_interval),
                "FEDMM_SUPERNODE_POLL": str(self.node_poll),
                # SuperLink/SuperNode start `flower-superexec` and `flwr-*` by name.
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def use_loopback_tls(self, directory: Path) -> FlowerTLS:
        """Run with TLS and SuperNode authentication using a fresh throwaway PKI for this
        deployment's markets, written to ``directory`` (:func:`.pki.loopback_tls`)."""
        if self._started:
            raise ConfigError("tls", "TLS must be chosen before the deployment starts")
        self.tls = loopback_tls(directory, self.markets, hosts=[self.placement.link_host])
        return self.tls

    def start(self, *, ready_timeout: float | None = None) -> None:
        """Start every process; wait (``ready_timeout``, default the deployment's start-up
        timeout) until every market worker is ready."""
        ready_timeout = self.startup_timeout_s if ready_timeout is None else ready_timeout
        self._started = True
        self.logs.mkdir(parents=True, exist_ok=True)
        # Flower 1.40 serves the Fleet, Control and Runtime APIs over HTTP on one host:port.
        self.link_port = free_port()
        if self.tls is None:
            link_sec = ["--insecure"]
        else:
            link_sec = ["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                        "--ssl-keyfile", str(self.tls.key), "--enable-supernode-auth"]
        # The SuperLink's SuperExec only launches the ServerApp, once per run: it need not poll
        # the SuperLink (the hub every hop of every stage goes through) 20 times a second.
        link_env = {**self._env("superlink"), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SERVERAPP_LAUNCH_POLL_S)}
        self.groups["superlink"] = self._spawn("superlink", [
            tool("flower-superlink"), *link_sec, "--disable-runtime-dependency-installation",
            "--host", self.placement.link_host, "--port", str(self.link_port)], env=link_env)
        self._write_cli_config()
        if self.tls is not None:
            for m in self.markets:  # SuperNode authentication: the operator registers each key
                self._flwr(["supernode", "register", str(self.tls.node_keys[m][1]), "fedmm-local"],
                           what=f"registering {m}'s SuperNode key", timeout=self.startup_timeout_s)
        ready = {}
        for i, m in enumerate(self.markets):
            rport = free_port()
            ready[m] = self.work / f"worker-{m}.ready"
            cmd = [sys.executable, "-m", "fedmm_secure.runtime.flower.worker", "--market", m,
                   "--ready-file", str(ready[m]), "--ledger-dir", str(self.ledger_dir(m)),
                   "--startup-timeout", str(self.startup_timeout_s), "--roster-out", str(self.roster_record(m)),
                   "--identity-key", str(self.identity_key(m)), "--roster", str(self.identity_roster_file),
                   *self._market_rules()]
            if self.resume:
                cmd.append("--resume")
            node_env = self._env(f"node-{m}")
            node_sec = ["--insecure"] if self.tls is None else [
                "--root-certificates", str(self.tls.ca), "--auth-supernode-private-key", str(self.tls.node_keys[m][0])]
            # The Runtime API (SuperNode <-> worker) stays plain HTTP on loopback.
            node = [*node_sec, "--superlink", f"{self.placement.link_host}:{self.link_port}", "--host", "127.0.0.1",
                    "--port", str(rport)]
            if self.stock:
                # Stock Flower: SuperExec starts a ClientApp process per message, which relays
                # the message to the worker's socket.
                wport = free_port()
                cmd += ["--listen", f"127.0.0.1:{wport}"]
                node = [tool("flower-supernode"), *node, "--node-config",
                        f"{self._node_config(m)} worker-address='127.0.0.1:{wport}'"]
            else:
                # The worker executes the SuperNode's ClientApp tasks itself (no process per
                # message), woken by its SuperNode's doorbell (.doorbell) and polling only as a
                # fallback; the SuperNode's idle poll is capped (.supernode).
                bell = str(self.work / f"doorbell-{i}")
                cmd += ["--superexec", f"127.0.0.1:{rport}"]
                if len(bell) < _UNIX_PATH_MAX:
                    cmd += ["--doorbell", bell, "--poll-interval", str(max(self.poll_interval, DOORBELL_FALLBACK_POLL_S))]
                    node_env["FEDMM_SUPERNODE_DOORBELL"] = bell
                else:   # a temporary directory too deep for a socket path: the worker polls
                    cmd += ["--poll-interval", str(self.poll_interval)]
                node = [sys.executable, "-m", "fedmm_secure.runtime.flower.supernode", *node,
                        "--isolation", "process", "--node-config", self._node_config(m)]
            if m in self.hang_at:
                cmd += ["--hang-at", self.hang_at[m], "--hang-marker", str(self.hang_marker(m))]
            self.groups[f"supernode-{m}"] = self._spawn(f"supernode-{m}", node, env=node_env, where=m)
            self.groups[f"worker-{m}"] = self._spawn(f"worker-{m}", cmd, env=self._env(f"node-{m}"), where=m)
        deadline = time.monotonic() + ready_timeout
        while not all(f.exists() for f in ready.values()):
            self._check_alive()
            if time.monotonic() > deadline:
                raise AbortError(f"market workers did not start within {ready_timeout:.0f} s "
                                 f"(see flower_logs/; --startup-timeout raises the limit)")
            time.sleep(0.1)

    def _make_identities(self) -> None:
        """Every market's and the aggregator's identity key, and the roster of their public keys,
        made before any process starts in ``OUT/identity/`` (0700; keys 0600): every worker is
        given its key and the roster as its pin (pre-run roster pinning) and signs its ledger
        with the key. A resumed run reuses them, so each ledger continues under its key and
        ``budget check OUT --roster OUT/identity/roster.json`` checks every signature. (One
        operator runs every market here, as with ``--tls``'s keys in ``OUT/tls``; across
        machines each party keeps its own key.)"""
        from .keyfiles import read_roster, write_identity_key, write_roster

        keys = self.out_dir / "identity"
        self.identity_roster_file = keys / "roster.json"
        if self.resume and self.identity_roster_file.exists():
            roster = read_roster(self.identity_roster_file, flag="--resume")
            if set(roster.markets) != set(self.markets):
                raise ConfigError("--resume", f"{self.identity_roster_file} lists other markets than the run")
            self.identity_roster = roster
            return
        if keys.exists() and not self.resume:
            raise ConfigError("out", f"{keys} already exists", allowed="a new run directory (keys are never reused)")
        keys.mkdir(parents=True, mode=0o700, exist_ok=self.resume)
        public = {m: write_identity_key(self.identity_key(m))[1] for m in self.markets}
        _, aggregator = write_identity_key(self.identity_key(None))
        self.identity_roster = write_roster(self.identity_roster_file, public, aggregator)

    def identity_key(self, market: str | None) -> Path:
        """The identity key file of ``market`` (``None``: the aggregator's)."""
        return self.out_dir / "identity" / ("aggregator.key" if market is None else f"market-{market}.key")

    def _node_config(self, market: str) -> str:
        # Real data: each market's SuperNode names its own data source (here all markets share
        # one machine, so it is the run's); synthetic data is generated from the run's seed.
        cfg = f"market='{market}'"
        if self.cfg.data != "synthetic":
            if "'" in self.cfg.data or '"' in self.cfg.data:
                raise ConfigError("data", "a data path with quotes cannot go into a Flower node config")
            cfg += f" data='{self.cfg.data}'"
        return cfg

    def ledger_dir(self, market: str) -> Path:
        """Where ``market``'s worker keeps its privacy ledger (DP runs)."""
        return self.out_dir.resolve() / "ledgers" / market

    def roster_record(self, market: str) -> Path:
        """Where ``market``'s worker records the digest of the roster it pinned."""
        return self.logs / f"roster-{market}.sha256"

    def pinned_rosters(self) -> dict[str, str | None]:
        """Each market's recorded roster digest (``None``: it pinned none, e.g. refused the run)."""
        out: dict[str, str | None] = {}
        for m in self.markets:
            f = self.roster_record(m)
            out[m] = f.read_text(encoding="ascii").strip() if f.exists() else None
        return out

    def hang_marker(self, market: str) -> Path:
        return self.work / f"hang-{market}"

    def _check_alive(self) -> None:
        for name, p in self.groups.items():
            if name.split("-", 1)[-1] not in self._killed and p.poll() is not None:
                raise AbortError(f"{name} exited with code {p.returncode} (see {self.logs}/)")

    def kill_market(self, market: str) -> None:
        """SIGKILL a market's process groups (SuperNode with its SuperExec and ClientApps; worker)."""
        self._killed.add(market)
        for name in (f"supernode-{market}", f"worker-{market}"):
            killpg(self.groups[name].pid, signal.SIGKILL)

    def _write_cli_config(self) -> None:
        home = self.work / "cli"
        home.mkdir(exist_ok=True)
        sec = "insecure = true\n" if self.tls is None else f'root-certificates = "{self.tls.ca}"\n'
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "fedmm-local"\n\n[superlink.fedmm-local]\n'
            f'address = "{self.placement.link_host}:{self.link_port}"\n{sec}', encoding="utf-8")

    def _flwr(self, args: Sequence[str], *, what: str, timeout: float) -> None:
        """Run the ``flwr`` CLI against this deployment, retrying while the SuperLink starts."""
        env = {**os.environ, **self._env("cli")}
        env["FLWR_HOME"] = str(self.work / "cli")
        deadline = time.monotonic() + timeout
        while True:  # the Control API may need a moment after the SuperLink process starts
            r = subprocess.run([*self.placement.prefix.get("superlink", ()), tool("flwr"), *args],
                               capture_output=True, text=True, env=env, cwd=self.work, timeout=timeout)
            with (self.logs / "flwr_cli.log").open("a", encoding="utf-8") as f:
                f.write(f"$ flwr {' '.join(args)}\n{r.stdout}{r.stderr}\n")
            if r.returncode == 0:
                return
            self._check_alive()
            if time.monotonic() > deadline:
                raise AbortError(f"{what} failed: {(r.stdout + r.stderr)[-2000:]}")
            time.sleep(0.5)

    def submit(self, *, join_timeout: float | None = None, timeout: float | None = None) -> None:
        """``flwr run`` the app; the ServerApp waits ``join_timeout`` for every SuperNode to
        join (both default to the deployment's start-up timeout)."""
        join_timeout = self.startup_timeout_s if join_timeout is None else join_timeout
        timeout = self.startup_timeout_s if timeout is None else timeout
        import tomli_w
        overrides = self.work / "run_config.toml"
        overrides.write_text(tomli_w.dumps({
            "config-json": json.dumps(self.cfg.to_dict()), "out-dir": str(self.out_dir.resolve()),
            "expected-markets": len(self.markets), "stage-timeout": float(self.stage_timeout),
            "step-timeout": float(self.step_timeout), "join-timeout": float(join_timeout),
            "poll-interval": float(self.poll_interval),
            "workload-json": json.dumps(self.workload),
            "identity-key": str(self.identity_key(None)), "roster": str(self.identity_roster_file)}),
            encoding="utf-8")
        app = write_app_dir(self.work / "app")
        self._flwr(["run", str(app), "fedmm-local", "--run-config", str(overrides)], what="flwr run",
                   timeout=timeout)

    def wait(self, *, timeout: float, on_poll: Callable[["FlowerLocalDeployment"], None] | None = None) -> dict:
        deadline = time.monotonic() + timeout
        res, err = self.out_dir / "results.json", self.out_dir / "error.json"
        while True:
            if res.exists():
                return json.loads(res.read_text(encoding="utf-8"))
            if err.exists():
                raise AbortError(f"ServerApp failed: {json.loads(err.read_text(encoding='utf-8'))['error']}")
            if on_poll is not None:
                on_poll(self)
            self._check_alive()
            if time.monotonic() > deadline:
                raise AbortError(f"no result within {timeout:.0f} s (see {self.logs}/)")
            time.sleep(0.1)

    def close(self) -> None:
        leaders = list(self.groups.values())
        for p in leaders:
            killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for p in leaders:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in leaders:  # anything left in the groups (ClientApps, SuperExecs) goes too
            killpg(p.pid, signal.SIGKILL)
            try:
                p.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        # SIGKILLed group members are reaped asynchronously; processes that left our groups
        # (detached SuperExec and its ServerApp) are found by the marker. Wait, bounded, until
        # none is left.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            strays = marked_pids(self.marker)
            for pid in strays:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if not strays and not any(group_exists(p.pid) for p in leaders):
                break
            time.sleep(0.1)
        for f in self._files:
            f.close()
        self._files.clear()
        self._tmp.cleanup()

    def __enter__(self) -> "FlowerLocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
