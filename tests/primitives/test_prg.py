import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from fedmm_secure.errors import ProtocolError
from fedmm_secure.primitives.keys import SymmetricKey
from fedmm_secure.primitives.prg import accumulate_masks, expand, keystream_into

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt: keystream = plaintext XOR ciphertext.
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
NIST_CT = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
                        "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6")


def test_keystream_matches_nist_sp800_38a_f55():
    out = bytearray(64 + 15)
    keystream_into(NIST_KEY, out, iv=NIST_IV)
    assert bytes(a ^ b for a, b in zip(out[:64], NIST_PT)) == NIST_CT


def test_expand_is_aes256_ctr_from_zero_counter_little_endian():
    key = SymmetricKey(NIST_KEY)
    enc = Cipher(algorithms.AES(NIST_KEY), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(4 * 1003)), dtype="<u4")
    got = expand(key, 1003)
    assert got.dtype == np.uint32 and got.shape == (1003,)
    assert np.array_equal(got, ref)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 3000), n_add=st.integers(0, 4), n_sub=st.integers(0, 4),
       seed=st.binary(min_size=32, max_size=32))
def test_accumulate_equals_naive_sum(length, n_add, n_sub, seed):
    keys = [SymmetricKey(seed).derive(context=b"k%d" % i) for i in range(n_add + n_sub)]
    acc = np.arange(length, dtype=np.uint32)
    ref = acc.astype(np.uint64)
    for i, k in enumerate(keys):
        m = expand(k, length).astype(np.uint64)
        ref = (ref + m) if i < n_add else (ref + (1 << 32) - m)
    accumulate_masks(acc, add=keys[:n_add], subtract=keys[n_add:])
    assert np.array_equal(acc, (ref % (1 << 32)).astype(np.uint32))


def test_accumulate_across_chunk_boundaries():
    length = (1 << 16) * 2 + 5  # not a multiple of the internal chunk
    k = SymmetricKey.generate()
    acc = np.zeros(length, dtype=np.uint32)
    accumulate_masks(acc, add=[k], subtract=[])
    assert np.array_equal(acc, expand(k, length))


def _ctr_reference(key: bytes, nbytes: int) -> bytes:
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(nbytes))


@pytest.mark.parametrize("length", [1, 7, 8, 9, 1003, (1 << 16) + 5, 3 * (1 << 16)])
def test_accumulated_masks_are_plain_aes256_ctr(length):
    # The masks come out of the GCM code path (MaskStream); peers and the aggregator expand
    # them with whatever this code runs, so they must be CTR's bytes exactly, at every length.
    raw = [bytes([i]) * 32 for i in (3, 4, 5)]
    acc = np.arange(length, dtype=np.uint32)
    accumulate_masks(acc, add=[SymmetricKey(raw[0]), SymmetricKey(raw[1])],
                     subtract=[SymmetricKey(raw[2])])
    ref = np.arange(length, dtype=np.uint64)
    for sign, k in zip((1, 1, -1), raw):
        ref = ref + sign * np.frombuffer(_ctr_reference(k, 4 * length), dtype="<u4").astype(np.int64)
    assert np.array_equal(acc, (ref % (1 << 32)).astype(np.uint32))


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 200), min_size=1, max_size=8), gcm_max=st.sampled_from([None, 64]))
def test_mask_stream_pieces_continue_one_ctr_stream(sizes, gcm_max):
    # Pieces of any size, across the 32-byte CTR lead-in, and the CTR-only path that streams
    # longer than GCM's per-nonce limit take (exercised with the limit lowered).
    from fedmm_secure.primitives.prg import MaskStream
    total = sum(sizes)
    old = MaskStream._GCM_MAX
    if gcm_max is not None:
        MaskStream._GCM_MAX = gcm_max
    try:
        stream = MaskStream(NIST_KEY, total)
        got = bytearray()
        for n in sizes:
            out = bytearray(n + 15)
            stream.fill(bytes(n), out)
            got += out[:n]
    finally:
        MaskStream._GCM_MAX = old
    assert bytes(got) == _ctr_reference(NIST_KEY, total)


@settings(max_examples=20, deadline=None)
@given(seeds=st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=6, unique=True),
       length=st.integers(1, 500))
