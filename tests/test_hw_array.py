# amaranth: UnusedElaboratable=no
"""Systolic array: random conv tiles back to back against the golden model (amaranth.sim).

Every job is a real binary convolution tile: ``rows`` output pixels × ``cols`` output
channels of a random layer, packed with :mod:`bitdet.core.packing` (so channel padding is
exercised), and every ``P`` is compared with :func:`bitdet.core.golden.popcount_conv2d`.
Cycle numbers count testbench cycles: the inputs set in cycle ``t`` are those sampled by
the clock edge that ends cycle ``t``; outputs are read in the cycle they are valid.
"""

from dataclasses import dataclass

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitdet.core import golden
from bitdet.core.cycles import ARRAY_PIPELINE
from bitdet.core.packing import WEIGHT_PAD_BIT, pack_activations, pack_bits, pack_weights
from bitdet.hw.array import SystolicArray


def words_to_ints(packed: np.ndarray, simd: int) -> list[int]:
    flat = np.ascontiguousarray(packed).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


@dataclass
class Job:
    activations: list[list[int]]     # [row][K-word]
    weights: list[list[int]]         # [column][K-word]
    expected: np.ndarray             # [row, column] P

    @property
    def k_words(self) -> int:
        return len(self.activations[0])


def random_job(rng, *, rows, cols, simd, channels, kernel) -> Job:
    """A tile of a random ``channels → cols`` conv with a ``kernel × kernel`` window:
    ``rows`` random output pixels of a random image (stride 1, no padding)."""
    size = kernel + 2
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, channels, size, size)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(cols, channels, kernel, kernel)))
    p = golden.popcount_conv2d(x, w)[0].numpy()                  # cols, oh, ow
    a_packed = pack_activations(x, word_bits=simd)[0]             # H, W, bytes
    w_packed = pack_weights(w, word_bits=simd, cols=cols)[0]      # K-words, cols, bytes
    out = p.shape[1]
    pixels = [(int(rng.integers(out)), int(rng.integers(out))) for _ in range(rows)]
    activations = [words_to_ints(a_packed[y:y + kernel, x0:x0 + kernel], simd)
                   for y, x0 in pixels]
    weights = [words_to_ints(w_packed[:, c], simd) for c in range(cols)]
    expected = np.array([[p[c, y, x0] for c in range(cols)] for y, x0 in pixels])
    for r in range(rows):                          # the PE's own numerics agree too
        a_bytes = a_packed[pixels[r][0]:pixels[r][0] + kernel,
                           pixels[r][1]:pixels[r][1] + kernel].reshape(-1)
        for c in range(cols):
            assert golden.xnor_popcount(a_bytes, w_packed[:, c].reshape(-1)) == expected[r, c]
    return Job(activations, weights, expected)


def run_jobs(dut: SystolicArray, jobs: list[Job], rng, *, idle_between=(), idle_inside=()):
    """Drive ``jobs``; return per-job (first accept, last accept) cycles, the result
    records ``(cycle, column, last, [p per row])``, the stall count and the end cycle."""
    rows, cols, simd = dut.rows, dut.cols, dut.simd
    idle = {"activations": [0] * rows, "weights": [0] * cols, "first": 0, "last": 0}
    schedule = []                                   # (job index or None, payload)
    for n, job in enumerate(jobs):
        if n in idle_between:
            schedule += [(None, idle)] * int(rng.integers(1, 2 * cols + 2))
        for j in range(job.k_words):
            schedule.append((n, {
                "activations": [job.activations[r][j] for r in range(rows)],
                "weights": [job.weights[c][j] for c in range(cols)],
                "first": int(j == 0),
                "last": int(j == job.k_words - 1),
            }))
            if n in idle_inside and j == 0:
                schedule.append((None, {**idle, "first": 1, "last": 1}))
    accepted = {}
    records = []
    stalls = 0
    drain_cycles = 2 * (rows + 2 * cols) + 4

    async def testbench(ctx):
        nonlocal stalls
        cycle = 0
        position = 0
        last_accept = None
        quiet = 0
        while position < len(schedule) or quiet < drain_cycles:
            if position < len(schedule):
                n, payload = schedule[position]
                garbage = n is None and rng.integers(2)
                if garbage:                       # idle slots carry junk; must be ignored
                    payload = {**payload, "activations": [int(rng.integers(1 << simd))] * rows}
                ctx.set(dut.operands.payload, payload)
                ctx.set(dut.operands.valid, n is not None)
                ready = ctx.get(dut.operands.ready)
                can_last = last_accept is None or cycle - last_accept >= cols
                assert ready == (not payload["last"] or can_last)
                if n is None or ready:
                    position += 1
                else:
                    stalls += 1
                if n is not None and ready:
                    first, last = accepted.get(n, (None, None))
                    if payload["first"]:
                        first = cycle
                    if payload["last"]:
                        last = last_accept = cycle
                    accepted[n] = (first, last)
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
    return accepted, records, stalls


