"""CKKS benchmarks (pytest-benchmark). Ratios are printed against anchors measured in this run:

* encryption: TenSEAL default parameters (N=8192, [60,40,40,60], public-key) vs our add-only
  parameters (N=4096, [45,60], secret-key, batch tensor on n_threads);
* aggregation: homomorphic sum of 10 uploads vs the plaintext numpy float32 sum (the floor);
* upload bytes per float32 (a size, not a timing).

Run: ``.venv/bin/python -m pytest bench/bench_ckks.py -q -s --benchmark-columns=min,mean,rounds``
(``CKKS_BENCH_FLOATS`` overrides the vector size, default 2**20).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("tenseal")
pytest.importorskip("pytest_benchmark")

from fedmm_secure.benchmarks.ckks import (anchor_context, anchor_encrypt,  # noqa: E402
                                          anchor_serialize, compare_encrypt, ours_encrypt,
                                          ours_encrypt_only, precision)
from fedmm_secure.primitives.ckks import (ADD_ONLY_PARAMETERS, CkksSecretContext,  # noqa: E402
                                          scale_bits_for)

N = int(os.environ.get("CKKS_BENCH_FLOATS", 1 << 20))
MARKETS = 10
THREADS = 2
_MIN: dict[str, float] = {}
_SIZE: dict[str, float] = {}


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1.0, 1.0, N)


@pytest.fixture(scope="module")
def anchor():
    return anchor_context(n_threads=THREADS)


@pytest.fixture(scope="module")
def key() -> CkksSecretContext:
    return CkksSecretContext.generate(ADD_ONLY_PARAMETERS, n_threads=THREADS)


def _run(benchmark, name: str, fn, rounds: int = 5) -> None:
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    _MIN[name] = benchmark.stats.stats.min
    benchmark.extra_info["floats_per_s"] = N / _MIN[name]


def test_encrypt_tenseal_defaults(benchmark, anchor, x) -> None:
    _run(benchmark, "anchor_encrypt", lambda: anchor_encrypt(anchor, x))
    _SIZE["anchor"] = sum(map(len, anchor_serialize(anchor_encrypt(anchor, x)))) / (4 * N)


def test_encrypt_serialize_tenseal_defaults(benchmark, anchor, x) -> None:
    _run(benchmark, "anchor_encrypt_serialize", lambda: anchor_serialize(anchor_encrypt(anchor, x)))


def test_encrypt_ours(benchmark, key, x) -> None:
    _run(benchmark, "ours_encrypt", lambda: ours_encrypt_only(key, x, summands=MARKETS))


def test_encrypt_serialize_ours(benchmark, key, x) -> None:
    _run(benchmark, "ours_encrypt_serialize", lambda: ours_encrypt(key, x, summands=MARKETS))
    _SIZE["ours"] = len(ours_encrypt(key, x, summands=MARKETS)) / (4 * N)


def test_aggregate_floor_numpy(benchmark, x) -> None:
    plain = [x.astype(np.float32) for _ in range(MARKETS)]
    _run(benchmark, "floor_sum", lambda: np.sum(plain, axis=0), rounds=10)


def test_aggregate_ours(benchmark, key, x) -> None:
    public = key.public_context()
    uploads = [ours_encrypt(key, x, summands=MARKETS)] * MARKETS
    bits = scale_bits_for(ADD_ONLY_PARAMETERS, summands=MARKETS)
    _run(benchmark, "ours_aggregate", lambda: public.add(uploads, length=N, scale_bits=bits))


def test_zz_report(key, x) -> None:
    """Runs last: prints ratios of the pytest-benchmark minima above, then an interleaved
    anchor/ours comparison (same load for both; CPU seconds are robust to a shared machine)."""
    lines = [f"CKKS bench, {N} floats, {THREADS} threads, load average {os.getloadavg()[0]:.1f}"]
    if {"anchor_encrypt", "ours_encrypt", "ours_aggregate", "floor_sum"} <= _MIN.keys():
        lines += [
            f"[sequential] encrypt  TenSEAL defaults {N / _MIN['anchor_encrypt'] / 1e6:.2f} M/s, "
            f"ours {N / _MIN['ours_encrypt'] / 1e6:.2f} M/s "
            f"({_MIN['anchor_encrypt'] / _MIN['ours_encrypt']:.2f}x)",
            f"[sequential] encrypt+serialize  TenSEAL defaults "
            f"{N / _MIN['anchor_encrypt_serialize'] / 1e6:.2f} M/s, ours "
            f"{N / _MIN['ours_encrypt_serialize'] / 1e6:.2f} M/s "
            f"({_MIN['anchor_encrypt_serialize'] / _MIN['ours_encrypt_serialize']:.2f}x)",
            f"bytes/float32  TenSEAL defaults {_SIZE['anchor']:.2f}x, ours {_SIZE['ours']:.2f}x",
            f"aggregate {MARKETS} uploads  ours {_MIN['ours_aggregate'] * 1e3:.1f} ms, numpy floor "
            f"{_MIN['floor_sum'] * 1e3:.2f} ms ({_MIN['ours_aggregate'] / _MIN['floor_sum']:.0f}x)",
        ]
    t = compare_encrypt(x, n_threads=THREADS, repeats=3, summands=MARKETS)
    for kind in ("wall_s", "cpu_s"):
        row = ", ".join(f"{name} {N / sec / 1e6:.2f}" for name, sec in t[kind].items())
        lines.append(f"[interleaved, M floats per {kind[:-2]} second] {row}")
        lines.append(f"    ours vs TenSEAL defaults: encrypt "
                     f"{t[kind]['tenseal_defaults'] / t[kind]['ours']:.2f}x, encrypt+serialize "
                     f"{t[kind]['tenseal_defaults_with_serialize'] / t[kind]['ours_with_serialize']:.2f}x")
    prec = precision(key, summands=100, length=4096, seed=1)
    lines.append(f"precision  100 inputs in [-1,1]: max abs error {prec['max_abs_error']:.2e} "
                 f"(8-sigma bound {prec['error_bound_8sigma']:.2e}, scale 2^{prec['scale_bits']})")
    print("\n" + "\n".join(lines))


def test_parameter_sweep() -> None:
    """Sizes and precision per data-prime width (not timings): why 45 bits is the default."""
    from fedmm_secure.primitives.ckks import CkksParameters
    rows = ["data_bits special_bits | bytes/float32 | max abs error, 100 inputs (8-sigma bound)"]
    x = np.random.default_rng(2).uniform(-1.0, 1.0, 8 * 2048)
    for data_bits, special_bits in ((40, 60), (45, 60), (50, 59)):
        params = CkksParameters(poly_modulus_degree=4096, data_bits=data_bits,
                                special_bits=special_bits)
        key = CkksSecretContext.generate(params, n_threads=THREADS)
        size = len(ours_encrypt(key, x, summands=MARKETS)) / (4 * x.size)
        prec = precision(key, summands=100, length=2048, seed=3)
        rows.append(f"{data_bits:9d} {special_bits:12d} | {size:13.2f} | "
                    f"{prec['max_abs_error']:.2e} ({prec['error_bound_8sigma']:.2e})")
    print("\n" + "\n".join(rows))
