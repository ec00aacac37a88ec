"""A built-in random binary network: fold it, bundle it, and prove the paths agree.

``bitdet demo`` runs :func:`run_demo`: it draws a small float binary network (binary convs
with weight scale, BatchNorm with some γ < 0 and γ = 0, RSign biases, max-pools, 3×3 and
1×1, stride 1 and 2, channel counts that are not multiples of a word), folds it into
integer thresholds, writes a deployment bundle, loads it back, and checks on random
inputs that the float network, the folded network and the reloaded bundle give the same
bits at every layer.

``bitdet demo --bits N --residual`` runs :func:`run_demo_v2`: a random contract-v2 network
(:class:`bitdet.sw.models.ResidualBinaryNet`: N-bit maps, shortcuts around every block,
pooled and channel-repeated where a block downsamples, γ < 0 and constant channels), its
format-2 graph bundle, and the same check at every node, on the contract-2 emulator too
(the ``contract2`` preset). The contract-2 RTL runs such networks in simulation
(``bitdet sim layer``, ``--backend rtl``); the demo stays on the emulator, which is
instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bitdet.core.bundle import Bundle, HostLayer
from bitdet.core.bundle import load as load_bundle
from bitdet.core.fold import BatchNormSign, bn_sign_preactivation, fold_binary_conv

__all__ = ["DEMO_LAYERS", "FloatBinaryBlock", "build_demo", "build_demo_v2", "float_forward",
           "run_demo", "run_demo_v2"]

#: (out_channels, kernel, stride, padding, pad_value, pool) of the demo's binary layers.
DEMO_LAYERS = (
    (24, 3, 1, 1, -1, (2, 2)),
    (33, 3, 1, 1, 1, None),
    (40, 3, 2, 1, -1, None),
    (70, 1, 1, 0, -1, None),
)
DEMO_INPUT = (3, 32, 32)     # the image the host's first layer takes
DEMO_STEM_CHANNELS = 13


@dataclass
class FloatBinaryBlock:
    """A float binary conv block: sign(BN(α·conv(sign x, sign w) + bias) − b), then pool."""

    weight: torch.Tensor          # real-valued latent weights; the conv uses their sign
    epilogue: BatchNormSign
    stride: int
    padding: int
    pad_value: int
    pool: tuple[int, int] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """±1 in → ±1 out (float32), computed the way a float model computes it."""
        w = torch.where(self.weight >= 0, 1.0, -1.0)
        x = F.pad(x, (self.padding,) * 4, value=float(self.pad_value))
        dot = F.conv2d(x, w, stride=self.stride)
        y = torch.where(bn_sign_preactivation(dot, self.epilogue) >= 0, 1.0, -1.0)
        if self.pool is not None:
            y = F.max_pool2d(y, self.pool[0], self.pool[1])
        return y


def _random_epilogue(channels: int, k: int, generator: torch.Generator) -> BatchNormSign:
    """BN statistics in the range the dots really take (std of a ±1 dot is √K)."""
    def randn():
        return torch.randn(channels, generator=generator)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(channels, generator=generator)

    alpha = uniform(0.01, 0.1)
    gamma = randn()
    gamma[torch.rand(channels, generator=generator) < 0.1] = 0.0     # constant channels
    spread = alpha * k ** 0.5
    return BatchNormSign(
        mean=randn() * spread * 0.5, var=(spread * uniform(0.5, 2.0)) ** 2, gamma=gamma,
        beta=randn() * 0.3, eps=1e-5, alpha=alpha, bias=randn() * spread * 0.1,
        sign_bias=randn() * 0.2)


def build_demo(seed: int = 0) -> tuple[HostLayer, list[FloatBinaryBlock], Bundle]:
    """Draw the random float network and fold it; returns (stem, float blocks, bundle)."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    cin, h, w = DEMO_INPUT
    stem_weight = rng.integers(-127, 128, size=(DEMO_STEM_CHANNELS, cin, 3, 3), dtype=np.int8)
    stem = HostLayer(
        name="stem", kind="conv_threshold", stride=1, padding=1, attrs={"zero_point": 128},
        arrays={"weight": stem_weight,
                "thresholds": rng.integers(-3000, 3000, size=(DEMO_STEM_CHANNELS, 1),
                                           dtype=np.int32),
                "sign": rng.choice(np.array([-1, 1], dtype=np.int8), DEMO_STEM_CHANNELS)})
    blocks, layers = [], []
    channels = DEMO_STEM_CHANNELS
    for out_channels, kernel, stride, padding, pad_value, pool in DEMO_LAYERS:
        weight = torch.randn(out_channels, channels, kernel, kernel, generator=generator)
        epilogue = _random_epilogue(out_channels, channels * kernel * kernel, generator)
        block = FloatBinaryBlock(weight, epilogue, stride, padding, pad_value, pool)
        blocks.append(block)
        layers.append(fold_binary_conv(weight, epilogue, stride=stride, padding=padding,
                                       pad_value=pad_value, pool=pool))
        channels = out_channels
    head_channels = 15
    head = HostLayer(
        name="head", kind="conv_affine",
        arrays={"weight": rng.integers(-127, 128, size=(head_channels, channels, 1, 1),
                                       dtype=np.int8),
                "bias": rng.integers(-500, 500, size=head_channels, dtype=np.int32),
                "scale": np.full(head_channels, 1 / 256, dtype=np.float32)})
    bundle = Bundle(binary_layers=layers, input_shape=(DEMO_STEM_CHANNELS, h, w),
                    host_layers=[stem, head],
                    layer_names=[f"bconv{i + 1}" for i in range(len(layers))],
                    model={"name": "bitdet-demo", "seed": seed, "input": list(DEMO_INPUT),
                           "note": "random weights: a numerics demo, not a detector"})
    return stem, blocks, bundle


