"""Model zoo: 1-bit detector building blocks whose eval-mode arithmetic the device reproduces.

Every block computes, in eval mode, exactly what its exported form computes on the host
(fixed point) or on the accelerator (XNOR-popcount + thresholds):

* :class:`BinaryBlock` — ``sign(BN(α·conv(sign x, sign W)) − b)`` with ±1 padding bits and
  an optional max-pool; its epilogue is :func:`bitdet.core.fold.bn_sign_preactivation`, so
  :meth:`BinaryBlock.export` (the threshold compiler) is exact by construction.
* :class:`QuantStem` — the first layer on the real-valued image: int8 weights (per-channel
  scale, straight-through rounding) on raw pixel values 0..255, so the accumulator is an
  exact integer; BN + sign fold into integer thresholds on it (IFQ-Net style).
* :class:`QuantHead` — the real-valued head: a 1×1 conv with int8 weights and an integer
  bias on the ±1 features, times a per-channel scale.

:class:`BinaryDetector` chains them into a Tinier-YOLO-style single-stage detector and
exports a deployment :class:`~bitdet.core.bundle.Bundle`.

Opt-in trainer options (all off by default; docs/methods.md, "Trainer options"):
:class:`SharedHeadBlock` (AQD multi-level BN, ``levels``), :class:`LSQQuantizer` (AQD / LSQ
learned-step n-bit host weights, ``host_bits``), :class:`MetaQuantizer` (QuantNet,
``binarizer="quantnet"``), DupNet's ``dup`` / ``dup_input`` and IFQ-Net's power-of-two host
scales (``ifq``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bitdet.core.bundle import Bundle, HostLayer
from bitdet.core.fold import (
    BatchNormSign,
    bn_sign_preactivation,
    fold_binary_conv,
    fold_integer_epilogue,
)
from bitdet.core.golden import BinaryConvLayer

__all__ = [
    "BINARIZERS",
    "BinaryBlock",
    "BinaryConv2d",
    "BinaryDetector",
    "LSQQuantizer",
    "MetaQuantizer",
    "QuantHead",
    "QuantStem",
    "RealDetector",
    "SharedHeadBlock",
    "binarize",
]

PIXEL_MAX = 255
#: Weight binarizers of the binary convolutions: ``ste`` (sign of latent weights, clipped
#: straight-through gradient; the default) and ``quantnet`` (QuantNet's differentiable
#: meta-quantizer, no STE; docs/methods.md).
BINARIZERS = ("ste", "quantnet")
#: QuantNet's annealed sharpness β of ``tanh(β·m)``: from the first to the second value,
#: geometrically over training (``BinaryConv2d.progress`` ∈ [0, 1]).
QUANTNET_BETA = (1.0, 20.0)


class _ApproxSign(torch.autograd.Function):
    """sign with sign(0) = +1; backward: Bi-Real's ApproxSign, 2 − 2|x| on |x| < 1."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(2 - 2 * x.abs(), min=0)


class _WeightSign(torch.autograd.Function):
    """sign of latent weights; backward: straight-through, clipped to |w| ≤ 1."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= 1).to(grad.dtype)


def binarize(x: torch.Tensor) -> torch.Tensor:
    """±1 activations with sign(0) = +1 and the ApproxSign gradient."""
    return _ApproxSign.apply(x)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 quantization: (integer-valued weights, scale)."""
    scale = w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-8) / 127
    w_int = torch.clamp(_round_ste(w / scale.reshape(-1, *([1] * (w.dim() - 1)))), -127, 127)
    return w_int, scale


def _pow2(scale: torch.Tensor) -> torch.Tensor:
    """``2^round(log2 scale)`` (straight-through rounding): a fixed-point scale, so that
    ``integer · scale`` is exact in float32 (a binary-point shift)."""
    return torch.exp2(_round_ste(torch.log2(scale)))


