"""cocotb testbench: the generated systolic array's Verilog against the golden model.

Parameters come from the environment (set by :func:`bitdet.sim.runner.run_cocotb`):
``BITDET_ROWS``, ``BITDET_COLS``, ``BITDET_SIMD``, ``BITDET_ACC_WIDTH``, ``BITDET_SEED``,
``BITDET_JOBS``. Each job is a random receptive field per row and weights per column,
packed with :mod:`bitdet.core.packing` (channel counts not a multiple of ``simd``, so the
padding convention is exercised), fed with random idle cycles; every result column is
compared with :func:`bitdet.core.golden.xnor_popcount`. The measured cycles from the first
word to the last result are written to ``BITDET_REPORT`` (JSON) for the pytest side.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from bitdet.core import golden, packing
from bitdet.hw.array import SystolicArray


def _params():
    env = os.environ
    return {name: int(env[f"BITDET_{name.upper()}"])
            for name in ("rows", "cols", "simd", "acc_width", "seed", "jobs")}


def _pack_fields(layout, values: dict) -> int:
    word = 0
    for name, field in layout:
        value = values[name]
        if isinstance(value, list):
            elem = field.width // len(value)
            value = sum(int(v) << (i * elem) for i, v in enumerate(value))
        word |= (int(value) & ((1 << field.width) - 1)) << field.offset
    return word


def _unpack_field(layout, word: int, name: str, count: int = 1):
    field = layout[name]
    value = (word >> field.offset) & ((1 << field.width) - 1)
    if count == 1:
        return value
    elem = field.width // count
    return [(value >> (i * elem)) & ((1 << elem) - 1) for i in range(count)]


def _random_job(rng: np.random.Generator, rows: int, cols: int, simd: int):
    """Words of one job and the expected P per (row, column)."""
    channels = int(rng.integers(1, 3 * simd))
    taps = int(rng.integers(1, 4))
    a = rng.integers(0, 2, size=(rows, taps, channels), dtype=np.uint8)
    w = rng.integers(0, 2, size=(cols, taps, channels), dtype=np.uint8)
    a_words = packing.pack_bits(a, word_bits=simd, pad_bit=packing.ACTIVATION_PAD_BIT)
    w_words = packing.pack_bits(w, word_bits=simd, pad_bit=packing.WEIGHT_PAD_BIT)
    word_bytes = simd // 8
    a_words = a_words.reshape(rows, -1, word_bytes)       # rows, K-words, bytes
    w_words = w_words.reshape(cols, -1, word_bytes)
    expected = golden.xnor_popcount(a_words.reshape(rows, 1, -1), w_words.reshape(1, cols, -1))

    def as_int(words):
        return [int.from_bytes(words[j].tobytes(), "little") for j in range(words.shape[0])]

    return [as_int(a_words[r]) for r in range(rows)], [as_int(w_words[c]) for c in range(cols)], \
        expected


@cocotb.test()
async def random_jobs_match_golden(dut):
    p = _params()
    rows, cols, simd = p["rows"], p["cols"], p["simd"]
    array = SystolicArray(rows=rows, cols=cols, simd=simd, acc_width=p["acc_width"])
    rng = np.random.default_rng(p["seed"])
    idle = random.Random(p["seed"])
    jobs = [_random_job(rng, rows, cols, simd) for _ in range(p["jobs"])]

    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.operands__valid.value = 0
    dut.operands__payload.value = 0
    for _ in range(2):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    received: list[list[int]] = []
    cycle = 0
    first_cycle = last_result_cycle = None

    async def monitor():
        nonlocal last_result_cycle
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            if int(dut.results__valid.value):
                word = int(dut.results__payload.value)
                received.append(_unpack_field(array.result_layout, word, "p", rows))
                last_result_cycle = cycle

    cocotb.start_soon(monitor())
    for a_words, w_words, _expected in jobs:
        k_words = len(a_words[0])
        for j in range(k_words):
            while idle.random() < 0.2:                 # random idle cycles, also inside jobs
                dut.operands__valid.value = 0
                await RisingEdge(dut.clk)
                cycle += 1
            dut.operands__payload.value = _pack_fields(array.operand_layout, {
                "activations": [a_words[r][j] for r in range(rows)],
                "weights": [w_words[c][j] for c in range(cols)],
                "first": j == 0, "last": j == k_words - 1})
            dut.operands__valid.value = 1
            while True:                                   # hold the word until accepted
                await ReadOnly()
                accepted = int(dut.operands__ready.value)
                await RisingEdge(dut.clk)
                if first_cycle is None:
                    first_cycle = cycle
                cycle += 1
                if accepted:
                    break
    dut.operands__valid.value = 0
    expected_columns = [[int(e[r, c]) for r in range(rows)]
                        for _a, _w, e in jobs for c in range(cols)]
    for _ in range(rows + 3 * cols + 8):
        if len(received) >= len(expected_columns):
            break
        await RisingEdge(dut.clk)
        cycle += 1
    assert len(received) == len(expected_columns), \
        f"{len(received)} result columns, expected {len(expected_columns)}"
    for i, (got, want) in enumerate(zip(received, expected_columns, strict=True)):
        assert got == want, f"job {i // cols} column {i % cols}: P {got}, golden {want}"
    report = os.environ.get("BITDET_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump({"columns": len(received), "cycles": last_result_cycle - first_cycle},
                      f)
