"""``ckks``: single-key CKKS secure summation over TenSEAL.

Per epoch (``epoch_rounds`` consecutive rounds) one market, the *key holder*, owns the CKKS key:
the holder of epoch ``e`` is ``participants[e % len(participants)]`` (participants are sorted),
so the role rotates with the epoch and every party computes it from the round context alone.

Round (stage numbers are envelope stages):

0. aggregator -> holder: "distribute keys". The holder creates (or reuses, within its epoch) the
   secret-key context and answers with the *public* context (parameters only: no secret key,
   no evaluation keys) and, for every other participant, the secret-key context sealed to that
   market's static X25519 key (ephemeral-static X25519 -> HKDF with a context label binding
   run, aggregation label, round, epoch, holder, recipient and key id -> AES-256-GCM). Each
   sealed item is signed by the holder's Ed25519 identity key.
1. aggregator -> every participant: its sealed key item (the holder gets an empty one). Each
   market clips its vector to ``ctx.bounds()``, divides by the bound (inputs in [-1, 1]),
   encrypts and uploads the ciphertext, signed with its identity key.
2. aggregator -> uploaders: the homomorphic sum and the survivor list. Markets decrypt and
   scale back; the aggregator never holds the secret key and never learns the sum
   (``ServerRound.result()`` raises).

Every market message is an envelope (``secagg/codec.py``) whose payload ends with an Ed25519
signature over the whole envelope, so a tampered, replayed (other round / stage / run) or
re-attributed message is refused with :class:`IntegrityError` / :class:`ProtocolError`, and a
refused message leaves the receiver's state unchanged. The aggregator has no identity key on the
roster, so its messages are authenticated only by what they carry (signed key items); a
tampered *result* ciphertext can at worst make the decrypted sum wrong, which an
honest-but-curious aggregator does not do (see ``threat_model/ckks.md``).

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

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import AbortError, ConfigError, IntegrityError, ProtocolError
from ..primitives.aead import open_sealed, seal
from ..primitives.ckks import (ADD_ONLY_PARAMETERS, CkksParameters, CkksPublicContext,
                               CkksSecretContext, error_bound, scale_bits_for)
from ..primitives.keys import (PUBLIC_KEY_SIZE, SIGNATURE_SIZE, AgreementPrivateKey,
                               AgreementPublicKey, IdentityPrivateKey, IdentityPublicKey)
from .base import (AggregatorEndpoint, ClientRound, MarketEndpoint, RoundContext, Roster,
                   SecureAggregator, ServerRound)
from .codec import Envelope, decode_envelope, encode_envelope, expect
from .registry import register_backend

__all__ = ["CkksAggregator", "MarketBundle", "key_holder", "epoch_of"]

_BACKEND = "ckks"
_KEYS, _UPLOAD, _RESULT = 0, 1, 2
_DONE = -1
_AGGREGATOR = "aggregator"
_KEY_ID_SIZE = 16
_SIG_DOMAIN = b"fedmm-secure/v1/ckks/message\x00"
_KDF_DOMAIN = b"fedmm-secure/v1/ckks/key-distribution\x00"
_BUNDLE_MAGIC = b"FMCK\x01"

Entropy = Callable[[int], bytes]


# ---------------------------------------------------------------------------------------------
# Wire helpers


def _pack(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + bytes(f) for f in fields)


def _unpack(data: bytes, count: int) -> list[bytes]:
    """Exactly ``count`` length-prefixed fields and nothing after them."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(data):
            raise ProtocolError("message truncated")
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if pos + n > len(data):
            raise ProtocolError("message truncated")
        out.append(bytes(data[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise ProtocolError("trailing bytes after message")
    return out


def _u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def _ascii(b: bytes) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed identifier") from None


def _env(ctx: RoundContext, stage: int, sender: str, payload: bytes) -> Envelope:
    return Envelope(_BACKEND, stage, ctx.round_id, ctx.run_id, ctx.label, sender, payload)


def _signed(ctx: RoundContext, stage: int, sender: str, body: bytes,
            key: IdentityPrivateKey) -> bytes:
    unsigned = encode_envelope(_env(ctx, stage, sender, body))
    return encode_envelope(_env(ctx, stage, sender, body + key.sign(_SIG_DOMAIN + unsigned)))


def _verify(env: Envelope, key: IdentityPublicKey) -> bytes:
    """Check the trailing signature over the envelope; return the signed body."""
    if len(env.payload) < SIGNATURE_SIZE:
        raise IntegrityError()
    body, sig = env.payload[:-SIGNATURE_SIZE], env.payload[-SIGNATURE_SIZE:]
    unsigned = encode_envelope(Envelope(env.backend, env.stage, env.round_id, env.run_id,
                                        env.label, env.sender, body))
    key.verify(sig, _SIG_DOMAIN + unsigned)
    return body


# ---------------------------------------------------------------------------------------------
# Roster bundle and key schedule


@dataclass(frozen=True)
class MarketBundle:
    """A market's long-term public bundle on the roster.

    Wire form (69 bytes): ``b"FMCK" | version 0x01 | Ed25519 identity key (32) | X25519 static
    key (32)``.
    """

    identity: IdentityPublicKey
    agreement: AgreementPublicKey

    def to_bytes(self) -> bytes:
        return _BUNDLE_MAGIC + self.identity.to_bytes() + self.agreement.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> MarketBundle:
        data = bytes(data)
        if len(data) != len(_BUNDLE_MAGIC) + 2 * PUBLIC_KEY_SIZE or not data.startswith(_BUNDLE_MAGIC):
            raise ProtocolError("not a ckks roster bundle")
        k = len(_BUNDLE_MAGIC)
        return cls(IdentityPublicKey.from_bytes(data[k:k + PUBLIC_KEY_SIZE]),
                   AgreementPublicKey.from_bytes(data[k + PUBLIC_KEY_SIZE:]))


def _parse_roster(roster: Roster) -> dict[str, MarketBundle]:
    return {m: MarketBundle.from_bytes(roster.bundle(m)) for m in roster.markets}


def epoch_of(round_id: int, epoch_rounds: int) -> int:
    return round_id // epoch_rounds


def key_holder(ctx: RoundContext, epoch_rounds: int) -> str:
    """The market that owns the CKKS key for this round's epoch."""
    return ctx.participants[epoch_of(ctx.round_id, epoch_rounds) % len(ctx.participants)]


def _kdf_label(ctx: RoundContext, epoch: int, holder: str, recipient: str, key_id: bytes,
               public_digest: bytes, eph: bytes) -> bytes:
    return _KDF_DOMAIN + _pack(ctx.run_id.encode(), ctx.label.encode(), _u64(ctx.round_id),
                               _u64(epoch), holder.encode(), recipient.encode(), key_id,
                               public_digest, eph)


@dataclass(frozen=True)
class _Options:
    epoch_rounds: int
    params: CkksParameters
    n_threads: int
    entropy: Entropy | None


def _roster_entry(bundles: Mapping[str, MarketBundle], m: str) -> MarketBundle:
    try:
        return bundles[m]
    except KeyError:
        raise ProtocolError(f"market {m!r} is not on the roster") from None


def _normalised(ctx: RoundContext, vector: np.ndarray) -> tuple[np.ndarray, int]:
    if vector.shape != (ctx.length,):
        raise ProtocolError(f"input of shape {vector.shape}, expected ({ctx.length},)")
    if not np.all(np.isfinite(vector)):
        raise ProtocolError("input holds non-finite values")
    bounds = ctx.bounds()
    clipped = int(np.count_nonzero(np.abs(vector) > bounds))
    return np.clip(vector, -bounds, bounds) / bounds, clipped


# ---------------------------------------------------------------------------------------------
# Market side


class _CkksClient(ClientRound):
    def __init__(self, market: "_CkksMarket", ctx: RoundContext, vector: np.ndarray) -> None:
        self._m, self._ctx = market, ctx
        self._opts = market._opts
        self._epoch = epoch_of(ctx.round_id, self._opts.epoch_rounds)
        self._holder = key_holder(ctx, self._opts.epoch_rounds)
        self._scale_bits = scale_bits_for(self._opts.params, summands=len(ctx.participants))
        self._input, self._clipped = _normalised(ctx, vector)
        self._stage = _KEYS if self._holder == market.market_id else _UPLOAD
        self._key: CkksSecretContext | None = None
        self._key_id: bytes | None = None
        self._result: np.ndarray | None = None
        self._survivors: tuple[str, ...] = ()

    # -- stage handlers: parse and verify everything, then commit state at the end --

    def handle(self, message: bytes) -> bytes | None:
        env = decode_envelope(message)
        expect(env, backend=_BACKEND, stage=self._stage, round_id=self._ctx.round_id,
               run_id=self._ctx.run_id, label=self._ctx.label, sender=_AGGREGATOR)
        if self._stage == _KEYS:
            return self._distribute(env)
        if self._stage == _UPLOAD:
            return self._upload(env)
        if self._stage == _RESULT:
            return self._finish(env)
        raise ProtocolError("round already finished")

    def _distribute(self, env: Envelope) -> bytes:
        if env.payload:
            raise ProtocolError("unexpected payload in key request")
        m, ctx = self._m, self._ctx
        key_id, key = m._epoch_key(ctx.run_id, self._epoch)
        public = key.public_bytes()
        digest = hashlib.sha256(public).digest()
        items = []
        for r in ctx.participants:
            if r == m.market_id:
                continue
            static = _roster_entry(m._bundles, r).agreement
            eph = AgreementPrivateKey.generate(entropy=self._opts.entropy)
            eph_pub = eph.public_key().to_bytes()
            label = _kdf_label(ctx, self._epoch, m.market_id, r, key_id, digest, eph_pub)
            sealed = seal(eph.derive(static, context=label), key._hazmat_bytes(),
                          associated_data=label, **_nonce_source(self._opts.entropy))
            item = _pack(r.encode(), eph_pub, sealed)
            items.append(_pack(item, m._identity.sign(_SIG_DOMAIN + label + item)))
        body = _pack(_u64(self._epoch), key_id, public, _pack(*items), struct.pack(">I", len(items)))
        reply = _signed(ctx, _KEYS, m.market_id, body, m._identity)
        self._stage = _UPLOAD
        self._key, self._key_id = key, key_id
        return reply

    def _upload(self, env: Envelope) -> bytes:
        m, ctx = self._m, self._ctx
        if self._holder == m.market_id:
            if env.payload:
                raise ProtocolError("the key holder expects no key item")
            key, key_id = self._key, self._key_id
        else:
            key, key_id = self._open_key_item(env.payload)
        ciphertext = key.encrypt(self._input, scale_bits=self._scale_bits)
        reply = _signed(ctx, _UPLOAD, m.market_id, _pack(key_id, ciphertext), m._identity)
        self._key, self._key_id, self._stage = key, key_id, _RESULT
        return reply

    def _open_key_item(self, payload: bytes) -> tuple[CkksSecretContext, bytes]:
        m, ctx = self._m, self._ctx
        key_id, digest, item, sig = _unpack(payload, 4)
        if len(key_id) != _KEY_ID_SIZE or len(digest) != 32:
            raise ProtocolError("malformed key item")
        recipient, eph_pub, sealed = _unpack(item, 3)
        if _ascii(recipient) != m.market_id:
            raise ProtocolError("key item addressed to another market")
        label = _kdf_label(ctx, self._epoch, self._holder, m.market_id, key_id, digest, eph_pub)
        _roster_entry(m._bundles, self._holder).identity.verify(sig, _SIG_DOMAIN + label + item)
        sym = m._static.derive(AgreementPublicKey.from_bytes(eph_pub), context=label)
        secret = open_sealed(sym, sealed, associated_data=label)
        key = CkksSecretContext._hazmat_from_bytes(secret, self._opts.params,
                                                   n_threads=self._opts.n_threads)
        return key, key_id

    def _finish(self, env: Envelope) -> None:
        key_id, survivors_raw, ciphertext = _unpack(env.payload, 3)
        if key_id != self._key_id:
            raise ProtocolError("result encrypted under another key")
        survivors = tuple(_ascii(survivors_raw).split(",")) if survivors_raw else ()
        if (not survivors or self._m.market_id not in survivors
                or len(set(survivors)) != len(survivors)
                or not set(survivors) <= set(self._ctx.participants)):
            raise ProtocolError("invalid survivor list")
        normalised = self._key.decrypt(ciphertext, length=self._ctx.length,
                                       scale_bits=self._scale_bits)
        self._result = normalised * self._ctx.bounds()
        self._survivors, self._stage = tuple(sorted(survivors)), _DONE
        self._key = None  # the round no longer needs the secret key
        return None

    def report(self) -> dict:
        n = len(self._survivors) or len(self._ctx.participants)
        bound = error_bound(self._opts.params, summands=n, scale_bits=self._scale_bits)
        return {
            "clipped_coordinates": self._clipped,
            "max_abs_error_bound": float(bound * np.max(self._ctx.bounds())),
            "key_holder": self._holder,
            "epoch": self._epoch,
            "key_id": self._key_id.hex() if self._key_id else None,
            "scale_bits": self._scale_bits,
            "survivors": list(self._survivors),
            "ckks": self._opts.params.to_dict(),
        }


def _nonce_source(entropy: Entropy | None) -> dict:
    return {} if entropy is None else {"entropy": entropy}


class _CkksMarket(MarketEndpoint):
    def __init__(self, market_id: str, opts: _Options) -> None:
        self.market_id = market_id
        self._opts = opts
        self._identity = IdentityPrivateKey.generate(entropy=opts.entropy)
        self._static = AgreementPrivateKey.generate(entropy=opts.entropy)
        self._bundles: dict[str, MarketBundle] = {}
        # The key this market holds as key holder: (run_id, epoch) -> (key id, context). Only
        # the current epoch is kept, so a past epoch's key is gone once the role moves on.
        self._held: dict[tuple[str, int], tuple[bytes, CkksSecretContext]] = {}

    def public_bundle(self) -> bytes:
        return MarketBundle(self._identity.public_key(), self._static.public_key()).to_bytes()

    def install_roster(self, roster: Roster) -> None:
        bundles = _parse_roster(roster)
        mine = _roster_entry(bundles, self.market_id)
        if mine.to_bytes() != self.public_bundle():
            raise ProtocolError("the roster holds another bundle for this market")
        self._bundles = bundles

    def begin_round(self, ctx: RoundContext, vector: np.ndarray) -> ClientRound:
        if self.market_id not in ctx.participants:
            raise ProtocolError(f"{self.market_id!r} is not a participant of this round")
        for p in ctx.participants:
            _roster_entry(self._bundles, p)
        return _CkksClient(self, ctx, np.asarray(vector, dtype=np.float64))

    def _epoch_key(self, run_id: str, epoch: int) -> tuple[bytes, CkksSecretContext]:
        slot = (run_id, epoch)
        if slot not in self._held:
            key_id = (self._opts.entropy or os.urandom)(_KEY_ID_SIZE)
            key = CkksSecretContext.generate(self._opts.params, n_threads=self._opts.n_threads)
            self._held = {k: v for k, v in self._held.items() if k[0] != run_id}
            self._held[slot] = (bytes(key_id), key)
        return self._held[slot]


# ---------------------------------------------------------------------------------------------
# Aggregator side


class _CkksServer(ServerRound):
    def __init__(self, ctx: RoundContext, bundles: Mapping[str, MarketBundle], opts: _Options) -> None:
        for p in ctx.participants:
            _roster_entry(bundles, p)
        self._ctx, self._bundles, self._opts = ctx, bundles, opts
        self._epoch = epoch_of(ctx.round_id, opts.epoch_rounds)
        self._holder = key_holder(ctx, opts.epoch_rounds)
        self._scale_bits = scale_bits_for(opts.params, summands=len(ctx.participants))
        self._stage = _KEYS
        self._public: CkksPublicContext | None = None
        self._key_id: bytes | None = None
        self._survivors: tuple[str, ...] = ()

    @property
    def key_holder(self) -> str:
        return self._holder

    @property
    def public_context(self) -> CkksPublicContext | None:
        """The evaluation context received from the key holder (no secret key)."""
        return self._public

    def start(self) -> dict[str, bytes]:
        return {self._holder: encode_envelope(_env(self._ctx, _KEYS, _AGGREGATOR, b""))}

    def handle(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        for m in replies:
            if m not in self._ctx.participants:
                raise ProtocolError(f"reply from non-participant {m!r}")
        if self._stage == _KEYS:
            return self._keys(replies)
        if self._stage == _UPLOAD:
            return self._sum(replies)
        raise ProtocolError("round already finished")

    def _keys(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        ctx = self._ctx
        if set(replies) - {self._holder}:
            raise ProtocolError("only the key holder answers the key request")
        if self._holder not in replies:
            raise AbortError(f"key holder {self._holder!r} dropped out before distributing keys")
        env = decode_envelope(replies[self._holder])
        expect(env, backend=_BACKEND, stage=_KEYS, round_id=ctx.round_id, run_id=ctx.run_id,
               label=ctx.label, sender=self._holder)
        body = _verify(env, _roster_entry(self._bundles, self._holder).identity)
        epoch, key_id, public, items_raw, count_raw = _unpack(body, 5)
        if epoch != _u64(self._epoch) or len(key_id) != _KEY_ID_SIZE or len(count_raw) != 4:
            raise ProtocolError("key distribution for another epoch or malformed")
        recipients = [p for p in ctx.participants if p != self._holder]
        (count,) = struct.unpack(">I", count_raw)
        if count != len(recipients):
            raise ProtocolError("key distribution does not cover every participant")
        items = _unpack(items_raw, count)
        digest = hashlib.sha256(public).digest()
        out = {}
        for r, entry in zip(recipients, items):
            item, sig = _unpack(entry, 2)
            to, _eph, _sealed = _unpack(item, 3)
            if _ascii(to) != r:
                raise ProtocolError("key items out of order")
            out[r] = encode_envelope(_env(ctx, _UPLOAD, _AGGREGATOR, _pack(key_id, digest, item, sig)))
        public_ctx = CkksPublicContext.from_bytes(public, self._opts.params,
                                                  n_threads=self._opts.n_threads)
        out[self._holder] = encode_envelope(_env(ctx, _UPLOAD, _AGGREGATOR, b""))
        self._public, self._key_id, self._stage = public_ctx, key_id, _UPLOAD
        return dict(sorted(out.items()))

    def _sum(self, replies: Mapping[str, bytes]) -> dict[str, bytes]:
        ctx = self._ctx
        got, ciphertexts = [], []
        for m in sorted(replies):
            env = decode_envelope(replies[m])
            expect(env, backend=_BACKEND, stage=_UPLOAD, round_id=ctx.round_id,
                   run_id=ctx.run_id, label=ctx.label, sender=m)
            body = _verify(env, _roster_entry(self._bundles, m).identity)
            key_id, ciphertext = _unpack(body, 2)
            if key_id != self._key_id:
                raise ProtocolError(f"upload of {m!r} is encrypted under another key")
            got.append(m)
            ciphertexts.append(ciphertext)
        if not got:
            raise AbortError("no market submitted an input")
        total = self._public.add(ciphertexts, length=ctx.length, scale_bits=self._scale_bits)
        payload = _pack(self._key_id, ",".join(got).encode(), total)
        self._survivors, self._stage = tuple(got), _DONE
        return {m: encode_envelope(_env(ctx, _RESULT, _AGGREGATOR, payload)) for m in got}

    @property
    def done(self) -> bool:
        return self._stage == _DONE

    @property
    def survivors(self) -> tuple[str, ...]:
        return self._survivors


class _CkksAggregatorEndpoint(AggregatorEndpoint):
    def __init__(self, opts: _Options) -> None:
        self._opts = opts
        self._bundles: dict[str, MarketBundle] = {}

    def install_roster(self, roster: Roster) -> None:
        self._bundles = _parse_roster(roster)

    def begin_round(self, ctx: RoundContext) -> ServerRound:
        return _CkksServer(ctx, self._bundles, self._opts)


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
        self._opts = _Options(epoch_rounds, parameters, n_threads, entropy)

    def create_market(self, market_id: str) -> MarketEndpoint:
        return _CkksMarket(market_id, self._opts)

    def create_aggregator(self) -> AggregatorEndpoint:
        return _CkksAggregatorEndpoint(self._opts)


register_backend("ckks", CkksAggregator)
