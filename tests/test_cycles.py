# amaranth: UnusedElaboratable=no
"""Cycle model (``bitdet.core.cycles``) against ``amaranth.sim`` of the layer controller.

The controller runs with the real activation buffer, weight and threshold memories (left
as they are: the controller's timing does not depend on the data) and the counters it
reports after ``done`` must equal :func:`~bitdet.core.cycles.layer_cycles` exactly. The fast
tier runs a handful of shapes, the slow tier ≥ 30 random ones on several array shapes.
A job-level event model written from the RTL's handshakes checks the closed form on
thousands of sizes without simulating.
"""

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.cycles import (
    ARRAY_PIPELINE,
    COUNTER_WIDTH,
    THRESHOLD_PIPELINE,
    ideal_cycles,
    layer_cycles,
    pool_cycles,
)
from bitdet.core.protocol import decode_layer, encode_layer

ROOT = Path(__file__).resolve().parent.parent


def small_config(rows, cols, simd, **kwargs) -> AcceleratorConfig:
    fields = {"weight_depth": 1024, "threshold_depth": 64, "activation_depth": 256,
              "max_channels": 64, "max_kernel": 3, "max_stride": 2}
    fields.update(kwargs)
    return AcceleratorConfig(rows=rows, cols=cols, simd=simd, **fields)


def descriptor(config, geometry, out_channels, *, raw=False, seed=0):
    """``LayerController.descriptor`` of ``geometry`` = (in_h, in_w, C, kernel, stride,
    padding, pad_bit), with random bases that fit (they must not change the timing)."""
    from bitdet.hw.controller import LayerController
    from bitdet.hw.window import WindowLayer
    layer = WindowLayer(*geometry)
    ctrl = LayerController(config=config)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        bases = {name: int(rng.integers(0, 6)) for name in
                 ("input_base", "output_base", "weight_base", "threshold_base")}
        try:
            return ctrl.descriptor(layer, out_channels, raw=raw, **bases)
        except ValueError:
            continue
    return ctrl.descriptor(layer, out_channels, raw=raw)


def simulate(config, desc) -> tuple[int, int, int]:
    """Run one layer in amaranth.sim: ``(busy_cycles, stall_cycles, cycles from start to
    done)`` as the controller reports them."""
    from amaranth.sim import Simulator

    from bitdet.hw.harness import ControllerHarness

    dut = ControllerHarness(config)
    ctrl = dut.ctrl
    result = {}

    async def testbench(ctx):
        ctx.set(ctrl.layer, desc)
        ctx.set(ctrl.start, 1)
        await ctx.tick()
        ctx.set(ctrl.start, 0)
        cycles = 1
        while not ctx.get(ctrl.done):
            await ctx.tick()
            cycles += 1
            assert cycles < 1_000_000, "the layer did not finish"
        result["counters"] = (ctx.get(ctrl.busy_cycles), ctx.get(ctrl.stall_cycles), cycles)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return result["counters"]


def check_against_rtl(config, geometry, out_channels, *, raw=False, seed=0):
    desc = descriptor(config, geometry, out_channels, raw=raw, seed=seed)
    busy, stall, cycles = simulate(config, desc)
    assert busy == cycles - 1                      # busy from the cycle after start to done
    assert layer_cycles(config, desc) == (busy, stall), (config, geometry, out_channels, raw)
    assert busy - stall == ideal_cycles(config, desc)
    # the emulator gets the descriptor through the protocol: same answer from decode_layer
    assert layer_cycles(config, decode_layer(encode_layer(**desc))) == (busy, stall)
    return busy, stall


