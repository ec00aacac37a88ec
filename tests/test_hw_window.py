# amaranth: UnusedElaboratable=no
"""Window generator (amaranth.sim) with the ping-pong activation buffer it reads.

Every emitted K-word is compared with a model built from
:func:`bitdet.core.packing.pack_activations` of the *spatially padded* input (padded with the
layer's pad value, so a padding tap is a packed all-+1 or all-−1 pixel) in the tap order
of :func:`~bitdet.core.packing.pack_weights`; and the words of every job, XNOR-popcounted
with ``pack_weights`` words, give :func:`bitdet.core.golden.popcount_conv2d`.
"""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
import torch.nn.functional as F
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module
from amaranth.lib import wiring
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig
from bitdet.core.packing import pack_activations, pack_weights
from bitdet.hw.array import SystolicArray
from bitdet.hw.memory import ActivationBuffer, ColumnMemory, activation_buffer
from bitdet.hw.window import WindowGenerator, WindowLayer, window_generator


def to_ints(words: np.ndarray, simd: int) -> list[int]:
    """uint8 ``(..., bytes)`` → the little-endian ``simd``-bit words, flattened."""
    flat = np.ascontiguousarray(words).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def expected_jobs(x: torch.Tensor, layer: WindowLayer, *, simd: int, rows: int):
    """Model: per job, ``(words[j][r], row_valid)`` from the packed padded input."""
    p = layer.padding
    padded = F.pad(x, (p, p, p, p), value=1.0 if layer.pad_bit else -1.0)
    packed = pack_activations(padded, word_bits=simd)[0]                 # Hp, Wp, bytes
    taps = [(ky, kx) for ky in range(layer.kernel) for kx in range(layer.kernel)]
    pixels = layer.out_h * layer.out_w
    jobs = []
    for g in range(layer.groups(rows)):
        valid = [g * rows + r < pixels for r in range(rows)]
        words = []
        for ky, kx in taps:
            per_row = []
            for r in range(rows):
                if not valid[r]:
                    per_row.append([0] * layer.words(simd))
                    continue
                oy, ox = divmod(g * rows + r, layer.out_w)
                pixel = packed[oy * layer.stride + ky, ox * layer.stride + kx]
                per_row.append(to_ints(pixel, simd))
            words += [[per_row[r][m] for r in range(rows)] for m in range(layer.words(simd))]
        jobs.append((words, sum(v << r for r, v in enumerate(valid))))
    return jobs


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


