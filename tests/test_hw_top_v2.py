# amaranth: UnusedElaboratable=no
"""The contract-2 command executor (amaranth.sim): ``CommandExecutor`` of a contract-2
build against the emulator (sw/emulator.py), response byte for response byte, for the
same frames: IDENTIFY, flat WRITE/READ_ACTIVATIONS over the map slots, CONFIGURE_LAYER of
48/49-byte extended descriptors (one wrong field per device check) and 32/33-byte ones,
RUN_LAYER / RUN_NETWORK of pool, repeat and conv passes. The layer checks are also
fuzzed on :class:`~bitdet.hw.layer_table.LayerCheck` alone against
:meth:`~bitdet.core.descriptor.LayerDescriptor.refusal`, and the executor's dispatch and
port arbitration are checked with stand-in engines (the real ones' ports, a behaviour of
the test's own)."""


import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import pass_cycles
from bitdet.core.descriptor import LayerDescriptor
from bitdet.core.protocol import (
    LAYER_TABLE_ENTRIES,
    ErrorCode,
    Frame,
    FrameParser,
    Opcode,
    decode_counters,
    encode_frame,
    encode_read,
    encode_write,
    parse_response,
)
from bitdet.hw import top
from bitdet.hw.controller_v2 import LayerControllerV2
from bitdet.hw.layer_table import LayerCheck
from bitdet.hw.memory import SlotMemory, slot_memory
from bitdet.hw.pass_engine import PassEngine, slot_addr_width
from bitdet.hw.top import CommandExecutor
from bitdet.sw.emulator import Emulator

#: A small contract-2 build: 4 slots of 64 words of 16 bits; narrower level limits than
#: the descriptor's (2-bit input and output, 1-bit shortcuts) so that each limit of stage
#: 2 can be broken by a descriptor that passes stage 1.
V2 = AcceleratorConfig(name="v2top", rows=2, cols=2, simd=16, weight_depth=64,
                       threshold_depth=64, activation_depth=64, max_channels=32,
                       max_kernel=3, max_stride=2, output_bits=2, clock_hz=1_000_000,
                       baud=62_500, contract=2, max_input_bits=2, max_shortcut_bits=1,
                       activation_slots=4)
DEPTH, SLOTS, WBYTES = V2.activation_depth, V2.activation_slots, V2.simd // 8
WORDS = SLOTS * DEPTH

CONV = LayerDescriptor.conv(in_h=4, in_w=4, channels=3, out_channels=5, kernel=3, stride=1,
                            padding=1, in_bits=2, out_bits=2, shortcut_bits=1, pad_level=1,
                            input_slot=0, output_slot=1, shortcut_slot=2, shortcut_base=5,
                            input_base=2, output_base=1, weight_base=3, threshold_base=4)
POOL = LayerDescriptor.pool_pass(in_h=4, in_w=4, channels=3, kernel=2, in_bits=2,
                                 out_bits=2, input_slot=1, output_slot=3, input_base=1,
                                 output_base=6)
REPEAT = LayerDescriptor.repeat_pass(h=3, w=2, channels=3, out_channels=20, bits=2,
                                     input_slot=3, output_slot=0, input_base=6,
                                     output_base=40)

BAD, FIT = "BAD_ARGUMENT", "LAYER_DOES_NOT_FIT"

