"""Flower ServerApp and ClientApp (Message API, Deployment Engine) carrying our own protocols.

* :data:`server_app` hosts the aggregator (:class:`~.coordinator.Coordinator`): it
  sends each SuperNode, stage by stage, the bytes our secure-aggregation backend emits and
  collects the replies. Flower's SecAgg+ is not used: every masking / CKKS message is our
  backend's own byte string inside a ConfigRecord.
* The market side is the market worker (:mod:`.worker`). With SuperNode
  ``--isolation process`` the worker executes the ClientApp tasks itself
  (:mod:`.executor`, calling :func:`reply_for`); with stock isolation Flower runs
  :data:`client_app` in a fresh process per message, which relays the message to the worker at
  ``node_config["worker-address"]`` (loopback) and so holds no state and imports no torch.

Run configuration keys (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
``config-json`` (the :class:`~fedmm_secure.config.RunConfig` as JSON), ``out-dir`` (where the
ServerApp writes ``results.json``), ``expected-markets``, ``stage-timeout``, ``step-timeout``,
``join-timeout``, ``poll-interval`` (reply poll, s), ``workload-json``, ``identity-key`` and
``roster`` (the aggregator's identity key file and the identity roster the markets pinned; empty:
no pre-run pinning).
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ...errors import ProtocolError
from .wire import RECORD_KEY, pack_frame, recv_frame, with_node_config

__all__ = ["client_app", "server_app", "FlowerLinks", "reply_for"]

_MESSAGE_TYPE = "query.fedmm"


def _record(kind: str, payload: bytes) -> RecordDict:
    return RecordDict({RECORD_KEY: ConfigRecord({"kind": kind, "payload": payload})})


def _unrecord(msg: Message) -> tuple[str, bytes]:
    rec = msg.content[RECORD_KEY]
    return str(rec["kind"]), bytes(rec["payload"])


# ---------------------------------------------------------------------------- ClientApp
client_app = ClientApp()


def reply_for(msg: Message, handle: Callable[[str, bytes], tuple[str, bytes]], *,
              node_config: Mapping | None = None) -> Message:
    """The reply to one of our messages, computed by the market worker's ``handle``.

    ``hello`` carries the SuperNode's node config (``market``, ``data``) to the worker: where a
    market's data lives is the market's setting, not the aggregator's.
    """
    if msg.metadata.message_type != _MESSAGE_TYPE:
        raise ProtocolError(f"unexpected Flower message type {msg.metadata.message_type!r}")
    kind, payload = _unrecord(msg)
    out_kind, out = handle(kind, with_node_config(kind, payload, node_config))
    return Message(_record(out_kind, out), reply_to=msg)


@client_app.query("fedmm")
def _relay(msg: Message, context: Context) -> Message:
    # Stock isolation (a ClientApp process per message): hand the message to the market
    # worker over loopback. With --isolation process the worker runs the task itself
    # (.executor) and this function is not used.
    host, _, port = str(context.node_config["worker-address"]).rpartition(":")
    timeout = float(context.node_config.get("worker-timeout", 600.0))

    def over_socket(kind: str, payload: bytes) -> tuple[str, bytes]:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(pack_frame(kind, payload))
            return recv_frame(s)

    return reply_for(msg, over_socket, node_config=context.node_config)


# ---------------------------------------------------------------------------- ServerApp
class FlowerLinks:
    """:class:`~.coordinator.MarketLinks` over a Flower :class:`Grid`."""

    def __init__(self, grid: Grid, *, expected: int, join_timeout: float, poll_interval: float = 0.05,
                 log=lambda s: None) -> None:
        self.grid = grid
        self.poll_interval = poll_interval
        self.log = log
        self.expected = expected
        self.join_timeout = join_timeout
        self.node_of: dict[str, int] = {}

    def _send(self, messages: Mapping[int, tuple[str, bytes]], timeout: float) -> dict[int, tuple[str, bytes]]:
        out = [Message(_record(k, p), dst_node_id=n, message_type=_MESSAGE_TYPE, ttl=max(timeout * 2, 60.0))
               for n, (k, p) in messages.items()]
        # Grid.send_and_receive polls every 3 s; a secure sum is 4-5 stages, so poll ourselves.
        pending = {i for i in self.grid.push_messages(out) if i}
        replies: dict[int, tuple[str, bytes]] = {}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            for r in got:
                pending.discard(r.metadata.reply_to_message_id)
                if r.has_error():
                    self.log(f"node {r.metadata.src_node_id}: Flower error {r.error.code}: {r.error.reason}")
                    continue  # Flower-level failure of that node: the coordinator sees a dropout
                replies[r.metadata.src_node_id] = _unrecord(r)
            if pending and not got:
                time.sleep(self.poll_interval)
        return replies

    def hello(self, payload: bytes, *, timeout: float) -> dict[str, tuple[str, bytes]]:
        deadline = time.monotonic() + self.join_timeout
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= self.expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        replies = self._send({n: ("hello", payload) for n in nodes}, timeout)
        out = {}
        for n, (k, p) in replies.items():
            market = json.loads(p.decode())["market"] if k == "hello" else f"node-{n}"
            self.node_of[market] = n
            out[market] = (k, p)
        return out

    def exchange(self, messages: Mapping[str, tuple[str, bytes]], *, timeout: float) -> dict[str, tuple[str, bytes]]:
        market_of = {n: m for m, n in self.node_of.items()}
        replies = self._send({self.node_of[m]: kp for m, kp in messages.items()}, timeout)
        return {market_of[n]: kp for n, kp in replies.items()}


server_app = ServerApp()


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    # Heavy imports stay here: the ClientApp processes import this module too.
    from ...config import config_from_dict
    from ...reports.run_report import write_json_atomic
    from .coordinator import Coordinator

    import flwr.superlink.grid.http_grid as http_grid

    from .tuning import fast_object_pulls

    fast_object_pulls(http_grid)  # reply objects may trail the reply by a few ms
    rc = context.run_config
    out_dir = Path(str(rc["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "flower_server.log"

    def log(line: str) -> None:
        with log_path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    try:
        cfg = config_from_dict(json.loads(str(rc["config-json"])))
        identity, roster = None, None
        if str(rc.get("identity-key", "")):
            from .keyfiles import read_identity_key, read_roster
            identity = read_identity_key(Path(str(rc["identity-key"])), flag="identity-key")
            roster = read_roster(Path(str(rc["roster"])), flag="roster")
        links = FlowerLinks(grid, expected=int(rc["expected-markets"]), join_timeout=float(rc["join-timeout"]),
                            poll_interval=float(rc.get("poll-interval", 0.05)), log=log)
        # One id per Flower run (a resumed run is a new one): every protocol message is bound to it.
        co = Coordinator(cfg=cfg, run_id=f"run-{cfg.seed}-{context.run_id}", links=links,
                         stage_timeout=float(rc["stage-timeout"]), step_timeout=float(rc["step-timeout"]),
                         workload=json.loads(str(rc.get("workload-json", '{"name": "fedmm"}'))), log=log,
                         identity=identity, identity_roster=roster)
        results = co.run()
        write_json_atomic(out_dir / "results.json", results)
        log("done")
    except Exception as e:
        write_json_atomic(out_dir / "error.json", {"error": f"{type(e).__name__}: {e}",
                                                   "traceback": traceback.format_exc()})
        raise
