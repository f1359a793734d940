"""A market's long-lived worker: its data, models, long-term keys and the round in progress.

A market's state (models, the masking round's ephemeral secrets, which must never be
serialized) lives in this worker, a process on the market's own machine next to its SuperNode.
Flower 1.40 would otherwise start a fresh ClientApp *process* for every message, in which nothing
survives to the next stage. Two ways to connect it to the SuperNode:

* ``--superexec HOST:PORT`` (default of ``fedmm-secure flower local``): the SuperNode runs with
  ``--isolation process`` and this worker executes its ClientApp tasks in process
  (:mod:`.executor`), woken by the SuperNode's doorbell with ``--doorbell`` (:mod:`.doorbell`);
* ``--listen HOST:PORT``: stock isolation; the ClientApp process Flower starts per message
  relays the message to this socket (one request per connection, :func:`serve`).

:class:`MarketWorker` is the state machine (also used in process by the tests); the market's own
rules and the checks made with them before it takes part (privacy settings, pre-run roster
pinning) are in :mod:`.rules`, its identity key and roster files in :mod:`.keyfiles`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from ...config import config_from_dict
from ...errors import ConfigError, FedMMError, PolicyError, ProtocolError
from ...federation.fedmm.pipeline import market_pipeline
from ...federation.fedmm.protocol import Barrier, BroadcastRequest, PublicMeta, SumRequest
from ...primitives.keys import IdentityPrivateKey
from ...secagg import (MarketPolicy, Roster, RoundContext, create_backend,
                       default_min_cohort)
from ...secagg.identity import endorse
from .rules import (MarketRules, add_rule_arguments, check_start_roster, own_privacy,
                    pinned_roster_at_hello, rules_from_arguments, run_with_own_privacy)
from .wire import (
    b64,
    encode_bound,
    error_reply,
    guarded,
    pack_frame,
    pack_json,
    recv_frame,
    unb64,
    unpack_json,
    unpack_with_header,
)
from .listings import catalogue_record, check_offered_keys, market_catalogue
from .workloads import secure_sum_pipeline

__all__ = ["MarketWorker", "MarketRules", "HangAt", "serve", "own_privacy", "run_with_own_privacy"]

# Named, not ``__name__``: run as ``python -m`` this module is ``__main__``, whose records would
# miss the package logger that main() points at the market's log file.
_log = logging.getLogger("fedmm_secure.runtime.flower.worker")


class HangAt:
    """Fault injection for tests: on the given stage of the given sum, write ``marker`` and
    stop answering (the test then kills the market's processes)."""

    def __init__(self, *, label: str, round_id: int, stage: int, marker: Path) -> None:
        self.label, self.round_id, self.stage, self.marker = label, round_id, stage, marker


class MarketWorker:
    """One market's side of a run: ``hello`` (policy checks, data, keys), ``start`` (roster),
    then the pipeline's requests. ``identity`` is the market's long-term signing key
    (:mod:`.keyfiles`): with it the worker endorses its per-run bundle, and it is required when
    ``rules`` pin a roster."""

    def __init__(self, *, market: str, rules: MarketRules, hang_at: HangAt | None = None,
                 ledger_dir: Path | None = None, resume: bool = False,
                 roster_out: Path | None = None, identity: IdentityPrivateKey | None = None) -> None:
        self.market = market
        self.rules = rules
        if rules.pins_roster and identity is None:
            raise ConfigError("identity-key", "a market that pins a roster needs its identity key",
                              allowed="--identity-key FILE")
        self._identity = identity
        self._pinned = None   # the identity roster this run is held to (set at hello)
        # This market's privacy ledger (DP runs): on the market's own machine, written before
        # any upload that depends on the round's DP-trained parameters leaves the worker.
        self.ledger_dir = Path(ledger_dir) if ledger_dir is not None else None
        # The market's own say, not the aggregator's: continue the ledger of an interrupted run
        # (every event already in it stays spent) instead of refusing a directory that has one.
        self.resume = resume
        self._ledger = None
        self._session = None
        self._hang_at = hang_at
        self._endpoint = None
        self._pipeline = None
        self._pending: SumRequest | BroadcastRequest | None = None
        self._round = None
        self._stage = 0
        self.result: dict | None = None
        self._joined: str | None = None   # the run this worker took part in (one per process)
        # Where this market records the digest of the per-run roster it installed (hex), on its own
        # machine: a market without a pre-run pin trusts the first roster it is shown, and
        # comparing these records across markets afterwards exposes a split roster.
        self.roster_out = Path(roster_out) if roster_out is not None else None
        self.pinned_roster: str | None = None
        self._catalogue = None   # the public shared keys this market built (set at hello)

    # ------------------------------------------------------------------ dispatch
    def handle(self, kind: str, payload: bytes) -> tuple[str, bytes]:
        if kind == "hello":
            return "hello", self._hello(unpack_json(payload))
        if kind == "start":
            return self._start(unpack_json(payload))
        if kind == "secagg":
            return self._secagg(payload)
        if kind == "broadcast":
            if not isinstance(self._pending, BroadcastRequest):
                raise ProtocolError("broadcast received while not waiting for one")
            return self._advance(payload)
        raise ProtocolError(f"unexpected message kind {kind!r}")

    def _hello(self, msg: dict) -> bytes:
        from ...data.loaders import load_data  # heavy (data generators); only the worker needs it

        # One run per worker: a second session over the same inputs (the pipeline is seeded, so
        # a rerun computes them again) lets the aggregator difference two sums over different
        # survivor sets and read one market's input. A new run needs a new worker, started by
        # the market's operator.
        if self._joined is not None:
            raise PolicyError(f"this worker already took part in run {self._joined!r}; a market joins "
                              "one run per worker (a repeated session could be differenced)")
        # A pinning market checks the aggregator's roster before it answers anything.
        pinned = pinned_roster_at_hello(self.rules, msg.get("identity_roster"), market=self.market,
                                        identity=self._identity)
        cfg = config_from_dict(msg["config"])
        # The aggregator's run config may not pick this market's backend or privacy settings:
        # the backend must be one the market runs, and from here on the privacy settings are the
        # market's own object (the run's must agree with them, see run_with_own_privacy).
        if cfg.secagg not in self.rules.backends:
            raise PolicyError(f"backend {cfg.secagg!r} is not allowed by this market's rules")
        self._cfg = run_with_own_privacy(cfg, self.rules)
        self._run_id = str(msg["run_id"])
        # The SuperNode's node config (``market``, optionally ``data``) is the market's own say:
        # the aggregator's run config cannot point a market at another market's data.
        node = msg.get("node") or {}
        if node.get("market") not in (None, self.market):
            raise ConfigError("node-config market", f"this worker serves {self.market!r}, the SuperNode says "
                              f"{node['market']!r}")
        if node.get("data"):
            # Real data on the market's machine: load this market only; its position in the run's
            # market order comes from the run config's market list.
            order = list(self._cfg.markets)
            if self.market not in order:
                raise ConfigError("markets", f"{self.market!r} is not in the run config's market list",
                                  allowed=", ".join(order) or "a run config that lists its markets in order")
            raw = self._cfg.to_dict()
            raw.update(data=str(node["data"]), markets=[self.market])
            self._data = load_data(config_from_dict(raw))[0]
            self._index = order.index(self.market)
            # Other markets' public listings as this market's rules give them (never their
            # interactions); its own from its own data. Without listings: no key sharing.
            listings = {**(self.rules.listings or {}), self.market: self._data.item_keys}
            self._catalogue = market_catalogue(order, listings) if self.rules.listings else None
        else:
            markets = load_data(self._cfg)
            names = [m.name for m in markets]
            if self.market not in names:
                raise ConfigError("market", f"{self.market!r} is not a market of this run", allowed=", ".join(names))
            self._index = names.index(self.market)
            # The shared keys from every market's public listing (item keys), as the embedded run.
            self._catalogue = market_catalogue(names, {m.name: m.item_keys for m in markets})
            # Synthetic data is generated for all markets from the seed; keep only ours.
            self._data = markets[self._index]
            del markets
        # The market's own c sizes the threshold it computes (the aggregator must use the same).
        options = {"colluders": self.rules.colluders} if self._cfg.secagg == "masking" else {}
        backend = create_backend(self._cfg.secagg, allow_insecure=self._cfg.secagg == "plain", **options)
        self._endpoint = backend.create_market(self.market)
        self._joined, self._pinned = self._run_id, pinned
        if pinned is not None:
            _log.info("run %s held to the identity roster sha256 %s", self._run_id, pinned.digest().hex())
        bundle = self._endpoint.public_bundle()
        reply = {"market": self.market, "index": self._index, "bundle": b64(bundle),
                 "n_train": len(self._data.train), "n_items": int(self._data.n_items),
                 "n_users": int(self._data.n_users), "n_test": len(self._data.test)}
        if self._identity is not None:
            # The one bundle this market's identity vouches for in this run (one run per worker).
            reply["endorsement"] = b64(endorse(self._identity, run_id=self._run_id, backend=self._cfg.secagg,
                                               name=self.market, bundle=bundle))
        return pack_json(reply)

    def _start(self, msg: dict) -> tuple[str, bytes]:
        if self._endpoint is None:
            raise ProtocolError("start before hello")
        roster = Roster({m: unb64(b) for m, b in msg["roster"].items()},
                        aggregator=unb64(msg.get("aggregator", "")))
        rules = self.rules
        if self._pinned is not None:
            # Exactly the pinned markets, each bundle endorsed by its pinned identity key: checked
            # before the pipeline (training) starts and before any secure-aggregation message.
            check_start_roster(self._pinned, msg, roster, run_id=self._run_id, backend=self._cfg.secagg)
        n = len(roster.markets)
        min_cohort = default_min_cohort(n) if rules.min_cohort is None else rules.min_cohort
        if min_cohort > n:
            raise PolicyError(f"{n} markets on the roster, this market's minimum cohort is {min_cohort}")
        # Market-level DP noise shares are sized by the federation size: it is the size of the
        # roster this market installs (pinned, where the deployment pins one), never a number
        # the aggregator states (claiming 1000 markets would shrink every market's share).
        if int(msg.get("n_markets", n)) != n:
            raise PolicyError(f"the aggregator says {msg['n_markets']} markets, the roster has {n}")
        policy = MarketPolicy.pin(roster, backends=rules.backends,
                                  privacy=dataclasses.asdict(self._cfg.privacy),
                                  min_cohort=min_cohort, colluders=rules.colluders)
        self._endpoint.install_roster(roster, policy=policy)
        self.pinned_roster = roster.digest().hex()
        _log.info("pinned roster sha256 %s (%d markets)", self.pinned_roster, n)
        if self.roster_out is not None:
            tmp = self.roster_out.with_suffix(".tmp")
            tmp.write_text(self.pinned_roster + "\n", encoding="ascii")
            tmp.replace(self.roster_out)
        # The shared-key list is the market's own; one offered by the aggregator must equal it.
        check_offered_keys(msg.get("shared_keys"), self._catalogue)
        meta = PublicMeta(index=self._index, n_train_max=int(msg["n_train_max"]), n_items_max=int(msg["n_items_max"]),
                          catalogue=self._catalogue)
        workload = msg.get("workload", {"name": "fedmm"})
        if workload.get("name") == "fedmm":
            trainers, hooks = self._privacy(n)
            self._pipeline = market_pipeline(self._data, self._cfg.model, method="fedmm", rounds=self._cfg.rounds,
                                             seed=self._cfg.seed, meta=meta, trainers=trainers, hooks=hooks)
        elif workload.get("name") == "secure-sum":
            self._pipeline = secure_sum_pipeline(length=int(workload["length"]), rounds=int(workload["rounds"]),
                                                 seed=self._cfg.seed, meta=meta, n_markets=n)
        else:
            raise ProtocolError(f"unknown workload {workload.get('name')!r}")
        return self._advance(None, first=True)

    def _privacy(self, n_markets: int):
        """DP-SGD trainers and round hooks for this market (plain ones for a non-private run)."""
        from ...federation.training import plain_trainers

        if not self._cfg.privacy.enabled:
            return plain_trainers, None
        if self.ledger_dir is None:
            raise ConfigError("ledger-dir", "a private run needs this market's ledger directory",
                              allowed="--ledger-dir DIR on the market worker")
        from ...federation.fedmm.privacy import privacy_session
        from ...privacy.ledger import Ledger

        offset, prior = 0, None
        if (self.ledger_dir / "ledger.sqlite").exists():
            if not self.resume:
                raise ConfigError("ledger-dir", f"{self.ledger_dir} already holds a privacy ledger",
                                  allowed="a new directory per run, or --resume to continue it")
            # A ledger this market began without an identity key (an older worker) continues
            # unsigned, as it was; a signed one must be continued with the key that began it.
            with Ledger.open(self.ledger_dir) as peek:
                key = self._identity if peek.signed else None
            # Reopening checks the run config against the ledger's (LedgerError on a mismatch).
            self._ledger = Ledger.open(self.ledger_dir, run_config=self._cfg.to_dict(), signing_key=key)
            offset = self._ledger.resume_state().next_round
            prior = self._ledger.spent_events()
        else:
            self.ledger_dir.mkdir(parents=True, exist_ok=True)
            # Signed heads with the market's identity key: checkable against the pinned roster
            # (`fedmm-secure budget check DIR --roster FILE`).
            self._ledger = Ledger.open(self.ledger_dir, run_config=self._cfg.to_dict(), create=True,
                                       signing_key=self._identity)
        method_index = self._cfg.methods.index("fedmm") if "fedmm" in self._cfg.methods else 0
        self._session = privacy_session(self._cfg, [self._data], method="fedmm", ledger=self._ledger,
                                        resume_offset=offset, prior_events=prior,
                                        method_index=method_index, federation_size=n_markets,
                                        catalogue=self._catalogue)
        return self._session, self._session

    def _advance(self, value, *, first: bool = False) -> tuple[str, bytes]:
        """Run the pipeline up to its next request and describe it to the coordinator."""
        try:
            req = next(self._pipeline) if first else self._pipeline.send(value)
            while isinstance(req, Barrier):  # round boundaries are local: this market is alone here
                req = self._pipeline.send(None)
        except StopIteration as stop:
            self._pending = None
            self.result = stop.value
            done = {"type": "done", "metrics": stop.value["metrics"]}
            if "run" in stop.value:   # a FedMM pipeline: the shared-key list it used (public)
                done["catalogue"] = catalogue_record(self._catalogue)
            if self._session is not None:
                done["privacy"] = self._session.summary()[self.market]
                # This market's ledger head, released with its epsilon (results.json).
                done["privacy"]["ledger"] = self._ledger.finish().to_dict()
                if self._session.market_level_summary() is not None:
                    done["privacy_market_level"] = self._session.market_level_summary()
                self._ledger.close()
            return "request", pack_json(done)
        self._pending = req
        if isinstance(req, SumRequest):
            return "request", pack_json({"type": "sum", "label": req.label, "round_id": req.round_id,
                                         "length": int(len(req.vector)), "max_abs": encode_bound(req.max_abs)})
        return "request", pack_json({"type": "broadcast", "label": req.label, "payload": b64(req.payload)})

    def _secagg(self, payload: bytes) -> tuple[str, bytes]:
        header, body = unpack_with_header(payload)
        req = self._pending
        if not isinstance(req, SumRequest):
            raise ProtocolError("secure-aggregation message while no sum is pending")
        if header.get("label") != req.label or header.get("round_id") != req.round_id:
            raise ProtocolError("secure-aggregation message for another sum")
        if header.get("begin"):
            # A sum's round begins once: a replayed or second "begin" must not reset it (fresh
            # keys for the same input would let the aggregator run the protocol twice).
            if self._round is not None:
                raise ProtocolError("this sum's round has already begun")
            ctx = RoundContext(run_id=self._run_id, round_id=req.round_id, participants=tuple(header["participants"]),
                               length=len(req.vector), max_abs=req.max_abs, label=req.label)
            rnd, stage = self._endpoint.begin_round(ctx, np.asarray(req.vector, dtype=np.float64)), 0
        elif self._round is None:
            raise ProtocolError("no round in progress")
        else:
            rnd, stage = self._round, self._stage
        h = self._hang_at
        if h is not None and (h.label, h.round_id, h.stage) == (req.label, req.round_id, stage):
            h.marker.write_text(f"{os.getpid()}\n")
            while True:  # a dead market: never answers; the test kills this process
                time.sleep(1.0)
        # The backend rejects tampered, replayed or out-of-order bytes without changing the
        # round; only a message it accepts moves this worker on.
        reply = rnd.handle(body)
        self._round, self._stage = rnd, stage + 1
        if reply is not None:
            return "secagg", reply
        result = rnd.result()
        self._round = None
        return self._advance(result)


def serve(worker: MarketWorker, *, host: str, port: int, ready_file: Path | None = None) -> None:
    """Serve ``worker`` on ``host:port`` until killed; one request per connection."""
    handle = guarded(worker.handle)
    with socket.create_server((host, port), backlog=8) as srv:
        if ready_file is not None:
            ready_file.write_text("ready\n")
        while True:
            conn, _ = srv.accept()
            with conn:
                try:
                    kind, payload = recv_frame(conn)
                except Exception as e:  # keep serving; the coordinator sees the failure
                    out_kind, out = error_reply(e)
                else:
                    out_kind, out = handle(kind, payload)
                try:
                    conn.sendall(pack_frame(out_kind, out))
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmm_secure.runtime.flower.worker --market M (--superexec ADDR | --listen ADDR)``.

    ``--superexec HOST:PORT``: run the SuperNode's ClientApp tasks in this process (SuperNode
    started with ``--isolation process --host HOST --port PORT``). ``--listen HOST:PORT``: serve
    the relay ClientApp of a SuperNode with stock isolation (a process per message; slower).
    """
    import argparse

    p = argparse.ArgumentParser(prog="fedmm-secure-flower-worker")
    p.add_argument("--market", required=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--superexec", metavar="HOST:PORT", help="the SuperNode's Runtime API (keep it on loopback)")
    mode.add_argument("--listen", metavar="HOST:PORT", help="relay mode: serve the ClientApp here (loopback)")
    p.add_argument("--root-certificates", help="CA of the SuperNode's Runtime API TLS certificate (default: plain HTTP on loopback)")
    p.add_argument("--poll-interval", type=float, default=0.05,
                   help="seconds between task polls of the SuperNode (with --doorbell: only in case a ring is lost)")
    p.add_argument("--doorbell", metavar="PATH",
                   help="Unix socket the SuperNode rings when a task is waiting (its FEDMM_SUPERNODE_DOORBELL)")
    p.add_argument("--ledger-dir", help="where this market's privacy ledger is written (required for DP runs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the ledger already in --ledger-dir (an interrupted run); its events stay spent")
    add_rule_arguments(p)
    p.add_argument("--roster-out", help="write the digest of the roster this market pinned here (hex)")
    p.add_argument("--startup-timeout", type=float, default=60.0,
                   help="seconds to wait for the SuperNode's Runtime API (flower local sets it from the number of markets)")
    p.add_argument("--ready-file")
    p.add_argument("--hang-at", help="test fault injection: LABEL:ROUND:STAGE")
    p.add_argument("--hang-marker")
    args = p.parse_args(argv)
    hang = None
    if args.hang_at:
        label, rnd, stage = args.hang_at.split(":")
        hang = HangAt(label=label, round_id=int(rnd), stage=int(stage), marker=Path(args.hang_marker))
    try:
        rules, identity = rules_from_arguments(args)
        worker = MarketWorker(market=args.market, rules=rules, hang_at=hang, identity=identity,
                              ledger_dir=Path(args.ledger_dir) if args.ledger_dir else None, resume=args.resume,
                              roster_out=Path(args.roster_out) if args.roster_out else None)
    except FedMMError as e:
        # Bad input (a key file open to others, a corrupt roster, ...): one line, exit 2.
        p.exit(2, f"{p.prog}: error: {e}\n")
    import torch
    torch.set_num_threads(1)
    # This process's stdout is the market's log file (``flower local``: flower_logs/worker-M.log):
    # the package's log records go there, one line each, tagged with the market.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[{args.market}] %(message)s"))
    package_log = logging.getLogger("fedmm_secure")
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    ready = Path(args.ready_file) if args.ready_file else None
    if args.listen:
        host, _, port = args.listen.rpartition(":")
        serve(worker, host=host, port=int(port), ready_file=ready)
        return 0
    from .executor import InProcessTaskExecutor, wait_for_runtime_api

    bell = None
    if args.doorbell:
        from .doorbell import Doorbell
        try:
            bell = Doorbell(args.doorbell)
        except OSError as e:
            p.exit(2, f"{p.prog}: error: --doorbell: {e}\n")
    wait_for_runtime_api(args.superexec, timeout=args.startup_timeout)
    certs = Path(args.root_certificates).read_bytes() if args.root_certificates else None
    executor = InProcessTaskExecutor(runtime_api_address=args.superexec, handle=guarded(worker.handle),
                                     insecure=certs is None, root_certificates=certs,
                                     poll_interval=args.poll_interval, doorbell=bell)
    if ready is not None:
        ready.write_text("ready\n")
    executor.run_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
