"""Tests of contract v2 folding (bitdet.core.fold): n-bit inputs, residual shortcuts.

The acceptance property (docs/numerics.md, "Folding v2"): the folded integer layer —
negated weights for flipped channels, thresholds ``(O, L)`` or ``(O, R, L)`` on the
accumulator A — equals the float layer on every A and every shortcut level r, and on
conv inputs: the float layer is the integer dot ``d = Σ w·a`` of the ±1 weights with the
input levels (a float32 convolution of the padded levels, exact) → ``residual_preactivation``
→ max-pool on the float values → sign / ``uniform_quantize``; the folded layer is
``fold_residual_conv`` run by ``golden.run_layer`` (fast and reference).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st

from bitdet.core import fold, golden
from bitdet.core.fold import BatchNormSign, ResidualEpilogue

HYPOTHESIS = settings(max_examples=60, deadline=None)


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random_pm1(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(torch.float32)


def f32_floats(lo: float, hi: float):
    return st.floats(float(np.float32(lo)), float(np.float32(hi)), allow_nan=False,
                     allow_infinity=False, width=32)


def signed(lo: float, hi: float):
    return st.tuples(f32_floats(lo, hi), st.sampled_from([1.0, -1.0])).map(lambda t: t[0] * t[1])


DYADIC = [0.25, 0.5, 1.0, 2.0]


# --------------------------------------------------------------------------- the float layer


def float_layer(levels, w, epilogue, *, out_bits, shortcut=None, stride=1, padding=0,
                pad_level=0, pool=None) -> torch.Tensor:
    """The float model: exact integer dots of the ±1 weights with the padded input levels,
    the v2 epilogue, max-pool on the float pre-activations, then sign / quantizer."""
    signs = torch.where(w >= 0, 1.0, -1.0)
    x = F.pad(levels.to(torch.float32), (padding,) * 4, value=float(pad_level))
    d = torch.round(F.conv2d(x, signs, stride=stride)).to(torch.int64)
    pre = fold.residual_preactivation(d, shortcut, epilogue, fold.weight_sums(signs))
    if pool is not None:
        pre = F.max_pool2d(pre, pool[0], pool[1])
    return fold.residual_output(pre, epilogue, out_bits)


def every_a_and_r(folded: fold.FoldedLevels, epilogue: ResidualEpilogue, sums, out_bits):
    """For every channel, every A = 0..Amax and every shortcut level r: the folded
    thresholds on the (reflected, if flipped) A give the float epilogue's level at
    d = A − M(K − S)/2. Returns the pre-activations, (R, Amax + 1, O)."""
    k, amax, m = folded.k, folded.amax, (1 << folded.in_bits) - 1
    o = sums.numel()
    a = torch.arange(amax + 1)
    d = a[:, None] - m * (k - sums[None, :]) // 2                     # (Amax + 1, O)
    rows = [None] if folded.shortcut_bits == 0 else range(1 << folded.shortcut_bits)
    seen = torch.where(folded.flip[None, :], amax - a[:, None], a[:, None])
    pres = []
    for r in rows:
        pre = fold.residual_preactivation(d, r, epilogue, sums)      # laid out (N = A, O)
        expected = fold.residual_output(pre, epilogue, out_bits)
        if r is None:
            got = golden.threshold(seen, folded.thresholds)
        else:
            got = golden.threshold_shortcut(seen, folded.thresholds,
                                            torch.full((amax + 1, o), r, dtype=torch.int32))
        assert torch.equal(got, expected), (r, got.T, expected.T, folded)
        pres.append(pre)
    return torch.stack(pres)


def check_folded(folded: fold.FoldedLevels, o: int, out_bits: int, shortcut_bits: int):
    t = folded.thresholds
    n = (1 << out_bits) - 1
    assert t.dtype == torch.int64
    assert t.shape == ((o, n) if shortcut_bits == 0 else (o, 1 << shortcut_bits, n))
    assert int(t.min()) >= 0 and int(t.max()) <= folded.amax + 1
    assert bool((t[..., 1:] >= t[..., :-1]).all())
    assert folded.flip.shape == (o,) and folded.flip.dtype == torch.bool


def record_cases(folded, pre, epilogue):
    t = folded.thresholds
    if t.dim() == 2:
        t = t[:, None]
    constant = ((t == 0) | (t == folded.amax + 1)).all(dim=2)        # (O, R)
    if bool(constant.all(dim=1).any()):
        event("constant channel")
    if bool((constant.any(dim=1) & ~constant.all(dim=1)).any()):
        event("channel constant for some r only")
    if bool(folded.flip.any()):
        event("flipped channel")
    if bool((pre == 0).any()):
        event("tie: pre == 0 exactly")
    if epilogue.step is not None and bool(
            (pre / torch.as_tensor(epilogue.step).reshape(1, 1, -1) % 1 == 0.5).any()):
        event("tie: pre / step half-way between levels")


# --------------------------------------------------------------------------- strategies


@st.composite
def epilogues(draw, sums: torch.Tensor, k: int, in_bits: int, shortcut_bits: int,
              out_bits: int) -> ResidualEpilogue:
    """Random v2 epilogue parameters; per channel one of

    * ``random``: random statistics, either sign of α, γ and the shortcut gain;
    * ``tie``: ``pre`` is exactly 0 (1-bit) or exactly 1.5 steps (n-bit, round half to
      even) at one reachable ``(d, r)``: μ is ``z`` there and ``b`` cancels ``β + β_r·v(r)``;
    * ``constant``: γ = ±0 or α = 0.
    """
    m = (1 << in_bits) - 1
    shortcut = shortcut_bits > 0
    in_scale = draw(st.one_of(st.sampled_from([1.0, 2.0, 0.5, -1.0]), signed(0.05, 3.0)))
    in_zero = draw(st.one_of(st.sampled_from([0.0, -1.0, 0.5]), f32_floats(-2, 2)))
    if in_bits == 1 and draw(st.booleans()):
        in_scale, in_zero = 2.0, -1.0                  # the ±1 values of contract v1
    eps = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    per_channel_shortcut = draw(st.booleans())
    names = ("mean", "var", "gamma", "beta", "alpha", "bias", "sign_bias", "shortcut_gain",
             "shortcut_scale", "shortcut_zero", "step")
    cols = {name: [] for name in names}
    shared_scale = draw(st.one_of(st.sampled_from(DYADIC), f32_floats(0.05, 2.0)))
    shared_zero = draw(st.one_of(st.sampled_from([0.0, -1.0, 0.5]), f32_floats(-1, 1)))
    for o in range(sums.numel()):
        kind = draw(st.sampled_from(["random", "random", "tie", "constant"]))
        row = dict(
            var=draw(st.one_of(st.just(1.0), f32_floats(0.01 if eps == 0 else 0.0, 5.0))),
            gamma=draw(st.one_of(st.sampled_from([1.0, -1.0]), signed(0.05, 3.0))),
            beta=draw(st.one_of(st.just(0.0), f32_floats(-3, 3))),
            alpha=draw(st.one_of(st.sampled_from([1.0, -1.0]), signed(0.05, 3.0))),
            bias=draw(st.one_of(st.just(0.0), f32_floats(-2, 2))),
            sign_bias=draw(st.one_of(st.just(0.0), f32_floats(-1, 1))),
            shortcut_gain=draw(st.one_of(st.sampled_from([1.0, 0.0, -1.0]), signed(0.05, 4.0))),
            shortcut_scale=(draw(st.one_of(st.sampled_from(DYADIC), f32_floats(0.05, 2.0)))
                            if per_channel_shortcut else shared_scale),
            shortcut_zero=(draw(st.one_of(st.just(0.0), f32_floats(-1, 1)))
                           if per_channel_shortcut else shared_zero),
            step=draw(st.one_of(st.sampled_from(DYADIC), f32_floats(0.05, 3.0))))
        row["mean"] = draw(st.one_of(st.integers(-m * k - 2, m * k + 2).map(float),
                                     f32_floats(-m * k - 3, m * k + 3)))
        if kind == "tie":
            a0 = draw(st.integers(0, m * k))
            d0 = a0 - m * (k - int(sums[o])) // 2
            r0 = draw(st.integers(0, (1 << shortcut_bits) - 1)) if shortcut else None
            for name in ("beta", "shortcut_gain", "shortcut_zero"):
                row[name] = draw(st.sampled_from([0.0, 0.5, -1.25, 2.0]))
            row["alpha"] = draw(st.sampled_from([1.0, -1.0, 0.5, -2.0, 3.0]))
            if per_channel_shortcut:
                row["shortcut_scale"] = draw(st.sampled_from(DYADIC))
            row["step"] = draw(st.sampled_from(DYADIC))
            # μ := z at d0, computed with the epilogue's own float32 operations, so y = ±0
            x = f32([float(d0)]) * f32(in_scale) + f32([float(sums[o])]) * f32(in_zero)
            row["mean"] = float(x * f32([row["alpha"]]) + f32([row["bias"]]))
            # then pre = β + β_r·v(r0) − b: cancel it (1 bit) or leave 1.5 steps (n bits)
            tail = f32([row["beta"]])
            if shortcut:
                v = f32(float(r0)) * f32([row["shortcut_scale"]]) + f32([row["shortcut_zero"]])
                tail = tail + f32([row["shortcut_gain"]]) * v
            row["sign_bias"] = float(tail) - (0.0 if out_bits == 1 else 1.5 * row["step"])
        elif kind == "constant":
            if draw(st.booleans()):
                row["gamma"] = draw(st.sampled_from([0.0, -0.0]))
            else:
                row["alpha"] = 0.0
        for name in names:
            cols[name].append(row[name])
    tensors = {name: f32(values) for name, values in cols.items()}
    if not shortcut:
        tensors["shortcut_gain"] = None
    elif not per_channel_shortcut:
        tensors["shortcut_scale"] = float(shared_scale)
        tensors["shortcut_zero"] = float(shared_zero)
    if out_bits == 1:
        tensors["step"] = None
    return ResidualEpilogue(eps=eps, in_scale=in_scale, in_zero=in_zero, **tensors)


def random_weights(data, o: int, c: int, kernel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return random_pm1(gen, o, c, kernel, kernel)


# --------------------------------------------------------------------------- exactness


@HYPOTHESIS
@given(data=st.data())
def test_fold_residual_matches_float_on_every_a_and_r(data):
    in_bits = data.draw(st.integers(1, 4), label="in_bits")
    out_bits = data.draw(st.integers(1, 4), label="out_bits")
    shortcut_bits = data.draw(st.integers(0, 4), label="shortcut_bits")
    o = data.draw(st.integers(1, 5), label="O")
    k = data.draw(st.integers(1, 20), label="K")
    w = random_weights(data, o, k, 1)
    sums = fold.weight_sums(w)
    epilogue = data.draw(epilogues(sums, k, in_bits, shortcut_bits, out_bits), label="epilogue")
    folded = fold.fold_residual(epilogue, k=k, in_bits=in_bits, weight_sums=sums,
                                out_bits=out_bits, shortcut_bits=shortcut_bits)
    check_folded(folded, o, out_bits, shortcut_bits)
    pre = every_a_and_r(folded, epilogue, sums, out_bits)
    record_cases(folded, pre, epilogue)


@HYPOTHESIS
@given(data=st.data())
def test_fold_residual_conv_matches_float_conv(data):
    in_bits = data.draw(st.integers(1, 4), label="in_bits")
    out_bits = data.draw(st.integers(1, 4), label="out_bits")
    shortcut_bits = data.draw(st.integers(0, 4), label="shortcut_bits")
    c = data.draw(st.integers(1, 4), label="C")
    o = data.draw(st.integers(1, 4), label="O")
    kernel = data.draw(st.sampled_from([1, 3]), label="kernel")
    stride = data.draw(st.integers(1, 2), label="stride")
    padding = data.draw(st.integers(0, kernel // 2), label="padding")
    pad_level = data.draw(st.integers(0, (1 << in_bits) - 1), label="pad_level")
    pool = data.draw(st.sampled_from([None, (2, 2), (2, 1)]), label="pool")
    w = random_weights(data, o, c, kernel) * data.draw(f32_floats(0.1, 2.0), label="w scale")
    k = c * kernel * kernel
    epilogue = data.draw(epilogues(fold.weight_sums(w), k, in_bits, shortcut_bits, out_bits),
                         label="epilogue")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="x seed"))
    levels = torch.randint(0, 1 << in_bits, (2, c, 6, 5), generator=gen, dtype=torch.int32)
    h_out = (6 + 2 * padding - kernel) // stride + 1
    w_out = (5 + 2 * padding - kernel) // stride + 1
    shortcut = (torch.randint(0, 1 << shortcut_bits, (2, o, h_out, w_out), generator=gen,
                              dtype=torch.int32) if shortcut_bits else None)
    geometry = dict(stride=stride, padding=padding, pad_level=pad_level, pool=pool)
    layer = fold.fold_residual_conv(w, epilogue, in_bits=in_bits, shortcut_bits=shortcut_bits,
                                    out_bits=out_bits, **geometry)
    assert (layer.in_bits, layer.shortcut_bits, layer.output_bits) == (in_bits, shortcut_bits,
                                                                       out_bits)
    assert layer.padding_level == pad_level
    folded = fold.fold_residual(epilogue, k=k, in_bits=in_bits, weight_sums=fold.weight_sums(w),
                                out_bits=out_bits, shortcut_bits=shortcut_bits)
    assert torch.equal(layer.thresholds, folded.thresholds)
    signs = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(layer.weights, torch.where(folded.flip[:, None, None, None], -signs, signs))
    expected = float_layer(levels, w, epilogue, out_bits=out_bits, shortcut=shortcut, **geometry)
    for method in ("fast", "reference"):
        assert torch.equal(golden.run_layer(levels, layer, shortcut, method=method), expected)
    if in_bits == 1:            # the ±1 form of a 1-bit map runs the same layer
        x = levels.to(torch.float32) * 2 - 1
        assert torch.equal(golden.run_layer(x, layer, shortcut), expected)


@pytest.mark.parametrize(("in_bits", "c", "shortcut_bits", "out_bits"),
                         [(1, 3, 2, 1), (2, 2, 1, 2), (3, 2, 3, 1), (4, 1, 4, 3), (4, 2, 0, 4)])
def test_every_input_of_a_1x1_conv(in_bits, c, shortcut_bits, out_bits):
    """Every level pattern of a 1×1 conv reaches every A of every channel (the planes'
    popcounts are independent); with every shortcut level, that is every (A, r)."""
    gen = torch.Generator().manual_seed(in_bits * 10 + c)
    o = 6
    w = random_pm1(gen, o, c, 1, 1) * 0.3
    sums = fold.weight_sums(w)
    r_count = 1 << shortcut_bits
    epilogue = ResidualEpilogue(
        mean=torch.randn(o, generator=gen) * 3, var=torch.rand(o, generator=gen) + 0.1,
        gamma=f32([1.0, -1.0, 0.0, 2.0, -0.5, 1.0]), beta=torch.randn(o, generator=gen),
        alpha=torch.randn(o, generator=gen), in_scale=0.75, in_zero=-0.5,
        shortcut_gain=torch.randn(o, generator=gen) if shortcut_bits else None,
        shortcut_scale=0.5, shortcut_zero=-0.25, step=0.5 if out_bits > 1 else None)
    patterns = torch.tensor(list(itertools.product(range(1 << in_bits), repeat=c)),
                            dtype=torch.int32)                                # B × C
    levels = patterns.repeat_interleave(r_count, dim=0)[:, :, None, None]
    r = torch.arange(r_count, dtype=torch.int32).repeat(patterns.shape[0])
    shortcut = r[:, None, None, None].expand(-1, o, 1, 1).contiguous() if shortcut_bits else None
    layer = fold.fold_residual_conv(w, epilogue, in_bits=in_bits, shortcut_bits=shortcut_bits,
                                    out_bits=out_bits)
    a = golden.level_conv2d(levels, layer.weights, in_bits=in_bits)
    for ch in range(o):
        assert set(a[:, ch].flatten().tolist()) == set(range(layer.accumulator_max + 1))
    expected = float_layer(levels, w, epilogue, out_bits=out_bits, shortcut=shortcut)
    assert torch.equal(golden.run_layer(levels, layer, shortcut), expected)
    folded = fold.fold_residual(epilogue, k=c, in_bits=in_bits, weight_sums=sums,
                                out_bits=out_bits, shortcut_bits=shortcut_bits)
    every_a_and_r(folded, epilogue, sums, out_bits)


@HYPOTHESIS
@given(data=st.data())
def test_one_bit_without_shortcut_is_contract_v1(data):
    """in_bits = 1, x = 2a − 1 (s_in = 2, z_in = −1), no shortcut: the same thresholds and
    flips as fold_batchnorm (A = P; x·… = 2d − S = 2P − K = the ±1 dot, exactly)."""
    k = data.draw(st.integers(1, 30), label="K")
    o = data.draw(st.integers(1, 5), label="O")
    out_bits = data.draw(st.integers(1, 3), label="out_bits")
    w = random_weights(data, o, k, 1)
    sums = fold.weight_sums(w)
    ep = data.draw(epilogues(sums, k, 1, 0, out_bits), label="epilogue")
    params = BatchNormSign(mean=ep.mean, var=ep.var, gamma=ep.gamma, beta=ep.beta, eps=ep.eps,
                           alpha=ep.alpha, bias=ep.bias, sign_bias=ep.sign_bias)
    ep = ResidualEpilogue(mean=ep.mean, var=ep.var, gamma=ep.gamma, beta=ep.beta, eps=ep.eps,
                          alpha=ep.alpha, bias=ep.bias, sign_bias=ep.sign_bias, in_scale=2.0,
                          in_zero=-1.0, step=ep.step)
    v2 = fold.fold_residual(ep, k=k, in_bits=1, weight_sums=sums, out_bits=out_bits)
    v1 = fold.fold_batchnorm(params, k, bits=out_bits, step=ep.step)
    assert torch.equal(v2.thresholds, v1.thresholds)
    assert torch.equal(v2.flip, v1.flip)


# --------------------------------------------------------------------------- flips, n-bit


@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
def test_negating_weights_reflects_s_and_a(in_bits):
    """S → −S and A → Amax − A when a channel's weights are negated, so the dot changes
    sign: d' = A' − M(K − S')/2 = −d (padding levels included)."""
    gen = torch.Generator().manual_seed(in_bits)
    w = random_pm1(gen, 5, 3, 3, 3)
    levels = torch.randint(0, 1 << in_bits, (2, 3, 6, 6), generator=gen, dtype=torch.int32)
    m, k = (1 << in_bits) - 1, 27
    geometry = dict(in_bits=in_bits, padding=1, pad_level=m // 2 + 1 if in_bits > 1 else 1)
    a = golden.level_conv2d(levels, w, **geometry).to(torch.int64)
    a_neg = golden.level_conv2d(levels, -w, **geometry).to(torch.int64)
    assert torch.equal(a_neg, m * k - a)
    assert torch.equal(fold.weight_sums(-w), -fold.weight_sums(w))
    d = golden.dot_from_accumulator(a, w, in_bits)
    assert torch.equal(golden.dot_from_accumulator(a_neg, -w, in_bits), -d)
    x = F.pad(levels.to(torch.float32), (1,) * 4, value=float(geometry["pad_level"]))
    assert torch.equal(d, torch.round(F.conv2d(x, w)).to(torch.int64))


def test_flip_with_constant_rows_is_neutral():
    """A channel that falls for some r and is constant for others is flipped; one that
    rises for some r and is constant for others is not; constant for every r: not flipped."""
    # pre = ±d + c_r: saturated (constant) for r = 0 and r = 3; channel 2 is 0·d + c_r
    sign = f32([1.0, -1.0, 0.0])
    shift = [-100.0, 0.0, -0.5, 100.0]

    def fn(d, r):
        return (d * sign.reshape(1, -1, 1, 1) + shift[r] >= 0).to(torch.int32)

    folded = fold.fold_levels(fn, k=4, in_bits=2, weight_sums=[0, 2, -4], out_bits=1,
                              shortcut_bits=2)
    assert folded.flip.tolist() == [False, True, False]
    amax = folded.amax + 1
    assert folded.thresholds[:, 0, 0].tolist() == [amax, amax, amax]   # r = 0: never
    assert folded.thresholds[:, 3, 0].tolist() == [0, 0, 0]            # r = 3: always
    assert folded.thresholds[2, 1:3, 0].tolist() == [0, amax]          # constant channel


# --------------------------------------------------------------------------- table reader


def test_thresholds_from_table_direct():
    levels = torch.tensor([
        [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]],         # rising for both r: T = 2, 1
        [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]],         # falls (r=0), constant (r=1): flip
        [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]],         # constant: never / always
        [[0, 1, 2, 3, 3], [3, 3, 3, 3, 3]],         # n-bit
    ])
    t, flip = fold.thresholds_from_table(levels, n_levels=3)
    assert flip.tolist() == [False, True, False, False]
    assert t.tolist() == [[[2, 5, 5], [1, 5, 5]],
                          [[3, 5, 5], [0, 5, 5]],   # reversed: 0 0 0 1 1 → T = 3
                          [[5, 5, 5], [0, 5, 5]],
                          [[1, 2, 3], [0, 0, 0]]]
    # R = 1 is thresholds_from_levels (one implementation)
    two_d = fold.thresholds_from_levels(levels[:, 0], 4, n_levels=3)
    t1, flip1 = fold.thresholds_from_table(levels[:, :1], n_levels=3)
    assert torch.equal(two_d.thresholds, t1[:, 0]) and torch.equal(two_d.flip, flip1)