def check_results(dut: SystolicArray, jobs, accepted, records):
    """Every job's columns arrive in the documented cycles with the golden values."""
    cols = dut.cols
    assert len(records) == len(jobs) * cols, "unexpected or missing result cycles"
    for n, job in enumerate(jobs):
        for c in range(cols):
            cycle, column, last, p = records[n * cols + c]
            assert cycle == dut.result_cycle(accepted[n][1], c), (n, c)
            assert (column, last) == (c, c == cols - 1)
            assert p == list(job.expected[:, c]), (n, c)


SHAPES = [(2, 3, 16), (3, 2, 32), (1, 1, 8), (1, 4, 8), (4, 1, 8), (4, 4, 32)]


@pytest.mark.parametrize(("rows", "cols", "simd"), SHAPES)
def test_array_jobs_with_idle_cycles_and_short_jobs(rows, cols, simd, tree="compressor"):
    """Mixed K (shorter than ``cols`` too: ``ready`` holds those jobs' last words), idle
    cycles between and inside jobs, channel counts that are not multiples of simd."""
    rng = np.random.default_rng(rows * 100 + cols * 10 + simd)
    layers = [(5, 1), (simd + 3, 3), (2 * simd, 1), (1, 3), (simd, 1), (3 * simd - 1, 1),
              (7, 3)]
    jobs = [random_job(rng, rows=rows, cols=cols, simd=simd, channels=c, kernel=k)
            for c, k in layers]
    acc_width = int(max(job.expected.max() for job in jobs)).bit_length() + 1
    dut = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=acc_width, popcount=tree)
    assert dut.popcount == tree
    accepted, records, stalls = run_jobs(dut, jobs, rng, idle_between={2, 5},
                                         idle_inside={1, 4})
    check_results(dut, jobs, accepted, records)
    if cols > 1:
        assert stalls > 0            # the short jobs exercised `ready`


def test_array_with_the_adder_tree_popcount():
    """The earlier popcount structure (``popcount="adder"``): same results, same cycles."""
    test_array_jobs_with_idle_cycles_and_short_jobs(2, 3, 16, tree="adder")


@pytest.mark.parametrize(("rows", "cols", "simd"), SHAPES)
def test_array_back_to_back_latency(rows, cols, simd):
    """Jobs of K ≥ cols words stream with no stall and no bubble: from the first input to
    the last result takes ``sum(K) − K_last + latency(K_last)`` cycles."""
    rng = np.random.default_rng(7 + rows + cols)
    jobs = []
    while len(jobs) < 5:
        channels, kernel = int(rng.integers(1, 3 * simd)), int(rng.choice([1, 3]))
        job = random_job(rng, rows=rows, cols=cols, simd=simd, channels=channels,
                         kernel=kernel)
        if job.k_words >= cols:
            jobs.append(job)
    jobs.append(random_job(rng, rows=rows, cols=cols, simd=simd, channels=cols * simd,
                           kernel=1))                           # exactly K = cols words
    assert jobs[-1].k_words == cols
    acc_width = int(max(job.expected.max() for job in jobs)).bit_length() + 1
    dut = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=acc_width)
    accepted, records, stalls = run_jobs(dut, jobs, rng)
    check_results(dut, jobs, accepted, records)
    assert stalls == 0
    for n, job in enumerate(jobs):
        first, last = accepted[n]
        assert last - first == job.k_words - 1
        assert records[n * cols + cols - 1][0] - first == dut.latency(job.k_words)
    total = records[-1][0] - accepted[0][0]
    k_total = sum(job.k_words for job in jobs)
    assert total == k_total + 1 + rows + 2 * cols
    # results of consecutive jobs are contiguous when K == cols: a full-bandwidth drain
    assert records[-1][0] - records[-cols - 1][0] == cols


