"""Secure aggregation: the interface, the in-process driver and the backend registry."""

from .base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                   SecureAggregator, ServerRound)
from .driver import RoundOutcome, run_round
from .policy import DEFAULT_COLLUDERS, MarketPolicy, default_min_cohort, min_threshold
from .registry import available_backends, create_backend, register_backend

__all__ = [
    "AggregatorEndpoint", "ClientRound", "MarketEndpoint", "RoundContext", "Roster",
    "SecureAggregator", "ServerRound", "RoundOutcome", "run_round", "available_backends",
    "create_backend", "register_backend", "MarketPolicy", "DEFAULT_COLLUDERS", "default_min_cohort",
    "min_threshold",
]