#: One descriptor per device check: (name, descriptor, the code the device answers).
CASES = [
    # stage 1: zero sizes, flags, the extension's widths, kinds and slots
    *((f"{name}=0", CONV.replace(**{name: 0}), BAD)
      for name in ("in_h", "in_w", "channels", "out_h", "out_w", "out_channels", "kernel",
                   "stride")),
    ("reserved", CONV.replace(reserved=4), BAD),
    ("conv raw", CONV.replace(raw=1), BAD),
    ("pad_bit", CONV.replace(pad_bit=1), BAD),
    ("in_bits=0", CONV.replace(in_bits=0, pad_level=0), BAD),
    ("in_bits=5", CONV.replace(in_bits=5), BAD),
    ("out_bits=0", CONV.replace(out_bits=0), BAD),
    ("out_bits=7", CONV.replace(out_bits=7), BAD),
    ("shortcut_bits=5", CONV.replace(shortcut_bits=5), BAD),
    ("ext_reserved low", CONV.replace(ext_reserved=1), BAD),
    ("ext_reserved high", CONV.replace(ext_reserved=1 << 69), BAD),
    ("pad_level=4 at in_bits 2", CONV.replace(pad_level=4), BAD),
    ("pad_level=2 at in_bits 1", CONV.replace(in_bits=1, pad_level=2), BAD),
    ("pool and repeat", POOL.replace(repeat=1), BAD),
    ("pool out_bits", POOL.replace(out_bits=1), BAD),
    ("pool shortcut", POOL.replace(shortcut_bits=1, shortcut_slot=2), BAD),
    ("pool pad_level", POOL.replace(pad_level=1), BAD),
    *((f"pool {name}", POOL.replace(**{name: 1}), BAD)
      for name in ("pad_bit", "raw", "weight_base", "threshold_base")),
    ("pool out_channels", POOL.replace(out_channels=4), BAD),
    ("repeat out_bits", REPEAT.replace(out_bits=1), BAD),
    ("repeat shortcut", REPEAT.replace(shortcut_bits=1, shortcut_slot=1), BAD),
    ("repeat pad_level", REPEAT.replace(pad_level=1), BAD),
    ("repeat kernel 3", REPEAT.replace(kernel=3, in_h=5, in_w=4), BAD),
    ("repeat stride", REPEAT.replace(stride=2, in_h=5, in_w=3), BAD),
    ("repeat padding", REPEAT.replace(padding=1), BAD),
    *((f"repeat {name}", REPEAT.replace(**{name: 1}), BAD)
      for name in ("raw", "weight_base", "threshold_base", "pad_bit")),
    ("shortcut_slot without shortcut", CONV.replace(shortcut_bits=0, shortcut_base=0), BAD),
    ("shortcut_base without shortcut", CONV.replace(shortcut_bits=0, shortcut_slot=0),
     BAD),
    ("output_slot = input_slot", CONV.replace(output_slot=0), BAD),
    ("pool output_slot = input_slot", POOL.replace(output_slot=1), BAD),
    ("output_slot = shortcut_slot", CONV.replace(output_slot=2), BAD),
    ("stage 1 before stage 2", CONV.replace(raw=1, kernel=5), BAD),
    # stage 2: beyond the build
    ("in_bits=3", CONV.replace(in_bits=3), FIT),
    ("out_bits=3", CONV.replace(out_bits=3), FIT),
    ("shortcut_bits=2", CONV.replace(shortcut_bits=2), FIT),
    ("input_slot=4", CONV.replace(input_slot=4), FIT),
    ("output_slot=15", CONV.replace(output_slot=15), FIT),
    ("shortcut_slot=4", CONV.replace(shortcut_slot=4), FIT),
    ("shortcut_base=64", CONV.replace(shortcut_base=64), FIT),
    ("kernel=5", CONV.replace(kernel=5, padding=2), FIT),
    ("stride=3", CONV.replace(stride=3, out_h=2, out_w=2), FIT),
    ("padding=3", CONV.replace(padding=3, out_h=8, out_w=8), FIT),
    ("out_channels=33", CONV.replace(out_channels=33), FIT),
    ("channels=33", CONV.replace(channels=33), FIT),
    ("weight_base=64", CONV.replace(weight_base=64), FIT),
    ("threshold_base=64", CONV.replace(threshold_base=64), FIT),
    ("in_h=65", CONV.replace(in_h=65, out_h=65), FIT),
    ("area", CONV.replace(in_h=16, in_w=8, out_h=16, out_w=8), FIT),
    ("input_base=64", CONV.replace(input_base=64), FIT),
    ("output_base=64", CONV.replace(output_base=64), FIT),
    ("pool kernel=4", POOL.replace(kernel=4, stride=4, out_h=1, out_w=1), FIT),
    ("pool padding", POOL.replace(padding=1), FIT),
    ("repeat out_channels=33", REPEAT.replace(out_channels=33), FIT),
    ("stage 2 before stage 3", CONV.replace(in_bits=3, out_h=9), FIT),
    # stage 3: the output size against the window
    ("out_h", CONV.replace(out_h=3), BAD),
    ("out_w", CONV.replace(out_w=5), BAD),
    ("pool out_w", POOL.replace(out_w=3), BAD),
    ("repeat out_h", REPEAT.replace(out_h=2), BAD),
    # accepted
    ("conv", CONV, None),
    ("pool", POOL, None),
    ("repeat", REPEAT, None),
    ("pool kernel 3 stride 1", POOL.replace(kernel=3, stride=1, out_h=2, out_w=2), None),
]


# -- the host side ------------------------------------------------------------------------
class RawDriver:
    """Pushes a frame's bytes into ``i`` (with random gaps) while collecting ``o`` until
    one whole response frame has come back; returns its bytes as they came."""

    def __init__(self, ctx, dut, *, seed=0, valid_probability=0.9, ready_probability=0.8):
        self.ctx, self.dut = ctx, dut
        self.rng = np.random.default_rng(seed)
        self.valid_probability, self.ready_probability = valid_probability, ready_probability
        self.cycles = 0

    async def exchange(self, frame: bytes, *, limit: int = 20000) -> bytes:
        ctx, dut = self.ctx, self.dut
        pending, got = list(frame), bytearray()
        parser = FrameParser(payload_limits=None)
        for _ in range(limit):
            offer = bool(pending) and self.rng.random() < self.valid_probability
            ctx.set(dut.i.valid, offer)
            if offer:
                ctx.set(dut.i.payload, pending[0])
            ready = self.rng.random() < self.ready_probability
            ctx.set(dut.o.ready, ready)
            took = offer and ctx.get(dut.i.ready)
            out = ctx.get(dut.o.payload) if ready and ctx.get(dut.o.valid) else None
            await ctx.tick()
            self.cycles += 1
            if took:
                pending.pop(0)
            if out is not None:
                got.append(out)
                frames = parser.feed([out])
                if frames:
                    assert not pending and len(frames) == 1, (frames, pending)
                    assert isinstance(frames[0], Frame), frames[0]
                    ctx.set(dut.i.valid, 0)
                    return bytes(got)
        raise AssertionError(f"no response to {frame.hex()} in {limit} cycles")


def rtl_exchange(dut, frames, *, seed=0, limit=20000, watch=None):
    """The executor's response bytes to each frame (one simulation, in order); with
    ``watch`` a list the testbench appends ``busy`` of each cycle to it."""
    responses = []

    async def testbench(ctx):
        driver = RawDriver(ctx, dut, seed=seed)
        for frame in frames:
            responses.append(await driver.exchange(frame, limit=limit))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return responses


