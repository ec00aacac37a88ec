# amaranth: UnusedElaboratable=no
"""Bit-serial PE and array (contract 2): ``A = Σ_b 2**b · P_b`` against the golden model.

The controller streams the K words of every input plane of an n-bit map in turn; each
word carries its plane ``b`` as ``shift`` and the PE adds ``P_word << b``
(docs/hardware.md, "Contract 2 blocks"). Jobs are real receptive fields of random level
maps packed with :func:`bitdet.core.packing.pack_levels` (channel padding included) and
every accumulator is compared with :func:`bitdet.core.golden.level_conv2d`.
"""

from dataclasses import dataclass

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import PE_LATENCY
from bitdet.core.packing import pack_levels, pack_weights
from bitdet.hw.array import SystolicArray
from bitdet.hw.pe import MAX_INPUT_BITS, XnorPopcountPE, _carry_row_bits, activation_layout
from bitdet.hw.popcount import popcount_rows


def words_to_ints(packed: np.ndarray, simd: int) -> list[int]:
    """Packed uint8 bytes (bytes innermost) → little-endian ``simd``-bit words."""
    flat = np.ascontiguousarray(packed).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def acc_width_for(in_bits: int, k: int) -> int:
    """The accumulator width a config sizes for K (``((2**n − 1)·K).bit_length()``)."""
    return (((1 << in_bits) - 1) * k).bit_length()


@dataclass
class LevelJob:
    """One receptive field of an n-bit map and ``outputs`` output channels."""
    planes: list[list[list[int]]]    # [row][plane][K-word]
    weights: list[list[int]]         # [column][K-word]
    expected: np.ndarray             # [row, column] A

    @property
    def in_bits(self) -> int:
        return len(self.planes[0])

    @property
    def k_words(self) -> int:
        return len(self.weights[0])


def level_job(rng, *, rows: int, cols: int, simd: int, channels: int, kernel: int,
              in_bits: int, extreme: str | None = None) -> LevelJob:
    """``rows`` receptive fields (``channels × kernel × kernel`` levels of ``in_bits``
    bits) and ``cols`` output channels of ±1 weights; ``extreme`` ``"max"`` / ``"zero"``
    makes every plane match / mismatch every weight (``A = (2**n − 1)·K`` / ``0``)."""
    top = (1 << in_bits) - 1
    shape = (rows, channels, kernel, kernel)
    levels = torch.from_numpy(rng.integers(0, top + 1, size=shape))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(cols, channels, kernel, kernel)))
    if extreme is not None:
        levels = torch.full(shape, top, dtype=torch.int64)
        w = torch.full_like(w, 1.0 if extreme == "max" else -1.0)
    a = golden.level_conv2d(levels, w, in_bits=in_bits)[:, :, 0, 0].numpy()   # rows, cols
    assert (golden.level_conv2d(levels, w, in_bits=in_bits, method="reference")[:, :, 0, 0]
            .numpy() == a).all()
    a_packed = pack_levels(levels, in_bits, word_bits=simd)        # planes, rows, k, k, B
    w_packed = pack_weights(w, word_bits=simd, cols=cols)[0]       # K-words, cols, bytes
    planes = [[words_to_ints(a_packed[b, r], simd) for b in range(in_bits)]
              for r in range(rows)]
    weights = [words_to_ints(w_packed[:, c], simd) for c in range(cols)]
    for r in range(rows):                          # Σ 2**b · P_b of the packed words
        for c in range(cols):
            total = sum(golden.xnor_popcount(a_packed[b, r].reshape(-1),
                                             w_packed[:, c].reshape(-1)) << b
                        for b in range(in_bits))
            assert total == a[r, c]
    return LevelJob(planes, weights, a)


def word_order(rng, job: LevelJob, order: str) -> list[tuple[int, int]]:
    """``(plane, K-word)`` pairs in streaming order: ``planes`` (plane 0's K words, then
    plane 1's, …, the controller's order), ``reversed`` planes, or ``shuffled``."""
    pairs = [(b, j) for b in range(job.in_bits) for j in range(job.k_words)]
    if order == "reversed":
        pairs = [(b, j) for b in reversed(range(job.in_bits)) for j in range(job.k_words)]
    elif order == "shuffled":
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    return pairs


