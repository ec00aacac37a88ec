# amaranth: UnusedElaboratable=no
"""Binary max-pool engine (amaranth.sim): random packed maps in a memory, the pooled map
in another one, compared word for word with ``pack_activations(golden.binary_maxpool2d)``,
and the counters with the closed form of docs/hardware.md (*Pool engine*)."""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.packing import pack_activations
from bitdet.core.protocol import decode_layer, encode_layer
from bitdet.hw.pool import POOL_OVERHEAD_CYCLES, PoolEngine, pool_busy_cycles


def words_of(packed: np.ndarray, simd: int) -> list[int]:
    """uint8 ``H×W×bytes`` (pack_activations of one image) → ``simd``-bit words."""
    flat = packed.reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def run_pool(config, desc, input_words, *, fill=0):
    """Simulate one pass: ``input_words`` at ``input_base`` of the input memory, the output
    memory pre-filled with ``fill``; returns (output memory words, busy, stall, cycles from
    start to done)."""
    depth = config.activation_depth
    engine = PoolEngine(config=config)
    image = [0] * depth
    for i, word in enumerate(input_words):
        image[desc["input_base"] + i] = word
    m = Module()
    m.submodules.engine = engine
    m.submodules.src = src = Memory(shape=config.simd, depth=depth, init=image)
    m.submodules.dst = dst = Memory(shape=config.simd, depth=depth, init=[fill] * depth)
    rd, wr = src.read_port(), dst.write_port()
    m.d.comb += [rd.addr.eq(engine.act_read.addr), rd.en.eq(engine.act_read.en),
                 engine.act_read.data.eq(rd.data),
                 wr.addr.eq(engine.act_write.addr), wr.en.eq(engine.act_write.en),
                 wr.data.eq(engine.act_write.data)]
    result = {}

    async def testbench(ctx):
        for name in ("in_h", "in_w", "channels", "out_h", "out_w", "kernel", "stride",
                     "input_base", "output_base"):
            ctx.set(getattr(engine.layer, name), desc[name])
        ctx.set(engine.start, 1)
        await ctx.tick()
        ctx.set(engine.start, 0)
        cycles = 1
        while not ctx.get(engine.done):
            assert ctx.get(engine.busy)
            await ctx.tick()
            cycles += 1
            assert cycles < 100000
        result["busy"] = ctx.get(engine.busy_cycles)
        result["stall"] = ctx.get(engine.stall_cycles)
        result["cycles"] = cycles
        result["memory"] = [ctx.get(dst.data[i]) for i in range(depth)]

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return result["memory"], result["busy"], result["stall"], result["cycles"]


CASES = [
    # config, (in_h, in_w, channels, kernel, stride), input_base, output_base
    ("tiny", (7, 9, 11, 2, 2), 3, 5),          # odd H/W, C not a multiple of simd 8
    ("tiny", (5, 7, 13, 3, 1), 0, 200),        # kernel 3 stride 1
    ("tiny", (9, 6, 5, 3, 2), 17, 1),          # kernel 3 stride 2, one word per pixel
    ("tiny", (6, 8, 20, 2, 1), 2, 301),        # kernel 2 stride 1, 3 words per pixel
    ("icebreaker", (7, 5, 37, 3, 3), 10, 500),  # 16-bit words, stride 3
    ({"rows": 3, "cols": 4, "simd": 24, "weight_depth": 64, "threshold_depth": 16,
      "activation_depth": 100, "max_channels": 48}, (5, 5, 30, 2, 2), 1, 70),  # depth ≠ 2ⁿ
]


