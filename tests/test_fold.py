"""Tests of the threshold compiler (bitdet.core.fold).

The acceptance property (docs/numerics.md): the folded integer layer reproduces the
float layer's activations *exactly* — on random BN statistics, γ < 0, γ = 0, α < 0 and
ties at the threshold. The float layer here is the model zoo's arithmetic:
``golden.binary_conv2d`` dots → ``bn_sign_preactivation`` → ``≥ 0`` (1-bit) or
``uniform_quantize`` (n-bit), with a max-pool on the float values; the folded layer is
``fold_binary_conv`` run by ``golden.run_layer``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from bitdet.core import fold, golden
from bitdet.core.fold import BatchNormSign

HYPOTHESIS = settings(max_examples=80, deadline=None)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random_pm1(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.float32)


def all_inputs(channels: int) -> torch.Tensor:
    """Every ±1 pattern of ``channels`` values, as a (2**C)×C×1×1 batch: with a 1×1 conv
    every channel then sees every popcount P = 0..K."""
    patterns = list(itertools.product([-1.0, 1.0], repeat=channels))
    return f32(patterns)[:, :, None, None]


def float_block(x, w, params, *, stride=1, padding=0, pad_value=-1, pool=None, bits=1,
                step=None) -> torch.Tensor:
    """The float model: dots, float epilogue, sign / quantizer, max-pool on float values."""
    dot = golden.binary_conv2d(x, w, stride=stride, padding=padding, pad_value=pad_value)
    pre = fold.bn_sign_preactivation(dot, params)
    if bits == 1:
        values = torch.where(pre >= 0, 1.0, -1.0)                 # sign(0) = +1
    else:
        values = fold.uniform_quantize(pre, step, bits).to(torch.float32)
    if pool is not None:
        values = F.max_pool2d(values, pool[0], pool[1])
    if bits == 1:
        return (values > 0).to(torch.int32)                       # ±1 → bits
    return values.to(torch.int32)


def folded_block(x, w, params, *, stride=1, padding=0, pad_value=-1, pool=None, bits=1,
                 step=None):
    layer = fold.fold_binary_conv(w, params, stride=stride, padding=padding,
                                  pad_value=pad_value, pool=pool, bits=bits, step=step)
    return layer, golden.run_layer(x, layer)


def check_layer_invariants(layer, w, params, bits, step=None):
    k = layer.k
    t = layer.thresholds
    assert t.shape == (params.channels, (1 << bits) - 1)
    assert not t.dtype.is_floating_point
    assert int(t.min()) >= 0 and int(t.max()) <= k + 1
    assert bool((t[:, 1:] >= t[:, :-1]).all())
    assert layer.output_bits == bits
    folded = fold.fold_batchnorm(params, k, bits=bits, step=step)
    assert torch.equal(folded.thresholds, t) and folded.k == k
    signs = torch.where(w >= 0, 1.0, -1.0)
    expected_w = torch.where(folded.flip[:, None, None, None], -signs, signs)
    assert torch.equal(layer.weights, expected_w)
    return folded


def check_every_popcount(params, k, *, bits=1, step=None):
    """For every channel and every P = 0..K, the thresholds give the float output."""
    folded = fold.fold_batchnorm(params, k, bits=bits, step=step)
    p = torch.arange(k + 1)
    dots = (2 * p - k).to(torch.float32)[:, None].expand(k + 1, params.channels)
    pre = fold.bn_sign_preactivation(dots, params)                            # (K+1, O)
    if bits == 1:
        expected = (pre >= 0).to(torch.int32)
    else:
        expected = fold.uniform_quantize(pre, step, bits)
    p_seen = torch.where(folded.flip[None, :], k - p[:, None], p[:, None])   # P' if flipped
    got = golden.threshold(p_seen, folded.thresholds)
    assert torch.equal(got, expected), (got.T, expected.T, folded)
    return folded, pre, expected


def record_cases(folded, pre) -> None:
    """Hypothesis statistics: how often the special cases of the contract came up."""
    k = folded.k
    t = folded.thresholds
    constant = ((t == 0) | (t == k + 1)).all(dim=1)
    if bool(constant.any()):
        event("constant channel: T = 0 or K + 1")
    if bool((~constant).any()):
        event("non-constant channel")
    if bool(((pre == 0) & ~constant[None, :]).any()):
        event("tie: pre == 0 exactly for some P of a non-constant channel")
    if bool(folded.flip.any()):
        event("negative slope: flipped channel")


# --------------------------------------------------------------------------- strategies


def f32_floats(lo: float, hi: float):
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), allow_nan=False,
                     allow_infinity=False, width=32)


@st.composite
def bn_params(draw, channels: int, k: int) -> BatchNormSign:
    """Random epilogue parameters, one of three kinds per channel:

    * ``random``: random statistics, either sign of α and γ (a real threshold or a
      constant channel, depending on where the statistics put it);
    * ``tie``: ``α·dot + bias == μ`` exactly for one reachable dot and ``β == b``, so that
      ``pre`` is exactly 0 there whatever var, eps and γ ≠ 0 are (sign(0) = +1 decides);
    * ``constant``: γ = ±0 or α = 0 (T = 0 or K + 1).
    """
    eps = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    names = ("mean", "var", "gamma", "beta", "alpha", "bias", "sign_bias")
    columns = {name: [] for name in names}
    nonzero = st.tuples(f32_floats(0.05, 3.0), st.sampled_from([1.0, -1.0])).map(
        lambda t: t[0] * t[1])
    for _ in range(channels):
        kind = draw(st.sampled_from(["random", "random", "tie", "constant"]))
        var = draw(st.one_of(st.just(1.0), f32_floats(0.01 if eps == 0 else 0.0, 5.0)))
        gamma = draw(st.one_of(st.sampled_from([1.0, -1.0]), nonzero))
        beta = draw(st.one_of(st.just(0.0), f32_floats(-3, 3)))
        sign_bias = draw(st.one_of(st.just(0.0), f32_floats(-1, 1)))
        alpha = draw(st.one_of(st.sampled_from([1.0, -1.0]), nonzero))
        bias = draw(st.one_of(st.just(0.0), f32_floats(-2, 2)))
        mean = draw(st.one_of(st.integers(-k - 2, k + 2).map(float), f32_floats(-k - 3, k + 3)))
        if kind == "tie":
            alpha = draw(st.sampled_from([1.0, -1.0, 0.5, -2.0, 0.25]))
            bias = draw(st.sampled_from([0.0, 0.5, -1.25]))
            dot = 2 * draw(st.integers(0, k)) - k
            mean = alpha * dot + bias                     # exact in float32
            sign_bias = beta
        elif kind == "constant":
            if draw(st.booleans()):
                gamma = draw(st.sampled_from([0.0, -0.0]))
            else:
                alpha = 0.0
        for name, value in zip(names, (mean, var, gamma, beta, alpha, bias, sign_bias),
                               strict=True):
            columns[name].append(value)
    tensors = {name: f32(values) for name, values in columns.items()}
    # the optional members are sometimes left out where they hold their defaults
    for name, default in (("alpha", 1.0), ("bias", 0.0), ("sign_bias", 0.0)):
        if all(v == default for v in columns[name]) and draw(st.booleans()):
            tensors[name] = None
    return BatchNormSign(eps=eps, **tensors)


def steps(channels: int):
    per_channel = st.lists(f32_floats(0.05, 3.0), min_size=channels, max_size=channels)
    return st.one_of(f32_floats(0.05, 3.0), per_channel.map(f32))


# --------------------------------------------------------------------------- exactness


@HYPOTHESIS
@given(data=st.data())
def test_folded_1bit_matches_float_on_every_input_1x1(data):
    channels = data.draw(st.integers(1, 6), label="C")
    out_channels = data.draw(st.integers(1, 6), label="O")
    params = data.draw(bn_params(out_channels, channels), label="params")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = random_pm1(gen, out_channels, channels, 1, 1)
    x = all_inputs(channels)                          # every P for every channel
    layer, got = folded_block(x, w, params)
    check_layer_invariants(layer, w, params, 1)
    assert torch.equal(got, float_block(x, w, params))
    record_cases(*check_every_popcount(params, channels)[:2])


@HYPOTHESIS
@given(data=st.data())
def test_folded_1bit_matches_float_conv3x3(data):
    channels = data.draw(st.integers(1, 5), label="C")
    out_channels = data.draw(st.integers(1, 5), label="O")
    k = channels * 9
    params = data.draw(bn_params(out_channels, k), label="params")
    stride = data.draw(st.integers(1, 2), label="stride")
    padding = data.draw(st.integers(0, 1), label="padding")
    pad_value = data.draw(st.sampled_from([-1, 1]), label="pad_value")
    pool = data.draw(st.sampled_from([None, (2, 2), (2, 1)]), label="pool")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = random_pm1(gen, out_channels, channels, 3, 3)
    x = random_pm1(gen, 3, channels, 6, 5)
    kwargs = dict(stride=stride, padding=padding, pad_value=pad_value, pool=pool)
    layer, got = folded_block(x, w, params, **kwargs)
    check_layer_invariants(layer, w, params, 1)
    assert torch.equal(got, float_block(x, w, params, **kwargs))
    if pool is None:        # the same through the two device steps: popcount, threshold
        p = golden.popcount_conv2d(x, layer.weights, stride=stride, padding=padding,
                                   pad_value=pad_value, method="reference")
        assert torch.equal(golden.threshold(p, layer.thresholds), got)
    record_cases(*check_every_popcount(params, k)[:2])


@HYPOTHESIS
@given(data=st.data())
def test_folded_nbit_matches_float(data):
    bits = data.draw(st.integers(2, 3), label="bits")
    channels = data.draw(st.integers(1, 5), label="C")
    out_channels = data.draw(st.integers(1, 5), label="O")
    kernel = data.draw(st.sampled_from([1, 3]), label="kernel")
    k = channels * kernel * kernel
    params = data.draw(bn_params(out_channels, k), label="params")
    step = data.draw(steps(out_channels), label="step")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    w = random_pm1(gen, out_channels, channels, kernel, kernel)
    x = all_inputs(channels) if kernel == 1 else random_pm1(gen, 2, channels, 5, 5)
    pool = None if kernel == 1 else data.draw(st.sampled_from([None, (2, 2)]), label="pool")
    kwargs = dict(padding=kernel // 2, pool=pool, bits=bits, step=step)
    layer, got = folded_block(x, w, params, **kwargs)
    check_layer_invariants(layer, w, params, bits, step)
    assert torch.equal(got, float_block(x, w, params, **kwargs))
    record_cases(*check_every_popcount(params, k, bits=bits, step=step)[:2])


def test_folded_network_matches_float_network():
    gen = torch.Generator().manual_seed(7)
    x = random_pm1(gen, 2, 3, 8, 8)
    specs = [(3, 8, dict(padding=1, pad_value=-1, pool=(2, 2))),
             (8, 13, dict(padding=1, pad_value=1)),
             (13, 4, dict(stride=2, padding=1))]
    weights, params, layers = [], [], []
    for c_in, c_out, geometry in specs:
        w = random_pm1(gen, c_out, c_in, 3, 3)
        p = BatchNormSign(mean=torch.randn(c_out, generator=gen) * 3,
                          var=torch.rand(c_out, generator=gen) + 0.1,
                          gamma=torch.randn(c_out, generator=gen),
                          beta=torch.randn(c_out, generator=gen),
                          alpha=torch.randn(c_out, generator=gen))
        weights.append(w)
        params.append(p)
        layers.append(fold.fold_binary_conv(w, p, **geometry))
    outputs = golden.run_network(x, layers)
    current = x
    for w, p, (_, _, geometry), out in zip(weights, params, specs, outputs, strict=True):
        expected = float_block(current, w, p, **geometry)
        assert torch.equal(out, expected)
        current = expected.to(torch.float32) * 2 - 1


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("channels", [3, 4])
def test_ties_at_the_threshold_give_one(channels):
    # eps = 0, var = 1, α = 1, γ = ±1, β = b = 0 and μ of K's parity: pre = ±(dot − μ) is
    # exactly 0 when dot == μ, and sign(0) = +1 in both the float and the folded layer.
    k = channels
    means = [float(m) for m in range(-k, k + 1, 2)]
    gammas = [1.0, -1.0]
    pairs = list(itertools.product(means, gammas))
    o = len(pairs)
    params = BatchNormSign(mean=f32([m for m, _ in pairs]), var=torch.ones(o),
                           gamma=f32([g for _, g in pairs]), beta=torch.zeros(o), eps=0.0,
                           alpha=torch.ones(o))
    gen = torch.Generator().manual_seed(channels)
    w = random_pm1(gen, o, channels, 1, 1)
    x = all_inputs(channels)
    dot = golden.binary_conv2d(x, w)
    pre = fold.bn_sign_preactivation(dot, params)
    ties = dot.to(torch.float32) == f32([m for m, _ in pairs])[None, :, None, None]
    assert bool(ties.any(dim=0).all())                 # every channel sees its tie
    assert bool((pre[ties] == 0).all()) and bool((pre[~ties] != 0).all())

    expected = float_block(x, w, params)
    assert bool((expected[ties] == 1).all())            # float: sign(0) = +1
    layer, got = folded_block(x, w, params)
    assert bool((got[ties] == 1).all())                 # folded: P == T gives 1
    assert torch.equal(got, expected)

    folded = check_layer_invariants(layer, w, params, 1)
    for i, (m, g) in enumerate(pairs):
        if g > 0:       # out = dot ≥ μ  ⇔  P ≥ (μ + K)/2
            assert not bool(folded.flip[i])
            assert int(folded.thresholds[i, 0]) == (int(m) + k) // 2
        else:           # out = dot ≤ μ  ⇔  P' = K − P ≥ (K − μ)/2
            assert bool(folded.flip[i]) == (int(m) < k)     # μ = K: constant 1, no flip
            assert int(folded.thresholds[i, 0]) == (k - int(m)) // 2
    check_every_popcount(params, k)


def test_tie_with_sign_bias_equal_to_beta():
    # pre = (dot − μ)·γ + β − b with β == b: still exactly 0 at dot == μ.
    k = 5
    params = BatchNormSign(mean=f32([1.0, -3.0]), var=f32([1.0, 1.0]), gamma=f32([2.0, -0.5]),
                           beta=f32([0.3, -1.7]), sign_bias=f32([0.3, -1.7]), eps=0.0)
    folded, pre, expected = check_every_popcount(params, k)
    # P = 3 is dot = 1 (channel 0's tie), P = 1 is dot = −3 (channel 1's tie)
    assert float(pre[3, 0]) == 0 and int(expected[3, 0]) == 1
    assert float(pre[1, 1]) == 0 and int(expected[1, 1]) == 1
    assert folded.thresholds[:, 0].tolist() == [3, k - 1]
    assert folded.flip.tolist() == [False, True]


def test_nbit_round_half_even_ties():
    # pre = dot + 0.5 for dot ∈ {−3, −1, 1, 3}: −2.5, −0.5, 1.5, 3.5 → round half to even
    # −2, −0, 2, 4 → clamp to [0, 3]: levels 0, 0, 2, 3 for P = 0..3.
    k = 3
    params = BatchNormSign(mean=f32([-0.5]), var=f32([1.0]), gamma=f32([1.0]),
                           beta=f32([0.0]), eps=0.0)
    folded, _, expected = check_every_popcount(params, k, bits=2, step=1.0)
    assert expected[:, 0].tolist() == [0, 0, 2, 3]
    assert folded.thresholds.tolist() == [[2, 2, 3]]
    assert folded.flip.tolist() == [False]


def test_constant_channels_gamma_zero():
    k = 9
    # γ = 0: pre = β − b, whatever P is.
    params = BatchNormSign(mean=f32([1.0, 2.0, -3.0, 0.0]), var=f32([1.0, 0.5, 2.0, 1.0]),
                           gamma=f32([0.0, 0.0, -0.0, 0.0]), beta=f32([0.7, -0.2, 0.0, 0.4]),
                           sign_bias=f32([0.0, 0.0, 0.0, 0.4]))
    folded, _, expected = check_every_popcount(params, k)
    assert folded.thresholds[:, 0].tolist() == [0, k + 1, 0, 0]    # β−b ≥ 0 → always 1
    assert folded.flip.tolist() == [False] * 4
    assert expected.tolist() == [[1, 0, 1, 1]] * (k + 1)
    gen = torch.Generator().manual_seed(0)
    w = random_pm1(gen, 4, 1, 3, 3)
    x = random_pm1(gen, 2, 1, 5, 5)
    _, got = folded_block(x, w, params, padding=1)
    assert torch.equal(got, float_block(x, w, params, padding=1))
    assert bool((got[:, 0] == 1).all()) and bool((got[:, 1] == 0).all())


def test_constant_channels_alpha_zero_and_nbit():
    k = 4
    params = BatchNormSign(mean=f32([0.0, 0.0]), var=f32([1.0, 1.0]), gamma=f32([1.0, 1.0]),
                           beta=f32([1.2, 9.0]), alpha=f32([0.0, 0.0]), eps=0.0)
    folded, _, expected = check_every_popcount(params, k, bits=2, step=0.5)
    # round(1.2 / 0.5) = 2 → T = [0, 0, K+1]; round(18) clamps to 3 → T = [0, 0, 0]
    assert folded.thresholds.tolist() == [[0, 0, k + 1], [0, 0, 0]]
    assert expected.tolist() == [[2, 3]] * (k + 1)


@pytest.mark.parametrize(("alpha", "gamma", "flip"), [
    (1.0, 1.0, False), (-1.0, 1.0, True), (1.0, -1.0, True), (-1.0, -1.0, False),
    (-0.3, 2.5, True), (0.7, -0.1, True),
])
def test_negative_slope_flips_the_weights(alpha, gamma, flip):
    k = 3 * 9
    params = BatchNormSign(mean=f32([2.5]), var=f32([1.5]), gamma=f32([gamma]),
                           beta=f32([0.1]), alpha=f32([alpha]))
    gen = torch.Generator().manual_seed(1)
    w = random_pm1(gen, 1, 3, 3, 3)
    x = random_pm1(gen, 4, 3, 5, 5)
    layer, got = folded_block(x, w, params, padding=1, pad_value=1)
    folded = check_layer_invariants(layer, w, params, 1)
    assert folded.flip.tolist() == [flip]
    assert torch.equal(layer.weights, -w if flip else w)
    assert torch.equal(got, float_block(x, w, params, padding=1, pad_value=1))
    check_every_popcount(params, k)


def test_weights_are_binarized_with_sign_zero_positive():
    params = BatchNormSign(mean=f32([0.0]), var=f32([1.0]), gamma=f32([1.0]), beta=f32([0.0]))
    w = f32([0.3, -2.0, 0.0, -0.0]).reshape(1, 4, 1, 1)
    layer = fold.fold_binary_conv(w, params)
    assert layer.weights.reshape(-1).tolist() == [1.0, -1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- closed form


@st.composite
def unambiguous_params(draw, k: int):
    """Parameters whose slope is well away from 0 (|α|, |γ| ≥ 0.5, var ≤ 4)."""
    def magnitude(lo, hi):
        return st.tuples(f32_floats(lo, hi), st.sampled_from([1.0, -1.0])).map(
            lambda t: t[0] * t[1])
    return dict(
        mean=draw(f32_floats(-k - 2, k + 2)), var=draw(f32_floats(0.25, 4.0)),
        gamma=draw(magnitude(0.5, 2.0)), beta=draw(f32_floats(-2, 2)),
        alpha=draw(magnitude(0.5, 2.0)), bias=draw(f32_floats(-1, 1)),
        sign_bias=draw(f32_floats(-1, 1)))


@HYPOTHESIS
@given(k=st.integers(1, 40), data=st.data())
def test_thresholds_match_closed_form(k, data):
    rows = data.draw(st.lists(unambiguous_params(k), min_size=1, max_size=4), label="rows")
    eps = 1e-5
    expected_t, expected_flip = [], []
    for row in rows:
        inv_std = 1 / math.sqrt(row["var"] + eps)
        a = row["alpha"] * row["gamma"] * inv_std                       # pre = a·dot + b
        b = (row["bias"] - row["mean"]) * row["gamma"] * inv_std + row["beta"] - row["sign_bias"]
        # a > 0: P ≥ K/2 − b/(2a); a < 0 (flipped, P' = K − P): P' ≥ K/2 + b/(2a)
        t_real = k / 2 - b / (2 * a) if a > 0 else k / 2 + b / (2 * a)
        assume(abs(t_real - round(t_real)) > 0.05)                      # no near-tie
        expected_t.append(min(max(math.ceil(t_real), 0), k + 1))
        expected_flip.append(a < 0)
    params = BatchNormSign(eps=eps, **{name: f32([row[name] for row in rows])
                                       for name in rows[0]})
    folded = fold.fold_batchnorm(params, k)
    assert folded.thresholds[:, 0].tolist() == expected_t
    for t, flip, expected in zip(expected_t, folded.flip.tolist(), expected_flip, strict=True):
        if 0 < t <= k:          # a constant channel (T = 0 or K + 1) needs no flip
            assert flip == expected


# --------------------------------------------------------------------------- arithmetic


def test_bn_sign_preactivation_formula():
    gen = torch.Generator().manual_seed(3)
    o = 5
    p = {name: torch.randn(o, generator=gen) for name in ("mean", "gamma", "beta", "alpha",
                                                            "bias", "sign_bias")}
    p["var"] = torch.rand(o, generator=gen) + 0.1
    params = BatchNormSign(eps=1e-3, **p)
    dot = torch.randint(-9, 10, (2, o, 3, 3), generator=gen, dtype=torch.int32)
    got = fold.bn_sign_preactivation(dot, params)
    assert got.dtype == torch.float32
    c = {name: v.double().reshape(1, o, 1, 1) for name, v in p.items()}
    expected = ((dot.double() * c["alpha"] + c["bias"] - c["mean"]) / torch.sqrt(c["var"] + 1e-3)
                * c["gamma"] + c["beta"] - c["sign_bias"])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)
    # defaults: α = 1, bias = 0, b = 0
    plain = BatchNormSign(mean=f32([1.0]), var=f32([3.0]), gamma=f32([2.0]), beta=f32([0.5]),
                          eps=1.0)
    out = fold.bn_sign_preactivation(f32([[5.0]]), plain)
    assert float(out) == pytest.approx((5 - 1) / 2 * 2 + 0.5)
    assert plain.channels == 1


def test_uniform_quantize():
    pre = f32([[-1.0, 0.2, 0.5, 1.5, 2.5, 2.6, 100.0]])
    assert fold.uniform_quantize(pre, 1.0, 2).tolist() == [[0, 0, 0, 2, 2, 3, 3]]
    assert fold.uniform_quantize(pre, 0.5, 3).tolist() == [[0, 0, 1, 3, 5, 5, 7]]
    per_channel = f32([[[1.0]], [[1.0]]]).reshape(1, 2, 1) * f32([1.0, 3.0]).reshape(1, 2, 1)
    out = fold.uniform_quantize(per_channel, f32([1.0, 0.5]), 3)
    assert out.reshape(-1).tolist() == [1, 6]
    assert out.dtype == torch.int32


def test_thresholds_from_levels_direct():
    levels = torch.tensor([[0, 0, 1, 1, 1],         # rising: T = 2
                           [1, 1, 0, 0, 0],         # falling: flip, P' rises, T = 3
                           [0, 0, 0, 0, 0],         # never: T = K + 1 = 5
                           [1, 1, 1, 1, 1]])        # always: T = 0
    folded = fold.thresholds_from_levels(levels, 4)
    assert folded.thresholds.tolist() == [[2], [3], [5], [0]]
    assert folded.flip.tolist() == [False, True, False, False]
    assert folded.k == 4
    multi = fold.thresholds_from_levels(torch.tensor([[0, 1, 1, 3, 3], [3, 3, 2, 0, 0]]), 4,
                                        n_levels=3)
    # flipped row read backwards: 0, 0, 2, 3, 3 → T = 2, 2, 3
    assert multi.thresholds.tolist() == [[1, 3, 3], [2, 2, 3]]
    assert multi.flip.tolist() == [False, True]


# --------------------------------------------------------------------------- errors


def test_fold_elementwise_non_monotone_raises():
    def bump(dot):                               # 1 only near dot = 0: not a threshold
        return (dot.abs() <= 1).to(torch.int32)
    with pytest.raises(ValueError, match="not monotone"):
        fold.fold_elementwise(bump, k=4, channels=2)
    with pytest.raises(ValueError, match="output channel 1 is not monotone"):
        fold.thresholds_from_levels(torch.tensor([[0, 1, 1], [0, 1, 0]]), 2)


def test_fold_elementwise_monotone_function():
    folded = fold.fold_elementwise(lambda dot: (dot >= 1).to(torch.int32), k=5, channels=3)
    # dot = 2P − 5 ≥ 1  ⇔  P ≥ 3
    assert folded.thresholds.tolist() == [[3]] * 3
    assert folded.flip.tolist() == [False] * 3


def test_fold_elementwise_bad_arguments_raise():
    with pytest.raises(ValueError, match="k and channels must be positive"):
        fold.fold_elementwise(lambda d: (d >= 0).to(torch.int32), k=0, channels=1)
    with pytest.raises(ValueError, match="k and channels must be positive"):
        fold.fold_elementwise(lambda d: (d >= 0).to(torch.int32), k=3, channels=0)
    with pytest.raises(ValueError, match="the epilogue returned shape"):
        fold.fold_elementwise(lambda d: (d >= 0).to(torch.int32)[0], k=3, channels=2)
    with pytest.raises(ValueError, match=r"levels must lie in \[0, 1\]"):
        fold.fold_elementwise(lambda d: (d >= 0).to(torch.int32) * 2, k=3, channels=2,
                              n_levels=1)
    with pytest.raises(ValueError, match=r"levels must be \(O, K \+ 1\)"):
        fold.thresholds_from_levels(torch.zeros(2, 3), 3)


def nan_params(name: str) -> BatchNormSign:
    values = dict(mean=f32([0.0, 1.0]), var=f32([1.0, 1.0]), gamma=f32([1.0, 1.0]),
                  beta=f32([0.0, 0.0]), alpha=f32([1.0, 1.0]), bias=f32([0.0, 0.0]),
                  sign_bias=f32([0.0, 0.0]))
    values[name] = f32([math.nan, 1.0])
    return BatchNormSign(**values)


NAN_MESSAGE = r"(?i)nan|non-finite|not monotone"


@pytest.mark.parametrize("name", ["mean", "var", "gamma", "beta", "alpha"])
def test_nan_statistics_raise_1bit(name):
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        fold.fold_batchnorm(nan_params(name), 5)
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        fold.fold_binary_conv(torch.ones(2, 5, 1, 1), nan_params(name))


@pytest.mark.parametrize("name", ["mean", "gamma"])
def test_nan_statistics_raise_nbit(name):
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        fold.fold_batchnorm(nan_params(name), 5, bits=2, step=1.0)


def test_mismatched_parameter_lengths_raise():
    base = dict(mean=torch.zeros(3), var=torch.ones(3), gamma=torch.ones(3), beta=torch.zeros(3))
    for name in ("var", "gamma", "beta", "alpha", "bias", "sign_bias"):
        bad = dict(base, **{name: torch.ones(4)})
        with pytest.raises(ValueError, match=rf"BatchNormSign.{name} has 4 values, expected "
                                              r"one per output channel \(3\)"):
            fold.fold_batchnorm(BatchNormSign(**bad), 9)
    with pytest.raises(ValueError, match="weights have 2 output channels but the epilogue "
                                         "has 3"):
        fold.fold_binary_conv(torch.ones(2, 1, 3, 3), BatchNormSign(**base))
    with pytest.raises(ValueError, match="O×C×kh×kw"):
        fold.fold_binary_conv(torch.ones(3, 9), BatchNormSign(**base))


def test_bad_statistics_and_quantizer_raise():
    with pytest.raises(ValueError, match="var must be non-negative"):
        fold.fold_batchnorm(BatchNormSign(mean=f32([0.0]), var=f32([-1.0]), gamma=f32([1.0]),
                                          beta=f32([0.0])), 3)
    params = BatchNormSign(mean=f32([0.0]), var=f32([1.0]), gamma=f32([1.0]), beta=f32([0.0]))
    with pytest.raises(ValueError, match="needs the quantizer step"):
        fold.fold_batchnorm(params, 3, bits=2)
    for step in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="step must be positive and finite"):
            fold.fold_batchnorm(params, 3, bits=2, step=step)
    for bits in (0, 9):
        with pytest.raises(ValueError, match="bits must be between 1 and 8"):
            fold.uniform_quantize(f32([0.0]), 1.0, bits)


@pytest.mark.parametrize("seed", range(4))
def test_fold_integer_epilogue_is_exact_over_the_range(seed):
    gen = torch.Generator().manual_seed(seed)
    channels, lo, hi = 6, -300, 257
    a = torch.randn(channels, generator=gen) * 0.01
    a[0] = 0.0                      # constant channel
    b = torch.randn(channels, generator=gen)
    a[1], b[1] = -0.02, 0.1         # falling channel, crosses 0 at acc = 5
    a[2], b[2] = 0.0625, 0.25       # exact tie at acc = -4 (0.0625·-4 + 0.25 = 0)

    def epilogue(acc):
        return ((acc * a.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)) >= 0).to(torch.int32)

    thresholds, sign = fold.fold_integer_epilogue(epilogue, lo=lo, hi=hi, channels=channels)
    assert sign[1] == -1 and sign[0] == 1
    acc = torch.arange(lo, hi + 1).reshape(1, 1, -1, 1).expand(1, channels, -1, 1)
    expected = epilogue(acc.to(torch.float32))
    got = golden.threshold(acc * sign.reshape(1, -1, 1, 1), thresholds)
    assert torch.equal(got, expected)
    assert int(thresholds[2, 0]) == -4


def test_fold_integer_epilogue_rejects_bad_ranges():
    with pytest.raises(ValueError, match="empty accumulator range"):
        fold.fold_integer_epilogue(lambda v: v, lo=3, hi=2, channels=1)
    with pytest.raises(ValueError, match="too wide"):
        fold.fold_integer_epilogue(lambda v: v, lo=0, hi=1 << 25, channels=1)