@HYPOTHESIS
@given(data=st.data())
def test_thresholds_from_table_counts_levels_below(data):
    """T_j = #{A : level < j} on the (reversed, if flipped) table, for random monotone rows."""
    o = data.draw(st.integers(1, 4))
    r = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 12))
    top = data.draw(st.integers(1, 7))
    rows = []
    for _ in range(o):
        direction = data.draw(st.sampled_from([1, -1]))
        channel = []
        for _ in range(r):
            row = sorted(data.draw(st.lists(st.integers(0, top), min_size=n, max_size=n)))
            if len(set(row)) > 1 and direction < 0:
                row = row[::-1]
            channel.append(row)
        rows.append(channel)
    levels = torch.tensor(rows)
    t, flip = fold.thresholds_from_table(levels, n_levels=top)
    table = torch.where(flip[:, None, None], levels.flip(2), levels)
    j = torch.arange(1, top + 1)
    assert torch.equal(t, (table[:, :, None, :] < j[None, None, :, None]).sum(dim=3))
    if r == 1:
        assert torch.equal(fold.thresholds_from_levels(levels[:, 0], n - 1,
                                                       n_levels=top).thresholds, t[:, 0])


# --------------------------------------------------------------------------- refusals


def test_non_monotone_epilogue_is_refused_naming_the_channel():
    def absolute(d, r):                   # |d| ≥ 2: not a threshold function of A
        return (d.abs() >= 2).to(torch.int32)

    with pytest.raises(ValueError, match="output channel 0 is not monotone in the accumulator A"):
        fold.fold_levels(absolute, k=3, in_bits=2, weight_sums=[1, 3], out_bits=1)

    def bump_at_r2(d, r):                 # channel 1 non-monotone only for r = 2
        out = (d >= 0).to(torch.int32)
        if r == 2:
            out[:, 1] = (d[:, 1].abs() <= 1).to(torch.int32)
        return out

    with pytest.raises(ValueError, match="output channel 1 is not monotone in the accumulator A "
                                         "for shortcut level 2"):
        fold.fold_levels(bump_at_r2, k=4, in_bits=1, weight_sums=[0, 0], out_bits=1,
                         shortcut_bits=2)


