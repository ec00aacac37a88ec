# amaranth: UnusedElaboratable=no
"""Window generator streaming bit-planes (contract 2, ``max_planes > 1``), amaranth.sim.

An n-bit map lies in the read bank as its :func:`bitdet.core.packing.pack_levels` planes,
plane ``b`` from ``base + b·plane_step``. Every emitted K-word (activations of every row,
``first``, ``last``, ``index``, ``shift``, ``tag``, ``row_valid``) is compared with a model
built from ``pack_levels`` of the *spatially padded* level map (padded with ``pad_level``,
so a padding tap of plane ``b`` is a packed pixel of bit ``b`` of ``pad_level``), in the
order: per job, plane 0's K-words in :func:`~bitdet.core.packing.pack_weights` tap order,
then plane 1's, …; and, through the real systolic array, the words give
:func:`bitdet.core.golden.level_conv2d`'s ``A = Σ_b 2**b · P_b``.
"""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.packing import pack_levels, pack_weights
from bitdet.hw.array import SystolicArray
from bitdet.hw.memory import ActivationBuffer, ColumnMemory
from bitdet.hw.window import WindowGenerator, WindowLayer, window_generator
from bitdet.hw.window_engines import IssueEngine, SetupEngine

TAG_WIDTH = 6


def to_ints(words: np.ndarray, simd: int) -> list[int]:
    """uint8 ``(..., bytes)`` → the little-endian ``simd``-bit words, flattened."""
    flat = np.ascontiguousarray(words).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def generator(rows: int, simd: int, depth: int, **kwargs) -> WindowGenerator:
    params = {"max_channels": 32, "max_kernel": 3, "max_stride": 2, "tag_width": TAG_WIDTH,
              "max_tiles": 3, "max_planes": 4} | kwargs
    return WindowGenerator(rows=rows, simd=simd, depth=depth, **params)


class Map:
    """An n-bit level map ``levels`` (``1×C×H×W``, ``bits`` planes) of ``layer`` stored
    from word ``base``, plane ``b`` at ``base + b·plane_step``."""

    def __init__(self, layer: WindowLayer, levels: np.ndarray, bits: int, base: int,
                 plane_step: int):
        self.layer, self.levels, self.bits = layer, levels, bits
        self.base, self.plane_step = base, plane_step

    def image(self, simd: int) -> dict[int, int]:
        planes = pack_levels(self.levels, self.bits, word_bits=simd)         # b, 1, H, W, B
        return {self.base + b * self.plane_step + a: v
                for b in range(self.bits) for a, v in enumerate(to_ints(planes[b], simd))}


def random_levels(rng, channels: int, h: int, w: int, bits: int) -> np.ndarray:
    return rng.integers(0, 1 << bits, size=(1, channels, h, w), dtype=np.int64)


def expected_words(map_: Map, group: int, payload: dict, *, simd: int, rows: int):
    """Model of one command: ``(activations, row_valid, first, last, index, shift, tag)``
    of each of its ``tiles · planes · K`` K-words, in order."""
    layer, p = map_.layer, map_.layer.padding
    planes = max(payload["planes"], 1)
    padded = np.pad(map_.levels, ((0, 0), (0, 0), (p, p), (p, p)),
                    constant_values=payload["pad_level"])
    packed = pack_levels(padded, map_.bits, word_bits=simd)[:, 0]          # b, Hp, Wp, B
    words, k = layer.words(simd), layer.k_words(simd)
    pixels = layer.out_h * layer.out_w
    valid = [group * rows + r < pixels for r in range(rows)]
    row_valid = sum(v << r for r, v in enumerate(valid))
    out = []
    for t in range(max(payload["tiles"], 1)):
        tag = (payload["tag"] + t * payload["tag_step"]) % (1 << TAG_WIDTH)
        for b in range(planes):
            for j in range(k):
                tap, m = divmod(j, words)
                ky, kx = divmod(tap, layer.kernel)
                acts = []
                for r in range(rows):
                    if not valid[r]:
                        acts.append(0)
                        continue
                    oy, ox = divmod(group * rows + r, layer.out_w)
                    pixel = packed[b, oy * layer.stride + ky, ox * layer.stride + kx]
                    acts.append(to_ints(pixel, simd)[m])
                out.append((acts, row_valid, b == 0 and j == 0,
                            b == planes - 1 and j == k - 1, j, b, tag))
    return out