def emulator_exchange(config, frames):
    emu = Emulator(config)
    return [emu.feed(frame) for frame in frames], emu


def compare(config, frames, *, dut=None, **kwargs):
    """The RTL's and the emulator's responses to ``frames``, asserted equal byte for byte;
    the parsed responses."""
    expected, _ = emulator_exchange(config, frames)
    got = rtl_exchange(CommandExecutor(config) if dut is None else dut, frames, **kwargs)
    for frame, want, have in zip(frames, expected, got, strict=True):
        assert have == want, (f"frame {frame.hex()}: emulator {want.hex()}, "
                              f"RTL {have.hex()}")
    return [parse_response(FrameParser(payload_limits=None).feed(r)[0]) for r in expected]


def configure(descriptor, index=None):
    return encode_frame(Opcode.CONFIGURE_LAYER, descriptor.encode(index))


def words(rng, n):
    return rng.integers(0, 256, size=n * WBYTES, dtype=np.uint8).tobytes()


# -- the slot memory ----------------------------------------------------------------------
def test_slot_memory_flat_addresses():
    """Words written at flat addresses of every slot come back on every read port one
    cycle later; a port whose ``en`` is low holds its word."""
    mem = slot_memory(V2)
    assert isinstance(mem, SlotMemory)
    assert (mem.words, mem.read_ports, mem.addr_width) == (WORDS, V2.rows + 1,
                                                          slot_addr_width(V2))
    rng = np.random.default_rng(1)
    addrs = [s * DEPTH + w for s in range(SLOTS) for w in (0, 1, DEPTH - 1)]
    values = {a: int(rng.integers(0, 1 << V2.simd)) for a in addrs}

    async def testbench(ctx):
        for a, v in values.items():
            ctx.set(mem.write.en, 1)
            ctx.set(mem.write.addr, a)
            ctx.set(mem.write.data, v)
            await ctx.tick()
        ctx.set(mem.write.en, 0)
        for k, a in enumerate(addrs):
            port = mem.read[k % mem.read_ports]
            ctx.set(port.en, 1)
            ctx.set(port.addr, a)
            await ctx.tick()
            ctx.set(port.en, 0)
            ctx.set(port.addr, addrs[0])
            assert ctx.get(port.data) == values[a], a
            await ctx.tick()
            assert ctx.get(port.data) == values[a], a            # held

    sim = Simulator(mem)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()

    with pytest.raises(ValueError, match="slots"):
        SlotMemory(simd=8, depth=4, slots=0)


# -- CONFIGURE_LAYER's checks ---------------------------------------------------------------
def test_cases_break_the_check_they_name():
    """Each case's descriptor is answered the code the case names (the emulator's
    answer): the executor test below then covers every check."""
    for name, descriptor, code in CASES:
        assert descriptor.extended, name
        assert descriptor.refusal(V2) == code, (name, descriptor.problems(V2))


def check_codes(config, descriptors):
    """LayerCheck's answer to each descriptor: an ErrorCode name or None."""
    dut = LayerCheck(config=config)
    codes = []

    async def testbench(ctx):
        for d in descriptors:
            ctx.set(dut.descriptor.as_value(), int.from_bytes(d.encode(), "little"))
            await ctx.tick()
            refused, too_large, misfit = (ctx.get(dut.refused), ctx.get(dut.too_large),
                                          ctx.get(dut.misfit))
            codes.append(BAD if refused else FIT if too_large else BAD if misfit else None)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return codes


def random_descriptors(rng, config, n):
    """Mutations of the three passes: 1 … 3 fields each set to an edge value."""
    depth, slots = config.activation_depth, config.activation_slots
    edges = {
        "in_h": [0, 1, 3, 4, 5, depth, depth + 1], "in_w": [0, 1, 4, 8, depth + 1],
        "channels": [0, 1, 3, config.max_channels, config.max_channels + 1],
        "out_h": [0, 1, 2, 3, 4], "out_w": [0, 2, 4, 5],
        "out_channels": [0, 3, 20, config.max_channels + 1],
        "kernel": [0, 1, 2, 3, 4, 8], "stride": [0, 1, 2, 3, 4], "padding": [0, 1, 2, 3],
        "pad_bit": [0, 1], "raw": [0, 1], "pool": [0, 1], "reserved": [0, 1, 16],
        "input_base": [0, depth - 1, depth, 1 << 31],
        "output_base": [0, depth - 1, depth],
        "weight_base": [0, 1, config.weight_depth], "threshold_base": [0, 1, 255],
        "in_bits": list(range(8)), "out_bits": list(range(8)),
        "shortcut_bits": list(range(8)), "pad_level": [0, 1, 2, 3, 4, 15],
        "repeat": [0, 1], "input_slot": [0, 1, slots - 1, slots, 15],
        "output_slot": [0, 1, 2, slots, 15], "shortcut_slot": [0, 2, slots, 15],
        "ext_reserved": [0, 1, 1 << 40], "shortcut_base": [0, depth - 1, depth],
    }
    names = sorted(edges)
    out = []
    for _ in range(n):
        base = (CONV, POOL, REPEAT)[rng.integers(3)]
        changes = {}
        for name in rng.choice(names, size=int(rng.integers(1, 4)), replace=False):
            choices = edges[str(name)]
            changes[str(name)] = choices[int(rng.integers(len(choices)))]
        out.append(base.replace(**changes))
    return out


