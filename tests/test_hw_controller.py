# amaranth: UnusedElaboratable=no
"""Layer controller (amaranth.sim): one binary conv layer from a descriptor to the packed
output map, with the real memories, window generator, array and threshold units.

The input bank is loaded with :func:`~bitdet.core.packing.pack_activations` of a random ±1
map, the weight and threshold memories with :func:`~bitdet.core.packing.pack_weights` /
:func:`~bitdet.core.packing.pack_thresholds`; the output bank (pre-filled with junk) must
then hold exactly ``pack_activations`` of :func:`bitdet.core.golden.run_layer`'s bits, and
the junk around the map must be untouched. Raw mode is compared with
:func:`bitdet.core.golden.popcount_conv2d`.
"""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import layer_cycles
from bitdet.core.packing import pack_activations, pack_thresholds, pack_weights
from bitdet.hw.controller import LayerController
from bitdet.hw.harness import ControllerHarness as Harness
from bitdet.hw.window import WindowLayer


def to_ints(words: np.ndarray, simd: int) -> list[int]:
    """uint8 ``(..., bytes)`` → the little-endian ``simd``-bit words, flattened."""
    flat = np.ascontiguousarray(words).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def small_config(rows=2, cols=2, simd=8, **kwargs) -> AcceleratorConfig:
    fields = {"weight_depth": 1024, "threshold_depth": 32, "activation_depth": 256,
              "max_channels": 64, "max_kernel": 3, "max_stride": 2}
    fields.update(kwargs)
    return AcceleratorConfig(rows=rows, cols=cols, simd=simd, **fields)


async def write_buffer(ctx, dut, select, words):
    """Write ``(addr, word)`` pairs to bank ``1 − select`` through the load port."""
    ctx.set(dut.buf.select, select)
    for a, v in words:
        ctx.set(dut.load.en, 1)
        ctx.set(dut.load.addr, a)
        ctx.set(dut.load.data, v)
        await ctx.tick()
    ctx.set(dut.load.en, 0)


async def write_parameters(ctx, dut, w_packed, t_packed, *, weight_base, threshold_base):
    """One layer's pack_weights words and pack_thresholds entries, column by column."""
    simd = dut.ctrl.config.simd
    tiles, k_words, cols = w_packed.shape[:3]
    for t in range(tiles):
        for c in range(cols):
            for j, v in enumerate(to_ints(w_packed[t, :, c], simd)):
                ctx.set(dut.weights.write.en, 1)
                ctx.set(dut.weights.write.addr, weight_base + t * k_words + j)
                ctx.set(dut.weights.write.column, c)
                ctx.set(dut.weights.write.data, v)
                await ctx.tick()
            ctx.set(dut.thresholds.write.en, 1)
            ctx.set(dut.thresholds.write.addr, threshold_base + t)
            ctx.set(dut.thresholds.write.column, c)
            ctx.set(dut.thresholds.write.data.as_value(), int(t_packed[t, c, 0]))
            await ctx.tick()
    ctx.set(dut.weights.write.en, 0)
    ctx.set(dut.thresholds.write.en, 0)


async def run_to_done(ctx, ctrl, desc, limit, on_cycle=None):
    """Pulse ``start`` with ``desc``; returns the cycles from start to ``done``."""
    ctx.set(ctrl.layer, desc)
    ctx.set(ctrl.start, 1)
    await ctx.tick()
    ctx.set(ctrl.start, 0)
    for cycle in range(1, limit):
        if on_cycle is not None:
            on_cycle(ctx)
        if ctx.get(ctrl.done):
            return cycle
        assert ctx.get(ctrl.busy)
        await ctx.tick()
    raise AssertionError(f"the layer did not finish in {limit} cycles")


async def read_bank(ctx, dut, select, addrs):
    """Words of bank ``select`` through the testbench's read port."""
    ctx.set(dut.buf.select, select)
    ctx.set(dut.probe.en, 1)
    words = []
    for a in addrs:
        ctx.set(dut.probe.addr, a)
        await ctx.tick()
        words.append(ctx.get(dut.probe.data))
    return words