def test_direction_conflict_across_r_is_refused():
    def conflict(d, r):                   # channel 2 rises for r = 0, falls for r = 1
        out = (d >= 0).to(torch.int32)
        if r == 1:
            out[:, 2] = (d[:, 2] <= 0).to(torch.int32)
        return out

    with pytest.raises(ValueError, match="output channel 2 rises with the accumulator A for "
                                         "shortcut level 0 but falls for shortcut level 1"):
        fold.fold_levels(conflict, k=4, in_bits=3, weight_sums=[0, 2, 0], out_bits=1,
                         shortcut_bits=1)


def test_bad_arguments_are_refused():
    def sign(d, r):
        return (d >= 0).to(torch.int32)

    for kwargs, message in [
        (dict(in_bits=0), "in_bits must be an integer between 1 and 4"),
        (dict(in_bits=5), "in_bits must be an integer between 1 and 4"),
        (dict(out_bits=0), "out_bits must be an integer between 1 and 4"),
        (dict(shortcut_bits=5), "shortcut_bits must be an integer between 0 and 4"),
        (dict(weight_sums=[5]), r"weight_sums\[0\] = 5 is not a sum of K = 4"),
        (dict(weight_sums=[1]), r"weight_sums\[0\] = 1 is not a sum of K = 4"),
        (dict(weight_sums=[0.5]), "weight_sums must be integers"),
        (dict(k=0), "k must be a positive integer"),
    ]:
        args = dict(k=4, in_bits=1, weight_sums=[0], out_bits=1) | kwargs
        with pytest.raises(ValueError, match=message):
            fold.fold_levels(sign, **args)
    with pytest.raises(ValueError, match=r"levels outside \[0, 1\]"):
        fold.fold_levels(lambda d, r: (d >= 0).to(torch.int32) * 2, k=4, in_bits=1,
                         weight_sums=[0], out_bits=1)
    with pytest.raises(ValueError, match="returned shape"):
        fold.fold_levels(lambda d, r: d[0], k=4, in_bits=1, weight_sums=[0], out_bits=1)
    with pytest.raises(ValueError, match="non-integer"):
        fold.fold_levels(lambda d, r: d * 0.5 + 0.25, k=4, in_bits=1, weight_sums=[0],
                         out_bits=4)

    base = dict(mean=f32([0.0, 0.0]), var=f32([1.0, 1.0]), gamma=f32([1.0, 1.0]),
                beta=f32([0.0, 0.0]))
    ep = ResidualEpilogue(**base)
    with pytest.raises(ValueError, match="needs the quantizer step"):
        fold.fold_residual(ep, k=4, in_bits=2, weight_sums=[0, 2], out_bits=2)
    with pytest.raises(ValueError, match="step must be positive"):
        fold.fold_residual(ResidualEpilogue(**base, step=0.0), k=4, in_bits=2,
                           weight_sums=[0, 2], out_bits=2)
    with pytest.raises(ValueError, match="weight_sums has 1 channels but the epilogue has 2"):
        fold.fold_residual(ep, k=4, in_bits=2, weight_sums=[0])
    with pytest.raises(ValueError, match="has a shortcut_gain but the layer has no shortcut"):
        fold.fold_residual(ResidualEpilogue(**base, shortcut_gain=f32([1.0, 1.0])), k=4,
                           in_bits=2, weight_sums=[0, 2])
    with pytest.raises(ValueError, match="pad_level must be a level in"):
        fold.fold_residual_conv(torch.ones(2, 1, 2, 2), ep, in_bits=2, pad_level=4)
    with pytest.raises(ValueError, match="weights have 3 output channels but the epilogue has 2"):
        fold.fold_residual_conv(torch.ones(3, 1, 2, 2), ep)