def float_forward(blocks: list[FloatBinaryBlock], x: torch.Tensor) -> list[torch.Tensor]:
    """Every block's ±1 output for ±1 input ``x``."""
    outputs = []
    for block in blocks:
        x = block.forward(x)
        outputs.append(x)
    return outputs


def run_demo(out: str | Path = "demo.bitdet", *, seed: int = 0, images: int = 4,
             echo=print, force: bool = False) -> bool:
    """Fold, bundle, reload and compare; prints a per-layer table. True when all match.

    The bundle is written atomically to ``out``; an existing ``out`` is refused
    (:class:`~bitdet.sw.files.OutputExists`) unless ``force``.
    """
    from .files import atomic_path, check_new_file
    check_new_file(out, force=force)
    stem, blocks, bundle = build_demo(seed)
    path = Path(out)
    with atomic_path(path) as tmp:
        bundle.save(tmp)
    loaded = load_bundle(path)
    generator = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randint(0, 256, (images, *DEMO_INPUT), generator=generator)
    x = stem.run(pixels).to(torch.float32) * 2 - 1          # host first layer → ±1
    reference = float_forward(blocks, x)
    folded = bundle.run_binary(x)
    reloaded = loaded.run_binary(x)
    head = loaded.host_layers[1].run(reloaded[-1].to(torch.float32) * 2 - 1)
    requirements = loaded.requirements()
    echo(f"bitdet demo: random binary network (seed {seed}), {images} random images "
         f"{DEMO_INPUT[1]}×{DEMO_INPUT[2]}, bundle {path} ({path.stat().st_size} bytes)")
    header = (f"{'layer':8} {'in':>12} {'out':>12} {'kernel':>8} {'K':>5} {'flipped':>7} "
              f"{'const':>5} {'T range':>11} {'float=folded=bundle':>20}")
    echo(header)
    echo("-" * len(header))
    ok = True
    for i, (layer, shape) in enumerate(zip(loaded.binary_layers, requirements.layer_shapes,
                                           strict=True)):
        c, o, kh, _kw, (h, w), (oh, ow) = shape
        float_bits = (reference[i] > 0).to(torch.int32)
        mismatches = int((float_bits != folded[i]).sum() + (folded[i] != reloaded[i]).sum())
        ok &= mismatches == 0
        t = layer.thresholds[:, 0]
        latent = torch.where(blocks[i].weight >= 0, 1.0, -1.0)
        flipped = int((layer.weights != latent).flatten(1).any(dim=1).sum())
        const = int(((t == 0) | (t == layer.k + 1)).sum())
        verdict = "identical" if mismatches == 0 else f"{mismatches} DIFFER"
        echo(f"{loaded.layer_names[i]:8} {f'{c}×{h}×{w}':>12} {f'{o}×{oh}×{ow}':>12} "
             f"{f'{kh}×{kh}/s{layer.stride}':>8} {layer.k:>5} {flipped:>7} {const:>5} "
             f"{f'{int(t.min())}..{int(t.max())}':>11} {verdict:>20}")
    echo(f"head: {tuple(head.shape)} float32 outputs from the fixed-point 1×1 conv")
    echo(f"requirements: max K {requirements.max_k}, max channels "
         f"{requirements.max_in_channels}/{requirements.max_out_channels}, weights "
         f"{requirements.weight_words(32)} 32-bit words, largest feature map "
         f"{requirements.activation_words(32)} 32-bit words")
    echo("all layers bit-exact" if ok else "MISMATCH between the float and the folded network")
    return ok


