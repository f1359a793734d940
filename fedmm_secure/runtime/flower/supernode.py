"""``flower-supernode`` with a shorter idle poll (used by ``fedmm-secure flower local``).

Flower 1.40's SuperNode asks the SuperLink for a message, and when there is none it sleeps a
hard-coded 3 s (and 0.5 s while it waits for a reply to push), and retries a message's content
objects after 1 s, 2 s, ... when it sees the message before its objects. Our secure sum is a
sequence of 4-5 message stages, each sent only after every market answered the previous one, so
every stage meets a market that has just found nothing to do: the 3 s sleep alone would put a
12-15 s floor under each secure sum. This launcher runs Flower's own SuperNode entry point with
those sleeps capped at ``FEDMM_SUPERNODE_POLL`` seconds (default 0.1) and the object retry at
20 ms (see :mod:`.tuning`); nothing else changes (same arguments, same protocol, same TLS
and authentication options). The cost is more
``PullMessages`` requests to the SuperLink while idle (10 per second per market at 0.1 s).
The stock ``flower-supernode`` works with the same app, only slower.

    python -m fedmm_secure.runtime.flower.supernode [flower-supernode arguments]
"""

from __future__ import annotations

import os
import sys

from .tuning import capped_sleep_clock, fast_object_pulls

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    raw = os.environ.get("FEDMM_SUPERNODE_POLL", "0.1")
    try:
        cap = float(raw)
    except ValueError:
        raise SystemExit(f"FEDMM_SUPERNODE_POLL must be a number of seconds, got {raw!r}") from None
    # The loop looks up ``time`` in its module globals at every call.
    loop.time = capped_sleep_clock(cap)
    fast_object_pulls(loop)
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