def test_layer_check_matches_refusal():
    """LayerCheck under contract 2 answers LayerDescriptor.refusal's code for the named
    cases and 1500 random mutations of a conv, a pool and a repeat pass."""
    rng = np.random.default_rng(33)
    descriptors = [d for _, d, _ in CASES] + random_descriptors(rng, V2, 1500)
    want = [d.refusal(V2) for d in descriptors]
    assert {None, BAD, FIT} <= set(want)                  # every outcome occurs
    got = check_codes(V2, descriptors)
    wrong = [(d, w, g) for d, w, g in zip(descriptors, want, got, strict=True) if w != g]
    assert not wrong, (len(wrong), wrong[:3], wrong[0][0].problems(V2))


def test_configure_layer_answers_as_the_emulator():
    """CONFIGURE_LAYER of 48/49-byte descriptors (every case, into several entries),
    32/33/47/50-byte payloads (BAD_LENGTH), an index beyond the table (BAD_ARGUMENT); a
    refused descriptor leaves its entry unconfigured (RUN_LAYER of it: NOT_CONFIGURED),
    an accepted one configures it."""
    frames = []
    for k, (_, d, code) in enumerate(CASES):
        entry = k % LAYER_TABLE_ENTRIES
        frames.append(configure(d, entry if k % 3 else None))
        if code is not None and k % 3:
            # (a RUN of an accepted one would start an engine: only the refused are run)
            frames.append(encode_frame(Opcode.RUN_LAYER, bytes([entry])))
    payload = CONV.encode()
    frames += [
        encode_frame(Opcode.CONFIGURE_LAYER, payload[:32]),
        encode_frame(Opcode.CONFIGURE_LAYER, bytes([1]) + payload[:32]),
        encode_frame(Opcode.CONFIGURE_LAYER, payload[:47]),
        encode_frame(Opcode.CONFIGURE_LAYER, bytes([1]) + payload + b"\x00"),
        configure(CONV, LAYER_TABLE_ENTRIES),
        configure(CONV, 255),
        configure(CONV.replace(raw=1), 15),
        encode_frame(Opcode.RUN_LAYER, bytes([15])),
        encode_frame(Opcode.RUN_NETWORK, bytes([LAYER_TABLE_ENTRIES])),
    ]
    responses = compare(V2, frames)
    statuses = [ErrorCode(r.status) for r in responses]
    assert statuses.count(ErrorCode.NOT_CONFIGURED) >= 20
    assert statuses.count(ErrorCode.BAD_LENGTH) == 4
    assert {ErrorCode.OK, ErrorCode.BAD_ARGUMENT, ErrorCode.LAYER_DOES_NOT_FIT} <= set(statuses)


# -- the memories and the plain commands ---------------------------------------------------
def test_commands_and_flat_activations_as_the_emulator():
    """IDENTIFY, RESET, READ_COUNTERS, READ_RESULTS, RUN errors, and WRITE/READ_ACTIVATIONS
    at flat addresses in every slot, across a slot boundary, up to the last word and
    beyond it (BAD_ADDRESS, the words inside written), too long (BAD_ARGUMENT)."""
    rng = np.random.default_rng(7)
    w = lambda address, n: encode_frame(Opcode.WRITE_ACTIVATIONS,  # noqa: E731
                                        encode_write(address, words(rng, n)))
    r = lambda address, n: encode_frame(Opcode.READ_ACTIVATIONS,  # noqa: E731
                                        encode_read(address, n))
    frames = [
        encode_frame(Opcode.IDENTIFY), encode_frame(Opcode.READ_COUNTERS),
        w(0, 5), w(DEPTH + 3, 7), w(2 * DEPTH - 2, 4), w(3 * DEPTH + 20, 9),
        w(WORDS - 3, 3), w(WORDS - 2, 4), w(WORDS, 1), w(1 << 20, 2), w(1 << 31, 1),
        encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(8, bytes(2 * WBYTES + 1))),
        w(100, 60),
        r(0, 6), r(DEPTH + 2, 9), r(2 * DEPTH - 3, 6), r(3 * DEPTH + 19, 11),
        r(WORDS - 4, 4), r(WORDS - 1, 1), r(WORDS - 1, 2), r(WORDS, 1), r(WORDS, 0),
        r(5, 0), r(1 << 31, 1), r(90, 100), r(0, 2044), r(0, 2045),
        r(WORDS - 1, 4000), r(8, 3),
        encode_frame(Opcode.RUN_LAYER), encode_frame(Opcode.RUN_LAYER, bytes([16])),
        encode_frame(Opcode.RUN_NETWORK, bytes([0])),
        encode_frame(Opcode.RUN_NETWORK, bytes([17])),
        encode_frame(Opcode.RESET),
        encode_frame(Opcode.READ_RESULTS, encode_read(0, 1)),
        encode_frame(Opcode.IDENTIFY, seq=77),
    ]
    responses = compare(V2, frames)
    statuses = [ErrorCode(x.status) for x in responses]
    for code in (ErrorCode.OK, ErrorCode.BAD_ADDRESS, ErrorCode.BAD_ARGUMENT,
                 ErrorCode.NOT_CONFIGURED, ErrorCode.UNKNOWN_OPCODE):
        assert code in statuses, code
    reads = [x.data for x, f in zip(responses, frames, strict=True)
             if f[1] == Opcode.READ_ACTIVATIONS and x.status == ErrorCode.OK]
    assert sum(len(x) for x in reads) > 40 * WBYTES and any(any(x) for x in reads)


