"""Threshold compiler: fold a binary conv's float epilogue into integer thresholds on P.

A binary conv block computes, per output channel ``o`` and in float32,

    z   = α·dot + bias                          (weight scale α, conv bias)
    y   = (z − μ) / sqrt(σ² + ε) · γ + β        (BatchNorm, inference statistics)
    pre = y − b                                 (the next layer's sign bias, RSign)
    out = sign(pre)  with sign(0) = +1          (1-bit)
        or clamp(round(pre / s), 0, 2ⁿ − 1)     (n-bit, uniform quantizer, learned step s)

with ``dot = 2·P − K`` taking only the ``K + 1`` values ``P = 0..K``. Instead of solving
``pre ≥ 0`` for ``P`` in closed form (where float rounding decides ties and a closed form
may land one step off), the compiler *evaluates the float epilogue itself* on every
possible ``P`` and reads the thresholds off the result. That is exact by construction:
the integer layer reproduces the float layer on every input, ties included, as long as
the float model computes its epilogue with the same elementwise function
(:func:`bn_sign_preactivation`) — the model zoo's binary blocks do.

Each rounded float operation is monotone, so every channel's output is a monotone
function of ``P``: non-decreasing channels get thresholds ``T_j = min{P : out ≥ j}``;
non-increasing ones (α·γ < 0) get their weights negated (``P → K − P``) so that the
hardware only ever compares with ``≥``. A constant channel gets ``T = 0`` (always
reached) or ``T = K + 1`` (never).

Contract v2 (n-bit input levels, residual shortcuts) folds the same way over the
accumulator ``A = 0..(2ⁿ − 1)·K`` and every shortcut level ``r``: :func:`fold_levels`
(any epilogue ``fn(d, r)``), :func:`fold_residual` / :func:`fold_residual_conv` (the float
block :class:`ResidualEpilogue`, arithmetic :func:`residual_preactivation`), thresholds read
by :func:`thresholds_from_table` (docs/numerics.md, "Folding v2").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .golden import BinaryConvLayer

__all__ = [
    "BatchNormSign",
    "FoldedLevels",
    "FoldedThresholds",
    "ResidualEpilogue",
    "bn_sign_preactivation",
    "fold_batchnorm",
    "fold_binary_conv",
    "fold_elementwise",
    "fold_integer_epilogue",
    "fold_levels",
    "fold_residual",
    "fold_residual_conv",
    "residual_output",
    "residual_preactivation",
    "thresholds_from_levels",
    "thresholds_from_table",
    "uniform_quantize",
    "weight_sums",
]


@dataclass(frozen=True)
class BatchNormSign:
    """Float parameters of a binary conv's epilogue, one value per output channel.

    Members
    -------
    alpha : weight scale α (XNOR-Net); 1 if the layer has none.
    bias : conv bias; 0 if none.
    mean, var, gamma, beta, eps : BatchNorm inference parameters.
    sign_bias : the next layer's learnable sign shift b (ReActNet RSign); 0 if none.
    """

    mean: torch.Tensor
    var: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float = 1e-5
    alpha: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    sign_bias: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return int(torch.as_tensor(self.mean).numel())

    def channel_params(self) -> dict[str, torch.Tensor]:
        """Every per-channel parameter as a float32 (O,) tensor (defaults filled in)."""
        o = self.channels
        out = {}
        for name, default in (("mean", None), ("var", None), ("gamma", None), ("beta", None),
                              ("alpha", 1.0), ("bias", 0.0), ("sign_bias", 0.0)):
            value = getattr(self, name)
            value = torch.full((o,), default) if value is None else torch.as_tensor(value)
            value = value.detach().to(torch.float32).reshape(-1)
            if value.numel() != o:
                raise ValueError(f"BatchNormSign.{name} has {value.numel()} values, "
                                 f"expected one per output channel ({o})")
            out[name] = value
        for name, value in out.items():
            if not bool(torch.isfinite(value).all()):
                o = int(torch.nonzero(~torch.isfinite(value))[0])
                raise ValueError(f"BatchNormSign.{name} is not finite (NaN or inf) at output "
                                 f"channel {o}")
        if bool((out["var"] < 0).any()):
            raise ValueError("BatchNormSign.var must be non-negative")
        return out


def bn_sign_preactivation(dot: torch.Tensor, params: BatchNormSign) -> torch.Tensor:
    """The float epilogue before the sign/quantizer, for dots of shape ``(N, O, ...)``.

    This is *the* definition of the float block's arithmetic (float32, this operation
    order): the model zoo calls it in its forward pass and the compiler folds it.
    """
    p = params.channel_params()
    shape = (1, -1) + (1,) * (dot.dim() - 2)
    z = dot.to(torch.float32) * p["alpha"].reshape(shape) + p["bias"].reshape(shape)
    inv_std = torch.rsqrt(p["var"] + torch.tensor(params.eps, dtype=torch.float32))
    y = (z - p["mean"].reshape(shape)) * inv_std.reshape(shape) * p["gamma"].reshape(shape)
    return y + p["beta"].reshape(shape) - p["sign_bias"].reshape(shape)


def uniform_quantize(pre: torch.Tensor, step, bits: int) -> torch.Tensor:
    """n-bit uniform quantizer with a learned interval: ``clamp(round(pre/s), 0, 2ⁿ−1)``.

    ``step`` is a scalar or one value per channel (dim 1). Returns int32 levels.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, not {bits!r}")
    s = torch.as_tensor(step, dtype=torch.float32).reshape(-1)
    if bool((s <= 0).any()) or not bool(torch.isfinite(s).all()):
        raise ValueError("the quantizer step must be positive and finite")
    if s.numel() > 1:
        s = s.reshape((1, -1) + (1,) * (pre.dim() - 2))
    return torch.clamp(torch.round(pre / s), 0, (1 << bits) - 1).to(torch.int32)