def random_bits_job(rng, *, rows, cols, simd, channels, taps) -> Job:
    """A job from random bits packed with :func:`pack_bits` (``taps`` pixels of
    ``channels`` channels); P is also counted on the unpadded bits."""
    a_bits = rng.integers(0, 2, size=(rows, taps, channels), dtype=np.uint8)
    w_bits = rng.integers(0, 2, size=(cols, taps, channels), dtype=np.uint8)
    a_packed = pack_bits(a_bits, word_bits=simd)
    w_packed = pack_bits(w_bits, word_bits=simd, pad_bit=WEIGHT_PAD_BIT)
    expected = np.array([[golden.xnor_popcount(a_packed[r].reshape(-1), w_packed[c].reshape(-1))
                          for c in range(cols)] for r in range(rows)])
    assert (expected == (a_bits[:, None] == w_bits[None]).sum(axis=(2, 3))).all()
    return Job([words_to_ints(a_packed[r], simd) for r in range(rows)],
               [words_to_ints(w_packed[c], simd) for c in range(cols)], expected)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 3), cols=st.integers(1, 4), simd=st.sampled_from([8, 16]),
       jobs=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3)), min_size=1,
                     max_size=6),
       idle_between=st.sets(st.integers(0, 5)), idle_inside=st.sets(st.integers(0, 5)),
       seed=st.integers(0, 2 ** 32 - 1))
def test_array_random_schedules(rows, cols, simd, jobs, idle_between, idle_inside, seed):
    """Any shape, any mix of job lengths (down to one word) and idle patterns: every P is
    exact and arrives in the documented cycle."""
    rng = np.random.default_rng(seed)
    jobs = [random_bits_job(rng, rows=rows, cols=cols, simd=simd, channels=c, taps=t)
            for c, t in jobs]
    dut = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=8)
    accepted, records, _stalls = run_jobs(dut, jobs, rng, idle_between=idle_between,
                                          idle_inside=idle_inside)
    check_results(dut, jobs, accepted, records)


def test_latency_formula():
    dut = SystolicArray(rows=3, cols=2, simd=8, acc_width=6)
    # the input register and the PEs' two popcount registers: 3 cycles beyond skew and
    # drain
    assert ARRAY_PIPELINE == 3
    assert dut.latency(5) == 5 + 1 + 3 + 2 * 2
    assert dut.result_cycle(10, 0) == 18
    assert (dut.rows, dut.cols, dut.simd, dut.acc_width) == (3, 2, 8, 6)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"rows": 0, "cols": 1, "simd": 8, "acc_width": 4}, ValueError, "rows must be at least 1"),
    ({"rows": 1, "cols": "2", "simd": 8, "acc_width": 4}, TypeError, "cols must be an integer"),
    ({"rows": 1, "cols": 1, "simd": -8, "acc_width": 4}, ValueError, "simd must be at least 1"),
    ({"rows": 1, "cols": 1, "simd": 8, "acc_width": 4, "popcount": "x"}, ValueError,
     "popcount must be one of"),
])
def test_array_validates_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        SystolicArray(**kwargs)


def test_array_converts_to_verilog():
    text = verilog.convert(SystolicArray(rows=2, cols=3, simd=8, acc_width=6),
                           name="systolic_array")
    assert "module systolic_array" in text
    assert "operands__ready" in text and "results__valid" in text