class Harness(Elaboratable):
    """The window generator reading an activation buffer, one read port per array row."""

    def __init__(self, gen: WindowGenerator, buf: ActivationBuffer):
        self.gen, self.buf = gen, buf

    def elaborate(self, platform):
        m = Module()
        m.submodules.gen, m.submodules.buf = self.gen, self.buf
        for r in range(self.gen.rows):
            wiring.connect(m, self.gen.read[r], self.buf.read[r])
        return m


def run_commands(gen: WindowGenerator, maps: list[Map], commands, *, rng,
                 ready_rate: float = 1.0, command_gap: int = 0):
    """Load every map into the read bank (the rest of the bank: junk), run ``commands``
    (payloads) in order with ``words.ready`` high with probability ``ready_rate`` and
    ``command_gap`` idle cycles after each accepted command.

    Returns per command its accept cycle and its words ``(activations, row_valid, first,
    last, index, shift, tag)`` with the cycles they were taken. Every word's ``fetch``
    (registered a cycle ahead) must name its tag and index, ``fetch.addr`` their sum.
    """
    simd, rows, depth = gen.simd, gen.rows, gen.depth
    bank = {a: int(rng.integers(0, 1 << simd)) for a in range(depth)}
    for map_ in maps:
        bank |= map_.image(simd)
    buf = ActivationBuffer(simd=simd, depth=depth, read_ports=rows)
    counts = [max(c["tiles"], 1) * max(c["planes"], 1) * c["kernel"] ** 2 * c["words"]
              for c in commands]
    records = [{"accept": None, "words": [], "cycles": []} for _ in commands]
    max_cycles = 200 + depth + sum(n + rows + 5 + command_gap for n in counts) \
        * int(4 / ready_rate)

    async def testbench(ctx):
        ctx.set(buf.select, 0)                          # write bank 1
        for a, v in bank.items():
            ctx.set(buf.write.en, 1)
            ctx.set(buf.write.addr, a)
            ctx.set(buf.write.data, v)
            await ctx.tick()
        ctx.set(buf.write.en, 0)
        ctx.set(buf.select, 1)                          # read it
        fetched = None          # what a weight read port driven by `fetch` would hold
        sent, gap, current = 0, 0, 0
        for cycle in range(max_cycles):
            offer = sent < len(commands) and gap == 0
            ctx.set(gen.command.valid, offer)
            if offer:
                ctx.set(gen.command.payload, commands[sent])
            ready = bool(rng.random() < ready_rate)
            ctx.set(gen.words.ready, ready)
            if offer and ctx.get(gen.command.ready):
                records[sent]["accept"] = cycle
                sent += 1
                gap = command_gap
            elif gap:
                gap -= 1
            if ctx.get(gen.words.valid):
                out = ctx.get(gen.words.payload)
                assert fetched == (out.tag, out.index)
                if ready:
                    record = records[current]
                    record["words"].append(
                        ([out.activations[r] for r in range(rows)], out.row_valid,
                         out.first, out.last, out.index, out.shift, out.tag))
                    record["cycles"].append(cycle)
                    if len(record["words"]) == counts[current]:
                        current += 1
                        if current == len(commands):
                            return
            if ctx.get(gen.fetch.en):
                fetched = (ctx.get(gen.fetch.tag), ctx.get(gen.fetch.index))
                assert ctx.get(gen.fetch.addr) == sum(fetched) % (1 << TAG_WIDTH)
            await ctx.tick()
        raise AssertionError(f"the commands did not finish in {max_cycles} cycles")

    sim = Simulator(Harness(gen, buf))
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return records


def check_commands(gen, maps, schedule, commands, records):
    """Every command's words are the model's; ``schedule[k] = (map, group)``."""
    assert len(records) == len(commands)
    for k, ((n, group), payload, record) in enumerate(
            zip(schedule, commands, records, strict=True)):
        want = expected_words(maps[n], group, payload, simd=gen.simd, rows=gen.rows)
        assert len(record["words"]) == len(want), k
        for i, (got, exp) in enumerate(zip(record["words"], want, strict=True)):
            assert got == exp, (k, i)