@pytest.mark.parametrize("name", ["mean", "var", "gamma", "beta", "alpha", "bias", "sign_bias",
                                  "shortcut_gain", "shortcut_scale", "shortcut_zero"])
def test_non_finite_parameters_are_refused_naming_the_channel(name):
    values = dict(mean=f32([0.0, 1.0]), var=f32([1.0, 1.0]), gamma=f32([1.0, 1.0]),
                  beta=f32([0.0, 0.0]), shortcut_gain=f32([1.0, 1.0]))
    values[name] = f32([1.0, float("nan")])
    with pytest.raises(ValueError, match=rf"ResidualEpilogue.{name} is not finite .* output "
                                         r"channel 1"):
        fold.fold_residual(ResidualEpilogue(**values), k=4, in_bits=2, weight_sums=[0, 2],
                           shortcut_bits=1)
    with pytest.raises(ValueError, match="in_scale is not finite"):
        fold.fold_residual(ResidualEpilogue(**dict(values, **{name: f32([1.0, 1.0])}),
                                            in_scale=float("inf")),
                           k=4, in_bits=2, weight_sums=[0, 2], shortcut_bits=1)


def test_zero_variance_without_eps_is_refused():
    ep = ResidualEpilogue(mean=f32([0.0, 0.0]), var=f32([1.0, 0.0]), gamma=f32([1.0, 1.0]),
                          beta=f32([0.0, 0.0]), eps=0.0)
    with pytest.raises(ValueError, match="output channel 1 is not finite"):
        fold.fold_residual(ep, k=4, in_bits=2, weight_sums=[0, 2])


