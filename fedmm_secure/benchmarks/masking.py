"""Cost of the ``masking`` backend against the AES-CTR keystream floor, measured in one run.

The floor: a masking client must expand one self-mask and n-1 pairwise masks, i.e. n AES-CTR
keystreams of 4d bytes each; nothing that produces those masks can be cheaper. The client's time
is therefore reported as a ratio both to ``n`` keystreams (the fair floor: what is inherently
required; the "AES floor" of the targets in docs/performance.md) and to one keystream of ``d``
values. The server's
floor is the same n keystreams (it re-expands every survivor's self-mask) plus n vector additions.

The "AES floor" is OpenSSL's CTR mode (:func:`keystream_into`), as the targets were set. The
masks themselves now come out of the GCM code path (:class:`MaskStream`: the same bytes, about
1.6-2.3x faster on CPUs with VAES), so :func:`floor_ratios` also reports every ratio against that
faster floor (``*_over_fast_floor_cpu``): the honest distance to what producing the masks costs.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..primitives.digest import BulkHasher, bulk_digest
from ..primitives.keys import IdentityPrivateKey, SymmetricKey
from ..primitives.prg import MaskStream, accumulate_masks, keystream_into
from ..primitives.quantization import make_quantizer
from ..primitives.shamir import recover_secret, recover_secrets, split_secret
from ..secagg.base import RoundContext, Roster
from ..secagg.policy import MarketPolicy
from ..secagg.masking import MASKED_INPUT, MaskingAggregator

__all__ = ["bench_masking", "keystream_floor", "time_round", "floor_ratios", "mask_breakdown", "shamir_timings",
           "component_costs", "QUICK_GRID", "FULL_GRID"]

QUICK_GRID = ((3, 16_384), (10, 262_144), (10, 1_048_576))
FULL_GRID = tuple((n, d) for n in (3, 10, 50, 100) for d in (16_384, 262_144, 1_048_576))


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def keystream_floor(length: int, *, count: int = 1, repeats: int = 5) -> float:
    """Seconds to produce ``count`` AES-256-CTR keystreams of ``length`` uint32 (reused buffer)."""
    buf = bytearray(4 * length + 15)
    zeros = bytes(4 * length)
    keys = [os.urandom(32) for _ in range(count)]

    def run() -> None:
        for k in keys:
            keystream_into(k, buf, zeros=zeros)

    run()  # warm-up
    return _median_time(run, repeats)


class _Clock:
    """Wall (``perf_counter``) and CPU (``thread_time``: preemption by other jobs excluded) time
    of the calls made inside ``with clock:``, summed."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "_Clock":
        self._w, self._c = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.thread_time() - self._c


def _federation(n: int):
    backend = MaskingAggregator()
    ids = [f"m{i:03d}" for i in range(n)]
    markets = {m: backend.create_market(m) for m in ids}
    agg = backend.create_aggregator()
    roster = Roster({m: markets[m].public_bundle() for m in ids}, aggregator=agg.public_bundle())
    policy = MarketPolicy.pin(roster, backends={"masking"}, privacy={})
    agg.install_roster(roster)
    for m in ids:
        markets[m].install_roster(roster, policy=policy)
    return ids, markets, agg


def time_round(n: int, length: int, *, bound: float = 1.0, seed: int = 0) -> dict:
    """One complete round, every client call and every server call timed separately (wall and
    CPU). Uploads are streamed: each goes to the aggregator as soon as its market produced it."""
    ids, markets, agg = _federation(n)
    ctx = RoundContext("bench", 1, tuple(ids), length, bound)
    rng = np.random.default_rng(seed)
    vectors = {m: rng.uniform(-bound, bound, length) for m in ids}
    client = {m: _Clock() for m in ids}
    mask_stage = {m: _Clock() for m in ids}
    server_clock = _Clock()
    upload_bytes = 0
    with server_clock:
        server = agg.begin_round(ctx)
    clients = {}
    for m in ids:
        with client[m]:
            clients[m] = markets[m].begin_round(ctx, vectors[m])
    with server_clock:
        outbox = server.start()
    stage = 0
    while True:
        final = server.done
        for m, msg in outbox.items():
            with client[m], (mask_stage[m] if stage == MASKED_INPUT else _Clock()):
                reply = clients[m].handle(msg)
            if stage == MASKED_INPUT:
                upload_bytes = len(reply)
            if not final:
                with server_clock:
                    server.receive(m, reply)
            del reply
        if final:
            break
        with server_clock:
            outbox = server.end_stage()
        stage += 1
    expected = sum(vectors.values())
    err = float(np.max(np.abs(server.result() - expected)))
    return {
        "client_s": statistics.median(c.wall for c in client.values()),
        "client_cpu_s": statistics.median(c.cpu for c in client.values()),
        "client_mask_stage_s": statistics.median(c.wall for c in mask_stage.values()),
        "client_mask_stage_cpu_s": statistics.median(c.cpu for c in mask_stage.values()),
        "server_s": server_clock.wall,
        "server_cpu_s": server_clock.cpu,
        "masked_upload_bytes": upload_bytes,
        "max_abs_error": err,
    }