def payloads(gen, maps, schedule, rng, *, tiles=None, planes=None, pad_levels=None):
    """A command per ``(map, group)`` of ``schedule``: tag ``k mod 16``, tag steps of
    ``1 + k mod 5``, random tiles (1 … max_tiles), planes (1 … the map's bits) and pad
    level unless given."""
    commands = []
    for k, (n, group) in enumerate(schedule):
        map_ = maps[n]
        t = tiles if tiles is not None else int(rng.integers(1, gen.max_tiles + 1))
        b = planes[k] if planes is not None else int(rng.integers(1, map_.bits + 1))
        level = pad_levels[k] if pad_levels is not None else int(rng.integers(0, 1 << b))
        commands.append(gen.command_payload(
            map_.layer, group, base=map_.base, tag=k % 16, tiles=t, tag_step=1 + k % 5,
            planes=b, plane_step=map_.plane_step, pad_level=level))
    return commands


# rows, simd, depth, in_h, in_w, channels, kernel, stride, padding, bits, gap
CASES = [
    (3, 8, 256, 4, 5, 11, 3, 1, 1, 4, 0),   # C not a multiple of simd, 4 planes
    (2, 16, 256, 5, 4, 21, 3, 2, 1, 3, 5),  # stride 2, partial last group, gaps between planes
    (3, 8, 128, 4, 3, 13, 1, 1, 0, 2, 1),   # 1×1, 2 planes
    (2, 8, 256, 5, 5, 5, 1, 2, 0, 4, 0),    # 1×1 stride 2: K = 1 (planes 1 word apart)
    (3, 16, 256, 3, 4, 9, 3, 2, 2, 4, 3),   # padding 2: windows mostly padding
]


@pytest.mark.parametrize(("rows", "simd", "depth", "in_h", "in_w", "channels", "kernel",
                          "stride", "padding", "bits", "gap"), CASES)
def test_planes_words(rows, simd, depth, in_h, in_w, channels, kernel, stride, padding,
                      bits, gap):
    """Every group of a layer, random planes (1 … bits), pad levels and tiles, with
    back-pressure and gaps between commands: every K-word, flag, index, shift and tag is
    the model's (planes stored ``map_words + gap`` apart, junk in between)."""
    rng = np.random.default_rng(rows * 1000 + in_h * 10 + channels)
    gen = generator(rows, simd, depth)
    layer = WindowLayer(in_h, in_w, channels, kernel, stride, padding)
    map_words = in_h * in_w * layer.words(simd)
    maps = [Map(layer, random_levels(rng, channels, in_h, in_w, bits), bits, base=3,
                plane_step=map_words + gap)]
    schedule = [(0, g) for g in range(layer.groups(rows))]
    commands = payloads(gen, maps, schedule, rng)
    records = run_commands(gen, maps, commands, rng=rng, ready_rate=0.7,
                           command_gap=int(rng.integers(0, 3)))
    check_commands(gen, maps, schedule, commands, records)


def test_every_pad_level():
    """Every pad level of 1 … 4 planes (each bit pattern of ``pad_level``, 30 commands
    over the groups of a padded 3×3 layer): plane ``b``'s padding word is all real
    channels set (channel padding 0) exactly where bit ``b`` of ``pad_level`` is 1."""
    rng = np.random.default_rng(7)
    rows, simd = 2, 8
    gen = generator(rows, simd, 128)
    layer = WindowLayer(3, 4, 5, 3, 1, 1)                   # 5 channels: 3 padding bits
    maps = [Map(layer, random_levels(rng, 5, 3, 4, 4), 4, base=0, plane_step=12)]
    groups = layer.groups(rows)
    planes = [b for b in range(1, 5) for _ in range(1 << b)]
    levels = [v for b in range(1, 5) for v in range(1 << b)]
    schedule = [(0, k % groups) for k in range(len(planes))]
    commands = payloads(gen, maps, schedule, rng, tiles=1, planes=planes,
                        pad_levels=levels)
    records = run_commands(gen, maps, commands, rng=rng, ready_rate=0.9)
    check_commands(gen, maps, schedule, commands, records)
    # the padding really shows: plane b of a corner tap of group 0 is all real channels
    # where bit b of the level is set, and 0 where it is not
    for payload, record in zip(commands, records, strict=True):
        if payload["oy"] == payload["ox"] == 0:
            corner = [acts[0] for acts, _, _, _, index, _, _ in record["words"]
                      if index == 0]                          # tap (0, 0) of every plane
            assert corner == [0x1F if payload["pad_level"] >> b & 1 else 0
                              for b in range(payload["planes"])]