# -- RUN: dispatch and port arbitration with stand-in engines -------------------------------
class StubPassEngine(PassEngine):
    """A pass engine's ports, the test's behaviour: reads the input's first word (flat
    ``input_slot · depth + input_base``) on ``act_read``, writes it inverted at the output's
    first word and the extension's low bits after it; busy ``out_h + 3`` cycles, stall 1."""

    def elaborate(self, platform):
        m = Module()
        c, d = self.config, self.layer
        step = Signal(8)
        running = Signal()
        # (a read port's `en` is 1 unless driven)
        m.d.comb += [self.busy.eq(running), self.act_read.en.eq(0)]
        with m.If(self.start):
            m.d.sync += [running.eq(1), step.eq(0)]
        with m.If(running):
            m.d.sync += step.eq(step + 1)
            out = d.output_slot * c.activation_depth + d.output_base
            with m.Switch(step):
                with m.Case(0):
                    m.d.comb += [self.act_read.en.eq(1), self.act_read.addr.eq(
                        d.input_slot * c.activation_depth + d.input_base)]
                with m.Case(1):
                    m.d.comb += [self.act_write.en.eq(1), self.act_write.addr.eq(out),
                                 self.act_write.data.eq(~self.act_read.data),
                                 self.stall.eq(1)]
                with m.Case(2):
                    m.d.comb += [self.act_write.en.eq(1), self.act_write.addr.eq(out + 1),
                                 self.act_write.data.eq(d.as_value()[256:])]
            with m.If(step == d.out_h + 2):
                m.d.comb += self.done.eq(1)
                m.d.sync += running.eq(0)
        return m


class StubController(LayerControllerV2):
    """A controller's ports, the test's behaviour: reads the input's first word on the
    last row's port and the shortcut's first word on ``sc_read``, writes their XOR at the
    output's first word and ``shortcut_base`` after it; busy ``out_w + 4``, stall 2."""

    def elaborate(self, platform):
        m = Module()
        c, d = self.config, self.layer
        step = Signal(8)
        running = Signal()
        row = self.act_read[c.rows - 1]
        m.d.comb += [self.busy.eq(running), self.sc_read.en.eq(0),
                     *(port.en.eq(0) for port in self.act_read)]
        with m.If(self.start):
            m.d.sync += [running.eq(1), step.eq(0)]
        with m.If(running):
            m.d.sync += step.eq(step + 1)
            out = d.output_slot * c.activation_depth + d.output_base
            with m.Switch(step):
                with m.Case(0):
                    m.d.comb += [
                        row.en.eq(1),
                        row.addr.eq(d.input_slot * c.activation_depth + d.input_base),
                        self.sc_read.en.eq(1),
                        self.sc_read.addr.eq(d.shortcut_slot * c.activation_depth
                                             + d.shortcut_base)]
                with m.Case(1, 2):
                    m.d.comb += self.stall.eq(1)
                with m.Case(3):
                    m.d.comb += [self.act_write.en.eq(1), self.act_write.addr.eq(out),
                                 self.act_write.data.eq(row.data ^ self.sc_read.data)]
                with m.Case(4):
                    m.d.comb += [self.act_write.en.eq(1), self.act_write.addr.eq(out + 1),
                                 self.act_write.data.eq(d.shortcut_base)]
            with m.If(step == d.out_w + 3):
                m.d.comb += self.done.eq(1)
                m.d.sync += running.eq(0)
        return m


