"""Contract v2 packing: n-bit level maps as bit-planes, shortcut threshold tables.

Each plane is checked against the documented rule (plane ``b`` is bit ``b`` of every level,
packed exactly like a 1-bit map by ``pack_activations``), read back with
``int.from_bytes(..., "little")``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core.packing import (
    pack_activations,
    pack_levels,
    pack_thresholds,
    packed_width,
    unpack_levels,
)

WORD_BITS = [8, 16, 32, 64]
HYPOTHESIS = settings(max_examples=60, deadline=None)


def random_levels(seed: int, bits: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=shape, dtype=np.int32)


@HYPOTHESIS
@given(bits=st.integers(1, 4), n=st.integers(1, 2), channels=st.integers(1, 80),
       h=st.integers(1, 3), w=st.integers(1, 3), word_bits=st.sampled_from(WORD_BITS),
       seed=st.integers(0, 2**32 - 1))
def test_pack_levels_round_trip_and_layout(bits, n, channels, h, w, word_bits, seed):
    levels = random_levels(seed, bits, (n, channels, h, w))
    packed = pack_levels(torch.from_numpy(levels), bits, word_bits=word_bits)
    assert packed.dtype == np.uint8 and packed.flags.c_contiguous
    assert packed.shape == (bits, n, h, w, packed_width(channels, word_bits))
    back = unpack_levels(packed, channels, word_bits=word_bits)
    assert back.dtype == torch.int32 and tuple(back.shape) == levels.shape
    np.testing.assert_array_equal(back.numpy(), levels)
    for b in range(bits):
        plane = (levels >> b) & 1
        # each plane is a 1-bit map packed as today
        np.testing.assert_array_equal(packed[b], pack_activations(plane * 2 - 1,
                                                                  word_bits=word_bits))
        # and by the documented rule: channel c is bit c % word_bits of word c // word_bits
        nbytes = word_bits // 8
        raw = bytes(packed[b, 0, 0, 0].tolist())
        words = [int.from_bytes(raw[i:i + nbytes], "little") for i in range(0, len(raw), nbytes)]
        for c in range(channels):
            assert (words[c // word_bits] >> (c % word_bits)) & 1 == plane[0, c, 0, 0]
        assert words[-1] >> (channels - (len(words) - 1) * word_bits) == 0   # pad bits 0


def test_one_bit_levels_are_todays_activations():
    levels = random_levels(3, 1, (2, 13, 3, 4))
    packed = pack_levels(levels, 1, word_bits=16)
    np.testing.assert_array_equal(packed[0], pack_activations(levels * 2 - 1, word_bits=16))
    # a narrower map packs into more planes unchanged: the extra planes are all zero
    wide = pack_levels(levels, 3, word_bits=16)
    np.testing.assert_array_equal(wide[0], packed[0])
    assert not wide[1:].any()


def test_pack_levels_hand_example():
    # 2-bit levels c0..c2 = 3, 0, 2: plane 0 = 1 0 0 → 0x01, plane 1 = 1 0 1 → 0x05
    levels = np.array([3, 0, 2], dtype=np.int64).reshape(1, 3, 1, 1)
    assert pack_levels(levels, 2, word_bits=8).reshape(-1).tolist() == [0x01, 0x05]
    assert pack_levels(levels, 2, word_bits=16).reshape(-1).tolist() == [0x01, 0, 0x05, 0]


def test_pack_levels_errors():
    levels = np.zeros((1, 2, 2, 2), dtype=np.int32)
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 3\] for 2 bits, found 4"):
        pack_levels(levels + 4, 2)
    with pytest.raises(ValueError, match=r"found -1"):
        pack_levels(levels - 1, 2)
    with pytest.raises(TypeError, match="levels must hold integers"):
        pack_levels(levels.astype(np.float32), 2)
    with pytest.raises(ValueError, match="N×C×H×W"):
        pack_levels(levels[0], 2)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 8\]"):
        pack_levels(levels, 0)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        pack_levels(levels, 2, word_bits=12)
    packed = pack_levels(levels + 1, 2, word_bits=8)
    with pytest.raises(ValueError, match="bits×N×H×W×bytes"):
        unpack_levels(packed[0], 2, word_bits=8)
    with pytest.raises(ValueError, match="take 2 bytes per pixel, but the packed array has 1"):
        unpack_levels(packed, 9, word_bits=8)
    corrupt = packed.copy()
    corrupt[1, 0, 0, 0] |= 0x80
    with pytest.raises(ValueError, match="padding bits after channel 2 must all be 0"):
        unpack_levels(corrupt, 2, word_bits=8)
    assert unpack_levels(corrupt, 2, word_bits=8, check_padding=False).tolist() == \
        (levels + 1).tolist()


# --------------------------------------------------------------------------- thresholds


def test_pack_threshold_table_layout_and_fill():
    k, in_bits = 9, 2
    never = 3 * k + 1
    table = np.arange(3 * 4 * 3).reshape(3, 4, 3) % never         # (O = 3, R = 4, L = 3)
    packed = pack_thresholds(table, k, cols=2, in_bits=in_bits)
    assert packed.dtype == np.int64 and packed.shape == (2, 2, 4, 3)
    for o in range(3):
        np.testing.assert_array_equal(packed[o // 2, o % 2], table[o])
    assert (packed[1, 1] == never).all()                           # fill channel: never
    # 2-D thresholds keep today's layout; in_bits moves the "never" value
    flat = pack_thresholds(np.array([[1, 2, 3]]), k, cols=2, in_bits=3)
    assert flat.tolist() == [[[1, 2, 3], [7 * k + 1] * 3]]
    assert pack_thresholds(np.array([[1, 2, 3]]), k, cols=2).tolist() == \
        [[[1, 2, 3], [k + 1] * 3]]


def test_pack_threshold_table_errors():
    with pytest.raises(ValueError, match=r"\[0, \(2\*\*2 − 1\)·K \+ 1 = 28\]"):
        pack_thresholds(np.full((1, 2, 1), 29), 9, in_bits=2)
    assert pack_thresholds(np.full((1, 2, 1), 28), 9, in_bits=2).shape == (1, 1, 2, 1)
    with pytest.raises(ValueError, match=r"\[0, K \+ 1 = 10\]"):
        pack_thresholds(np.full((1, 2, 1), 11), 9)
    with pytest.raises(ValueError, match=r"\(O,\), \(O, L\) or \(O, R, L\)"):
        pack_thresholds(np.zeros((1, 1, 1, 1), dtype=np.int64), 9)
    with pytest.raises(ValueError, match=r"in_bits must be an integer in \[1, 8\]"):
        pack_thresholds(np.zeros((1, 1), dtype=np.int64), 9, in_bits=0)
