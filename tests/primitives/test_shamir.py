import hashlib
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmm_secure.errors import IntegrityError, ProtocolError
from fedmm_secure.primitives.keys import AgreementPrivateKey, SymmetricKey
from fedmm_secure.primitives.shamir import (PRIME, Share, lagrange_weights_at_zero,
                                            recover_agreement_key, recover_secret,
                                            recover_secrets, recover_symmetric_key, split_key,
                                            split_secret)


def _entropy(seed: bytes):
    counter = itertools.count()
    return lambda n: hashlib.shake_256(seed + next(counter).to_bytes(8, "big")).digest(n)


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 12), data=st.data())
def test_any_t_of_n_reconstruct(secret, n, data):
    t = data.draw(st.integers(1, n))
    xs = data.draw(st.lists(st.integers(1, 2**16 - 1), min_size=n, max_size=n, unique=True))
    shares = split_secret(secret, threshold=t, xs=xs, entropy=os.urandom)
    subset = data.draw(st.lists(st.sampled_from(shares), min_size=t, max_size=n, unique=True))
    assert recover_secret(subset, threshold=t) == secret


def _interpolate_at(points, x):
    """Value at x of the unique polynomial of degree < len(points) through points (mod p)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if j != i:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32),
       n=st.integers(2, 8), data=st.data())
def test_fewer_than_t_shares_are_consistent_with_any_secret(secret, other, n, data):
    # For t-1 shares of `secret` and ANY candidate `other`, there is a degree-(t-1) polynomial
    # through the t-1 shares with constant term `other`: completing it with one more share at
    # an unused x makes the t shares reconstruct `other`. So t-1 shares carry no information.
    t = data.draw(st.integers(2, n))
    shares = split_secret(secret, threshold=t, xs=range(1, n + 1), entropy=os.urandom)
    seen = shares[: t - 1]
    points = [(0, int.from_bytes(other, "big"))] + [(s.x, s.y) for s in seen]
    forged = Share(n + 1, _interpolate_at(points, n + 1))
    assert recover_secret(seen + [forged], threshold=t) == other


def test_entropy_is_what_randomises_the_shares():
    s = b"\x42" * 32
    a = split_secret(s, threshold=3, xs=[1, 2, 3], entropy=_entropy(b"a"))
    b = split_secret(s, threshold=3, xs=[1, 2, 3], entropy=_entropy(b"a"))
    c = split_secret(s, threshold=3, xs=[1, 2, 3], entropy=_entropy(b"b"))
    assert a == b and a != c


def test_batch_recovery_and_weights():
    secrets = [os.urandom(32) for _ in range(5)]
    sets = [split_secret(s, threshold=4, xs=range(1, 8), entropy=os.urandom)[2:] for s in secrets]
    assert recover_secrets(sets, threshold=4) == secrets
    w = lagrange_weights_at_zero([1, 2, 3])
    assert sum(w) % PRIME == 1  # the constant polynomial 1 interpolates to 1


def test_key_helpers_roundtrip():
    k = SymmetricKey.generate()
    assert recover_symmetric_key(split_key(k, threshold=2, xs=[1, 2, 3], entropy=os.urandom)[1:],
                                 threshold=2) == k
    a = AgreementPrivateKey.generate()
    shares = split_key(a, threshold=3, xs=[4, 5, 6], entropy=os.urandom)
    assert recover_agreement_key(shares, threshold=3).public_key() == a.public_key()


def test_share_encoding_and_validation():
    (s,) = split_secret(b"\x01" * 32, threshold=1, xs=[7], entropy=os.urandom)
    assert Share.from_bytes(s.to_bytes()) == s
    assert str(s.y) not in repr(s)
    for bad in (b"", s.to_bytes()[:-1], s.to_bytes() + b"\x00",
                bytes(2) + s.to_bytes()[2:], s.to_bytes()[:2] + PRIME.to_bytes(33, "big")):
        with pytest.raises(IntegrityError):
            Share.from_bytes(bad)
    with pytest.raises(ProtocolError):
        split_secret(b"\x01" * 31, threshold=1, xs=[1], entropy=os.urandom)
    with pytest.raises(ProtocolError):
        split_secret(b"\x01" * 32, threshold=2, xs=[1, 1], entropy=os.urandom)
    with pytest.raises(ProtocolError):
        split_secret(b"\x01" * 32, threshold=4, xs=[1, 2, 3], entropy=os.urandom)
    with pytest.raises(ProtocolError):
        split_secret(b"\x01" * 32, threshold=1, xs=[0], entropy=os.urandom)
    shares = split_secret(b"\x01" * 32, threshold=3, xs=[1, 2, 3], entropy=os.urandom)
    with pytest.raises(ProtocolError):
        recover_secret(shares[:2], threshold=3)
