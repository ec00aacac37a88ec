"""Tests of the golden model (bitdet.core.golden) against independent references.

The references here are deliberately naive: explicit Python loops over output pixels and
windows, with the padding filled in by index checks (not ``F.pad``), so that they share
no code path with the module under test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.golden import BinaryConvLayer
from bitdet.core.packing import pack_activations, pack_bits, pack_weights, pm1_to_bits

ODD_CHANNELS = [1, 3, 13, 33, 65, 70]
HYPOTHESIS = settings(max_examples=60, deadline=None)


def random_pm1(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.float32)


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_dot_loops(x, w, stride, padding, pad_value) -> np.ndarray:
    """Float reference: for each output pixel, the sum of products of ±1 values."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, c, h, wd = x.shape
    o, c2, kh, kw = w.shape
    assert c == c2
    sh, sw = stride
    ph, pw = padding
    oh, ow = out_size(h, kh, sh, ph), out_size(wd, kw, sw, pw)
    pad_pixel = np.full(c, float(pad_value))
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for b, oc, oy, ox in itertools.product(range(n), range(o), range(oh), range(ow)):
        total = 0.0
        for ky, kx in itertools.product(range(kh), range(kw)):
            iy, ix = oy * sh - ph + ky, ox * sw - pw + kx
            inside = 0 <= iy < h and 0 <= ix < wd
            a = x[b, :, iy, ix] if inside else pad_pixel
            total += float(np.dot(a, w[oc, :, ky, kx]))
        out[b, oc, oy, ox] = int(total)
    return out


def maxpool_or_loops(bits, kernel, stride, padding) -> np.ndarray:
    """Explicit OR (max for n-bit levels) over each window; padding never wins."""
    bits = np.asarray(bits)
    n, c, h, w = bits.shape
    oh, ow = out_size(h, kernel, stride, padding), out_size(w, kernel, stride, padding)
    out = np.zeros((n, c, oh, ow), dtype=np.int64)
    for b, ch, oy, ox in itertools.product(range(n), range(c), range(oh), range(ow)):
        best = 0
        for ky, kx in itertools.product(range(kernel), range(kernel)):
            iy, ix = oy * stride - padding + ky, ox * stride - padding + kx
            if 0 <= iy < h and 0 <= ix < w:
                best = max(best, int(bits[b, ch, iy, ix]))
        out[b, ch, oy, ox] = best
    return out


def threshold_loops(p, thresholds) -> np.ndarray:
    """Count, per output, the thresholds of its channel (dim 1) that P reaches."""
    p = np.asarray(p)
    t = np.asarray(thresholds)
    if t.ndim == 1:
        t = t[:, None]
    out = np.zeros(p.shape, dtype=np.int64)
    for idx in itertools.product(*(range(s) for s in p.shape)):
        out[idx] = sum(int(p[idx] >= tj) for tj in t[idx[1]])
    return out


# --------------------------------------------------------------------------- convolution


CONV_GEOMETRIES = [
    # (kernel, stride, padding, pad_value)
    (k, s, p, v)
    for k in (1, 3) for s in (1, 2) for p in (0, 1) for v in (-1, 1)
]


@pytest.mark.parametrize("channels", ODD_CHANNELS)
@pytest.mark.parametrize(("kernel", "stride", "padding", "pad_value"), CONV_GEOMETRIES)
def test_binary_conv2d_fast_reference_and_loops_agree(channels, kernel, stride, padding,
                                                      pad_value):
    gen = torch.Generator().manual_seed(1000 * channels + 100 * kernel + 10 * stride
                                        + 2 * padding + (pad_value > 0))
    x = random_pm1(gen, 2, channels, 5, 7)
    w = random_pm1(gen, 3, channels, kernel, kernel)
    expected = conv_dot_loops(x, w, (stride, stride), (padding, padding), pad_value)
    for method in ("fast", "reference"):
        dot = golden.binary_conv2d(x, w, stride=stride, padding=padding, pad_value=pad_value,
                                   method=method)
        assert dot.dtype == torch.int32
        assert tuple(dot.shape) == expected.shape
        np.testing.assert_array_equal(dot.numpy(), expected, err_msg=method)