def test_run_dispatch_and_arbitration(monkeypatch):
    """RUN_LAYER / RUN_NETWORK start the pass engine for a pool or repeat pass and the
    controller for a conv, with the whole extended descriptor held on ``layer``; each
    owns the write port and the auxiliary read port while it runs (the controller's
    window row and ``sc_read`` both), READ/WRITE_ACTIVATIONS otherwise; the counters are
    the engines' busy and stall cycles, summed over RUN_NETWORK; nothing flips."""
    monkeypatch.setattr(top, "PassEngine", StubPassEngine)
    monkeypatch.setattr(top, "LayerControllerV2", StubController)
    rng = np.random.default_rng(3)
    flat = lambda d, slot, base: getattr(d, slot) * DEPTH + getattr(d, base)  # noqa: E731
    inputs = {flat(d, "input_slot", "input_base"): words(rng, 1) for d in (CONV, POOL, REPEAT)}
    shortcut = words(rng, 1)
    frames = [encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(a, v))
              for a, v in inputs.items()]
    frames.append(encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(
        flat(CONV, "shortcut_slot", "shortcut_base"), shortcut)))
    table = [POOL, REPEAT, CONV]
    frames += [configure(d, i) for i, d in enumerate(table)]
    run_at = len(frames)
    frames += [encode_frame(Opcode.RUN_LAYER, bytes([i])) for i in range(3)]
    frames += [encode_frame(Opcode.READ_ACTIVATIONS,
                            encode_read(flat(d, "output_slot", "output_base"), 2))
               for d in table]
    frames += [encode_frame(Opcode.RUN_NETWORK, bytes([3])),
               encode_frame(Opcode.READ_COUNTERS)]
    got = [parse_response(FrameParser(payload_limits=None).feed(r)[0])
           for r in rtl_exchange(CommandExecutor(V2), frames)]
    assert all(r.status == ErrorCode.OK for r in got), [ErrorCode(r.status) for r in got]

    def counts(d):
        return (d.out_w + 4, 2) if d.kind == "conv" else (d.out_h + 3, 1)

    for i, d in enumerate(table):
        assert decode_counters(got[run_at + i].data) == counts(d), d.kind
    total = tuple(map(sum, zip(*map(counts, table), strict=True)))
    assert decode_counters(got[run_at + 6].data) == total
    assert decode_counters(got[run_at + 7].data) == total

    def word(value):
        return int.from_bytes(value, "little")

    mask = (1 << V2.simd) - 1
    ext = lambda d: int.from_bytes(d.encode(), "little") >> 256 & mask  # noqa: E731
    reads = [r.data for r in got[run_at + 3:run_at + 6]]
    # the pool pass: its input inverted, then its extension; the repeat pass read the
    # pool's output (slot 3, word 6), nothing flipped in between
    assert word(reads[0][:WBYTES]) == ~word(inputs[flat(POOL, "input_slot", "input_base")]) & mask
    assert word(reads[0][WBYTES:]) == ext(POOL)
    assert word(reads[1][:WBYTES]) == word(inputs[flat(POOL, "input_slot", "input_base")])
    assert word(reads[1][WBYTES:]) == ext(REPEAT)
    # the conv: its input (as the repeat pass left it: slot 0 word 40 is not the input)
    # XOR its shortcut, then shortcut_base
    assert word(reads[2][:WBYTES]) == (word(inputs[flat(CONV, "input_slot", "input_base")])
                                       ^ word(shortcut))
    assert word(reads[2][WBYTES:]) == CONV.shortcut_base


# -- RUN with the real engines, against the emulator ----------------------------------------
def random_map_frames(rng, descriptors):
    """WRITE_ACTIVATIONS frames that fill the input (and shortcut) maps of
    ``descriptors`` with random words."""
    frames = []
    for d in descriptors:
        spans = [(d.input_slot, d.input_base, d.in_bits * d.map_words(V2.simd, output=False))]
        if d.shortcut_bits:
            spans.append((d.shortcut_slot, d.shortcut_base,
                          d.shortcut_bits * d.map_words(V2.simd)))
        for slot, base, n in spans:
            for start in range(0, n, 28):
                count = min(28, n - start)
                frames.append(encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(
                    slot * DEPTH + base + start, words(rng, count))))
    return frames


def read_map_frames(d):
    n = d.out_bits * d.map_words(V2.simd)
    return [encode_frame(Opcode.READ_ACTIVATIONS,
                         encode_read(d.output_slot * DEPTH + d.output_base + start,
                                     min(28, n - start)))
            for start in range(0, n, 28)]


def run_frames(rng, passes):
    """Load, configure, run (RUN_LAYER of each, then RUN_NETWORK of all) and read back."""
    frames = random_map_frames(rng, passes)
    frames += [configure(d, i) for i, d in enumerate(passes)]
    for i, d in enumerate(passes):
        frames.append(encode_frame(Opcode.RUN_LAYER, bytes([i])))
        frames += read_map_frames(d)
    frames += [encode_frame(Opcode.RUN_NETWORK, bytes([len(passes)])),
               encode_frame(Opcode.READ_COUNTERS)]
    for d in passes:
        frames += read_map_frames(d)
    return frames


PASSES = [POOL, REPEAT,
          LayerDescriptor.pool_pass(in_h=5, in_w=4, channels=20, kernel=3, stride=1,
                                    in_bits=1, out_bits=1, input_slot=2, output_slot=1,
                                    input_base=3, output_base=0),
          LayerDescriptor.repeat_pass(h=2, w=3, channels=5, out_channels=7, bits=1,
                                      input_slot=1, output_slot=2, input_base=0,
                                      output_base=9)]


def test_pool_and_repeat_runs_as_the_emulator():
    """Pool and repeat passes (1- and 2-bit maps, kernel 2 and 3, stride 1 and 2, channel
    words of padding) over the link: every response byte as the emulator's, the outputs
    and the counters (pass_cycles) included."""
    for d in PASSES:
        assert d.refusal(V2) is None and not [p for p in d.problems(V2)], d
    frames = run_frames(np.random.default_rng(11), PASSES)
    responses = compare(V2, frames, limit=50000)
    runs = [r for r, f in zip(responses, frames, strict=True) if f[1] == Opcode.RUN_LAYER]
    assert [decode_counters(r.data) for r in runs] == [pass_cycles(V2, d) for d in PASSES]


#: Two convolutions: 2-bit input with a 1-bit shortcut and pad level 1 (thresholds
#: 4 … 9), 1-bit input of 17 channels (two words per pixel), 1×1 (thresholds 12 … 13).
CONVS = [CONV,
         LayerDescriptor.conv(in_h=3, in_w=4, channels=17, out_channels=3, kernel=1,
                              stride=1, in_bits=1, out_bits=2, input_slot=2, output_slot=3,
                              input_base=0, output_base=0, weight_base=30,
                              threshold_base=12)]


