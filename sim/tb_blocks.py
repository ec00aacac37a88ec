# amaranth: UnusedElaboratable=no
"""cocotb testbenches: the PE, threshold units, pool engine and window generator, each on
its generated Verilog, against :mod:`bitdet.core.golden`.

One design, :class:`BlockBench`, holds the blocks side by side, each with its own ports and
all on one clock (one Verilator build serves every testbench here): an
:class:`~bitdet.hw.pe.XnorPopcountPE`; four :class:`~bitdet.hw.threshold.ThresholdUnit`
(1-bit, the config's n-bit, 3-bit, and a 2-bit accumulator with a 3-bit output); a
:class:`~bitdet.hw.pool.PoolEngine` reading a memory the testbench loads (``pool_load``)
and writing through ``pool_act_write`` (observed, not stored); a
:class:`~bitdet.hw.window.WindowGenerator` reading an
:class:`~bitdet.hw.memory.ActivationBuffer` (``win_load``, ``win_select``).

Each cocotb test drives one block through a TB class that owns the clock and reset, a
driver (random idle cycles with junk payloads, back-pressure where the block has a ready),
monitors sampling in the read-only phase of every cycle, a golden model and an in-order
:class:`Scoreboard`. Parameters come from the environment: ``BITDET_CONFIG`` (preset or
YAML path, ``tiny`` by default), ``BITDET_SEED`` and ``BITDET_REPORT`` (a folder: each test
writes ``<block>.json`` with how many transactions it compared).
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from pathlib import Path

import cocotb
import numpy as np
import torch
import torch.nn.functional as F
from amaranth.hdl import Module
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory, WritePort
from amaranth.lib.wiring import In, Out, flipped
from cocotb.clock import Clock
from cocotb.triggers import ReadOnly, RisingEdge

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.cycles import PE_LATENCY
from bitdet.core.packing import pack_activations, pack_weights
from bitdet.hw.memory import ActivationBuffer
from bitdet.hw.pe import XnorPopcountPE, activation_layout
from bitdet.hw.pool import PoolEngine, pool_busy_cycles
from bitdet.hw.threshold import ThresholdUnit
from bitdet.hw.window import WindowLayer, window_generator

__all__ = ["BLOCK_TESTS", "TOPLEVEL", "BlockBench", "PeTB", "PoolTB", "Scoreboard",
           "ThresholdTB", "WindowTB", "threshold_shapes"]

TOPLEVEL = "block_bench"
#: block → cocotb test of this module
BLOCK_TESTS = {"pe": "pe_matches_golden", "threshold": "threshold_matches_golden",
               "pool": "pool_matches_golden", "window": "window_matches_golden"}


def threshold_shapes(config: AcceleratorConfig) -> dict[str, tuple[int, int]]:
    """``name: (acc_width, output_bits)`` of the bench's threshold units."""
    return {"thr1": (6, 1), "thrc": (config.acc_width, config.output_bits), "thr3": (8, 3),
            "thrw": (2, 3)}