def regime(config, k_words, out_channels, raw) -> str:
    """What bounds the layer's jobs (docs/hardware.md, *Cycle model*, *Regimes*)."""
    rows, cols = config.rows, config.cols
    tiles = -(-out_channels // cols)
    job = max(k_words, cols if raw else max(cols, rows))
    if tiles * job < rows + 4:
        return "setup"
    return "K" if job == k_words else "drain" if job == cols else "writer"


# config (rows, cols, simd), layer (in_h, in_w, C, kernel, stride, padding, pad_bit), O, raw
FAST_CASES = {
    "1x1_tiles_gapless": ((2, 2, 8), (5, 3, 20, 1, 1, 0, 0), 18, False),   # K 3, 9 tiles
    "1x1_odd_array": ((3, 4, 16), (3, 5, 13, 1, 1, 0, 0), 9, False),       # K 1, 5 groups
    "3x3_s2_partial_group": ((3, 2, 8), (7, 6, 11, 3, 2, 1, 1), 5, False),  # 12 px, 3 rows
    "3x3_raw": ((2, 4, 16), (4, 5, 21, 3, 1, 1, 0), 6, True),
    "drain_bound": ((1, 8, 8), (3, 4, 5, 1, 1, 0, 0), 17, False),          # cols 8 > K
    "setup_bound": ((4, 2, 8), (4, 4, 8, 1, 1, 0, 0), 2, False),           # 1 tile, K 1
    "writer_bound": ((5, 1, 8), (3, 4, 5, 1, 1, 0, 0), 9, False),          # rows 5 > cols
    "writer_raw": ((5, 1, 8), (3, 4, 5, 1, 1, 0, 0), 9, True),             # no writer
    "compute_bound": ((2, 2, 8), (4, 4, 32, 3, 1, 1, 0), 4, False),        # K 36
}


def test_fast_cases_cover_every_regime():
    seen = {regime(small_config(*shape), geometry[3] ** 2 * -(-geometry[2] // shape[2]),
                   out_channels, raw)
            for shape, geometry, out_channels, raw in FAST_CASES.values()}
    assert seen == {"K", "setup", "drain", "writer"}, seen


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_model_matches_rtl(case):
    pytest.importorskip("amaranth")
    (rows, cols, simd), geometry, out_channels, raw = FAST_CASES[case]
    check_against_rtl(small_config(rows, cols, simd), geometry, out_channels, raw=raw,
                      seed=len(case))


def random_case(rng):
    """A random (config, geometry, O, raw) that the controller accepts."""
    from bitdet.hw.window import WindowLayer
    configs = [load_config("tiny"), load_config("icebreaker"), small_config(3, 4, 16),
               small_config(1, 1, 8), small_config(4, 2, 8), small_config(2, 8, 16),
               small_config(1, 8, 8), small_config(5, 1, 8), small_config(3, 2, 24)]
    while True:
        config = configs[int(rng.integers(len(configs)))]
        kernel = int(rng.choice([1, 3]))
        stride = int(rng.integers(1, 3))
        padding = int(rng.integers(0, 2)) if kernel == 3 else 0
        geometry = (int(rng.integers(1, 8)), int(rng.integers(1, 8)),
                    int(rng.integers(1, 41)), kernel, stride, padding,
                    int(rng.integers(0, 2)))
        out_channels = int(rng.integers(1, 21))
        try:
            WindowLayer(*geometry)
            descriptor(config, geometry, out_channels)
        except ValueError:
            continue
        return config, geometry, out_channels, bool(rng.integers(0, 2))


@pytest.mark.slow
def test_model_matches_rtl_random():
    """40 random shapes (1×1 and 3×3, stride 1 and 2, padding 0/1, channels not multiples
    of simd or cols, 1 … 20 tiles per group, raw and thresholded) on nine array shapes."""
    pytest.importorskip("amaranth")
    rng = np.random.default_rng(2026)
    seen = set()
    for i in range(40):
        config, geometry, out_channels, raw = random_case(rng)
        check_against_rtl(config, geometry, out_channels, raw=raw, seed=i)
        k_words = geometry[3] ** 2 * -(-geometry[2] // config.simd)
        seen.add(regime(config, k_words, out_channels, raw))
    assert seen == {"K", "setup", "drain", "writer"}, seen    # every regime was exercised


def run_layer_over_the_link(config, desc) -> tuple[int, int]:
    """CONFIGURE_LAYER + RUN_LAYER frames into ``CommandExecutor`` (stream level, no
    idle cycles): the counters of RUN_LAYER's response."""
    from amaranth.sim import Simulator

    from bitdet.core.protocol import (
        ErrorCode,
        FrameParser,
        Opcode,
        decode_counters,
        encode_frame,
        parse_response,
    )
    from bitdet.hw.top import CommandExecutor
    dut = CommandExecutor(config)
    counters = []

    async def command(ctx, opcode, payload):
        pending = list(encode_frame(opcode, payload))
        parser = FrameParser(payload_limits=None)
        ctx.set(dut.o.ready, 1)
        for _ in range(200_000):
            ctx.set(dut.i.valid, bool(pending))
            if pending:
                ctx.set(dut.i.payload, pending[0])
            took = bool(pending) and ctx.get(dut.i.ready)
            out = ctx.get(dut.o.payload) if ctx.get(dut.o.valid) else None
            await ctx.tick()
            if took:
                pending.pop(0)
            frames = parser.feed([out]) if out is not None else []
            if frames:
                response = parse_response(frames[0])
                assert response.status == ErrorCode.OK, response
                return response.data
        raise AssertionError("no response")

    async def testbench(ctx):
        await command(ctx, Opcode.CONFIGURE_LAYER, encode_layer(**desc))
        counters.extend(decode_counters(await command(ctx, Opcode.RUN_LAYER, b"")))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return counters[0], counters[1]


@pytest.mark.parametrize(("preset", "geometry", "out_channels"), [
    ("tiny", (5, 4, 20, 1, 1, 0, 0), 13),             # K 3, 7 tiles per command
    ("icebreaker", (5, 7, 21, 3, 2, 1, 1), 10),
])
def test_model_matches_run_layer(preset, geometry, out_channels):
    """RUN_LAYER answers the controller's counters: the model of the decoded descriptor
    (what the emulator sees) matches them."""
    pytest.importorskip("amaranth")
    config = load_config(preset)
    desc = descriptor(config, geometry, out_channels)
    assert run_layer_over_the_link(config, desc) == \
        layer_cycles(config, decode_layer(encode_layer(**desc)))


# -- the closed form against a job-level event model ----------------------------------------

def event_model(rows, cols, k_words, groups, tiles, raw):
    """Busy cycles from the RTL's handshakes, job by job (cycle 0: ``start``):

    * controller: ISSUE offers the first command (group 0, all ``tiles`` jobs) in cycle
      3, the next group's ``rows`` ADVANCE cycles after an acceptance;
    * window generator: accepts a command while idle (``a``), is READY ``rows + 3`` cycles
      later (``r``), hands over at ``h = max(r, e_prev)`` (``e``: cycle the running
      command's last K-word is read), is idle again at ``h + 1``; the command's next job
      starts at ``e_prev`` as if handed over then; a word read in cycle ``e`` is on
      ``words`` from ``e + 2`` (the address register, then the data); the two stages stall
      together, so a job reads its first K-word (in effect: its second one is read when
      the previous job's last is taken) at ``s = max(h + 1, X_prev − 1)`` and one word
      per cycle after;
    * controller / array: a word with ``last`` is taken ≥ ``cols`` cycles (the array) and,
      thresholded, ≥ ``rows`` cycles (the writer's guard) after the previous one
      (``X = max(e + 2, X_prev + D)``); the last column leaves ``rows + 2·cols + 1``
      cycles after ``X``;
    * controller: the threshold stage (``THRESHOLD_PIPELINE`` registers), then ``rows``
      writes (not in raw mode), then DRAIN sees the end.
    """
    spacing = cols if raw else max(cols, rows)
    offered, gen_idle = 3, 0
    e_prev = x_prev = -10 ** 9
    for _group in range(groups):
        accept = max(offered, gen_idle)
        h = max(accept + rows + 3, e_prev)
        gen_idle = h + 1
        offered = accept + 1 + rows
        for tile in range(tiles):
            if tile:
                h = e_prev                       # same window, next tag: no setup
            s = max(h + 1, x_prev - 1)
            e = s + k_words - 1
            x = max(e + 2, x_prev + spacing)
            e_prev, x_prev = e, x
    return (x_prev + rows + 2 * cols + ARRAY_PIPELINE + THRESHOLD_PIPELINE
            + (0 if raw else rows))


def test_closed_form_matches_event_model():
    for rows, cols, k_words, groups, tiles in itertools.product(
            (1, 2, 3, 5, 8), (1, 2, 4, 8, 16), (1, 2, 3, 5, 7, 8, 9, 12, 13, 18, 20),
            (1, 2, 3, 7), (1, 2, 3, 5, 9)):
        simd = 16 * cols
        config = AcceleratorConfig(rows=rows, cols=cols, simd=simd, max_channels=256)
        desc = {"out_h": 1, "out_w": groups * rows, "channels": simd * k_words,
                "out_channels": tiles * cols, "kernel": 1}
        for raw in (0, 1):
            desc["raw"] = raw
            busy, stall = layer_cycles(config, desc)
            assert busy == event_model(rows, cols, k_words, groups, tiles, raw), \
                (rows, cols, k_words, groups, tiles, raw)
            assert busy - stall == groups * tiles * k_words


def test_ideal_agrees_with_controller():
    pytest.importorskip("amaranth")
    from bitdet.hw.controller import LayerController
    from bitdet.hw.window import WindowLayer
    rng = np.random.default_rng(5)
    for _ in range(20):
        config, geometry, out_channels, raw = random_case(rng)
        layer = WindowLayer(*geometry)
        desc = descriptor(config, geometry, out_channels, raw=raw)
        assert ideal_cycles(config, desc) == \
            LayerController(config=config).ideal_cycles(layer, out_channels)


def test_counter_width_is_the_controllers():
    pytest.importorskip("amaranth")
    from bitdet.hw import array, controller
    assert COUNTER_WIDTH == controller.COUNTER_WIDTH
    assert ARRAY_PIPELINE == array.ARRAY_PIPELINE
    assert THRESHOLD_PIPELINE == controller.THRESHOLD_PIPELINE


def test_known_counts():
    """Hand-derived: tiny (2×2×8), 4×4 map 32→4, 3×3 (K 36, 8 groups, 2 tiles): gapless, so busy =
    16·36 + 3·2 + 2·2 + 13 (8 + the array's 3 pipeline registers + the window
    generator's address register + the threshold memory's word register); a 2×4×16 array, 1×1 of 16
    channels on a 2×3 map, 8 outputs (3 groups × 2 tiles of K 1): the two jobs of a group
    cols = 4 cycles apart (the array's drain), a group every max(2·4, rows + 4) = 8 cycles;
    tiny, the same map with 8 channels (K 1) and 2 outputs (1 tile): a group every rows + 4
    = 6 cycles (setup-bound); that map on a 5×1×8 array, 9 outputs (9 tiles of K 1):
    thresholded, jobs rows = 5 cycles apart (the writer), raw 1 cycle apart and a group
    every max(9·1, rows + 4) = 9 cycles."""
    tiny, ice = load_config("tiny"), small_config(2, 4, 16)
    conv = {"out_h": 4, "out_w": 4, "channels": 32, "out_channels": 4, "kernel": 3,
            "raw": 0}
    assert layer_cycles(tiny, conv) == (576 + 23, 23)
    assert layer_cycles(tiny, conv | {"raw": 1}) == (576 + 21, 21)
    assert layer_cycles(tiny, {k: np.int64(v) for k, v in conv.items()}) == (576 + 23, 23)
    one = {"out_h": 2, "out_w": 3, "channels": 16, "out_channels": 8, "kernel": 1, "raw": 0}
    assert ideal_cycles(ice, one) == 6
    assert layer_cycles(ice, one) == (1 + 2 * 8 + 4 + 3 * 2 + 2 * 4 + 13, 1 + 20 + 27 - 6)
    one8 = one | {"channels": 8}                          # K 1 on simd 8
    assert layer_cycles(tiny, one8 | {"out_channels": 2}) == (1 + 2 * 6 + 3 * 2 + 2 * 2 + 13,
                                                              1 + 12 + 23 - 3)
    narrow = small_config(5, 1, 8)
    one9 = one8 | {"out_channels": 9}                     # 2 groups (6 px, 5 rows)
    assert layer_cycles(narrow, one9) == (1 + 45 + 8 * 5 + 3 * 5 + 2 + 13,
                                          1 + 45 + 40 + 30 - 18)
    assert layer_cycles(narrow, one9 | {"raw": 1}) == (1 + 9 + 8 * 1 + 2 * 5 + 2 + 13,
                                                       1 + 9 + 8 + 25 - 18)


def test_counters_wrap_like_the_hardware():
    config = small_config(1, 1, 8)
    huge = {"out_h": 4000, "out_w": 4000, "channels": 64, "out_channels": 64, "kernel": 7}
    busy, stall = layer_cycles(config, huge)
    exact = 4000 * 4000 * 64 * 49 * 8 + 3 + 2 + 13
    assert busy == exact % 2 ** COUNTER_WIDTH < exact
    assert stall == 3 + 2 + 13          # the stall counter itself does not reach 2**32


def test_errors():
    config = load_config("tiny")
    conv = {"out_h": 4, "out_w": 4, "channels": 8, "out_channels": 4, "kernel": 3}
    # a pool pass: one read per output pixel, word and tap, plus 4 (hw/pool.py)
    assert layer_cycles(config, conv | {"pool": 1}) == pool_cycles(config, conv | {"pool": 1})
    assert pool_cycles(config, conv | {"pool": 1}) == (4 * 4 * 1 * 9 + 4, 4)
    with pytest.raises(ValueError, match="pool descriptor kernel"):
        pool_cycles(config, {"out_h": 4, "out_w": 4, "channels": 8, "pool": 1})
    with pytest.raises(ValueError, match="a pool pass has none"):
        ideal_cycles(config, conv | {"pool": 2})
    with pytest.raises(ValueError, match="lacks out_channels, kernel"):
        layer_cycles(config, {"out_h": 4, "out_w": 4, "channels": 8})
    with pytest.raises(ValueError, match="out_w must be a positive integer, not 0"):
        layer_cycles(config, conv | {"out_w": 0})
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        layer_cycles(None, conv)
    with pytest.raises(TypeError, match="descriptor must be a dict"):
        layer_cycles(config, [4, 4, 8, 4, 3])
    with pytest.raises(ValueError, match=r"simd \(8\) to be a multiple of cols \(3\)"):
        layer_cycles(AcceleratorConfig(rows=2, cols=3, simd=8), conv)


def test_imports_without_amaranth():
    """``bitdet.core.cycles`` (and the config it takes) work where amaranth is missing."""
    code = textwrap.dedent("""
        import sys
        sys.modules["amaranth"] = None
        from bitdet.core.config import load_config
        from bitdet.core.cycles import layer_cycles
        desc = {"out_h": 4, "out_w": 4, "channels": 32, "out_channels": 4, "kernel": 3}
        print(layer_cycles(load_config("tiny"), desc))
        assert not any(name.startswith("amaranth") and sys.modules[name] is not None
                       for name in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(599, 23)"