def parameter_frames(rng):
    """Random weights (entries 0 … 39) and sorted thresholds around each conv's mean
    accumulator (entries 0 … 11: CONV's, A ≈ 3·72; 12 … 13: the 1×1's, A ≈ 16), so that
    the outputs take several levels."""
    thr_bytes = -(-V2.thresholds_per_channel * V2.threshold_width // 8)
    frames = [encode_frame(Opcode.WRITE_WEIGHTS, encode_write(a, words(rng, V2.cols)))
              for a in range(40)]
    for a in range(14):
        mean, spread = (216, 30) if a < 12 else (16, 5)
        entry = bytearray()
        for _ in range(V2.cols):
            levels = np.sort(rng.integers(mean - spread, mean + spread,
                                          size=V2.thresholds_per_channel))
            value = sum(int(t) << (k * V2.threshold_width) for k, t in enumerate(levels))
            entry += value.to_bytes(thr_bytes, "little")
        frames.append(encode_frame(Opcode.WRITE_THRESHOLDS, encode_write(a, bytes(entry))))
    return frames


def check_conv_session(frames):
    responses = compare(V2, frames, limit=50000)
    reads = [r.data for r, f in zip(responses, frames, strict=True)
             if f[1] == Opcode.READ_ACTIVATIONS]
    levels = {reads_word for data in reads
              for reads_word in np.frombuffer(data, dtype="<u2").tolist()}
    assert len(levels) > 4, levels                    # the outputs are not constant
    return responses


@pytest.mark.parametrize("which", range(len(CONVS)))
def test_conv_runs_as_the_emulator(which):
    """A convolution with random weights, thresholds and maps over the link (RUN_LAYER
    and RUN_NETWORK of one entry): every response byte as the emulator's, the output
    planes and the counters included."""
    d = CONVS[which]
    assert d.refusal(V2) is None and not d.problems(V2), d
    rng = np.random.default_rng(12 + which)
    check_conv_session(parameter_frames(rng) + run_frames(rng, [d]))


def test_convs_back_to_back_as_the_emulator():
    """The two convolutions one after the other (RUN_LAYER of each, then RUN_NETWORK of
    both): every response byte as the emulator's."""
    rng = np.random.default_rng(14)
    check_conv_session(parameter_frames(rng) + run_frames(rng, CONVS))


def test_verilog_of_a_contract_2_build():
    """The contract-2 executor converts to Verilog: one slot memory of all the slots'
    words and a layer table of 48-byte entries."""
    from amaranth.back import verilog
    text = verilog.convert(CommandExecutor(V2), name="bitdet_top")
    assert f"reg [{V2.simd - 1}:0] slots [{WORDS - 1}:0];" in text
    assert f"reg [7:0] memory [{48 * LAYER_TABLE_ENTRIES - 1}:0];" in text


# -- commands during a run (docs/protocol.md, "Commands during a run") ----------------------
async def stream(driver, frames, count, *, limit=20000):
    """Push all ``frames``' bytes into ``i`` back to back (random gaps; the executor's
    ``ready`` paces them) while collecting ``o`` until ``count`` whole responses have
    come back; the responses' bytes, each as it came."""
    ctx, dut, rng = driver.ctx, driver.dut, driver.rng
    pending = [b for frame in frames for b in frame]
    got, responses = bytearray(), []
    parser = FrameParser(payload_limits=None)
    for _ in range(limit):
        offer = bool(pending) and rng.random() < driver.valid_probability
        ctx.set(dut.i.valid, offer)
        if offer:
            ctx.set(dut.i.payload, pending[0])
        ready = rng.random() < driver.ready_probability
        ctx.set(dut.o.ready, ready)
        took = offer and ctx.get(dut.i.ready)
        out = ctx.get(dut.o.payload) if ready and ctx.get(dut.o.valid) else None
        await ctx.tick()
        driver.cycles += 1
        if took:
            pending.pop(0)
        if out is not None:
            got.append(out)
            for frame in parser.feed([out]):
                assert isinstance(frame, Frame), frame
                responses.append(bytes(got))
                got.clear()
            if len(responses) == count:
                assert not pending and not got
                ctx.set(dut.i.valid, 0)
                return responses
    raise AssertionError(f"{len(responses)} of {count} responses in {limit} cycles")


def test_commands_during_a_run_as_the_timed_emulator(monkeypatch):
    """RUN_NETWORK of three convolutions (8 groups of 2 pixels, 3 tiles each; slots 0, 1
    and 2 busy), and right behind it, pipelined: a WRITE_ACTIVATIONS of 60 words into slot
    3 (idle: written while the controller writes, answered OK before the RUN), one across
    slots 2 and 3 (BUSY, nothing written), a WRITE_WEIGHTS, READ_COUNTERS,
    CONFIGURE_LAYER, RUN_LAYER (BUSY), a damaged frame (the decoder's BAD_CRC), then the
    RUN's response with its own seq and the emulator's counters. Every response byte as
    the timed emulator's (its run held over the frames), and afterwards every word of
    every slot and the counters."""
    rng = np.random.default_rng(21)
    setup = parameter_frames(rng) + random_map_frames(rng, [CONV])
    slot3 = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(3 * DEPTH, words(rng, DEPTH)))
    setup += [slot3] + [configure(CONV, i) for i in range(3)]
    run = encode_frame(Opcode.RUN_NETWORK, bytes([3]), seq=200)
    damaged = bytearray(encode_frame(Opcode.READ_COUNTERS, seq=207))
    damaged[-1] ^= 0xFF
    during = [
        encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(3 * DEPTH + 2, words(rng, 60)),
                     seq=201),
        encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(3 * DEPTH - 2, words(rng, 4)),
                     seq=202),
        encode_frame(Opcode.WRITE_WEIGHTS, encode_write(0, words(rng, V2.cols)), seq=203),
        encode_frame(Opcode.READ_COUNTERS, seq=204),
        encode_frame(Opcode.CONFIGURE_LAYER, CONV.encode(5), seq=205),
        encode_frame(Opcode.RUN_LAYER, bytes([0]), seq=206),
        bytes(damaged),
        encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(3 * DEPTH + 62, words(rng, 2)),
                     seq=208),
    ]
    after = [encode_frame(Opcode.READ_ACTIVATIONS, encode_read(0, WORDS)),
             encode_frame(Opcode.READ_COUNTERS), encode_frame(Opcode.RUN_LAYER, bytes([5])),
             encode_frame(Opcode.READ_ACTIVATIONS, encode_read(0, WORDS))]

    # the timed emulator, its run still going while the frames behind it arrive
    emu = Emulator(V2, timed=True)
    emu.run_byte_times = lambda busy: 1 << 20
    want_setup = [emu.feed(frame) for frame in setup]
    assert emu.feed(run) == b"" and emu.running
    assert emu.busy_slots() == {0, 1, 2}
    want_during = [emu.feed(frame) for frame in during] + [emu.idle(1 << 20)]
    want_after = [emu.feed(frame) for frame in after]

    got = {}

    async def testbench(ctx):
        driver = RawDriver(ctx, dut, seed=5)
        got["setup"] = [await driver.exchange(frame, limit=50000) for frame in setup]
        got["during"] = await stream(driver, [run, *during], len(during) + 1)
        got["after"] = [await driver.exchange(frame, limit=50000) for frame in after]

    # the write port's arbitration: cycles in which a host word waits for the engine
    holds = []
    arbitrate = CommandExecutor._slot_write_port

    def watched(*args):
        holds.append(arbitrate(*args))
        return holds[-1]

    monkeypatch.setattr(CommandExecutor, "_slot_write_port", staticmethod(watched))
    waited = []

    async def watch(ctx):
        async for *_, hold in ctx.tick().sample(holds[0]):
            waited.append(hold)

    dut = CommandExecutor(V2)
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.add_process(watch)
    sim.run()

    assert any(waited)                                # the host word met engine writes
    assert got["setup"] == want_setup
    assert got["during"] == want_during, [r.hex() for r in got["during"]]
    assert got["after"] == want_after
    parsed = [FrameParser(payload_limits=None).feed(r)[0] for r in got["during"]]
    # the RUN's response last, with its seq; the others in command order, BUSY but the
    # write into slot 3, the damaged frame an error response
    assert [p.seq for p in parsed] == [*range(201, 209), 200]
    statuses = [parse_response(p).status for p in parsed[:6] + parsed[7:]]
    assert statuses == [ErrorCode.OK, *[ErrorCode.BUSY] * 5, ErrorCode.OK, ErrorCode.OK]
    assert parse_response(parsed[6]).status == ErrorCode.BAD_CRC
    counters = decode_counters(parse_response(parsed[-1]).data)
    assert counters == tuple(3 * x for x in pass_cycles(V2, CONV))
    # the memory: the idle slot's new words, the busy slots as the run left them
    memory = parse_response(FrameParser(payload_limits=None).feed(got["after"][0])[0]).data
    assert memory == emu.activations.tobytes()
    new = during[0][9:-2]                              # (header 5 bytes, address 4)
    assert memory[(3 * DEPTH + 2) * WBYTES:(3 * DEPTH + 62) * WBYTES] == new
    old = slot3[9:-2]
    assert memory[3 * DEPTH * WBYTES:(3 * DEPTH + 2) * WBYTES] == old[:2 * WBYTES]


