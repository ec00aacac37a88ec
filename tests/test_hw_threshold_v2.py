# amaranth: UnusedElaboratable=no
"""Contract-2 threshold unit: n-bit levels of ``A`` with the row of the shortcut level, against
golden.threshold / golden.threshold_shortcut (amaranth.sim).

The unit compares with the thresholds of one row: the threshold memory entry
``threshold_base + t·R + r`` that the controller reads for the output's shortcut level
``r`` (docs/protocol.md, "Contract 2"). The tests build that memory exactly as the host
writes it (:func:`bitdet.core.packing.pack_thresholds`, then
:func:`bitdet.core.protocol.encode_thresholds` of the entries) and select the entry by
``r`` the way the controller will.
"""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig
from bitdet.core.packing import pack_thresholds
from bitdet.core.protocol import encode_thresholds
from bitdet.hw.threshold import LevelThresholdUnit


def run_unit(dut: LevelThresholdUnit, inputs):
    """Feed ``(a, thresholds, out_bits)`` one per cycle, with an idle cycle (junk payload)
    after every third; return the levels in order, checking each arrives one cycle
    later."""
    schedule = []
    for n, item in enumerate(inputs):
        schedule.append(item)
        if n % 3 == 2:
            schedule.append(None)
    junk = (1, [0] * dut.threshold_count, dut.output_bits)
    outputs = []

    async def testbench(ctx):
        for item in schedule:
            a, thresholds, out_bits = item if item is not None else junk
            ctx.set(dut.i.payload, {"a": a, "thresholds": [int(t) for t in thresholds],
                                    "out_bits": out_bits})
            ctx.set(dut.i.valid, item is not None)
            await ctx.tick()
            assert ctx.get(dut.o.valid) == (item is not None)
            if item is not None:
                outputs.append(ctx.get(dut.o.payload.level))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return outputs


