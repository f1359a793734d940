"""Flower 1.40's hard-coded waits, shortened for a protocol of many small message stages.

Flower was tuned for federated *training*: one message per node per round, seconds to minutes
of work in between. Our secure sum is 4-5 stages of small messages, each sent only when every
market answered the previous one, so three of Flower's fixed waits land on every stage:

* the SuperNode sleeps 3 s whenever it asks the SuperLink for a message and there is none
  (:func:`capped_sleep_clock`, installed by :mod:`.supernode`);
* a message becomes visible before its content objects are uploaded; whoever pulls it that
  early (SuperNode, ServerApp, our executor) retries the objects after 1 s, then 2 s, ...
  (:func:`fast_object_pulls`: 20 ms, capped at 0.2 s);
* ``Grid.send_and_receive`` polls replies every 3 s (our ServerApp polls itself,
  :class:`~.app.FlowerLinks`).

None of this changes what is sent or checked; it costs more small requests while idle.
"""

from __future__ import annotations

import functools
import time as _time
from types import ModuleType

__all__ = ["capped_sleep_clock", "fast_object_pulls", "OBJECT_PULL_BACKOFF_S", "OBJECT_PULL_CAP_S"]

OBJECT_PULL_BACKOFF_S = 0.02
OBJECT_PULL_CAP_S = 0.2


class capped_sleep_clock:  # noqa: N801 - stands in for the ``time`` module
    """The ``time`` module, except that ``sleep`` never sleeps longer than ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        if not cap > 0:
            raise ValueError(f"poll cap must be positive, got {cap!r}")
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def fast_object_pulls(module: ModuleType) -> None:
    """Make ``module``'s ``pull_objects`` (imported from Flower's inflatable utils) retry fast."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    if getattr(module, "pull_objects", None) is None:
        raise AttributeError(f"{module.__name__} has no pull_objects to tune (Flower version changed?)")
    module.pull_objects = functools.partial(pull_objects, initial_backoff=OBJECT_PULL_BACKOFF_S,
                                            backoff_cap=OBJECT_PULL_CAP_S)