def run_layer(config, layer, out_channels, *, raw=False, seed=0, bases=(0, 0, 0, 0),
              thresholds=None):
    """Simulate one layer. Returns (expected, got, stats): for a thresholded layer the
    expected and read-back output-bank words (map plus a junk margin on each side), for
    a raw layer the golden and collected P (O × H' × W'); stats has the cycles from start
    to done, the counters and the ideal cycles."""
    rng = np.random.default_rng(seed)
    simd, rows = config.simd, config.rows
    input_base, output_base, weight_base, threshold_base = bases
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, layer.channels, layer.in_h,
                                                       layer.in_w)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(out_channels, layer.channels,
                                                       layer.kernel, layer.kernel)))
    k = layer.channels * layer.kernel ** 2
    if thresholds is None:
        thresholds = rng.integers(0, k + 2, size=out_channels)
    thresholds = torch.as_tensor(thresholds, dtype=torch.int64)
    pad_value = 1 if layer.pad_bit else -1
    dut = Harness(config)
    ctrl = dut.ctrl
    desc = ctrl.descriptor(layer, out_channels, input_base=input_base,
                           output_base=output_base, weight_base=weight_base,
                           threshold_base=threshold_base, raw=raw)
    image = to_ints(pack_activations(x, word_bits=simd)[0], simd)
    w_packed = pack_weights(w, word_bits=simd, cols=config.cols)     # tiles, K, cols, bytes
    t_packed = pack_thresholds(thresholds, k, cols=config.cols)       # tiles, cols, 1
    tiles = w_packed.shape[0]
    out_words = -(-out_channels // simd)
    map_words = layer.out_h * layer.out_w * out_words
    margin = 3
    lo = max(0, output_base - margin)
    hi = min(config.activation_depth, output_base + map_words + margin)
    junk = [int(v) for v in rng.integers(0, 1 << simd, size=hi - lo)]
    readback = []
    raw_out = []
    stats = {}

    async def testbench(ctx):
        await write_buffer(ctx, dut, 1, enumerate(image, start=input_base))  # bank 0: input
        await write_buffer(ctx, dut, 0, enumerate(junk, start=lo))           # bank 1: junk
        await write_parameters(ctx, dut, w_packed, t_packed, weight_base=weight_base,
                               threshold_base=threshold_base)

        def collect(ctx):
            if ctx.get(ctrl.raw.valid):
                raw_out.append(ctx.get(ctrl.raw.payload))

        limit = 4 * ctrl.ideal_cycles(layer, out_channels) + 200 * layer.groups(rows) * tiles
        stats["cycles"] = await run_to_done(ctx, ctrl, desc, limit, collect)
        stats["busy_cycles"] = ctx.get(ctrl.busy_cycles)
        stats["stall_cycles"] = ctx.get(ctrl.stall_cycles)
        await ctx.tick()
        assert not ctx.get(ctrl.busy) and not ctx.get(ctrl.done)
        readback.extend(await read_bank(ctx, dut, 1, range(lo, hi)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    stats["ideal"] = ctrl.ideal_cycles(layer, out_channels)
    stats["model"] = layer_cycles(config, desc)
    stats["utilization"] = stats["ideal"] / stats["cycles"]
    if raw:
        p = golden.popcount_conv2d(x, w, stride=layer.stride, padding=layer.padding,
                                   pad_value=pad_value)[0].numpy()
        got = np.full(p.shape, -1, dtype=np.int64)
        for out in raw_out:
            assert out.channel < out_channels
            for r in range(rows):
                if out.row_valid >> r & 1:
                    oy, ox = divmod(out.pixel + r, layer.out_w)
                    assert got[out.channel, oy, ox] == -1, "P delivered twice"
                    got[out.channel, oy, ox] = out.p[r]
        assert readback == junk, "raw mode must not write the output bank"
        return p, got, stats
    bits = golden.run_layer(x, golden.BinaryConvLayer(
        w, thresholds[:, None], stride=layer.stride, padding=layer.padding,
        pad_value=pad_value))
    expected_map = to_ints(pack_activations(bits.to(torch.float32) * 2 - 1,
                                            word_bits=simd)[0], simd)
    expected = (junk[:output_base - lo] + expected_map
                + junk[output_base + map_words - lo:])
    return expected, readback, stats


def check_stats(stats, *, rows, cols, k_words, raw=False):
    """Counters: every busy cycle either fed the array a K-word or is counted as a stall;
    they are the cycle model's; with jobs long enough for gapless feeding only the fixed
    cost remains (docs/hardware.md, *Layer controller / Cycles*)."""
    assert stats["busy_cycles"] == stats["cycles"] - 1      # busy from the cycle after start
    assert stats["busy_cycles"] - stats["stall_cycles"] == stats["ideal"]
    assert (stats["busy_cycles"], stats["stall_cycles"]) == stats["model"]
    if k_words >= max(rows + 4, cols):
        writes = 0 if raw else rows
        assert stats["busy_cycles"] == stats["ideal"] + 2 * rows + 2 * cols + 13 + writes


# config (rows, cols, simd), layer (in_h, in_w, C, kernel, stride, padding, pad_bit), O
CASES = {
    "3x3_s1_p1_pad0": ((2, 2, 8), (5, 5, 11, 3, 1, 1, 0), 5),     # odd H/W, partial group
    "3x3_s1_p1_pad1": ((2, 2, 8), (4, 5, 9, 3, 1, 1, 1), 3),
    "3x3_s2": ((3, 2, 8), (7, 7, 16, 3, 2, 1, 1), 6),            # 16 pixels, rows 3
    "1x1": ((2, 2, 8), (5, 3, 20, 1, 1, 0, 0), 18),              # 3 output words per pixel
    "1x1_wide_word": ((3, 4, 16), (3, 5, 13, 1, 1, 0, 0), 9),    # 4 slots per word, O < simd
    "3x3_no_pad": ((2, 2, 8), (5, 4, 7, 3, 1, 0, 0), 10),
    "simd_24": ((2, 4, 24), (4, 3, 30, 3, 1, 1, 1), 26),         # ceil(C/simd) by compares
    "compute_bound": ((2, 2, 8), (4, 4, 32, 3, 1, 1, 0), 4),     # K = 36 K-words ≥ 8
    # K 1, 9 tiles per group, 8 per output word: the words of tiles 7 and 8 complete one
    # job apart, faster than the writer's `rows` cycles without the controller's guard
    "writer_guard": ((5, 1, 8), (3, 4, 5, 1, 1, 0, 0), 9),
    "writer_guard_word_per_job": ((9, 8, 8), (3, 6, 5, 1, 1, 0, 0), 20),  # simd = cols
    "1x1_many_tiles": ((3, 2, 16), (4, 3, 40, 1, 1, 0, 1), 23),  # 12 tiles, 2 words/px
}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_output_bank(case):
    """Thresholded 1-bit layers: the output bank holds pack_activations of golden.run_layer
    exactly (fill channels 0, no write outside the map); counters add up."""
    (rows, cols, simd), geometry, out_channels = CASES[case]
    config = small_config(rows, cols, simd)
    layer = WindowLayer(*geometry)
    rng = np.random.default_rng(len(case))
    bases = (int(rng.integers(0, 8)), int(rng.integers(0, 8)), int(rng.integers(0, 8)),
             int(rng.integers(0, 4)))
    expected, got, stats = run_layer(config, layer, out_channels, seed=len(case), bases=bases)
    assert got == expected
    check_stats(stats, rows=rows, cols=cols, k_words=layer.k_words(simd))
    if case == "compute_bound":
        assert stats["utilization"] >= 0.9, stats


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), cols=st.sampled_from([1, 2, 4]), simd=st.sampled_from([8, 16]),
       in_h=st.integers(1, 5), in_w=st.integers(1, 5), channels=st.integers(1, 20),
       out_channels=st.integers(1, 20), kernel=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), pad_bit=st.integers(0, 1),
       raw=st.booleans(), seed=st.integers(0, 2 ** 32 - 1))
