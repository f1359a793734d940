"""Flower ServerApp and ClientApp (Message API, Deployment Engine) carrying our own protocols.

* :data:`server_app` hosts the aggregator (:class:`~.flower_coordinator.Coordinator`): it
  sends each SuperNode, stage by stage, the bytes our secure-aggregation backend emits and
  collects the replies. Flower's SecAgg+ is not used: every masking / CKKS message is our
  backend's own byte string inside a ConfigRecord.
* :data:`client_app` relays each message to the market's worker (:mod:`.flower_worker`) at
  ``node_config["worker-address"]`` (loopback, on the market's machine) and returns its reply.
  Flower 1.40 runs each ClientApp message in a fresh process, so the relay holds no state and
  imports no torch.

Run configuration keys (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
``config-json`` (the :class:`~fedmm_secure.config.RunConfig` as JSON), ``out-dir`` (where the
ServerApp writes ``results.json``), ``expected-markets``, ``stage-timeout``, ``step-timeout``,
``join-timeout``.
"""

from __future__ import annotations

import json
import socket
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .flower_wire import RECORD_KEY, pack_frame, recv_frame

__all__ = ["client_app", "server_app", "FlowerLinks"]

_MESSAGE_TYPE = "query.fedmm"


def _record(kind: str, payload: bytes) -> RecordDict:
    return RecordDict({RECORD_KEY: ConfigRecord({"kind": kind, "payload": payload})})


def _unrecord(msg: Message) -> tuple[str, bytes]:
    rec = msg.content[RECORD_KEY]
    return str(rec["kind"]), bytes(rec["payload"])


# ---------------------------------------------------------------------------- ClientApp
client_app = ClientApp()


@client_app.query("fedmm")
def _relay(msg: Message, context: Context) -> Message:
    host, _, port = str(context.node_config["worker-address"]).rpartition(":")
    timeout = float(context.node_config.get("worker-timeout", 600.0))
    kind, payload = _unrecord(msg)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(pack_frame(kind, payload))
        out_kind, out = recv_frame(s)
    return Message(_record(out_kind, out), reply_to=msg)


# ---------------------------------------------------------------------------- ServerApp
class FlowerLinks:
    """:class:`~.flower_coordinator.MarketLinks` over a Flower :class:`Grid`."""

    def __init__(self, grid: Grid, *, expected: int, join_timeout: float, log=lambda s: None) -> None:
        self.grid = grid
        self.log = log
        self.expected = expected
        self.join_timeout = join_timeout
        self.node_of: dict[str, int] = {}

    def _send(self, messages: Mapping[int, tuple[str, bytes]], timeout: float) -> dict[int, tuple[str, bytes]]:
        out = [Message(_record(k, p), dst_node_id=n, message_type=_MESSAGE_TYPE, ttl=max(timeout * 2, 60.0))
               for n, (k, p) in messages.items()]
        replies = {}
        for r in self.grid.send_and_receive(out, timeout=timeout):
            if r.has_error():
                self.log(f"node {r.metadata.src_node_id}: Flower error {r.error.code}: {r.error.reason}")
                continue  # Flower-level failure of that node: the coordinator sees a dropout
            replies[r.metadata.src_node_id] = _unrecord(r)
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
    from ..config import config_from_dict
    from ..reports.run_report import write_json_atomic
    from .flower_coordinator import Coordinator

    rc = context.run_config
    out_dir = Path(str(rc["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "flower_server.log"

    def log(line: str) -> None:
        with log_path.open("a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    try:
        cfg = config_from_dict(json.loads(str(rc["config-json"])))
        links = FlowerLinks(grid, expected=int(rc["expected-markets"]), join_timeout=float(rc["join-timeout"]), log=log)
        co = Coordinator(cfg=cfg, run_id=f"run-{cfg.seed}", links=links, stage_timeout=float(rc["stage-timeout"]),
                         step_timeout=float(rc["step-timeout"]), log=log)
        results = co.run()
        write_json_atomic(out_dir / "results.json", results)
        log("done")
    except Exception as e:
        write_json_atomic(out_dir / "error.json", {"error": f"{type(e).__name__}: {e}",
                                                   "traceback": traceback.format_exc()})
        raise