def test_planes_interleaved_maps():
    """Commands over two maps (different geometry, bits, bases and plane steps) and
    one-plane commands (``planes`` 1, and 0 in a hand-made payload: one plane),
    interleaved with back-pressure: the next command's setup never disturbs the planes
    of the running one."""
    rng = np.random.default_rng(11)
    rows, simd = 3, 8
    gen = generator(rows, simd, 256)
    a = WindowLayer(4, 5, 11, 3, 1, 1)
    b = WindowLayer(5, 5, 6, 1, 2, 0)
    map_a = Map(a, random_levels(rng, 11, 4, 5, 3), 3, base=0, plane_step=41)
    map_b = Map(b, random_levels(rng, 6, 5, 5, 4), 4, base=130, plane_step=25)
    maps = [map_a, map_b]
    schedule = [(0, 0), (1, 0), (0, 1), (1, 1), (1, 2), (0, 2), (0, 3), (1, 0), (0, 6)]
    commands = payloads(gen, maps, schedule, rng)
    commands[3] |= {"planes": 0, "plane_step": 0}     # planes = 0 reads one plane
    commands[4] = gen.command_payload(b, 2, base=130, tag=4, tiles=2, tag_step=3)
    assert commands[4]["planes"] == 1 and commands[4]["plane_step"] == 0
    records = run_commands(gen, maps, commands, rng=rng, ready_rate=0.8, command_gap=1)
    check_commands(gen, maps, schedule, commands, records)


@pytest.mark.parametrize(("rows", "channels", "kernel", "planes", "tiles"), [
    (3, 11, 3, 4, 2),     # K = 18: 144 words a command
    (2, 8, 1, 3, 1),      # K = 1: 3 words < rows + 4, commands every rows + 4 cycles
    (3, 8, 1, 4, 2),      # K = 1: 8 words ≥ rows + 4 = 7, no idle cycle
    (2, 17, 1, 2, 3),     # K = 3: 18 words
    (1, 8, 3, 2, 1),      # one row, K = 9
])
def test_planes_throughput(rows, channels, kernel, planes, tiles):
    """Always ready, commands always offered: one K-word per cycle within a command (no
    idle cycle between planes or jobs), the first word ``setup_cycles + 2`` cycles after
    the first command, the commands' first words ``job_cycles(K, tiles, planes) =
    max(tiles · planes · K, rows + 4)`` apart: no idle cycle at all when
    ``tiles · planes · K ≥ rows + 4``."""
    rng = np.random.default_rng(rows + 10 * planes)
    gen = generator(rows, 8, 256)
    layer = WindowLayer(5, 6, channels, kernel, 1, kernel // 2)
    maps = [Map(layer, random_levels(rng, channels, 5, 6, planes), planes, base=0,
                plane_step=5 * 6 * layer.words(8))]
    schedule = [(0, g) for g in range(layer.groups(rows))]
    commands = payloads(gen, maps, schedule, rng, tiles=tiles, planes=[planes] * len(schedule))
    records = run_commands(gen, maps, commands, rng=rng)
    check_commands(gen, maps, schedule, commands, records)
    k = layer.k_words(8)
    n = tiles * planes * k
    assert gen.job_cycles(k, tiles, planes) == max(n, rows + 4)
    assert records[0]["cycles"][0] == records[0]["accept"] + gen.setup_cycles + 2
    for i, record in enumerate(records):
        assert record["cycles"] == list(range(record["cycles"][0], record["cycles"][0] + n))
        if i:
            assert record["cycles"][0] - records[i - 1]["cycles"][0] == \
                gen.job_cycles(k, tiles, planes)
    every = [c for record in records for c in record["cycles"]]
    if n >= rows + 4:
        assert every == list(range(every[0], every[0] + len(every)))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), simd=st.sampled_from([8, 16]), in_h=st.integers(1, 5),
       in_w=st.integers(1, 5), channels=st.integers(1, 20), kernel=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), bits=st.integers(1, 4),
       gap=st.integers(0, 3), seed=st.integers(0, 2 ** 32 - 1))
