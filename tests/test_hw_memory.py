# amaranth: UnusedElaboratable=no
"""On-chip memories (amaranth.sim): column memories and the ping-pong activation buffer.

Cycle numbers count testbench cycles: what is set in cycle ``t`` is sampled by the clock
edge that ends cycle ``t``; a synchronous read port's data for the address of cycle ``t``
is read in cycle ``t + 1``.
"""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
from amaranth.back import verilog
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig
from bitdet.hw.memory import (
    ActivationBuffer,
    ColumnMemory,
    activation_buffer,
    threshold_layout,
    threshold_memory,
    weight_memory,
)

CONFIG = AcceleratorConfig(rows=3, cols=4, simd=16, weight_depth=32, threshold_depth=8,
                           activation_depth=64, max_channels=64, output_bits=2)


def simulate(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def test_factories_size_the_memories_from_the_config():
    w = weight_memory(CONFIG)
    assert (w.shape, w.depth, w.columns, w.addr_width) == (16, 32, 4, 5)
    t = threshold_memory(CONFIG)
    assert (t.depth, t.columns) == (8, 4)
    assert t.shape == threshold_layout(CONFIG)
    assert threshold_layout(CONFIG).size == CONFIG.thresholds_per_channel * \
        CONFIG.threshold_width
    a = activation_buffer(CONFIG)
    assert (a.simd, a.depth, a.read_ports, a.addr_width) == (16, 64, 3, 6)
    assert activation_buffer(CONFIG, read_ports=1).read_ports == 1
    bits = CONFIG.memory_bits()
    assert bits["weights"] == w.columns * w.depth * 16
    assert bits["thresholds"] == t.columns * t.depth * t.shape.size
    assert bits["activations"] == 2 * a.depth * a.simd


def test_weight_memory_write_read_latency_and_hold():
    """Each column keeps its own words; data follows the address by one cycle; ``en``
    low holds the last word."""
    dut = weight_memory(CONFIG)
    rng = np.random.default_rng(1)
    contents = rng.integers(0, 1 << 16, size=(CONFIG.cols, CONFIG.weight_depth))

    async def testbench(ctx):
        for c in range(CONFIG.cols):
            for a in range(CONFIG.weight_depth):
                ctx.set(dut.write.en, 1)
                ctx.set(dut.write.addr, a)
                ctx.set(dut.write.column, c)
                ctx.set(dut.write.data, int(contents[c, a]))
                await ctx.tick()
        ctx.set(dut.write.en, 0)
        ctx.set(dut.read.en, 1)
        order = rng.permutation(CONFIG.weight_depth)
        previous = None
        for a in order:
            ctx.set(dut.read.addr, int(a))
            if previous is not None:             # the data of the previous cycle's address
                assert [ctx.get(dut.read.data[c]) for c in range(CONFIG.cols)] == \
                    list(contents[:, previous])
            await ctx.tick()
            previous = a
        ctx.set(dut.read.en, 0)                   # hold: a new address is not read
        ctx.set(dut.read.addr, int(order[0]))
        for _ in range(3):
            await ctx.tick()
            assert [ctx.get(dut.read.data[c]) for c in range(CONFIG.cols)] == \
                list(contents[:, order[-1]])

    simulate(dut, testbench)


def test_threshold_memory_entries():
    dut = threshold_memory(CONFIG)
    rng = np.random.default_rng(2)
    n, width = CONFIG.thresholds_per_channel, CONFIG.threshold_width
    entries = rng.integers(0, 1 << width, size=(CONFIG.cols, CONFIG.threshold_depth, n))

    async def testbench(ctx):
        for c in range(CONFIG.cols):
            for a in range(CONFIG.threshold_depth):
                ctx.set(dut.write.en, 1)
                ctx.set(dut.write.addr, a)
                ctx.set(dut.write.column, c)
                ctx.set(dut.write.data, [int(v) for v in entries[c, a]])
                await ctx.tick()
        ctx.set(dut.write.en, 0)
        for a in range(CONFIG.threshold_depth):
            ctx.set(dut.read.addr, a)
            await ctx.tick()
            for c in range(CONFIG.cols):
                got = ctx.get(dut.read.data[c])
                assert [got[i] for i in range(n)] == list(entries[c, a])

    simulate(dut, testbench)


@pytest.mark.parametrize("depth", [16, 12])          # a power of two and not
def test_activation_buffer_ping_pong(depth):
    """Writes go to bank ``1 − select``, reads to bank ``select``; swapping ``select``
    turns the written bank into the read one. Ports read independently, one cycle late."""
    ports = 3
    dut = ActivationBuffer(simd=8, depth=depth, read_ports=ports)
    rng = np.random.default_rng(depth)
    banks = rng.integers(0, 256, size=(2, depth))

    async def read_all(ctx, bank):
        for a in range(depth + 1):
            for p in range(ports):
                ctx.set(dut.read[p].en, 1)
                ctx.set(dut.read[p].addr, (a + p) % depth)
            if a:
                for p in range(ports):
                    assert ctx.get(dut.read[p].data) == banks[bank, (a - 1 + p) % depth]
            await ctx.tick()

    async def testbench(ctx):
        for bank in (0, 1):
            ctx.set(dut.select, 1 - bank)             # write bank `bank`
            for a in range(depth):
                ctx.set(dut.write.en, 1)
                ctx.set(dut.write.addr, a)
                ctx.set(dut.write.data, int(banks[bank, a]))
                await ctx.tick()
        ctx.set(dut.write.en, 0)
        ctx.set(dut.select, 0)
        await read_all(ctx, 0)
        ctx.set(dut.select, 1)
        await read_all(ctx, 1)
        # a write while reading: it lands in the other bank, the read bank is unchanged
        ctx.set(dut.write.en, 1)
        ctx.set(dut.write.addr, 0)
        ctx.set(dut.write.data, int(banks[1, 0]) ^ 0xFF)
        ctx.set(dut.read[0].addr, 0)
        await ctx.tick()
        ctx.set(dut.write.en, 0)
        assert ctx.get(dut.read[0].data) == banks[1, 0]
        banks[0, 0] = int(banks[1, 0]) ^ 0xFF
        ctx.set(dut.select, 0)
        await read_all(ctx, 0)
        # hold: with en low the port keeps its word, even across a bank swap
        ctx.set(dut.read[1].addr, 5)
        await ctx.tick()
        ctx.set(dut.read[1].en, 0)
        ctx.set(dut.read[1].addr, 6)
        ctx.set(dut.select, 1)
        for _ in range(2):
            await ctx.tick()
            assert ctx.get(dut.read[1].data) == banks[0, 5]

    simulate(dut, testbench)


@pytest.mark.parametrize(("cls", "kwargs", "error", "message"), [
    (ActivationBuffer, {"simd": 8, "depth": 0}, ValueError, "depth must be at least 1"),
    (ActivationBuffer, {"simd": 8, "depth": 4, "read_ports": "2"}, TypeError,
     "read_ports must be an integer"),
    (ColumnMemory, {"shape": 8, "depth": 4, "columns": 0}, ValueError,
     "columns must be at least 1"),
])
def test_memories_validate_parameters(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)


def test_memories_convert_to_verilog():
    text = verilog.convert(ActivationBuffer(simd=8, depth=16, read_ports=2),
                           name="activation_buffer")
    assert "module activation_buffer" in text
    assert "read__0__data" in text and "write__en" in text
    text = verilog.convert(weight_memory(CONFIG), name="weight_memory")
    assert "module weight_memory" in text