def run_maps(maps, schedule, *, rows: int, simd: int, depth: int, rng,  # noqa: C901
             ready_rate: float = 1.0, command_gap: int = 0, max_kernel: int = 3):
    """Load every ``(layer, x, base)`` of ``maps`` into bank 1 at word ``base`` (bank 0 holds
    junk), then run the commands ``schedule`` = ``[(map number, group[, tiles]), ...]`` in
    that order (command ``k`` tagged ``k mod 16``, its jobs' tags stepping by
    ``1 + k mod 5``).

    Returns the generator and per job (``tiles`` per command): the accepted words
    ``[(activations, row_valid, first, last, index)]``, the command's number and accept
    cycle and the cycles its words were taken.
    """
    gen = WindowGenerator(rows=rows, simd=simd, depth=depth, max_channels=64,
                          max_kernel=max_kernel, max_stride=2, tag_width=5, max_tiles=4)
    buf = ActivationBuffer(simd=simd, depth=depth, read_ports=rows)
    image = {}
    for _layer, x, base in maps:
        for a, v in enumerate(to_ints(pack_activations(x, word_bits=simd)[0], simd)):
            image[base + a] = v
    junk = {a: int(rng.integers(0, 1 << simd)) for a in range(max(image) + 1)}
    schedule = [(n, g, rest[0] if rest else 1) for n, g, *rest in schedule]
    commands, jobs = [], []
    for k, (n, g, tiles) in enumerate(schedule):
        step = 1 + k % 5 if tiles > 1 else 0
        commands.append(gen.command_payload(maps[n][0], g, base=maps[n][2], tag=k % 16,
                                            tiles=tiles, tag_step=step))
        jobs += [{"words": [], "cycles": [], "command": k, "accept": None,
                  "tag": k % 16 + t * step} for t in range(tiles)]
    max_cycles = 200 + sum(tiles * maps[n][0].k_words(simd) + rows + 5 + command_gap
                           for n, _, tiles in schedule) * int(4 / ready_rate)

    async def testbench(ctx):
        for select, words in ((1, junk), (0, image)):       # write bank 1 − select
            ctx.set(buf.select, select)
            for a, v in words.items():
                ctx.set(buf.write.en, 1)
                ctx.set(buf.write.addr, a)
                ctx.set(buf.write.data, v)
                await ctx.tick()
        ctx.set(buf.write.en, 0)
        ctx.set(buf.select, 1)                               # read the image
        weight_addr = None      # what a weight read port driven by `fetch` would hold
        sent = 0                # commands accepted
        gap = 0
        job = -1
        for cycle in range(max_cycles):
            offer = sent < len(commands) and gap == 0
            ctx.set(gen.command.valid, offer)
            if offer:
                ctx.set(gen.command.payload, commands[sent])
            ready = bool(rng.random() < ready_rate)
            ctx.set(gen.words.ready, ready)
            if offer and ctx.get(gen.command.ready):
                for job_ in jobs:
                    if job_["command"] == sent:
                        job_["accept"] = cycle
                sent += 1
                gap = command_gap
            elif gap:
                gap -= 1
            if ctx.get(gen.words.valid):
                out = ctx.get(gen.words.payload)
                # the weights read with `fetch` line up with the word on `words`
                assert weight_addr == (out.tag, out.index)
                if ready:
                    if out.first:
                        job += 1
                    assert out.tag == jobs[job]["tag"]
                    jobs[job]["words"].append(
                        ([out.activations[r] for r in range(rows)], out.row_valid,
                         out.first, out.last, out.index))
                    jobs[job]["cycles"].append(cycle)
                    if out.last and job == len(jobs) - 1:
                        return
            if ctx.get(gen.fetch.en):
                weight_addr = (ctx.get(gen.fetch.tag), ctx.get(gen.fetch.index))
                # the registered weight address is their sum, modulo the tag's width
                assert ctx.get(gen.fetch.addr) == \
                    (weight_addr[0] + weight_addr[1]) % (1 << len(gen.fetch.tag))
            await ctx.tick()
        raise AssertionError(f"the jobs did not finish in {max_cycles} cycles")

    sim = Simulator(Harness(gen, buf))
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return gen, jobs


def run_layer(layer: WindowLayer, x: torch.Tensor, **kwargs):
    """Every job of one layer, in order, with the input map at word 0."""
    return run_maps([(layer, x, 0)], [(0, g) for g in range(layer.groups(kwargs["rows"]))],
                    **kwargs)


def check_words(layer, x, jobs, *, rows, simd, groups=None):
    """Every word equals the model's, with first/last/index/row_valid; job ``n`` is of
    group ``groups[n]`` (default: one job per group, in order)."""
    model = expected_jobs(x, layer, simd=simd, rows=rows)
    if groups is None:
        groups = range(len(model))
    assert len(jobs) == len(groups)
    k = layer.k_words(simd)
    for g, job in zip(groups, jobs, strict=True):
        words, row_valid = model[g]
        assert len(job["words"]) == k, g
        for j, (acts, valid, first, last, index) in enumerate(job["words"]):
            assert acts == words[j], (g, j)
            assert (valid, first, last, index) == (row_valid, j == 0, j == k - 1, j), (g, j)