def run_pe(dut: XnorPopcountPE, jobs: list[LevelJob], rng, orders):
    """Feed the jobs back to back (an idle slot with junk after some words); check the
    pass-through registers every cycle; return the results as they become valid with
    the cycle of their ``last`` word."""
    schedule = []                     # (valid, first, last, shift, a, w)
    for n, job in enumerate(jobs):
        pairs = word_order(rng, job, orders[n % len(orders)])
        for i, (b, j) in enumerate(pairs):
            schedule.append((1, int(i == 0), int(i == len(pairs) - 1), b,
                             job.planes[0][b][j], job.weights[0][j]))
            if n % 3 == 1 and i == 0:
                schedule.append((0, 1, 1, int(rng.integers(job.in_bits)),
                                 int(rng.integers(1 << dut.simd)), 0))
    schedule += [(0, 0, 0, 0, 0, 0)] * PE_LATENCY
    results = []

    async def testbench(ctx):
        for cycle, (valid, first, last, shift, a, w) in enumerate(schedule):
            ctx.set(dut.a_in, {"word": a, "valid": valid, "first": first, "last": last,
                               "shift": shift})
            ctx.set(dut.w_in, w)
            await ctx.tick()
            out = ctx.get(dut.a_out)
            assert (out.word, out.valid, out.first, out.last, out.shift) == \
                (a, valid, first, last, shift)
            assert ctx.get(dut.w_out) == w
            if ctx.get(dut.result_valid):
                results.append((cycle, ctx.get(dut.result)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    lasts = [cycle for cycle, item in enumerate(schedule) if item[0] and item[2]]
    return results, lasts


@pytest.mark.parametrize(("simd", "in_bits", "tree"), [
    (8, 2, "compressor"), (32, 4, "compressor"), (24, 3, "compressor"), (16, 3, "adder"),
])
def test_pe_accumulates_weighted_planes(simd, in_bits, tree):
    """Random level fields (channels not a multiple of simd too), planes in order, in
    reverse and shuffled word by word, back to back: ``result`` is ``Σ_b 2**b · P_b``
    ``PE_LATENCY`` cycles after the ``last`` word; the accumulator is sized exactly for
    ``(2**n − 1)·K`` and the all-match job reaches it."""
    rng = np.random.default_rng(simd * 10 + in_bits)
    shapes = [(5, 1), (simd + 3, 3), (2 * simd, 1), (1, 1), (simd - 1, 3)]
    jobs = [level_job(rng, rows=1, cols=1, simd=simd, channels=c, kernel=k, in_bits=in_bits)
            for c, k in shapes]
    jobs.insert(2, level_job(rng, rows=1, cols=1, simd=simd, channels=2 * simd, kernel=3,
                             in_bits=in_bits, extreme="max"))
    jobs.insert(4, level_job(rng, rows=1, cols=1, simd=simd, channels=2 * simd, kernel=3,
                             in_bits=in_bits, extreme="zero"))
    k_max = 2 * simd * 9
    dut = XnorPopcountPE(simd=simd, acc_width=acc_width_for(in_bits, k_max), popcount=tree,
                         max_input_bits=in_bits)
    a_max = ((1 << in_bits) - 1) * k_max            # needs every bit of the accumulator
    assert jobs[2].expected[0, 0] == a_max and a_max >> (dut.acc_width - 1) == 1
    assert jobs[4].expected[0, 0] == 0
    results, lasts = run_pe(dut, jobs, rng, ["planes", "reversed", "shuffled"])
    assert [value for _, value in results] == [int(job.expected[0, 0]) for job in jobs]
    assert [cycle for cycle, _ in results] == [t + PE_LATENCY - 1 for t in lasts]


def test_pe_fewer_planes_than_the_maximum():
    """A 1-bit or 2-bit layer on a 4-bit PE: shifts 0 (… 1) only, same numbers."""
    rng = np.random.default_rng(5)
    jobs = [level_job(rng, rows=1, cols=1, simd=16, channels=c, kernel=3, in_bits=n)
            for c, n in [(20, 1), (16, 2), (3, 1), (31, 4), (16, 2)]]
    dut = XnorPopcountPE(simd=16, acc_width=acc_width_for(4, 32 * 9), max_input_bits=4)
    results, _ = run_pe(dut, jobs, rng, ["planes"])
    assert [value for _, value in results] == [int(job.expected[0, 0]) for job in jobs]


@pytest.mark.parametrize("tree", ["compressor", "adder"])
def test_pe_single_word_jobs_back_to_back(tree):
    """One-word jobs (first and last together) in consecutive cycles, each with its own
    shift: every result is that word's count shifted, whatever came before."""
    dut = XnorPopcountPE(simd=8, acc_width=12, popcount=tree, max_input_bits=4)
    words = [(0xFF, 3), (0x0F, 0), (0x00, 2), (0x7F, 1), (0x01, 3), (0xFF, 0), (0xFE, 2)]

    async def testbench(ctx):
        ctx.set(dut.w_in, 0xFF)                  # the count is popcount(word)
        seen = []
        for item in words + [None] * PE_LATENCY:
            if item is None:
                ctx.set(dut.a_in, {"word": 0, "valid": 0, "first": 0, "last": 0, "shift": 0})
            else:
                ctx.set(dut.a_in, {"word": item[0], "valid": 1, "first": 1, "last": 1,
                                   "shift": item[1]})
            await ctx.tick()
            if ctx.get(dut.result_valid):
                seen.append(ctx.get(dut.result))
        assert seen == [bin(w).count("1") << s for w, s in words]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


@pytest.mark.parametrize("bits", [3, 5, 8, 16, 24, 40, 48, 64])
def test_carry_row_bits_match_the_compressor(bits):
    """The PE's prediction of the compressor's second row (which bits can be 1) holds:
    the other bits of the row are constant 0, for random and all-ones operands."""
    rng = np.random.default_rng(bits)
    value = Signal(bits)
    m = Module()
    _row0, row1 = popcount_rows(m, value)
    probe = Signal.like(row1)
    m.d.comb += probe.eq(row1)
    allowed = sum(1 << w for w in _carry_row_bits(bits))
    samples = [(1 << bits) - 1] + [int.from_bytes(rng.bytes(-(-bits // 8)), "little")
                                   % (1 << bits) for _ in range(60)]

    async def testbench(ctx):
        seen = 0
        for v in samples:
            ctx.set(value, v)
            seen |= ctx.get(probe)
        assert seen & ~allowed == 0
        assert seen & 1 == allowed & 1          # bit 0 really is used where predicted

    sim = Simulator(m)
    sim.add_testbench(testbench)
    sim.run()
    assert _carry_row_bits(64) == [0]


# -- the array ---------------------------------------------------------------------------

def run_array(dut: SystolicArray, jobs: list[LevelJob], rng, *, idle_between=()):
    """Stream every job's planes in turn (``shift`` = plane); return the accepted
    ``last`` cycles and the result records ``(cycle, column, last, p)``."""
    rows, cols = dut.rows, dut.cols
    idle = {"activations": [0] * rows, "weights": [0] * cols, "first": 0, "last": 0,
            "shift": 0}
    schedule = []
    for n, job in enumerate(jobs):
        if n in idle_between:
            schedule += [None] * int(rng.integers(1, 2 * cols + 2))
        pairs = word_order(rng, job, "planes")
        for i, (b, j) in enumerate(pairs):
            schedule.append({
                "activations": [job.planes[r][b][j] for r in range(rows)],
                "weights": [job.weights[c][j] for c in range(cols)],
                "first": int(i == 0), "last": int(i == len(pairs) - 1), "shift": b})
    lasts, records = [], []
    drain = 2 * (rows + 2 * cols) + 4

    async def testbench(ctx):
        cycle, position, quiet = 0, 0, 0
        while position < len(schedule) or quiet < drain:
            if position < len(schedule):
                payload = schedule[position]
                if payload is None:                  # idle slot with junk in it
                    junk = int(rng.integers(1 << dut.simd))
                    payload = {**idle, "activations": [junk] * rows,
                               "shift": int(rng.integers(dut.max_input_bits))}
                ctx.set(dut.operands.payload, payload)
                ctx.set(dut.operands.valid, schedule[position] is not None)
                ready = ctx.get(dut.operands.ready)
                if schedule[position] is None or ready:
                    position += 1
                    if schedule[position - 1] is not None and payload["last"]:
                        lasts.append(cycle)
            else:
                ctx.set(dut.operands.valid, 0)
            if ctx.get(dut.results.valid):
                out = ctx.get(dut.results.payload)
                records.append((cycle, out.column, out.last, [out.p[r] for r in range(rows)]))
                quiet = 0
            elif position >= len(schedule):
                quiet += 1
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return lasts, records


@pytest.mark.parametrize(("rows", "cols", "simd", "in_bits"), [(2, 3, 16, 3), (1, 2, 8, 4)])
def test_array_accumulates_weighted_planes(rows, cols, simd, in_bits):
    """Level tiles back to back (short jobs too: ``ready`` still spaces the ``last``
    words ``cols`` apart) and with idle cycles: every column arrives in the documented
    cycle with ``Σ_b 2**b · P_b`` of every row."""
    rng = np.random.default_rng(rows * 100 + cols * 10 + in_bits)
    shapes = [(simd + 3, 1, in_bits), (1, 1, 1), (2 * simd, 3, in_bits), (5, 1, 2),
              (simd, 1, in_bits)]
    jobs = [level_job(rng, rows=rows, cols=cols, simd=simd, channels=c, kernel=k,
                      in_bits=n) for c, k, n in shapes]
    jobs.append(level_job(rng, rows=rows, cols=cols, simd=simd, channels=2 * simd, kernel=3,
                          in_bits=in_bits, extreme="max"))
    dut = SystolicArray(rows=rows, cols=cols, simd=simd, max_input_bits=in_bits,
                        acc_width=acc_width_for(in_bits, 2 * simd * 9))
    assert dut.max_input_bits == in_bits
    lasts, records = run_array(dut, jobs, rng, idle_between={3})
    assert len(records) == len(jobs) * cols
    for n, job in enumerate(jobs):
        for c in range(cols):
            cycle, column, last, p = records[n * cols + c]
            assert cycle == dut.result_cycle(lasts[n], c), (n, c)
            assert (column, last) == (c, c == cols - 1)
            assert p == [int(v) for v in job.expected[:, c]], (n, c)
    assert records[-1][3] == [((1 << in_bits) - 1) * 2 * simd * 9] * rows


# -- parameters and the contract-1 build ---------------------------------------------------

@pytest.mark.parametrize(("value", "error", "message"), [
    (0, ValueError, "max_input_bits must be at least 1, not 0"),
    (MAX_INPUT_BITS + 1, ValueError, f"max_input_bits must be at most {MAX_INPUT_BITS}"),
    (True, TypeError, "max_input_bits must be an integer, not True"),
    ("2", TypeError, "max_input_bits must be an integer"),
])
def test_max_input_bits_is_validated(value, error, message):
    with pytest.raises(error, match=message):
        XnorPopcountPE(simd=8, acc_width=8, max_input_bits=value)
    with pytest.raises(error, match=message):
        SystolicArray(rows=1, cols=1, simd=8, acc_width=8, max_input_bits=value)
    with pytest.raises(error, match=message):
        activation_layout(8, value)


def test_layouts_carry_the_shift_only_when_needed():
    assert "shift" not in dict(activation_layout(16).members)
    assert activation_layout(16, 1) == activation_layout(16)
    assert dict(activation_layout(16, 4).members)["shift"] == range(4)
    assert activation_layout(16, 2).size == 19 + 1
    assert activation_layout(16, 3).size == activation_layout(16, 4).size == 19 + 2
    one = SystolicArray(rows=2, cols=2, simd=8, acc_width=6)
    assert "shift" not in dict(one.operand_layout.members)
    four = SystolicArray(rows=2, cols=2, simd=8, acc_width=8, max_input_bits=4)
    assert dict(four.operand_layout.members)["shift"] == range(4)
    assert XnorPopcountPE(simd=8, acc_width=6).max_input_bits == 1


def test_contract_1_configs_build_no_plane_logic():
    """Every contract-1 config has max_input_bits 1: its PE and array have no shift
    (the generated Verilog is that of the PE before contract 2; docs/hardware.md)."""
    config = AcceleratorConfig(rows=2, cols=2, simd=16)
    assert config.max_input_bits == 1
    pe_text = verilog.convert(XnorPopcountPE(simd=16, acc_width=config.acc_width,
                                             max_input_bits=config.max_input_bits))
    assert "shift" not in pe_text
    assert pe_text == verilog.convert(XnorPopcountPE(simd=16, acc_width=config.acc_width))
    text = verilog.convert(SystolicArray(rows=2, cols=2, simd=16, acc_width=config.acc_width,
                                         max_input_bits=4))
    assert "shift" in text
