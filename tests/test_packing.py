"""Tests of the host ↔ device bit layout (bitdet.core.packing).

The layout is checked bit by bit against the documented rule (channel ``c`` is bit
``c % word_bits`` of word ``c // word_bits``, words little-endian), read back here with
``int.from_bytes(..., "little")`` rather than with numpy's bit order helpers.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core import packing
from bitdet.core.packing import (
    ACTIVATION_PAD_BIT,
    WEIGHT_PAD_BIT,
    bits_to_pm1,
    pack_activations,
    pack_bits,
    pack_thresholds,
    pack_weights,
    packed_width,
    pm1_to_bits,
    unpack_activations,
    unpack_bits,
    unpack_weights,
)

WORD_BITS = [8, 16, 32, 64]
HYPOTHESIS = settings(max_examples=80, deadline=None)


def words_of(packed_pixel: np.ndarray, word_bits: int) -> list[int]:
    """One packed pixel (1-D uint8) read as little-endian ``word_bits``-wide integers."""
    nbytes = word_bits // 8
    raw = bytes(packed_pixel.tolist())
    assert len(raw) % nbytes == 0
    return [int.from_bytes(raw[i:i + nbytes], "little") for i in range(0, len(raw), nbytes)]


def channel_bit(packed_pixel: np.ndarray, c: int, word_bits: int) -> int:
    """Bit of channel ``c`` by the documented rule."""
    return (words_of(packed_pixel, word_bits)[c // word_bits] >> (c % word_bits)) & 1


def random_bits(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=shape, dtype=np.uint8)


def random_pm1(seed: int, shape) -> torch.Tensor:
    return torch.from_numpy(random_bits(seed, shape).astype(np.float32) * 2 - 1)


# --------------------------------------------------------------------------- pack_bits


@HYPOTHESIS
@given(channels=st.integers(1, 200), word_bits=st.sampled_from(WORD_BITS),
       lead=st.lists(st.integers(1, 3), max_size=2), pad_bit=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**32 - 1))
def test_pack_bits_round_trip_and_layout(channels, word_bits, lead, pad_bit, seed):
    bits = random_bits(seed, (*lead, channels))
    packed = pack_bits(bits, word_bits=word_bits, pad_bit=pad_bit)
    words = -(-channels // word_bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (*lead, words * word_bits // 8)
    assert packed.shape[-1] == packed_width(channels, word_bits)

    back = unpack_bits(packed, channels, word_bits=word_bits, pad_bit=pad_bit)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, bits)
    np.testing.assert_array_equal(unpack_bits(packed, channels, word_bits=word_bits), bits)

    for idx in itertools.product(*(range(s) for s in lead)):
        pixel = packed[idx]
        for c in range(words * word_bits):
            expected = int(bits[idx][c]) if c < channels else pad_bit
            assert channel_bit(pixel, c, word_bits) == expected, (idx, c)


@HYPOTHESIS
@given(channels=st.integers(1, 200), seed=st.integers(0, 2**32 - 1))
def test_same_bytes_for_every_word_width(channels, seed):
    # "a packed pixel is also a little-endian bit string of its channels": with zero
    # padding, wider words only append zero bytes.
    bits = random_bits(seed, (channels,))
    narrow = pack_bits(bits, word_bits=8)
    for word_bits in WORD_BITS:
        wide = pack_bits(bits, word_bits=word_bits)
        np.testing.assert_array_equal(wide[:narrow.size], narrow)
        assert not wide[narrow.size:].any()
    as_int = int.from_bytes(bytes(narrow.tolist()), "little")
    assert as_int == sum(int(b) << c for c, b in enumerate(bits))


def test_pack_bits_hand_examples():
    # channels [1, 0, 1] in 8-bit words -> one byte 0b00000101
    assert pack_bits([1, 0, 1], word_bits=8).tolist() == [0b00000101]
    assert pack_bits([1, 0, 1], word_bits=8, pad_bit=1).tolist() == [0b11111101]
    # 9 channels in 16-bit words -> 2 bytes; channel 8 is bit 0 of the second byte
    nine = [0] * 8 + [1]
    assert pack_bits(nine, word_bits=16).tolist() == [0x00, 0x01]
    assert pack_bits([1] * 9, word_bits=16).tolist() == [0xFF, 0x01]
    assert pack_bits([1] * 9, word_bits=16, pad_bit=1).tolist() == [0xFF, 0xFF]
    # the same 9 channels in 8-bit words also take 2 bytes, in 32-bit words 4, in 64-bit 8
    assert pack_bits(nine, word_bits=8).tolist() == [0x00, 0x01]
    assert pack_bits(nine, word_bits=32).tolist() == [0x00, 0x01, 0x00, 0x00]
    assert pack_bits(nine, word_bits=64).tolist() == [0x00, 0x01] + [0x00] * 6
    # channel 31 is the top bit of the first 32-bit word (its 4th byte), 32 starts word 2
    c31 = [0] * 31 + [1]
    assert pack_bits(c31, word_bits=32).tolist() == [0, 0, 0, 0x80]
    assert pack_bits([*c31, 1], word_bits=32).tolist() == [0, 0, 0, 0x80, 1, 0, 0, 0]
    # a 16-bit word 0x1234 is stored as bytes 0x34, 0x12
    value = 0x1234
    bits = [(value >> c) & 1 for c in range(16)]
    assert pack_bits(bits, word_bits=16).tolist() == [0x34, 0x12]
    # leading axes are kept
    assert pack_bits([[1, 0], [0, 1], [1, 1]], word_bits=8).tolist() == [[1], [2], [3]]


@pytest.mark.parametrize("bits", [
    np.array([True, False, True]),
    torch.tensor([1, 0, 1]),
    torch.tensor([True, False, True]),
    np.array([1.0, 0.0, 1.0]),
    [1, 0, 1],
])
def test_pack_bits_input_types(bits):
    assert pack_bits(bits, word_bits=8).tolist() == [0b101]


def test_packed_width():
    assert packed_width(0, 8) == 0
    assert packed_width(1, 8) == 1
    assert packed_width(9, 16) == 2
    assert packed_width(33, 32) == 8
    assert packed_width(64, 64) == 8
    assert packed_width(65, 64) == 16
    with pytest.raises(ValueError, match="non-negative"):
        packed_width(-1, 8)


def test_pm1_bits_conversions():
    x = torch.tensor([-1.0, 1.0, 0.0, -0.0, 3.0])
    assert pm1_to_bits(x).tolist() == [0, 1, 1, 1, 1]             # sign(0) = +1
    assert pm1_to_bits(np.array([-1, 1])).dtype == np.uint8
    pm1 = bits_to_pm1([0, 1, 1])
    assert pm1.dtype == torch.float32 and pm1.tolist() == [-1.0, 1.0, 1.0]
    assert bits_to_pm1(np.array([1, 0]), dtype=torch.int8).dtype == torch.int8


# --------------------------------------------------------------------------- activations


@HYPOTHESIS
@given(n=st.integers(1, 2), channels=st.integers(1, 150), h=st.integers(1, 4),
       w=st.integers(1, 4), word_bits=st.sampled_from(WORD_BITS),
       seed=st.integers(0, 2**32 - 1))
def test_activations_round_trip_and_layout(n, channels, h, w, word_bits, seed):
    x = random_pm1(seed, (n, channels, h, w))
    packed = pack_activations(x, word_bits=word_bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (n, h, w, packed_width(channels, word_bits))
    back = unpack_activations(packed, channels, word_bits=word_bits)
    assert back.dtype == torch.float32
    assert torch.equal(back, x)
    # pixels row-major, each pixel its channels by the documented rule, padding bits 0
    flat = packed.reshape(n * h * w, -1)
    for i, (b, y, xx) in enumerate(itertools.product(range(n), range(h), range(w))):
        for c in range(flat.shape[1] * 8):
            expected = int(x[b, c, y, xx] > 0) if c < channels else ACTIVATION_PAD_BIT
            assert channel_bit(flat[i], c, word_bits) == expected


@pytest.mark.parametrize("shape", [(1, 15, 1, 2), (1, 16, 2, 1), (1, 9, 1, 3), (2, 15, 1, 2),
                                   (1, 33, 3, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("word_bits", [8, 16])
def test_packed_activations_are_the_row_major_byte_stream(shape, word_bits):
    # "This is the byte stream that crosses the link": its memory must be that stream, so
    # that buffer consumers (file/serial/socket write, np.frombuffer) see pixels row-major.
    x = random_pm1(sum(shape), shape)
    packed = pack_activations(x, word_bits=word_bits)
    assert packed.flags.c_contiguous, (packed.shape, packed.strides)
    assert bytes(memoryview(packed).cast("B")) == packed.tobytes(order="C")


def test_activations_hand_example():
    # N=1, C=3, H=1, W=2: pixel 0 channels (+1, −1, +1), pixel 1 channels (−1, +1, +1)
    x = torch.tensor([[[[1.0, -1.0]], [[-1.0, 1.0]], [[1.0, 1.0]]]])
    assert x.shape == (1, 3, 1, 2)
    packed = pack_activations(x, word_bits=8)
    assert packed.shape == (1, 1, 2, 1)
    assert packed.reshape(-1).tolist() == [0b101, 0b110]
    assert pack_activations(x, word_bits=16).reshape(-1).tolist() == [0b101, 0, 0b110, 0]
    assert torch.equal(unpack_activations(packed, 3, word_bits=8), x)


def test_activations_accept_numpy():
    x = random_pm1(4, (1, 5, 2, 3)).numpy()
    packed = pack_activations(x, word_bits=8)
    np.testing.assert_array_equal(unpack_activations(packed, 5, word_bits=8).numpy(), x)


# --------------------------------------------------------------------------- weights


@HYPOTHESIS
@given(out_channels=st.integers(1, 9), channels=st.integers(1, 70), kh=st.integers(1, 3),
       kw=st.integers(1, 3), cols=st.integers(1, 5), word_bits=st.sampled_from(WORD_BITS),
       seed=st.integers(0, 2**32 - 1))
def test_weights_round_trip_and_layout(out_channels, channels, kh, kw, cols, word_bits, seed):
    w = random_pm1(seed, (out_channels, channels, kh, kw))
    packed = pack_weights(w, word_bits=word_bits, cols=cols)
    words = -(-channels // word_bits)
    tiles = -(-out_channels // cols)
    assert packed.dtype == np.uint8
    assert packed.shape == (tiles, kh * kw * words, cols, word_bits // 8)
    back = unpack_weights(packed, (out_channels, channels, kh, kw), word_bits=word_bits)
    assert torch.equal(back, w)

    for o in range(tiles * cols):
        t, col = divmod(o, cols)
        for ky, kx in itertools.product(range(kh), range(kw)):
            tap = (ky * kw + kx) * words
            pixel = packed[t, tap:tap + words, col, :].reshape(-1)
            for c in range(words * word_bits):
                if o >= out_channels or c >= channels:
                    expected = WEIGHT_PAD_BIT                    # padding channels: 1s
                else:
                    expected = int(w[o, c, ky, kx] > 0)
                assert channel_bit(pixel, c, word_bits) == expected, (o, ky, kx, c)
    # padding output channels are whole 0xFF words
    padded = packed.transpose(0, 2, 1, 3).reshape(tiles * cols, -1)[out_channels:]
    assert (padded == 0xFF).all()


def test_weights_hand_example():
    # O=3, C=3, 1×1, 8-bit words, cols=2 -> 2 tiles, 1 K-word, 2 columns, 1 byte
    w = torch.tensor([[1.0, -1.0, -1.0],     # o0: bits 001 -> 0b11111001 (pad 1s)
                      [-1.0, 1.0, 1.0],      # o1: bits 110 -> 0b11111110
                      [1.0, 1.0, -1.0]])     # o2: bits 011 -> 0b11111011
    w = w[:, :, None, None]
    packed = pack_weights(w, word_bits=8, cols=2)
    assert packed.shape == (2, 1, 2, 1)
    assert packed[:, 0, :, 0].tolist() == [[0b11111001, 0b11111110], [0b11111011, 0xFF]]
    # a 1×2 kernel: the K-words are the taps in row-major order
    w2 = torch.tensor([[[[1.0, -1.0]], [[-1.0, -1.0]]]])           # O=1, C=2, kh=1, kw=2
    packed2 = pack_weights(w2, word_bits=8)
    assert packed2.shape == (1, 2, 1, 1)
    assert packed2.reshape(-1).tolist() == [0b11111101, 0b11111100]
    # 9 channels in 16-bit words: 2 bytes per tap, padding bits 1
    w3 = torch.ones(1, 9, 1, 1)
    assert pack_weights(w3, word_bits=16).reshape(-1).tolist() == [0xFF, 0xFF]
    w3[0, 8] = -1
    assert pack_weights(w3, word_bits=16).reshape(-1).tolist() == [0xFF, 0xFE]


def test_pad_bit_constants():
    assert ACTIVATION_PAD_BIT == 0
    assert WEIGHT_PAD_BIT == 1


# --------------------------------------------------------------------------- errors


def test_unpack_bits_corrupted_padding_raises():
    packed = pack_bits([1, 0, 1], word_bits=8, pad_bit=0)
    packed[0] |= 0x80                                       # a padding bit set to 1
    with pytest.raises(ValueError, match="padding bits after channel 3 must all be 0"):
        unpack_bits(packed, 3, word_bits=8, pad_bit=0)
    # without a pad_bit to check, the channels are still read
    assert unpack_bits(packed, 3, word_bits=8).tolist() == [1, 0, 1]
    weights = pack_bits([1, 0, 1], word_bits=16, pad_bit=1)
    weights[1] = 0x7F
    with pytest.raises(ValueError, match="must all be 1"):
        unpack_bits(weights, 3, word_bits=16, pad_bit=1)


@pytest.mark.parametrize("word_bits", WORD_BITS)
def test_unpack_activations_corrupted_padding_raises(word_bits):
    x = random_pm1(1, (1, 13, 2, 2))
    packed = pack_activations(x, word_bits=word_bits)
    packed[0, 1, 0, 1] |= 0x40                              # channel 14: padding
    with pytest.raises(ValueError, match="padding bits after channel 13"):
        unpack_activations(packed, 13, word_bits=word_bits)
    assert torch.equal(unpack_activations(packed, 13, word_bits=word_bits,
                                          check_padding=False), x)


def test_unpack_weights_corrupted_padding_raises():
    w = random_pm1(2, (3, 5, 3, 3))
    shape = (3, 5, 3, 3)
    packed = pack_weights(w, word_bits=8, cols=2)
    bad = packed.copy()
    bad[0, 4, 1, 0] &= 0b1011_1111                          # channel 6 of a tap: padding
    with pytest.raises(ValueError, match="padding bits after channel 5 must all be 1"):
        unpack_weights(bad, shape, word_bits=8)
    assert torch.equal(unpack_weights(bad, shape, word_bits=8, check_padding=False), w)
    bad = packed.copy()
    bad[1, 7, 1, 0] = 0xFE                                  # output channel 3: padding
    with pytest.raises(ValueError, match=r"padding output channels \(≥ 3\) must be 1s"):
        unpack_weights(bad, shape, word_bits=8)
    assert torch.equal(unpack_weights(bad, shape, word_bits=8, check_padding=False), w)


def test_wrong_byte_counts_raise():
    with pytest.raises(ValueError, match="9 channels in 16-bit words take 2 bytes per pixel, "
                                         "but the packed array has 1"):
        unpack_bits(np.zeros(1, np.uint8), 9, word_bits=16)
    with pytest.raises(ValueError, match="take 4 bytes per pixel, but the packed array has 8"):
        unpack_bits(np.zeros((2, 8), np.uint8), 9, word_bits=32)
    with pytest.raises(ValueError, match="a scalar"):
        unpack_bits(np.uint8(3), 3, word_bits=8)
    packed = pack_activations(random_pm1(0, (1, 33, 2, 2)), word_bits=32)
    with pytest.raises(ValueError, match="bytes per pixel"):
        unpack_activations(packed[..., :4], 33, word_bits=32)
    with pytest.raises(ValueError, match="bytes per pixel"):
        unpack_activations(packed, 32, word_bits=32)
    with pytest.raises(ValueError, match="N×H×W×bytes"):
        unpack_activations(packed[0], 33, word_bits=32)
    weights = pack_weights(random_pm1(0, (3, 5, 3, 3)), word_bits=8, cols=2)
    with pytest.raises(ValueError, match=r"pack to \(2, 9, 2, 1\), not \(2, 8, 2, 1\)"):
        unpack_weights(weights[:, :8], (3, 5, 3, 3), word_bits=8)
    with pytest.raises(ValueError, match="pack to"):
        unpack_weights(weights, (3, 5, 3, 3), word_bits=16)
    with pytest.raises(ValueError, match="pack to"):
        unpack_weights(weights, (5, 5, 3, 3), word_bits=8)
    with pytest.raises(ValueError, match="4-D uint8"):
        unpack_weights(weights.astype(np.int16), (3, 5, 3, 3), word_bits=8)


def test_wrong_dtypes_raise():
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(np.zeros(1, np.int16), 3, word_bits=8)
    with pytest.raises(TypeError, match="0/1"):
        pack_bits(np.array(["a", "b"]))


@pytest.mark.parametrize("bad", [2, -1, 0.5, float("nan")])
def test_non_binary_values_raise(bad):
    with pytest.raises(ValueError, match="must hold only 0 and 1"):
        pack_bits(np.array([0, 1, bad]))


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="pad_bit must be 0 or 1"):
        pack_bits([1, 0], pad_bit=2)
    with pytest.raises(ValueError, match="at least one axis"):
        pack_bits(np.uint8(1))
    with pytest.raises(ValueError, match="N×C×H×W"):
        pack_activations(torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="O×C×kh×kw"):
        pack_weights(torch.ones(3, 2, 2))
    for cols in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="cols must be a positive integer"):
            pack_weights(torch.ones(1, 1, 1, 1), cols=cols)


@pytest.mark.parametrize(("word_bits", "error", "message"), [
    (0, ValueError, "positive multiple of 8"),
    (12, ValueError, "positive multiple of 8"),
    (-8, ValueError, "positive multiple of 8"),
    (True, TypeError, "must be an integer"),
    (8.0, TypeError, "must be an integer"),
    ("8", TypeError, "must be an integer"),
])
def test_bad_word_bits_raise(word_bits, error, message):
    x = torch.ones(1, 3, 1, 1)
    calls = [
        lambda: pack_bits([1, 0, 1], word_bits=word_bits),
        lambda: unpack_bits(np.zeros(1, np.uint8), 3, word_bits=word_bits),
        lambda: packed_width(3, word_bits),
        lambda: pack_activations(x, word_bits=word_bits),
        lambda: unpack_activations(np.zeros((1, 1, 1, 1), np.uint8), 3, word_bits=word_bits),
        lambda: pack_weights(x, word_bits=word_bits),
        lambda: unpack_weights(np.zeros((1, 1, 1, 1), np.uint8), (1, 3, 1, 1),
                               word_bits=word_bits),
    ]
    for call in calls:
        with pytest.raises(error, match=message):
            call()


def test_numpy_integer_word_bits_accepted():
    assert pack_bits([1, 0, 1], word_bits=np.int64(16)).tolist() == [0b101, 0]
    assert packing.packed_width(3, np.int32(8)) == 1


def test_pack_thresholds_fills_the_last_tile_with_never():
    t = np.array([[0], [5], [10]], dtype=np.int32)
    packed = pack_thresholds(t, 9, cols=2)
    assert packed.shape == (2, 2, 1)
    assert packed[:, :, 0].tolist() == [[0, 5], [10, 10]]   # fill channel: K + 1 = 10
    multi = pack_thresholds(torch.tensor([[1, 2, 3]]), 4, cols=3)
    assert multi.tolist() == [[[1, 2, 3], [5, 5, 5], [5, 5, 5]]]
    with pytest.raises(ValueError, match=r"\[0, K \+ 1 = 10\]"):
        pack_thresholds(np.array([11]), 9)
    with pytest.raises(ValueError, match="cols must be a positive integer"):
        pack_thresholds(t, 9, cols=0)