def check_popcounts(layer, x, jobs, *, rows, simd, out_channels=5, cols=2, seed=0):
    """XNOR-popcount of the emitted words with pack_weights words = golden P."""
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(out_channels, layer.channels,
                                                       layer.kernel, layer.kernel)))
    p = golden.popcount_conv2d(x, w, stride=layer.stride, padding=layer.padding,
                               pad_value=1 if layer.pad_bit else -1)[0].numpy()
    w_packed = pack_weights(w, word_bits=simd, cols=cols)          # tiles, K, cols, bytes
    pixels = layer.out_h * layer.out_w
    for g, job in enumerate(jobs):
        for r in range(rows):
            n = g * rows + r
            if n >= pixels:
                continue
            oy, ox = divmod(n, layer.out_w)
            a_bytes = b"".join(acts[r].to_bytes(simd // 8, "little")
                               for acts, *_ in job["words"])
            a_bytes = np.frombuffer(a_bytes, dtype=np.uint8)
            for o in range(out_channels):
                t, c = divmod(o, cols)
                got = golden.xnor_popcount(a_bytes, w_packed[t, :, c].reshape(-1))
                assert got == p[o, oy, ox], (g, r, o)


def random_input(rng, channels, h, w):
    return torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, channels, h, w)))


# rows, simd, depth, in_h, in_w, channels, kernel, stride, padding, pad_bit
CASES = [
    (3, 8, 128, 5, 7, 11, 3, 1, 1, 1),      # C not a multiple of simd, +1 padding
    (3, 8, 128, 5, 7, 11, 3, 1, 1, 0),      # the same with −1 padding
    (5, 16, 64, 7, 6, 16, 3, 2, 1, 1),      # stride 2, odd H, partial last group
    (4, 8, 128, 6, 5, 20, 1, 1, 0, 0),      # 1×1
    (2, 8, 64, 5, 5, 8, 1, 2, 0, 0),        # 1×1 stride 2
    (1, 8, 16, 4, 3, 3, 3, 1, 0, 1),        # one row, no padding, 3 channels
    (3, 16, 100, 4, 4, 40, 3, 2, 2, 1),     # padding 2, depth not a power of two
    (4, 8, 64, 3, 9, 9, 3, 1, 1, 1),        # a group spans output rows; out_w > rows
    (6, 8, 64, 5, 3, 5, 3, 2, 1, 0),        # rows > out_w: a group spans 3 output rows
]


@pytest.mark.parametrize(("rows", "simd", "depth", "in_h", "in_w", "channels", "kernel",
                          "stride", "padding", "pad_bit"), CASES)
def test_window_words_and_popcounts(rows, simd, depth, in_h, in_w, channels, kernel, stride,
                                    padding, pad_bit):
    """Random back-pressure and gaps between commands: every word, flag and index is the
    model's, and the words give the golden convolution's P."""
    rng = np.random.default_rng(rows * 1000 + in_h * 10 + channels)
    layer = WindowLayer(in_h, in_w, channels, kernel, stride, padding, pad_bit)
    x = random_input(rng, channels, in_h, in_w)
    _, jobs = run_layer(layer, x, rows=rows, simd=simd, depth=depth, rng=rng,
                        ready_rate=0.7, command_gap=int(rng.integers(0, 3)))
    check_words(layer, x, jobs, rows=rows, simd=simd)
    check_popcounts(layer, x, jobs, rows=rows, simd=simd, seed=channels)


def test_window_kernel_5():
    """Kernels up to max_kernel: 5×5, padding 2, stride 2."""
    rng = np.random.default_rng(5)
    layer = WindowLayer(6, 7, 10, 5, 2, 2, 1)
    x = random_input(rng, 10, 6, 7)
    _, jobs = run_layer(layer, x, rows=3, simd=8, depth=128, rng=rng, ready_rate=0.8,
                        max_kernel=5)
    check_words(layer, x, jobs, rows=3, simd=8)
    check_popcounts(layer, x, jobs, rows=3, simd=8)


@pytest.mark.parametrize(("rows", "channels", "kernel"),
                         [(3, 11, 3), (2, 8, 1), (4, 30, 3), (2, 17, 1), (1, 8, 3)])