@dataclass(frozen=True)
class FoldedThresholds:
    """Result of folding: integer thresholds on P and the channels to negate.

    Members
    -------
    thresholds : torch.Tensor
        int64, (O, L), rows sorted, each value in ``[0, K + 1]``.
    flip : torch.Tensor
        bool, (O,): negate this channel's weights (its output falls as P rises).
    k : int
    """

    thresholds: torch.Tensor
    flip: torch.Tensor
    k: int


def thresholds_from_levels(levels: torch.Tensor, k: int, *, n_levels: int | None = None,
                           ) -> FoldedThresholds:
    """Thresholds from a table ``levels[o, P]`` of a channel's output for ``P = 0..K``.

    The ``R = 1`` case of :func:`thresholds_from_table` (one implementation).

    Raises
    ------
    ValueError
        A channel whose output is not monotone in P (it cannot be a threshold function,
        e.g. NaN statistics or a non-monotone activation), or levels outside range.
    """
    levels = torch.as_tensor(levels).to(torch.int64)
    if levels.dim() != 2 or levels.shape[1] != k + 1:
        raise ValueError(f"levels must be (O, K + 1) = (O, {k + 1}), got {tuple(levels.shape)}")
    thresholds, flip = _read_table(levels[:, None, :], n_levels, "the popcount P")
    return FoldedThresholds(thresholds=thresholds[:, 0], flip=flip, k=k)


