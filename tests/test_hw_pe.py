# amaranth: UnusedElaboratable=no
"""XNOR-popcount PE and popcount tree against the golden model (amaranth.sim)."""

import itertools

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.hdl import Elaboratable, Module, Signal
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.cycles import PE_LATENCY
from bitdet.core.packing import pack_activations, pack_weights
from bitdet.hw.pe import XnorPopcountPE, activation_layout
from bitdet.hw.popcount import (
    POPCOUNT_TREES,
    popcount,
    popcount_rows,
    popcount_stages,
    popcount_width,
)


def words_to_ints(packed: np.ndarray, simd: int) -> list[int]:
    """Packed uint8 bytes (any shape, bytes innermost) → little-endian ``simd``-bit words."""
    flat = np.ascontiguousarray(packed).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def random_job(rng: np.random.Generator, channels: int, kernel: int, simd: int):
    """One receptive field and one output channel: packed K-words and the golden P."""
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, channels, kernel, kernel)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, channels, kernel, kernel)))
    a_packed = pack_activations(x, word_bits=simd)                # 1, kh, kw, bytes
    w_packed = pack_weights(w, word_bits=simd, cols=1)            # 1, K-words, 1, bytes
    p = int(golden.xnor_popcount(a_packed.reshape(-1), w_packed.reshape(-1)))
    assert p == int(golden.popcount_conv2d(x, w).item())          # padding adds nothing
    return words_to_ints(a_packed, simd), words_to_ints(w_packed, simd), p


class _Wrap(Elaboratable):
    """Drives a probe signal from a combinational expression, to simulate it alone
    (in ``module``, when the expression needs the logic already added to it)."""

    def __init__(self, value, module=None):
        self.value = value
        self.module = module

    def elaborate(self, platform):
        m = self.module if self.module is not None else Module()
        probe = Signal.like(self.value, name="probe")
        m.d.comb += probe.eq(self.value)
        return m