def test_random_layers(rows, cols, simd, in_h, in_w, channels, out_channels, kernel, stride,
                       padding, pad_bit, raw, seed):
    """Random geometry, array shape and mode: exact output bank or raw P."""
    if kernel > min(in_h, in_w) + 2 * padding:
        return
    config = small_config(rows, cols, simd)
    layer = WindowLayer(in_h, in_w, channels, kernel, stride, padding, pad_bit)
    expected, got, stats = run_layer(config, layer, out_channels, raw=raw, seed=seed,
                                     bases=(seed % 5, seed % 7, seed % 11, seed % 3))
    if raw:
        np.testing.assert_array_equal(got, expected)
    else:
        assert got == expected
    check_stats(stats, rows=rows, cols=cols, k_words=layer.k_words(simd), raw=raw)


def test_layer_constant_thresholds():
    """T = 0 (always 1) and T = K + 1 (never) channels, and thresholds at P's extremes."""
    config = small_config()
    layer = WindowLayer(3, 3, 8, 3, 1, 1, 1)
    k = 72
    expected, got, _ = run_layer(config, layer, 5, seed=7,
                                 thresholds=[0, k + 1, k, 1, 36])
    assert got == expected


@pytest.mark.parametrize(("config_args", "geometry", "out_channels"), [
    ((2, 2, 8), (5, 4, 11, 3, 1, 1, 1), 5),
    ((3, 4, 16), (5, 5, 6, 3, 2, 1, 0), 7),
])
def test_layer_raw(config_args, geometry, out_channels):
    """Raw mode: P of every real pixel and channel exactly once on `raw`; nothing is
    written to the output bank."""
    config = small_config(*config_args)
    layer = WindowLayer(*geometry)
    p, got, stats = run_layer(config, layer, out_channels, raw=True, seed=out_channels,
                              bases=(3, 2, 5, 1))
    np.testing.assert_array_equal(got, p)
    check_stats(stats, rows=config.rows, cols=config.cols, k_words=layer.k_words(config.simd),
                raw=True)


