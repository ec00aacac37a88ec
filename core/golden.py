"""Golden model of the accelerator, in the number domain of the hardware (PyTorch).

Numerics (docs/numerics.md): bit 1 is +1 and bit 0 is −1, ``sign(0) = +1``. A binary
dot product over ``K`` elements is ``dot = 2·P − K`` with ``P = popcount(XNOR(a, w))``.
Convolution padding is a *bit* (``pad_value`` −1 or +1) that takes part in ``P`` and ``K``
like any other input. Thresholded outputs are ``P ≥ T`` (n-bit: the number of sorted
thresholds reached); raw outputs are ``P`` itself. Max-pool of bits is their OR.

Every function has a readable reference path (``method="reference"``: unfold, XNOR,
popcount, exactly as the definition reads) and a fast path (``method="fast"``: a ±1
float convolution, exact because every partial sum is an integer below 2**24). The tests
hold the two equal, and both equal to the packed-word XNOR-popcount of
:func:`xnor_popcount` that the hardware implements.

Contract v2 (docs/numerics.md): n-bit input levels (``in_bits`` 1…4, padding a level
``pad_level``) accumulate ``A = Σ_b 2**b · P_b`` over the bit planes (:func:`level_conv2d`);
a residual shortcut map selects each pixel's threshold row from an ``(O, R, L)`` table
(:func:`threshold_shortcut`); :class:`GraphNode` lists (convs, :class:`PoolPass`,
:class:`ChannelRepeat`) run through :func:`run_graph`. Defaults keep every v1 layer as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MAX_LEVEL_BITS",
    "BinaryConvLayer",
    "ChannelRepeat",
    "GraphNode",
    "PoolPass",
    "binary_conv2d",
    "binary_linear",
    "binary_maxpool2d",
    "dot_from_accumulator",
    "dot_from_popcount",
    "fixed_point_conv2d",
    "level_conv2d",
    "popcount_conv2d",
    "popcount_from_dot",
    "repeat_channels",
    "run_graph",
    "run_layer",
    "run_network",
    "threshold",
    "threshold_shortcut",
    "xnor_popcount",
]

_EXACT_FLOAT32 = 1 << 24     # integers up to this magnitude are exact in float32
#: Most bits of an activation level or shortcut level (contract v2: n = 1…4).
MAX_LEVEL_BITS = 4


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_pm1(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of ±1 values, not {type(x).__name__}")
    if x.numel() and not bool(((x == 1) | (x == -1)).all()):
        bad = x[(x != 1) & (x != -1)].flatten()[0].item()
        raise ValueError(f"{name} must hold only +1 and −1, found {bad!r}")


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, not {value!r}")
    return pair


def _conv_args(x, w, stride, padding, pad_value):
    _check_pm1(x, "x")
    _check_pm1(w, "w")
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"x must be N×C×H×W and w O×C×kh×kw, got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but w expects {w.shape[1]}")
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    if min(stride) < 1 or min(padding) < 0:
        raise ValueError(f"stride must be ≥ 1 and padding ≥ 0, not {stride} and {padding}")
    if pad_value not in (-1, 1):
        raise ValueError(f"pad_value must be -1 or +1, not {pad_value!r}")
    ph, pw = padding
    x = F.pad(x, (pw, pw, ph, ph), value=float(pad_value))
    if x.shape[2] < w.shape[2] or x.shape[3] < w.shape[3]:
        raise ValueError(f"kernel {tuple(w.shape[2:])} is larger than the padded input "
                         f"{tuple(x.shape[2:])}")
    return x, w, stride


def binary_conv2d(x: torch.Tensor, w: torch.Tensor, *, stride=1, padding=0, pad_value: int = -1,
                  method: str = "fast") -> torch.Tensor:
    """Binary convolution: integer dot products ``2·P − K`` (int32, N×O×H'×W').

    Parameters
    ----------
    x : torch.Tensor
        ±1 activations, N×C×H×W.
    w : torch.Tensor
        ±1 weights, O×C×kh×kw.
    stride, padding : int or (int, int)
    pad_value : −1 or +1
        The bit that fills the padding (−1, i.e. bit 0, by default).
    method : "fast" or "reference"

    Raises
    ------
    ValueError
        Non-±1 values, mismatched channels, a kernel larger than the padded input.
    """
    x, w, stride = _conv_args(x, w, stride, padding, pad_value)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    if method == "fast":
        dtype = torch.float32 if k < _EXACT_FLOAT32 else torch.float64
        dot = F.conv2d(x.to(dtype), w.to(dtype), stride=stride)
        return torch.round(dot).to(torch.int32)
    if method == "reference":
        return 2 * _popcount_reference(x, w, stride) - k
    raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")


def _popcount_reference(x: torch.Tensor, w: torch.Tensor, stride) -> torch.Tensor:
    """P = popcount(XNOR(a, w)) for every output pixel, straight from the definition."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    a = F.unfold((x > 0).to(torch.float32), (kh, kw), stride=stride) > 0   # N, K, L
    b = (w > 0).reshape(o, -1)                                              # O, K
    xnor = a[:, None, :, :] == b[None, :, :, None]                          # N, O, K, L
    p = xnor.sum(dim=2, dtype=torch.int32)
    return p.reshape(n, o, (h - kh) // stride[0] + 1, (wd - kw) // stride[1] + 1)


def popcount_conv2d(x, w, *, stride=1, padding=0, pad_value: int = -1,
                    method: str = "fast") -> torch.Tensor:
    """``P = popcount(XNOR(a, w))`` per output (int32): what the PEs accumulate."""
    dot = binary_conv2d(x, w, stride=stride, padding=padding, pad_value=pad_value, method=method)
    return popcount_from_dot(dot, w.shape[1] * w.shape[2] * w.shape[3])


def binary_linear(x: torch.Tensor, w: torch.Tensor, *, method: str = "fast") -> torch.Tensor:
    """Binary fully connected layer: ±1 ``N×C`` times ±1 ``O×C`` → int32 dots ``N×O``."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x must be N×C and w O×C, got {tuple(x.shape)} and {tuple(w.shape)}")
    return binary_conv2d(x[:, :, None, None], w[:, :, None, None], method=method)[:, :, 0, 0]


def fixed_point_conv2d(x: torch.Tensor, w: torch.Tensor, *, stride=1, padding=0,
                       pad_value: int = 0) -> torch.Tensor:
    """Integer convolution for the host's fixed-point layers (int64, exact).

    ``x`` and ``w`` hold integers (any integer or integral float dtype); padding is filled
    with ``pad_value``. Computed in float64, exact while every partial sum stays below 2**53
    (asserted from the operands' magnitudes).
    """
    for name, t in (("x", x), ("w", w)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point and t.numel() and not bool((t == torch.round(t)).all()):
            raise ValueError(f"{name} must hold integers")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but w expects {w.shape[1]}")
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    x = F.pad(x.to(torch.float64), (padding[1], padding[1], padding[0], padding[0]),
              value=float(pad_value))
    w = w.to(torch.float64)
    k = w.shape[1] * w.shape[2] * w.shape[3]
    bound = float(x.abs().max()) * float(w.abs().max()) * k if x.numel() and w.numel() else 0.0
    if bound >= 2.0 ** 53:
        raise ValueError("fixed-point operands too large for an exact float64 convolution")
    return torch.round(F.conv2d(x, w, stride=stride)).to(torch.int64)


def _check_levels(levels, bits: int, name: str) -> None:
    """Refuse anything but an integer tensor of levels in ``[0, 2**bits − 1]``."""
    if not isinstance(levels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer levels, "
                        f"not {type(levels).__name__}")
    if levels.dtype.is_floating_point or levels.dtype.is_complex or levels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer levels, not dtype {levels.dtype}")
    top = (1 << bits) - 1
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > top):
        bad = levels[(levels < 0) | (levels > top)].flatten()[0].item()
        raise ValueError(f"{name} must hold {bits}-bit levels in [0, {top}], found {bad}")


def _check_bits(value, name: str, low: int = 1) -> int:
    if not _is_int(value) or not low <= value <= MAX_LEVEL_BITS:
        raise ValueError(f"{name} must be an integer in [{low}, {MAX_LEVEL_BITS}], not {value!r}")
    return int(value)


def level_conv2d(levels: torch.Tensor, w: torch.Tensor, *, in_bits: int, stride=1, padding=0,
                 pad_level: int = 0, method: str = "fast") -> torch.Tensor:
    """Accumulator ``A = Σ_b 2**b · P_b`` of a binary conv over an n-bit level map (int32).

    ``P_b = popcount(XNOR(a_b, w))`` is today's popcount of plane ``b`` (bit ``b`` of every
    level, as a ±1 map) over the ``K = C·kh·kw`` window positions, padding included; the
    padding is the level ``pad_level`` (every plane holds that level's bit). For
    ``in_bits = 1`` this is :func:`popcount_conv2d` of ``2·levels − 1`` with
    ``pad_value = 2·pad_level − 1``. ``0 ≤ A ≤ (2**in_bits − 1)·K``.

    ``method="reference"`` computes each plane's popcount from the definition (unfold,
    XNOR, popcount) and shift-adds; ``method="fast"`` convolves the padded integer levels
    with the ±1 weights (``Σ w·a``, exact in float32 below 2**24) and adds
    ``(2**in_bits − 1)·(K − S_o)/2``, ``S_o`` the sum of channel ``o``'s weights.

    Raises
    ------
    ValueError
        Levels out of range or not integer, non-±1 weights, bad geometry or ``pad_level``.
    """
    in_bits = _check_bits(in_bits, "in_bits")
    _check_levels(levels, in_bits, "levels")
    _check_pm1(w, "w")
    top = (1 << in_bits) - 1
    if not _is_int(pad_level) or not 0 <= pad_level <= top:
        raise ValueError(f"pad_level must be an integer in [0, {top}] for {in_bits}-bit input, "
                         f"not {pad_level!r}")
    if method not in ("fast", "reference"):
        raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")
    if levels.dim() != 4 or w.dim() != 4:
        raise ValueError(f"levels must be N×C×H×W and w O×C×kh×kw, got {tuple(levels.shape)} "
                         f"and {tuple(w.shape)}")
    if levels.shape[1] != w.shape[1]:
        raise ValueError(f"levels have {levels.shape[1]} channels but w expects {w.shape[1]}")
    k = w.shape[1] * w.shape[2] * w.shape[3]
    if method == "reference":
        acc = None
        for b in range(in_bits):
            plane = ((levels.to(torch.int64) >> b) & 1).to(torch.float32) * 2 - 1
            pad_bit = ((pad_level >> b) & 1) * 2 - 1
            x, wb, strides = _conv_args(plane, w, stride, padding, pad_bit)
            p = _popcount_reference(x, wb, strides).to(torch.int64) << b
            acc = p if acc is None else acc + p
        return acc.to(torch.int32)
    stride = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding")
    if min(stride) < 1 or min(ph, pw) < 0:
        raise ValueError(f"stride must be ≥ 1 and padding ≥ 0, not {stride} and {(ph, pw)}")
    dtype = torch.float32 if top * k < _EXACT_FLOAT32 else torch.float64
    x = F.pad(levels.to(dtype), (pw, pw, ph, ph), value=float(pad_level))
    if x.shape[2] < w.shape[2] or x.shape[3] < w.shape[3]:
        raise ValueError(f"kernel {tuple(w.shape[2:])} is larger than the padded input "
                         f"{tuple(x.shape[2:])}")
    dot = torch.round(F.conv2d(x, w.to(dtype), stride=stride)).to(torch.int64)
    negatives = (w < 0).reshape(w.shape[0], -1).sum(dim=1)              # (K − S_o) / 2
    return (dot + top * negatives.reshape(1, -1, 1, 1)).to(torch.int32)


def dot_from_accumulator(a: torch.Tensor, w: torch.Tensor, in_bits: int) -> torch.Tensor:
    """``Σ_k w_k·a_k = A − (2**in_bits − 1)·(K − S_o)/2`` per output channel (dim 1; int64)."""
    top = (1 << _check_bits(in_bits, "in_bits")) - 1
    negatives = (w < 0).reshape(w.shape[0], -1).sum(dim=1).to(torch.int64)
    shape = (1, -1, *([1] * (a.dim() - 2)))
    return a.to(torch.int64) - top * negatives.reshape(shape)


def repeat_channels(levels: torch.Tensor, out_channels: int, *,
                    method: str = "fast") -> torch.Tensor:
    """Channel repetition (ReActNet downsampling shortcut): channel ``c`` of the result is
    channel ``c mod C`` of ``levels`` (N×C×H×W); ``out_channels`` must be a multiple of ``C``.
    """
    if not isinstance(levels, torch.Tensor) or levels.dim() != 4:
        raise ValueError("repeat_channels takes an N×C×H×W tensor of levels")
    channels = levels.shape[1]
    if not _is_int(out_channels) or out_channels < 1 or channels == 0 or out_channels % channels:
        raise ValueError(f"out_channels must be a positive multiple of the input's {channels} "
                         f"channels, not {out_channels!r}")
    if method == "fast":
        return levels.repeat(1, out_channels // channels, 1, 1)
    if method == "reference":
        return levels[:, torch.arange(out_channels) % channels]
    raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")


def popcount_from_dot(dot: torch.Tensor, k: int) -> torch.Tensor:
    """``P = (dot + K) / 2`` (exact: dot and K have the same parity)."""
    return torch.div(dot + k, 2, rounding_mode="floor").to(torch.int32)


def dot_from_popcount(p: torch.Tensor, k: int) -> torch.Tensor:
    """``dot = 2·P − K``."""
    return (2 * p - k).to(torch.int32)


def xnor_popcount(a_words: np.ndarray, w_words: np.ndarray) -> np.ndarray:
    """Popcount of XNOR over packed uint8 words (the last axis), as a PE computes it.

    With the padding convention of :mod:`bitdet.core.packing` (activation padding 0, weight
    padding 1) the padding bits contribute nothing, so no mask is needed.
    """
    a_words = np.asarray(a_words, dtype=np.uint8)
    w_words = np.asarray(w_words, dtype=np.uint8)
    xnor = np.bitwise_not(np.bitwise_xor(a_words, w_words))
    return np.unpackbits(xnor, axis=-1).sum(axis=-1, dtype=np.int64)


def threshold(p: torch.Tensor, thresholds, shortcut: torch.Tensor | None = None, *,
              method: str = "fast") -> torch.Tensor:
    """Threshold unit: ``P ≥ T`` per output channel (dim 1).

    ``thresholds`` is ``(O,)`` for 1-bit outputs or ``(O, L)`` with each row sorted for
    n-bit outputs (``L = 2**n − 1``); the result (int32) counts the thresholds reached.
    With a ``shortcut`` map (integer levels, the shape of ``p``) it is an ``(O, R, L)``
    table and :func:`threshold_shortcut` applies.
    """
    if shortcut is not None:
        return threshold_shortcut(p, thresholds, shortcut, method=method)
    t = torch.as_tensor(thresholds)
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2 or t.shape[0] != p.shape[1]:
        raise ValueError(f"thresholds must be (O,) or (O, L) with O = {p.shape[1]}, "
                         f"got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and bool((t[:, 1:] < t[:, :-1]).any()):
        raise ValueError("each channel's thresholds must be sorted in non-decreasing order")
    t = t.to(torch.int64).reshape(1, t.shape[0], t.shape[1], *([1] * (p.dim() - 2)))
    return (p.to(torch.int64)[:, :, None] >= t).sum(dim=2, dtype=torch.int32)


def threshold_shortcut(a: torch.Tensor, table, shortcut: torch.Tensor, *,
                       method: str = "fast") -> torch.Tensor:
    """Threshold unit with a residual shortcut: ``#{j : A ≥ T[o, r, j]}`` (int32).

    ``table`` is ``(O, R, L)`` with every row ``T[o, r, :]`` sorted; ``shortcut`` holds
    integer levels ``r`` in ``[0, R − 1]`` with the shape of ``a`` (N×O×…): output channel
    ``o`` at a pixel whose shortcut level is ``r`` uses row ``T[o, r]``. ``method="fast"``
    gathers each pixel's row; ``method="reference"`` thresholds with each ``T[:, r]`` and
    keeps the pixels whose level is ``r``.
    """
    t = torch.as_tensor(table)
    if t.dim() != 3 or a.dim() < 2 or t.shape[0] != a.shape[1]:
        raise ValueError(f"a shortcut threshold table must be (O, R, L) with O = "
                         f"{a.shape[1] if a.dim() >= 2 else '?'}, got shape {tuple(t.shape)}")
    rows = t.shape[1]
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"the table's R = {rows} must be 2**shortcut_bits")
    if t.shape[2] > 1 and bool((t[:, :, 1:] < t[:, :, :-1]).any()):
        raise ValueError("each (channel, shortcut level) row of thresholds must be sorted in "
                         "non-decreasing order")
    _check_levels(shortcut, rows.bit_length() - 1 if rows > 1 else 0, "shortcut")
    if tuple(shortcut.shape) != tuple(a.shape):
        raise ValueError(f"shortcut has shape {tuple(shortcut.shape)} but the accumulator has "
                         f"{tuple(a.shape)}")
    t = t.to(torch.int64)
    a64 = a.to(torch.int64)
    if method == "fast":
        channel = torch.arange(t.shape[0]).reshape(1, -1, *([1] * (a.dim() - 2))).expand_as(a)
        rows_here = t[channel, shortcut.to(torch.int64)]                    # N, O, …, L
        return (a64[..., None] >= rows_here).sum(dim=-1, dtype=torch.int32)
    if method == "reference":
        out = torch.zeros(a.shape, dtype=torch.int32)
        for r in range(rows):
            out = torch.where(shortcut == r, threshold(a64, t[:, r]), out)
        return out
    raise ValueError(f"method must be 'fast' or 'reference', not {method!r}")


def binary_maxpool2d(bits: torch.Tensor, kernel, stride=None, padding=0) -> torch.Tensor:
    """Max-pool of thresholded outputs: the OR of 0/1 bits (the max of n-bit levels).

    Padding, if any, is neutral (it never wins the max).
    """
    if bits.dtype.is_floating_point or bits.dim() != 4:
        raise ValueError("binary_maxpool2d takes integer N×C×H×W levels (0/1 bits)")
    if bits.numel() and int(bits.min()) < 0:
        raise ValueError("binary_maxpool2d takes 0/1 bits (or n-bit levels), not ±1 values")
    kernel = _pair(kernel, "kernel")
    stride = kernel if stride is None else _pair(stride, "stride")
    padding = _pair(padding, "padding")
    padded = (bits.shape[2] + 2 * padding[0], bits.shape[3] + 2 * padding[1])
    if kernel[0] > padded[0] or kernel[1] > padded[1]:
        raise ValueError(f"pool window {kernel} is larger than the padded input {padded}")
    pooled = F.max_pool2d(bits.to(torch.float32), kernel, stride, padding)
    return pooled.to(bits.dtype)


@dataclass(frozen=True)
class BinaryConvLayer:
    """One binary layer as the device runs it (after folding).

    Members
    -------
    weights : torch.Tensor
        ±1, O×C×kh×kw (negative-slope channels already negated).
    thresholds : torch.Tensor or None
        int, (O, L) sorted rows (``L = 2**bits − 1``); with a shortcut (``shortcut_bits``
        > 0) a table (O, R, L), ``R = 2**shortcut_bits``, row ``[o, r]`` used where the
        shortcut level is ``r``; ``None`` for a raw layer (outputs the accumulator A).
    stride, padding, pad_value :
        Convolution geometry; ``pad_value`` is −1 or +1 (the padding bit of a 1-bit input).
    pool : (kernel, stride) or None
        Binary max-pool (OR; max of levels) applied to the thresholded output.
    in_bits : int
        Bits per input level, 1…4 (contract v2); 1 is today's binary input.
    pad_level : int or None
        Level of the spatial padding, in ``[0, 2**in_bits − 1]``; ``None`` derives it:
        ``(pad_value + 1) // 2`` for 1-bit input, 0 for n-bit input. For 1-bit input an
        explicit ``pad_level`` must agree with ``pad_value``.
    shortcut_bits : int
        Bits of the residual shortcut map, 0 (no shortcut) or 1…4.
    """

    weights: torch.Tensor
    thresholds: torch.Tensor | None
    stride: int = 1
    padding: int = 0
    pad_value: int = -1
    pool: tuple[int, int] | None = None
    in_bits: int = 1
    pad_level: int | None = None
    shortcut_bits: int = 0

    def __post_init__(self):
        for name, low in (("in_bits", 1), ("shortcut_bits", 0)):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value <= MAX_LEVEL_BITS:
                raise ValueError(f"{name} must be an integer in [{low}, {MAX_LEVEL_BITS}], "
                                 f"not {value!r}")
        top = (1 << self.in_bits) - 1
        if self.pad_level is not None:
            if not _is_int(self.pad_level) or not 0 <= self.pad_level <= top:
                raise ValueError(f"pad_level must be an integer in [0, {top}] for "
                                 f"{self.in_bits}-bit input, not {self.pad_level!r}")
            if self.in_bits == 1 and self.pad_level != (self.pad_value + 1) // 2:
                raise ValueError(f"pad_level {self.pad_level} contradicts pad_value "
                                 f"{self.pad_value} (for 1-bit input level 0/1 is −1/+1)")
        t = self.thresholds
        if t is None:
            if self.shortcut_bits:
                raise ValueError("a raw layer (thresholds None) cannot take a shortcut "
                                 f"(shortcut_bits {self.shortcut_bits})")
            return
        if self.shortcut_bits == 0:
            if t.dim() != 2 or (t.shape[1] + 1) & t.shape[1] or t.shape[1] < 1:
                raise ValueError("thresholds must be (O, 2**n - 1) for n-bit outputs, not shape "
                                 f"{tuple(t.shape)}")
            return
        rows = 1 << self.shortcut_bits
        if (t.dim() != 3 or t.shape[1] != rows or (t.shape[2] + 1) & t.shape[2]
                or t.shape[2] < 1 or t.shape[0] != self.weights.shape[0]):
            raise ValueError(f"thresholds of a layer with a {self.shortcut_bits}-bit shortcut "
                             f"must be (O = {self.weights.shape[0]}, R = {rows}, 2**n - 1), "
                             f"not shape {tuple(t.shape)}")

    @property
    def k(self) -> int:
        """Number of binary products per output, ``C·kh·kw``."""
        _, c, kh, kw = self.weights.shape
        return c * kh * kw

    @property
    def output_bits(self) -> int | None:
        """Bits per output (1 for binary), ``None`` for a raw layer."""
        if self.thresholds is None:
            return None
        return int(self.thresholds.shape[-1] + 1).bit_length() - 1

    @property
    def accumulator_max(self) -> int:
        """Largest accumulator value, ``(2**in_bits − 1)·K`` (``K`` for 1-bit input)."""
        return ((1 << self.in_bits) - 1) * self.k

    @property
    def padding_level(self) -> int:
        """The level that fills the spatial padding (``pad_level`` or derived from it)."""
        if self.pad_level is not None:
            return self.pad_level
        return (self.pad_value + 1) // 2 if self.in_bits == 1 else 0


def run_layer(x: torch.Tensor, layer: BinaryConvLayer, shortcut: torch.Tensor | None = None, *,
              method: str = "fast") -> torch.Tensor:
    """Run one device layer; returns int32 levels (0/1 bits, n-bit levels) or raw A.

    ``x`` is ±1 floats (1-bit input, as before) or an integer level map of at most
    ``layer.in_bits`` bits. ``shortcut`` (integer levels of at most ``layer.shortcut_bits``
    bits, the shape of the conv's output before the layer's pool) is required exactly when
    the layer has a shortcut; it selects the threshold row per pixel and channel.
    """
    if layer.in_bits == 1 and isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
        a = popcount_conv2d(x, layer.weights, stride=layer.stride, padding=layer.padding,
                            pad_value=layer.pad_value, method=method)
    else:
        if isinstance(x, torch.Tensor) and x.dtype.is_floating_point:
            raise ValueError(f"a layer with {layer.in_bits}-bit input takes an integer level "
                             f"map, not a {x.dtype} tensor")
        a = level_conv2d(x, layer.weights, in_bits=layer.in_bits, stride=layer.stride,
                         padding=layer.padding, pad_level=layer.padding_level, method=method)
    return _finish_layer(a, layer, shortcut, method)


@dataclass(frozen=True)
class PoolPass:
    """A max-pool pass over a level map (OR of bits, max of levels), e.g. a downsampling
    shortcut: ``kernel`` and ``stride`` (``None``: the kernel)."""

    kernel: int = 2
    stride: int | None = None


@dataclass(frozen=True)
class ChannelRepeat:
    """Channel repetition: channel ``c`` of the result reads input channel ``c mod C``."""

    out_channels: int


@dataclass(frozen=True)
class GraphNode:
    """A named node of a network graph.

    ``op`` is a :class:`BinaryConvLayer`, a :class:`PoolPass` or a :class:`ChannelRepeat`;
    ``input`` names the map it reads (``"input"``: the network input, otherwise an earlier
    node); ``shortcut`` names the shortcut map of a conv with ``shortcut_bits`` > 0.
    """

    name: str
    op: BinaryConvLayer | PoolPass | ChannelRepeat
    input: str = "input"
    shortcut: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == "input":
            raise ValueError(f"node name must be a non-empty string other than 'input', "
                             f"not {self.name!r}")
        if not isinstance(self.op, (BinaryConvLayer, PoolPass, ChannelRepeat)):
            raise ValueError(f"node {self.name!r}: op must be a BinaryConvLayer, PoolPass or "
                             f"ChannelRepeat, not {type(self.op).__name__}")
        if not isinstance(self.input, str):
            raise ValueError(f"node {self.name!r}: input must be a node name, "
                             f"not {self.input!r}")
        if self.shortcut is not None and not isinstance(self.shortcut, str):
            raise ValueError(f"node {self.name!r}: shortcut must be a node name or None, "
                             f"not {self.shortcut!r}")


def _check_graph(nodes) -> None:
    """Names unique; every source is 'input' or an earlier node (no cycles, no forward or
    missing references); shortcuts exactly where a conv has shortcut_bits > 0."""
    for node in nodes:
        if not isinstance(node, GraphNode):
            raise ValueError(f"graph nodes must be GraphNode, not {type(node).__name__}")
    position = {}
    for i, node in enumerate(nodes):
        if node.name in position:
            raise ValueError(f"node {node.name!r}: the name is used twice")
        position[node.name] = i
    for i, node in enumerate(nodes):
        is_conv = isinstance(node.op, BinaryConvLayer)
        if node.shortcut is not None and not is_conv:
            raise ValueError(f"node {node.name!r}: only a conv takes a shortcut")
        if is_conv and node.op.shortcut_bits and node.shortcut is None:
            raise ValueError(f"node {node.name!r}: the conv has a {node.op.shortcut_bits}-bit "
                             "shortcut but the node names none")
        if is_conv and not node.op.shortcut_bits and node.shortcut is not None:
            raise ValueError(f"node {node.name!r}: shortcut {node.shortcut!r} given but the "
                             "conv has shortcut_bits 0")
        for role, source in (("input", node.input), ("shortcut", node.shortcut)):
            if source is None or source == "input":
                continue
            if source == node.name:
                raise ValueError(f"node {node.name!r}: its {role} is itself (a cycle)")
            if source not in position:
                raise ValueError(f"node {node.name!r}: {role} {source!r} is missing (no such "
                                 "node)")
            if position[source] > i:
                raise ValueError(f"node {node.name!r}: {role} {source!r} is defined after it "
                                 "(a cycle or forward reference; list nodes in order)")


def _map_bits(levels: torch.Tensor) -> int:
    """Bits of an integer network input: the fewest that hold its largest level (≥ 1)."""
    return max(1, int(levels.max()).bit_length()) if levels.numel() else 1


def _graph_input(x, input_bits):
    """The network input as integer levels, and its bit width."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"the network input must be a torch.Tensor, not {type(x).__name__}")
    if x.dtype.is_floating_point:
        _check_pm1(x, "the network input")
        if input_bits not in (None, 1):
            raise ValueError(f"a ±1 network input has 1 bit, not input_bits {input_bits}")
        x, input_bits = (x > 0).to(torch.int32), 1
    else:
        bits = _map_bits(x) if input_bits is None else input_bits
        _check_levels(x, _check_bits(bits, "input_bits"), "the network input")
        input_bits = bits
    if x.dim() != 4:
        raise ValueError(f"the network input must be N×C×H×W, got shape {tuple(x.shape)}")
    return x, input_bits


def run_graph(x: torch.Tensor, nodes, *, input_bits: int | None = None,
              method: str = "fast") -> dict[str, torch.Tensor]:
    """Run a network graph of :class:`GraphNode`; returns every node's map by name.

    ``x`` is ±1 floats (a 1-bit map) or integer levels of ``input_bits`` bits (default:
    the fewest that hold its largest level). Maps carry their bit width: a thresholded
    conv makes ``output_bits``, a raw conv makes the accumulator (readable by no node), a
    pool pass and a channel repetition keep their input's. Every error is a one-line
    :class:`ValueError` naming the node.
    """
    nodes = list(nodes)
    _check_graph(nodes)
    x, input_bits = _graph_input(x, input_bits)
    maps: dict[str, torch.Tensor] = {"input": x}
    bits: dict[str, int | None] = {"input": input_bits}
    for node in nodes:
        source = maps[node.input]
        width = bits[node.input]
        op = node.op
        if width is None:
            raise ValueError(f"node {node.name!r}: input {node.input!r} is a raw accumulator, "
                             "not a level map")
        if isinstance(op, BinaryConvLayer):
            if width > op.in_bits:
                raise ValueError(f"node {node.name!r}: input {node.input!r} has {width}-bit "
                                 f"levels but the conv's in_bits is {op.in_bits}")
            if source.shape[1] != op.weights.shape[1]:
                raise ValueError(f"node {node.name!r}: input {node.input!r} has "
                                 f"{source.shape[1]} channels but the conv expects "
                                 f"{op.weights.shape[1]}")
            shortcut = None
            if node.shortcut is not None:
                shortcut = maps[node.shortcut]
                sbits = bits[node.shortcut]
                if sbits is None or sbits > op.shortcut_bits:
                    made = "a raw accumulator" if sbits is None else f"{sbits}-bit levels"
                    raise ValueError(f"node {node.name!r}: shortcut {node.shortcut!r} has "
                                     f"{made} but the conv's shortcut_bits is "
                                     f"{op.shortcut_bits}")
            try:
                a = level_conv2d(source, op.weights, in_bits=op.in_bits, stride=op.stride,
                                 padding=op.padding, pad_level=op.padding_level, method=method)
                if shortcut is not None and tuple(shortcut.shape) != tuple(a.shape):
                    raise ValueError(f"shortcut {node.shortcut!r} has shape "
                                     f"{tuple(shortcut.shape)} but the conv's output is "
                                     f"{tuple(a.shape)}")
                out = _finish_layer(a, op, shortcut, method)
            except (ValueError, TypeError) as error:
                raise ValueError(f"node {node.name!r}: {error}") from error
            maps[node.name], bits[node.name] = out, op.output_bits
            continue
        try:
            if isinstance(op, PoolPass):
                out = binary_maxpool2d(source, op.kernel, op.stride)
            else:
                out = repeat_channels(source, op.out_channels, method=method)
        except (ValueError, TypeError) as error:
            raise ValueError(f"node {node.name!r}: {error}") from error
        maps[node.name], bits[node.name] = out, width
    del maps["input"]
    return maps


def _finish_layer(a: torch.Tensor, layer: BinaryConvLayer, shortcut, method: str) -> torch.Tensor:
    """Threshold (with the shortcut's rows) and pool an accumulator, as run_layer does."""
    if layer.thresholds is None:
        if layer.pool is not None:
            raise ValueError("a raw (popcount) layer cannot be followed by a binary max-pool")
        if shortcut is not None:
            raise ValueError("a raw layer takes no shortcut")
        return a
    if layer.shortcut_bits:
        if shortcut is None:
            raise ValueError(f"the layer has a {layer.shortcut_bits}-bit shortcut but none "
                             "was given")
        _check_levels(shortcut, layer.shortcut_bits, "shortcut")
        out = threshold_shortcut(a, layer.thresholds, shortcut, method=method)
    elif shortcut is not None:
        raise ValueError("a shortcut was given but the layer has shortcut_bits 0")
    else:
        out = threshold(a, layer.thresholds)
    if layer.pool is not None:
        out = binary_maxpool2d(out, layer.pool[0], layer.pool[1])
    return out


def run_network(x: torch.Tensor, layers, *, method: str = "fast") -> list[torch.Tensor]:
    """Run consecutive device layers; returns every layer's output (the last may be raw).

    Given :class:`GraphNode` instead, runs :func:`run_graph` and returns the nodes' maps
    in node order. In a chain each layer reads the previous one's levels: 1-bit layers
    need a 1-bit input, an ``in_bits``-bit layer at most ``in_bits`` bits; a layer with a
    shortcut needs the graph form.
    """
    layers = list(layers)
    if any(isinstance(layer, GraphNode) for layer in layers):
        outputs = run_graph(x, layers, method=method)
        return [outputs[node.name] for node in layers]
    outputs = []
    for i, layer in enumerate(layers):
        if layer.shortcut_bits:
            raise ValueError(f"layer {i} takes a shortcut: run the network as GraphNodes")
        if i and outputs[-1] is not None:
            prev = layers[i - 1]
            if prev.output_bits is None or prev.output_bits > layer.in_bits:
                made = "raw P" if prev.output_bits is None else f"{prev.output_bits} bits"
                needs = ("binary input" if layer.in_bits == 1
                         else f"input of at most {layer.in_bits} bits")
                raise ValueError(f"layer {i} needs {needs} but layer {i - 1} outputs {made}")
            x = outputs[-1].to(torch.float32) * 2 - 1 if layer.in_bits == 1 else outputs[-1]
        outputs.append(run_layer(x, layer, method=method))
    return outputs