def threshold_memory(config: AcceleratorConfig, table: np.ndarray, *, k: int, in_bits: int,
                     base: int, unused: int | None = None) -> np.ndarray:
    """The threshold memory (``threshold_depth × cols × thresholds_per_channel``) after
    WRITE_THRESHOLDS of an ``(O, R, L)`` table at entry ``base``: entry ``base + t·R + r``,
    column ``c`` holds row ``r`` of output channel ``t·cols + c``, its fields decoded
    from the bytes :func:`encode_thresholds` writes. ``unused`` overwrites the thresholds
    a layer does not read (``l ≥ L``; the host writes all ones there)."""
    cols, count, width = config.cols, config.thresholds_per_channel, config.threshold_width
    packed = pack_thresholds(table, k, cols=cols, in_bits=in_bits)      # tiles, cols, R, L
    tiles, _, rows, used = packed.shape
    entries = packed.transpose(0, 2, 1, 3).reshape(tiles * rows, cols, used)
    data = encode_thresholds(entries, threshold_width=width, thresholds_per_channel=count)
    size = -(-(count * width) // 8)
    assert len(data) == tiles * rows * cols * size
    memory = np.zeros((config.threshold_depth, cols, count), dtype=np.int64)
    for e in range(tiles * rows):
        for c in range(cols):
            offset = (e * cols + c) * size
            field = int.from_bytes(data[offset:offset + size], "little")
            memory[base + e, c] = [(field >> (j * width)) & ((1 << width) - 1)
                                   for j in range(count)]
    if unused is not None:
        memory[:, :, used:] = unused
    return memory


def sorted_table(rng, channels: int, rows: int, used: int, a_max: int) -> np.ndarray:
    """Random ``(O, R, L)`` thresholds in ``[0, a_max + 1]``, each row sorted, with
    repeated values, and two constant channels: channel 0 always reached (``T = 0``),
    channel 1 never (``T = Amax + 1``)."""
    table = np.sort(rng.integers(0, a_max + 2, size=(channels, rows, used)), axis=2)
    if used > 2:
        table[2, :, 1] = table[2, :, 2]                       # a repeated threshold
    table[0] = 0
    table[1] = a_max + 1
    return table


@pytest.mark.parametrize(("in_bits", "out_bits", "shortcut_bits", "base"), [
    (4, 3, 2, 5), (2, 2, 1, 0), (1, 1, 3, 7), (3, 2, 0, 2), (4, 3, 4, 1),
])
def test_levels_with_shortcut_rows_match_golden(in_bits, out_bits, shortcut_bits, base):
    """A conv output of O channels × 3×4 pixels: every output compares ``A`` (ties
    exactly at a threshold, 0 and ``Amax`` included) with the row of its shortcut level
    (every level used in every channel), read from entry ``base + t·R + r``."""
    rng = np.random.default_rng(in_bits * 100 + out_bits * 10 + shortcut_bits)
    config = AcceleratorConfig(contract=2, rows=2, cols=2, simd=16, output_bits=3,
                               max_input_bits=4, max_shortcut_bits=4, threshold_depth=64)
    k = 40
    a_max = ((1 << in_bits) - 1) * k
    channels, rows, used = 5, 1 << shortcut_bits, (1 << out_bits) - 1
    table = sorted_table(rng, channels, rows, used, a_max)
    memory = threshold_memory(config, table, k=k, in_bits=in_bits, base=base)

    shape = (1, channels, 3, 4)
    pixels = shape[2] * shape[3]
    shortcut = torch.from_numpy(rng.integers(0, rows, size=shape))
    for o in range(channels):                          # every row selected somewhere
        shortcut[0, o].view(-1)[:min(rows, pixels)] = torch.arange(min(rows, pixels))
    a = torch.from_numpy(rng.integers(0, a_max + 1, size=shape))
    flat_a, flat_r = a[0].reshape(channels, -1), shortcut[0].reshape(channels, -1)
    for o in range(channels):
        for p in range(0, pixels, 2):                  # ties: A exactly at a threshold
            row = table[o, int(flat_r[o, p])]
            flat_a[o, p] = int(min(row[int(rng.integers(used))], a_max))
        flat_a[o, 1], flat_a[o, 3] = 0, a_max
    expected = golden.threshold_shortcut(a, torch.from_numpy(table), shortcut)
    if rows == 1:
        assert torch.equal(expected, golden.threshold(a, torch.from_numpy(table[:, 0])))

    dut = LevelThresholdUnit(acc_width=config.acc_width, output_bits=config.output_bits)
    assert dut.threshold_width == config.threshold_width
    assert dut.threshold_count == config.thresholds_per_channel
    inputs, wanted = [], []
    for o in range(channels):
        tile, column = divmod(o, config.cols)
        for p in range(pixels):
            r = int(flat_r[o, p])
            entry = base + tile * rows + r             # the controller's read address
            inputs.append((int(flat_a[o, p]), memory[entry, column], out_bits))
            wanted.append(int(expected[0, o].reshape(-1)[p]))
    outputs = run_unit(dut, inputs)
    assert outputs == wanted
    assert set(outputs[:pixels]) == {used} and set(outputs[pixels:2 * pixels]) == {0}
    assert max(outputs) <= used


def test_unused_thresholds_do_not_count():
    """A layer of m < output_bits bits reads only the first 2**m − 1 thresholds of the
    entry (as the emulator): thresholds behind them that would be reached (here 0) do
    not count, whatever the memory holds there."""
    rng = np.random.default_rng(3)
    config = AcceleratorConfig(contract=2, rows=1, cols=1, simd=8, output_bits=4,
                               max_input_bits=2, max_shortcut_bits=1)
    k, in_bits = 30, 2
    a_max = 3 * k
    dut = LevelThresholdUnit(acc_width=config.acc_width, output_bits=config.output_bits)
    for out_bits in (1, 2, 3):
        used = (1 << out_bits) - 1
        table = sorted_table(rng, 4, 2, used, a_max)
        memory = threshold_memory(config, table, k=k, in_bits=in_bits, base=0, unused=0)
        a = torch.from_numpy(rng.integers(0, a_max + 1, size=(1, 4, 2, 3)))
        shortcut = torch.from_numpy(rng.integers(0, 2, size=(1, 4, 2, 3)))
        expected = golden.threshold_shortcut(a, torch.from_numpy(table), shortcut)
        inputs = [(int(a[0, o, y, x]), memory[o * 2 + int(shortcut[0, o, y, x]), 0],
                   out_bits) for o in range(4) for y in range(2) for x in range(3)]
        assert run_unit(dut, inputs) == expected[0].reshape(-1).tolist()


def test_ties_and_constant_channels():
    """``A = T_j`` counts ``T_j``; a row of T = 0 gives the top level even for A = 0, a row
    of T = Amax + 1 gives 0 even for A = Amax; out_bits = 0 gives level 0."""
    acc_width = 8
    a_max = (1 << acc_width) - 1
    dut = LevelThresholdUnit(acc_width=acc_width, output_bits=2)
    assert dut.threshold_width == 9                    # T = Amax + 1 = 256 fits
    rows = [[0, 0, 0], [a_max + 1] * 3, [10, 50, 50], [0, 17, a_max + 1], [a_max] * 3]
    cases = []
    for row in rows:
        for a in sorted({0, 1, 9, 10, 11, 17, 49, 50, 51, a_max - 1, a_max}):
            cases.append((a, row, 2))
    outputs = run_unit(dut, cases)
    p = torch.tensor([a for a, _, _ in cases])[None, :]          # cases as channels
    t = torch.tensor([row for _, row, _ in cases])
    assert outputs == golden.threshold(p, t)[0].tolist()
    assert outputs[:11] == [3] * 11 and outputs[11:22] == [0] * 11
    assert outputs[cases.index((50, [10, 50, 50], 2))] == 3
    assert outputs[cases.index((49, [10, 50, 50], 2))] == 1
    assert run_unit(dut, [(a_max, [0, 0, 0], 0), (5, [0, 9, 9], 1), (9, [0, 9, 9], 1)]) \
        == [0, 1, 1]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"acc_width": 0, "output_bits": 1}, ValueError, "acc_width must be at least 1, not 0"),
    ({"acc_width": 8, "output_bits": 9}, ValueError, "output_bits must be at most 8, not 9"),
    ({"acc_width": 8, "output_bits": None}, TypeError, "output_bits must be an integer"),
])
def test_level_unit_validates_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        LevelThresholdUnit(**kwargs)


def test_level_unit_layout_and_verilog():
    dut = LevelThresholdUnit(acc_width=17, output_bits=4)
    assert (dut.acc_width, dut.output_bits, dut.threshold_count) == (17, 4, 15)
    assert len(dut.o.payload.level) == 4
    assert dict(dut.input_layout.members)["out_bits"] == range(5)
    assert dut.output_layout.size == 4
    text = verilog.convert(dut, name="level_threshold_unit")
    assert "module level_threshold_unit" in text
