"""``ckks``: single-key CKKS secure summation over TenSEAL.

Per epoch (``epoch_rounds`` consecutive rounds) one market, the *key holder*, owns the CKKS key:
the holder of epoch ``e`` is ``participants[e % len(participants)]`` (participants are sorted),
so the role rotates with the epoch and every party computes it from the round context alone.

Round (stage numbers are envelope stages; every aggregator message is signed with the
aggregator's roster key, and markets check each stage against their own policy):

0. aggregator -> every participant: "begin". Each market answers a signed fresh nonce; the
   holder also creates (or reuses, within its epoch) the secret-key context and a tag key and
   answers with the *public* context (parameters only) and, for every other participant, the
   secret key and tag key sealed to that market's static X25519 key (ephemeral-static X25519 ->
   HKDF with a label binding run, aggregation label, round, epoch, holder, recipient and key id
   -> AES-256-GCM), each item signed by the holder.
1. aggregator -> every market that sent a nonce: all signed nonces and its sealed key item.
   Every later message is bound to the nonces. Each market clips its vector, divides by the
   bound, appends its tag slots, encrypts and uploads the signed ciphertext.
2. aggregator -> uploaders: the homomorphic sum and the survivor list. Markets decrypt, check
   that the tag slots are the listed survivors' tags, and echo a signed digest of the message.
3. aggregator -> survivors: every echo; a market uses the sum only if all survivors confirmed
   the same result. The aggregator never holds the secret key and never learns the sum.

Every market message is an envelope (``secagg/codec.py``) whose payload ends with an Ed25519
signature over the whole envelope, so a tampered, replayed or re-attributed message is refused
with :class:`IntegrityError` / :class:`ProtocolError`, and a refused message leaves the
receiver's state unchanged.

Dropouts: a market that does not upload is simply absent from the sum (ciphertext sums need no
recovery) and the survivor list says who is in it. If the key holder does not answer stage 0
the round aborts with :class:`AbortError`: no market has a key to encrypt with, and picking a
substitute holder would let the aggregator choose who holds the key. The federation retries
the round without the silent market, and the holder then follows from the new participant list.

Single-key CKKS: whoever holds the secret key can decrypt every individual upload it sees, so
an aggregator colluding with any one market learns every market's input. Masking does not have
this weakness.
"""

from __future__ import annotations

import os

from ...errors import ConfigError
from ...primitives.ckks import ADD_ONLY_PARAMETERS, CkksParameters
from ..base import AggregatorEndpoint, MarketEndpoint, SecureAggregator
from ..registry import register_backend
from .client import CkksMarket
from .server import CkksAggregatorEndpoint
from .wire import CkksOptions, Entropy, MarketBundle, epoch_of, key_holder

__all__ = ["CkksAggregator", "MarketBundle", "key_holder", "epoch_of"]


class CkksAggregator(SecureAggregator):
    """Single-key CKKS backend.

    ``epoch_rounds``: rounds per key epoch (a new key holder and a new key every epoch).
    ``parameters``: CKKS ring and chain (default :data:`ADD_ONLY_PARAMETERS`).
    ``n_threads``: TenSEAL worker threads for batch encryption (default: all CPUs).
    ``entropy``: byte source for long-term keys, ephemeral keys, nonces and key ids (tests);
    the CKKS secret key itself always comes from SEAL's OS-seeded generator.
    """

    name = "ckks"
    secure = True

    def __init__(self, *, epoch_rounds: int = 1, parameters: CkksParameters = ADD_ONLY_PARAMETERS,
                 n_threads: int | None = None, entropy: Entropy | None = None) -> None:
        if n_threads is None:
            n_threads = os.cpu_count() or 1
        if not isinstance(epoch_rounds, int) or isinstance(epoch_rounds, bool) or epoch_rounds < 1:
            raise ConfigError("epoch_rounds", f"must be a positive int, got {epoch_rounds!r}")
        if not isinstance(parameters, CkksParameters):
            raise ConfigError("parameters", "must be a CkksParameters")
        if not isinstance(n_threads, int) or n_threads < 1:
            raise ConfigError("n_threads", f"must be a positive int, got {n_threads!r}")
        self._opts = CkksOptions(epoch_rounds, parameters, n_threads, entropy)

    def create_market(self, market_id: str) -> MarketEndpoint:
        return CkksMarket(market_id, self._opts)

    def create_aggregator(self) -> AggregatorEndpoint:
        return CkksAggregatorEndpoint(self._opts)


register_backend("ckks", CkksAggregator)