class BlockBench(wiring.Component):
    """The blocks of ``config`` side by side, one port group each (``pe_*``, ``thr*_i`` /
    ``thr*_o``, ``pool_*``, ``win_*``), one clock domain."""

    def __init__(self, config: AcceleratorConfig):
        c = self.config = config
        self.pe = XnorPopcountPE(simd=c.simd, acc_width=c.acc_width)
        self.thresholds = {name: ThresholdUnit(acc_width=a, output_bits=b)
                           for name, (a, b) in threshold_shapes(c).items()}
        self.pool = PoolEngine(config=c)
        self.window = window_generator(c)
        self.buffer = ActivationBuffer(simd=c.simd, depth=c.activation_depth, read_ports=c.rows)
        ports = {f"pe_{n}": self.pe.signature.members[n]
                 for n in ("a_in", "w_in", "a_out", "w_out", "result", "result_valid")}
        for name, unit in self.thresholds.items():
            ports[f"{name}_i"] = unit.signature.members["i"]
            ports[f"{name}_o"] = unit.signature.members["o"]
        for n in ("layer", "start", "busy", "done", "busy_cycles", "stall_cycles", "act_write"):
            ports[f"pool_{n}"] = self.pool.signature.members[n]
        aw = self.buffer.addr_width
        ports["pool_load"] = Out(WritePort.Signature(addr_width=aw, shape=c.simd))
        for n in ("command", "words", "fetch"):
            ports[f"win_{n}"] = self.window.signature.members[n]
        ports["win_select"] = In(1)
        ports["win_load"] = Out(WritePort.Signature(addr_width=aw, shape=c.simd))
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        c = self.config
        pe, pool, win, buf = self.pe, self.pool, self.window, self.buffer
        m.submodules.pe = pe
        m.d.comb += [pe.a_in.eq(self.pe_a_in), pe.w_in.eq(self.pe_w_in),
                     self.pe_a_out.eq(pe.a_out), self.pe_w_out.eq(pe.w_out),
                     self.pe_result.eq(pe.result), self.pe_result_valid.eq(pe.result_valid)]
        for name, unit in self.thresholds.items():
            m.submodules[name] = unit
            wiring.connect(m, flipped(getattr(self, f"{name}_i")), unit.i)
            wiring.connect(m, flipped(getattr(self, f"{name}_o")), unit.o)

        m.submodules.pool = pool
        m.d.comb += [pool.layer.eq(self.pool_layer), pool.start.eq(self.pool_start)]
        m.d.comb += [getattr(self, f"pool_{n}").eq(getattr(pool, n))
                     for n in ("busy", "done", "busy_cycles", "stall_cycles")]
        wiring.connect(m, flipped(self.pool_act_write), pool.act_write)
        m.submodules.pool_src = src = Memory(shape=c.simd, depth=c.activation_depth, init=[])
        wr, rd = src.write_port(), src.read_port()
        m.d.comb += [wr.en.eq(self.pool_load.en), wr.addr.eq(self.pool_load.addr),
                     wr.data.eq(self.pool_load.data),
                     rd.addr.eq(pool.act_read.addr), rd.en.eq(pool.act_read.en),
                     pool.act_read.data.eq(rd.data)]

        m.submodules.window, m.submodules.buffer = win, buf
        for r in range(c.rows):
            wiring.connect(m, win.read[r], buf.read[r])
        for n in ("command", "words", "fetch"):
            wiring.connect(m, flipped(getattr(self, f"win_{n}")), getattr(win, n))
        m.d.comb += buf.select.eq(self.win_select)
        wiring.connect(m, flipped(self.win_load), buf.write)
        return m


# -- helpers -----------------------------------------------------------------------------------

def pack(layout: data.Layout, value: dict) -> int:
    """A field dict → the integer on a port of ``layout`` (a value that does not fit its
    field is an error here, not silently truncated)."""
    raw = layout.const(value).as_value().value
    back = data.Const(layout, raw)
    for name, field in value.items():
        got = getattr(back, name)
        got = list(got) if isinstance(field, (list, tuple)) else got
        want = [int(v) for v in field] if isinstance(field, (list, tuple)) else int(field)
        if got != want:
            raise ValueError(f"{name} = {field!r} does not fit {layout}")
    return raw


def unpack(layout: data.Layout, raw: int) -> data.Const:
    return data.Const(layout, raw)


