# amaranth: UnusedElaboratable=no
"""The window generator's two engines on their own (amaranth.sim): the setup engine's
per-row window origins and tap masks, and the issue engine's K-word sequence."""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

from amaranth.sim import Simulator

from bitdet.hw.window import WindowGenerator, WindowLayer
from bitdet.hw.window_engines import IssueEngine, SetupEngine


def generator(**kwargs):
    params = {"rows": 3, "simd": 8, "depth": 64, "max_channels": 16, "max_kernel": 3,
              "max_stride": 2, "tag_width": 6, "max_tiles": 2} | kwargs
    return WindowGenerator(**params)


def simulate(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("group", [0, 1])
def test_setup_engine_windows(group):
    """Group `group` of a 5×4 map, 3×3 / 2 with padding 1 (windows in the padding), 10
    channels (2 words), input at word 7: the top-left tap's address (mod 2**6), the tap
    masks and the real rows, rows + 3 cycles after the command is taken."""
    gen = generator()
    layer = WindowLayer(5, 4, 10, 3, 2, 1, 1)
    payload = gen.command_payload(layer, group, base=7)
    dut = SetupEngine(command_layout=gen.command_layout, rows=gen.rows, simd=gen.simd,
                      depth=gen.depth, max_kernel=3)
    got = {}

    async def testbench(ctx):
        ctx.set(dut.command.payload, payload)
        ctx.set(dut.command.valid, 1)
        await ctx.tick().until(dut.command.ready)
        ctx.set(dut.command.valid, 0)
        cycles = 1
        while not ctx.get(dut.window.valid):
            await ctx.tick()
            cycles += 1
        w = dut.window.payload
        got["cycles"] = cycles
        got["rows"] = [(ctx.get(w.base[r]), ctx.get(w.ymask[r]), ctx.get(w.xmask[r]))
                       for r in range(gen.rows)]
        got["row_valid"] = ctx.get(w.row_valid)
        got["pad_mask"] = ctx.get(w.pad_mask)
        got["row_words"] = ctx.get(w.row_words)
        ctx.set(dut.window.ready, 1)
        await ctx.tick()
        assert ctx.get(dut.command.ready)

    simulate(dut, testbench)
    words = layer.words(8)
    expected = []
    for r in range(gen.rows):
        n = group * gen.rows + r
        y0 = (n // layer.out_w) * layer.stride - layer.padding
        x0 = (n % layer.out_w) * layer.stride - layer.padding
        if r >= payload["count"]:
            expected.append(got["rows"][r])            # not a real pixel: any window
            continue
        expected.append(((7 + (y0 * layer.in_w + x0) * words) % 64,
                         sum(1 << k for k in range(3) if 0 <= y0 + k < layer.in_h),
                         sum(1 << k for k in range(3) if 0 <= x0 + k < layer.in_w)))
    assert got["rows"] == expected
    assert got["row_valid"] == (1 << payload["count"]) - 1
    assert got["pad_mask"] == 0b11                  # 10 channels: 2 real bits in word 1
    assert got["row_words"] == layer.in_w * words
    assert got["cycles"] == gen.rows + 3


def test_issue_engine_kwords():
    """One window of two jobs (tags 5 and 9), 2×2 kernel, 2 words, rows 0 and 1 real: the
    K-words in pack_weights order with first / last / index / tag, the weight address
    tag + index, and the read addresses base + (ky·in_w + kx)·words + word; a tap outside
    the image gives the padding word."""
    gen = generator(rows=2)
    setup = SetupEngine(command_layout=gen.command_layout, rows=2, simd=8, depth=64,
                        max_kernel=3)
    dut = IssueEngine(window_layout=setup.window_layout, word_layout=gen.word_layout,
                      rows=2, simd=8, depth=64, max_kernel=3, max_words=2, max_tiles=2,
                      tag_width=6)
    in_w, words = 4, 2
    bases = [10, 30]
    got, fetched = [], []

    async def testbench(ctx):
        w = dut.window.payload
        geometry = {"in_h": 4, "in_w": in_w, "out_w": 2, "channels": 12, "words": words,
                    "kernel": 2, "stride": 1, "padding": 0, "pad_bit": 1, "oy": 0, "ox": 0,
                    "count": 2, "base": 0, "tag": 5, "tiles": 2, "tag_step": 4}
        ctx.set(w.geometry, geometry)
        ctx.set(w.row_words, in_w * words)
        ctx.set(w.pad_mask, 0x0F)
        for r in range(2):
            ctx.set(w.base[r], bases[r])
            ctx.set(w.xmask[r], 0b11)
            ctx.set(w.ymask[r], 0b11 if r == 0 else 0b01)   # row 1: tap row 1 outside
        ctx.set(w.row_valid, 0b11)
        ctx.set(dut.window.valid, 1)
        await ctx.tick().until(dut.window.ready)
        ctx.set(dut.window.valid, 0)
        ctx.set(dut.words.ready, 1)
        for _ in range(24):
            for r in range(2):                         # the port's data: its address
                ctx.set(dut.read[r].data, 0)
            if ctx.get(dut.fetch.en):
                fetched.append(ctx.get(dut.fetch.addr))
            addrs = [ctx.get(dut.read[r].addr) for r in range(2)]
            await ctx.tick()
            for r in range(2):
                ctx.set(dut.read[r].data, addrs[r] | 0x80)
            if ctx.get(dut.words.valid):
                p = dut.words.payload
                got.append((ctx.get(p.tag), ctx.get(p.index), ctx.get(p.first),
                            ctx.get(p.last), [ctx.get(p.activations[r]) for r in range(2)]))

    simulate(dut, testbench)
    k_words = 2 * 2 * words
    expected = []
    for tag in (5, 9):
        for j in range(k_words):
            tap, word = divmod(j, words)
            ky, kx = divmod(tap, 2)
            offset = (ky * in_w + kx) * words + word
            row1 = 0x0F if word == words - 1 else 0xFF
            expected.append((tag, j, j == 0, j == k_words - 1,
                             [(bases[0] + offset) | 0x80,
                              (bases[1] + offset) | 0x80 if ky == 0 else row1]))
    assert got == expected
    assert fetched == [tag + j for tag in (5, 9) for j in range(k_words)]
