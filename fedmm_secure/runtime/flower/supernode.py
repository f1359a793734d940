"""``flower-supernode`` with shorter waits (used by ``fedmm-secure flower local``).

Flower 1.40's SuperNode asks the SuperLink for a message, and when there is none it sleeps a
hard-coded 3 s (and 0.5 s at a time while it waits for the ClientApp's reply to push), and
retries a message's content objects after 1 s, 2 s, ... when it sees the message before its
objects. Our secure sum is a sequence of 3-7 message stages, each sent only after every market
answered the previous one, so every stage meets a market that has just found nothing to do: the
3 s sleep alone would put a 9-21 s floor under each secure sum. This launcher runs Flower's own
SuperNode entry point with the idle sleep capped at ``FEDMM_SUPERNODE_POLL`` seconds (default
0.1), the waits for the reply (a look-up in the SuperNode's own memory, no request) at 5 ms,
and the object retry at 20-50 ms (see :mod:`.tuning`). With ``FEDMM_SUPERNODE_DOORBELL=PATH``
it also rings the market worker's doorbell (:mod:`.doorbell`) each time it has stored a message
with its objects, so the worker need not poll for tasks. Nothing else changes (same arguments,
same protocol, same TLS and authentication options). The cost is more ``PullMessages`` requests
to the SuperLink while idle (10 per second per market at 0.1 s). The stock ``flower-supernode``
works with the same app, only slower.

    python -m fedmm_secure.runtime.flower.supernode [flower-supernode arguments]
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

from .doorbell import ring
from .tuning import LOCAL_WAIT_S, capped_sleep_clock, fast_object_pulls

__all__ = ["main", "ringing"]


def ringing(pull_and_store: Callable[..., int | None], doorbell: str) -> Callable[..., int | None]:
    """Flower's ``_pull_and_store_message``, ringing the worker's doorbell once it has stored a
    message and its objects (it returns the message's run id then, None if there was none)."""

    @functools.wraps(pull_and_store)
    def pull_store_and_ring(*args, **kwargs):
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            ring(doorbell)
        return run_id

    return pull_store_and_ring


def main(argv: list[str] | None = None) -> None:
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    raw = os.environ.get("FEDMM_SUPERNODE_POLL", "0.1")
    try:
        cap = float(raw)
    except ValueError:
        raise SystemExit(f"FEDMM_SUPERNODE_POLL must be a number of seconds, got {raw!r}") from None
    # The loop looks up ``time`` and its helpers in its module globals at every call.
    loop.time = capped_sleep_clock(cap, local_cap=min(cap, LOCAL_WAIT_S))
    fast_object_pulls(loop)
    bell = os.environ.get("FEDMM_SUPERNODE_DOORBELL", "")
    if bell:   # the worker's doorbell socket (it may not be bound yet: a ring is only a hint)
        loop._pull_and_store_message = ringing(loop._pull_and_store_message, bell)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