def test_planes_random_layers(rows, simd, in_h, in_w, channels, kernel, stride, padding,
                              bits, gap, seed):
    if kernel > min(in_h, in_w) + 2 * padding:
        return
    rng = np.random.default_rng(seed)
    gen = generator(rows, simd, 256)
    layer = WindowLayer(in_h, in_w, channels, kernel, stride, padding)
    maps = [Map(layer, random_levels(rng, channels, in_h, in_w, bits), bits, base=gap,
                plane_step=in_h * in_w * layer.words(simd) + gap)]
    schedule = [(0, g) for g in range(layer.groups(rows))]
    commands = payloads(gen, maps, schedule, rng)
    records = run_commands(gen, maps, commands, rng=rng, ready_rate=0.6)
    check_commands(gen, maps, schedule, commands, records)


class ConvCore(Elaboratable):
    """Buffer → window generator → (+ weight memory at ``fetch.addr``) → systolic array
    of ``max_input_bits = max_planes``, the words' ``shift`` on the operands'."""

    def __init__(self, *, rows, cols, simd, depth, weight_depth, max_planes):
        self.gen = WindowGenerator(rows=rows, simd=simd, depth=depth, max_channels=32,
                                   max_kernel=3, max_stride=2,
                                   tag_width=(weight_depth - 1).bit_length(), max_tiles=4,
                                   max_planes=max_planes)
        self.buf = ActivationBuffer(simd=simd, depth=depth, read_ports=rows)
        self.weights = ColumnMemory(shape=simd, depth=weight_depth, columns=cols)
        self.array = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=12,
                                   max_input_bits=max_planes)

    def elaborate(self, platform):
        m = Module()
        gen, weights, array = self.gen, self.weights, self.array
        m.submodules.gen, m.submodules.buf = gen, self.buf
        m.submodules.weights, m.submodules.array = weights, array
        for r in range(gen.rows):
            wiring.connect(m, gen.read[r], self.buf.read[r])
        operands, words = array.operands, gen.words.payload
        m.d.comb += [
            weights.read.addr.eq(gen.fetch.addr),
            weights.read.en.eq(gen.fetch.en),
            operands.valid.eq(gen.words.valid),
            operands.payload.activations.eq(words.activations),
            operands.payload.weights.eq(weights.read.data),
            operands.payload.first.eq(words.first),
            operands.payload.last.eq(words.last),
            operands.payload.shift.eq(words.shift),
            gen.words.ready.eq(operands.ready),
        ]
        return m


