"""Contract v2 in the golden model: n-bit activations, residual shortcuts, the graph.

The references here are naive loops (per output pixel, per window tap, per bit plane, with
padding filled in by index checks) or the existing 1-bit functions applied plane by plane,
so that they share no code path with the new fast and reference paths under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, GraphNode, PoolPass
from bitdet.core.packing import pack_levels, pack_weights

HYPOTHESIS = settings(max_examples=40, deadline=None)


def random_pm1(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.float32)


def random_levels(gen: torch.Generator, bits: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 1 << bits, shape, generator=gen, dtype=torch.int32)


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def accumulator_loops(levels, w, in_bits, stride, padding, pad_level) -> np.ndarray:
    """A = Σ_b 2^b · popcount(XNOR(plane b, w)) per output pixel, from the definition."""
    levels = np.asarray(levels, dtype=np.int64)
    wbits = np.asarray(w) > 0
    n, c, h, wd = levels.shape
    o, _, kh, kw = wbits.shape
    sh, sw = stride
    ph, pw = padding
    oh, ow = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    pad_pixel = np.full(c, pad_level, dtype=np.int64)
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for b, oy, ox in itertools.product(range(n), range(oh), range(ow)):
        total = np.zeros(o, dtype=np.int64)
        for ky, kx in itertools.product(range(kh), range(kw)):
            iy, ix = oy * sh - ph + ky, ox * sw - pw + kx
            a = levels[b, :, iy, ix] if 0 <= iy < h and 0 <= ix < wd else pad_pixel
            for bit in range(in_bits):
                plane = ((a >> bit) & 1).astype(bool)                       # C
                total += (1 << bit) * (plane[None, :] == wbits[:, :, ky, kx]).sum(axis=1)
        out[b, :, oy, ox] = total
    return out


def threshold_table_loops(a, table, shortcut) -> np.ndarray:
    """Per output: the number of thresholds of row T[o, r] that A reaches."""
    a, t, r = np.asarray(a), np.asarray(table), np.asarray(shortcut)
    out = np.zeros(a.shape, dtype=np.int64)
    for idx in itertools.product(*(range(s) for s in a.shape)):
        out[idx] = sum(int(a[idx] >= tj) for tj in t[idx[1], r[idx]])
    return out


def maxpool_loops(levels, kernel, stride) -> np.ndarray:
    levels = np.asarray(levels)
    n, c, h, w = levels.shape
    oh, ow = out_size(h, kernel, stride, 0), out_size(w, kernel, stride, 0)
    out = np.zeros((n, c, oh, ow), dtype=np.int64)
    for b, ch, oy, ox in itertools.product(range(n), range(c), range(oh), range(ow)):
        window = levels[b, ch, oy * stride:oy * stride + kernel, ox * stride:ox * stride + kernel]
        out[b, ch, oy, ox] = window.max()
    return out


def plane_pm1(levels: torch.Tensor, bit: int) -> torch.Tensor:
    """Plane ``bit`` of a level map as a ±1 float map (level bit 1 ≙ +1)."""
    return ((levels.to(torch.int64) >> bit) & 1).to(torch.float32) * 2 - 1


def plane_popcount_sum(levels, w, in_bits, stride, padding, pad_level) -> torch.Tensor:
    """Σ_b 2^b · P_b with P_b from the existing 1-bit popcount_conv2d of each ±1 plane."""
    total = 0
    for bit in range(in_bits):
        pad_value = ((pad_level >> bit) & 1) * 2 - 1
        total = total + (golden.popcount_conv2d(plane_pm1(levels, bit), w, stride=stride,
                                                padding=padding, pad_value=pad_value,
                                                method="reference").to(torch.int64) << bit)
    return total


# --------------------------------------------------------------------------- the accumulator


@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("stride", "padding"), [(1, 0), (1, 1), (2, 0), (2, 1)])
@pytest.mark.parametrize("channels", [1, 5])
def test_level_conv2d_every_pad_level_matches_loops(in_bits, stride, padding, channels):
    gen = torch.Generator().manual_seed(100 * in_bits + 10 * stride + padding + channels)
    x = random_levels(gen, in_bits, 1, channels, 5, 4)
    w = random_pm1(gen, 2, channels, 3, 3)
    k = channels * 9
    for pad_level in range(1 << in_bits) if padding else [0]:
        expected = accumulator_loops(x, w, in_bits, (stride, stride), (padding, padding),
                                     pad_level)
        for method in ("fast", "reference"):
            a = golden.level_conv2d(x, w, in_bits=in_bits, stride=stride, padding=padding,
                                    pad_level=pad_level, method=method)
            assert a.dtype == torch.int32
            np.testing.assert_array_equal(a.numpy(), expected, err_msg=f"{method} {pad_level}")
        assert 0 <= expected.min() and expected.max() <= ((1 << in_bits) - 1) * k


@HYPOTHESIS
@given(data=st.data())
def test_level_conv2d_is_the_sum_of_plane_popcounts(data):
    in_bits = data.draw(st.integers(1, 4), label="in_bits")
    channels = data.draw(st.integers(1, 40), label="channels")
    kh, kw = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.sampled_from([1, 2, 3]))
    sh, sw = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    ph, pw = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1))
    h = data.draw(st.integers(max(1, kh - 2 * ph), 6), label="h")
    wd = data.draw(st.integers(max(1, kw - 2 * pw), 6), label="w")
    pad_level = data.draw(st.integers(0, (1 << in_bits) - 1), label="pad_level")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    x = random_levels(gen, in_bits, 2, channels, h, wd)
    w = random_pm1(gen, 3, channels, kh, kw)
    geometry = dict(in_bits=in_bits, stride=(sh, sw), padding=(ph, pw), pad_level=pad_level)
    fast = golden.level_conv2d(x, w, **geometry)
    ref = golden.level_conv2d(x, w, method="reference", **geometry)
    planes = plane_popcount_sum(x, w, in_bits, (sh, sw), (ph, pw), pad_level)
    assert torch.equal(fast, ref)
    assert torch.equal(fast.to(torch.int64), planes)
    # the identity Σ w·a = A − (2ⁿ − 1)(K − S)/2, with Σ w·a from an integer convolution
    dot = golden.fixed_point_conv2d(x, w, stride=(sh, sw), padding=(ph, pw), pad_value=pad_level)
    k = channels * kh * kw
    s = w.reshape(3, -1).sum(dim=1).to(torch.int64).reshape(1, -1, 1, 1)
    assert torch.equal(dot, fast.to(torch.int64) - ((1 << in_bits) - 1) * (k - s) // 2)
    assert torch.equal(golden.dot_from_accumulator(fast, w, in_bits), dot)


def packed_level_patches(levels: torch.Tensor, bits: int, kernel: int, stride: int,
                         padding: int, pad_level: int, word_bits: int) -> np.ndarray:
    """bits×N×OH×OW×KB: each output pixel's receptive field as packed words, per plane."""
    n, c, h, w = levels.shape
    padded = torch.full((n, c, h + 2 * padding, w + 2 * padding), pad_level, dtype=torch.int32)
    padded[:, :, padding:padding + h, padding:padding + w] = levels
    packed = pack_levels(padded, bits, word_bits=word_bits)                # bits, N, H, W, B
    oh, ow = out_size(h, kernel, stride, padding), out_size(w, kernel, stride, padding)
    out = np.zeros((bits, n, oh, ow, kernel * kernel * packed.shape[-1]), dtype=np.uint8)
    for oy, ox in itertools.product(range(oh), range(ow)):
        window = packed[:, :, oy * stride:oy * stride + kernel, ox * stride:ox * stride + kernel]
        out[:, :, oy, ox] = window.reshape(bits, n, -1)
    return out


