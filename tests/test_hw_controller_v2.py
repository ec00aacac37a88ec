# amaranth: UnusedElaboratable=no
"""Contract-2 layer controller (amaranth.sim) against the emulator, bit for bit and cycle
for cycle: random convolutions with n-bit input planes, m-bit outputs and shortcut rows
on flat slot addresses, with the real window generator, array and threshold units.

The memories start from the same random contents in the simulation and in an
:class:`~bitdet.sw.emulator.Emulator` (its ``activations``, ``weights`` and
``thresholds`` arrays); after one layer every word of every slot must be equal (so the
output map is right and nothing else was written), and the controller's busy and stall
counts must equal :func:`bitdet.core.cycles.layer_cycles`.
"""

import dataclasses

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
from amaranth.hdl import Elaboratable, Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import layer_cycles
from bitdet.core.descriptor import LayerDescriptor
from bitdet.hw.controller_v2 import LayerControllerV2
from bitdet.sw.emulator import Emulator

#: 3 rows, 2 columns, 8-bit words: odd channel counts leave channel padding in every word
#: and a layer has several tiles per word and several words per pixel.
CONFIG = AcceleratorConfig(name="v2ctrl", rows=3, cols=2, simd=8, weight_depth=256,
                           threshold_depth=128, activation_depth=128, max_channels=24,
                           max_kernel=3, max_stride=2, output_bits=3, clock_hz=1_000_000,
                           baud=62_500, contract=2, max_input_bits=3, max_shortcut_bits=2,
                           activation_slots=4)


class Harness(Elaboratable):
    """The controller on memories initialised from an emulator's arrays."""

    def __init__(self, config: AcceleratorConfig, emu: Emulator):
        self.config = c = config
        self.ctrl = LayerControllerV2(config=c)
        wbytes = c.simd // 8
        self.act_init = [int.from_bytes(emu.activations[i].tobytes(), "little")
                         for i in range(len(emu.activations))]
        self.w_init = [sum(int.from_bytes(emu.weights[a, j].tobytes(), "little")
                           << (j * c.simd) for j in range(c.cols))
                       for a in range(c.weight_depth)]
        width, count = c.threshold_width, c.thresholds_per_channel
        self.t_init = [sum(int(emu.thresholds[a, j, k]) << ((j * count + k) * width)
                           for j in range(c.cols) for k in range(count))
                       for a in range(c.threshold_depth)]
        assert wbytes * 8 == c.simd
        self.act = Memory(shape=c.simd, depth=len(self.act_init), init=self.act_init)

    def elaborate(self, platform):
        m = Module()
        c = self.config
        m.submodules.ctrl = ctrl = self.ctrl
        m.submodules.act = self.act
        w = Memory(shape=c.cols * c.simd, depth=c.weight_depth, init=self.w_init)
        t = Memory(shape=len(ctrl.thresholds.data.as_value()), depth=c.threshold_depth,
                   init=self.t_init)
        m.submodules.w, m.submodules.t = w, t
        for port, mem in ((ctrl.weights, w), (ctrl.thresholds, t)):
            rd = mem.read_port()
            m.d.comb += [rd.addr.eq(port.addr), rd.en.eq(port.en),
                         port.data.as_value().eq(rd.data)]
        for port in (*ctrl.act_read, ctrl.sc_read):
            rd = self.act.read_port()
            m.d.comb += [rd.addr.eq(port.addr), rd.en.eq(port.en), port.data.eq(rd.data)]
        wr = self.act.write_port()
        m.d.comb += [wr.addr.eq(ctrl.act_write.addr), wr.en.eq(ctrl.act_write.en),
                     wr.data.eq(ctrl.act_write.data)]
        return m


