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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .golden import BinaryConvLayer

__all__ = [
    "BatchNormSign",
    "FoldedThresholds",
    "bn_sign_preactivation",
    "fold_batchnorm",
    "fold_binary_conv",
    "fold_elementwise",
    "fold_integer_epilogue",
    "thresholds_from_levels",
    "uniform_quantize",
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

    Raises
    ------
    ValueError
        A channel whose output is not monotone in P (it cannot be a threshold function,
        e.g. NaN statistics or a non-monotone activation), or levels outside range.
    """
    levels = torch.as_tensor(levels).to(torch.int64)
    if levels.dim() != 2 or levels.shape[1] != k + 1:
        raise ValueError(f"levels must be (O, K + 1) = (O, {k + 1}), got {tuple(levels.shape)}")
    if n_levels is None:
        n_levels = max(int(levels.max()) if levels.numel() else 0, 1)
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > n_levels):
        raise ValueError(f"levels must lie in [0, {n_levels}]")
    step = levels[:, 1:] - levels[:, :-1]
    rising = (step >= 0).all(dim=1)
    falling = (step <= 0).all(dim=1)
    bad = ~(rising | falling)
    if bool(bad.any()):
        o = int(torch.nonzero(bad)[0])
        raise ValueError(f"output channel {o} is not monotone in the popcount P, so it cannot "
                         "be folded into thresholds (non-finite BN statistics, or a "
                         "non-monotone activation?)")
    flip = falling & ~rising
    # In the flipped domain P' = K − P the table reads backwards and rises.
    table = torch.where(flip[:, None], levels.flip(1), levels)
    j = torch.arange(1, n_levels + 1)
    # T_j = number of P values whose level is below j = first P with level ≥ j (K+1 if none).
    thresholds = (table[:, None, :] < j[None, :, None]).sum(dim=2)
    return FoldedThresholds(thresholds=thresholds, flip=flip, k=k)


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