def test_driver_pipelines_on_the_contract_2_rtl():
    """``Device.concurrent_writes``: true on an RtlLink of a contract-2 config (a stand-in
    of that name over the untimed emulator here), false on one of a contract-1 config."""
    from bitdet.core.config import load_config
    from bitdet.sw.driver.device import Device
    from bitdet.sw.driver.link import EmuLink

    class RtlLink(EmuLink):
        pass

    assert Device(RtlLink(Emulator(V2)), V2).concurrent_writes
    tiny = load_config("tiny")
    assert not Device(RtlLink(Emulator(tiny)), tiny).concurrent_writes
    assert not Device(EmuLink(Emulator(V2)), V2).concurrent_writes


def test_host_writer_activation_words():
    """HostWriter's ``activation_words``: the words WRITE_ACTIVATIONS range-checks (and
    the width of its port), by default ``activation_depth``; the contract-2 executor's
    covers all slots."""
    from bitdet.hw.host_writer import HostWriter
    assert HostWriter(config=V2).activation_words == DEPTH
    writer = HostWriter(config=V2, activation_words=WORDS)
    assert writer.activation_words == WORDS
    assert len(writer.activations.addr) == slot_addr_width(V2) == (WORDS - 1).bit_length()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="activation_words"):
            HostWriter(config=V2, activation_words=bad)