def test_window_throughput(rows, channels, kernel):
    """Always ready, commands always offered: one K-word per cycle within a job, the first
    word ``setup_cycles + 2`` cycles after the first command, the next jobs' first words
    ``job_cycles(K) = max(K, rows + 4)`` apart: no idle cycle at all when ``K ≥ rows + 4``
    (the next job is set up while the running one is read)."""
    rng = np.random.default_rng(rows)
    layer = WindowLayer(5, 6, channels, kernel, 1, kernel // 2, 0)
    x = random_input(rng, channels, 5, 6)
    gen, jobs = run_layer(layer, x, rows=rows, simd=8, depth=128, rng=rng)
    check_words(layer, x, jobs, rows=rows, simd=8)
    k = layer.k_words(8)
    assert gen.setup_cycles == rows + 4
    assert jobs[0]["cycles"][0] == jobs[0]["accept"] + gen.setup_cycles + 2
    for n, job in enumerate(jobs):
        assert job["cycles"] == list(range(job["cycles"][0], job["cycles"][0] + k))
        if n:
            assert job["cycles"][0] - jobs[n - 1]["cycles"][0] == gen.job_cycles(k)
    all_cycles = [c for job in jobs for c in job["cycles"]]
    if k >= rows + 4:
        assert all_cycles == list(range(all_cycles[0], all_cycles[0] + len(all_cycles)))


def test_window_interleaved_layers():
    """Jobs of two maps with different geometry (kernel, stride, padding, pad bit,
    channels) stored at different bases, interleaved: the next job's setup, which runs
    while the current one is read, never disturbs it."""
    rng = np.random.default_rng(11)
    rows, simd = 3, 8
    a = WindowLayer(4, 5, 11, 3, 1, 1, 1)
    b = WindowLayer(5, 5, 19, 1, 2, 0, 0)
    xa, xb = random_input(rng, 11, 4, 5), random_input(rng, 19, 5, 5)
    base_b = a.in_h * a.in_w * a.words(simd) + 3
    schedule = [(0, 0), (1, 0), (0, 1), (0, 2), (1, 1), (1, 2), (0, 3), (0, 4), (0, 5),
                (0, 6)]
    assert (a.groups(rows), b.groups(rows)) == (7, 3)
    _, jobs = run_maps([(a, xa, 0), (b, xb, base_b)], schedule, rows=rows, simd=simd,
                       depth=128, rng=rng, ready_rate=0.8)
    for n, (layer, x) in enumerate(((a, xa), (b, xb))):
        mine = [job for job, (m, _) in zip(jobs, schedule, strict=True) if m == n]
        check_words(layer, x, mine, rows=rows, simd=simd)
        check_popcounts(layer, x, mine, rows=rows, simd=simd)


@pytest.mark.parametrize(("rows", "channels", "kernel", "tiles"),
                         [(3, 11, 3, 2), (2, 8, 1, 4), (4, 17, 1, 3), (1, 8, 3, 2)])
def test_window_tiles_throughput(rows, channels, kernel, tiles):
    """Commands of several jobs (one window, tags stepping by ``tag_step``): every job
    carries its group's words; the jobs of a command follow each other with no idle cycle
    (the window is set up once), and the commands' first words are ``job_cycles(K,
    tiles) = max(tiles · K, rows + 4)`` apart."""
    rng = np.random.default_rng(rows + 10 * tiles)
    layer = WindowLayer(5, 6, channels, kernel, 1, kernel // 2, 0)
    x = random_input(rng, channels, 5, 6)
    schedule = [(0, g, tiles) for g in range(layer.groups(rows))]
    gen, jobs = run_maps([(layer, x, 0)], schedule, rows=rows, simd=8, depth=128, rng=rng)
    for t in range(tiles):
        check_words(layer, x, jobs[t::tiles], rows=rows, simd=8)
    k = layer.k_words(8)
    assert gen.job_cycles(k, tiles) == max(tiles * k, rows + 4)
    assert jobs[0]["cycles"][0] == jobs[0]["accept"] + gen.setup_cycles + 2
    for n in range(0, len(jobs), tiles):
        command = [c for job in jobs[n:n + tiles] for c in job["cycles"]]
        assert command == list(range(command[0], command[0] + tiles * k))
        if n:
            assert command[0] - jobs[n - tiles]["cycles"][0] == gen.job_cycles(k, tiles)


def test_window_tiles_interleaved():
    """Commands of 1 … 4 jobs of two maps, interleaved, with back-pressure and gaps: the
    words of every job are its group's, also when the next command (another window) is
    set up while a command's later jobs are read."""
    rng = np.random.default_rng(12)
    rows, simd = 2, 8
    a = WindowLayer(4, 5, 11, 3, 1, 1, 1)
    b = WindowLayer(5, 5, 19, 1, 2, 0, 0)
    xa, xb = random_input(rng, 11, 4, 5), random_input(rng, 19, 5, 5)
    base_b = a.in_h * a.in_w * a.words(simd) + 3
    schedule = [(0, 0, 2), (1, 0, 4), (0, 1, 1), (0, 2, 3), (1, 1, 2), (1, 2, 4), (0, 3, 4),
                (0, 4, 1), (1, 4, 3), (0, 9, 2)]
    _, jobs = run_maps([(a, xa, 0), (b, xb, base_b)], schedule, rows=rows, simd=simd,
                       depth=128, rng=rng, ready_rate=0.7, command_gap=1)
    for n, (layer, x) in enumerate(((a, xa), (b, xb))):
        mine = [(job, schedule[job["command"]][1]) for job in jobs
                if schedule[job["command"]][0] == n]
        check_words(layer, x, [job for job, _ in mine], rows=rows, simd=simd,
                    groups=[g for _, g in mine])


class ConvCore(Elaboratable):
    """Buffer → window generator → (+ weight memory) → systolic array, joined as the
    generator's docstring describes: weights read at ``fetch.addr`` (= ``fetch.tag +
    fetch.index``)."""

    def __init__(self, *, rows, cols, simd, depth, weight_depth):
        self.gen = WindowGenerator(rows=rows, simd=simd, depth=depth, max_channels=64,
                                   max_kernel=3, max_stride=2,
                                   tag_width=(weight_depth - 1).bit_length(), max_tiles=8)
        self.buf = ActivationBuffer(simd=simd, depth=depth, read_ports=rows)
        self.weights = ColumnMemory(shape=simd, depth=weight_depth, columns=cols)
        self.array = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=10)

    def elaborate(self, platform):
        m = Module()
        gen, weights, array = self.gen, self.weights, self.array
        m.submodules.gen, m.submodules.buf = gen, self.buf
        m.submodules.weights, m.submodules.array = weights, array
        for r in range(gen.rows):
            wiring.connect(m, gen.read[r], self.buf.read[r])
        operands = array.operands
        m.d.comb += [
            weights.read.addr.eq(gen.fetch.addr),
            weights.read.en.eq(gen.fetch.en),
            operands.valid.eq(gen.words.valid),
            operands.payload.activations.eq(gen.words.payload.activations),
            operands.payload.weights.eq(weights.read.data),
            operands.payload.first.eq(gen.words.payload.first),
            operands.payload.last.eq(gen.words.payload.last),
            gen.words.ready.eq(operands.ready),
        ]
        return m


@pytest.mark.parametrize(("layer", "out_channels", "cols", "per_command"), [
    (WindowLayer(5, 6, 11, 3, 1, 1, 1), 5, 3, False),    # K = 18 words, two tiles
    (WindowLayer(6, 5, 7, 1, 2, 0, 0), 12, 8, False),    # K = 1 word; jobs every rows + 4
    # = 6 cycles < cols: the array stalls `last`; then all tiles of a group in one
    # command: jobs K = 1 cycle apart, the array's `ready` spaces them by cols
    (WindowLayer(6, 5, 7, 1, 2, 0, 0), 12, 8, True),
    (WindowLayer(5, 6, 11, 3, 1, 1, 1), 8, 2, True),     # K = 18 words, four tiles
])
def test_window_feeds_the_array(layer, out_channels, cols, per_command):  # noqa: C901
    """Every (tile, group) job through the real array — one command per job, or one per
    group running all its tiles (tags ``t·K``): P equals the golden convolution."""
    rows, simd = 2, 8
    rng = np.random.default_rng(out_channels)
    x = random_input(rng, layer.channels, layer.in_h, layer.in_w)
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(out_channels, layer.channels,
                                                       layer.kernel, layer.kernel)))
    p = golden.popcount_conv2d(x, w, stride=layer.stride, padding=layer.padding,
                               pad_value=1 if layer.pad_bit else -1)[0].numpy()
    w_packed = pack_weights(w, word_bits=simd, cols=cols)           # tiles, K, cols, bytes
    tiles, k = w_packed.shape[:2]
    dut = ConvCore(rows=rows, cols=cols, simd=simd, depth=128, weight_depth=128)
    gen = dut.gen
    jobs = [(t, g) for g in range(layer.groups(rows)) for t in range(tiles)]
    if per_command:
        commands = [gen.command_payload(layer, g, tiles=tiles)
                    for g in range(layer.groups(rows))]
    else:
        commands = [gen.command_payload(layer, g, tag=t * k) for t, g in jobs]
    image = to_ints(pack_activations(x, word_bits=simd)[0], simd)
    results = []

    async def testbench(ctx):
        ctx.set(dut.buf.select, 0)
        for a, v in enumerate(image):                  # into bank 1
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
        for _ in range(len(jobs) * (k + 3 * cols + rows + 10) + 100):
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
    for n, (t, g) in enumerate(jobs):
        for c in range(cols):
            o = t * cols + c
            for r in range(rows):
                if o < out_channels and g * rows + r < pixels:
                    oy, ox = divmod(g * rows + r, layer.out_w)
                    assert results[n * cols + c][r] == p[o, oy, ox], (t, g, c, r)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 4), simd=st.sampled_from([8, 16]), in_h=st.integers(1, 6),
       in_w=st.integers(1, 6), channels=st.integers(1, 20), kernel=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 2), pad_bit=st.integers(0, 1),
       seed=st.integers(0, 2 ** 32 - 1))
