"""Moves one round's messages between endpoints in process (the embedded runtime's transport).

Every byte the aggregator receives can be handed to ``recorder`` (tests use it to show that the
aggregator's view holds no individual update), and dropouts can be injected at any stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from .base import AggregatorEndpoint, MarketEndpoint, RoundContext

__all__ = ["RoundOutcome", "run_round"]

Recorder = Callable[[str, int, bytes], None]


@dataclass
class RoundOutcome:
    results: dict[str, np.ndarray]          # what each surviving market obtained (the sum)
    survivors: tuple[str, ...]
    bytes_up: dict[str, int] = field(default_factory=dict)     # market -> bytes sent to aggregator
    bytes_down: dict[str, int] = field(default_factory=dict)   # market -> bytes received
    stages: int = 0
    reports: dict[str, dict] = field(default_factory=dict)


def run_round(
    aggregator: AggregatorEndpoint,
    markets: Mapping[str, MarketEndpoint],
    ctx: RoundContext,
    vectors: Mapping[str, np.ndarray],
    *,
    drop_at: Mapping[str, int] | None = None,
    recorder: Recorder | None = None,
) -> RoundOutcome:
    """Run one aggregation round.

    ``drop_at[m] = s`` makes market ``m`` go silent from stage ``s`` on (stage 0 is the first
    message the aggregator sends); such a market is absent from the sum if it dropped before
    submitting its input.
    """
    drop_at = dict(drop_at or {})
    server = aggregator.begin_round(ctx)
    clients = {m: markets[m].begin_round(ctx, np.asarray(vectors[m], dtype=np.float64))
               for m in ctx.participants}
    up = {m: 0 for m in ctx.participants}
    down = {m: 0 for m in ctx.participants}
    outbox = server.start()
    stage = 0
    while True:
        final = server.done
        for m, msg in outbox.items():
            if m in drop_at and stage >= drop_at[m]:
                continue
            down[m] += len(msg)
            reply = clients[m].handle(msg)
            if reply is not None:
                up[m] += len(reply)
                if recorder is not None:
                    recorder(m, stage, reply)
                if not final:
                    # One reply at a time: the aggregator never holds every upload at once.
                    server.receive(m, reply)
            del reply
        if final:
            break
        outbox = server.end_stage()
        stage += 1
    survivors = server.survivors
    results = {m: clients[m].result() for m in survivors
               if not (m in drop_at) and clients[m].done}
    return RoundOutcome(results, survivors, up, down, stage + 1,
                        {m: clients[m].report() for m in ctx.participants})