def thresholds_from_table(levels: torch.Tensor, *, n_levels: int | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds from a table ``levels[o, r, A]`` of a channel's output level for every
    shortcut level ``r = 0..R−1`` and every accumulator value ``A = 0..Amax``.

    Returns ``(thresholds, flip)``: int64 ``(O, R, L)`` thresholds (rows sorted, values in
    ``[0, Amax + 1]``, ``L = n_levels``, by default the table's largest level, at least 1)
    and bool ``(O,)`` flips. A channel is flipped when its level falls as A rises (for every
    ``r`` where it is not constant; rows constant in A are neutral); a flipped channel's table
    is read reversed, ``A' = Amax − A``. ``T[o, r, j − 1]`` is the first (reversed) A whose
    level is ``≥ j``, ``Amax + 1`` if none.

    Raises
    ------
    ValueError
        A channel that is not monotone in A for some ``r``, or that rises for one ``r``
        and falls for another (both named with the channel), or levels outside range.
    """
    levels = torch.as_tensor(levels)
    if levels.dim() != 3 or levels.shape[2] < 1:
        raise ValueError(f"levels must be (O, R, Amax + 1), got {tuple(levels.shape)}")
    return _read_table(levels.to(torch.int64), n_levels, "the accumulator A")


def _read_table(levels: torch.Tensor, n_levels: int | None, variable: str,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`thresholds_from_table` on an int64 ``(O, R, N)`` table; ``variable`` names the
    table's axis in error messages."""
    if n_levels is None:
        n_levels = max(int(levels.max()) if levels.numel() else 0, 1)
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > n_levels):
        raise ValueError(f"levels must lie in [0, {n_levels}]")
    shortcut = levels.shape[1] > 1
    step = levels[:, :, 1:] - levels[:, :, :-1]
    rising = (step >= 0).all(dim=2)                                   # (O, R)
    falling = (step <= 0).all(dim=2)
    bad = ~(rising | falling)
    if bool(bad.any()):
        o, r = (int(i) for i in torch.nonzero(bad)[0])
        where = f" for shortcut level {r}" if shortcut else ""
        raise ValueError(f"output channel {o} is not monotone in {variable}{where}, so it "
                         "cannot be folded into thresholds (non-finite BN statistics, or a "
                         "non-monotone activation?)")
    up = rising & ~falling                   # strictly rises somewhere (constant rows: neither)
    down = falling & ~rising
    conflict = up.any(dim=1) & down.any(dim=1)
    if bool(conflict.any()):
        o = int(torch.nonzero(conflict)[0])
        r_up = int(torch.nonzero(up[o])[0])
        r_down = int(torch.nonzero(down[o])[0])
        raise ValueError(f"output channel {o} rises with {variable} for shortcut level {r_up} "
                         f"but falls for shortcut level {r_down}: a channel is flipped as a "
                         "whole, so it cannot be folded into thresholds")
    flip = down.any(dim=1)
    # In the flipped domain A' = Amax − A the table reads backwards and rises.
    table = torch.where(flip[:, None, None], levels.flip(2), levels)
    o, r, n = table.shape
    j = torch.arange(1, n_levels + 1, dtype=torch.int64).expand(o * r, n_levels).contiguous()
    # T_j = first A with level ≥ j (Amax + 1 if none) = number of A whose level is below j.
    thresholds = torch.searchsorted(table.reshape(o * r, n).contiguous(), j, side="left")
    return thresholds.reshape(o, r, n_levels).to(torch.int64), flip


def fold_elementwise(fn: Callable[[torch.Tensor], torch.Tensor], *, k: int, channels: int,
                     n_levels: int = 1) -> FoldedThresholds:
    """Fold any per-channel monotone epilogue ``fn`` (float dots → integer levels).

    ``fn`` receives the float dots ``2·P − K`` for every ``P = 0..K`` laid out as a
    ``1 × O × (K+1) × 1`` tensor (channel on dim 1, like a feature map) and must return
    integer levels of the same shape (0/1 for a sign).
    """
    if k < 1 or channels < 1:
        raise ValueError(f"k and channels must be positive, not {k!r} and {channels!r}")
    p = torch.arange(k + 1, dtype=torch.float32)
    return thresholds_from_levels(_epilogue_table(fn, 2 * p - k, channels), k,
                                  n_levels=n_levels)


def _epilogue_table(fn, values: torch.Tensor, channels: int) -> torch.Tensor:
    """``fn`` evaluated on every value for every channel: levels ``(O, len(values))``."""
    grid = values.reshape(1, 1, -1, 1).expand(1, channels, values.numel(), 1).contiguous()
    levels = torch.as_tensor(fn(grid))
    if levels.dtype.is_floating_point and not bool(torch.isfinite(levels).all()):
        raise ValueError("the epilogue produced non-finite (NaN or inf) outputs")
    if tuple(levels.shape) != tuple(grid.shape):
        raise ValueError(f"the epilogue returned shape {tuple(levels.shape)}, "
                         f"expected {tuple(grid.shape)}")
    return levels[0, :, :, 0]


def fold_batchnorm(params: BatchNormSign, k: int, *, bits: int = 1,
                   step=None) -> FoldedThresholds:
    """Fold α, bias, BatchNorm and the sign bias (and an n-bit quantizer) into thresholds.

    ``bits = 1`` folds ``sign(pre)``; ``bits = n > 1`` folds ``uniform_quantize(pre, step, n)``.
    """
    def preactivation(dot):
        pre = bn_sign_preactivation(dot, params)
        if not bool(torch.isfinite(pre).all()):
            o = int(torch.nonzero(~torch.isfinite(pre))[0][1])
            raise ValueError(f"the epilogue of output channel {o} is not finite (NaN or inf): "
                             "check its BatchNorm statistics (var + eps must be > 0)")
        return pre

    if bits == 1:
        def epilogue(dot):
            return (preactivation(dot) >= 0).to(torch.int32)
    else:
        if step is None:
            raise ValueError(f"an {bits}-bit output needs the quantizer step")

        def epilogue(dot):
            return uniform_quantize(preactivation(dot), step, bits)
    return fold_elementwise(epilogue, k=k, channels=params.channels, n_levels=(1 << bits) - 1)


def fold_binary_conv(weights: torch.Tensor, params: BatchNormSign, *, stride: int = 1,
                     padding: int = 0, pad_value: int = -1, pool: tuple[int, int] | None = None,
                     bits: int = 1, step=None) -> BinaryConvLayer:
    """Fold a float binary conv block into the device layer the accelerator runs."""
    if weights.dim() != 4:
        raise ValueError(f"weights must be O×C×kh×kw, got shape {tuple(weights.shape)}")
    if weights.shape[0] != params.channels:
        raise ValueError(f"weights have {weights.shape[0]} output channels but the epilogue "
                         f"has {params.channels}")
    signs = torch.where(weights >= 0, 1.0, -1.0)
    _, c, kh, kw = weights.shape
    folded = fold_batchnorm(params, c * kh * kw, bits=bits, step=step)
    signs = torch.where(folded.flip[:, None, None, None], -signs, signs)
    return BinaryConvLayer(weights=signs, thresholds=folded.thresholds, stride=stride,
                           padding=padding, pad_value=pad_value, pool=pool)


def fold_integer_epilogue(fn: Callable[[torch.Tensor], torch.Tensor], *, lo: int, hi: int,
                          channels: int, n_levels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an epilogue of an integer accumulator ``acc ∈ [lo, hi]`` (host fixed-point layers).

    Like :func:`fold_elementwise` but over any integer range: ``fn`` gets the float values
    ``lo..hi`` as a ``1 × O × (hi − lo + 1) × 1`` tensor. Returns ``(thresholds, sign)``:
    int64 ``(O, n_levels)`` thresholds and int64 ``(O,)`` signs (±1) such that the level is
    the number of thresholds with ``sign · acc ≥ T``, exactly as ``fn`` computes it for
    every ``acc`` in range. Ranges up to a few million values are practical.
    """
    if hi < lo:
        raise ValueError(f"empty accumulator range [{lo}, {hi}]")
    span = hi - lo
    if span >= 1 << 24:
        raise ValueError(f"accumulator range [{lo}, {hi}] too wide to enumerate exactly")
    acc = torch.arange(lo, hi + 1, dtype=torch.float64).to(torch.float32)
    # Index i of the table is acc = lo + i: thresholds_from_levels works on "P" = i.
    folded = thresholds_from_levels(_epilogue_table(fn, acc, channels), span, n_levels=n_levels)
    flip = folded.flip
    # Rising: level ≥ j ⇔ i ≥ T ⇔ acc ≥ lo + T.  Falling (flip): the table was reversed,
    # i' = span − i = hi − acc, so level ≥ j ⇔ hi − acc ≥ T ⇔ −acc ≥ T − hi.
    thresholds = torch.where(flip[:, None], folded.thresholds - hi, folded.thresholds + lo)
    sign = torch.where(flip, -1, 1).to(torch.int64)
    return thresholds, sign


# --------------------------------------------------------------------------- contract v2
#
# n-bit inputs (levels a ∈ 0..M, M = 2ⁿ − 1, the accumulator A = Σ_b 2^b·P_b over the bit
# planes) and residual shortcuts (a shortcut level r per output pixel, thresholds (O, R, L)).
# See docs/numerics.md, "Folding v2".

_MAX_BITS = 4           # contract v2: inputs, outputs and shortcuts have 1..4 bits


@dataclass(frozen=True)
class FoldedLevels:
    """Result of :func:`fold_levels`: thresholds on the accumulator A and the flips.

    Members
    -------
    thresholds : torch.Tensor
        int64, ``(O, L)`` without a shortcut (``shortcut_bits = 0``), ``(O, R, L)`` with one
        (``R = 2**shortcut_bits``); rows sorted, values in ``[0, Amax + 1]``.
    flip : torch.Tensor
        bool, ``(O,)``: negate this channel's weights (its level falls as A rises).
    k, in_bits, shortcut_bits : int
    """

    thresholds: torch.Tensor
    flip: torch.Tensor
    k: int
    in_bits: int
    shortcut_bits: int = 0

    @property
    def amax(self) -> int:
        """The largest accumulator value, ``(2**in_bits − 1)·K``."""
        return ((1 << self.in_bits) - 1) * self.k


def _check_bits(value, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= _MAX_BITS:
        raise ValueError(f"{name} must be an integer between {lo} and {_MAX_BITS}, "
                         f"not {value!r}")
    return value


def _check_weight_sums(weight_sums, k: int) -> torch.Tensor:
    s = torch.as_tensor(weight_sums)
    if s.dtype.is_floating_point:
        if s.numel() and not bool((s == torch.round(s)).all()):
            raise ValueError("weight_sums must be integers (the sums of ±1 weights)")
    s = s.to(torch.int64).reshape(-1)
    if s.numel() < 1:
        raise ValueError("weight_sums needs one value per output channel, got none")
    bad = (s.abs() > k) | ((k - s) % 2 != 0)
    if bool(bad.any()):
        o = int(torch.nonzero(bad)[0])
        raise ValueError(f"weight_sums[{o}] = {int(s[o])} is not a sum of K = {k} ±1 weights "
                         f"(|S| ≤ K and S ≡ K mod 2)")
    return s


def weight_sums(weights: torch.Tensor) -> torch.Tensor:
    """``S_o = Σ_k w_{o,k}`` of the ±1 weights (``weights ≥ 0`` is +1), int64 ``(O,)``."""
    signs = torch.where(weights >= 0, 1, -1).to(torch.int64)
    return signs.reshape(signs.shape[0], -1).sum(dim=1)


def _dot_from_accumulator(a: torch.Tensor, k: int, in_bits: int, weight_sums) -> torch.Tensor:
    """``d = Σ_k w_k·a_k = A − (2ⁿ − 1)(K − S_o)/2`` per output channel (dim 1), int64 exact."""
    s = _check_weight_sums(weight_sums, k)
    m = (1 << in_bits) - 1
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return a.to(torch.int64) - (m * (k - s) // 2).reshape(shape)


def fold_levels(fn: Callable[[torch.Tensor, int | None], torch.Tensor], *, k: int,
                in_bits: int, weight_sums, out_bits: int, shortcut_bits: int = 0,
                ) -> FoldedLevels:
    """Fold any per-channel epilogue ``fn(d, r)`` of an n-bit-input binary layer.

    ``fn`` receives the integer dots ``d = Σ_k w_k·a_k`` (as float32) for every accumulator
    value ``A = 0..Amax`` (``Amax = (2ⁿ − 1)·K``, ``d = A − (2ⁿ − 1)(K − S_o)/2`` with
    ``S_o = weight_sums[o]``, the sum of channel o's ±1 weights) laid out as a
    ``1 × O × (Amax+1) × 1`` tensor, and the shortcut level ``r`` (an int ``0..R−1``, or
    ``None`` when ``shortcut_bits = 0``); it returns integer levels ``0..2**out_bits − 1`` of
    the same shape. It is called once per ``r``.

    The thresholds are read off the table by :func:`thresholds_from_table`. A flipped
    channel's weights are to be negated: then ``S_o → −S_o`` and ``A → Amax − A``, and the
    thresholds apply to that reflected A (``d`` itself changes sign), so the folded layer —
    negated weights, ``level = #{j : A ≥ T[o, (r,) j]}`` — gives ``fn``'s level for every input.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")
    _check_bits(in_bits, "in_bits", 1)
    _check_bits(out_bits, "out_bits", 1)
    _check_bits(shortcut_bits, "shortcut_bits", 0)
    s = _check_weight_sums(weight_sums, k)
    channels = s.numel()
    m = (1 << in_bits) - 1
    amax = m * k
    if amax >= 1 << 24:
        raise ValueError(f"Amax = {amax} is too large to enumerate exactly in float32")
    a = torch.arange(amax + 1, dtype=torch.int64)
    d = _dot_from_accumulator(a[None, None, :, None].expand(1, channels, amax + 1, 1), k,
                             in_bits, s)
    grid = d.to(torch.float32)                      # exact: |d| ≤ Amax < 2**24
    n_levels = (1 << out_bits) - 1
    shortcut_levels = [None] if shortcut_bits == 0 else list(range(1 << shortcut_bits))
    tables = []
    for r in shortcut_levels:
        levels = torch.as_tensor(fn(grid.clone(), r))
        where = "" if r is None else f" for shortcut level {r}"
        if tuple(levels.shape) != tuple(grid.shape):
            raise ValueError(f"the epilogue returned shape {tuple(levels.shape)}{where}, "
                             f"expected {tuple(grid.shape)}")
        if levels.dtype.is_floating_point and not bool((levels == torch.round(levels)).all()):
            raise ValueError(f"the epilogue returned non-integer (or non-finite) levels{where}")
        levels = levels[0, :, :, 0].to(torch.int64)
        if int(levels.min()) < 0 or int(levels.max()) > n_levels:
            raise ValueError(f"the epilogue returned levels outside [0, {n_levels}]{where} "
                             f"(out_bits = {out_bits})")
        tables.append(levels)
    thresholds, flip = thresholds_from_table(torch.stack(tables, dim=1), n_levels=n_levels)
    if shortcut_bits == 0:
        thresholds = thresholds[:, 0]
    return FoldedLevels(thresholds=thresholds, flip=flip, k=k, in_bits=in_bits,
                        shortcut_bits=shortcut_bits)


@dataclass(frozen=True)
class ResidualEpilogue(BatchNormSign):
    """Float parameters of a v2 binary conv block (n-bit input, optional shortcut): the
    fields of :class:`BatchNormSign` and the ones below.

    Per output channel (``(O,)`` tensors, or ``None`` for the default):

    * ``alpha`` (1), ``bias`` (0): weight scale and conv bias;
    * ``mean``, ``var``, ``gamma``, ``beta``, ``eps``: BatchNorm inference parameters;
    * ``shortcut_gain`` (1): the shortcut's per-channel gain β_r;
      ``shortcut_scale`` (1), ``shortcut_zero`` (0): the shortcut level r decodes to
      ``v(r) = r·s_r + z_r`` (a scalar or one per channel);
    * ``sign_bias`` (0): the next layer's sign shift b;
    * ``step``: the n-bit output quantizer's step (a scalar or one per channel).

    Per layer (scalars): ``in_scale`` s_in (1) and ``in_zero`` z_in (0) — the float conv sees
    the input level a as ``x = a·s_in + z_in`` (for 1-bit maps, s_in = 2 and z_in = −1 give
    the ±1 values of contract v1).
    """

    in_scale: float = 1.0
    in_zero: float = 0.0
    shortcut_gain: torch.Tensor | None = None
    shortcut_scale: torch.Tensor | float = 1.0
    shortcut_zero: torch.Tensor | float = 0.0
    step: torch.Tensor | float | None = None

    _PER_CHANNEL = (("mean", None), ("var", None), ("gamma", None), ("beta", None),
                    ("alpha", 1.0), ("bias", 0.0), ("shortcut_gain", 1.0),
                    ("shortcut_scale", None), ("shortcut_zero", None), ("sign_bias", 0.0))

    @property
    def channels(self) -> int:
        return int(torch.as_tensor(self.mean).numel())

    def channel_params(self) -> dict[str, torch.Tensor]:
        """Every parameter as float32: ``(O,)`` per channel (scalars and defaults broadcast),
        ``in_scale``, ``in_zero`` and ``eps`` as 0-d tensors."""
        o = self.channels
        out = {}
        for name, default in self._PER_CHANNEL:
            value = getattr(self, name)
            value = torch.full((o,), default) if value is None else torch.as_tensor(value)
            value = value.detach().to(torch.float32).reshape(-1)
            if name in ("shortcut_scale", "shortcut_zero") and value.numel() == 1:
                value = value.expand(o)
            if value.numel() != o:
                raise ValueError(f"ResidualEpilogue.{name} has {value.numel()} values, "
                                 f"expected one per output channel ({o})")
            out[name] = value.contiguous()
        for name in ("in_scale", "in_zero", "eps"):
            value = torch.as_tensor(getattr(self, name)).detach().to(torch.float32)
            if value.numel() != 1:
                raise ValueError(f"ResidualEpilogue.{name} must be a scalar (one per layer)")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"ResidualEpilogue.{name} is not finite (NaN or inf)")
            out[name] = value.reshape(())
        for name, value in out.items():
            if value.dim() and not bool(torch.isfinite(value).all()):
                c = int(torch.nonzero(~torch.isfinite(value))[0])
                raise ValueError(f"ResidualEpilogue.{name} is not finite (NaN or inf) at "
                                 f"output channel {c}")
        if bool((out["var"] < 0).any()):
            raise ValueError("ResidualEpilogue.var must be non-negative")
        return out


def residual_preactivation(d: torch.Tensor, r, epilogue: ResidualEpilogue,
                           weight_sums) -> torch.Tensor:
    """The v2 float epilogue before the sign/quantizer, for dots ``d`` of shape ``(N, O, ...)``.

    ``d = Σ_k w_k·a_k`` is the integer dot of the ±1 weights with the input *levels*;
    ``weight_sums`` are the ``S_o = Σ_k w_{o,k}``; ``r`` is the shortcut level (an int, or
    a tensor of levels shaped like ``d``; ``None``: no shortcut). In float32, in this order::

        x   = d·s_in + S·z_in              the conv of the dequantized input a·s_in + z_in
        z   = x·α + bias
        y   = (z − μ) · rsqrt(σ² + ε) · γ
        pre = y + β + β_r·(r·s_r + z_r) − b   (left to right; no shortcut term if r is None)

    This is *the* definition of the float block's arithmetic that :func:`fold_residual`
    folds; a float model must compute its epilogue with it to be reproduced exactly.
    """
    p = epilogue.channel_params()
    shape = (1, -1) + (1,) * (d.dim() - 2)

    def c(name):
        return p[name].reshape(shape)

    s = torch.as_tensor(weight_sums).to(torch.float32).reshape(shape)
    x = d.to(torch.float32) * p["in_scale"] + s * p["in_zero"]
    z = x * c("alpha") + c("bias")
    inv_std = torch.rsqrt(p["var"] + p["eps"]).reshape(shape)
    y = (z - c("mean")) * inv_std * c("gamma")
    pre = y + c("beta")
    if r is not None:
        v = torch.as_tensor(r).to(torch.float32) * c("shortcut_scale") + c("shortcut_zero")
        pre = pre + c("shortcut_gain") * v
    return pre - c("sign_bias")


def residual_output(pre: torch.Tensor, epilogue: ResidualEpilogue, out_bits: int,
                    ) -> torch.Tensor:
    """The output quantizer: ``pre ≥ 0`` for 1 bit, :func:`uniform_quantize` for n bits."""
    if out_bits == 1:
        return (pre >= 0).to(torch.int32)
    if epilogue.step is None:
        raise ValueError(f"an {out_bits}-bit output needs the quantizer step (epilogue.step)")
    return uniform_quantize(pre, epilogue.step, out_bits)


def fold_residual(epilogue: ResidualEpilogue, *, k: int, in_bits: int, weight_sums,
                  out_bits: int = 1, shortcut_bits: int = 0) -> FoldedLevels:
    """Fold a :class:`ResidualEpilogue` (:func:`residual_preactivation`, then the sign or
    the quantizer) into thresholds on A, by :func:`fold_levels`."""
    if shortcut_bits == 0 and epilogue.shortcut_gain is not None:
        raise ValueError("the epilogue has a shortcut_gain but the layer has no shortcut "
                         "(shortcut_bits = 0)")
    s = _check_weight_sums(weight_sums, k)
    if s.numel() != epilogue.channels:
        raise ValueError(f"weight_sums has {s.numel()} channels but the epilogue has "
                         f"{epilogue.channels}")
    _check_bits(out_bits, "out_bits", 1)
    if out_bits > 1:          # check the step once, before the table is built
        residual_output(torch.zeros(1, epilogue.channels), epilogue, out_bits)

    def fn(d, r):
        pre = residual_preactivation(d, r, epilogue, s)
        if not bool(torch.isfinite(pre).all()):
            o = int(torch.nonzero(~torch.isfinite(pre))[0][1])
            raise ValueError(f"the epilogue of output channel {o} is not finite (NaN or inf): "
                             "check its BatchNorm statistics (var + eps must be > 0)")
        return residual_output(pre, epilogue, out_bits)

    return fold_levels(fn, k=k, in_bits=in_bits, weight_sums=s, out_bits=out_bits,
                       shortcut_bits=shortcut_bits)


def fold_residual_conv(weights: torch.Tensor, epilogue: ResidualEpilogue, *, in_bits: int = 1,
                       shortcut_bits: int = 0, out_bits: int = 1, stride: int = 1,
                       padding: int = 0, pad_level: int = 0,
                       pool: tuple[int, int] | None = None) -> BinaryConvLayer:
    """Fold a v2 float binary conv block (n-bit input levels, optional shortcut) into the
    device layer: ±1 weights (flipped channels negated), thresholds ``(O, L)`` or
    ``(O, R, L)`` on the accumulator A."""
    if weights.dim() != 4:
        raise ValueError(f"weights must be O×C×kh×kw, got shape {tuple(weights.shape)}")
    if weights.shape[0] != epilogue.channels:
        raise ValueError(f"weights have {weights.shape[0]} output channels but the epilogue "
                         f"has {epilogue.channels}")
    _check_bits(in_bits, "in_bits", 1)
    if isinstance(pad_level, bool) or not isinstance(pad_level, int) \
            or not 0 <= pad_level < 1 << in_bits:
        raise ValueError(f"pad_level must be a level in [0, {(1 << in_bits) - 1}], "
                         f"not {pad_level!r}")
    signs = torch.where(weights >= 0, 1.0, -1.0)
    _, c, kh, kw = weights.shape
    folded = fold_residual(epilogue, k=c * kh * kw, in_bits=in_bits,
                           weight_sums=weight_sums(signs), out_bits=out_bits,
                           shortcut_bits=shortcut_bits)
    signs = torch.where(folded.flip[:, None, None, None], -signs, signs)
    return _v2_layer(signs, folded.thresholds, in_bits=in_bits, shortcut_bits=shortcut_bits,
                     stride=stride, padding=padding, pad_level=pad_level, pool=pool)


def _v2_layer(weights, thresholds, *, in_bits, shortcut_bits, stride, padding, pad_level,
              pool) -> BinaryConvLayer:
    """The device layer with contract v2's fields (for 1-bit input ``pad_value`` agrees)."""
    pad_value = 2 * pad_level - 1 if in_bits == 1 else -1
    return BinaryConvLayer(weights=weights, thresholds=thresholds, stride=stride,
                           padding=padding, pad_value=pad_value, pool=pool, in_bits=in_bits,
                           pad_level=pad_level, shortcut_bits=shortcut_bits)