def _fixed_point_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IFQ-Net fixed-point weights: per output channel ``w ≈ w_int · 2^−f``, the step
    ``2^−f`` the power of two nearest (on the log scale) to ``max|w| / 127``; ``w_int`` is
    clipped to ±127 (int8)."""
    scale = _pow2(w.detach().abs().flatten(1).amax(dim=1).clamp(min=1e-8) / 127)
    w_int = torch.clamp(_round_ste(w / scale.reshape(-1, *([1] * (w.dim() - 1)))), -127, 127)
    return w_int, scale


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` (LSQ's step-gradient scale)."""
    return (x - x * g).detach() + x * g


class LSQQuantizer(nn.Module):
    """n-bit quantizer with a learned step ``s`` (LSQ, Esser et al. ICLR 2020; AQD's learned
    interval quantizer): ``q = clamp(round(x / s), Q_n, Q_p)``, ``x̂ = q · s``.

    ``signed``: symmetric levels ``Q_n = −Q_p = −(2^(n−1) − 1)`` (weights: an 8-bit quantizer
    fits int8 exactly); otherwise ``0 … 2^n − 1`` (activations). Rounding has the
    straight-through gradient, the step gets LSQ's gradient (``−x/s + round(x/s)`` inside
    the range, ``Q_n`` or ``Q_p`` outside) scaled by ``g = 1 / sqrt(numel · Q_p)``.
    ``init`` sets ``s = 2·mean|x| / sqrt(Q_p)`` (LSQ's initialisation). ``pow2``: the step
    used is ``2^round(log2 s)`` (fixed point, IFQ-Net; straight-through rounding).
    """

    def __init__(self, bits: int, *, signed: bool = True, pow2: bool = False):
        super().__init__()
        if not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"an LSQ quantizer has 2 to 8 bits, not {bits!r}")
        self.bits, self.signed, self.pow2 = bits, signed, pow2
        self.q_max = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        self.q_min = -self.q_max if signed else 0
        self.step = nn.Parameter(torch.tensor(1.0))

    def init(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.step.fill_(float(2 * x.detach().abs().mean() / self.q_max ** 0.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer-valued levels ``q`` (float tensor) and the step ``s`` (0-dim)."""
        g = 1.0 / (x.numel() * self.q_max) ** 0.5
        s = _grad_scale(self.step.clamp(min=1e-8), g)
        if self.pow2:
            s = _pow2(s)
        return torch.clamp(_round_ste(x / s), self.q_min, self.q_max), s


class MetaQuantizer(nn.Module):
    """QuantNet's differentiable binarizer sub-network (one per binary convolution).

    ``m = u + MLP(u)`` elementwise on the normalised latent weights ``u = W / mean|W|``
    (MLP ``1 → hidden → 1`` with tanh, last layer initialised to zero so that ``m = u`` at
    the start); the training weights are ``W_B = tanh(β·m)`` (no STE anywhere) and the
    deployed weights ``sign(m)`` (``sign(0) = +1``).
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        u = w / w.abs().mean().clamp(min=1e-8)
        return u + self.net(u.reshape(-1, 1)).reshape(u.shape)


def _bn_epilogue(bn: nn.BatchNorm2d, alpha: torch.Tensor, sign_bias: torch.Tensor,
                 ) -> BatchNormSign:
    return BatchNormSign(mean=bn.running_mean.detach(), var=bn.running_var.detach(),
                         gamma=bn.weight.detach(), beta=bn.bias.detach(), eps=bn.eps,
                         alpha=alpha.detach(), sign_bias=sign_bias.detach())


def _epilogue_forward(module, acc: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Pre-activation of a BN + sign epilogue: batch statistics in training, and in eval
    exactly :func:`bn_sign_preactivation` (the arithmetic the folded thresholds encode)."""
    if module.training:
        y = module.bn(acc * alpha.reshape(1, -1, 1, 1))
        return y - module.sign_bias.reshape(1, -1, 1, 1)
    return bn_sign_preactivation(acc, _bn_epilogue(module.bn, alpha, module.sign_bias))


class BinaryConv2d(nn.Module):
    """Binary convolution: sign of latent weights, XNOR-Net scale α = mean |W| per channel.

    ``dot(x)`` returns the integer dot products (as float) of ±1 input with ±1 weights,
    padding filled with the ``pad_value`` bit, exactly like
    :func:`bitdet.core.golden.binary_conv2d`.

    Options (defaults: the ``plain`` layer):

    * ``dup = d`` (DupNet): only ``out_channels / d`` filters are stored; output channel
      ``o`` uses filter ``o mod (out_channels / d)`` (the filter bank tiled ``d`` times),
      each copy with its own BN / threshold.
    * ``binarizer = "quantnet"``: the ±1 weights come from a :class:`MetaQuantizer`; in
      training the convolution uses the continuous ``tanh(β·m)`` (so ``dot`` is not an
      integer there), in eval mode ``sign(m)``. ``progress`` (a buffer, set by the trainer)
      anneals β over :data:`QUANTNET_BETA`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
                 padding: int = 0, pad_value: int = -1, dup: int = 1, binarizer: str = "ste"):
        super().__init__()
        if pad_value not in (-1, 1):
            raise ValueError(f"pad_value must be -1 or +1, not {pad_value!r}")
        if not isinstance(dup, int) or dup < 1 or out_channels % dup:
            raise ValueError(f"dup must be a positive divisor of the {out_channels} output "
                             f"channels, not {dup!r}")
        if binarizer not in BINARIZERS:
            raise ValueError(f"binarizer must be one of {', '.join(BINARIZERS)}, "
                             f"not {binarizer!r}")
        self.stride, self.padding, self.pad_value = stride, padding, pad_value
        self.dup, self.binarizer = dup, binarizer
        self.weight = nn.Parameter(
            torch.randn(out_channels // dup, in_channels, kernel, kernel) * 0.1)
        if binarizer == "quantnet":
            self.meta = MetaQuantizer()
            self.register_buffer("progress", torch.zeros(()))

    def _tile(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dup == 1 else t.repeat(self.dup, 1, 1, 1)

    def beta(self) -> float:
        """QuantNet's current sharpness β (annealed with ``progress``)."""
        lo, hi = QUANTNET_BETA
        return lo * (hi / lo) ** float(self.progress.clamp(0, 1))

    def soft_weight(self) -> torch.Tensor:
        """QuantNet's continuous training weights ``tanh(β·m)`` (all output channels)."""
        return self._tile(torch.tanh(self.beta() * self.meta(self.weight)))

    def sign_source(self) -> torch.Tensor:
        """The tensor (O×C×kh×kw) whose sign (≥ 0 → +1) is the deployed binary weight."""
        if self.binarizer == "quantnet":
            return self._tile(self.meta(self.weight))
        return self._tile(self.weight)

    def binary_weight(self) -> torch.Tensor:
        """The weights the convolution uses: ±1, except QuantNet's in training."""
        if self.binarizer == "quantnet":
            if self.training:
                return self.soft_weight()
            return torch.where(self.sign_source() >= 0, 1.0, -1.0)
        return _WeightSign.apply(self._tile(self.weight))

    def discretization_error(self) -> torch.Tensor:
        """QuantNet: ``mean (|W_B| − 1)²``, the distance of ``W_B`` from its signs."""
        return ((1 - self.soft_weight().abs()) ** 2).mean()

    def alpha(self) -> torch.Tensor:
        if self.binarizer == "quantnet":
            return self.soft_weight().abs().mean(dim=(1, 2, 3))
        return self._tile(self.weight).abs().mean(dim=(1, 2, 3))

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding,) * 4, value=float(self.pad_value))
        return F.conv2d(x, self.binary_weight(), stride=self.stride)


def _sign_source(conv) -> torch.Tensor:
    return conv.sign_source() if hasattr(conv, "sign_source") else conv.weight


class BinaryBlock(nn.Module):
    """Binary conv → BN → minus a learnable sign bias (RSign) → sign → optional max-pool.

    ``raw = True`` (the last block of a ``raw_last`` detector): the block outputs the
    popcount ``P = (dot + K) / 2`` itself (integer-valued floats, the device's raw mode); its
    ``bn`` is then the head's input BatchNorm, folded into the host head
    (:meth:`QuantHead.forward_raw`), and ``sign_bias`` is unused. No pool.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *,
                 stride: int = 1, pad_value: int = -1, pool: int | None = None, dup: int = 1,
                 binarizer: str = "ste", raw: bool = False):
        super().__init__()
        if raw and pool:
            raise ValueError("a raw (popcount) block cannot be followed by a max-pool")
        self.conv = BinaryConv2d(in_channels, out_channels, kernel, stride=stride,
                                 padding=kernel // 2, pad_value=pad_value, dup=dup,
                                 binarizer=binarizer)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sign_bias = nn.Parameter(torch.zeros(out_channels))
        self.pool = pool
        self.raw = raw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_accumulator(x)[0]

    def forward_with_accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's ±1 output and its integer dot products (before α, BN and sign), for
        layer-wise distillation losses."""
        acc = self.conv.dot(x)
        if self.raw:
            _, c, kh, kw = self.conv.weight.shape
            return (acc + c * kh * kw) / 2, acc
        out = binarize(_epilogue_forward(self, acc, self.conv.alpha()))
        if self.pool:
            out = F.max_pool2d(out, self.pool, self.pool)
        return out, acc

    def export(self) -> BinaryConvLayer:
        """The folded device layer (exact: same epilogue arithmetic as eval mode); a raw
        block's layer has no thresholds (it outputs ``P``)."""
        conv = self.conv
        if self.raw:
            signs = torch.where(_sign_source(conv).detach() >= 0, 1.0, -1.0)
            return BinaryConvLayer(weights=signs, thresholds=None, stride=conv.stride,
                                   padding=conv.padding, pad_value=conv.pad_value)
        return fold_binary_conv(
            _sign_source(conv).detach(), _bn_epilogue(self.bn, conv.alpha(), self.sign_bias),
            stride=conv.stride, padding=conv.padding, pad_value=conv.pad_value,
            pool=(self.pool, self.pool) if self.pool else None)


class QuantStem(nn.Module):
    """First layer on raw pixels (0..255): int8 conv → BN → sign bias → sign, on the host."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *,
                 stride: int = 2, bits: int | None = None, ifq: bool = False):
        super().__init__()
        self.stride, self.padding, self.ifq = stride, kernel // 2, ifq
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) * 0.1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sign_bias = nn.Parameter(torch.zeros(out_channels))
        if bits is not None:            # AQD: n-bit weights with a learned step (LSQ)
            self.quant = LSQQuantizer(bits, pow2=ifq)
            self.quant.init(self.weight)

    def _quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer-valued weights and the per-output-channel scale."""
        if not hasattr(self, "quant"):
            return _fixed_point_weight(self.weight) if self.ifq else _int8_weight(self.weight)
        w_int, step = self.quant(self.weight)
        return w_int, step.expand(self.weight.shape[0]).contiguous()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w_int, scale = self._quantized()
        # integer pixels × integer weights: every partial sum is an exact float32 integer
        acc = F.conv2d(pixels, w_int, stride=self.stride, padding=self.padding)
        return binarize(_epilogue_forward(self, acc, scale / PIXEL_MAX))

    def export(self) -> HostLayer:
        with torch.no_grad():
            w_int, scale = self._quantized()
        epilogue = _bn_epilogue(self.bn, scale / PIXEL_MAX, self.sign_bias)
        reach = int(w_int.abs().sum(dim=(1, 2, 3)).max()) * PIXEL_MAX
        thresholds, sign = fold_integer_epilogue(
            lambda acc: (bn_sign_preactivation(acc, epilogue) >= 0).to(torch.int32),
            lo=-reach, hi=reach, channels=w_int.shape[0])
        return HostLayer(
            name="stem", kind="conv_threshold", stride=self.stride, padding=self.padding,
            attrs={"zero_point": 0},
            arrays={"weight": w_int.to(torch.int8).numpy(),
                    "thresholds": thresholds.to(torch.int32).numpy(),
                    "sign": sign.to(torch.int8).numpy()})


class QuantHead(nn.Module):
    """Real-valued head on ±1 features: 1×1 int8 conv + integer bias, times a scale."""

    def __init__(self, in_channels: int, out_channels: int, *, bits: int | None = None,
                 ifq: bool = False):
        super().__init__()
        self.ifq = ifq
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1)
                                   / in_channels ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if bits is not None:            # AQD: n-bit weights with a learned step (LSQ)
            self.quant = LSQQuantizer(bits, pow2=ifq)
            self.quant.init(self.weight)

    def _quantized(self):
        if hasattr(self, "quant"):
            w_int, step = self.quant(self.weight)
            scale = step.expand(self.weight.shape[0]).contiguous()
        elif self.ifq:
            w_int, scale = _fixed_point_weight(self.weight)
        else:
            w_int, scale = _int8_weight(self.weight)
        bias_int = _round_ste(self.bias / scale)
        return w_int, bias_int, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_int, bias_int, scale = self._quantized()
        acc = F.conv2d(x, w_int) + bias_int.reshape(1, -1, 1, 1)   # exact integers
        return acc * scale.reshape(1, -1, 1, 1)

    def _folded(self, bn: nn.BatchNorm2d, p: torch.Tensor | None):
        """Integer weights, integer bias and scale of the head with ``bn`` (on raw ``P``)
        folded in, and the BN's per-channel ``(slope, shift)``. With ``p`` (training): the
        batch statistics of ``p``, and the running statistics are updated as BatchNorm
        does; without: the running statistics (eval mode, what the bundle holds)."""
        if p is not None:
            mean = p.mean(dim=(0, 2, 3))
            var = p.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                n = p.numel() / p.shape[1]
                m = bn.momentum
                bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                bn.running_var.mul_(1 - m).add_(var.detach() * n / max(n - 1, 1), alpha=m)
                bn.num_batches_tracked += 1
        else:
            mean, var = bn.running_mean, bn.running_var
        slope = bn.weight / torch.sqrt(var + bn.eps)
        shift = bn.bias - mean * slope
        w = self.weight * slope.reshape(1, -1, 1, 1)
        bias = self.bias + self.weight.flatten(1) @ shift
        w_int, scale = (_fixed_point_weight if self.ifq else _int8_weight)(w)
        return w_int, _round_ste(bias / scale), scale, slope, shift

    def forward_raw(self, p: torch.Tensor, bn: nn.BatchNorm2d,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head map and features of a ``raw_last`` detector on the last block's ``P``.

        The head computes ``(Σ w_int·P + b_int) · scale`` with ``bn`` folded into ``w_int``
        and ``b_int`` (per-channel slope and shift, quantized like the plain head's
        weights): the bundle's ``conv_affine`` head on integer ``P``. In eval mode the sum is
        formed in float64 (exact for any ``K``), as the bundle's int64. The features are
        ``bn(P)`` (for the distillation losses)."""
        w_int, bias_int, scale, slope, shift = self._folded(bn, p if self.training else None)
        features = p * slope.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        if self.training:
            acc = F.conv2d(p, w_int) + bias_int.reshape(1, -1, 1, 1)
        else:
            acc = (F.conv2d(p.double(), w_int.double())
                   + bias_int.double().reshape(1, -1, 1, 1)).float()
        return acc * scale.reshape(1, -1, 1, 1), features

    def export_raw(self, bn: nn.BatchNorm2d) -> HostLayer:
        """The head of a ``raw_last`` detector with ``bn`` folded (eval statistics)."""
        with torch.no_grad():
            w_int, bias_int, scale, _, _ = self._folded(bn, None)
        return self._host_layer(w_int, bias_int, scale)

    def export(self) -> HostLayer:
        with torch.no_grad():
            w_int, bias_int, scale = self._quantized()
        return self._host_layer(w_int, bias_int, scale)

    @staticmethod
    def _host_layer(w_int, bias_int, scale) -> HostLayer:
        return HostLayer(name="head", kind="conv_affine",
                         arrays={"weight": w_int.to(torch.int8).numpy(),
                                 "bias": bias_int.to(torch.int32).numpy(),
                                 "scale": scale.to(torch.float32).numpy()})


class SharedHeadBlock(nn.Module):
    """AQD's multi-level BN in a head shared across pyramid levels: one binary 3×3 conv
    (weights shared by every level) → a BatchNorm and a sign bias *per level* → sign.

    ``forward(x, level)`` normalises with level ``level``'s BN (its own batch statistics in
    training, its own running statistics in eval); :meth:`export` folds the shared weights
    with one level's BN into that level's device layer (same weights, its own thresholds).
    """

    def __init__(self, channels: int, levels: int, *, dup: int = 1, binarizer: str = "ste"):
        super().__init__()
        self.conv = BinaryConv2d(channels, channels, 3, padding=1, dup=dup, binarizer=binarizer)
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(levels))
        self.sign_biases = nn.ParameterList(nn.Parameter(torch.zeros(channels))
                                            for _ in range(levels))

    def forward(self, x: torch.Tensor, level: int) -> torch.Tensor:
        acc = self.conv.dot(x)
        bn, sign_bias, alpha = self.bns[level], self.sign_biases[level], self.conv.alpha()
        if self.training:
            pre = bn(acc * alpha.reshape(1, -1, 1, 1)) - sign_bias.reshape(1, -1, 1, 1)
        else:
            pre = bn_sign_preactivation(acc, _bn_epilogue(bn, alpha, sign_bias))
        return binarize(pre)

    def export(self, level: int) -> BinaryConvLayer:
        conv = self.conv
        return fold_binary_conv(
            _sign_source(conv).detach(),
            _bn_epilogue(self.bns[level], conv.alpha(), self.sign_biases[level]),
            stride=conv.stride, padding=conv.padding, pad_value=conv.pad_value)


class BinaryDetector(nn.Module):
    """Tinier-YOLO-style single-stage detector with binary middle layers.

    ``pixels`` (N × 1 × H × W, values 0..255) → :class:`QuantStem` (stride 2, host) →
    binary blocks (device) → :class:`QuantHead` (host) → an ``(5 + classes)``-channel map
    on a grid of stride ``4 · 2**pools``.

    Parameters
    ----------
    num_classes : int
    widths : tuple of int
        Stem width, then each binary block's width.
    pools : tuple of bool
        Whether each binary block is followed by a 2×2 max-pool.
    image_size : int
        Side of the (square) input image.
    levels : int
        1 (default): the head reads the last block. ``L ≥ 2``: a :class:`SharedHeadBlock`
        (shared binary conv, one BN per level — AQD's multi-level BN) and the shared
        :class:`QuantHead` run on ``L`` pyramid levels: the last block's map and its 2×2
        max-pools (OR of bits); ``forward`` then returns one head map per level, level
        ``l`` at stride ``stride · 2**l`` with box prior ``prior · 2**l``. Not exportable
        to a bundle (one head per bundle).
    dup : int
        DupNet's duplicated weight channels in every binary conv (``out / dup`` stored
        filters, tiled); 1: none.
    dup_input : int
        DupNet's duplicated input feature maps of the first binary block: the stem's ±1
        map is repeated ``dup_input`` times along the channels (exported as a stem whose
        output rows are repeated, so the bundle is unchanged in form); 1: none.
    binarizer : "ste" or "quantnet"
        Weight binarizer of the binary convs (:class:`BinaryConv2d`).
    host_bits : int or None
        None: int8 host weights with a max-abs scale. ``n`` (2..8): AQD's learned-interval
        (LSQ) n-bit weights in the stem and the head.
    ifq : bool
        IFQ-Net fixed point on the host: the stem's and the head's weight scales are powers
        of two (``w = w_int · 2^−f``), so the head computes ``(Σ w_int·x + b_int) · 2^−f``,
        an integer with ``f`` fractional bits (the stem's BN and sign are integer thresholds
        in every model).
    raw_last : bool
        The last binary block outputs its popcount ``P`` (the device's raw mode) instead of
        thresholded bits, and the host head reads ``P`` through a BatchNorm folded into its
        int8 weights and bias (:meth:`QuantHead.forward_raw`); the last block must not pool.
        Not with ``levels ≥ 2`` or ``host_bits``. ``intermediates`` then gives the last
        block's normalized features ``bn(P)`` in place of its ±1 map.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 128),
                 pools: tuple[bool, ...] = (True, True, False, False), image_size: int = 64,
                 class_names: tuple[str, ...] | None = None, levels: int = 1, dup: int = 1,
                 dup_input: int = 1, binarizer: str = "ste", host_bits: int | None = None,
                 ifq: bool = False, raw_last: bool = False):
        super().__init__()
        if len(pools) != len(widths) - 1:
            raise ValueError(f"pools needs one entry per binary block ({len(widths) - 1}), "
                             f"got {len(pools)}")
        if raw_last and (levels > 1 or host_bits is not None or pools[-1]):
            raise ValueError("raw_last needs levels 1, no host_bits and no pool after the "
                             "last block")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels must be a positive integer, not {levels!r}")
        if not isinstance(dup_input, int) or dup_input < 1:
            raise ValueError(f"dup_input must be a positive integer, not {dup_input!r}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.class_names = tuple(class_names or (str(i) for i in range(num_classes)))
        self.levels, self.dup_input, self.raw_last = levels, dup_input, raw_last
        self.stem = QuantStem(in_channels, widths[0], bits=host_bits, ifq=ifq)
        ins = [widths[0] * dup_input, *widths[1:-1]]
        last = len(pools) - 1
        self.blocks = nn.ModuleList(
            BinaryBlock(cin, cout, 3, pool=2 if pool else None, dup=dup, binarizer=binarizer,
                        raw=raw_last and i == last)
            for i, (cin, cout, pool) in enumerate(zip(ins, widths[1:], pools, strict=True)))
        if levels > 1:
            self.shared = SharedHeadBlock(widths[-1], levels, dup=dup, binarizer=binarizer)
        self.head = QuantHead(widths[-1], 5 + num_classes, bits=host_bits, ifq=ifq)
        self.stride = 2 * 2 ** sum(pools)

    @property
    def level_strides(self) -> list[int]:
        """Grid stride of each head level."""
        return [self.stride * 2 ** level for level in range(self.levels)]

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (QuantNet's β annealing; no effect otherwise)."""
        for module in self.modules():
            if isinstance(module, BinaryConv2d) and module.binarizer == "quantnet":
                module.progress.fill_(float(progress))

    def forward(self, pixels: torch.Tensor):
        if self.levels > 1:
            return self.level_maps(pixels)
        return self.intermediates(pixels)[-1]

    def level_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """One head map per level (``levels ≥ 2``): shared head block with that level's BN,
        then the shared :class:`QuantHead`."""
        feat = self.intermediates(pixels)[-1]
        maps = []
        for level in range(self.levels):
            if level:
                feat = F.max_pool2d(feat, 2, 2)
            maps.append(self.head(self.shared(feat, level)))
        return maps

    def intermediates(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Stem bits (±1, repeated ``dup_input`` times), every binary block's ±1 output,
        and (``levels == 1`` only) the head map; with ``levels ≥ 2`` the head maps come
        from :meth:`level_maps`."""
        x = self.stem(pixels)
        if self.dup_input > 1:
            x = x.repeat(1, self.dup_input, 1, 1)
        outputs = [x]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        if self.raw_last:             # x is the last block's P
            head, outputs[-1] = self.head.forward_raw(x, self.blocks[-1].bn)
            outputs.append(head)
        elif self.levels == 1:
            outputs.append(self.head(x))
        return outputs

    def export_level_layers(self) -> list[BinaryConvLayer]:
        """The shared head block folded once per level (``levels ≥ 2``)."""
        return [self.shared.export(level) for level in range(self.levels)]

    def export_bundle(self) -> Bundle:
        """Fold the (eval-mode) model into a deployment bundle."""
        if self.levels > 1:
            raise ValueError(f"a {self.levels}-level head cannot be exported: a bundle holds "
                             "one head (export_level_layers() folds the shared head block)")
        side = (self.image_size + 2 * self.stem.padding - self.stem.weight.shape[2]) \
            // self.stem.stride + 1
        stem = self.stem.export()
        if self.dup_input > 1:        # DupNet: the stem's output channels repeated
            stem.arrays = {name: np.tile(a, (self.dup_input,) + (1,) * (a.ndim - 1))
                           for name, a in stem.arrays.items()}
        return Bundle(
            binary_layers=[block.export() for block in self.blocks],
            input_shape=(self.stem.weight.shape[0] * self.dup_input, side, side),
            host_layers=[stem, self.head.export_raw(self.blocks[-1].bn) if self.raw_last
                         else self.head.export()],
            layer_names=[f"bconv{i + 1}" for i in range(len(self.blocks))],
            model={"name": "bitdet-binary-detector", "classes": list(self.class_names),
                   "input": [self.in_channels, self.image_size, self.image_size],
                   "grid_stride": self.stride, "head": "yolo-lite: objectness, tx, ty, tw, "
                   "th, class logits per cell"})


class RealDetector(nn.Module):
    """Real-valued teacher with :class:`BinaryDetector`'s topology (same constructor).

    Float stem (3×3, stride 2) → float 3×3 blocks (optional 2×2 max-pool) → 1×1 head with a
    bias; every conv but the head is followed by BatchNorm and ReLU, padding is zeros and
    the input is ``pixels / 255``. Same grid, ``stride`` and head channels as the binary
    model, so its head map decodes the same way; it is not exportable to a bundle.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 128),
                 pools: tuple[bool, ...] = (True, True, False, False), image_size: int = 64,
                 class_names: tuple[str, ...] | None = None):
        super().__init__()
        if len(pools) != len(widths) - 1:
            raise ValueError(f"pools needs one entry per block ({len(widths) - 1}), "
                             f"got {len(pools)}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.class_names = tuple(class_names or (str(i) for i in range(num_classes)))

        def block(cin: int, cout: int, stride: int, pool: bool) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                      nn.BatchNorm2d(cout), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
            return nn.Sequential(*layers)

        self.stem = block(in_channels, widths[0], 2, False)
        self.blocks = nn.ModuleList(block(cin, cout, 1, pool) for cin, cout, pool
                                    in zip(widths[:-1], widths[1:], pools, strict=True))
        self.head = nn.Conv2d(widths[-1], 5 + num_classes, 1)
        self.stride = 2 * 2 ** sum(pools)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixels)[-1]

    def intermediates(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Stem output, every block's output, and the head map."""
        x = self.stem(pixels / PIXEL_MAX)
        outputs = [x]
        for blk in self.blocks:
            x = blk(x)
            outputs.append(x)
        outputs.append(self.head(x))
        return outputs