def test_pairwise_masks_cancel_exactly(seeds, length):
    # Every pair adds +m on one side and -m on the other: the sum of all masked zeros is zero.
    total = np.zeros(length, dtype=np.uint32)
    for i in range(len(seeds)):
        acc = np.zeros(length, dtype=np.uint32)
        pair_add = [SymmetricKey(bytes(a ^ b for a, b in zip(seeds[i], seeds[j])))
                    for j in range(len(seeds)) if j > i]
        pair_sub = [SymmetricKey(bytes(a ^ b for a, b in zip(seeds[i], seeds[j])))
                    for j in range(len(seeds)) if j < i]
        accumulate_masks(acc, add=pair_add, subtract=pair_sub)
        total += acc
    assert not total.any()


def test_keystream_bytes_look_uniform():
    data = expand(SymmetricKey(b"\x01" * 32), 1 << 16).view(np.uint8)
    counts = np.bincount(data, minlength=256)
    assert chisquare(counts).pvalue > 1e-4
    bits = np.unpackbits(data)
    assert abs(bits.mean() - 0.5) < 0.005


def test_distinct_keys_give_distinct_streams_and_input_is_checked():
    assert not np.array_equal(expand(SymmetricKey(b"\x01" * 32), 64),
                              expand(SymmetricKey(b"\x02" * 32), 64))
    with pytest.raises(ProtocolError):
        expand(b"\x01" * 32, 8)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        expand(SymmetricKey(b"\x01" * 32), 0)
    with pytest.raises(ProtocolError):
        accumulate_masks(np.zeros(4, dtype=np.int64), add=[], subtract=[])


def test_finish_chunk_sees_every_final_chunk_in_order():
    import hashlib
    length = (1 << 16) + 123
    keys = [SymmetricKey(b"\x05" * 32), SymmetricKey(b"\x06" * 32)]
    acc = np.arange(length, dtype=np.uint32)
    h = hashlib.sha256()
    seen = []

    def finish(part):
        part &= np.uint32(0xFFFF)  # chunks are writeable views of the accumulator
        seen.append(part.shape[0])
        h.update(part)

    accumulate_masks(acc, add=keys[:1], subtract=keys[1:], finish_chunk=finish)
    ref = (np.arange(length, dtype=np.uint32) + expand(keys[0], length) - expand(keys[1], length))
    assert np.array_equal(acc, ref & np.uint32(0xFFFF))
    assert sum(seen) == length and len(seen) == 2
    assert h.digest() == hashlib.sha256(acc.tobytes()).digest()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_keystream_reads_continue_one_aes_ctr_stream(sizes):
    from fedmm_secure.primitives.prg import Keystream
    ks = Keystream(SymmetricKey(NIST_KEY))
    got = b"".join(bytes(ks.read(n)) for n in sizes)
    enc = Cipher(algorithms.AES(NIST_KEY), modes.CTR(bytes(16))).encryptor()
    assert got == enc.update(bytes(sum(sizes)))


def _gcm_counter_blocks(key: bytes, nonce: int, first: int, count: int) -> bytes:
    """Reference: AES-256-ECB of the counter blocks nonce (12 bytes, big-endian) || be32(i + 2)."""
    blocks = b"".join(nonce.to_bytes(12, "big") + (i + 2).to_bytes(4, "big") for i in range(first, first + count))
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(blocks)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_bulk_keystream_is_aes256_of_gcm_counter_blocks(sizes):
    from fedmm_secure.primitives.prg import BulkKeystream
    ks = BulkKeystream(SymmetricKey(NIST_KEY))
    got = b"".join(bytes(ks.read(n)) for n in sizes)
    total = sum(sizes)
    assert got == _gcm_counter_blocks(NIST_KEY, 0, 0, -(-total // 16))[:total]


def test_bulk_keystream_moves_to_the_next_nonce_without_reusing_a_block():
    from fedmm_secure.primitives.prg import BulkKeystream

    class Small(BulkKeystream):
        PER_NONCE = 48  # three blocks per nonce

    ks = Small(SymmetricKey(NIST_KEY))
    got = bytes(ks.read(40)) + bytes(ks.read(100))  # crosses nonces 0 -> 1 -> 2
    want = b"".join(_gcm_counter_blocks(NIST_KEY, n, 0, 3) for n in range(3))[:140]
    assert got == want
    assert len(set(got[i:i + 16] for i in range(0, 128, 16))) == 8  # no block twice
