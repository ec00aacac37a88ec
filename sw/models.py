"""Model zoo: 1-bit detector building blocks whose eval-mode arithmetic the device reproduces.

Every block computes, in eval mode, exactly what its exported form computes on the host
(fixed point) or on the accelerator (XNOR-popcount + thresholds):

* :class:`BinaryBlock` — ``sign(BN(α·conv(sign x, sign W)) − b)`` with ±1 padding bits and
  an optional max-pool; its epilogue is :func:`bitdet.sw.fold.bn_sign_preactivation`, so
  :meth:`BinaryBlock.export` (the threshold compiler) is exact by construction.
* :class:`QuantStem` — the first layer on the real-valued image: int8 weights (per-channel
  scale, straight-through rounding) on raw pixel values 0..255, so the accumulator is an
  exact integer; BN + sign fold into integer thresholds on it (IFQ-Net style).
* :class:`QuantHead` — the real-valued head: a 1×1 conv with int8 weights and an integer
  bias on the ±1 features, times a per-channel scale.

:class:`BinaryDetector` chains them into a Tinier-YOLO-style single-stage detector and
exports a deployment :class:`~bitdet.sw.bundle.Bundle`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bundle import Bundle, HostLayer
from .fold import BatchNormSign, bn_sign_preactivation, fold_binary_conv, fold_integer_epilogue
from .golden import BinaryConvLayer

__all__ = [
    "BinaryBlock",
    "BinaryConv2d",
    "BinaryDetector",
    "QuantHead",
    "QuantStem",
    "RealDetector",
    "binarize",
]

PIXEL_MAX = 255


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
    padding filled with the ``pad_value`` bit, exactly like :func:`bitdet.sw.golden.binary_conv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
                 padding: int = 0, pad_value: int = -1):
        super().__init__()
        if pad_value not in (-1, 1):
            raise ValueError(f"pad_value must be -1 or +1, not {pad_value!r}")
        self.stride, self.padding, self.pad_value = stride, padding, pad_value
        self.weight = nn.Parameter(
            torch.randn(out_channels, in_channels, kernel, kernel) * 0.1)

    def alpha(self) -> torch.Tensor:
        return self.weight.abs().mean(dim=(1, 2, 3))

    def dot(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding,) * 4, value=float(self.pad_value))
        return F.conv2d(x, _WeightSign.apply(self.weight), stride=self.stride)


class BinaryBlock(nn.Module):
    """Binary conv → BN → minus a learnable sign bias (RSign) → sign → optional max-pool."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *,
                 stride: int = 1, pad_value: int = -1, pool: int | None = None):
        super().__init__()
        self.conv = BinaryConv2d(in_channels, out_channels, kernel, stride=stride,
                                 padding=kernel // 2, pad_value=pad_value)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sign_bias = nn.Parameter(torch.zeros(out_channels))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_accumulator(x)[0]

    def forward_with_accumulator(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's ±1 output and its integer dot products (before α, BN and sign), for
        layer-wise distillation losses."""
        acc = self.conv.dot(x)
        out = binarize(_epilogue_forward(self, acc, self.conv.alpha()))
        if self.pool:
            out = F.max_pool2d(out, self.pool, self.pool)
        return out, acc

    def export(self) -> BinaryConvLayer:
        """The folded device layer (exact: same epilogue arithmetic as eval mode)."""
        conv = self.conv
        return fold_binary_conv(
            conv.weight.detach(), _bn_epilogue(self.bn, conv.alpha(), self.sign_bias),
            stride=conv.stride, padding=conv.padding, pad_value=conv.pad_value,
            pool=(self.pool, self.pool) if self.pool else None)


class QuantStem(nn.Module):
    """First layer on raw pixels (0..255): int8 conv → BN → sign bias → sign, on the host."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, *,
                 stride: int = 2):
        super().__init__()
        self.stride, self.padding = stride, kernel // 2
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) * 0.1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.sign_bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w_int, scale = _int8_weight(self.weight)
        # integer pixels × integer weights: every partial sum is an exact float32 integer
        acc = F.conv2d(pixels, w_int, stride=self.stride, padding=self.padding)
        return binarize(_epilogue_forward(self, acc, scale / PIXEL_MAX))

    def export(self) -> HostLayer:
        w_int, scale = _int8_weight(self.weight.detach())
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

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1)
                                   / in_channels ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def _quantized(self):
        w_int, scale = _int8_weight(self.weight)
        bias_int = _round_ste(self.bias / scale)
        return w_int, bias_int, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_int, bias_int, scale = self._quantized()
        acc = F.conv2d(x, w_int) + bias_int.reshape(1, -1, 1, 1)   # exact integers
        return acc * scale.reshape(1, -1, 1, 1)

    def export(self) -> HostLayer:
        with torch.no_grad():
            w_int, bias_int, scale = self._quantized()
        return HostLayer(name="head", kind="conv_affine",
                         arrays={"weight": w_int.to(torch.int8).numpy(),
                                 "bias": bias_int.to(torch.int32).numpy(),
                                 "scale": scale.to(torch.float32).numpy()})


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
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1,
                 widths: tuple[int, ...] = (16, 32, 64, 128, 128),
                 pools: tuple[bool, ...] = (True, True, False, False), image_size: int = 64,
                 class_names: tuple[str, ...] | None = None):
        super().__init__()
        if len(pools) != len(widths) - 1:
            raise ValueError(f"pools needs one entry per binary block ({len(widths) - 1}), "
                             f"got {len(pools)}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.class_names = tuple(class_names or (str(i) for i in range(num_classes)))
        self.stem = QuantStem(in_channels, widths[0])
        self.blocks = nn.ModuleList(
            BinaryBlock(cin, cout, 3, pool=2 if pool else None)
            for cin, cout, pool in zip(widths[:-1], widths[1:], pools, strict=True))
        self.head = QuantHead(widths[-1], 5 + num_classes)
        self.stride = 2 * 2 ** sum(pools)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.intermediates(pixels)[-1]

    def intermediates(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Stem bits (±1), every binary block's ±1 output, and the head map."""
        x = self.stem(pixels)
        outputs = [x]
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        outputs.append(self.head(x))
        return outputs

    def export_bundle(self) -> Bundle:
        """Fold the (eval-mode) model into a deployment bundle."""
        side = (self.image_size + 2 * self.stem.padding - self.stem.weight.shape[2]) \
            // self.stem.stride + 1
        return Bundle(
            binary_layers=[block.export() for block in self.blocks],
            input_shape=(self.stem.weight.shape[0], side, side),
            host_layers=[self.stem.export(), self.head.export()],
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
