"""What one market's FedMM pipeline asks of whoever drives it, and the bytes it may relay.

A market's pipeline (:mod:`.pipeline`) is a coroutine that yields requests and receives
answers, so the method does not know which runtime carries it:

* :class:`SumRequest` -- "add this vector to the other markets' through the secure sum"; the
  caller sends back the float64 sum (or ``None`` if the market was dropped from that sum);
* :class:`BroadcastRequest` -- "everyone starts from the first market's initial shared
  parameters" (drawn from the public seed and public sizes only, never from data, so relaying
  them through the aggregator reveals nothing about any market's records);
* :class:`Barrier` -- "a training round has ended here" (after the round's privacy hooks). It
  carries nothing and never leaves the market; an in-process driver uses it to keep the markets'
  rounds in step, a lone market resumes at once.

Public metadata every market needs (:class:`PublicMeta`): the market's index in the run's market
order (it seeds the market's generator), the largest training-set size (FedAvg weights) and the
largest item count (codebook-statistics bound).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["PublicMeta", "SumRequest", "BroadcastRequest", "Barrier", "Request", "Pipeline",
           "codebook_digest", "state_to_bytes", "state_from_bytes"]


@dataclass(frozen=True)
class PublicMeta:
    index: int          # position of the market in the run's market order
    n_train_max: int    # largest training-set size over all markets
    n_items_max: int    # largest item count over all markets


@dataclass(frozen=True)
class SumRequest:
    label: str
    round_id: int
    vector: np.ndarray
    max_abs: float | np.ndarray


@dataclass(frozen=True)
class BroadcastRequest:
    label: str
    payload: bytes      # this market's candidate; the driver relays the first market's


@dataclass(frozen=True)
class Barrier:
    stage: str
    round_id: int


Request = SumRequest | BroadcastRequest | Barrier
Pipeline = Generator[Request, "np.ndarray | bytes | None", dict]


def codebook_digest(codebook: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(codebook, dtype="<f4").tobytes()).hexdigest()


def state_to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Tensors as an ``.npz`` (no pickle: ``allow_pickle=False`` on the way back)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.detach().cpu().numpy() for k, v in state.items()})
    return buf.getvalue()


def state_from_bytes(blob: bytes) -> dict[str, torch.Tensor]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files}
