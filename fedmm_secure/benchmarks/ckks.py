"""CKKS cost figures for ``fedmm-secure bench secagg``: encryption throughput of our add-only
parameters against TenSEAL's default parameters (the anchor, measured in the same run), upload
bytes per float32, aggregation time against a plaintext numpy sum (the floor), and the measured
precision of sums against the plain sum.

Pure measurement: nothing here is asserted; ``bench/bench_ckks.py`` runs the same helpers under
pytest-benchmark.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from ..primitives.ckks import (ADD_ONLY_PARAMETERS, CkksParameters, CkksSecretContext,
                               error_bound, scale_bits_for)

__all__ = [
    "bench_ckks",
    "anchor_context",
    "anchor_encrypt",
    "anchor_serialize",
    "ours_encrypt",
    "ours_encrypt_only",
    "compare_encrypt",
    "precision",
    "TENSEAL_DEFAULTS",
]

# What TenSEAL's tutorials and NVFlare's HE filter use: N=8192, [60, 40, 40, 60], scale 2^40,
# public-key encryption, one CKKSVector per slot-sized chunk.
TENSEAL_DEFAULTS = {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40, 60],
                    "global_scale_bits": 40, "encryption": "public-key"}


def anchor_context(*, n_threads: int):
    import tenseal as ts
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, TENSEAL_DEFAULTS["poly_modulus_degree"],
                     coeff_mod_bit_sizes=TENSEAL_DEFAULTS["coeff_mod_bit_sizes"], n_threads=n_threads)
    ctx.global_scale = 2.0 ** TENSEAL_DEFAULTS["global_scale_bits"]
    return ctx


def anchor_encrypt(ctx, x: np.ndarray) -> list:
    import tenseal as ts
    slots = TENSEAL_DEFAULTS["poly_modulus_degree"] // 2
    return [ts.ckks_vector(ctx, x[i:i + slots]) for i in range(0, x.size, slots)]


def anchor_serialize(vectors: list) -> list[bytes]:
    return [v.serialize() for v in vectors]


def ours_encrypt(key: CkksSecretContext, x: np.ndarray, *, summands: int) -> bytes:
    return key.encrypt(x, scale_bits=scale_bits_for(key.params, summands=summands))


def ours_encrypt_only(key: CkksSecretContext, x: np.ndarray, *, summands: int):
    """Encryption to a TenSEAL object without serialization (like :func:`anchor_encrypt`)."""
    return key._encrypt_tensor(x, scale_bits=scale_bits_for(key.params, summands=summands))


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def compare_encrypt(x: np.ndarray, *, params: CkksParameters = ADD_ONLY_PARAMETERS,
                    n_threads: int, repeats: int, summands: int) -> dict[str, dict[str, float]]:
    """Best wall and process-CPU seconds per case, anchor and ours interleaved so that both see
    the same load on a shared machine (CPU seconds are the load-robust figure; wall seconds
    include the parallel speed-up)."""
    anchor = anchor_context(n_threads=n_threads)
    key = CkksSecretContext.generate(params, n_threads=n_threads)
    key1 = CkksSecretContext.generate(params, n_threads=1)
    cases = {
        "tenseal_defaults": lambda: anchor_encrypt(anchor, x),
        "tenseal_defaults_with_serialize": lambda: anchor_serialize(anchor_encrypt(anchor, x)),
        "ours": lambda: ours_encrypt_only(key, x, summands=summands),
        "ours_with_serialize": lambda: ours_encrypt(key, x, summands=summands),
        "ours_with_serialize_1_thread": lambda: ours_encrypt(key1, x, summands=summands),
    }
    wall = dict.fromkeys(cases, float("inf"))
    cpu = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():   # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - t)
            cpu[name] = min(cpu[name], time.process_time() - c)
    return {"wall_s": wall, "cpu_s": cpu}


def precision(key: CkksSecretContext, *, summands: int, length: int, seed: int) -> dict:
    """Max |decrypted sum - plain sum| for ``summands`` inputs in [-1, 1] (a fifth of the
    coordinates pinned at +1 or -1, the worst case for wrap-around)."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-1.0, 1.0, (summands, length))
    fifth = max(1, length // 5)
    xs[:, :fifth] = 1.0
    xs[:, fifth:2 * fifth] = -1.0
    bits = scale_bits_for(key.params, summands=summands)
    public = key.public_context()
    total = public.add([key.encrypt(x, scale_bits=bits) for x in xs], length=length, scale_bits=bits)
    got = key.decrypt(total, length=length, scale_bits=bits)
    return {"summands": summands, "bound": 1.0, "scale_bits": bits,
            "max_abs_error": float(np.max(np.abs(got - xs.sum(axis=0)))),
            "error_bound_8sigma": error_bound(key.params, summands=summands, scale_bits=bits)}


def bench_ckks(*, quick: bool, params: CkksParameters = ADD_ONLY_PARAMETERS,
               n_threads: int = 2) -> dict:
    """Measure and return JSON-able CKKS figures (``quick`` shrinks sizes and repeats)."""
    n = 1 << (18 if quick else 20)
    repeats = 2 if quick else 5
    markets = 10
    load_before = os.getloadavg()[0]
    x = np.random.default_rng(0).uniform(-1.0, 1.0, n)

    anchor = anchor_context(n_threads=n_threads)
    key = CkksSecretContext.generate(params, n_threads=n_threads)
    anchor_bytes = sum(len(b) for b in anchor_serialize(anchor_encrypt(anchor, x)))
    ct = ours_encrypt(key, x, summands=markets)
    times = compare_encrypt(x, params=params, n_threads=n_threads, repeats=repeats,
                            summands=markets)
    wall, cpu = times["wall_s"], times["cpu_s"]

    public = key.public_context()
    bits = scale_bits_for(params, summands=markets)
    uploads = [ct] * markets
    t_agg = _best(lambda: public.add(uploads, length=n, scale_bits=bits), repeats)
    plain = [x.astype(np.float32) for _ in range(markets)]
    t_floor = _best(lambda: np.sum(plain, axis=0), repeats)

    prec = [precision(key, summands=k, length=256 if quick else 4096, seed=k)
            for k in ((10, 100) if quick else (2, 10, 100))]
    return {
        "floats": n,
        "n_threads": n_threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min": [load_before, os.getloadavg()[0]],  # shared machine: context
        "parameters": params.to_dict(),
        "anchor_parameters": dict(TENSEAL_DEFAULTS),
        "encrypt_floats_per_s": {name: n / t for name, t in wall.items()},
        "encrypt_floats_per_cpu_s": {name: n / t for name, t in cpu.items()},
        "speedup_vs_tenseal_defaults": {
            "encrypt_wall": wall["tenseal_defaults"] / wall["ours"],
            "encrypt_with_serialize_wall": (wall["tenseal_defaults_with_serialize"]
                                            / wall["ours_with_serialize"]),
            "encrypt_cpu": cpu["tenseal_defaults"] / cpu["ours"],
            "encrypt_with_serialize_cpu": (cpu["tenseal_defaults_with_serialize"]
                                           / cpu["ours_with_serialize"]),
        },
        "bytes_per_float32": {"tenseal_defaults": anchor_bytes / (4 * n), "ours": len(ct) / (4 * n)},
        "aggregate_s": {"markets": markets, "ours": t_agg, "numpy_float32_sum_floor": t_floor,
                        "ratio_vs_floor": t_agg / t_floor},
        "precision": prec,
    }