@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("channels", "word_bits", "stride", "padding"),
                         [(3, 8, 1, 1), (13, 16, 2, 1), (33, 32, 1, 0), (70, 64, 2, 1)])
def test_xnor_popcount_on_packed_planes_equals_accumulator(in_bits, channels, word_bits,
                                                           stride, padding):
    gen = torch.Generator().manual_seed(in_bits * 1000 + channels + word_bits)
    x = random_levels(gen, in_bits, 2, channels, 5, 5)
    w = random_pm1(gen, 4, channels, 3, 3)
    pad_level = (1 << in_bits) - 2 if in_bits > 1 else 1
    expected = golden.level_conv2d(x, w, in_bits=in_bits, stride=stride, padding=padding,
                                   pad_level=pad_level).numpy()
    patches = packed_level_patches(x, in_bits, 3, stride, padding, pad_level, word_bits)
    packed_w = pack_weights(w, word_bits=word_bits)                      # O, KW, 1, bytes
    per_channel = packed_w.reshape(4, -1)                                 # O, KB
    got = sum(golden.xnor_popcount(patches[b][:, None], per_channel[None, :, None, None]) << b
              for b in range(in_bits))
    np.testing.assert_array_equal(got, expected)


def test_level_conv2d_of_one_bit_levels_is_todays_popcount():
    gen = torch.Generator().manual_seed(7)
    x = random_levels(gen, 1, 2, 13, 6, 6)
    w = random_pm1(gen, 5, 13, 3, 3)
    for pad_level in (0, 1):
        p = golden.popcount_conv2d(x.float() * 2 - 1, w, padding=1, pad_value=2 * pad_level - 1)
        a = golden.level_conv2d(x, w, in_bits=1, padding=1, pad_level=pad_level)
        assert torch.equal(a, p)