# -- contract v2: n-bit maps and residual shortcuts ------------------------------------------

#: (width, stride) of the v2 demo's residual blocks; the input has an odd channel count.
DEMO_V2_BLOCKS = ((9, 1), (27, 2), (27, 1))
DEMO_V2_INPUT = (3, 16, 16)


def _randomize_block(block, generator: torch.Generator) -> None:
    """Random BN statistics (γ < 0, and γ = 0: constant channels), biases, shortcut gains,
    weights and quantizer steps, in the range the dots really take."""
    o = block.out_channels
    with torch.no_grad():
        block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=generator))
        bn = block.bn
        bn.running_mean.copy_(torch.randn(o, generator=generator) * 3)
        bn.running_var.copy_(torch.rand(o, generator=generator) * 20 + 0.1)
        bn.weight.copy_(torch.randn(o, generator=generator))
        bn.weight[torch.rand(o, generator=generator) < 0.1] = 0.0
        bn.bias.copy_(torch.randn(o, generator=generator) * 0.5)
        block.sign_bias.copy_(torch.randn(o, generator=generator) * 0.3)
        if block.shortcut_gain is not None:
            block.shortcut_gain.copy_(torch.randn(o, generator=generator))
        for quant in (block.quant, block.residual_quant):
            if quant is not None and quant.bits > 1:
                quant.step.fill_(float(torch.rand((), generator=generator)) * 0.8 + 0.1)
                quant.zero.fill_(float(torch.randn((), generator=generator)) * 0.3)


def build_demo_v2(seed: int = 0, *, bits: int = 2, residual: bool = True):
    """A random contract-v2 network (:class:`bitdet.sw.models.ResidualBinaryNet`: ``bits``-bit
    input and activations, shortcuts around every block — from a separate ``bits``-bit
    residual stream with ``residual`` — a stride-2 block whose shortcut is pooled and its
    channels repeated) in eval mode, and its bundle (format 2). Returns ``(net, bundle)``."""
    from .models import ResidualBinaryNet
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    net = ResidualBinaryNet(DEMO_V2_INPUT[0], widths=tuple(w for w, _ in DEMO_V2_BLOCKS),
                            strides=tuple(s for _, s in DEMO_V2_BLOCKS), input_bits=bits,
                            act_bits=bits, residual_bits=max(bits, 2) if residual else 0)
    for block in net.blocks:
        _randomize_block(block, generator)
    net.eval()
    bundle = Bundle(binary_layers=[], input_shape=DEMO_V2_INPUT, host_layers=[],
                    model={"name": "bitdet-demo-v2", "seed": seed, "bits": bits,
                           "residual": residual,
                           "note": "random weights: a numerics demo, not a detector"},
                    graph=net.to_graph(), input_bits=bits)
    return net, bundle


