"""Flower 1.40's hard-coded waits, shortened for a protocol of many small message stages.

Flower was tuned for federated *training*: one message per node per round, seconds to minutes
of work in between. Our secure sum is 3-7 stages of small messages, each sent only when every
market answered the previous one, so Flower's fixed waits land on every stage:

* the SuperNode sleeps 3 s whenever it asks the SuperLink for a message and there is none, and
  0.5 s at a time while it waits for the ClientApp's reply (and its content) to appear in its
  own in-memory state (:class:`capped_sleep_clock`, installed by :mod:`.supernode`: the first
  is a network request to the SuperLink and is capped at the idle poll, the second only a local
  look-up and is capped at :data:`LOCAL_WAIT_S`);
* a message becomes visible before its content objects are uploaded; whoever pulls it that
  early (SuperNode, ServerApp, our executor) retries the objects after 1 s, then 2 s, ...
  (:func:`fast_object_pulls`: 20 ms, doubling up to 50 ms);
* ``Grid.send_and_receive`` polls replies every 3 s (our ServerApp polls itself,
  :class:`~.app.FlowerLinks`).

None of this changes what is sent or checked; it costs more small requests while idle.
"""

from __future__ import annotations

import functools
import time as _time
from types import ModuleType

__all__ = ["capped_sleep_clock", "fast_object_pulls", "LOCAL_WAIT_S", "OBJECT_PULL_BACKOFF_S",
           "OBJECT_PULL_CAP_S"]

OBJECT_PULL_BACKOFF_S = 0.02
# An object still in transit is usually there within 0.1-0.3 s (the uploader pushes it right
# after the message); a cap of 0.2 s let a puller oversleep its arrival by up to 0.16 s on every
# hop. Retries of a 50 ms cap are a handful of small requests per message.
OBJECT_PULL_CAP_S = 0.05
# Flower's SuperNode sleeps of under a second are waits on its own in-memory state (the
# ClientApp's reply and its objects), not requests: a short cap costs a few look-ups per stage.
LOCAL_WAIT_S = 0.005
_LOCAL_BELOW_S = 1.0


class capped_sleep_clock:  # noqa: N801 - stands in for the ``time`` module
    """The ``time`` module, except that ``sleep`` never sleeps longer than ``cap`` seconds, and
    sleeps Flower asks for of under a second (its local waits) no longer than ``local_cap``."""

    def __init__(self, cap: float, local_cap: float | None = None) -> None:
        local_cap = cap if local_cap is None else local_cap
        if not (cap > 0 and local_cap > 0):
            raise ValueError(f"poll caps must be positive, got {cap!r} and {local_cap!r}")
        self.cap, self.local_cap = cap, local_cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.local_cap if seconds < _LOCAL_BELOW_S else self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def fast_object_pulls(module: ModuleType) -> None:
    """Make ``module``'s ``pull_objects`` (imported from Flower's inflatable utils) retry fast."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if getattr(module, "pull_objects", None) is None:
        raise AttributeError(f"{module.__name__} has no pull_objects to tune (Flower version changed?)")
    module.pull_objects = functools.partial(pull_objects, initial_backoff=OBJECT_PULL_BACKOFF_S,
                                            backoff_cap=OBJECT_PULL_CAP_S)