# --------------------------------------------------------------------------- worked example


def worked_example():
    epilogue = ResidualEpilogue(mean=f32([1.0, 3.0, 0.0]), var=f32([1.0, 1.0, 1.0]),
                                gamma=f32([1.0, -1.0, 0.0]), beta=f32([0.0, 0.0, -0.5]),
                                eps=0.0, shortcut_gain=f32([1.0, 1.0, 1.0]))
    w = f32([[1, -1], [1, 1], [-1, -1]]).reshape(3, 2, 1, 1)
    return epilogue, w


def test_worked_example_in_the_docs():
    """docs/numerics.md, "Folding v2", worked example (K = 2, 2-bit input, 1-bit shortcut)."""
    epilogue, w = worked_example()
    sums = fold.weight_sums(w)
    assert sums.tolist() == [0, 2, -2]
    folded = fold.fold_residual(epilogue, k=2, in_bits=2, weight_sums=sums, shortcut_bits=1)
    assert folded.amax == 6
    assert folded.thresholds[:, :, 0].tolist() == [[4, 3], [3, 2], [7, 0]]
    assert folded.flip.tolist() == [False, True, False]
    a = torch.arange(7)[:, None]
    d = a - 3 * (2 - sums[None, :]) // 2
    tables = [fold.residual_output(fold.residual_preactivation(d, r, epilogue, sums), epilogue, 1)
              for r in (0, 1)]
    assert tables[0].T.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [0] * 7]
    assert tables[1].T.tolist() == [[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0], [1] * 7]
    layer = fold.fold_residual_conv(w, epilogue, in_bits=2, shortcut_bits=1)
    assert layer.weights.reshape(3, 2).tolist() == [[1, -1], [-1, -1], [-1, -1]]
    x = torch.tensor([3, 1], dtype=torch.int32).reshape(1, 2, 1, 1)
    r = torch.ones(1, 3, 1, 1, dtype=torch.int32)
    assert golden.level_conv2d(x, w, in_bits=2).reshape(-1).tolist() == [5, 4, 2]
    assert golden.level_conv2d(x, layer.weights, in_bits=2).reshape(-1).tolist() == [5, 2, 2]
    pre = fold.residual_preactivation(torch.tensor([[2, 4, -4]]), 1, epilogue, sums)
    assert pre.tolist() == [[2.0, 0.0, 0.5]]                  # channel 1 is a tie: pre = 0
    assert golden.run_layer(x, layer, r).reshape(-1).tolist() == [1, 1, 1]
    assert torch.equal(golden.run_layer(x, layer, r),
                       float_layer(x, w, epilogue, out_bits=1, shortcut=r))