def test_level_conv2d_large_k_stays_exact():
    # (2⁴ − 1)·K above 2²⁴ switches the fast path to float64; a 1×1 conv keeps it quick
    channels = (1 << 24) // 15 + 1
    x = torch.full((1, channels, 1, 1), 15, dtype=torch.int32)
    w = torch.ones(1, channels, 1, 1)
    assert int(golden.level_conv2d(x, w, in_bits=4)) == 15 * channels


def test_level_conv2d_errors():
    x = torch.zeros(1, 2, 3, 3, dtype=torch.int32)
    w = torch.ones(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"2-bit levels in \[0, 3\], found 4"):
        golden.level_conv2d(x + 4, w, in_bits=2)
    with pytest.raises(ValueError, match=r"integer levels, not dtype torch\.float32"):
        golden.level_conv2d(x.float(), w, in_bits=2)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        golden.level_conv2d(np.zeros((1, 2, 3, 3)), w, in_bits=2)
    with pytest.raises(ValueError, match=r"in_bits must be an integer in \[1, 4\]"):
        golden.level_conv2d(x, w, in_bits=5)
    with pytest.raises(ValueError, match=r"pad_level must be an integer in \[0, 3\]"):
        golden.level_conv2d(x, w, in_bits=2, padding=1, pad_level=4)
    with pytest.raises(ValueError, match="levels have 2 channels but w expects 3"):
        golden.level_conv2d(x, torch.ones(1, 3, 1, 1), in_bits=2)
    with pytest.raises(ValueError, match=r"w must hold only \+1 and −1"):
        golden.level_conv2d(x, w * 0, in_bits=2)
    for method in ("fast", "reference"):
        with pytest.raises(ValueError, match="larger than the padded input"):
            golden.level_conv2d(x[:, :, :2], w, in_bits=2, method=method)
    with pytest.raises(ValueError, match="method must be"):
        golden.level_conv2d(x, w, in_bits=2, method="slow")


# --------------------------------------------------------------------------- shortcut thresholds