def to_ints(packed: np.ndarray, simd: int) -> list[int]:
    """uint8 ``(..., bytes)`` → the little-endian ``simd``-bit words, flattened."""
    flat = np.ascontiguousarray(packed).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def to_bytes(words, simd: int) -> np.ndarray:
    return np.frombuffer(b"".join(int(w).to_bytes(simd // 8, "little") for w in words),
                         dtype=np.uint8)


def pm1(rng: np.random.Generator, *shape, density: float = 0.5) -> torch.Tensor:
    """Random ±1 tensor (``density``: probability of +1)."""
    return torch.from_numpy(np.where(rng.random(shape) < density, 1.0, -1.0))


class Scoreboard:
    """In-order checker: the expected transactions, then the observed ones, compared pairwise
    in arrival order; mismatches are collected (with the context the expectation came with)."""

    def __init__(self, name: str):
        self.name = name
        self.expected: deque = deque()
        self.matched = 0
        self.errors: list[str] = []

    def expect(self, item, context="") -> None:
        self.expected.append((item, context))

    def observe(self, item, when="") -> None:
        if not self.expected:
            self.errors.append(f"{self.name}: unexpected {item!r} {when}")
            return
        want, context = self.expected.popleft()
        if item == want:
            self.matched += 1
        else:
            self.errors.append(f"{self.name} {context}: got {item!r}, golden {want!r} {when}")

    def check(self) -> int:
        """Assert every expectation was met; returns the number of matched transactions."""
        missing = [ctx for _, ctx in self.expected]
        assert not self.errors and not missing, (
            f"{self.name}: {len(self.errors)} mismatches, {len(missing)} missing; first: "
            + "; ".join(self.errors[:4] + [f"missing {m}" for m in missing[:2]]))
        return self.matched


class BlockTB:
    """Owns the shared clock and reset; subclasses drive and watch one block.

    Drivers write after ``RisingEdge`` (the value holds for that cycle); monitors sample in
    ``ReadOnly`` of the same cycle, so a registered output seen in cycle ``n`` belongs to
    the inputs sampled in cycle ``n − 1``.
    """

    block = ""

    def __init__(self, dut, bench: BlockBench, seed: int):
        self.dut, self.bench, self.config = dut, bench, bench.config
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.errors: list[str] = []
        self.cycle = 0              # rising edges since reset; read it in ReadOnly only

    async def _count(self) -> None:
        while True:
            await RisingEdge(self.dut.clk)
            self.cycle += 1

    async def reset(self) -> None:
        cocotb.start_soon(Clock(self.dut.clk, 10, unit="ns").start())
        for path, member, _ in self.bench.signature.flatten(self.bench):
            if member.flow == In:
                getattr(self.dut, "__".join(str(p) for p in path)).value = 0
        self.dut.rst.value = 1
        for _ in range(3):
            await RisingEdge(self.dut.clk)
        self.dut.rst.value = 0
        cocotb.start_soon(self._count())
        await RisingEdge(self.dut.clk)

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            self.errors.append(message)

    async def settle(self, done, limit: int) -> None:
        """Let the clock run until ``done()`` or ``limit`` cycles."""
        for _ in range(limit):
            if done():
                return
            await RisingEdge(self.dut.clk)

    def finish(self, *boards: Scoreboard, **counts) -> None:
        assert not self.errors, (f"{self.block}: {len(self.errors)} errors; first: "
                                 + "; ".join(self.errors[:4]))
        for board in boards:
            counts[board.name] = board.check()
        report = os.environ.get("BITDET_REPORT")
        if report:
            Path(report, f"{self.block}.json").write_text(json.dumps(counts))


def _bench() -> tuple[BlockBench, int]:
    config = load_config(os.environ.get("BITDET_CONFIG", "tiny"))
    return BlockBench(config), int(os.environ.get("BITDET_SEED", "1"))


# -- PE --------------------------------------------------------------------------------------

class PeTB(BlockTB):
    """Random receptive fields × weights as K-words (``first`` / ``last`` framing), some jobs
    abandoned before their ``last``; golden P from :func:`golden.popcount_conv2d` (and the
    packed words through :func:`golden.xnor_popcount`). The monitor checks every cycle:
    ``a_out`` / ``w_out`` are the inputs one cycle late, ``result_valid`` follows each
    ``valid & last`` ``PE_LATENCY`` cycles later, ``result`` only changes then."""

    block = "pe"

    def __init__(self, dut, bench, seed, *, idle: float = 0.25):
        super().__init__(dut, bench, seed)
        self.idle = idle
        self.layout = activation_layout(self.config.simd)
        self.results = Scoreboard("pe.result")

    def job(self, channels: int, kernel: int, relation: str = "random"):
        """K-words of one job and its golden P."""
        simd = self.config.simd
        x = pm1(self.np_rng, 1, channels, kernel, kernel)
        w = {"random": lambda: pm1(self.np_rng, 1, channels, kernel, kernel),
             "equal": lambda: x.clone(), "opposite": lambda: -x}[relation]()
        a_words = to_ints(pack_activations(x, word_bits=simd), simd)
        w_words = to_ints(pack_weights(w, word_bits=simd, cols=1), simd)
        p = int(golden.popcount_conv2d(x, w).item())
        assert p == int(golden.xnor_popcount(to_bytes(a_words, simd), to_bytes(w_words, simd)))
        return a_words, w_words, p

    def jobs(self):
        c = self.config
        jobs = [self.job(c.max_channels, c.max_kernel, "equal"),       # P = max_k
                self.job(c.max_channels, c.max_kernel, "opposite"),    # P = 0
                self.job(1, 1), self.job(c.simd, 1), self.job(c.simd + 1, 1)]
        for _ in range(70):
            jobs.append(self.job(self.rng.randint(1, 3 * c.simd), self.rng.choice([1, 1, 3])))
        return jobs

    async def drive(self, jobs) -> None:
        dut, simd = self.dut, self.config.simd

        async def word(valid, first, last, a, w):
            await RisingEdge(dut.clk)
            dut.pe_a_in.value = pack(self.layout, {"word": a, "valid": int(valid),
                                                   "first": int(first), "last": int(last)})
            dut.pe_w_in.value = w

        for n, (a_words, w_words, p) in enumerate(jobs):
            abandon = n > 4 and self.rng.random() < 0.1      # never sees its `last`
            count = self.rng.randint(1, len(a_words)) if abandon else len(a_words)
            if not abandon:
                self.results.expect(p, f"job {n} (K-words {len(a_words)})")
            for j in range(count):
                while self.rng.random() < self.idle:       # idle slots, junk on every field
                    await word(0, self.rng.getrandbits(1), self.rng.getrandbits(1),
                               self.rng.getrandbits(simd), self.rng.getrandbits(simd))
                await word(1, j == 0, j == len(a_words) - 1 and not abandon,
                           a_words[j], w_words[j])
        await word(0, 0, 0, 0, 0)

    async def monitor(self) -> None:
        dut = self.dut
        previous = None             # (a_in, w_in) of the cycle before
        finishing = [None] * PE_LATENCY     # valid & last of the last PE_LATENCY cycles
        held = None
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            cycle = self.cycle
            a_out, w_out = int(dut.pe_a_out.value), int(dut.pe_w_out.value)
            result, result_valid = int(dut.pe_result.value), int(dut.pe_result_valid.value)
            if previous is not None:
                a_in, w_in = previous
                self.check(a_out == a_in, f"cycle {cycle}: a_out {a_out:#x}, a_in was {a_in:#x}")
                self.check(w_out == w_in, f"cycle {cycle}: w_out {w_out:#x}, w_in was {w_in:#x}")
            finished = finishing[0]
            if finished is not None:
                self.check(result_valid == finished,
                           f"cycle {cycle}: result_valid {result_valid}, expected {finished}")
            if result_valid:
                self.results.observe(result, f"(cycle {cycle})")
            elif held is not None:
                self.check(result == held, f"cycle {cycle}: result {result} changed from "
                                           f"{held} without result_valid")
            held = result
            a_in = int(dut.pe_a_in.value)
            fields = unpack(self.layout, a_in)
            previous = (a_in, int(dut.pe_w_in.value))
            finishing = [*finishing[1:], int(fields.valid and fields.last)]

    async def run(self) -> None:
        await self.reset()
        jobs = self.jobs()
        cocotb.start_soon(self.monitor())
        await self.drive(jobs)
        await self.settle(lambda: not self.results.expected, 8)
        self.finish(self.results, jobs=len(jobs),
                    words=sum(len(a) for a, _, _ in jobs))


# -- threshold units ---------------------------------------------------------------------------

class ThresholdTB(BlockTB):
    """Every threshold unit of the bench in parallel: random P and sorted thresholds (over
    the whole ``acc_width + 1``-bit range), ties ``P = T_j`` (repeated thresholds too),
    ``T = 0`` and ``T = K + 1``, and the raw bypass; golden :func:`golden.threshold` (raw:
    P itself). Monitors check ``o.valid`` is ``i.valid`` one cycle late."""

    block = "threshold"

    def __init__(self, dut, bench, seed, *, vectors: int = 300, idle: float = 0.25):
        super().__init__(dut, bench, seed)
        self.vectors, self.idle = vectors, idle
        self.boards = {name: Scoreboard(f"{name}.value") for name in bench.thresholds}

    def cases(self, unit: ThresholdUnit):
        """``(p, thresholds, raw)`` inputs: the corner cases, then random ones."""
        rng, n = self.rng, unit.threshold_count
        p_max = (1 << unit.acc_width) - 1                      # the largest K P may reach
        t_top = (1 << unit.threshold_width) - 1
        cases = []
        for t in sorted({0, 1, p_max // 3, p_max, p_max + 1, t_top}):
            for p in sorted({0, 1, min(max(t - 1, 0), p_max), min(t, p_max), min(t + 1, p_max),
                             p_max}):
                ts = sorted([t] + [rng.choice([0, t, p_max + 1]) for _ in range(n - 1)])
                cases.append((p, ts, 0))
        cases += [(p_max, [0] * n, 0), (0, [0] * n, 0), (p_max, [p_max + 1] * n, 0),
                  (p_max, [p_max] * n, 0), (p_max - 1, [p_max] * n, 0)]
        for _ in range(self.vectors):
            ts = sorted(rng.randint(0, rng.choice([p_max + 1, t_top])) for _ in range(n))
            p = rng.choice([rng.randint(0, p_max), min(rng.choice(ts), p_max)])
            cases.append((p, ts, int(rng.random() < 0.15)))
        cases += [(p, [0] * n, 1) for p in (0, 1, p_max)]
        return cases

    @staticmethod
    def golden(cases) -> list[int]:
        p = torch.tensor([[p for p, _, _ in cases]], dtype=torch.int64)    # cases as channels
        levels = golden.threshold(p, torch.tensor([ts for _, ts, _ in cases]))[0].tolist()
        return [p if raw else level for (p, _, raw), level in zip(cases, levels, strict=True)]

    async def drive(self, name: str, unit: ThresholdUnit, cases) -> None:
        dut, layout = self.dut, unit.input_layout
        payload, valid = getattr(dut, f"{name}_i__payload"), getattr(dut, f"{name}_i__valid")
        for (p, ts, raw), want in zip(cases, self.golden(cases), strict=True):
            self.boards[name].expect(want, f"P {p} thresholds {ts} raw {raw}")
            while self.rng.random() < self.idle:
                await RisingEdge(dut.clk)
                valid.value = 0
                payload.value = self.rng.getrandbits(layout.size)
            await RisingEdge(dut.clk)
            valid.value = 1
            payload.value = pack(layout, {"p": p, "thresholds": ts, "raw": raw})
        await RisingEdge(dut.clk)
        valid.value = 0

    async def monitor(self, name: str) -> None:
        dut = self.dut
        i_valid, o_valid = getattr(dut, f"{name}_i__valid"), getattr(dut, f"{name}_o__valid")
        o_value = getattr(dut, f"{name}_o__payload")
        previous = None
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            cycle = self.cycle
            valid = int(o_valid.value)
            if previous is not None:
                self.check(valid == previous, f"{name} cycle {cycle}: o.valid {valid}, "
                                              f"i.valid was {previous}")
            if valid:
                self.boards[name].observe(int(o_value.value), f"(cycle {cycle})")
            previous = int(i_valid.value)

    async def run(self) -> None:
        await self.reset()
        drivers = []
        for name, unit in self.bench.thresholds.items():
            cocotb.start_soon(self.monitor(name))
            drivers.append(cocotb.start_soon(self.drive(name, unit, self.cases(unit))))
        for driver in drivers:
            await driver
        await self.settle(lambda: not any(b.expected for b in self.boards.values()), 8)
        self.finish(*self.boards.values())


# -- pool engine -------------------------------------------------------------------------------

class PoolTB(BlockTB):
    """Pool passes one after the other (random gaps): the input map, packed with
    :func:`pack_activations`, loaded at ``input_base`` of a memory full of junk; every word
    the engine writes is compared, in order, with ``pack_activations`` of
    :func:`golden.binary_maxpool2d` at ``output_base + i``; busy / stall counters with
    :func:`pool_busy_cycles`, ``done`` one cycle after the last write."""

    block = "pool"
    # in_h, in_w, channels, kernel, stride, input_base, output_base
    SHAPES = ((7, 9, 11, 2, 2, 3, 5),        # odd H/W (the last row / column is dropped)
              (5, 7, 13, 3, 1, 0, 200),      # 3×3 stride 1
              (9, 6, 5, 3, 2, 17, 1),        # 3×3 stride 2
              (6, 8, 20, 2, 1, 2, 301),      # 2×2 stride 1, 3 words per pixel
              (7, 5, 37, 3, 3, 10, 400),     # stride 3
              (4, 4, 8, 1, 1, 100, 0),       # 1×1: a copy
              (5, 3, 3, 1, 2, 0, 50),        # 1×1 stride 2: a subsample
              (3, 3, 64, 3, 3, 30, 7),       # max_channels, one output pixel
              (2, 2, 1, 2, 2, 0, 511),       # one channel, one word, the last address
              (1, 6, 9, 1, 3, 440, 60))      # one row

    def __init__(self, dut, bench, seed, *, random_passes: int = 4):
        super().__init__(dut, bench, seed)
        self.engine = bench.pool
        self.writes = Scoreboard("pool.write")
        self.shapes = list(self.SHAPES)
        c = self.config
        for _ in range(random_passes):
            kernel = self.rng.randint(1, self.engine.max_kernel)
            stride = self.rng.randint(1, self.engine.max_kernel)
            channels = self.rng.randint(1, c.max_channels)
            words = -(-channels // c.simd)
            in_h, in_w = self.rng.randint(kernel, 9), self.rng.randint(kernel, 9)
            while in_h * in_w * words > c.activation_depth:
                in_h, in_w = max(kernel, in_h - 1), max(kernel, in_w - 1)
            out = ((in_h - kernel) // stride + 1) * ((in_w - kernel) // stride + 1) * words
            self.shapes.append((in_h, in_w, channels, kernel, stride,
                                self.rng.randint(0, c.activation_depth - in_h * in_w * words),
                                self.rng.randint(0, c.activation_depth - out)))

    async def load(self, words: dict[int, int]) -> None:
        dut = self.dut
        for addr, word in words.items():
            await RisingEdge(dut.clk)
            dut.pool_load__en.value = 1
            dut.pool_load__addr.value = addr
            dut.pool_load__data.value = word
        await RisingEdge(dut.clk)
        dut.pool_load__en.value = 0

    async def monitor(self) -> None:
        dut = self.dut
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            if int(dut.pool_act_write__en.value):
                self.writes.observe((int(dut.pool_act_write__addr.value),
                                     int(dut.pool_act_write__data.value)),
                                    f"(cycle {self.cycle})")

    async def one_pass(self, n: int, shape) -> bool:
        """Run one pass; returns whether its pooled map has both 0 and 1 bits."""
        dut, c, simd = self.dut, self.config, self.config.simd
        in_h, in_w, channels, kernel, stride, input_base, output_base = shape
        desc = self.engine.descriptor(in_h=in_h, in_w=in_w, channels=channels, kernel=kernel,
                                      stride=stride, input_base=input_base,
                                      output_base=output_base)
        bits = torch.from_numpy((self.np_rng.random((1, channels, in_h, in_w)) < 0.25)
                                .astype(np.int32))
        pooled = golden.binary_maxpool2d(bits, kernel, stride)
        assert pooled.shape[2:] == (desc["out_h"], desc["out_w"])
        image = to_ints(pack_activations(bits * 2.0 - 1, word_bits=simd), simd)
        expected = to_ints(pack_activations(pooled * 2.0 - 1, word_bits=simd), simd)
        await self.load({input_base + a: w for a, w in enumerate(image)})
        for a, word in enumerate(expected):
            self.writes.expect((output_base + a, word),
                               f"pass {n} {shape} word {a}")
        for _ in range(self.rng.randint(0, 3)):
            await RisingEdge(dut.clk)
        await RisingEdge(dut.clk)
        dut.pool_layer.value = pack(self.engine.descriptor_layout,
                                    {k: desc[k] for k, _ in self.engine.descriptor_layout})
        dut.pool_start.value = 1
        await ReadOnly()
        start = self.cycle
        await RisingEdge(dut.clk)
        dut.pool_start.value = 0
        dut.pool_layer.value = self.rng.getrandbits(self.engine.descriptor_layout.size)
        limit = pool_busy_cycles(c, desc)[0] + 10
        for _ in range(limit):
            await ReadOnly()
            if int(dut.pool_done.value):
                break
            self.check(bool(int(dut.pool_busy.value)) or self.cycle == start,
                       f"pass {n}: busy low before done (cycle {self.cycle})")
            await RisingEdge(dut.clk)
        else:
            self.errors.append(f"pass {n} {shape}: no done within {limit} cycles")
            return False
        counters = (int(dut.pool_busy_cycles.value), int(dut.pool_stall_cycles.value))
        self.check(counters == pool_busy_cycles(c, desc),
                   f"pass {n} {shape}: busy/stall {counters}, model {pool_busy_cycles(c, desc)}")
        self.check(self.cycle - start == counters[0] + 1,
                   f"pass {n}: done {self.cycle - start} cycles after start, busy {counters[0]}")
        self.check(not self.writes.expected, f"pass {n}: {len(self.writes.expected)} words "
                                             "still unwritten at done")
        await RisingEdge(dut.clk)
        return 0 < int(pooled.sum()) < pooled.numel()

    async def run(self) -> None:
        await self.reset()
        c = self.config
        cocotb.start_soon(self.monitor())
        await self.load({a: self.rng.getrandbits(c.simd) for a in range(c.activation_depth)})
        mixed = 0
        for n, shape in enumerate(self.shapes):
            mixed += await self.one_pass(n, shape)
        assert mixed >= len(self.shapes) - 3, f"only {mixed} pooled maps mix 0 and 1"
        self.finish(self.writes, passes=len(self.shapes))


# -- window generator --------------------------------------------------------------------------

class WindowTB(BlockTB):
    """Every group of a layer's output pixels as commands (random gaps, some of several
    tiles), the words stream under random back-pressure. The input map, packed, sits at a
    random base of the bank being read (junk around it and in the other bank). Each K-word
    is compared, in order, with a model: ``pack_activations`` of the input *spatially
    padded with the pad bit*, taps row-major, then channel word, per array row (zero for
    rows beyond the group); first / last / index / tag / row_valid with it. Every job's
    words XNOR-popcounted with :func:`pack_weights` words equal
    :func:`golden.popcount_conv2d`. Also: ``words`` holds its transfer while not ready, and
    ``fetch`` (tag, index) of the previous read matches the word on ``words`` and
    ``fetch.addr`` is their sum."""

    block = "window"
    # WindowLayer(in_h, in_w, channels, kernel, stride, padding, pad_bit), tiles
    LAYERS = ((WindowLayer(5, 6, 11, 3, 1, 1, 0), 1),    # 3×3/1, pad bit 0, C % simd ≠ 0
              (WindowLayer(5, 6, 11, 3, 1, 1, 1), 2),    # the same with pad bit 1, 2 tiles
              (WindowLayer(7, 5, 13, 3, 2, 1, 1), 1),    # 3×3/2, odd map (bottom/right edge)
              (WindowLayer(6, 6, 5, 3, 2, 1, 0), 1),     # 3×3/2, even map
              (WindowLayer(4, 5, 20, 1, 1, 0, 0), 1),    # 1×1/1, 3 words per pixel
              (WindowLayer(5, 5, 3, 1, 2, 0, 0), 3),     # 1×1/2, 3 tiles
              (WindowLayer(3, 3, 10, 1, 1, 1, 1), 1),    # 1×1 with padding: pure pad pixels
              (WindowLayer(3, 4, 9, 3, 2, 2, 1), 1),     # padding 2: corners mostly padding
              (WindowLayer(1, 1, 1, 3, 1, 1, 1), 1),     # 1×1 map, 1 channel
              (WindowLayer(4, 4, 8, 3, 1, 0, 0), 1),     # no padding, C = simd
              (WindowLayer(3, 3, 64, 3, 1, 1, 0), 1),    # max_channels
              (WindowLayer(2, 7, 7, 2, 1, 0, 1), 1))     # 2×2 (even kernel)

    def __init__(self, dut, bench, seed, *, ready_rate: float = 0.7, gap: float = 0.3):
        super().__init__(dut, bench, seed)
        self.gen = bench.window
        self.ready_rate, self.gap = ready_rate, gap
        self.words = Scoreboard("window.words")
        self.received: list = []          # accepted transfers (fields), in order

    def expected_jobs(self, layer: WindowLayer, x: torch.Tensor):
        """Per group: the K-words (per row) and row_valid, from the padded packed input."""
        rows, simd, p = self.config.rows, self.config.simd, layer.padding
        padded = F.pad(x, (p, p, p, p), value=1.0 if layer.pad_bit else -1.0)
        packed = pack_activations(padded, word_bits=simd)[0]              # Hp, Wp, bytes
        pixels, words = layer.out_h * layer.out_w, layer.words(simd)
        jobs = []
        for g in range(layer.groups(rows)):
            valid = [g * rows + r < pixels for r in range(rows)]
            k_words = []
            for ky in range(layer.kernel):
                for kx in range(layer.kernel):
                    per_row = []
                    for r in range(rows):
                        if valid[r]:
                            oy, ox = divmod(g * rows + r, layer.out_w)
                            per_row.append(to_ints(packed[oy * layer.stride + ky,
                                                          ox * layer.stride + kx], simd))
                        else:
                            per_row.append([0] * words)
                    k_words += [[per_row[r][m] for r in range(rows)] for m in range(words)]
            jobs.append((k_words, sum(v << r for r, v in enumerate(valid))))
        return jobs

    async def load(self, x: torch.Tensor, base: int, words: int) -> None:
        """Junk in the other bank and around the map, then the packed map at ``base``."""
        dut, simd, depth = self.dut, self.config.simd, self.config.activation_depth
        image = to_ints(pack_activations(x, word_bits=simd)[0], simd)
        around = range(max(0, base - 4), min(depth, base + words + 4))

        async def write(addr, word):
            await RisingEdge(dut.clk)
            dut.win_load__en.value = 1
            dut.win_load__addr.value = addr
            dut.win_load__data.value = word

        dut.win_select.value = 1                                 # writes bank 0
        for addr in around:
            await write(addr, self.rng.getrandbits(simd))
        await RisingEdge(dut.clk)
        dut.win_load__en.value = 0
        dut.win_select.value = 0                                 # writes bank 1
        for addr in around:
            await write(addr, self.rng.getrandbits(simd))
        for a, word in enumerate(image):
            await write(base + a, word)
        await RisingEdge(dut.clk)
        dut.win_load__en.value = 0
        dut.win_select.value = 1                                 # reads bank 1

    async def commands(self, payloads) -> None:
        dut, layout = self.dut, self.gen.command_layout
        await RisingEdge(dut.clk)
        for payload in payloads:                                 # here: just after an edge
            while self.rng.random() < self.gap:
                dut.win_command__valid.value = 0
                dut.win_command__payload.value = self.rng.getrandbits(layout.size)
                await RisingEdge(dut.clk)
            dut.win_command__valid.value = 1
            dut.win_command__payload.value = pack(layout, payload)
            while True:                                          # held until taken
                await ReadOnly()
                taken = int(dut.win_command__ready.value)
                await RisingEdge(dut.clk)
                if taken:
                    break
        dut.win_command__valid.value = 0

    async def sink(self) -> None:
        stall = 0
        while True:
            await RisingEdge(self.dut.clk)
            if stall:
                stall -= 1
                ready = False
            elif self.rng.random() < 0.03:                       # now and then a long stall
                stall = self.rng.randint(3, 12)
                ready = False
            else:
                ready = self.rng.random() < self.ready_rate
            self.dut.win_words__ready.value = int(ready)

    async def monitor(self) -> None:
        dut, layout = self.dut, self.gen.word_layout
        held = None                 # payload offered but not taken in the previous cycle
        fetched = None              # (tag, index) of the last read (`fetch.en`)
        while True:
            await RisingEdge(dut.clk)
            await ReadOnly()
            cycle = self.cycle
            valid, ready = int(dut.win_words__valid.value), int(dut.win_words__ready.value)
            raw = int(dut.win_words__payload.value) if valid else None
            if held is not None:
                self.check(raw == held, f"cycle {cycle}: words changed while stalled "
                                        f"({held:#x} → {raw if raw is None else hex(raw)})")
            if valid:
                out = unpack(layout, raw)
                self.check(fetched == (out.tag, out.index),
                           f"cycle {cycle}: words (tag, index) ({out.tag}, {out.index}), last "
                           f"fetch {fetched}")
                if ready:
                    item = ([out.activations[r] for r in range(self.config.rows)],
                            out.row_valid, out.first, out.last, out.index, out.tag)
                    self.received.append(item)
                    self.words.observe(item, f"(cycle {cycle})")
            held = raw if valid and not ready else None
            if int(dut.win_fetch__en.value):
                fetched = (int(dut.win_fetch__tag.value), int(dut.win_fetch__index.value))
                addr = int(dut.win_fetch__addr.value)
                want = (fetched[0] + fetched[1]) % (1 << len(self.gen.fetch.tag))
                self.check(addr == want, f"cycle {cycle}: fetch.addr {addr}, tag + index "
                                         f"{want}")

    def check_popcounts(self, layer, x, jobs, out_channels: int = 3) -> int:
        """XNOR-popcount of each job's received words with packed weights = golden P."""
        rows, simd = self.config.rows, self.config.simd
        w = pm1(self.np_rng, out_channels, layer.channels, layer.kernel, layer.kernel)
        p = golden.popcount_conv2d(x, w, stride=layer.stride, padding=layer.padding,
                                   pad_value=1 if layer.pad_bit else -1)[0]
        w_packed = pack_weights(w, word_bits=simd, cols=1)             # O, K, 1, bytes
        checked = 0
        for g, words in jobs:
            for r in range(rows):
                n = g * rows + r
                if n >= layer.out_h * layer.out_w:
                    continue
                oy, ox = divmod(n, layer.out_w)
                a = to_bytes([acts[r] for acts, *_ in words], simd)
                for o in range(out_channels):
                    got = int(golden.xnor_popcount(a, w_packed[o, :, 0].reshape(-1)))
                    self.check(got == int(p[o, oy, ox]), f"{layer} pixel ({oy}, {ox}) channel "
                               f"{o}: words give P {got}, golden {int(p[o, oy, ox])}")
                    checked += 1
        return checked

    async def one_layer(self, n: int, layer: WindowLayer, tiles: int) -> int:
        rows, simd, gen = self.config.rows, self.config.simd, self.gen
        x = pm1(self.np_rng, 1, layer.channels, layer.in_h, layer.in_w)
        words = layer.in_h * layer.in_w * layer.words(simd)
        base = self.rng.randint(0, self.config.activation_depth - words)
        await self.load(x, base, words)
        model = self.expected_jobs(layer, x)
        k = layer.k_words(simd)
        step = self.rng.randint(0, 40) if tiles > 1 else 0
        payloads, jobs = [], []
        start = len(self.received)
        for g, (k_words, row_valid) in enumerate(model):
            tag = self.rng.getrandbits(5)
            payloads.append(gen.command_payload(layer, g, base=base, tag=tag, tiles=tiles,
                                                tag_step=step))
            for t in range(tiles):
                job_tag = (tag + t * step) % (1 << len(gen.fetch.tag))
                for j in range(k):
                    self.words.expect((k_words[j], row_valid, j == 0, j == k - 1, j, job_tag),
                                      f"layer {n} {layer} group {g} tile {t} K-word {j}")
                jobs.append(g)
        await self.commands(payloads)
        total = start + len(jobs) * k
        await self.settle(lambda: len(self.received) >= total, 4 * len(jobs) * (k + rows + 8))
        received = self.received[start:total]
        self.check(len(received) == len(jobs) * k,
                   f"layer {n} {layer}: {len(received)} words, expected {len(jobs) * k}")
        by_job = [(g, received[i * k:(i + 1) * k]) for i, g in enumerate(jobs)
                  if len(received) >= (i + 1) * k]
        return self.check_popcounts(layer, x, by_job[::tiles])

    async def run(self) -> None:
        await self.reset()
        cocotb.start_soon(self.sink())
        cocotb.start_soon(self.monitor())
        popcounts = 0
        for n, (layer, tiles) in enumerate(self.LAYERS):
            popcounts += await self.one_layer(n, layer, tiles)
        self.finish(self.words, layers=len(self.LAYERS), popcounts=popcounts)


# -- the tests -------------------------------------------------------------------------------

@cocotb.test()
async def pe_matches_golden(dut):
    await PeTB(dut, *_bench()).run()


@cocotb.test()
async def threshold_matches_golden(dut):
    await ThresholdTB(dut, *_bench()).run()


@cocotb.test()
async def pool_matches_golden(dut):
    await PoolTB(dut, *_bench()).run()


@cocotb.test()
async def window_matches_golden(dut):
    await WindowTB(dut, *_bench()).run()
