"""Hazmat CKKS layer: parameters, precision of sums, public/secret separation, strict parsing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tenseal")

from fedmm_secure.errors import ConfigError, IntegrityError, ProtocolError  # noqa: E402
from fedmm_secure.primitives.ckks import (ADD_ONLY_PARAMETERS, CkksParameters,  # noqa: E402
                                          CkksPublicContext, CkksSecretContext, chunk_count,
                                          error_bound, scale_bits_for)

P = ADD_ONLY_PARAMETERS


@pytest.fixture(scope="module")
def secret() -> CkksSecretContext:
    return CkksSecretContext.generate(P, n_threads=1)


@pytest.fixture(scope="module")
def public(secret: CkksSecretContext) -> CkksPublicContext:
    return secret.public_context()


def test_default_parameters_are_128_bit_and_add_only() -> None:
    assert P.poly_modulus_degree == 4096
    assert P.data_bits + P.special_bits <= 109  # HE standard, 128-bit, N=4096
    assert P.coeff_mod_bit_sizes == (45, 60)


@pytest.mark.parametrize("kwargs", [
    dict(poly_modulus_degree=4096, data_bits=50, special_bits=60),   # 110 > 109 bits
    dict(poly_modulus_degree=3000, data_bits=40, special_bits=40),   # not a power of two
    dict(poly_modulus_degree=4096, data_bits=50, special_bits=40),   # special < data
    dict(poly_modulus_degree=4096, data_bits=20, special_bits=40),   # too little precision
])
def test_invalid_parameters_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        CkksParameters(**kwargs)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=100_000))
def test_scale_leaves_room_for_the_sum(summands: int) -> None:
    bits = scale_bits_for(P, summands=summands)
    # The sum of `summands` inputs in [-1, 1] stays below q/2 (q > 2**(data_bits-1)).
    assert summands * 2 ** bits <= 2 ** (P.data_bits - 2)
    assert bits >= 20


def test_too_many_summands_for_the_prime_is_refused() -> None:
    with pytest.raises(ConfigError):
        scale_bits_for(P, summands=2 ** 30)


def test_sum_of_100_inputs_at_the_bound_is_within_the_error_bound(secret, public) -> None:
    rng = np.random.default_rng(7)
    n, length = 100, 64
    xs = rng.uniform(-1.0, 1.0, (n, length))
    xs[:, :8] = 1.0    # worst case for wrap-around: every summand at +bound
    xs[:, 8:16] = -1.0
    bits = scale_bits_for(P, summands=n)
    total = public.add([secret.encrypt(x, scale_bits=bits) for x in xs], length=length,
                       scale_bits=bits)
    got = secret.decrypt(total, length=length, scale_bits=bits)
    err = np.max(np.abs(got - xs.sum(axis=0)))
    assert err <= error_bound(P, summands=n, scale_bits=bits)
    assert err < 1e-6


def test_multi_chunk_vector_round_trips_in_order(secret) -> None:
    rng = np.random.default_rng(8)
    length = 2 * P.slots + 5   # three ciphertexts, the last one padded
    x = rng.uniform(-1.0, 1.0, length)
    bits = scale_bits_for(P, summands=1)
    ct = secret.encrypt(x, scale_bits=bits)
    got = secret.decrypt(ct, length=length, scale_bits=bits)
    assert chunk_count(P, length) == 3
    assert np.max(np.abs(got - x)) <= error_bound(P, summands=1, scale_bits=bits)


def test_public_context_holds_no_secret_key_and_cannot_decrypt(secret, public) -> None:
    assert not public.is_private()
    raw = public._hazmat_tenseal()
    assert not raw.has_secret_key()
    import tenseal as ts
    bits = scale_bits_for(P, summands=1)
    ct = secret.encrypt(np.full(10, 0.5), scale_bits=bits)
    tensor = ts.ckks_tensor_from(raw, ct)
    with pytest.raises(ValueError, match="secret"):
        tensor.decrypt()


def test_public_bytes_do_not_contain_the_secret_key(secret, tmp_path) -> None:
    sk_path = tmp_path / "sk.bin"
    secret._ctx.secret_key().data.save(str(sk_path))
    window = sk_path.read_bytes()[16:80]   # after SEAL's 16-byte header
    assert window in secret._hazmat_bytes()  # positive control: the secret form has it
    assert window not in secret.public_bytes()


def test_public_context_refuses_a_private_context(secret) -> None:
    with pytest.raises(IntegrityError):
        CkksPublicContext.from_bytes(secret._hazmat_bytes(), P, n_threads=1)


def test_secret_context_refuses_public_garbage_and_other_parameters(secret) -> None:
    with pytest.raises(IntegrityError):
        CkksSecretContext._hazmat_from_bytes(secret.public_bytes(), P, n_threads=1)
    with pytest.raises(IntegrityError):
        CkksSecretContext._hazmat_from_bytes(b"\x00" * 100, P, n_threads=1)
    other = CkksParameters(poly_modulus_degree=4096, data_bits=40, special_bits=60)
    with pytest.raises(IntegrityError):
        CkksSecretContext._hazmat_from_bytes(secret._hazmat_bytes(), other, n_threads=1)


def test_secret_context_round_trips_through_its_bytes(secret) -> None:
    copy = CkksSecretContext._hazmat_from_bytes(secret._hazmat_bytes(), P, n_threads=1)
    bits = scale_bits_for(P, summands=1)
    x = np.linspace(-1, 1, 33)
    got = copy.decrypt(secret.encrypt(x, scale_bits=bits), length=33, scale_bits=bits)
    assert np.max(np.abs(got - x)) <= error_bound(P, summands=1, scale_bits=bits)


def test_fresh_keys_differ(secret) -> None:
    other = CkksSecretContext.generate(P, n_threads=1)
    bits = scale_bits_for(P, summands=1)
    x = np.linspace(-1, 1, 16)
    wrong = other.decrypt(secret.encrypt(x, scale_bits=bits), length=16, scale_bits=bits)
    assert np.max(np.abs(wrong - x)) > 1.0


def test_ciphertexts_are_checked_on_load(secret, public) -> None:
    bits = scale_bits_for(P, summands=2)
    ct = secret.encrypt(np.zeros(10), scale_bits=bits)
    with pytest.raises(ProtocolError):
        public.add([ct], length=P.slots + 1, scale_bits=bits)        # wrong chunk count
    with pytest.raises(ProtocolError):
        public.add([ct], length=10, scale_bits=bits - 1)              # wrong scale
    with pytest.raises(ProtocolError):
        public.add([ct[:-7]], length=10, scale_bits=bits)             # truncated
    with pytest.raises(ProtocolError):
        public.add([b"not a ciphertext"], length=10, scale_bits=bits)
    with pytest.raises(ProtocolError):
        public.add([], length=10, scale_bits=bits)


@pytest.mark.parametrize("bad", [np.array([1.5]), np.array([np.nan]), np.zeros((2, 2)),
                                 np.zeros(0)])
def test_encrypt_refuses_unnormalised_input(secret, bad) -> None:
    with pytest.raises(ProtocolError):
        secret.encrypt(bad, scale_bits=30)


def test_secret_context_is_neither_printed_nor_pickled(secret) -> None:
    assert "secret" in repr(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_ciphertext_is_under_8x_float32() -> None:
    # Size is a property of the parameters (compression of the 45-bit prime), not timing.
    s = CkksSecretContext.generate(P, n_threads=1)
    length = 4 * P.slots
    ct = s.encrypt(np.random.default_rng(1).uniform(-1, 1, length),
                   scale_bits=scale_bits_for(P, summands=10))
    assert len(ct) / (4 * length) < 8.0