def test_window_random_layers(rows, simd, in_h, in_w, channels, kernel, stride, padding,
                              pad_bit, seed):
    if kernel > min(in_h, in_w) + 2 * padding:
        return
    rng = np.random.default_rng(seed)
    layer = WindowLayer(in_h, in_w, channels, kernel, stride, padding, pad_bit)
    x = random_input(rng, channels, in_h, in_w)
    _, jobs = run_layer(layer, x, rows=rows, simd=simd, depth=128, rng=rng, ready_rate=0.6)
    check_words(layer, x, jobs, rows=rows, simd=simd)
    check_popcounts(layer, x, jobs, rows=rows, simd=simd, seed=seed)


def test_command_payload_and_layer_checks():
    config = AcceleratorConfig(rows=4, cols=2, simd=8, activation_depth=64, max_channels=16,
                               weight_depth=512)
    gen = window_generator(config)
    assert activation_buffer(config).read_ports == gen.rows == 4
    layer = WindowLayer(5, 5, 10, 3, 2, 1, 1)
    assert (layer.out_h, layer.out_w, layer.words(8), layer.k_words(8)) == (3, 3, 2, 18)
    assert layer.groups(4) == 3
    assert gen.command_payload(layer, 2) == {
        "in_h": 5, "in_w": 5, "out_w": 3, "channels": 10, "words": 2, "kernel": 3,
        "stride": 2, "padding": 1, "pad_bit": 1, "oy": 2, "ox": 2, "count": 1, "base": 0,
        "tag": 0, "tiles": 1, "tag_step": 0}
    assert gen.command_payload(layer, 0, base=14)["base"] == 14
    assert gen.command_payload(layer, 0, tag=511)["tag"] == 511     # weight_depth 512
    with pytest.raises(ValueError, match="tag 512 does not fit in 9 bits"):
        gen.command_payload(layer, 0, tag=512)
    # tiles: max_channels / cols = 8 jobs per command; tag_step defaults to K = 18
    assert gen.max_tiles == 8
    assert {k: v for k, v in gen.command_payload(layer, 1, tag=5, tiles=8).items()
            if k in ("tag", "tiles", "tag_step")} == {"tag": 5, "tiles": 8, "tag_step": 18}
    assert gen.command_payload(layer, 1, tag=7, tiles=2, tag_step=3)["tag_step"] == 3
    assert gen.command_payload(layer, 0, tag=511 - 7 * 18, tiles=8)["tag"] == 385
    with pytest.raises(ValueError, match=r"tag 386 … 512 does not fit in 9 bits"):
        gen.command_payload(layer, 0, tag=386, tiles=8)
    with pytest.raises(ValueError, match="tiles must be in 1 … 8, not 9"):
        gen.command_payload(layer, 0, tiles=9)
    with pytest.raises(ValueError, match="tiles must be in 1 … 8, not 0"):
        gen.command_payload(layer, 0, tiles=0)
    with pytest.raises(ValueError, match="tag_step must be a non-negative integer, not -1"):
        gen.command_payload(layer, 0, tiles=2, tag_step=-1)
    with pytest.raises(ValueError, match="group must be in 0 … 2"):
        gen.command_payload(layer, 3)
    with pytest.raises(ValueError, match="needs words 0 … 71, a bank holds 64"):
        gen.command_payload(WindowLayer(6, 6, 10, 3), 0)
    with pytest.raises(ValueError, match="needs words 20 … 69, a bank holds 64"):
        gen.command_payload(layer, 0, base=20)
    with pytest.raises(ValueError, match="max_channels 16"):
        gen.command_payload(WindowLayer(1, 1, 17, 1), 0)
    with pytest.raises(ValueError, match="kernel 3 is larger than the padded input"):
        WindowLayer(2, 5, 3, 3)
    with pytest.raises(ValueError, match="pad_bit must be 0 or 1"):
        WindowLayer(3, 3, 3, 3, pad_bit=2)
    with pytest.raises(ValueError, match="rows must be at least 1"):
        WindowGenerator(rows=0, simd=8, depth=8, max_channels=8, max_kernel=3, max_stride=1)
    with pytest.raises(ValueError, match="max_tiles must be at least 1"):
        WindowGenerator(rows=1, simd=8, depth=8, max_channels=8, max_kernel=3, max_stride=1,
                        max_tiles=0)


def test_window_generator_converts_to_verilog():
    text = verilog.convert(WindowGenerator(rows=2, simd=8, depth=64, max_channels=20,
                                           max_kernel=3, max_stride=2),
                           name="window_generator")
    assert "module window_generator" in text
    assert "words__valid" in text and "read__1__addr" in text and "fetch__index" in text


def test_mul_small_is_the_product():
    """`mul_small` (shift-and-add by a narrow factor) equals the product, for every
    factor of its width and values up to the top of theirs."""
    from amaranth.hdl import Signal

    from bitdet.hw._util import mul_small
    m = Module()
    value, factor = Signal(11), Signal(3)
    product = Signal(14)
    m.d.comb += product.eq(mul_small(value, factor))
    assert len(mul_small(value, factor)) == 14
    sim = Simulator(m)
    seen = []

    async def bench(ctx):
        for v in (0, 1, 5, 1000, 2047):
            for f in range(8):
                ctx.set(value, v)
                ctx.set(factor, f)
                seen.append((v * f, ctx.get(product)))
    sim.add_testbench(bench)
    sim.run()
    assert len(seen) == 40 and all(want == got for want, got in seen)
