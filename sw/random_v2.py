"""Random contract-v2 networks with every corner case, as float modules and bundles.

:func:`random_v2_network` draws, from one seed, a small network of
:class:`~bitdet.sw.models.ResidualBinaryBlock` s over an n-bit input: input, activation
and residual-stream bits 1 … 4 (per block), shortcuts of 1 … 4 bits or none, odd channel
counts, stride 1 and 2 (the shortcut then max-pooled over levels), channel growth (the
shortcut's channels repeated), max-pools on the main path, padding at random levels,
BatchNorm statistics with γ < 0 and γ = 0 (constant channels) and pre-activations that
land exactly on a quantizer's decision boundary (ties). It returns the float network
(eval mode) and its folded format-2 bundle, so that every path can be compared at every
node: the float values (mapped back to levels), the golden model, the reloaded bundle and
a device (:func:`compare_paths`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bitdet.core.bundle import Bundle
from bitdet.core.golden import GraphNode, PoolPass

__all__ = ["RandomV2Net", "random_v2_network"]


@dataclass(frozen=True)
class _BlockSpec:
    width: int
    stride: int
    out_bits: int
    shortcut: bool
    pad_level: int
    pool_after: bool


class RandomV2Net(nn.Module):
    """A chain of residual blocks with optional shortcuts and main-path max-pools.

    Node names: block ``i`` is ``b{i}`` (its residual-stream output ``b{i}.res`` when
    ``residual_bits`` > 0), a max-pool after it ``b{i}.mp`` (``b{i}.res.mp`` for the
    residual stream); :meth:`to_graph` adds the shortcut's ``.pool`` / ``.repeat`` nodes
    of a block that downsamples or grows (:meth:`ResidualBinaryBlock.graph_nodes`).
    """

    def __init__(self, in_channels: int, input_bits: int, specs: list[_BlockSpec],
                 residual_bits: int):
        super().__init__()
        from .models import LevelQuantizer, ResidualBinaryBlock
        self.input_grid = LevelQuantizer(input_bits, learn=False,
                                         **({} if input_bits == 1 else
                                            {"step": 0.25, "zero": -0.5}))
        self.specs = list(specs)
        self.residual_bits = residual_bits
        self.blocks = nn.ModuleList()
        cin, grid, sc_grid = in_channels, self.input_grid, self.input_grid
        for spec in self.specs:
            block = ResidualBinaryBlock(
                cin, spec.width, in_bits=grid.bits, out_bits=spec.out_bits,
                shortcut_bits=sc_grid.bits if spec.shortcut else 0, stride=spec.stride,
                residual_bits=residual_bits, pad_level=spec.pad_level, in_grid=grid,
                shortcut_grid=sc_grid if spec.shortcut else None)
            self.blocks.append(block)
            cin, grid = spec.width, block.quant
            sc_grid = block.residual_quant if residual_bits else block.quant

    def grids(self) -> dict:
        """The quantizer whose grid each node's values lie on (to map them to levels)."""
        out = {}
        for i, block in enumerate(self.blocks):
            names = [(f"b{i}", block.quant)]
            if self.residual_bits:
                names.append((f"b{i}.res", block.residual_quant))
            for name, quant in names:
                out[name] = quant
                if self.specs[i].pool_after:
                    out[f"{name}.mp"] = quant
        return out

    def intermediates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's float values (eval mode) from the input's values."""
        out, shortcut = {}, x
        for i, (block, spec) in enumerate(zip(self.blocks, self.specs, strict=True)):
            y = block(x, shortcut if spec.shortcut else None)
            x, r = y if self.residual_bits else (y, y)
            out[f"b{i}"] = x
            if self.residual_bits:
                out[f"b{i}.res"] = r
            if spec.pool_after:
                x = out[f"b{i}.mp"] = F.max_pool2d(x, 2)
                if self.residual_bits:
                    r = out[f"b{i}.res.mp"] = F.max_pool2d(r, 2)
                else:
                    r = x
            shortcut = r
        return out

    def to_graph(self) -> list[GraphNode]:
        nodes, source, shortcut = [], "input", "input"
        for i, (block, spec) in enumerate(zip(self.blocks, self.specs, strict=True)):
            nodes += block.graph_nodes(f"b{i}", source, shortcut if spec.shortcut else None)
            source = f"b{i}"
            shortcut = f"b{i}.res" if self.residual_bits else source
            if spec.pool_after:
                nodes.append(GraphNode(f"{source}.mp", PoolPass(2), input=source))
                if self.residual_bits:
                    nodes.append(GraphNode(f"{shortcut}.mp", PoolPass(2), input=shortcut))
                    shortcut = f"{shortcut}.mp"
                else:
                    shortcut = f"{source}.mp"
                source = f"{source}.mp"
        return nodes


def _draw_specs(rng: random.Random, size: int, in_channels: int, input_bits: int
                ) -> list[_BlockSpec]:
    specs, cin, bits = [], in_channels, input_bits
    for _ in range(rng.randint(2, 4)):
        stride = 2 if size % 2 == 0 and size >= 4 and rng.random() < 0.4 else 1
        size //= stride
        width = cin * rng.choice((1, 1, 2, 3))
        if width > 48:
            width = cin
        pool_after = size % 2 == 0 and size >= 4 and rng.random() < 0.25
        size //= 2 if pool_after else 1
        out_bits = rng.randint(1, 4)
        specs.append(_BlockSpec(width, stride, out_bits, rng.random() < 0.75,
                                rng.randrange(1 << bits), pool_after))
        cin, bits = width, out_bits
    return specs


def _randomize(block, generator: torch.Generator, ties: bool) -> None:
    from .demo import _randomize_block
    _randomize_block(block, generator)
    if not ties:
        return
    # a pre-activation exactly on a decision boundary: zero BN scale makes the channel
    # constant, so put its bias on the quantizer's first boundary
    with torch.no_grad():
        o = block.out_channels
        channel = int(torch.randint(o, (), generator=generator))
        block.bn.weight[channel] = 0.0
        quant = block.quant
        boundary = (0.0 if quant.bits == 1 else
                    float(quant.zero_point()) + 0.5 * float(quant.scale()))
        block.bn.bias[channel] = boundary + float(block.sign_bias[channel])
        if block.shortcut_gain is not None:
            block.shortcut_gain[channel] = 0.0


def random_v2_network(seed: int) -> tuple[RandomV2Net, Bundle, dict]:
    """A random contract-v2 network (eval mode), its format-2 bundle and its draw
    (``{"input_bits", "input_shape", "residual_bits", "blocks"}``), all from ``seed``."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    input_bits = rng.randint(1, 4)
    in_channels = rng.choice((1, 3, 5, 7))
    size = rng.choice((6, 8, 12))
    residual_bits = rng.choice((0, 0, 1, 2, 3, 4))
    specs = _draw_specs(rng, size, in_channels, input_bits)
    net = RandomV2Net(in_channels, input_bits, specs, residual_bits)
    for block in net.blocks:
        _randomize(block, generator, ties=rng.random() < 0.5)
    net.eval()
    shape = (in_channels, size, size)
    draw = {"input_bits": input_bits, "input_shape": shape, "residual_bits": residual_bits,
            "blocks": [spec.__dict__ for spec in specs]}
    bundle = Bundle(binary_layers=[], input_shape=shape, host_layers=[],
                    model={"name": "bitdet-random-v2", "seed": seed,
                           "note": "random weights: a numerics check, not a detector"},
                    graph=net.to_graph(), input_bits=input_bits)
    return net, bundle, draw
