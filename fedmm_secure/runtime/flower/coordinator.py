"""The aggregator's side of a distributed FedMM run, independent of how messages travel.

The coordinator hosts the backend's :class:`~fedmm_secure.secagg.base.AggregatorEndpoint`
(public material only) and drives the run in lockstep: every live market runs its own pipeline
(:mod:`fedmm_secure.federation.fedmm.pipeline`) up to its next request; when all of them ask for the same secure sum,
the coordinator runs that round stage by stage, sending each market the aggregator's bytes and
collecting the replies. A market that does not answer a stage within ``stage_timeout`` has
dropped out: the backend's dropout path finishes the round without it, and it takes no further
part in the run. :class:`MarketLinks` is the transport (Flower messages in the ServerApp, plain
calls in process).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np

from ...config import RunConfig
from ...errors import AbortError, ConfigError, IntegrityError, ProtocolError
from ...primitives.keys import IdentityPrivateKey
from ...secagg import Roster, RoundContext, create_backend
from ...secagg.identity import AGGREGATOR_ROLE, IdentityRoster, endorse, verify_endorsement
from .wire import (b64, error_reply, pack_json, pack_with_header, unb64, unpack_json,
                   with_node_config)

__all__ = ["MarketLinks", "Coordinator", "InProcessLinks"]

Reply = tuple[str, bytes]


class MarketLinks(Protocol):
    def hello(self, payload: bytes, *, timeout: float) -> dict[str, Reply]:
        """Send ``hello`` to every node; replies keyed by the market each node says it hosts."""

    def exchange(self, messages: Mapping[str, Reply], *, timeout: float) -> dict[str, Reply]:
        """Send one message per market; returns the replies that arrived within ``timeout``."""


class InProcessLinks:
    """Calls :class:`~.worker.MarketWorker` objects directly (tests, reference runs)."""

    def __init__(self, workers: Mapping, *, node_configs: Mapping[str, Mapping] | None = None) -> None:
        self._workers = dict(workers)
        self._nodes = dict(node_configs or {})   # market -> its SuperNode's node config
        self.silent: set[str] = set()

    def _call(self, m: str, kind: str, payload: bytes) -> Reply:
        try:
            return self._workers[m].handle(kind, with_node_config(kind, payload, self._nodes.get(m)))
        except Exception as e:
            return error_reply(e)

    def hello(self, payload: bytes, *, timeout: float) -> dict[str, Reply]:
        return {m: self._call(m, "hello", payload) for m in self._workers if m not in self.silent}

    def exchange(self, messages: Mapping[str, Reply], *, timeout: float) -> dict[str, Reply]:
        return {m: self._call(m, k, p) for m, (k, p) in messages.items() if m not in self.silent}


class Coordinator:
    """Drives one run. ``identity`` / ``identity_roster``: the aggregator's long-term key and the
    identity roster the markets pinned before the run; with them ``hello`` carries the roster and
    ``start`` the markets' endorsements of their per-run bundles plus the aggregator's own, so
    pinning markets can check the per-run roster against their pin."""

    def __init__(self, *, cfg: RunConfig, run_id: str, links: MarketLinks, stage_timeout: float,
                 step_timeout: float, workload: dict | None = None, log=lambda s: None,
                 backend_options: dict | None = None, identity: IdentityPrivateKey | None = None,
                 identity_roster: IdentityRoster | None = None) -> None:
        if (identity is None) != (identity_roster is None):
            raise ConfigError("identity-key", "the aggregator's identity key and the identity roster go together")
        if identity is not None and identity.public_key() != identity_roster.aggregator:
            raise ConfigError("identity-key", "the roster names another aggregator identity key")
        self.identity, self.identity_roster = identity, identity_roster
        self.cfg, self.run_id, self.links = cfg, run_id, links
        self.backend_options = dict(backend_options or {})
        self.workload = dict(workload or {"name": "fedmm"})
        if self.workload["name"] not in ("fedmm", "secure-sum"):
            raise ProtocolError(f"unknown workload {self.workload['name']!r}")
        self.stage_timeout, self.step_timeout = stage_timeout, step_timeout
        self.log = log
        self.sums: list[dict] = []
        self.bytes_up: dict[str, list[int]] = {}
        self.dropped: dict[str, str] = {}   # market -> where it dropped

    # ------------------------------------------------------------------ helpers
    def _check(self, replies: Mapping[str, Reply], expect: str) -> dict[str, bytes]:
        out = {}
        for m, (kind, payload) in replies.items():
            if kind == "error":
                # A market whose worker failed is treated like one that dropped out; the
                # message is kept for the report.
                self.log(f"market {m} failed: {payload.decode(errors='replace')}")
                continue
            if kind != expect:
                raise ProtocolError(f"market {m} answered {kind!r}, expected {expect!r}")
            out[m] = payload
        return out

    def _drop(self, markets, where: str) -> None:
        for m in markets:
            if m in self.alive:
                self.alive.discard(m)
                self.dropped[m] = where
                self.log(f"market {m} dropped out at {where}")

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        hello_msg = {"config": cfg.to_dict(), "run_id": self.run_id}
        if self.identity_roster is not None:
            hello_msg["identity_roster"] = self.identity_roster.to_json()
        hello = self._check(self.links.hello(pack_json(hello_msg), timeout=self.step_timeout), "hello")
        info = {m: unpack_json(p) for m, p in hello.items()}
        if not info:
            raise AbortError("no market answered hello")
        for m, i in info.items():
            if i.get("market") != m:
                raise ProtocolError(f"node for {m} says it hosts {i.get('market')!r}")
        self.order = sorted(info, key=lambda m: info[m]["index"])
        if len({info[m]["index"] for m in info}) != len(info):
            raise ProtocolError("two markets claim the same position in the market order")
        if self.identity_roster is not None:
            self._check_endorsements(info)
        backend = create_backend(cfg.secagg, allow_insecure=cfg.secagg == "plain", **self.backend_options)
        aggregator = backend.create_aggregator()
        roster_b = {m: unb64(info[m]["bundle"]) for m in self.order}
        aggregator.install_roster(Roster(roster_b, aggregator=aggregator.public_bundle()))
        self.alive = set(self.order)
        start_msg = {"roster": {m: info[m]["bundle"] for m in self.order},
                     "aggregator": b64(aggregator.public_bundle()),
                     "n_train_max": max(i["n_train"] for i in info.values()),
                     "n_items_max": max(i["n_items"] for i in info.values()),
                     "n_markets": len(self.order), "workload": self.workload}
        if self.identity is not None:
            # Relayed as the markets sent them: each market checks every one against its pin.
            start_msg["endorsements"] = {m: info[m]["endorsement"] for m in self.order if "endorsement" in info[m]}
            start_msg["aggregator_endorsement"] = b64(endorse(
                self.identity, run_id=self.run_id, backend=cfg.secagg, name=AGGREGATOR_ROLE,
                bundle=aggregator.public_bundle(), role=AGGREGATOR_ROLE))
        start = pack_json(start_msg)
        replies = self._check(self.links.exchange({m: ("start", start) for m in self.order},
                                                  timeout=self.step_timeout), "request")
        self._drop(self.alive - set(replies), "start")
        headers = {m: unpack_json(p) for m, p in replies.items()}
        metrics: dict[str, dict] = {}
        while True:
            kinds = {h["type"] for h in headers.values()}
            if not headers:
                raise AbortError("every market dropped out")
            if len(kinds) != 1:
                raise ProtocolError(f"markets out of step: {sorted(kinds)}")
            kind = kinds.pop()
            if kind == "done":
                metrics = {m: h["metrics"] for m, h in headers.items()}
                privacy = {m: h["privacy"] for m, h in headers.items() if "privacy" in h}
                market_level = {m: h["privacy_market_level"] for m, h in headers.items()
                                if "privacy_market_level" in h}
                catalogue = {m: h["catalogue"] for m, h in headers.items() if "catalogue" in h}
                break
            if kind == "broadcast":
                headers = self._broadcast(headers)
            elif kind == "sum":
                headers = self._sum(aggregator, headers)
            else:
                raise ProtocolError(f"unknown request {kind!r}")
        if self.workload["name"] != "fedmm":
            return {"runtime": "flower", "workload": self.workload, "markets": metrics,
                    "dropped": dict(self.dropped), "timing_s": round(time.perf_counter() - t_start, 2),
                    "secagg": {"backend": backend.name, "secure": backend.secure, "rounds": self.sums}}
        results = self._results(info, metrics, time.perf_counter() - t_start, backend)
        if privacy:
            # Each market's own accounting, from its own ledger (ledger-dir on its machine).
            results["privacy"] = privacy
            results["privacy_by_method"] = {"fedmm": {m: v["epsilon"] for m, v in privacy.items()}}
        if catalogue:
            # Each market's shared-key list (size, SHA-256), built by the market itself.
            results["catalogue"] = catalogue
        if market_level:
            results["privacy_market_level"] = next(iter(market_level.values()))
        return results

    def _check_endorsements(self, info: Mapping[str, dict]) -> None:
        """Every market that answered ``hello`` is on the identity roster and endorsed its bundle
        with its pinned key; otherwise the pinning markets would refuse ``start``, so the run
        stops here naming the market (a run with markets missing is left to the markets)."""
        for m, i in info.items():
            key = self.identity_roster.markets.get(m)
            try:
                if key is None:
                    raise AbortError(f"market {m} is not on the identity roster")
                verify_endorsement(key, unb64(str(i.get("endorsement", ""))), run_id=self.run_id,
                                   backend=self.cfg.secagg, name=m, bundle=unb64(i["bundle"]))
            except IntegrityError:
                raise AbortError(f"market {m}'s bundle is not endorsed by its pinned identity key") from None

    def _broadcast(self, headers: dict[str, dict]) -> dict[str, dict]:
        labels = {h["label"] for h in headers.values()}
        if len(labels) != 1:
            raise ProtocolError(f"markets out of step: {sorted(labels)}")
        # The embedded runtime starts every market from the first market's initial shared
        # parameters; here the first live market in the run's order provides them.
        source = next(m for m in self.order if m in headers)
        payload = unb64(headers[source]["payload"])
        replies = self._check(self.links.exchange({m: ("broadcast", payload) for m in headers},
                                                  timeout=self.step_timeout), "request")
        self._drop(set(headers) - set(replies), f"broadcast {labels.pop()}")
        return {m: unpack_json(p) for m, p in replies.items()}

    def _sum(self, aggregator, headers: dict[str, dict]) -> dict[str, dict]:
        keyset = {(h["label"], h["round_id"], h["length"], str(h["max_abs"])) for h in headers.values()}
        if len(keyset) != 1:
            raise ProtocolError("markets asked for different sums")
        h = next(iter(headers.values()))
        from .wire import decode_bound
        participants = tuple(sorted(headers))
        ctx = RoundContext(run_id=self.run_id, round_id=h["round_id"], participants=participants,
                           length=h["length"], max_abs=decode_bound(h["max_abs"]), label=h["label"])
        t0 = time.perf_counter()
        server = aggregator.begin_round(ctx)
        outbox = server.start()
        stage = 0
        up = {m: 0 for m in participants}
        stage_s: list[float] = []
        begun: set[str] = set()
        while True:
            msgs = {}
            for m, body in outbox.items():
                if m not in self.alive:
                    continue
                header = {"label": ctx.label, "round_id": ctx.round_id}
                # A market's first message of the sum opens its round; with CKKS only the key
                # holder hears from the aggregator at stage 0, the others first at stage 1.
                if m not in begun:
                    header.update(begin=True, participants=list(participants))
                    begun.add(m)
                msgs[m] = ("secagg", pack_with_header(header, body))
            final = server.done
            # The reply to the result message is the market's next request, so it includes
            # the local training that comes before it.
            ts = time.perf_counter()
            raw = self.links.exchange(msgs, timeout=self.step_timeout if final else self.stage_timeout)
            stage_s.append(time.perf_counter() - ts)
            replies = self._check(raw, "request" if final else "secagg")
            self._drop(set(msgs) - set(replies), f"{ctx.label} round {ctx.round_id} stage {stage}")
            if final:
                break
            for m, p in replies.items():
                up[m] += len(p)
            outbox = server.handle(replies)
            stage += 1
        latency = time.perf_counter() - t0
        # Up to the result's delivery: the last exchange's reply waits for the next local step.
        protocol = latency - stage_s[-1]
        survivors = tuple(server.survivors)
        self._drop(self.alive - set(survivors), f"{ctx.label} round {ctx.round_id} (not a survivor)")
        for m, b in up.items():
            self.bytes_up.setdefault(m, []).append(b)
        self.sums.append({"label": ctx.label, "round_id": ctx.round_id, "participants": list(participants),
                          "survivors": list(survivors), "stages": stage + 1, "latency_s": latency,
                          "protocol_s": protocol, "stage_s": [round(x, 4) for x in stage_s]})
        self.log(f"{ctx.label} round {ctx.round_id}: {len(survivors)}/{len(participants)} markets, "
                 f"protocol {protocol:.2f} s, with next local step {latency:.2f} s "
                 f"(stages {', '.join(f'{x:.2f}' for x in stage_s)})")
        return {m: unpack_json(p) for m, p in replies.items() if m in self.alive}

    def _results(self, info: dict, metrics: dict, elapsed: float, backend) -> dict:
        cfg = self.cfg
        names = self.order
        results: dict = {
            "config": cfg.to_dict(),
            "runtime": "flower",
            "methods": ["fedmm"],
            "markets": {m: ({"fedmm": metrics[m]} if m in metrics else {}) for m in names},
            "market_sizes": {m: {"users": info[m]["n_users"], "items": info[m]["n_items"],
                                 "train_rows": info[m]["n_train"], "test_rows": info[m]["n_test"]} for m in names},
            # Pooled NMI needs every market's item codes in one place: not computed distributed.
            "nmi_level1_pooled": {},
            "timing_s": {"fedmm": round(elapsed, 2)},
            "dropped": dict(self.dropped),
            "secagg": {
                "backend": backend.name,
                "secure": backend.secure,
                "bytes_up_per_market_per_round": {m: float(np.mean(b)) for m, b in self.bytes_up.items()},
                "aggregations": len(self.sums),
                "rounds": self.sums,
            },
        }
        finished = [m for m in names if m in metrics]
        sparse = [m for m in finished if m != names[0]] if cfg.data == "synthetic" else finished
        results["summary"] = {"fedmm": {
            "mean_auc": float(np.nanmean([metrics[m]["auc"] for m in finished])) if finished else float("nan"),
            "mean_auc_sparse": float(np.nanmean([metrics[m]["auc"] for m in sparse])) if sparse else float("nan"),
        }}
        return results