@HYPOTHESIS
@given(data=st.data())
def test_binary_conv2d_random_geometry(data):
    channels = data.draw(st.integers(1, 70), label="channels")
    kh = data.draw(st.sampled_from([1, 2, 3]), label="kh")
    kw = data.draw(st.sampled_from([1, 2, 3]), label="kw")
    sh, sw = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    ph, pw = data.draw(st.integers(0, 1)), data.draw(st.integers(0, 1))
    h = data.draw(st.integers(max(1, kh - 2 * ph), 6), label="h")
    wd = data.draw(st.integers(max(1, kw - 2 * pw), 6), label="w")
    pad_value = data.draw(st.sampled_from([-1, 1]), label="pad_value")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    x = random_pm1(gen, 1, channels, h, wd)
    w = random_pm1(gen, 2, channels, kh, kw)
    expected = conv_dot_loops(x, w, (sh, sw), (ph, pw), pad_value)
    fast = golden.binary_conv2d(x, w, stride=(sh, sw), padding=(ph, pw), pad_value=pad_value)
    ref = golden.binary_conv2d(x, w, stride=(sh, sw), padding=(ph, pw), pad_value=pad_value,
                               method="reference")
    np.testing.assert_array_equal(fast.numpy(), expected)
    np.testing.assert_array_equal(ref.numpy(), expected)


def test_padding_value_takes_part_in_the_dot():
    # A 1×1 input padded by 1 with a 3×3 all-ones kernel: 8 of the 9 taps are padding.
    x = torch.ones(1, 1, 1, 1)
    w = torch.ones(1, 1, 3, 3)
    assert int(golden.binary_conv2d(x, w, padding=1, pad_value=-1)) == 1 - 8
    assert int(golden.binary_conv2d(x, w, padding=1, pad_value=1)) == 9
    assert int(golden.binary_conv2d(x, w, padding=1)) == 1 - 8          # default: −1


