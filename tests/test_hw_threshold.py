# amaranth: UnusedElaboratable=no
"""Threshold unit against golden.threshold: ties, T = 0, T = K + 1, n-bit, raw (amaranth.sim)."""

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.hw.threshold import ThresholdUnit


def run_unit(dut: ThresholdUnit, inputs):
    """Feed ``(p, thresholds, raw)`` one per cycle, with an idle cycle (junk payload) after
    every third; return the outputs in order, checking each arrives one cycle later."""
    schedule = []
    for n, item in enumerate(inputs):
        schedule.append(item)
        if n % 3 == 2:
            schedule.append(None)
    outputs = []

    async def testbench(ctx):
        for item in schedule:
            p, thresholds, raw = item if item is not None else (1, [0] * dut.threshold_count, 1)
            ctx.set(dut.i.payload, {"p": p, "thresholds": list(thresholds), "raw": raw})
            ctx.set(dut.i.valid, item is not None)
            await ctx.tick()
            assert ctx.get(dut.o.valid) == (item is not None)
            if item is not None:
                outputs.append(ctx.get(dut.o.payload.value))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return outputs


def golden_levels(ps, thresholds):
    """golden.threshold for one channel per input: (N,) P and (N, L) thresholds."""
    p = torch.tensor(ps, dtype=torch.int64)[:, None]             # N samples as channels
    t = torch.tensor(np.asarray(thresholds), dtype=torch.int64)
    return golden.threshold(p.T, t).flatten().tolist()


def test_one_bit_ties_and_constant_channels():
    k = 2 ** 6 - 1                          # the largest K a 6-bit accumulator holds
    dut = ThresholdUnit(acc_width=6, output_bits=1)
    assert dut.threshold_width == 7         # so that T = K + 1 = 64 fits
    cases = []
    for t in (0, 1, 17, 40, k, k + 1):
        for p in sorted({0, 1, max(t - 1, 0), min(t, k), min(t + 1, k), k}):
            cases.append((p, [t], 0))
    outputs = run_unit(dut, cases)
    assert outputs == [int(p >= t[0]) for p, t, _ in cases]
    assert outputs == golden_levels([p for p, *_ in cases], [t for _, t, _ in cases])
    # T = 0: always 1, even for P = 0; T = K + 1: never, even for P = K
    assert outputs[cases.index((0, [0], 0))] == 1
    assert outputs[cases.index((k, [k + 1], 0))] == 0


@pytest.mark.parametrize("output_bits", [2, 3])
def test_multi_threshold_matches_golden(output_bits):
    rng = np.random.default_rng(output_bits)
    k = 150
    dut = ThresholdUnit(acc_width=8, output_bits=output_bits)
    count = dut.threshold_count
    assert count == 2 ** output_bits - 1
    cases = []
    for _ in range(40):
        thresholds = sorted(int(v) for v in rng.integers(0, k + 2, size=count))
        p = int(rng.choice([rng.integers(0, k + 1), rng.choice(thresholds)]))
        cases.append((min(p, k), thresholds, 0))
    cases.append((k, [0] * count, 0))                     # every threshold reached
    cases.append((k, [k + 1] * count, 0))                 # none reached
    cases.append((50, [10, *([50] * (count - 2)), 51], 0))  # ties with repeated thresholds
    outputs = run_unit(dut, cases)
    assert outputs == golden_levels([p for p, *_ in cases], [t for _, t, _ in cases])
    assert outputs[-3:] == [count, 0, count - 1]


def test_raw_bypass_outputs_p():
    dut = ThresholdUnit(acc_width=10, output_bits=2)
    cases = [(p, [0, 5, 1024], raw) for p in (0, 3, 5, 1023) for raw in (0, 1)]
    outputs = run_unit(dut, cases)
    assert outputs == [p if raw else sum(p >= t for t in ts) for p, ts, raw in cases]
    assert len(dut.o.payload.value) == 10


def test_narrow_accumulator_output_width():
    dut = ThresholdUnit(acc_width=2, output_bits=3)
    assert len(dut.o.payload.value) == 3                  # a 3-bit level fits
    assert run_unit(dut, [(3, [0] * 7, 0), (3, [0] * 7, 1)]) == [7, 3]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"acc_width": 0, "output_bits": 1}, ValueError, "acc_width must be at least 1, not 0"),
    ({"acc_width": 8, "output_bits": 9}, ValueError, "output_bits must be at most 8, not 9"),
    ({"acc_width": 8, "output_bits": None}, TypeError, "output_bits must be an integer"),
])
def test_threshold_validates_parameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        ThresholdUnit(**kwargs)


def test_threshold_converts_to_verilog():
    text = verilog.convert(ThresholdUnit(acc_width=8, output_bits=2), name="threshold_unit")
    assert "module threshold_unit" in text