@pytest.mark.parametrize("tree", POPCOUNT_TREES)
@pytest.mark.parametrize("width", [1, 2, 3, 4, 7, 8, 13, 32, 64])
def test_popcount_tree(width, tree):
    rng = np.random.default_rng(width)
    value = Signal(width)
    m = Module()
    count = popcount(value, tree=tree, module=m)
    assert len(count) == popcount_width(width) == width.bit_length()
    samples = [0, (1 << width) - 1] + [int(v) for v in rng.integers(0, 1 << min(width, 62),
                                                                    size=40)]
    if width > 62:
        samples += [int.from_bytes(rng.bytes(width // 8), "little") for _ in range(20)]

    async def testbench(ctx):
        for v in samples:
            ctx.set(value, v)
            assert ctx.get(count) == bin(v).count("1")

    sim = Simulator(_Wrap(count, m))
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("width", [3, 5, 16, 31])
def test_popcount_rows_sum_to_the_count(width):
    """The carry-save rows: each popcount_width bits, their sum is the count itself."""
    rng = np.random.default_rng(100 + width)
    value = Signal(width)
    m = Module()
    row0, row1 = popcount_rows(m, value)
    assert len(row0) == len(row1) == popcount_width(width)
    total = row0 + row1
    samples = [0, (1 << width) - 1] + [int(v) for v in rng.integers(0, 1 << width, size=60)]

    async def testbench(ctx):
        for v in samples:
            ctx.set(value, v)
            assert ctx.get(total) == bin(v).count("1")

    sim = Simulator(_Wrap(total, m))
    sim.add_testbench(testbench)
    sim.run()


def test_popcount_stages():
    """Full-adder stages of the Wallace tree (each stage cuts every column into threes)."""
    assert [popcount_stages(n) for n in (0, 1, 2, 3, 4, 8, 16, 32, 64, 128)] == \
        [0, 0, 0, 1, 1, 3, 5, 7, 9, 10]


@pytest.mark.parametrize(("width", "register_after"), [(16, 0), (16, 2), (16, 5), (16, 9),
                                                        (64, 4), (5, 1)])
def test_popcount_rows_registered(width, register_after):
    """With ``register_after``, the rows of cycle ``t`` sum to the count of the value of
    cycle ``t − 1`` (a register after that many stages; past the last stage, at the end)."""
    rng = np.random.default_rng(200 + width + register_after)
    value = Signal(width)
    m = Module()
    row0, row1 = popcount_rows(m, value, register_after=register_after)
    total = row0 + row1
    samples = [0, (1 << width) - 1] + [int.from_bytes(rng.bytes(-(-width // 8)), "little")
                                       % (1 << width) for _ in range(40)]

    async def testbench(ctx):
        for v, following in itertools.pairwise(samples):
            ctx.set(value, v)
            await ctx.tick()
            ctx.set(value, following)           # the operand moves on, the rows do not
            assert ctx.get(total) == bin(v).count("1"), (v, following)

    sim = Simulator(_Wrap(total, m))
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def test_popcount_rows_rejects_a_bad_register_stage():
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="register_after must be a non-negative"):
            popcount_rows(Module(), Signal(8), register_after=bad)


def test_popcount_rejects_non_values():
    with pytest.raises(TypeError, match="value-castable"):
        popcount("abc")
    with pytest.raises(ValueError, match="non-negative"):
        popcount_width(-1)
    assert len(popcount(Signal(0))) == 0
    assert [len(row) for row in popcount_rows(Module(), Signal(0))] == [0, 0]
    with pytest.raises(ValueError, match="tree must be one of 'compressor', 'adder'"):
        popcount(Signal(4), tree="wallace")
    with pytest.raises(ValueError, match="needs module="):
        popcount(Signal(4), tree="compressor")
    with pytest.raises(TypeError, match="needs the Module"):
        popcount_rows(None, Signal(4))


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"simd": 0, "acc_width": 8}, ValueError, "simd must be at least 1, not 0"),
    ({"simd": True, "acc_width": 8}, TypeError, "simd must be an integer, not True"),
    ({"simd": 8, "acc_width": 2.0}, TypeError, "acc_width must be an integer, not 2.0"),
    ({"simd": 8, "acc_width": 8, "popcount": "tree"}, ValueError,
     "popcount must be one of 'compressor', 'adder', not 'tree'"),
])
def test_pe_validates_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        XnorPopcountPE(**kwargs)


def test_pe_properties_and_layout():
    pe = XnorPopcountPE(simd=16, acc_width=9)
    assert (pe.simd, pe.acc_width, pe.popcount) == (16, 9, "compressor")
    assert activation_layout(16).size == 19
    assert len(pe.result) == 9


@pytest.mark.parametrize(("simd", "shapes", "tree"), [
    (8, [(5, 1), (20, 3), (8, 1), (13, 3)], "compressor"),
    (8, [(5, 1), (20, 3), (8, 1), (13, 3)], "adder"),
    (32, [(40, 1), (3, 3), (32, 3), (70, 1), (1, 1)], "compressor"),
])
def test_pe_matches_golden(simd, shapes, tree):
    """Random jobs (channels not a multiple of simd included) back to back and with idle
    cycles; every cycle checks the pass-through registers and the held result."""
    rng = np.random.default_rng(simd)
    jobs = [random_job(rng, c, k, simd) for c, k in shapes * 3]
    acc_width = max(p for *_, p in jobs).bit_length() + 1
    dut = XnorPopcountPE(simd=simd, acc_width=acc_width, popcount=tree)

    # the cycle-by-cycle input schedule: (valid, first, last, a, w, job index)
    schedule = []
    for n, (a_words, w_words, _p) in enumerate(jobs):
        if n % 3 == 1:
            schedule += [(0, int(rng.integers(2)), int(rng.integers(2)),
                          int(rng.integers(1 << simd)), int(rng.integers(1 << simd)), None)
                         for _ in range(int(rng.integers(1, 4)))]
        for j, (a, w) in enumerate(zip(a_words, w_words, strict=True)):
            schedule.append((1, int(j == 0), int(j == len(a_words) - 1), a, w, n))
            if n % 4 == 2 and j == 0 and len(a_words) > 1:     # an idle slot inside a job
                schedule.append((0, 1, 1, 0, 0, None))
    schedule += [(0, 0, 0, 0, 0, None)] * 2

    async def testbench(ctx):
        # a word presented in cycle t is in `result` (and its `last` in `result_valid`)
        # from cycle t + PE_LATENCY; the pass-through registers are one cycle behind
        pending = [(False, None)] * (PE_LATENCY - 1)
        held = None
        for valid, first, last, a, w, n in schedule:
            ctx.set(dut.a_in, {"word": a, "valid": valid, "first": first, "last": last})
            ctx.set(dut.w_in, w)
            await ctx.tick()
            out = ctx.get(dut.a_out)
            assert (out.word, out.valid, out.first, out.last) == (a, valid, first, last)
            assert ctx.get(dut.w_out) == w
            pending.append((bool(valid and last), n))
            finished, job = pending.pop(0)
            assert ctx.get(dut.result_valid) == finished
            if finished:
                held = jobs[job][2]
            if held is not None:
                assert ctx.get(dut.result) == held

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("tree", POPCOUNT_TREES)
def test_pe_first_restarts_mid_accumulation(tree):
    """`first` discards the accumulator even if the previous job never saw `last`."""
    dut = XnorPopcountPE(simd=8, acc_width=6, popcount=tree)

    async def testbench(ctx):
        for word, first, last in [(0x00, 1, 0), (0x0F, 0, 0), (0xFF, 1, 0), (0x01, 0, 1)]:
            ctx.set(dut.a_in, {"word": word, "valid": 1, "first": first, "last": last})
            ctx.set(dut.w_in, 0xFF)
            await ctx.tick()
        ctx.set(dut.a_in, {"word": 0, "valid": 0, "first": 0, "last": 0})
        for _ in range(PE_LATENCY - 1):                 # the last word is in the pipeline
            assert not ctx.get(dut.result_valid)
            await ctx.tick()
        assert ctx.get(dut.result) == 8 + 1
        assert ctx.get(dut.result_valid)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("tree", POPCOUNT_TREES)
def test_pe_single_word_jobs_back_to_back(tree):
    """Jobs of one word (`first` and `last` together) in consecutive cycles: each result
    is that word's count alone, whatever the accumulator held (it is cleared while the
    next `first` word is in the second stage, as the previous one reaches the adder)."""
    dut = XnorPopcountPE(simd=8, acc_width=5, popcount=tree)
    words = [0xFF, 0x0F, 0x00, 0x7F, 0x01]          # w = 0xFF: the count is popcount(word)

    async def testbench(ctx):
        ctx.set(dut.w_in, 0xFF)
        seen = []
        for word in words + [None] * PE_LATENCY:
            if word is None:
                ctx.set(dut.a_in, {"word": 0, "valid": 0, "first": 0, "last": 0})
            else:
                ctx.set(dut.a_in, {"word": word, "valid": 1, "first": 1, "last": 1})
            await ctx.tick()
            if ctx.get(dut.result_valid):
                seen.append(ctx.get(dut.result))
        assert seen == [bin(w).count("1") for w in words]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
