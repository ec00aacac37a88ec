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

Contract v2 (docs/methods.md, "Residual and multi-bit blocks (contract v2)"):
:class:`LevelQuantizer` (n-bit activations, learned interval; 1 bit is the sign) and
:class:`ResidualBinaryBlock` (binary conv + BN + additive shortcut + quantizer), whose eval
mode is :func:`~bitdet.core.fold.residual_preactivation` so that its ``to_device()``
(:func:`~bitdet.core.fold.fold_residual_conv`) is exact; :class:`ResidualBinaryNet` chains
them and exports golden graph nodes. :class:`ResidualBinaryDetector` puts such a body
(W1A2: ±1 weights, 2-bit activations, pooled / channel-repeated shortcuts) between an n-bit
host stem (:class:`LevelStem`) and :class:`QuantHead`, and exports a version-2 graph bundle
whose forward pass equals its eval-mode head map exactly; :class:`ResidualRealDetector` is
its real-valued counterpart (same widths, strides and shortcuts).

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
    ResidualEpilogue,
    bn_sign_preactivation,
    fold_binary_conv,
    fold_integer_epilogue,
    fold_residual_conv,
    residual_output,
    residual_preactivation,
    weight_sums,
)
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, GraphNode, PoolPass

__all__ = [
    "BINARIZERS",
    "BinaryBlock",
    "BinaryConv2d",
    "BinaryDetector",
    "LSQQuantizer",
    "LevelQuantizer",
    "LevelStem",
    "MetaQuantizer",
    "QuantHead",
    "QuantStem",
    "RealDetector",
    "ResidualBinaryBlock",
    "ResidualBinaryDetector",
    "ResidualBinaryNet",
    "ResidualRealBlock",
    "ResidualRealDetector",
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


# ---------------------------------------------------------------------------------------
# Contract v2 building blocks: n-bit activations and residual shortcuts (docs/methods.md,
# "Residual and multi-bit blocks (contract v2)"). Eval mode computes exactly
# residual_preactivation + residual_output, which fold_residual_conv folds.

#: Smallest step a :class:`LevelQuantizer` uses (the learned step is ``max(|s|, MIN_STEP)``):
#: a positive step keeps the quantizer monotone and its levels recoverable from values.
MIN_STEP = 1e-3


class LevelQuantizer(nn.Module):
    """Uniform n-bit activation quantizer (``bits`` 1…4) with a learned interval.

    Levels ``a = clamp(round(pre / s), 0, 2ⁿ − 1)`` (exactly :func:`~bitdet.core.fold.
    uniform_quantize`), value ``a·s + z``: what the next layer's float conv sees (its
    ``ResidualEpilogue.in_scale`` / ``in_zero``, or ``shortcut_scale`` / ``shortcut_zero``).
    ``s = max(|step|, MIN_STEP)`` (positive: the quantizer stays monotone) and the zero
    point ``z`` are learned scalars (one per map: the next layer's ``in_scale`` is per
    layer). Training: straight-through rounding, LSQ's step gradient scaled by
    ``1 / sqrt(numel · (2ⁿ − 1))``. Eval: the exact levels and ``a·s + z``.

    ``bits = 1`` is today's sign activation: level ``[pre ≥ 0]``, ``s = 2``, ``z = −1``
    (value ±1), the ApproxSign gradient of :func:`binarize`; nothing is learned.
    ``learn = False``: step and zero point are fixed buffers (a grid that describes a map
    made elsewhere, e.g. the network input).
    """

    def __init__(self, bits: int, *, step: float | None = None, zero: float = 0.0,
                 learn: bool = True):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 4:
            raise ValueError(f"a LevelQuantizer has 1 to 4 bits, not {bits!r}")
        self.bits, self.top = bits, (1 << bits) - 1
        if bits == 1:
            if step not in (None, 2.0) or zero not in (0.0, -1.0):
                raise ValueError("a 1-bit LevelQuantizer is the sign: step 2, zero point −1")
            self.register_buffer("step", torch.tensor(2.0))
            self.register_buffer("zero", torch.tensor(-1.0))
            return
        step = 3.0 / self.top if step is None else float(step)
        if not step > 0:
            raise ValueError(f"the step must be positive, not {step!r}")
        if learn:
            self.step = nn.Parameter(torch.tensor(step))
            self.zero = nn.Parameter(torch.tensor(float(zero)))
        else:
            self.register_buffer("step", torch.tensor(step))
            self.register_buffer("zero", torch.tensor(float(zero)))

    def scale(self) -> torch.Tensor:
        """The step ``s`` in use (0-dim float32, positive)."""
        if self.bits == 1:
            return self.step
        return self.step.abs().clamp(min=MIN_STEP)

    def zero_point(self) -> torch.Tensor:
        """The zero point ``z`` (0-dim float32)."""
        return self.zero

    def init(self, pre: torch.Tensor) -> None:
        """LSQ's initialisation ``s = 2·mean|pre| / sqrt(2ⁿ − 1)`` (n ≥ 2)."""
        if self.bits > 1:
            with torch.no_grad():
                self.step.fill_(max(float(2 * pre.detach().abs().mean() / self.top ** 0.5),
                                    MIN_STEP))

    def levels(self, pre: torch.Tensor) -> torch.Tensor:
        """Integer levels (int32) of a pre-activation: :func:`~bitdet.core.fold.
        residual_output`'s arithmetic."""
        if self.bits == 1:
            return (pre >= 0).to(torch.int32)
        return torch.clamp(torch.round(pre / self.scale().detach()), 0, self.top
                           ).to(torch.int32)

    def dequantize(self, levels: torch.Tensor) -> torch.Tensor:
        """``a·s + z`` (float32)."""
        return levels.to(torch.float32) * self.scale().detach() + self.zero.detach()

    def recover(self, values: torch.Tensor) -> torch.Tensor:
        """The levels (int32) of values made by :meth:`dequantize`; refuses values off the
        grid."""
        if self.bits == 1:
            levels = (values > 0).to(torch.int32)
        else:
            levels = torch.clamp(torch.round((values - self.zero.detach())
                                             / self.scale().detach()), 0, self.top)
            levels = levels.to(torch.int32)
        if not torch.equal(self.dequantize(levels), values.to(torch.float32)):
            raise ValueError(f"the values are not on the grid of this {self.bits}-bit "
                             "quantizer (a·s + z); pass the levels themselves")
        return levels

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        """The dequantized value ``a·s + z`` (straight-through in training)."""
        if self.bits == 1:
            return binarize(pre)
        if not self.training:
            return self.dequantize(self.levels(pre))
        g = 1.0 / (pre.numel() * self.top) ** 0.5
        s = _grad_scale(self.scale(), g)
        return _round_ste(torch.clamp(pre / s, 0, self.top)) * s + self.zero


def _fixed_grid(bits: int) -> LevelQuantizer:
    return LevelQuantizer(bits, learn=False)


class ResidualBinaryBlock(nn.Module):
    """Binary conv → BN → + shortcut → − sign bias → :class:`LevelQuantizer` (contract v2).

    The input is a map of ``in_bits``-bit levels seen as values ``a·s_in + z_in``
    (``in_grid``: the quantizer that made it; default a fixed grid, ±1 for one bit), padded
    with the level ``pad_level``. The conv has ±1 weights (sign of the latent weights,
    XNOR-Net α = mean|W| per channel: :class:`BinaryConv2d`) and ``stride``. The shortcut
    (``shortcut_bits`` > 0) is a map of the input's channels and size, of
    ``shortcut_bits``-bit levels seen as ``r·s_r + z_r`` (``shortcut_grid``); for stride 2
    it is max-pooled (2×2, over levels), for ``out_channels > in_channels`` its channels
    are repeated (``c mod in_channels``), as golden's :class:`PoolPass` /
    :class:`ChannelRepeat`; it enters *additively* with a learned per-channel gain β_r.
    The pre-activation ``pre = BN(α·conv) + β_r·v(r) − b`` (b the learned sign bias) is
    quantized to ``out_bits`` by ``quant``; ``residual_bits > 0`` adds a second quantizer
    ``residual_quant`` of the same ``pre`` (a multi-bit residual stream beside 1-bit
    activations) and ``forward`` then returns both maps.

    Training mode: batch statistics, straight-through gradients. Eval mode: exactly
    :func:`~bitdet.core.fold.residual_preactivation` and
    :func:`~bitdet.core.fold.residual_output` on the integer dot (:meth:`forward_levels`),
    so :meth:`to_device` (:func:`~bitdet.core.fold.fold_residual_conv`) is bit-exact.

    ``dup`` (DupNet) and ``binarizer`` (QuantNet) are :class:`BinaryConv2d`'s: the folded
    weights are the signs of ``conv.sign_source()`` with the eval-mode α either way.
    """

    def __init__(self, in_channels: int, out_channels: int, *, in_bits: int = 1,
                 out_bits: int = 1, shortcut_bits: int = 0, stride: int = 1,
                 residual_bits: int = 0, kernel: int = 3, pad_level: int = 0,
                 in_grid: LevelQuantizer | None = None,
                 shortcut_grid: LevelQuantizer | None = None, dup: int = 1,
                 binarizer: str = "ste"):
        super().__init__()
        for name, value, low in (("in_bits", in_bits, 1), ("out_bits", out_bits, 1),
                                 ("shortcut_bits", shortcut_bits, 0),
                                 ("residual_bits", residual_bits, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4:
                raise ValueError(f"{name} must be an integer in [{low}, 4], not {value!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, not {stride!r}")
        if shortcut_bits and out_channels % in_channels:
            raise ValueError(f"a shortcut needs out_channels ({out_channels}) to be a multiple "
                             f"of in_channels ({in_channels}) (channel repetition)")
        if isinstance(pad_level, bool) or not isinstance(pad_level, int) \
                or not 0 <= pad_level < 1 << in_bits:
            raise ValueError(f"pad_level must be a level in [0, {(1 << in_bits) - 1}], "
                             f"not {pad_level!r}")
        for name, grid, bits in (("in_grid", in_grid, in_bits),
                                 ("shortcut_grid", shortcut_grid, shortcut_bits)):
            if grid is not None and grid.bits != bits:
                raise ValueError(f"{name} has {grid.bits} bits but the block expects {bits}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_bits, self.out_bits, self.shortcut_bits = in_bits, out_bits, shortcut_bits
        self.residual_bits, self.stride, self.pad_level = residual_bits, stride, pad_level
        self.conv = BinaryConv2d(in_channels, out_channels, kernel, stride=stride,
                                 padding=kernel // 2, dup=dup, binarizer=binarizer)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sign_bias = nn.Parameter(torch.zeros(out_channels))
        self.shortcut_gain = nn.Parameter(torch.ones(out_channels)) if shortcut_bits else None
        self.quant = LevelQuantizer(out_bits)
        self.residual_quant = LevelQuantizer(residual_bits) if residual_bits else None
        self.in_grid = in_grid if in_grid is not None else _fixed_grid(in_bits)
        self.shortcut_grid = None
        if shortcut_bits:
            self.shortcut_grid = (shortcut_grid if shortcut_grid is not None
                                  else _fixed_grid(shortcut_bits))

    # -- the shortcut path (identical on levels and on their values: s_r > 0) -------------
    def _shortcut_map(self, r: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            if r.shape[2] % 2 or r.shape[3] % 2:
                raise ValueError(f"a stride-2 shortcut needs an even input size, got "
                                 f"{tuple(r.shape[2:])}")
            r = F.max_pool2d(r, 2, 2) if r.dtype.is_floating_point else \
                F.max_pool2d(r.to(torch.float32), 2, 2).to(r.dtype)
        if self.out_channels != r.shape[1]:
            r = r.repeat(1, self.out_channels // r.shape[1], 1, 1)
        return r

    def _check_shortcut(self, shortcut):
        if self.shortcut_bits and shortcut is None:
            raise ValueError(f"the block has a {self.shortcut_bits}-bit shortcut but none "
                             "was given")
        if not self.shortcut_bits and shortcut is not None:
            raise ValueError("a shortcut was given but the block has shortcut_bits 0")

    def epilogue(self, quant: LevelQuantizer | None = None) -> ResidualEpilogue:
        """The block's float epilogue (eval statistics) for ``quant`` (default ``quant``)."""
        quant = self.quant if quant is None else quant
        bn = self.bn
        grid = self.shortcut_grid
        return ResidualEpilogue(
            mean=bn.running_mean.detach(), var=bn.running_var.detach(),
            gamma=bn.weight.detach(), beta=bn.bias.detach(), eps=bn.eps,
            alpha=self.conv.alpha().detach(), sign_bias=self.sign_bias.detach(),
            in_scale=self.in_grid.scale().detach(), in_zero=self.in_grid.zero.detach(),
            shortcut_gain=None if grid is None else self.shortcut_gain.detach(),
            shortcut_scale=1.0 if grid is None else grid.scale().detach(),
            shortcut_zero=0.0 if grid is None else grid.zero.detach(),
            step=quant.scale().detach() if quant.bits > 1 else None)

    def _signs(self) -> torch.Tensor:
        return torch.where(_sign_source(self.conv).detach() >= 0, 1.0, -1.0)

    def preactivation_levels(self, a: torch.Tensor, r: torch.Tensor | None = None,
                             ) -> torch.Tensor:
        """Eval-mode pre-activation on integer levels: the integer dot ``d = Σ w·a`` (a
        float32 conv of the padded levels, exact) through :func:`residual_preactivation`."""
        self._check_shortcut(r)
        signs = self._signs()
        _, c, kh, kw = signs.shape
        if ((1 << self.in_bits) - 1) * c * kh * kw >= 1 << 24:
            raise ValueError("the accumulator range is too large for an exact float32 conv")
        p = self.conv.padding
        x = F.pad(a.to(torch.float32), (p,) * 4, value=float(self.pad_level))
        d = torch.round(F.conv2d(x, signs, stride=self.stride))
        rr = None if r is None else self._shortcut_map(r)
        return residual_preactivation(d, rr, self.epilogue(), weight_sums(signs))

    def forward_levels(self, a: torch.Tensor, r: torch.Tensor | None = None):
        """Eval-mode output levels (int32) from input levels ``a`` and shortcut levels
        ``r``: exactly what the layers of :meth:`to_device` compute. With
        ``residual_bits`` a pair (output levels, residual levels)."""
        pre = self.preactivation_levels(a, r)
        out = residual_output(pre, self.epilogue(), self.out_bits)
        if self.residual_quant is None:
            return out
        return out, residual_output(pre, self.epilogue(self.residual_quant), self.residual_bits)

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor | None = None):
        """Values ``a·s + z`` of the output (and of the residual map with
        ``residual_bits``) from the input's and the shortcut's values."""
        self._check_shortcut(shortcut)
        if not self.training:
            a = self.in_grid.recover(x)
            r = None if shortcut is None else self.shortcut_grid.recover(shortcut)
            out = self.forward_levels(a, r)
            if self.residual_quant is None:
                return self.quant.dequantize(out)
            return self.quant.dequantize(out[0]), self.residual_quant.dequantize(out[1])
        return self.forward_with_accumulator(x, shortcut)[0]

    def padded_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input's values padded with the value of ``pad_level`` (training path)."""
        pad = self.pad_level * self.in_grid.scale() + self.in_grid.zero
        p = self.conv.padding
        return F.pad(x - pad, (p,) * 4) + pad

    def forward_with_accumulator(self, x: torch.Tensor, shortcut: torch.Tensor | None = None):
        """Training mode: the output of :meth:`forward` and the conv's accumulator
        ``conv(padded x, ±1 W)`` on the input's values (before α, BN and the shortcut),
        for layer-wise distillation losses."""
        self._check_shortcut(shortcut)
        acc = F.conv2d(self.padded_input(x), self.conv.binary_weight(), stride=self.stride)
        pre = self.bn(acc * self.conv.alpha().reshape(1, -1, 1, 1))
        if shortcut is not None:
            pre = pre + self.shortcut_gain.reshape(1, -1, 1, 1) * self._shortcut_map(shortcut)
        pre = pre - self.sign_bias.reshape(1, -1, 1, 1)
        if self.residual_quant is None:
            return self.quant(pre), acc
        return (self.quant(pre), self.residual_quant(pre)), acc

    def to_device(self, *, residual: bool = False) -> BinaryConvLayer:
        """The folded v2 device layer (eval statistics): ``in_bits``, ``pad_level``,
        ``shortcut_bits`` and thresholds ``(O, L)`` / ``(O, R, L)``; ``residual = True``:
        the layer of the residual map (same weights up to flips, its own thresholds)."""
        if residual and self.residual_quant is None:
            raise ValueError("the block has no residual output (residual_bits 0)")
        quant = self.residual_quant if residual else self.quant
        return fold_residual_conv(
            _sign_source(self.conv).detach(), self.epilogue(quant), in_bits=self.in_bits,
            shortcut_bits=self.shortcut_bits, out_bits=quant.bits, stride=self.stride,
            padding=self.conv.padding, pad_level=self.pad_level)

    def graph_nodes(self, name: str, source: str = "input",
                    shortcut: str | None = None) -> list[GraphNode]:
        """The block as golden graph nodes: the shortcut's :class:`PoolPass` and
        :class:`ChannelRepeat` (where it downsamples or grows), the conv ``name`` and, with
        ``residual_bits``, the residual conv ``name + ".res"``."""
        self._check_shortcut(shortcut)
        nodes = []
        if shortcut is not None and self.stride == 2:
            nodes.append(GraphNode(f"{name}.pool", PoolPass(2), input=shortcut))
            shortcut = f"{name}.pool"
        if shortcut is not None and self.out_channels != self.in_channels:
            nodes.append(GraphNode(f"{name}.repeat", ChannelRepeat(self.out_channels),
                                   input=shortcut))
            shortcut = f"{name}.repeat"
        nodes.append(GraphNode(name, self.to_device(), input=source, shortcut=shortcut))
        if self.residual_quant is not None:
            nodes.append(GraphNode(f"{name}.res", self.to_device(residual=True),
                                   input=source, shortcut=shortcut))
        return nodes


class ResidualBinaryNet(nn.Module):
    """A small chain of :class:`ResidualBinaryBlock` over an ``input_bits``-bit level map
    (values on the fixed grid ``input_grid``), exported as golden :class:`GraphNode` s.

    Block ``i`` (node ``b{i}``) reads the previous block's output (block 0: the input)
    with ``in_bits`` = ``act_bits`` (block 0: ``input_bits``) and outputs ``act_bits``;
    its shortcut is the previous block's residual map ``b{i-1}.res`` when
    ``residual_bits`` > 0 (each block then also makes one), else the map it reads. W1A1
    with n-bit shortcuts: ``act_bits = 1, residual_bits = n``; W1A2: ``act_bits = 2``.
    """

    def __init__(self, in_channels: int = 4, widths: tuple[int, ...] = (8, 16),
                 strides: tuple[int, ...] = (1, 2), *, input_bits: int = 2, act_bits: int = 1,
                 residual_bits: int = 0, input_step: float = 0.25, input_zero: float = -0.5):
        super().__init__()
        if len(strides) != len(widths):
            raise ValueError("strides needs one entry per block")
        self.input_grid = LevelQuantizer(input_bits, learn=False,
                                         **({} if input_bits == 1 else
                                            {"step": input_step, "zero": input_zero}))
        self.blocks = nn.ModuleList()
        self.residual_bits = residual_bits
        cin, grid, sc_grid = in_channels, self.input_grid, self.input_grid
        for width, stride in zip(widths, strides, strict=True):
            block = ResidualBinaryBlock(
                cin, width, in_bits=grid.bits, out_bits=act_bits, shortcut_bits=sc_grid.bits,
                stride=stride, residual_bits=residual_bits, in_grid=grid,
                shortcut_grid=sc_grid)
            self.blocks.append(block)
            cin, grid = width, block.quant
            sc_grid = block.residual_quant if residual_bits else block.quant

    def intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every block's output values by node name (``b{i}``, ``b{i}.res``)."""
        out, shortcut = {}, x
        for i, block in enumerate(self.blocks):
            y = block(x, shortcut)
            if self.residual_bits:
                x, shortcut = y
                out[f"b{i}"], out[f"b{i}.res"] = x, shortcut
            else:
                x = shortcut = out[f"b{i}"] = y
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediates(x)[f"b{len(self.blocks) - 1}"]

    def forward_levels(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Eval mode on integer input levels: every block's levels by node name."""
        out, r = {}, a
        for i, block in enumerate(self.blocks):
            y = block.forward_levels(a, r)
            if self.residual_bits:
                a, r = y
                out[f"b{i}"], out[f"b{i}.res"] = a, r
            else:
                a = r = out[f"b{i}"] = y
        return out

    def to_graph(self) -> list[GraphNode]:
        """The network as golden nodes (``golden.run_graph(levels, nodes)``)."""
        nodes, source, shortcut = [], "input", "input"
        for i, block in enumerate(self.blocks):
            nodes += block.graph_nodes(f"b{i}", source, shortcut)
            source = f"b{i}"
            shortcut = f"b{i}.res" if self.residual_bits else source
        return nodes


# ---------------------------------------------------------------------------------------
# A contract-v2 detector: the host stem and head of BinaryDetector around a body of
# ResidualBinaryBlocks (n-bit activations, pooled / channel-repeated shortcuts), exported
# exactly to a version-2 (graph) bundle.

class LevelStem(QuantStem):
    """:class:`QuantStem` with an n-bit output: int8 conv on raw pixels (0..255) → BN →
    minus the sign bias → :class:`LevelQuantizer` (``bits`` 1…4, learned step and zero
    point; ``act``).

    ``forward`` returns the values ``a·s + z`` of the levels (straight-through in
    training; in eval exactly ``act.levels`` of :func:`~bitdet.core.fold.
    bn_sign_preactivation` on the integer accumulator). :meth:`export` folds BN, bias and
    quantizer into ``2**bits − 1`` integer thresholds per channel on that accumulator: the
    bundle's ``conv_threshold`` host layer, which outputs the levels themselves. ``bits = 1``
    is :class:`QuantStem`'s sign (the level is the bit). ``host_bits`` (AQD's LSQ n-bit
    weights) and ``ifq`` (power-of-two weight scale) are :class:`QuantStem`'s.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *,
                 stride: int = 2, bits: int = 2, host_bits: int | None = None,
                 ifq: bool = False):
        super().__init__(in_channels, out_channels, kernel, stride=stride, bits=host_bits,
                         ifq=ifq)
        self.act = LevelQuantizer(bits)

    @property
    def bits(self) -> int:
        """Bits of the output levels."""
        return self.act.bits

    def _preactivation(self, pixels: torch.Tensor) -> torch.Tensor:
        w_int, scale = self._quantized()
        # integer pixels × integer weights: every partial sum is an exact float32 integer
        acc = F.conv2d(pixels, w_int, stride=self.stride, padding=self.padding)
        return _epilogue_forward(self, acc, scale / PIXEL_MAX)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Values ``a·s + z`` of the output levels."""
        return self.act(self._preactivation(pixels))

    def forward_levels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Eval-mode output levels (int32): what the exported host layer computes."""
        return self.act.levels(self._preactivation(pixels))

    def export(self) -> HostLayer:
        """The ``conv_threshold`` host layer (eval statistics): thresholds ``(O, 2**bits −
        1)`` on the accumulator, exact for every accumulator the int8 weights can reach."""
        with torch.no_grad():
            w_int, scale = self._quantized()
        epilogue = _bn_epilogue(self.bn, scale / PIXEL_MAX, self.sign_bias)
        reach = int(w_int.abs().sum(dim=(1, 2, 3)).max()) * PIXEL_MAX
        act = self.act
        thresholds, sign = fold_integer_epilogue(
            lambda acc: act.levels(bn_sign_preactivation(acc, epilogue)),
            lo=-reach, hi=reach, channels=w_int.shape[0], n_levels=act.top)
        return HostLayer(
            name="stem", kind="conv_threshold", stride=self.stride, padding=self.padding,
            attrs={"zero_point": 0},
            arrays={"weight": w_int.to(torch.int8).numpy(),
                    "thresholds": thresholds.to(torch.int32).numpy(),
                    "sign": sign.to(torch.int8).numpy()})


class ResidualBinaryDetector(nn.Module):
    """Single-stage detector with a residual multi-bit binary body (contract v2).

    ``pixels`` (N × ``in_channels`` × H × W, values 0..255) → :class:`LevelStem` (stride 2,
    host, ``stem_bits``-bit levels) → :class:`ResidualBinaryBlock` s (device; ±1 weights,
    ``act_bits``-bit activations, each block's shortcut the map it reads: max-pooled where
    the block has stride 2 (:class:`~bitdet.core.golden.PoolPass`), channels repeated where
    it widens (:class:`~bitdet.core.golden.ChannelRepeat`)) → :class:`QuantHead` (host) on
    the last block's levels (0 … 2**act_bits − 1; ±1 for one bit) → an
    ``(5 + classes)``-channel map on a grid of stride ``2 · 2**(number of stride-2
    blocks)``, decoded like :class:`BinaryDetector`'s.

    Training runs in float with the blocks' straight-through estimators; in eval mode every
    map is computed exactly as its exported form, so :meth:`export_bundle` (a version-2
    graph bundle) gives :meth:`Bundle.forward` equal to the eval-mode head map bit for bit.

    Parameters
    ----------
    num_classes, in_channels, image_size, class_names :
        As :class:`BinaryDetector`.
    widths : tuple of int
        The stem's width, then each block's; each must be a multiple of the one before
        (the shortcut's channel repetition).
    strides : tuple of int
        Each block's stride (1 or 2); the map at a stride-2 block must have an even size.
    stem_bits, act_bits : int
        Bits (1…4) of the stem's levels and of every block's output levels (W1A2: 2).
    residual_bits : int
        0 (default): each block's shortcut is the map it reads. ``m`` (1…4): a separate
        ``m``-bit residual stream carries the shortcuts (W1A1 with n-bit shortcuts:
        ``act_bits = 1, residual_bits = n``): every block but the last also quantizes its
        pre-activation to ``m`` bits (``residual_quant``, graph node ``res{i}.res``) and
        that map is the next block's shortcut; the first block's shortcut is the stem's map.
    dup, dup_input, binarizer, host_bits, ifq : optional
        The chain's trainer options (:class:`BinaryDetector`; docs/methods.md, "Seed
        methods on the residual family"), all off by default: DupNet's tiled filter banks in
        every block (``dup`` must divide every block's width) and the stem's map repeated
        ``dup_input`` times as the first block's input (its width must be a multiple of
        ``dup_input · widths[0]``: the shortcut repeats the repeated map), QuantNet's
        meta-quantizer (``binarizer="quantnet"``), AQD's LSQ ``host_bits``-bit stem and
        head weights, IFQ-Net's power-of-two host scales (``ifq``).
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (16, 16, 32, 32, 32),
                 strides: tuple[int, ...] = (1, 2, 2, 1), image_size: int = 64,
                 class_names: tuple[str, ...] | None = None, stem_bits: int = 2,
                 act_bits: int = 2, residual_bits: int = 0, dup: int = 1, dup_input: int = 1,
                 binarizer: str = "ste", host_bits: int | None = None, ifq: bool = False):
        super().__init__()
        if len(strides) != len(widths) - 1 or not strides:
            raise ValueError(f"strides needs one entry per residual block ({len(widths) - 1}), "
                             f"got {len(strides)}")
        if isinstance(dup_input, bool) or not isinstance(dup_input, int) or dup_input < 1:
            raise ValueError(f"dup_input must be a positive integer, not {dup_input!r}")
        if dup_input > 1 and widths[1] % (widths[0] * dup_input):
            raise ValueError(f"the first block's width {widths[1]} must be a multiple of "
                             f"dup_input × the stem's width, {dup_input * widths[0]} (its "
                             "shortcut repeats the repeated stem map)")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.class_names = tuple(class_names or (str(i) for i in range(num_classes)))
        self.dup_input = dup_input
        self.stem = LevelStem(in_channels, widths[0], bits=stem_bits, host_bits=host_bits,
                              ifq=ifq)
        side = self.stem_side
        for i, stride in enumerate(strides):
            if stride == 2 and side % 2:
                raise ValueError(f"residual block {i + 1} has stride 2 but its input is "
                                 f"{side}×{side} (odd); choose an image size divisible by "
                                 f"{2 ** (1 + sum(s == 2 for s in strides))}")
            side //= stride
        self.residual_bits = residual_bits
        self.blocks = nn.ModuleList()
        grid = sc_grid = self.stem.act
        last = len(strides) - 1
        ins = [widths[0] * dup_input, *widths[1:-1]]
        for i, (cin, cout, stride) in enumerate(zip(ins, widths[1:], strides, strict=True)):
            block = ResidualBinaryBlock(cin, cout, in_bits=grid.bits, out_bits=act_bits,
                                        shortcut_bits=sc_grid.bits, stride=stride,
                                        residual_bits=residual_bits if i < last else 0,
                                        in_grid=grid, shortcut_grid=sc_grid, dup=dup,
                                        binarizer=binarizer)
            self.blocks.append(block)
            grid = block.quant
            sc_grid = block.residual_quant if block.residual_quant is not None else grid
        if grid.bits > 1:     # the head reads the last map's levels: its zero point is unused
            del grid.zero
            grid.register_buffer("zero", torch.tensor(0.0))
        self.head = QuantHead(widths[-1], 5 + num_classes, bits=host_bits, ifq=ifq)
        self.stride = 2 ** (1 + sum(s == 2 for s in strides))

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (QuantNet's β annealing; no effect otherwise)."""
        for module in self.modules():
            if isinstance(module, BinaryConv2d) and module.binarizer == "quantnet":
                module.progress.fill_(float(progress))

    @property
    def stem_side(self) -> int:
        """Side of the stem's output map (the binary network's input)."""
        return (self.image_size + 2 * self.stem.padding - self.stem.weight.shape[2]) \
            // self.stem.stride + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixels)[-1]

    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads from the last block's values: its levels (n bits, exactly
        the levels in eval mode) or ±1 (one bit), as the bundle's head does."""
        quant = self.blocks[-1].quant
        if quant.bits == 1:
            return x
        if not self.training:
            return quant.recover(x).to(torch.float32)
        return (x - quant.zero_point()) / quant.scale()

    def intermediates(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The stem's values (repeated ``dup_input`` times), every block's values
        (``a·s + z``) and the head map."""
        x = self.stem(pixels)
        if self.dup_input > 1:
            x = x.repeat(1, self.dup_input, 1, 1)
        shortcut = x
        outputs = [x]
        for block in self.blocks:
            y = block(x, shortcut)
            x, shortcut = y if block.residual_quant is not None else (y, y)
            outputs.append(x)
        outputs.append(self.head(self._head_input(x)))
        return outputs

    def graph_nodes(self) -> list[GraphNode]:
        """The residual body as golden graph nodes: block ``i`` is conv node ``res{i}``
        (``i`` from 1) with its shortcut's ``res{i}.pool`` / ``res{i}.repeat`` before it
        (and, with ``residual_bits``, the residual stream's conv ``res{i}.res``)."""
        nodes, source, shortcut = [], "input", "input"
        for i, block in enumerate(self.blocks):
            name = f"res{i + 1}"
            nodes += block.graph_nodes(name, source, shortcut=shortcut)
            source = name
            shortcut = f"{name}.res" if block.residual_quant is not None else name
        return nodes

    def export_bundle(self) -> Bundle:
        """Fold the (eval-mode) model into a version-2 deployment bundle: the stem and the
        head on the host, the residual body as a graph (:meth:`graph_nodes`); with
        ``dup_input`` the stem's output rows (weights, thresholds, signs) repeated."""
        stem = self.stem.export()
        if self.dup_input > 1:        # DupNet: the stem's output channels repeated
            stem.arrays = {name: np.tile(a, (self.dup_input,) + (1,) * (a.ndim - 1))
                           for name, a in stem.arrays.items()}
        return Bundle(
            binary_layers=[], input_shape=(self.stem.weight.shape[0] * self.dup_input,
                                           self.stem_side, self.stem_side),
            host_layers=[stem, self.head.export()],
            model={"name": "bitdet-residual-detector", "classes": list(self.class_names),
                   "input": [self.in_channels, self.image_size, self.image_size],
                   "grid_stride": self.stride,
                   "activation_bits": self.blocks[-1].quant.bits,
                   "head": "yolo-lite: objectness, tx, ty, tw, th, class logits per cell"},
            graph=self.graph_nodes(), input_bits=self.stem.bits)


class ResidualRealBlock(nn.Module):
    """Real-valued counterpart of :class:`ResidualBinaryBlock` as
    :class:`ResidualBinaryDetector` uses it: ``ReLU(BN(conv(x)) + β·shortcut(x))`` with a
    float 3×3 conv (``stride``, zero padding), the learned per-channel gain β and the same
    shortcut (2×2 max-pool where the block has stride 2, channels repeated where it widens).
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
                 kernel: int = 3):
        super().__init__()
        if out_channels % in_channels:
            raise ValueError(f"a shortcut needs out_channels ({out_channels}) to be a multiple "
                             f"of in_channels ({in_channels}) (channel repetition)")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride,
                              padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.shortcut_gain = nn.Parameter(torch.ones(out_channels))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.max_pool2d(x, 2, 2)
        if self.out_channels != x.shape[1]:
            x = x.repeat(1, self.out_channels // x.shape[1], 1, 1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.conv(x), x)

    def finish(self, conv_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The block's output from its conv's output and its input."""
        pre = self.bn(conv_out) + self.shortcut_gain.reshape(1, -1, 1, 1) * self.shortcut(x)
        return F.relu(pre)


class ResidualRealDetector(nn.Module):
    """Real-valued counterpart of :class:`ResidualBinaryDetector` (same constructor; the
    ``fp`` method of the residual architecture, the teacher of its distillation methods).

    Float stem (3×3, stride 2, BN, ReLU; ``stem[0]`` is the conv) on ``pixels / 255`` →
    :class:`ResidualRealBlock` s with the binary model's widths, strides and shortcuts →
    1×1 head with a bias. The bit widths (``stem_bits``, ``act_bits``, ``residual_bits``)
    are accepted and ignored: a real-valued model has one stream, so one ``fp`` model is the
    counterpart of the W1A2 and the W1A1 residual detectors alike. Same grid, ``stride`` and
    head channels as the binary model; not exportable to a bundle.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (16, 16, 32, 32, 32),
                 strides: tuple[int, ...] = (1, 2, 2, 1), image_size: int = 64,
                 class_names: tuple[str, ...] | None = None, stem_bits: int = 2,
                 act_bits: int = 2, residual_bits: int = 0):
        super().__init__()
        del stem_bits, act_bits, residual_bits           # one real-valued stream
        if len(strides) != len(widths) - 1 or not strides:
            raise ValueError(f"strides needs one entry per residual block ({len(widths) - 1}), "
                             f"got {len(strides)}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.class_names = tuple(class_names or (str(i) for i in range(num_classes)))
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1,
                                            bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.blocks = nn.ModuleList(
            ResidualRealBlock(cin, cout, stride=stride)
            for cin, cout, stride in zip(widths[:-1], widths[1:], strides, strict=True))
        self.head = nn.Conv2d(widths[-1], 5 + num_classes, 1)
        self.stride = 2 ** (1 + sum(s == 2 for s in strides))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixels)[-1]

    def intermediates(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Stem output, every block's output, and the head map."""
        x = self.stem(pixels / PIXEL_MAX)
        outputs = [x]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        outputs.append(self.head(x))
        return outputs
