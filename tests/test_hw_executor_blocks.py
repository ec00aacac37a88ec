# amaranth: UnusedElaboratable=no
"""The executor's blocks on their own (amaranth.sim): CONFIGURE_LAYER's checks against
:meth:`LayerDescriptor.refusal`, the layer table, the host's memory writes and the cycle
counters."""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import dataclasses

import numpy as np
from amaranth.sim import Simulator

from bitdet.core.config import load_config
from bitdet.core.descriptor import LAYER_DESCRIPTOR_SIZE, LayerDescriptor, descriptor_fields
from bitdet.core.protocol import Opcode
from bitdet.hw.counters import CycleCounters
from bitdet.hw.host_writer import HostWriter
from bitdet.hw.layer_table import LayerCheck, LayerTable


def simulate(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def random_descriptors(config, rng, n):
    """Valid convolutions and pool passes, most with one or two fields changed to a value
    near a limit (or any value of the field's bits)."""
    depth = config.activation_depth
    edges = {"in_h": (0, 1, depth, depth + 1), "in_w": (0, 1, depth, depth + 1),
             "channels": (0, config.max_channels, config.max_channels + 1),
             "out_channels": (0, config.max_channels, config.max_channels + 1),
             "kernel": (0, 1, config.max_kernel, config.pool_max_kernel + 1),
             "stride": (0, 1, config.max_stride, config.pool_max_kernel + 1),
             "padding": (0, 1, config.max_kernel), "out_h": (0, 1, 2, 3), "out_w": (0, 1, 3),
             "input_base": (0, depth - 1, depth), "output_base": (0, depth - 1, depth),
             "weight_base": (0, config.weight_depth), "threshold_base": (0, 1),
             "pad_bit": (0, 1), "raw": (0, 1), "pool": (0, 1), "reserved": (0, 1, 16)}
    bits = {f.name: f.metadata["bits"] for f in descriptor_fields()}
    out = []
    for _ in range(n):
        size = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        if rng.random() < 0.5:
            kernel = int(rng.integers(1, config.max_kernel + 1))
            desc = LayerDescriptor.conv(
                in_h=size[0] + kernel, in_w=size[1] + kernel,
                channels=int(rng.integers(1, 20)), out_channels=int(rng.integers(1, 20)),
                kernel=kernel, stride=int(rng.integers(1, config.max_stride + 1)),
                padding=int(rng.integers(0, kernel)), pad_bit=int(rng.integers(0, 2)))
        else:
            kernel = int(rng.integers(1, config.pool_max_kernel + 1))
            desc = LayerDescriptor.pool_pass(
                in_h=size[0] + kernel, in_w=size[1] + kernel,
                channels=int(rng.integers(1, 20)), kernel=kernel,
                stride=int(rng.integers(1, config.pool_max_kernel + 1)))
        for _ in range(int(rng.integers(0, 3))):
            name = str(rng.choice(list(edges)))
            value = (int(rng.choice(edges[name])) if rng.random() < 0.8
                     else int(rng.integers(0, 1 << min(bits[name], 20))))
            desc = dataclasses.replace(desc, **{name: value})
        out.append(desc)
    return out


@pytest.mark.parametrize("preset", ["tiny", "icebreaker"])
def test_layer_check_matches_the_descriptors_refusal(preset):
    """The registered checks answer as LayerDescriptor.refusal: the first stage with a
    problem (1 refused, 2 too large, 3 misfit) or none."""
    config = load_config(preset)
    dut = LayerCheck(config=config)
    cases = random_descriptors(config, np.random.default_rng(7), 400)
    got = []

    async def testbench(ctx):
        for desc in cases:
            ctx.set(dut.descriptor.as_value(), int.from_bytes(desc.encode(), "little"))
            await ctx.tick()
            refused, too_large, misfit = (ctx.get(s) for s in (dut.refused, dut.too_large,
                                                                 dut.misfit))
            got.append(1 if refused else 2 if too_large else 3 if misfit else 0)

    simulate(dut, testbench)
    for desc, stage in zip(cases, got, strict=True):
        stages = [p.stage for p in desc.problems(config) if p.stage]
        assert stage == min(stages, default=0), (desc, desc.problems(config))
    assert set(got) == {0, 1, 2, 3}                 # every outcome was exercised


def test_layer_table_stores_and_loads():
    dut = LayerTable(entries=4)
    entries = {1: bytes(range(32)), 3: bytes(range(100, 132))}
    loaded = {}

    async def testbench(ctx):
        assert ctx.get(dut.valid) == 0
        for entry, payload in entries.items():
            ctx.set(dut.entry, entry)
            ctx.set(dut.store, 1)
            for i, byte in enumerate(payload):
                ctx.set(dut.store_data, byte)
                assert ctx.get(dut.stored) == (i == LAYER_DESCRIPTOR_SIZE - 1)
                await ctx.tick()
            ctx.set(dut.store, 0)
        assert ctx.get(dut.valid) == 0b1010
        for entry in entries:
            ctx.set(dut.entry, entry)
            ctx.set(dut.load, 1)
            data = []
            for _ in range(LAYER_DESCRIPTOR_SIZE + 1):
                if ctx.get(dut.load_data.valid):
                    data.append(ctx.get(dut.load_data.payload))
                done = ctx.get(dut.loaded)
                await ctx.tick()
            assert done
            ctx.set(dut.load, 0)
            loaded[entry] = bytes(data)
        ctx.set(dut.invalidate, 1)
        ctx.set(dut.invalidate_entry, 3)
        await ctx.tick()
        ctx.set(dut.invalidate, 0)
        assert ctx.get(dut.valid) == 0b0010
        ctx.set(dut.clear, 1)
        await ctx.tick()
        assert ctx.get(dut.valid) == 0

    simulate(dut, testbench)
    assert loaded == entries
    with pytest.raises(ValueError, match="entries must be a positive integer"):
        LayerTable(entries=0)


def test_host_writer_writes_whole_entries():
    """A WRITE_WEIGHTS payload of two entries from address 5: each column word is written
    the cycle after its last byte; a frame that ends inside an entry is an error."""
    config = load_config("tiny")                   # simd 8: one byte per column word
    dut = HostWriter(config=config)
    cols = config.cols
    payload = bytes(range(1, 2 * cols + 1))
    writes = []

    async def testbench(ctx):
        ctx.set(dut.opcode, Opcode.WRITE_WEIGHTS)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.address, 5)
        ctx.set(dut.address_valid, 1)
        await ctx.tick()
        ctx.set(dut.address_valid, 0)
        for byte in payload:
            ctx.set(dut.data.valid, 1)
            ctx.set(dut.data.payload, byte)
            await ctx.tick()
            ctx.set(dut.data.valid, 0)
            if ctx.get(dut.weights.en):
                writes.append((ctx.get(dut.weights.addr), ctx.get(dut.weights.column),
                               ctx.get(dut.weights.data)))
        assert not ctx.get(dut.error)
        ctx.set(dut.data.valid, 1)                  # one byte of a third entry
        await ctx.tick()
        ctx.set(dut.data.valid, 0)
        assert ctx.get(dut.error)
        assert not ctx.get(dut.thresholds.en) and not ctx.get(dut.activations.en)

    simulate(dut, testbench)
    assert writes == [(5 + i // cols, i % cols, byte) for i, byte in enumerate(payload)]


def test_host_writer_flags_writes_past_the_memory():
    config = load_config("tiny")
    dut = HostWriter(config=config)

    async def testbench(ctx):
        ctx.set(dut.opcode, Opcode.WRITE_ACTIVATIONS)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        ctx.set(dut.address, config.activation_depth)
        ctx.set(dut.address_valid, 1)
        await ctx.tick()
        ctx.set(dut.address_valid, 0)
        ctx.set(dut.data.valid, 1)
        await ctx.tick()
        ctx.set(dut.data.valid, 0)
        assert not ctx.get(dut.activations.en)
        assert ctx.get(dut.error)

    simulate(dut, testbench)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        HostWriter(config="tiny")


def test_cycle_counters_count_one_cycle_behind():
    dut = CycleCounters()
    pattern = [(1, 0), (1, 1), (0, 0), (1, 1), (1, 0)]

    async def testbench(ctx):
        for busy, stall in pattern:
            ctx.set(dut.busy, busy)
            ctx.set(dut.stall, stall)
            await ctx.tick()
        ctx.set(dut.busy, 0)
        ctx.set(dut.stall, 0)
        assert (ctx.get(dut.busy_cycles), ctx.get(dut.stall_cycles)) == (3, 2)
        await ctx.tick()
        assert (ctx.get(dut.busy_cycles), ctx.get(dut.stall_cycles)) == (4, 2)
        ctx.set(dut.clear, 1)
        await ctx.tick()
        assert (ctx.get(dut.busy_cycles), ctx.get(dut.stall_cycles)) == (0, 0)

    simulate(dut, testbench)