@pytest.mark.parametrize("channels", ODD_CHANNELS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_popcount_conv2d_is_popcount_of_dot(channels, kernel):
    gen = torch.Generator().manual_seed(channels * 7 + kernel)
    x = random_pm1(gen, 1, channels, 5, 5)
    w = random_pm1(gen, 4, channels, kernel, kernel)
    k = channels * kernel * kernel
    for method in ("fast", "reference"):
        p = golden.popcount_conv2d(x, w, padding=1, pad_value=1, method=method)
        dot = conv_dot_loops(x, w, (1, 1), (1, 1), 1)
        assert p.dtype == torch.int32
        np.testing.assert_array_equal(p.numpy(), (dot + k) // 2)
        assert int(p.min()) >= 0 and int(p.max()) <= k


@pytest.mark.parametrize("channels", ODD_CHANNELS)
def test_binary_linear_matches_loops(channels):
    gen = torch.Generator().manual_seed(channels)
    x = random_pm1(gen, 4, channels)
    w = random_pm1(gen, 5, channels)
    expected = np.array([[int(sum(float(a) * float(b) for a, b in zip(xr, wr, strict=True)))
                          for wr in w] for xr in x])
    for method in ("fast", "reference"):
        out = golden.binary_linear(x, w, method=method)
        assert out.dtype == torch.int32
        np.testing.assert_array_equal(out.numpy(), expected)


@HYPOTHESIS
@given(k=st.integers(0, 500), data=st.data())
def test_popcount_dot_round_trip(k, data):
    p = torch.tensor(data.draw(st.lists(st.integers(0, k), min_size=1, max_size=20)))
    dot = golden.dot_from_popcount(p, k)
    assert dot.dtype == torch.int32
    assert torch.equal(dot, (2 * p - k).to(torch.int32))
    # dot has the parity of K and lies in [−K, K]
    assert bool(((dot + k) % 2 == 0).all()) and bool((dot.abs() <= k).all())
    back = golden.popcount_from_dot(dot, k)
    assert back.dtype == torch.int32
    assert torch.equal(back, p.to(torch.int32))
    assert torch.equal(golden.dot_from_popcount(golden.popcount_from_dot(dot, k), k), dot)


# --------------------------------------------------------------------------- packed words


def packed_patches(x_padded: torch.Tensor, kh: int, kw: int, stride: int,
                   word_bits: int) -> np.ndarray:
    """N×OH×OW×bytes: each output pixel's receptive field as packed activation words,
    taps row-major, each tap one packed pixel (the order pack_weights uses)."""
    packed = pack_activations(x_padded, word_bits=word_bits)                 # N, H, W, B
    n, h, w, _ = packed.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    rows = []
    for oy in range(oh):
        cols = []
        for ox in range(ow):
            window = packed[:, oy * stride:oy * stride + kh, ox * stride:ox * stride + kw, :]
            cols.append(window.reshape(n, -1))
        rows.append(np.stack(cols, axis=1))
    return np.stack(rows, axis=1)                                            # N, OH, OW, KB


def pad_pm1(x: torch.Tensor, padding: int, pad_value: int) -> torch.Tensor:
    n, c, h, w = x.shape
    out = torch.full((n, c, h + 2 * padding, w + 2 * padding), float(pad_value))
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


@pytest.mark.parametrize("channels", ODD_CHANNELS)
@pytest.mark.parametrize("word_bits", [8, 16, 32, 64])
@pytest.mark.parametrize(("kernel", "stride", "padding", "pad_value", "cols"),
                         [(3, 1, 1, -1, 1), (3, 2, 1, 1, 3), (1, 1, 0, -1, 2), (3, 2, 0, 1, 4)])
def test_xnor_popcount_on_packed_words_equals_golden_popcount(channels, word_bits, kernel,
                                                              stride, padding, pad_value, cols):
    gen = torch.Generator().manual_seed(channels * 131 + word_bits + kernel * 7 + cols)
    out_channels = 5
    x = random_pm1(gen, 2, channels, 5, 5)
    w = random_pm1(gen, out_channels, channels, kernel, kernel)
    expected = golden.popcount_conv2d(x, w, stride=stride, padding=padding,
                                      pad_value=pad_value, method="reference").numpy()

    patches = packed_patches(pad_pm1(x, padding, pad_value), kernel, kernel, stride, word_bits)
    packed_w = pack_weights(w, word_bits=word_bits, cols=cols)      # tiles, KW, cols, bytes
    tiles, k_words, _, word_bytes = packed_w.shape
    per_channel = packed_w.transpose(0, 2, 1, 3).reshape(tiles * cols, k_words * word_bytes)
    per_channel = per_channel[:out_channels]                                # O, KB
    assert patches.shape[-1] == per_channel.shape[-1]

    got = golden.xnor_popcount(patches[:, None], per_channel[None, :, None, None])
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("channels", [1, 3, 13, 33, 70])
def test_xnor_popcount_padding_convention_is_what_masks_the_padding(channels):
    # With activation pad bit 0 and weight pad bit 1, P counts exactly the real channels;
    # with activation pad 1 instead, every padding bit would add one to P.
    gen = torch.Generator().manual_seed(channels)
    a = random_pm1(gen, channels)
    b = random_pm1(gen, channels)
    p = int((a == b).sum())
    a_bits, b_bits = pm1_to_bits(a), pm1_to_bits(b)
    good = golden.xnor_popcount(pack_bits(a_bits, word_bits=32, pad_bit=0),
                                pack_bits(b_bits, word_bits=32, pad_bit=1))
    assert int(good) == p
    pad_bits = -(-channels // 32) * 32 - channels
    wrong = golden.xnor_popcount(pack_bits(a_bits, word_bits=32, pad_bit=1),
                                 pack_bits(b_bits, word_bits=32, pad_bit=1))
    assert int(wrong) == p + pad_bits


def test_xnor_popcount_small_words():
    assert int(golden.xnor_popcount(np.array([0b1010_1010], np.uint8),
                                    np.array([0b1010_1010], np.uint8))) == 8
    assert int(golden.xnor_popcount(np.array([0xFF], np.uint8), np.array([0x00], np.uint8))) == 0
    assert int(golden.xnor_popcount(np.array([0x0F, 0x00], np.uint8),
                                    np.array([0x00, 0x00], np.uint8))) == 12


# --------------------------------------------------------------------------- threshold


def test_threshold_single_random_matches_loops():
    gen = torch.Generator().manual_seed(5)
    k = 27
    p = torch.randint(0, k + 1, (3, 6, 4, 5), generator=gen, dtype=torch.int32)
    t = torch.randint(0, k + 2, (6,), generator=gen)
    out = golden.threshold(p, t)
    assert out.dtype == torch.int32
    np.testing.assert_array_equal(out.numpy(), threshold_loops(p, t))
    np.testing.assert_array_equal(out.numpy(), (p >= t[None, :, None, None]).numpy())


def test_threshold_ties_and_extremes():
    k = 9
    p = torch.arange(k + 1, dtype=torch.int32).reshape(1, 1, k + 1, 1).expand(1, 4, k + 1, 1)
    t = torch.tensor([0, 4, k, k + 1])
    out = golden.threshold(p, t)[0, :, :, 0]
    assert out[0].tolist() == [1] * (k + 1)                       # T = 0: always 1
    assert out[1].tolist() == [0] * 4 + [1] * (k + 1 - 4)         # P == T gives 1
    assert out[2].tolist() == [0] * k + [1]                       # only P = K reaches K
    assert out[3].tolist() == [0] * (k + 1)                       # T = K + 1: never


@pytest.mark.parametrize("levels", [3, 7, 15])
def test_threshold_multi_random_matches_loops(levels):
    gen = torch.Generator().manual_seed(levels)
    k = 40
    p = torch.randint(0, k + 1, (2, 5, 3, 3), generator=gen, dtype=torch.int32)
    t, _ = torch.sort(torch.randint(0, k + 2, (5, levels), generator=gen), dim=1)
    t[0] = 0                                            # all reached: output = levels
    t[1] = k + 1                                        # none reached: output = 0
    out = golden.threshold(p, t)
    np.testing.assert_array_equal(out.numpy(), threshold_loops(p, t))
    assert bool((out[:, 0] == levels).all()) and bool((out[:, 1] == 0).all())


def test_threshold_multi_ties_and_repeated_thresholds():
    p = torch.tensor([0, 3, 4, 5, 9, 10]).reshape(1, 1, 6)           # N=1, O=1, 6 pixels
    t = torch.tensor([[4, 4, 9]])
    out = golden.threshold(p, t)
    assert out.tolist() == [[[0, 0, 2, 2, 3, 3]]]


def test_threshold_on_linear_outputs():
    p = torch.tensor([[0, 5], [3, 2]], dtype=torch.int32)                    # N×O
    assert golden.threshold(p, torch.tensor([3, 3])).tolist() == [[0, 1], [1, 0]]
    multi = torch.tensor([[1, 2, 3], [0, 6, 6]])
    assert golden.threshold(p, multi).tolist() == [[0, 1], [3, 1]]


def test_threshold_errors():
    p = torch.zeros(1, 3, 2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="sorted"):
        golden.threshold(p, torch.tensor([[1, 2, 3], [4, 2, 5], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"thresholds must be \(O,\) or \(O, L\) with O = 3"):
        golden.threshold(p, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="thresholds must be"):
        golden.threshold(p, torch.zeros(3, 1, 1))


# --------------------------------------------------------------------------- max-pool


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(2, 2, 0), (3, 1, 1), (3, 2, 1),
                                                           (2, 1, 0)])
@pytest.mark.parametrize(("h", "w"), [(5, 7), (6, 6), (3, 4), (7, 5)])
def test_binary_maxpool2d_is_or_over_windows(kernel, stride, padding, h, w):
    gen = torch.Generator().manual_seed(kernel * 100 + stride * 10 + h * w + padding)
    bits = torch.randint(0, 2, (2, 3, h, w), generator=gen, dtype=torch.int32)
    out = golden.binary_maxpool2d(bits, kernel, stride, padding)
    assert out.dtype == bits.dtype
    np.testing.assert_array_equal(out.numpy(), maxpool_or_loops(bits, kernel, stride, padding))


def test_binary_maxpool2d_default_stride_and_levels():
    gen = torch.Generator().manual_seed(3)
    levels = torch.randint(0, 4, (1, 2, 5, 5), generator=gen, dtype=torch.int64)
    out = golden.binary_maxpool2d(levels, 2)                    # stride defaults to kernel
    np.testing.assert_array_equal(out.numpy(), maxpool_or_loops(levels, 2, 2, 0))
    # an all-zero window with padding stays 0 (padding never wins)
    zeros = torch.zeros(1, 1, 3, 3, dtype=torch.int32)
    assert int(golden.binary_maxpool2d(zeros, 3, 1, 1).max()) == 0


def test_binary_maxpool2d_errors():
    with pytest.raises(ValueError, match="integer"):
        golden.binary_maxpool2d(torch.zeros(1, 1, 2, 2), 2)
    with pytest.raises(ValueError, match="integer"):
        golden.binary_maxpool2d(torch.zeros(1, 2, 2, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="not ±1"):
        golden.binary_maxpool2d(-torch.ones(1, 1, 2, 2, dtype=torch.int32), 2)


# --------------------------------------------------------------------------- layers


def layer_loops(x, layer: BinaryConvLayer) -> np.ndarray:
    """Independent model of run_layer: loops for P, threshold and the OR pool."""
    stride = (layer.stride, layer.stride)
    padding = (layer.padding, layer.padding)
    dot = conv_dot_loops(x, layer.weights, stride, padding, layer.pad_value)
    p = (dot + layer.k) // 2
    if layer.thresholds is None:
        return p
    out = threshold_loops(p, layer.thresholds)
    if layer.pool is not None:
        out = maxpool_or_loops(out, layer.pool[0], layer.pool[1], 0)
    return out


def random_layer(gen, in_channels, out_channels, kernel, *, bits=1, raw=False, **geometry):
    w = random_pm1(gen, out_channels, in_channels, kernel, kernel)
    if raw:
        return BinaryConvLayer(weights=w, thresholds=None, **geometry)
    k = in_channels * kernel * kernel
    t, _ = torch.sort(torch.randint(0, k + 2, (out_channels, (1 << bits) - 1), generator=gen),
                      dim=1)
    return BinaryConvLayer(weights=w, thresholds=t, **geometry)


@pytest.mark.parametrize(("channels", "kernel", "stride", "padding", "pad_value", "pool"), [
    (3, 3, 1, 1, -1, None),
    (13, 3, 2, 1, 1, None),
    (33, 1, 1, 0, -1, (2, 2)),
    (70, 3, 1, 1, 1, (3, 1)),
    (1, 3, 1, 0, -1, (2, 1)),
])
def test_run_layer_matches_loops(channels, kernel, stride, padding, pad_value, pool):
    gen = torch.Generator().manual_seed(channels + kernel)
    x = random_pm1(gen, 2, channels, 7, 5)
    layer = random_layer(gen, channels, 4, kernel, stride=stride, padding=padding,
                         pad_value=pad_value, pool=pool)
    assert layer.k == channels * kernel * kernel and layer.output_bits == 1
    expected = layer_loops(x, layer)
    for method in ("fast", "reference"):
        np.testing.assert_array_equal(golden.run_layer(x, layer, method=method).numpy(),
                                      expected)


def test_run_layer_raw_and_multibit():
    gen = torch.Generator().manual_seed(11)
    x = random_pm1(gen, 1, 5, 4, 4)
    raw = random_layer(gen, 5, 3, 3, raw=True, padding=1)
    assert raw.output_bits is None
    p = golden.run_layer(x, raw)
    np.testing.assert_array_equal(p.numpy(), layer_loops(x, raw))
    assert int(p.max()) <= raw.k
    two_bit = random_layer(gen, 5, 3, 3, bits=2, padding=1, pool=(2, 2))
    assert two_bit.output_bits == 2
    np.testing.assert_array_equal(golden.run_layer(x, two_bit).numpy(),
                                  layer_loops(x, two_bit))


def test_run_layer_raw_with_pool_raises():
    gen = torch.Generator().manual_seed(0)
    layer = random_layer(gen, 3, 2, 1, raw=True, pool=(2, 2))
    with pytest.raises(ValueError, match="raw"):
        golden.run_layer(random_pm1(gen, 1, 3, 4, 4), layer)


def test_run_network_chains_layers():
    gen = torch.Generator().manual_seed(21)
    x = random_pm1(gen, 2, 3, 9, 9)
    layers = [
        random_layer(gen, 3, 13, 3, padding=1, pad_value=-1, pool=(2, 2)),
        random_layer(gen, 13, 33, 3, padding=1, pad_value=1, stride=2),
        random_layer(gen, 33, 7, 1),
        random_layer(gen, 7, 5, 3, raw=True, padding=1),
    ]
    outputs = golden.run_network(x, layers)
    reference = golden.run_network(x, layers, method="reference")
    assert len(outputs) == len(layers)
    current = x
    for layer, out, ref in zip(layers, outputs, reference, strict=True):
        expected = layer_loops(current, layer)
        np.testing.assert_array_equal(out.numpy(), expected)
        np.testing.assert_array_equal(ref.numpy(), expected)
        current = torch.from_numpy(expected).to(torch.float32) * 2 - 1
    assert tuple(outputs[-1].shape) == (2, 5, 2, 2)


@pytest.mark.parametrize("first", ["raw", "two_bit"])
def test_run_network_needs_binary_between_layers(first):
    gen = torch.Generator().manual_seed(2)
    x = random_pm1(gen, 1, 3, 4, 4)
    layer0 = (random_layer(gen, 3, 4, 1, raw=True) if first == "raw"
              else random_layer(gen, 3, 4, 1, bits=2))
    layer1 = random_layer(gen, 4, 2, 1)
    with pytest.raises(ValueError, match="layer 1 needs binary input"):
        golden.run_network(x, [layer0, layer1])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0.0, 0.5, 2.0, float("nan")])
def test_non_pm1_values_raise(bad):
    x = torch.ones(1, 3, 3, 3)
    w = torch.ones(2, 3, 1, 1)
    bad_x = x.clone()
    bad_x[0, 1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"x must hold only \+1 and −1"):
        golden.binary_conv2d(bad_x, w)
    bad_w = w.clone()
    bad_w[1, 2, 0, 0] = bad
    with pytest.raises(ValueError, match=r"w must hold only \+1 and −1"):
        golden.binary_conv2d(x, bad_w, method="reference")
    with pytest.raises(ValueError, match="must hold only"):
        golden.binary_linear(bad_x[:, :, 2, 0], w[:, :, 0, 0])


def test_non_tensor_input_raises_type_error():
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        golden.binary_conv2d(np.ones((1, 1, 2, 2)), torch.ones(1, 1, 1, 1))


def test_channel_mismatch_raises():
    with pytest.raises(ValueError, match="x has 3 channels but w expects 4"):
        golden.binary_conv2d(torch.ones(1, 3, 4, 4), torch.ones(2, 4, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        golden.binary_linear(torch.ones(2, 5), torch.ones(3, 6))


@pytest.mark.parametrize("pad_value", [0, 2, -2, 0.5, None])
def test_bad_pad_value_raises(pad_value):
    with pytest.raises(ValueError, match="pad_value must be -1 or \\+1"):
        golden.binary_conv2d(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), padding=1,
                             pad_value=pad_value)


@pytest.mark.parametrize("method", ["slow", "", "FAST", None])
def test_bad_method_raises(method):
    with pytest.raises(ValueError, match="method must be 'fast' or 'reference'"):
        golden.binary_conv2d(torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3), method=method)


def test_bad_shapes_and_geometry_raise():
    x = torch.ones(1, 2, 3, 3)
    w = torch.ones(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"N×C×H×W"):
        golden.binary_conv2d(x[0], w)
    with pytest.raises(ValueError, match="larger than the padded input"):
        golden.binary_conv2d(x[:, :, :2, :], w)
    with pytest.raises(ValueError, match="stride must be ≥ 1"):
        golden.binary_conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="padding ≥ 0"):
        golden.binary_conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="stride"):
        golden.binary_conv2d(x, w, stride=True)
    with pytest.raises(ValueError, match="N×C and w O×C"):
        golden.binary_linear(torch.ones(2, 3, 1), torch.ones(2, 3))