@pytest.mark.parametrize("shortcut_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("out_bits", [1, 2, 3, 4])
def test_threshold_shortcut_matches_loops_with_ties(shortcut_bits, out_bits):
    gen = torch.Generator().manual_seed(shortcut_bits * 10 + out_bits)
    amax = 60
    a = torch.randint(0, amax + 1, (2, 3, 4, 5), generator=gen, dtype=torch.int32)
    rows, levels = 1 << shortcut_bits, (1 << out_bits) - 1
    r = random_levels(gen, shortcut_bits, 2, 3, 4, 5)
    # thresholds drawn from the A values themselves, plus 0 and Amax + 1: many exact ties
    pool = torch.cat([a.flatten().long(), torch.tensor([0, amax + 1])])
    pick = torch.randint(0, pool.numel(), (3, rows, levels), generator=gen)
    table, _ = torch.sort(pool[pick], dim=-1)
    expected = threshold_table_loops(a, table, r)
    for method in ("fast", "reference"):
        out = golden.threshold_shortcut(a, table, r, method=method)
        assert out.dtype == torch.int32
        np.testing.assert_array_equal(out.numpy(), expected, err_msg=method)
    assert torch.equal(golden.threshold(a, table, r), golden.threshold_shortcut(a, table, r))
    chosen = table[torch.arange(3).reshape(1, 3, 1, 1), r.long()]            # N, O, H, W, L
    assert bool((chosen == a[..., None]).any())                             # ties happened


def test_threshold_shortcut_selects_the_row_per_pixel_and_channel():
    a = torch.tensor([[[5, 5, 5, 5]], [[9, 9, 9, 9]]]).reshape(1, 2, 4)      # N=1, O=2, 4 px
    r = torch.tensor([[[0, 1, 2, 3]], [[3, 2, 1, 0]]]).reshape(1, 2, 4)
    table = torch.tensor([[[0], [5], [6], [99]], [[9], [10], [0], [9]]])    # (O=2, R=4, L=1)
    assert golden.threshold_shortcut(a, table, r).tolist() == [[[1, 1, 0, 0], [1, 1, 0, 1]]]


def test_threshold_shortcut_errors():
    a = torch.zeros(1, 2, 3, 3, dtype=torch.int32)
    r = torch.zeros(1, 2, 3, 3, dtype=torch.int32)
    table = torch.zeros(2, 2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"must be \(O, R, L\) with O = 2"):
        golden.threshold_shortcut(a, table[:1], r)
    with pytest.raises(ValueError, match="R = 3 must be 2"):
        golden.threshold_shortcut(a, torch.zeros(2, 3, 1), r)
    bad = table.clone()
    bad[1, 1] = torch.tensor([3, 1, 4])
    with pytest.raises(ValueError, match="sorted"):
        golden.threshold_shortcut(a, bad, r)
    with pytest.raises(ValueError, match=r"shortcut must hold 1-bit levels in \[0, 1\], found 2"):
        golden.threshold_shortcut(a, table, r + 2)
    with pytest.raises(ValueError, match="shortcut has shape"):
        golden.threshold_shortcut(a, table, r[:, :, :2])
    with pytest.raises(ValueError, match="method must be"):
        golden.threshold_shortcut(a, table, r, method="x")
    with pytest.raises(ValueError, match="thresholds must be"):              # no shortcut given
        golden.threshold(a, table)


# --------------------------------------------------------------------------- layers


def random_v2_layer(gen, in_channels, out_channels, kernel, *, in_bits, out_bits,
                    shortcut_bits, x, shortcut, **geometry):
    """A layer whose thresholds include exact ties: T[0, r, 0] = A at the first pixel."""
    w = random_pm1(gen, out_channels, in_channels, kernel, kernel)
    pad_level = geometry.pop("pad_level", None)
    if in_bits == 1 and pad_level is not None:
        geometry["pad_value"] = 2 * pad_level - 1          # must agree for 1-bit input
    probe = BinaryConvLayer(w, None, in_bits=in_bits, pad_level=pad_level, **geometry)
    a = golden.level_conv2d(x, w, in_bits=in_bits, stride=probe.stride, padding=probe.padding,
                            pad_level=probe.padding_level)
    amax = probe.accumulator_max
    shape = (out_channels, 1 << shortcut_bits, (1 << out_bits) - 1)
    pool = torch.cat([a.flatten().long(), torch.tensor([0, amax + 1])])
    table = pool[torch.randint(0, pool.numel(), shape, generator=gen)]
    r0 = int(shortcut[0, 0, 0, 0]) if shortcut_bits else 0
    table[0, r0, 0] = int(a[0, 0, 0, 0])
    table, _ = torch.sort(table, dim=-1)
    if not shortcut_bits:
        table = table[:, 0]
    return BinaryConvLayer(w, table, in_bits=in_bits, pad_level=pad_level,
                           shortcut_bits=shortcut_bits, **geometry)


@pytest.mark.parametrize("shortcut_bits", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("out_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
def test_run_layer_v2_matches_loops(in_bits, out_bits, shortcut_bits):
    seed = 100 * in_bits + 10 * out_bits + shortcut_bits
    gen = torch.Generator().manual_seed(seed)
    channels = (1, 3, 5, 7)[seed % 4]
    stride, padding = (1, 1) if seed % 3 == 0 else (2, 1) if seed % 3 == 1 else (2, 0)
    pad_level = seed % (1 << in_bits)
    pool = (2, 2) if seed % 5 == 0 and stride == 1 else None
    x = random_levels(gen, in_bits, 2, channels, 6, 5)
    oh, ow = out_size(6, 3, stride, padding), out_size(5, 3, stride, padding)
    r = random_levels(gen, max(shortcut_bits, 1), 2, 3, oh, ow) if shortcut_bits else None
    layer = random_v2_layer(gen, channels, 3, 3, in_bits=in_bits, out_bits=out_bits,
                            shortcut_bits=shortcut_bits, x=x, shortcut=r, stride=stride,
                            padding=padding, pad_level=pad_level, pool=pool)
    assert layer.output_bits == out_bits and layer.padding_level == pad_level
    a = accumulator_loops(x, layer.weights, in_bits, (stride, stride), (padding, padding),
                          pad_level)
    table = layer.thresholds if shortcut_bits else layer.thresholds[:, None]
    expected = threshold_table_loops(a, table, r if shortcut_bits else np.zeros_like(a))
    assert np.isin(a[0, 0, 0, 0], np.asarray(table[0]).ravel())            # a tie is exercised
    if pool is not None:
        expected = maxpool_loops(expected, *pool)
    for method in ("fast", "reference"):
        out = golden.run_layer(x, layer, r, method=method)
        assert out.dtype == torch.int32
        np.testing.assert_array_equal(out.numpy(), expected, err_msg=method)
    if in_bits == 1 and pad_level in (0, 1):
        # ±1 float input (today's form) and 0/1 levels give the same outputs
        pm1 = BinaryConvLayer(layer.weights, layer.thresholds, stride=stride, padding=padding,
                              pad_value=2 * pad_level - 1, pool=pool,
                              shortcut_bits=shortcut_bits)
        np.testing.assert_array_equal(golden.run_layer(x.float() * 2 - 1, pm1, r).numpy(),
                                      expected)


@pytest.mark.parametrize("in_bits", [1, 2, 4])
def test_run_layer_raw_outputs_the_accumulator(in_bits):
    gen = torch.Generator().manual_seed(in_bits)
    x = random_levels(gen, in_bits, 1, 5, 4, 4)
    layer = BinaryConvLayer(random_pm1(gen, 3, 5, 3, 3), None, padding=1, in_bits=in_bits)
    a = golden.run_layer(x, layer)
    assert layer.output_bits is None and layer.accumulator_max == ((1 << in_bits) - 1) * 45
    np.testing.assert_array_equal(a.numpy(), accumulator_loops(x, layer.weights, in_bits,
                                                               (1, 1), (1, 1), 0))


def test_run_layer_v2_errors():
    gen = torch.Generator().manual_seed(3)
    w = random_pm1(gen, 2, 3, 1, 1)
    x2 = random_levels(gen, 2, 1, 3, 4, 4)
    two = BinaryConvLayer(w, torch.zeros(2, 1, dtype=torch.int64), in_bits=2)
    with pytest.raises(ValueError, match="2-bit input takes an integer level map"):
        golden.run_layer(x2.float(), two)
    with pytest.raises(ValueError, match=r"levels must hold 1-bit levels in \[0, 1\]"):
        golden.run_layer(x2 + 2, BinaryConvLayer(w, torch.zeros(2, 1, dtype=torch.int64)))
    short = BinaryConvLayer(w, torch.zeros(2, 4, 1, dtype=torch.int64), in_bits=2,
                            shortcut_bits=2)
    with pytest.raises(ValueError, match="2-bit shortcut but none was given"):
        golden.run_layer(x2, short)
    with pytest.raises(ValueError, match=r"shortcut must hold 2-bit levels in \[0, 3\], found 4"):
        golden.run_layer(x2, short, x2[:, :2] + 4)
    with pytest.raises(ValueError, match="shortcut has shape"):
        golden.run_layer(x2, short, x2)
    with pytest.raises(ValueError, match="layer has shortcut_bits 0"):
        golden.run_layer(x2, two, x2[:, :2])
    with pytest.raises(ValueError, match="raw layer takes no shortcut"):
        golden.run_layer(x2, BinaryConvLayer(w, None, in_bits=2), x2[:, :2])


# --------------------------------------------------------------------------- BinaryConvLayer


def test_layer_defaults_keep_todays_layers():
    w = torch.ones(4, 3, 3, 3)
    layer = BinaryConvLayer(w, torch.zeros(4, 1, dtype=torch.int64), pad_value=1)
    assert (layer.in_bits, layer.pad_level, layer.shortcut_bits) == (1, None, 0)
    assert layer.padding_level == 1 and layer.accumulator_max == layer.k == 27
    assert BinaryConvLayer(w, None).padding_level == 0
    assert BinaryConvLayer(w, None, in_bits=3, pad_value=1).padding_level == 0
    assert BinaryConvLayer(w, None, in_bits=3, pad_level=5).padding_level == 5
    assert BinaryConvLayer(w, None, in_bits=3).accumulator_max == 7 * 27
    table = BinaryConvLayer(w, torch.zeros(4, 8, 15, dtype=torch.int64), shortcut_bits=3)
    assert table.output_bits == 4


@pytest.mark.parametrize(("fields", "message"), [
    ({"in_bits": 0}, r"in_bits must be an integer in \[1, 4\], not 0"),
    ({"in_bits": 5}, r"in_bits must be an integer in \[1, 4\], not 5"),
    ({"in_bits": True}, r"in_bits must be an integer"),
    ({"shortcut_bits": 5}, r"shortcut_bits must be an integer in \[0, 4\], not 5"),
    ({"in_bits": 2, "pad_level": 4}, r"pad_level must be an integer in \[0, 3\]"),
    ({"pad_level": -1}, r"pad_level must be an integer in \[0, 1\]"),
    ({"pad_level": 1}, "pad_level 1 contradicts pad_value -1"),
    ({"shortcut_bits": 1}, r"1-bit shortcut must be \(O = 2, R = 2, 2\*\*n - 1\)"),
    ({"thresholds": torch.zeros(2, 3, 1)}, r"must be \(O, 2\*\*n - 1\)"),
    ({"thresholds": torch.zeros(2, 3, 1), "shortcut_bits": 1}, r"not shape \(2, 3, 1\)"),
    ({"thresholds": torch.zeros(3, 2, 1), "shortcut_bits": 1}, r"O = 2"),
    ({"thresholds": torch.zeros(2, 2, 2), "shortcut_bits": 1}, r"not shape \(2, 2, 2\)"),
    ({"thresholds": None, "shortcut_bits": 2}, "raw layer .* cannot take a shortcut"),
])
def test_layer_validation_messages(fields, message):
    base = {"weights": torch.ones(2, 3, 1, 1), "thresholds": torch.zeros(2, 1)}
    with pytest.raises(ValueError, match=message):
        BinaryConvLayer(**{**base, **fields})


# --------------------------------------------------------------------------- pool, repeat


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_maxpool_over_levels(bits):
    gen = torch.Generator().manual_seed(bits)
    levels = random_levels(gen, bits, 2, 3, 6, 5)
    out = golden.binary_maxpool2d(levels, 2, 2)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), maxpool_loops(levels, 2, 2))


def test_repeat_channels():
    gen = torch.Generator().manual_seed(0)
    levels = random_levels(gen, 3, 2, 3, 4, 4)
    for method in ("fast", "reference"):
        out = golden.repeat_channels(levels, 9, method=method)
        assert out.shape == (2, 9, 4, 4) and out.dtype == levels.dtype
        for c in range(9):
            assert torch.equal(out[:, c], levels[:, c % 3])
    with pytest.raises(ValueError, match="positive multiple of the input's 3 channels, not 8"):
        golden.repeat_channels(levels, 8)
    with pytest.raises(ValueError, match="method must be"):
        golden.repeat_channels(levels, 6, method="x")


# --------------------------------------------------------------------------- graph


def residual_graph(gen):
    """A ReActNet-style pair: a residual conv, then a downsampling one whose shortcut is the
    pooled, channel-repeated first output, then a raw 1×1 head."""
    w1, w2 = random_pm1(gen, 4, 4, 3, 3), random_pm1(gen, 8, 4, 3, 3)
    w3 = random_pm1(gen, 3, 8, 1, 1)
    t1, _ = torch.sort(torch.randint(0, 3 * 36 + 2, (4, 4, 3), generator=gen), dim=-1)
    t2, _ = torch.sort(torch.randint(0, 3 * 36 + 2, (8, 4, 1), generator=gen), dim=-1)
    return [
        GraphNode("c1", BinaryConvLayer(w1, t1, padding=1, in_bits=2, pad_level=1,
                                        shortcut_bits=2), shortcut="input"),
        GraphNode("p1", PoolPass(2), input="c1"),
        GraphNode("r1", ChannelRepeat(8), input="p1"),
        GraphNode("c2", BinaryConvLayer(w2, t2, stride=2, padding=1, in_bits=2,
                                        shortcut_bits=2), input="c1", shortcut="r1"),
        GraphNode("head", BinaryConvLayer(w3, None), input="c2"),
    ]


def test_run_graph_equals_the_layers_by_hand():
    gen = torch.Generator().manual_seed(5)
    x = random_levels(gen, 2, 2, 4, 6, 6)
    nodes = residual_graph(gen)
    c1 = golden.run_layer(x, nodes[0].op, x)
    p1 = golden.binary_maxpool2d(c1, 2, 2)
    r1 = golden.repeat_channels(p1, 8)
    c2 = golden.run_layer(c1, nodes[3].op, r1)
    head = golden.run_layer(c2, nodes[4].op)
    for method in ("fast", "reference"):
        out = golden.run_graph(x, nodes, method=method)
        assert list(out) == ["c1", "p1", "r1", "c2", "head"]
        for name, want in zip(out, (c1, p1, r1, c2, head), strict=True):
            assert torch.equal(out[name], want), (method, name)
    listed = golden.run_network(x, nodes)
    assert all(torch.equal(a, b) for a, b in zip(listed, (c1, p1, r1, c2, head), strict=True))
    assert tuple(head.shape) == (2, 3, 3, 3) and int(c2.max()) <= 1


def test_run_graph_with_pm1_input_equals_the_chain():
    gen = torch.Generator().manual_seed(8)
    x = random_pm1(gen, 1, 3, 6, 6)
    t = torch.sort(torch.randint(0, 29, (5, 1), generator=gen), dim=1)[0]
    layers = [BinaryConvLayer(random_pm1(gen, 5, 3, 3, 3), t, padding=1, pad_value=1),
              BinaryConvLayer(random_pm1(gen, 2, 5, 1, 1), None)]
    chain = golden.run_network(x, layers)
    nodes = [GraphNode("a", layers[0]), GraphNode("b", layers[1], input="a")]
    graph = golden.run_network(x, nodes)
    assert all(torch.equal(a, b) for a, b in zip(chain, graph, strict=True))


def test_run_network_chain_of_n_bit_layers():
    gen = torch.Generator().manual_seed(9)
    x = random_levels(gen, 3, 1, 4, 5, 5)
    t1 = torch.sort(torch.randint(0, 7 * 36 + 2, (6, 3), generator=gen), dim=1)[0]
    t2 = torch.sort(torch.randint(0, 3 * 54 + 2, (2, 1), generator=gen), dim=1)[0]
    layers = [BinaryConvLayer(random_pm1(gen, 6, 4, 3, 3), t1, padding=1, in_bits=3),
              BinaryConvLayer(random_pm1(gen, 2, 6, 3, 3), t2, in_bits=2)]
    out = golden.run_network(x, layers, method="reference")
    assert torch.equal(out[1], golden.run_layer(out[0], layers[1]))
    with pytest.raises(ValueError, match="layer 1 needs binary input but layer 0 outputs 2 bits"):
        golden.run_network(x, [layers[0], BinaryConvLayer(layers[1].weights, t2, in_bits=1)])
    four = BinaryConvLayer(layers[0].weights, torch.zeros(6, 15, dtype=torch.int64), in_bits=3)
    with pytest.raises(ValueError, match="layer 1 needs input of at most 2 bits but layer 0 "
                                         "outputs 4 bits"):
        golden.run_network(x, [four, layers[1]])
    short = BinaryConvLayer(layers[1].weights, t2[:, None].expand(2, 2, 1), shortcut_bits=1)
    with pytest.raises(ValueError, match="layer 0 takes a shortcut: run the network as "
                                         "GraphNodes"):
        golden.run_network(x, [short])


def _graph_error_cases():
    w = torch.ones(2, 2, 1, 1)
    t = torch.zeros(2, 1, dtype=torch.int64)
    t2 = torch.zeros(2, 3, dtype=torch.int64)                              # 2-bit output
    table = torch.zeros(2, 2, 1, dtype=torch.int64)                        # 1-bit shortcut
    conv = BinaryConvLayer(w, t)
    short = BinaryConvLayer(w, table, shortcut_bits=1)
    return [
        ([GraphNode("a", conv, input="a")], "node 'a': its input is itself"),
        ([GraphNode("a", conv, input="b"), GraphNode("b", conv)],
         "node 'a': input 'b' is defined after it"),
        ([GraphNode("a", conv), GraphNode("b", conv, input="c")],
         "node 'b': input 'c' is missing"),
        ([GraphNode("a", short, shortcut="zz")], "node 'a': shortcut 'zz' is missing"),
        ([GraphNode("a", short, shortcut="b"), GraphNode("b", conv)],
         "node 'a': shortcut 'b' is defined after it"),
        ([GraphNode("a", conv), GraphNode("a", conv)], "node 'a': the name is used twice"),
        ([GraphNode("a", BinaryConvLayer(torch.ones(2, 3, 1, 1), t))],
         "node 'a': input 'input' has 2 channels but the conv expects 3"),
        ([GraphNode("p", PoolPass(2)), GraphNode("a", short, shortcut="p")],
         r"node 'a': shortcut 'p' has shape \(1, 2, 2, 2\) but the conv's output is "
         r"\(1, 2, 4, 4\)"),
        ([GraphNode("a", BinaryConvLayer(w, t2)), GraphNode("b", conv, input="a")],
         "node 'b': input 'a' has 2-bit levels but the conv's in_bits is 1"),
        ([GraphNode("a", BinaryConvLayer(w, t2)), GraphNode("b", short, shortcut="a")],
         "node 'b': shortcut 'a' has 2-bit levels but the conv's shortcut_bits is 1"),
        ([GraphNode("a", BinaryConvLayer(w, None)), GraphNode("b", conv, input="a")],
         "node 'b': input 'a' is a raw accumulator"),
        ([GraphNode("a", BinaryConvLayer(w, None)), GraphNode("b", short, shortcut="a")],
         "node 'b': shortcut 'a' has a raw accumulator"),
        ([GraphNode("a", short)], "node 'a': the conv has a 1-bit shortcut but the node names"),
        ([GraphNode("a", conv, shortcut="input")], "node 'a': shortcut 'input' given but the "
                                                  "conv has shortcut_bits 0"),
        ([GraphNode("r", ChannelRepeat(3))], "node 'r': out_channels must be a positive "
                                             "multiple of the input's 2 channels"),
        ([GraphNode("p", PoolPass(2), shortcut="input")], "node 'p': only a conv takes"),
        ([GraphNode("p", PoolPass(8))], r"node 'p': pool window \(8, 8\) is larger than the "
                                        r"padded input \(4, 4\)"),
        (["a"], "graph nodes must be GraphNode"),
    ]


@pytest.mark.parametrize(("nodes", "message"), _graph_error_cases())
def test_run_graph_errors_name_the_node(nodes, message):
    x = torch.ones(1, 2, 4, 4)                                              # ±1: a 1-bit map
    with pytest.raises(ValueError, match=message) as info:
        golden.run_graph(x, nodes)
    assert "\n" not in str(info.value)


def test_graph_node_and_input_errors():
    conv = BinaryConvLayer(torch.ones(2, 2, 1, 1), torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="node name must be a non-empty string other than"):
        GraphNode("input", conv)
    with pytest.raises(ValueError, match="node 'a': op must be a BinaryConvLayer"):
        GraphNode("a", "conv")
    levels = torch.full((1, 2, 2, 2), 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="node 'a': input 'input' has 2-bit levels but the "
                                         "conv's in_bits is 1"):
        golden.run_graph(levels, [GraphNode("a", conv)])
    with pytest.raises(ValueError, match=r"the network input must hold 1-bit levels"):
        golden.run_graph(levels, [GraphNode("a", conv)], input_bits=1)
    with pytest.raises(ValueError, match=r"the network input must hold only \+1 and −1"):
        golden.run_graph(torch.zeros(1, 2, 2, 2), [GraphNode("a", conv)])


# --------------------------------------------------------------------------- worked example


def test_numerics_worked_example():
    """The worked example of docs/numerics.md, 'Contract v2'."""
    a = torch.tensor([3, 0, 2], dtype=torch.int32).reshape(1, 3, 1, 1)     # 2-bit levels
    w = torch.tensor([1.0, -1.0, 1.0]).reshape(1, 3, 1, 1)                 # K = 3, S = 1
    p = [int(golden.popcount_conv2d(plane_pm1(a, b), w)) for b in range(2)]
    assert p == [2, 3]
    acc = golden.level_conv2d(a, w, in_bits=2)
    assert int(acc) == 2 + 2 * 3 == 8
    assert int(golden.dot_from_accumulator(acc, w, 2)) == 3 * 1 - 0 + 2 * 1 == 8 - 3
    table = torch.tensor([[[6, 8, 10], [4, 5, 7]]])                          # (O=1, R=2, L=3)
    layer = BinaryConvLayer(w, table, in_bits=2, shortcut_bits=1)
    outs = [int(golden.run_layer(a, layer, torch.tensor([[[[r]]]]))) for r in (0, 1)]
    assert outs == [2, 3]
    planes = pack_levels(a, 2, word_bits=8)
    assert planes.reshape(-1).tolist() == [0x01, 0x05]
    assert pack_weights(w, word_bits=8).reshape(-1).tolist() == [0xFD]
    assert [int(golden.xnor_popcount(planes[b, 0, 0, 0], np.array([0xFD], np.uint8)))
            for b in range(2)] == [2, 3]
