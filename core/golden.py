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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BinaryConvLayer",
    "binary_conv2d",
    "binary_linear",
    "binary_maxpool2d",
    "dot_from_popcount",
    "fixed_point_conv2d",
    "popcount_conv2d",
    "popcount_from_dot",
    "run_layer",
    "run_network",
    "threshold",
    "xnor_popcount",
]

_EXACT_FLOAT32 = 1 << 24     # integers up to this magnitude are exact in float32


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


def threshold(p: torch.Tensor, thresholds) -> torch.Tensor:
    """Threshold unit: ``P ≥ T`` per output channel (dim 1).

    ``thresholds`` is ``(O,)`` for 1-bit outputs or ``(O, L)`` with each row sorted for
    n-bit outputs (``L = 2**n − 1``); the result (int32) counts the thresholds reached.
    """
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
        int, (O, L) sorted rows (``L = 2**bits − 1``); ``None`` for a raw layer (outputs P).
    stride, padding, pad_value :
        Convolution geometry; ``pad_value`` is −1 or +1.
    pool : (kernel, stride) or None
        Binary max-pool (OR) applied to the thresholded output.
    """

    weights: torch.Tensor
    thresholds: torch.Tensor | None
    stride: int = 1
    padding: int = 0
    pad_value: int = -1
    pool: tuple[int, int] | None = None

    def __post_init__(self):
        t = self.thresholds
        if t is not None and (t.dim() != 2 or (t.shape[1] + 1) & t.shape[1] or t.shape[1] < 1):
            raise ValueError("thresholds must be (O, 2**n - 1) for n-bit outputs, not shape "
                             f"{tuple(t.shape)}")

    @property
    def k(self) -> int:
        """Number of binary products per output, ``C·kh·kw``."""
        _, c, kh, kw = self.weights.shape
        return c * kh * kw

    @property
    def output_bits(self) -> int | None:
        """Bits per output (1 for binary), ``None`` for raw P."""
        if self.thresholds is None:
            return None
        return int(self.thresholds.shape[1] + 1).bit_length() - 1


def run_layer(x: torch.Tensor, layer: BinaryConvLayer, *, method: str = "fast") -> torch.Tensor:
    """Run one device layer on ±1 input; returns int32 levels (0/1 bits) or raw P."""
    p = popcount_conv2d(x, layer.weights, stride=layer.stride, padding=layer.padding,
                        pad_value=layer.pad_value, method=method)
    if layer.thresholds is None:
        if layer.pool is not None:
            raise ValueError("a raw (popcount) layer cannot be followed by a binary max-pool")
        return p
    out = threshold(p, layer.thresholds)
    if layer.pool is not None:
        out = binary_maxpool2d(out, layer.pool[0], layer.pool[1])
    return out


def run_network(x: torch.Tensor, layers, *, method: str = "fast") -> list[torch.Tensor]:
    """Run consecutive device layers; returns every layer's output (the last may be raw)."""
    outputs = []
    for i, layer in enumerate(layers):
        if i and outputs[-1] is not None:
            prev = layers[i - 1]
            if prev.output_bits != 1:
                made = "raw P" if prev.output_bits is None else f"{prev.output_bits} bits"
                raise ValueError(f"layer {i} needs binary input but layer {i - 1} outputs {made}")
            x = outputs[-1].to(torch.float32) * 2 - 1
        outputs.append(run_layer(x, layer, method=method))
    return outputs