@pytest.mark.parametrize(("preset", "shape", "input_base", "output_base"), CASES)
def test_pool_engine_matches_golden(preset, shape, input_base, output_base):
    config = load_config(preset) if isinstance(preset, str) else AcceleratorConfig(**preset)
    simd = config.simd
    in_h, in_w, channels, kernel, stride = shape
    engine = PoolEngine(config=config)
    desc = engine.descriptor(in_h=in_h, in_w=in_w, channels=channels, kernel=kernel,
                             stride=stride, input_base=input_base, output_base=output_base)
    assert decode_layer(encode_layer(**desc)) == desc
    rng = np.random.default_rng(sum(shape))
    # sparse bits, so that the OR of a window is not almost always 1
    bits = torch.from_numpy((rng.random((1, channels, in_h, in_w)) < 0.2).astype(np.int32))
    pooled = golden.binary_maxpool2d(bits, kernel, stride)
    assert pooled.shape[2:] == (desc["out_h"], desc["out_w"])
    assert 0 < int(pooled.sum()) < pooled.numel()
    x = bits.to(torch.float32) * 2 - 1
    expected = words_of(pack_activations(pooled.to(torch.float32) * 2 - 1,
                                         word_bits=simd)[0], simd)
    fill = (1 << simd) - 1 - 0x5A
    memory, busy, stall, cycles = run_pool(
        config, desc, words_of(pack_activations(x, word_bits=simd)[0], simd), fill=fill)
    out = memory[output_base:output_base + len(expected)]
    assert out == expected
    # nothing outside the output map was written
    assert all(v == fill for v in memory[:output_base] + memory[output_base + len(expected):])
    # the closed form, computed here from the descriptor, not from the engine
    words = -(-channels // simd)
    reads = desc["out_h"] * desc["out_w"] * words * kernel ** 2
    assert (busy, stall) == (reads + 4, 4) == pool_busy_cycles(config, desc)
    assert POOL_OVERHEAD_CYCLES == 4
    assert cycles == busy + 1                      # start cycle … done cycle


def test_pool_descriptor_checks():
    config = load_config("tiny")
    engine = PoolEngine(config=config)
    assert engine.max_kernel == 3
    desc = engine.descriptor(in_h=5, in_w=4, channels=9, kernel=2)
    assert (desc["out_h"], desc["out_w"], desc["stride"], desc["pool"]) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="kernel"):
        engine.descriptor(in_h=5, in_w=4, channels=9, kernel=4)
    with pytest.raises(ValueError, match="larger than"):
        engine.descriptor(in_h=2, in_w=4, channels=9, kernel=3)
    with pytest.raises(ValueError, match="output map"):
        engine.descriptor(in_h=5, in_w=4, channels=9, kernel=2, output_base=510)
    with pytest.raises(ValueError, match="input map"):
        engine.descriptor(in_h=20, in_w=20, channels=9, kernel=2)      # 800 words
    with pytest.raises(TypeError):
        PoolEngine(config="tiny")


def test_pool_engine_verilog():
    text = verilog.convert(PoolEngine(config=load_config("icebreaker")), name="pool")
    assert "module pool" in text


@pytest.mark.parametrize("seed", range(12))
def test_pool_engine_random_shapes(seed):
    """Random arrays, maps, kernels (1 … max), strides and bases: bits and counters."""
    rng = np.random.default_rng(1000 + seed)
    simd = int(rng.choice([8, 16, 24, 32]))
    config = AcceleratorConfig(rows=int(rng.integers(1, 4)), cols=8, simd=simd,
                               weight_depth=64, threshold_depth=16,
                               activation_depth=int(rng.choice([256, 300])), max_channels=64,
                               max_kernel=int(rng.choice([3, 5])), max_stride=2)
    engine = PoolEngine(config=config)
    kernel = int(rng.integers(1, engine.max_kernel + 1))
    stride = int(rng.integers(1, engine.max_kernel + 1))
    channels = int(rng.integers(1, 40))
    words = -(-channels // config.simd)
    while True:
        in_h, in_w = (int(v) for v in rng.integers(kernel, 12, size=2))
        if 2 * in_h * in_w * words <= config.activation_depth:
            break
    out_words = ((in_h - kernel) // stride + 1) * ((in_w - kernel) // stride + 1) * words
    input_base = int(rng.integers(0, config.activation_depth - in_h * in_w * words + 1))
    output_base = int(rng.integers(0, config.activation_depth - out_words + 1))
    desc = engine.descriptor(in_h=in_h, in_w=in_w, channels=channels, kernel=kernel,
                             stride=stride, input_base=input_base, output_base=output_base)
    bits = torch.from_numpy((rng.random((1, channels, in_h, in_w)) < 0.3).astype(np.int32))
    pooled = golden.binary_maxpool2d(bits, kernel, stride)
    expected = words_of(pack_activations(pooled.to(torch.float32) * 2 - 1,
                                         word_bits=config.simd)[0], config.simd)
    memory, busy, stall, _ = run_pool(
        config, desc, words_of(pack_activations(bits.to(torch.float32) * 2 - 1,
                                                word_bits=config.simd)[0], config.simd))
    assert memory[output_base:output_base + len(expected)] == expected
    assert (busy, stall) == (len(expected) * kernel ** 2 + 4, 4)
