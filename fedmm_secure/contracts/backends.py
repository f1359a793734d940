"""The secure-aggregation backend contract: what every registered backend must compute and refuse.

A check takes a backend ``name`` (registered with
:func:`~fedmm_secure.secagg.registry.register_backend`) and that backend's ``options``. The rules:

* **correct sum**: for every surviving market, the decoded result equals the plain sum of the
  (clipped) inputs within the error bound the market's round reports
  (``report()["max_abs_error_bound"]``, 0 for an exact backend), with one bound for all
  coordinates or one per coordinate;
* **malformed input refused**: a vector of the wrong shape or with NaN is refused when the round
  starts, garbage and replayed or foreign-round messages are refused by both sides
  (:class:`~fedmm_secure.errors.FedMMError`), and a refused message changes no state;
* **plain only by name**: a backend that is not secure (``secure = False``) is refused by
  :func:`~fedmm_secure.secagg.registry.create_backend` unless ``allow_insecure=True``; a secure
  one is built without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, FedMMError
from ..secagg.base import AggregatorEndpoint, MarketEndpoint, RoundContext, Roster
from ..secagg.driver import run_round
from ..secagg.policy import MarketPolicy
from ..secagg.registry import create_backend
from .base import ContractViolation, require

__all__ = ["BACKEND_CHECKS", "check_backend", "connect"]

MARKETS = ("m0", "m1", "m2")


def connect(name: str, options: Mapping[str, Any], ids: tuple[str, ...] = MARKETS
            ) -> tuple[AggregatorEndpoint, dict[str, MarketEndpoint]]:
    """Build backend ``name`` and wire an aggregator and ``ids`` markets through one roster."""
    backend = create_backend(name, allow_insecure=True, **dict(options))
    markets = {m: backend.create_market(m) for m in ids}
    aggregator = backend.create_aggregator()
    # As a deployment does: the roster carries the aggregator's key, and every market pins it in
    # its own policy (this backend, not private, every market in every sum).
    roster = Roster({m: e.public_bundle() for m, e in markets.items()},
                    aggregator=aggregator.public_bundle())
    policy = MarketPolicy.pin(roster, backends={backend.name}, privacy={}, min_cohort=len(ids))
    for e in markets.values():
        e.install_roster(roster, policy=policy)
    aggregator.install_roster(roster)
    return aggregator, markets


def _refuses(action: Callable[[], object], what: str) -> None:
    try:
        action()
    except FedMMError:
        return
    except Exception as exc:  # refusing with a foreign exception type leaks through the federation's handlers
        raise ContractViolation(f"{what}: refused with {type(exc).__name__} ({exc}), expected a FedMMError") from exc
    raise ContractViolation(f"{what} was accepted")


def _sum_within_bound(name: str, options: Mapping[str, Any], bound: float | np.ndarray, round_id: int) -> None:
    aggregator, markets = connect(name, options)
    rng = np.random.default_rng(round_id)
    length = 23
    limit = np.broadcast_to(np.asarray(bound, dtype=np.float64), (length,))
    # Inputs partly outside the bound: the contract covers clipping too.
    vectors = {m: rng.uniform(-1.2, 1.2, length) * limit for m in MARKETS}
    ctx = RoundContext(run_id="contract", round_id=round_id, participants=MARKETS, length=length, max_abs=bound)
    out = run_round(aggregator, markets, ctx, vectors)
    require(tuple(out.survivors) == MARKETS, f"every market answered, yet survivors are {out.survivors}")
    want = sum(np.clip(v, -limit, limit) for v in vectors.values())
    for m in MARKETS:
        require(m in out.results, f"market {m} got no result")
        err = float(np.max(np.abs(out.results[m] - want)))
        stated = out.reports[m].get("max_abs_error_bound")
        if not isinstance(stated, (int, float)) or stated < 0:
            raise ContractViolation("a market's round report must state max_abs_error_bound (>= 0)")
        require(err <= float(stated) + 1e-9 * float(np.max(np.abs(want))) + 1e-12,
                f"decoded sum is off by {err:.3g}, more than the stated bound {stated:.3g}")


def check_sum_equals_plain_sum(name: str, options: Mapping[str, Any]) -> None:
    _sum_within_bound(name, options, 1.5, 0)


def check_sum_with_per_coordinate_bounds(name: str, options: Mapping[str, Any]) -> None:
    _sum_within_bound(name, options, np.linspace(0.1, 4.0, 23), 1)


def check_refuses_malformed_input(name: str, options: Mapping[str, Any]) -> None:
    aggregator, markets = connect(name, options)
    ctx = RoundContext(run_id="contract", round_id=0, participants=MARKETS, length=4, max_abs=1.0)
    other = RoundContext(run_id="contract", round_id=1, participants=MARKETS, length=4, max_abs=1.0)
    _refuses(lambda: markets["m0"].begin_round(ctx, np.zeros(3)), "an input of the wrong length")
    _refuses(lambda: markets["m0"].begin_round(ctx, np.zeros((4, 1))), "an input of the wrong shape")
    _refuses(lambda: markets["m0"].begin_round(ctx, np.array([0.0, np.nan, 0.0, 0.0])), "an input holding NaN")
    server = aggregator.begin_round(ctx)
    first = server.start()
    target = sorted(first)[0]   # some backends address only some markets first (CKKS: the key holder)
    client = markets[target].begin_round(ctx, np.zeros(4))
    foreign = aggregator.begin_round(other).start()
    _refuses(lambda: client.handle(foreign.get(target, next(iter(foreign.values())))), "a message of another round")
    _refuses(lambda: client.handle(b"\x00garbage"), "a garbage message")
    reply = client.handle(first[target])   # the refusals above changed nothing
    if reply is None:
        raise ContractViolation("the first stage message must be answered")
    _refuses(lambda: client.handle(first[target]), "a replayed message")
    _refuses(lambda: server.handle({target: reply[:-1]}), "a truncated reply")


def check_insecure_only_by_name(name: str, options: Mapping[str, Any]) -> None:
    backend = create_backend(name, allow_insecure=True, **dict(options))
    require(isinstance(backend.secure, bool), "a backend must declare secure = True or False")
    if backend.secure:
        try:
            create_backend(name, allow_insecure=False, **dict(options))
        except ConfigError as exc:
            raise ContractViolation(f"a secure backend was refused without allow_insecure: {exc}") from exc
    else:
        _refuses(lambda: create_backend(name, allow_insecure=False, **dict(options)),
                 "an insecure backend created without allow_insecure=True")


BACKEND_CHECKS: dict[str, Callable[[str, Mapping[str, Any]], None]] = {
    "sum_equals_plain_sum": check_sum_equals_plain_sum,
    "sum_with_per_coordinate_bounds": check_sum_with_per_coordinate_bounds,
    "refuses_malformed_input": check_refuses_malformed_input,
    "insecure_only_by_name": check_insecure_only_by_name,
}


def check_backend(name: str, **options: Any) -> None:
    """Run every backend check on registered backend ``name`` built with ``options``; raises
    :class:`ContractViolation` on the first broken rule."""
    for check in BACKEND_CHECKS.values():
        check(name, options)