def _hash_costs(length: int) -> dict[str, Callable[[], object]]:
    """What authenticating 4d bytes costs per primitive, next to one AES-CTR keystream of them."""
    data = os.urandom(4 * length)
    buf, zeros, key = bytearray(4 * length + 15), bytes(4 * length), os.urandom(32)

    def gmac() -> bytes:
        enc = Cipher(algorithms.AES(key), modes.GCM(bytes(12))).encryptor()
        enc.authenticate_additional_data(data)
        enc.finalize()
        return enc.tag

    return {"aes_ctr_keystream": lambda: keystream_into(key, buf, zeros=zeros),
            "blake3": lambda: bulk_digest([data]),    # what signed uploads are hashed with
            "sha256": lambda: hashlib.sha256(data).digest(),   # what they were hashed with
            "gmac": gmac}


def floor_ratios(n: int = 10, length: int = 1 << 20, *, repeats: int = 5) -> dict:
    """Market and aggregator time per round over the AES floor (n keystreams of ``length``
    values: a market's n masks, the aggregator's n self-masks), wall and CPU.

    Floor, round and the per-byte hash costs are interleaved ``repeats`` times (load drift hits
    all alike); every ratio is the median of the per-repeat ratios."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    keys = [os.urandom(32) for _ in range(n)]
    buf, zeros = bytearray(4 * length + 15), bytes(4 * length)
    hashes = _hash_costs(length)
    rows, load = [], [os.getloadavg()[0]]
    time_round(n, min(length, 4096), seed=99)   # warm-up
    for r in range(repeats):
        with _Clock() as floor:
            for k in keys:
                keystream_into(k, buf, zeros=zeros)
        with _Clock() as fast:
            for k in keys:
                MaskStream(k, 4 * length).fill(zeros, buf)
        row = {"floor_s": floor.wall, "floor_cpu_s": floor.cpu, "fast_floor_cpu_s": fast.cpu,
               **time_round(n, length, seed=r)}
        for name, fn in hashes.items():
            with _Clock() as c:
                fn()
            row[f"{name}_cpu_s"] = c.cpu
        rows.append(row)
    load.append(os.getloadavg()[0])

    def med(fn: Callable[[dict], float]) -> float:
        return statistics.median(fn(r) for r in rows)

    out = {"n": n, "d": length, "repeats": repeats, "load_average_1min": load}
    for who in ("floor", "client", "client_mask_stage", "server"):
        out[f"{who}_ms"] = med(lambda r: r[f"{who}_s"]) * 1e3
        out[f"{who}_cpu_ms"] = med(lambda r: r[f"{who}_cpu_s"]) * 1e3
    out["fast_floor_cpu_ms"] = med(lambda r: r["fast_floor_cpu_s"]) * 1e3
    for who in ("client", "client_mask_stage", "server"):
        out[f"{who}_over_floor_wall"] = med(lambda r: r[f"{who}_s"] / r["floor_s"])
        out[f"{who}_over_floor_cpu"] = med(lambda r: r[f"{who}_cpu_s"] / r["floor_cpu_s"])
        out[f"{who}_over_fast_floor_cpu"] = med(lambda r: r[f"{who}_cpu_s"] / r["fast_floor_cpu_s"])
    for name in hashes:
        out[f"{name}_cpu_ms_per_4d_bytes"] = med(lambda r: r[f"{name}_cpu_s"]) * 1e3
    out["blake3_over_aes_per_byte"] = med(lambda r: r["blake3_cpu_s"] / r["aes_ctr_keystream_cpu_s"])
    out["sha256_over_aes_per_byte"] = med(lambda r: r["sha256_cpu_s"] / r["aes_ctr_keystream_cpu_s"])
    out["gmac_over_aes_per_byte"] = med(lambda r: r["gmac_cpu_s"] / r["aes_ctr_keystream_cpu_s"])
    out["upload_bytes_per_coordinate"] = rows[0]["masked_upload_bytes"] / length
    out["max_abs_error"] = max(r["max_abs_error"] for r in rows)
    return out


def mask_breakdown(n: int, length: int, *, repeats: int = 5) -> dict:
    """Where a client's d-proportional time goes, each piece timed interleaved with the floor.

    ``accumulate`` is the masking proper (n keystreams added into the encoding, chunked in
    cache), directly comparable to ``keystream_n``; ``accumulate_and_hash`` adds the upload's
    signature digest (BLAKE3) computed chunk by chunk in cache, as the client does; ``blake3`` is
    the same digest taken afterwards from main memory, and ``sha256`` the hash signatures used
    before, for comparison; ``quantize`` and ``dequantize`` are the rest of a client's
    per-coordinate work.
    """
    buf = bytearray(4 * length + 15)
    zeros = bytes(4 * length)
    raw = [os.urandom(32) for _ in range(n)]
    keys = [SymmetricKey(k) for k in raw]
    q = make_quantizer(bounds=1.0, length=length, n_participants=n)
    x = np.random.default_rng(0).uniform(-1, 1, length)
    acc, _ = q.quantize(x)
    payload = acc.tobytes()
    pieces: dict[str, Callable[[], object]] = {
        "keystream_n": lambda: [keystream_into(k, buf, zeros=zeros) for k in raw],
        "keystream_n_gcm_path": lambda: [MaskStream(k, 4 * length).fill(zeros, buf) for k in raw],
        "accumulate": lambda: accumulate_masks(acc, add=keys[: n // 2 + 1], subtract=keys[n // 2 + 1:]),
        "accumulate_and_hash": lambda: accumulate_masks(
            acc, add=keys[: n // 2 + 1], subtract=keys[n // 2 + 1:],
            finish_chunk=BulkHasher().update),
        "quantize": lambda: q.quantize(x, out=acc),
        "blake3": lambda: bulk_digest([payload]),
        "sha256": lambda: hashlib.sha256(payload).digest(),
        "dequantize": lambda: q.dequantize_sum(acc),
    }
    samples: dict[str, list[float]] = {k: [] for k in pieces}
    for fn in pieces.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved, so load drift hits every piece alike
        for name, fn in pieces.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    ms = {f"{k}_ms": statistics.median(v) * 1e3 for k, v in samples.items()}
    ms["accumulate_over_keystream_n"] = ms["accumulate_ms"] / ms["keystream_n_ms"]
    ms["accumulate_and_hash_over_keystream_n"] = ms["accumulate_and_hash_ms"] / ms["keystream_n_ms"]
    ms["accumulate_over_keystream_n_gcm_path"] = ms["accumulate_ms"] / ms["keystream_n_gcm_path_ms"]
    per_coord = ms["accumulate_and_hash_ms"] + ms["quantize_ms"] + ms["dequantize_ms"]
    ms["client_per_coordinate_work_over_keystream_n"] = per_coord / ms["keystream_n_ms"]
    return {"n": n, "d": length, **ms}


def component_costs(length: int = 1 << 20, *, repeats: int = 21) -> dict:
    """CPU ms of each piece a round is made of, alone, at ``length`` values (medians of
    ``repeats`` interleaved samples): what the market's and the aggregator's time decomposes
    into (bench/RESULTS_masking.md, "What is left")."""
    n_verify = 50
    ident = IdentityPrivateKey.generate()
    pub, msg = ident.public_key(), os.urandom(100)
    sig = ident.sign(msg)
    key = os.urandom(32)
    buf, zeros, data = bytearray(4 * length + 15), bytes(4 * length), os.urandom(4 * length)
    q = make_quantizer(bounds=1.0, length=length, n_participants=10)
    x = np.random.default_rng(0).uniform(-1, 1, length)
    enc, _ = q.quantize(x)
    total = np.zeros(length, dtype=np.uint32)
    decoded = np.empty(length)

    def chunked_add() -> None:
        for i in range(0, length, 1 << 16):
            seg = total[i:i + (1 << 16)]
            np.add(seg, enc[i:i + (1 << 16)], out=seg)

    pieces: dict[str, Callable[[], object]] = {
        f"ed25519_verify_x{n_verify}": lambda: [pub.verify(sig, msg) for _ in range(n_verify)],
        "blake3_4d_bytes": lambda: bulk_digest([data]),
        "aes_ctr_keystream_4d_bytes": lambda: keystream_into(key, buf, zeros=zeros),
        "gcm_path_keystream_4d_bytes": lambda: MaskStream(key, 4 * length).fill(zeros, buf),
        "add_4d_bytes_chunked": chunked_add,
        "quantize": lambda: q.quantize(x, out=enc),
        "dequantize": lambda: q.dequantize_into(enc, decoded, start=0),
    }
    samples: dict[str, list[float]] = {k: [] for k in pieces}
    for fn in pieces.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in pieces.items():
            with _Clock() as c:
                fn()
            samples[name].append(c.cpu)
    out = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    out["ed25519_verify"] = out.pop(f"ed25519_verify_x{n_verify}") / n_verify
    return {"d": length, "cpu_ms": out, "load_average_1min": os.getloadavg()[0]}


def shamir_timings(*, n: int = 100, repeats: int = 20) -> dict:
    t = n - n // 3
    secret = os.urandom(32)
    xs = list(range(1, n + 1))
    shares = split_secret(secret, threshold=t, xs=xs, entropy=os.urandom)
    split_s = _median_time(lambda: split_secret(secret, threshold=t, xs=xs, entropy=os.urandom),
                           repeats)
    recover_s = _median_time(lambda: recover_secret(shares[n - t:], threshold=t), repeats)
    batch = [shares[n - t:]] * n  # n secrets rebuilt from the same survivors (weights reused)
    batch_s = _median_time(lambda: recover_secrets(batch, threshold=t), max(3, repeats // 5)) / n
    if recover_secret(shares[:t], threshold=t) != secret:
        raise RuntimeError("Shamir self-check failed")
    return {"n": n, "threshold": t, "split_ms": split_s * 1e3, "recover_ms": recover_s * 1e3,
            "recover_batched_ms_per_secret": batch_s * 1e3,
            "targets_ms": {"split": 1.0, "recover": 5.0}}


def bench_masking(*, quick: bool, scaling: bool = False) -> dict:
    """Client/server time vs the keystream floor, upload size, Shamir timings (JSON-able);
    ``floor_ratios`` at n = 10, d = 1M (the targets' setting); with ``scaling`` also the n x d
    table of time and peak memory per party (minutes; ``quick`` keeps n <= 20, d <= 1M)."""
    grid = QUICK_GRID if quick else FULL_GRID
    repeats = 3 if quick else 2
    rows = []
    for n, d in grid:
        one = keystream_floor(d)
        n_floor = keystream_floor(d, count=n, repeats=3)
        runs = [time_round(n, d, seed=r) for r in range(repeats)]
        client = statistics.median(r["client_s"] for r in runs)
        mask_stage = statistics.median(r["client_mask_stage_s"] for r in runs)
        server = statistics.median(r["server_s"] for r in runs)
        upload = runs[0]["masked_upload_bytes"]
        rows.append({
            "n": n, "d": d,
            "keystream_1_ms": one * 1e3, "keystream_n_ms": n_floor * 1e3,
            "client_ms": client * 1e3, "client_mask_stage_ms": mask_stage * 1e3,
            "server_ms": server * 1e3,
            "client_over_n_keystreams": client / n_floor,
            "client_mask_stage_over_n_keystreams": mask_stage / n_floor,
            "client_over_1_keystream": client / one,
            "server_over_n_keystreams": server / n_floor,
            "upload_bytes_per_coordinate": upload / d,
            "upload_vs_float32": upload / (4 * d),
            "max_abs_error": max(r["max_abs_error"] for r in runs),
        })
    try:
        import flwr  # noqa: F401
        flower = "installed (not benchmarked here)"
    except ImportError:
        flower = "not installed; Flower SecAgg+ anchors are the figures in docs/performance.md"
    breakdown = [mask_breakdown(n, d) for n, d in grid if d >= 262_144 and n <= 50]
    out = {"backend": "masking", "quick": quick,
           "floor_ratios": floor_ratios(10, 1 << 20, repeats=5 if quick else 9), "rounds": rows,
           "mask_breakdown": breakdown, "shamir": shamir_timings(), "flower": flower}
    if scaling:
        from .scaling import SCALING_DS, SCALING_NS, scaling_table
        out["scaling"] = (scaling_table((5, 10, 20), (1 << 16, 1 << 20)) if quick
                          else scaling_table(SCALING_NS, SCALING_DS))
    return out