def test_folded_residual_graph_matches_float_network():
    """A ReActNet-style pair run as a graph: conv1 (1-bit in, 2-bit out), conv2 (2-bit in,
    shortcut = conv1's 2-bit output, 1-bit out, pooled); each folded layer equals the float
    layer fed with the float model's own previous levels."""
    gen = torch.Generator().manual_seed(11)
    o = 6

    def epilogue(**extra):
        return ResidualEpilogue(mean=torch.randn(o, generator=gen) * 4,
                                var=torch.rand(o, generator=gen) + 0.1,
                                gamma=torch.randn(o, generator=gen),
                                beta=torch.randn(o, generator=gen),
                                alpha=torch.rand(o, generator=gen) + 0.1, **extra)

    ep1 = epilogue(in_scale=2.0, in_zero=-1.0, step=0.75)
    ep2 = epilogue(in_scale=0.75, shortcut_gain=torch.randn(o, generator=gen),
                   shortcut_scale=0.75)
    w1, w2 = random_pm1(gen, o, 3, 3, 3), random_pm1(gen, o, o, 3, 3)
    layer1 = fold.fold_residual_conv(w1, ep1, in_bits=1, out_bits=2, padding=1)
    layer2 = fold.fold_residual_conv(w2, ep2, in_bits=2, shortcut_bits=2, padding=1,
                                     pad_level=0, pool=(2, 2))
    x = torch.randint(0, 2, (2, 3, 8, 8), generator=gen, dtype=torch.int32)
    maps = golden.run_graph(x, [golden.GraphNode("conv1", layer1),
                                golden.GraphNode("conv2", layer2, input="conv1",
                                                 shortcut="conv1")])
    level1 = float_layer(x, w1, ep1, out_bits=2, padding=1)
    level2 = float_layer(level1, w2, ep2, out_bits=1, shortcut=level1, padding=1, pool=(2, 2))
    assert torch.equal(maps["conv1"], level1)
    assert torch.equal(maps["conv2"], level2)
    assert 0 < int(level2.sum()) < level2.numel()          # not a constant output
    assert len(set(level1.flatten().tolist())) > 2