def random_layer(rng, config) -> LayerDescriptor:
    """A random convolution that CONFIGURE_LAYER accepts (bases, slots and bits at random)."""
    c = config
    while True:
        kernel = int(rng.choice([1, 3]))
        stride = int(rng.integers(1, c.max_stride + 1))
        padding = int(rng.integers(0, kernel // 2 + 1))
        in_h, in_w = (int(v) for v in rng.integers(kernel, 6, size=2))
        in_bits = int(rng.integers(1, c.max_input_bits + 1))
        out_bits = int(rng.integers(1, c.output_bits + 1))
        sc_bits = int(rng.integers(0, c.max_shortcut_bits + 1))
        slots = rng.permutation(c.activation_slots)[:3]
        desc = LayerDescriptor.conv(
            in_h=in_h, in_w=in_w, channels=int(rng.integers(1, 20)),
            out_channels=int(rng.integers(1, 14)), kernel=kernel, stride=stride,
            padding=padding, input_base=int(rng.integers(0, 20)),
            output_base=int(rng.integers(0, 20)), weight_base=int(rng.integers(0, 40)),
            threshold_base=int(rng.integers(0, 40)))
        desc = desc.replace(
            in_bits=in_bits, out_bits=out_bits, shortcut_bits=sc_bits,
            pad_level=int(rng.integers(0, 1 << in_bits)) if padding else 0,
            input_slot=int(slots[0]), output_slot=int(slots[1]),
            shortcut_slot=int(slots[2]) if sc_bits else 0,
            shortcut_base=int(rng.integers(0, 20)) if sc_bits else 0, extended=True)
        if not desc.problems(c):
            return desc


def run_layer(config, desc, seed):
    """Simulate one layer (or a list of layers, back to back in one simulation); ``(slot
    words after, emulator words after, cycles, emulator cycles, context misses)`` (the
    cycles of the last layer)."""
    descs = desc if isinstance(desc, list) else [desc]
    desc = descs[-1]
    rng = np.random.default_rng(seed)
    emu = Emulator(config)
    emu.activations[:] = rng.integers(0, 256, size=emu.activations.shape, dtype=np.uint8)
    emu.weights[:] = rng.integers(0, 256, size=emu.weights.shape, dtype=np.uint8)
    amax = ((1 << desc.in_bits) - 1) * desc.k
    emu.thresholds[:] = rng.integers(0, amax + 2, size=emu.thresholds.shape)
    dut = Harness(config, emu)
    ctrl = dut.ctrl
    result = {}

    async def bench(ctx):
        misses = 0
        for d in descs:
            ctx.set(ctrl.layer.as_value(), _value(d))
            ctx.set(ctrl.start, 1)
            await ctx.tick()
            ctx.set(ctrl.start, 0)
            for _ in range(20000):
                await ctx.tick()
                misses += ctx.get(ctrl.ctx_miss)
                if ctx.get(ctrl.done):
                    break
            else:
                raise AssertionError("the controller did not finish")
        result["cycles"] = (ctx.get(ctrl.busy_cycles), ctx.get(ctrl.stall_cycles))
        result["misses"] = misses
        result["words"] = [ctx.get(dut.act.data[i]) for i in range(len(dut.act_init))]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(bench)
    sim.run()
    for d in descs:
        expected_cycles = emu._run(d)
    expected = [int.from_bytes(emu.activations[i].tobytes(), "little")
                for i in range(len(emu.activations))]
    return result["words"], expected, result["cycles"], expected_cycles, result["misses"]


def _value(desc: LayerDescriptor) -> int:
    """The descriptor's 48 bytes as one integer (the layout of extended_descriptor_layout)."""
    return int.from_bytes(desc.encode(), "little")


@pytest.mark.parametrize("seed", [*range(8), *(pytest.param(s, marks=pytest.mark.slow)
                                                 for s in range(8, 32))])
def test_random_layer_matches_the_emulator(seed):
    """8 random layers in the fast tier, 24 more in the slow one."""
    rng = np.random.default_rng(1000 + seed)
    desc = random_layer(rng, CONFIG)
    words, expected, cycles, expected_cycles, misses = run_layer(CONFIG, desc, seed)
    assert misses == 0
    bad = [i for i, (a, b) in enumerate(zip(words, expected, strict=True)) if a != b]
    assert not bad, f"{desc}: words {bad[:8]} differ"
    assert cycles == expected_cycles == layer_cycles(CONFIG, dict(desc))


def test_every_bit_width_and_shortcut():
    """One layer per (in, out, shortcut) bits corner, with padding at a level."""
    base = LayerDescriptor.conv(in_h=4, in_w=5, channels=11, out_channels=5, kernel=3,
                                stride=1, padding=1, input_base=3, output_base=1,
                                weight_base=7, threshold_base=2)
    for n, m, s in ((1, 1, 0), (3, 1, 0), (1, 3, 2), (2, 2, 1), (3, 3, 2)):
        desc = base.replace(in_bits=n, out_bits=m, shortcut_bits=s, pad_level=(1 << n) - 1,
                            input_slot=2, output_slot=0, shortcut_slot=3 if s else 0,
                            shortcut_base=5 if s else 0, extended=True)
        assert not desc.problems(CONFIG)
        words, expected, cycles, expected_cycles, misses = run_layer(CONFIG, desc, 7)
        assert misses == 0
        assert words == expected, (n, m, s)
        assert cycles == expected_cycles, (n, m, s)


def test_layers_back_to_back_keep_no_state():
    """A layer after one with a wider shortcut (stale level bits in the job context), a
    narrower output and fewer planes: each as the emulator runs it."""
    rng = np.random.default_rng(77)
    first = random_layer(rng, CONFIG)
    while first.shortcut_bits != 2:
        first = random_layer(rng, CONFIG)
    for s_bits in (0, 1):
        second = random_layer(rng, CONFIG)
        while second.shortcut_bits != s_bits:
            second = random_layer(rng, CONFIG)
        words, expected, cycles, expected_cycles, misses = run_layer(CONFIG, [first, second],
                                                                     11)
        assert misses == 0
        assert words == expected, (first, second)
        assert cycles == expected_cycles


def test_refuses_a_contract_1_config():
    with pytest.raises(ValueError, match="contract 2"):
        LayerControllerV2(config=dataclasses.replace(CONFIG, contract=1, max_input_bits=1,
                                                     max_shortcut_bits=0,
                                                     activation_slots=2, name="c1"))
