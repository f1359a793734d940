import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import ConfigError, DataError, ProtocolError
from fedmm_secure.primitives.quantization import make_quantizer


def _ring_sum(encoded):
    total = np.zeros_like(encoded[0])
    for e in encoded:
        total += e  # uint32 arithmetic is the ring Z_2^32
    return total


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 50), bits=st.integers(8, 32), length=st.integers(1, 40),
       rounding=st.sampled_from(["nearest", "stochastic"]), seed=st.integers(0, 2**32 - 1),
       bound=st.floats(1e-3, 1e6), per_coord=st.booleans())
def test_sum_error_is_within_the_reported_bound(n, bits, length, rounding, seed, bound, per_coord):
    if ((1 << (bits - 1)) - 1) // n < 1:
        return
    rng = np.random.default_rng(seed)
    bounds = rng.uniform(0.1, 1.0, length) * bound if per_coord else bound
    q = make_quantizer(bounds=bounds, length=length, n_participants=n, ring_bits=bits,
                       rounding=rounding)
    b = np.broadcast_to(bounds, (length,))
    xs = [rng.uniform(-1.5, 1.5, length) * b for _ in range(n)]
    enc = [q.quantize(x, rng=rng)[0] for x in xs]
    if bits < 32:
        total = _ring_sum(enc) & np.uint32((1 << bits) - 1)
    else:
        total = _ring_sum(enc)
    exact = sum(np.clip(x, -b, b) for x in xs)
    err = np.max(np.abs(q.dequantize_sum(total) - exact))
    assert err <= q.max_abs_error_bound()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1000), bits=st.integers(8, 32), sign=st.sampled_from([-1.0, 1.0]))
def test_extreme_sums_never_wrap(n, bits, sign):
    if ((1 << (bits - 1)) - 1) // n < 1:
        with pytest.raises(ConfigError):
            make_quantizer(bounds=1.0, length=3, n_participants=n, ring_bits=bits)
        return
    q = make_quantizer(bounds=1.0, length=3, n_participants=n, ring_bits=bits)
    e, clipped = q.quantize(np.full(3, 10.0 * sign))  # far outside the bound: clipped to it
    assert clipped == 3
    # n copies of the most extreme encoding, summed mod 2^bits
    total = ((e.astype(np.uint64) * n) % (1 << bits)).astype(np.uint32)
    got = q.dequantize_sum(total)
    assert np.all(np.sign(got) == sign)
    assert np.allclose(got, sign * n, rtol=0, atol=q.max_abs_error_bound())


def test_stochastic_rounding_is_unbiased_and_needs_rng():
    q = make_quantizer(bounds=1.0, length=20000, n_participants=2**20, ring_bits=32,
                       rounding="stochastic")  # coarse grid: step 1/2047
    x = np.full(20000, 0.3 / q.scale[0])  # 0.3 of a grid step
    e, _ = q.quantize(x, rng=np.random.default_rng(0))
    mean = q.dequantize_sum(e).mean()
    assert abs(mean - x[0]) < 0.02 / q.scale[0]
    with pytest.raises(ConfigError):
        q.quantize(x)


def test_config_errors_and_bad_input():
    with pytest.raises(ConfigError):
        make_quantizer(bounds=1.0, length=4, n_participants=10, max_error=1e-12)
    with pytest.raises(ConfigError):
        make_quantizer(bounds=-1.0, length=4, n_participants=10)
    with pytest.raises(ConfigError):
        make_quantizer(bounds=np.ones(3), length=4, n_participants=10)
    with pytest.raises(ConfigError):
        make_quantizer(bounds=1.0, length=4, n_participants=10, ring_bits=33)
    with pytest.raises(ConfigError):
        make_quantizer(bounds=1.0, length=4, n_participants=10, rounding="up")
    q = make_quantizer(bounds=1.0, length=4, n_participants=10, max_error=1e-6)
    with pytest.raises(DataError):
        q.quantize(np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ProtocolError):
        q.quantize(np.zeros(5))
    with pytest.raises(ProtocolError):
        q.dequantize_sum(np.zeros(4, dtype=np.int64))


def test_clipping_is_counted_per_coordinate_bound():
    q = make_quantizer(bounds=np.array([1.0, 2.0, 3.0]), length=3, n_participants=2)
    _, clipped = q.quantize(np.array([1.5, 1.5, -3.5]))
    assert clipped == 2


@pytest.mark.parametrize("per_coord", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bits", [32, 20])
def test_nearest_encoding_is_the_direct_formula_bit_for_bit(per_coord, dtype, bits):
    # The chunked encoder skips clipping where a chunk holds nothing beyond the bound and reads
    # float32 without widening it first; neither may change a single ring element or the count.
    from fedmm_secure.primitives.quantization import _CHUNK
    length = 3 * _CHUNK + 17
    rng = np.random.default_rng(7)
    bounds = rng.uniform(0.1, 3.0, length) if per_coord else 0.7
    q = make_quantizer(bounds=bounds, length=length, n_participants=5, ring_bits=bits)
    b = np.broadcast_to(np.asarray(bounds, dtype=np.float64), (length,))
    x = rng.uniform(-1.0, 1.0, length) * b            # chunk 0 and the tail: within the bound
    huge = float(np.finfo(dtype).max)                          # finite, far beyond the bound
    x[_CHUNK:_CHUNK + 6] = b[_CHUNK:_CHUNK + 6] * np.array([1, -1, 2, -2, 1, 1])
    x[_CHUNK + 4:_CHUNK + 6] = [huge, -huge]
    x[_CHUNK + 6] = np.nextafter(b[_CHUNK + 6], np.inf)      # just beyond: clipped and counted
    x[_CHUNK + 7] = -np.nextafter(b[_CHUNK + 7], np.inf)
    x[2 * _CHUNK] = b[2 * _CHUNK]                              # exactly at the bound: not counted
    x = x.astype(dtype)
    wide = x.astype(np.float64)
    want = np.rint(np.clip(wide * q.scale, -q.qmax, q.qmax)).astype(np.int64) % (1 << bits)
    with np.errstate(over="ignore"):
        got, clipped = q.quantize(x)
    assert np.array_equal(got.astype(np.int64), want)
    assert clipped == int(np.count_nonzero(np.abs(wide) > b))
    assert clipped >= 4
    with pytest.raises(DataError):
        q.quantize(np.where(np.arange(length) == length - 1, np.inf, x))