@pytest.mark.parametrize(("layer", "bits", "planes", "pad_level", "out_channels", "cols"), [
    (WindowLayer(4, 5, 11, 3, 1, 1), 4, 4, 0b1010, 5, 3),    # K = 18, two tiles
    (WindowLayer(5, 4, 7, 3, 2, 1), 3, 2, 0b11, 4, 2),       # 2 of 3 stored planes
    (WindowLayer(4, 4, 9, 1, 1, 0), 2, 2, 0, 6, 3),          # 1×1, K = 2
])
def test_planes_feed_the_array(layer, bits, planes, pad_level, out_channels, cols):
    """Every group through the real array, one command per group running all its tiles
    (tags ``t·K``): ``p`` is the golden ``A = Σ_b 2**b · P_b`` of the level map's
    ``planes`` low bits, padded with ``pad_level``."""
    rows, simd = 2, 8
    rng = np.random.default_rng(out_channels * 10 + planes)
    levels = random_levels(rng, layer.channels, layer.in_h, layer.in_w, bits)
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(out_channels, layer.channels,
                                                       layer.kernel, layer.kernel)))
    want = golden.level_conv2d(torch.from_numpy(levels & ((1 << planes) - 1)), w,
                               in_bits=planes, stride=layer.stride, padding=layer.padding,
                               pad_level=pad_level)[0].numpy()
    w_packed = pack_weights(w, word_bits=simd, cols=cols)          # tiles, K, cols, bytes
    tiles, k = w_packed.shape[:2]
    dut = ConvCore(rows=rows, cols=cols, simd=simd, depth=256, weight_depth=64,
                   max_planes=4)
    gen = dut.gen
    map_ = Map(layer, levels, bits, base=5,
               plane_step=layer.in_h * layer.in_w * layer.words(simd) + 7)
    commands = [gen.command_payload(layer, g, base=5, tiles=tiles, planes=planes,
                                    plane_step=map_.plane_step, pad_level=pad_level)
                for g in range(layer.groups(rows))]
    jobs = [(t, g) for g in range(layer.groups(rows)) for t in range(tiles)]
    results = []

    async def testbench(ctx):
        ctx.set(dut.buf.select, 0)
        for a, v in map_.image(simd).items():               # into bank 1
            ctx.set(dut.buf.write.en, 1)
            ctx.set(dut.buf.write.addr, a)
            ctx.set(dut.buf.write.data, v)
            await ctx.tick()
        ctx.set(dut.buf.write.en, 0)
        ctx.set(dut.buf.select, 1)
        for t in range(tiles):                         # tile t at t·K, in pack_weights order
            for c in range(cols):
                for j, v in enumerate(to_ints(w_packed[t, :, c], simd)):
                    ctx.set(dut.weights.write.en, 1)
                    ctx.set(dut.weights.write.addr, t * k + j)
                    ctx.set(dut.weights.write.column, c)
                    ctx.set(dut.weights.write.data, v)
                    await ctx.tick()
        ctx.set(dut.weights.write.en, 0)
        sent = 0
        for _ in range(len(jobs) * (planes * k + 3 * cols + rows + 10) + 100):
            ctx.set(gen.command.valid, sent < len(commands))
            if sent < len(commands):
                ctx.set(gen.command.payload, commands[sent])
                if ctx.get(gen.command.ready):
                    sent += 1
            if ctx.get(dut.array.results.valid):
                out = ctx.get(dut.array.results.payload)
                results.append([out.p[r] for r in range(rows)])
                if len(results) == len(jobs) * cols:
                    return
            await ctx.tick()
        raise AssertionError("the array did not deliver every result")

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    pixels = layer.out_h * layer.out_w
    checked = 0
    for n, (t, g) in enumerate(jobs):
        for c in range(cols):
            o = t * cols + c
            for r in range(rows):
                if o < out_channels and g * rows + r < pixels:
                    oy, ox = divmod(g * rows + r, layer.out_w)
                    assert results[n * cols + c][r] == want[o, oy, ox], (t, g, c, r)
                    checked += 1
    assert checked == out_channels * pixels


def test_layouts_and_window_generator():
    """The plane fields exist only with ``max_planes > 1``; ``window_generator`` takes
    ``max_planes`` from ``config.max_input_bits``."""
    plain = WindowGenerator(rows=2, simd=8, depth=64, max_channels=16, max_kernel=3,
                            max_stride=2, tag_width=6)
    assert plain.max_planes == 1
    assert not {"planes", "plane_step", "pad_level"} & set(plain.command_layout.members)
    assert "shift" not in plain.word_layout.members
    gen = generator(2, 8, 64)
    assert gen.max_planes == 4
    fields = gen.command_layout.members
    assert fields["planes"] == range(5) and fields["pad_level"] == 4
    assert fields["plane_step"] == gen.addr_width == 6
    assert gen.word_layout.members["shift"] == range(4)
    # the contract-1 fields keep their place (the plane fields follow them)
    assert list(fields)[:len(plain.command_layout.members)] == \
        list(plain.command_layout.members)
    assert list(gen.word_layout.members)[:-1] == list(plain.word_layout.members)
    assert window_generator(AcceleratorConfig()).max_planes == 1
    c2 = load_config("contract2")
    g2 = window_generator(c2)
    assert g2.max_planes == c2.max_input_bits == 4
    assert g2.word_layout.members["shift"] == range(4)
    assert g2.job_cycles(18, 2, 4) == 144 and g2.job_cycles(1, 1, 2) == g2.rows + 4
    assert g2.job_cycles(5, 1, 0) == g2.job_cycles(5, 1, 1)


