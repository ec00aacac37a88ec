# amaranth: UnusedElaboratable=no
"""The layer controller's output side on its own (amaranth.sim): the threshold stage's
bits and raw P, THRESHOLD_PIPELINE cycles late, and the output writer's packing."""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import THRESHOLD_PIPELINE
from bitdet.hw.output import OutputWriter, ThresholdStage


def small_config(rows=2, cols=2, simd=8):
    return AcceleratorConfig(rows=rows, cols=cols, simd=simd, weight_depth=64,
                             threshold_depth=16, activation_depth=64, max_channels=16,
                             max_kernel=3, max_stride=2)


def simulate(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("raw", [0, 1])
def test_threshold_stage(raw):
    """Column c's P of every row against threshold 0 of column c's entry."""
    config = small_config()
    dut = ThresholdStage(config=config)
    assert dut.latency == THRESHOLD_PIPELINE
    thresholds = [5, 9]
    columns = [(0, [4, 5]), (1, [9, 20]), (0, [0, 7])]
    got = []

    async def testbench(ctx):
        ctx.set(dut.raw, raw)
        for c, t in enumerate(thresholds):
            ctx.set(dut.thresholds[c][0], t)
        for cycle in range(len(columns) + THRESHOLD_PIPELINE):
            if cycle < len(columns):
                column, p = columns[cycle]
                ctx.set(dut.results.valid, 1)
                ctx.set(dut.results.payload.column, column)
                for r, value in enumerate(p):
                    ctx.set(dut.results.payload.p[r], value)
            else:
                ctx.set(dut.results.valid, 0)
            await ctx.tick()
            if ctx.get(dut.o.valid):
                got.append((cycle, [ctx.get(dut.o.payload.value[r])
                                    for r in range(config.rows)]))

    simulate(dut, testbench)
    expected = [(i + THRESHOLD_PIPELINE - 1,
                 p if raw else [int(v >= thresholds[column]) for v in p])
                for i, (column, p) in enumerate(columns)]
    assert got == expected


def test_output_writer_packs_and_writes_real_pixels():
    """simd 8, cols 2: four tiles fill a word (slots 0 … 3); row 1 is no real pixel, so
    only row 0's word is written, at addr; the next word of a 3-row writer steps by
    `step`."""
    config = small_config(rows=2, cols=2, simd=8)
    dut = OutputWriter(config=config)
    writes = []
    bits = {(0, 0): 1, (1, 1): 1, (3, 0): 1}         # (slot, column) of row 0's 1 bits

    async def testbench(ctx):
        ctx.set(dut.step, 3)
        for slot in range(4):
            for column in range(2):
                ctx.set(dut.i.valid, 1)
                p = dut.i.payload
                ctx.set(p.bits, bits.get((slot, column), 0) | 0b10)     # row 1: all ones
                ctx.set(p.slot, slot)
                ctx.set(p.column, column)
                ctx.set(p.word_done, slot == 3 and column == 1)
                ctx.set(p.addr, 20)
                ctx.set(p.row_valid, 0b11 if slot < 2 else 0b01)
                await ctx.tick()
        ctx.set(dut.i.valid, 0)
        for _ in range(4):
            if ctx.get(dut.act_write.en):
                writes.append((ctx.get(dut.act_write.addr), ctx.get(dut.act_write.data)))
            await ctx.tick()
        assert not ctx.get(dut.busy)

    simulate(dut, testbench)
    # row 0: bits slot·2 + column = 0, 3, 6; row 1 (all ones) is no real pixel
    assert writes == [(20, 0b01001001)]


def test_output_writer_skips_only_the_missing_rows():
    config = small_config(rows=3, cols=8, simd=8)
    dut = OutputWriter(config=config)
    writes = []

    async def testbench(ctx):
        ctx.set(dut.step, 2)
        ctx.set(dut.i.valid, 1)
        p = dut.i.payload
        ctx.set(p.bits, 0b101)
        ctx.set(p.column, 7)
        ctx.set(p.word_done, 1)
        ctx.set(p.addr, 9)
        ctx.set(p.row_valid, 0b101)
        await ctx.tick()
        ctx.set(dut.i.valid, 0)
        for _ in range(4):
            if ctx.get(dut.act_write.en):
                writes.append((ctx.get(dut.act_write.addr), ctx.get(dut.act_write.data)))
            await ctx.tick()

    simulate(dut, testbench)
    assert writes == [(9, 0x80), (13, 0x80)]