def _emulator_maps(bundle, levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's map of ``bundle`` on the contract-2 emulator (the ``contract2`` preset,
    through command frames: one RUN_LAYER per pass, each map read back), stacked over the
    images."""
    from .driver import Device
    per_image = []
    with Device.open("emu", "contract2") as device:
        device.load(bundle)
        for i in range(levels.shape[0]):
            per_image.append(device.run_graph(levels[i:i + 1], trace=True))
    return {name: torch.cat([maps[name] for maps in per_image]) for name in per_image[0]}


def run_demo_v2(out: str | Path = "demo.bitdet", *, seed: int = 0, images: int = 4,
                bits: int = 2, residual: bool = True, echo=print, force: bool = False) -> bool:
    """The v2 demo: the float network, its folded golden graph, the reloaded bundle and the
    contract-2 emulator (``contract2`` preset, through command frames) give the same levels
    at every node (printed per node). True when all match."""
    from .files import atomic_path, check_new_file
    check_new_file(out, force=force)
    net, bundle = build_demo_v2(seed, bits=bits, residual=residual)
    path = Path(out)
    with atomic_path(path) as tmp:
        bundle.save(tmp)
    loaded = load_bundle(path)
    generator = torch.Generator().manual_seed(seed + 1)
    levels = torch.randint(0, 1 << bits, (images, *DEMO_V2_INPUT), generator=generator,
                           dtype=torch.int32)
    with torch.no_grad():
        values = net.intermediates(net.input_grid.dequantize(levels))
    folded = bundle.run_graph(levels)
    reloaded = loaded.run_graph(levels)
    emulated = _emulator_maps(loaded, levels)
    echo(f"bitdet demo: random contract-v2 network (seed {seed}), {bits}-bit maps, "
         f"{'an n-bit residual stream' if residual else 'shortcuts from each block input'}, "
         f"{images} random inputs {'×'.join(map(str, DEMO_V2_INPUT))}, bundle {path} "
         f"(format {loaded.format_version}, {path.stat().st_size} bytes)")
    header = (f"{'node':10} {'op':6} {'out':>10} {'bits':>4} {'shortcut':>14} {'flipped':>7} "
              f"{'float=folded=bundle=emulator':>29}")
    echo(header)
    echo("-" * len(header))
    ok = True
    for node in loaded.nodes():
        got = folded[node.name]
        mismatches = int((got != reloaded[node.name]).sum())
        mismatches += int((got != emulated[node.name]).sum())
        op = {"BinaryConvLayer": "conv", "PoolPass": "pool",
              "ChannelRepeat": "repeat"}.get(type(node.op).__name__, "?")
        bits_out = shortcut = flipped = "-"
        if node.name in values:
            i = int(node.name[1:].split(".")[0])
            block = net.blocks[i]
            quant = block.residual_quant if node.name.endswith(".res") else block.quant
            mismatches += int((quant.recover(values[node.name]) != got).sum())
            layer = node.op
            bits_out = str(layer.output_bits)
            shortcut = f"{layer.shortcut_bits}b {node.shortcut}" if layer.shortcut_bits else "-"
            latent = torch.where(block.conv.weight >= 0, 1.0, -1.0)
            flipped = str(int((layer.weights != latent).flatten(1).any(dim=1).sum()))
        ok &= mismatches == 0
        verdict = "identical" if mismatches == 0 else f"{mismatches} DIFFER"
        shape = "×".join(map(str, got.shape[1:]))
        echo(f"{node.name:10} {op:6} {shape:>10} {bits_out:>4} {shortcut:>14} {flipped:>7} "
             f"{verdict:>29}")
    requirements = loaded.requirements()
    echo(f"requirements: max K {requirements.max_k}, input/shortcut bits "
         f"{requirements.max_input_bits}/{requirements.max_shortcut_bits}, "
         f"{requirements.live_maps} maps live at once")
    echo("the emulator ran the contract2 preset (the contract-2 RTL: bitdet sim layer, "
         "--backend rtl)")
    echo("all nodes bit-exact" if ok else "MISMATCH between the float, the folded network, "
         "the bundle and the emulator")
    return ok