def test_engines_check_the_plane_fields():
    gen, plain = generator(2, 8, 64), generator(2, 8, 64, max_planes=1)
    with pytest.raises(ValueError, match="max_planes 4 needs a command layout with"):
        SetupEngine(command_layout=plain.command_layout, rows=2, simd=8, depth=64,
                    max_kernel=3, max_planes=4)
    with pytest.raises(ValueError, match="max_planes 1 needs a command layout without"):
        SetupEngine(command_layout=gen.command_layout, rows=2, simd=8, depth=64,
                    max_kernel=3)
    setup = SetupEngine(command_layout=gen.command_layout, rows=2, simd=8, depth=64,
                        max_kernel=3, max_planes=4)
    with pytest.raises(ValueError, match="needs a word layout with shift"):
        IssueEngine(window_layout=setup.window_layout, word_layout=plain.word_layout,
                    rows=2, simd=8, depth=64, max_kernel=3, max_words=2, max_tiles=3,
                    tag_width=6, max_planes=4)
    with pytest.raises(ValueError, match="max_planes must be at least 1"):
        generator(2, 8, 64, max_planes=0)


def test_command_payload_planes():
    gen = generator(3, 8, 128)
    layer = WindowLayer(4, 5, 10, 3, 1, 1)                   # 2 words, map 40 words
    payload = gen.command_payload(layer, 1, base=2, tiles=2, planes=3, pad_level=5)
    assert {k: payload[k] for k in ("pad_bit", "planes", "plane_step", "pad_level")} == \
        {"pad_bit": 0, "planes": 3, "plane_step": 40, "pad_level": 5}
    assert gen.command_payload(layer, 0, planes=2, plane_step=44)["plane_step"] == 44
    one = gen.command_payload(layer, 0)
    assert (one["planes"], one["plane_step"], one["pad_level"]) == (1, 0, 0)
    # a one-plane layer's pad_bit becomes its pad level
    padded = gen.command_payload(WindowLayer(4, 5, 10, 3, 1, 1, pad_bit=1), 0)
    assert (padded["pad_bit"], padded["pad_level"]) == (0, 1)
    assert gen.command_payload(layer, 0, base=8, planes=3)["base"] == 8   # 8 + 120 = 128
    with pytest.raises(ValueError, match=r"3 planes need words 9 … 128, a bank holds 128"):
        gen.command_payload(layer, 0, base=9, planes=3)
    with pytest.raises(ValueError, match=r"2 planes need words 0 … 129"):
        gen.command_payload(layer, 0, planes=2, plane_step=90)
    with pytest.raises(ValueError, match="planes must be in 1 … 4, not 5"):
        gen.command_payload(layer, 0, planes=5)
    with pytest.raises(ValueError, match="planes must be in 1 … 4, not 0"):
        gen.command_payload(layer, 0, planes=0)
    with pytest.raises(ValueError, match="plane_step 39 is below the map's 40 words"):
        gen.command_payload(layer, 0, planes=2, plane_step=39)
    with pytest.raises(ValueError, match="plane_step must be a non-negative integer"):
        gen.command_payload(layer, 0, planes=2, plane_step=-1)
    with pytest.raises(ValueError, match=r"pad_level must be in 0 … 3 for 2 planes, not 4"):
        gen.command_payload(layer, 0, planes=2, pad_level=4)
    with pytest.raises(ValueError, match="pad_bit must be 0 with a pad_level"):
        gen.command_payload(WindowLayer(4, 5, 10, 3, 1, 1, pad_bit=1), 0, pad_level=1)
    # a contract-1 generator: the payload it always had, and no planes
    plain = generator(3, 8, 128, max_planes=1)
    assert set(plain.command_payload(layer, 0, planes=1, plane_step=0, pad_level=0)) == \
        set(plain.command_layout.members)
    with pytest.raises(ValueError, match="planes must be in 1 … 1, not 2"):
        plain.command_payload(layer, 0, planes=2)
    with pytest.raises(ValueError, match="pad_level 1 needs max_planes > 1"):
        plain.command_payload(layer, 0, pad_level=1)
    with pytest.raises(ValueError, match="plane_step 40 needs max_planes > 1"):
        plain.command_payload(layer, 0, plane_step=40)


def test_plane_generator_converts_to_verilog():
    """The plane-streaming generator converts (with ``fixed_layer`` too); a contract-1
    generator has no plane register."""
    for fixed in (False, True):
        text = verilog.convert(generator(2, 8, 64, fixed_layer=fixed), name="wg")
        assert "words__payload" in text and "plane_next" in text and "pad_bits" in text
    text = verilog.convert(generator(2, 8, 64, max_planes=1), name="wg")
    assert "plane_next" not in text and "pad_bits" not in text