def test_descriptor_checks():
    config = small_config(activation_depth=64, weight_depth=64, threshold_depth=4)
    ctrl = LayerController(config=config)
    layer = WindowLayer(4, 4, 10, 3, 1, 1, 0)
    assert ctrl.descriptor(layer, 3, input_base=5, output_base=7, raw=True) == {
        "in_h": 4, "in_w": 4, "channels": 10, "out_h": 4, "out_w": 4, "out_channels": 3,
        "kernel": 3, "stride": 1, "padding": 1, "pad_bit": 0, "input_base": 5,
        "output_base": 7, "weight_base": 0, "threshold_base": 0, "raw": 1, "pool": 0}
    assert ctrl.ideal_cycles(layer, 3) == 8 * 2 * 18
    with pytest.raises(ValueError, match=r"output map needs? entries 60 … 75"):
        ctrl.descriptor(layer, 3, output_base=60)
    with pytest.raises(ValueError, match=r"weights needs? entries 30 … 65, weight_depth is 64"):
        ctrl.descriptor(layer, 3, weight_base=30)
    with pytest.raises(ValueError, match=r"thresholds needs? entries 0 … 4"):
        ctrl.descriptor(layer, 9)
    with pytest.raises(ValueError, match="out_channels is 0"):
        ctrl.descriptor(layer, 0)
    with pytest.raises(ValueError, match="out_channels 65 exceeds"):
        ctrl.descriptor(layer, 65)
    with pytest.raises(ValueError,
                       match=r"input map needs? entries 0 … 127, activation_depth is 64"):
        ctrl.descriptor(WindowLayer(8, 8, 10, 3), 3)
    with pytest.raises(ValueError, match=r"simd \(8\) to be a multiple of cols \(3\)"):
        LayerController(config=small_config(cols=3))
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        LayerController(config=None)


def test_controller_converts_to_verilog():
    config = small_config(weight_depth=64, threshold_depth=16, activation_depth=64,
                          max_channels=32)
    text = verilog.convert(LayerController(config=config), name="layer_controller")
    assert "module layer_controller" in text
    for port in ("start", "busy", "done", "busy_cycles", "stall_cycles", "act_write__en",
                 "act_read__1__addr", "weights__addr", "thresholds__data", "raw__valid"):
        assert port in text, port


def test_two_layers_ping_pong():
    """Layer A writes its map into bank 1; with `select` flipped, layer B reads it there
    and writes bank 0: B's output equals golden.run_network of the two layers."""
    config = small_config(rows=3, cols=4, simd=16)
    rng = np.random.default_rng(11)
    a = WindowLayer(5, 6, 10, 3, 1, 1, 0)
    b = WindowLayer(5, 6, 12, 3, 2, 1, 1)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, 10, 5, 6)))
    wa = torch.from_numpy(rng.choice([-1.0, 1.0], size=(12, 10, 3, 3)))
    wb = torch.from_numpy(rng.choice([-1.0, 1.0], size=(6, 12, 3, 3)))
    ta = torch.from_numpy(rng.integers(30, 61, size=(12, 1)))
    tb = torch.from_numpy(rng.integers(40, 70, size=(6, 1)))
    dut = Harness(config)
    ctrl = dut.ctrl
    wa_packed, wb_packed = (pack_weights(w, word_bits=16, cols=4) for w in (wa, wb))
    desc_a = ctrl.descriptor(a, 12, input_base=0, output_base=4, weight_base=0,
                             threshold_base=0)
    desc_b = ctrl.descriptor(b, 6, input_base=4, output_base=50,
                             weight_base=wa_packed.shape[0] * wa_packed.shape[1],
                             threshold_base=wa_packed.shape[0])
    got = []

    async def testbench(ctx):
        await write_buffer(ctx, dut, 1, enumerate(to_ints(pack_activations(x, word_bits=16)[0],
                                                          16)))
        await write_parameters(ctx, dut, wa_packed, pack_thresholds(ta, 90, cols=4),
                               weight_base=0, threshold_base=0)
        await write_parameters(ctx, dut, wb_packed, pack_thresholds(tb, 108, cols=4),
                               weight_base=desc_b["weight_base"],
                               threshold_base=desc_b["threshold_base"])
        ctx.set(dut.buf.select, 0)
        await run_to_done(ctx, ctrl, desc_a, 2000)
        ctx.set(dut.buf.select, 1)                       # A's output is B's input
        await ctx.tick()
        await run_to_done(ctx, ctrl, desc_b, 2000)
        await ctx.tick()
        got.extend(await read_bank(ctx, dut, 0, range(50, 50 + b.out_h * b.out_w)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    outputs = golden.run_network(x, [
        golden.BinaryConvLayer(wa, ta, stride=1, padding=1, pad_value=-1),
        golden.BinaryConvLayer(wb, tb, stride=2, padding=1, pad_value=1)])
    assert 0 < int(outputs[0].sum()) < outputs[0].numel()         # a non-trivial map
    expected = to_ints(pack_activations(outputs[1].to(torch.float32) * 2 - 1,
                                        word_bits=16)[0], 16)
    assert got == expected
