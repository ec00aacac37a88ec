# amaranth: UnusedElaboratable=no
"""Command decoder and response encoder against core/protocol.py (amaranth.sim).

The decoder is fed the bytes of :func:`bitdet.core.protocol.encode_frame` mixed with
garbage, corrupted, truncated, unknown-opcode and bad-length frames, with idle gaps and
back-pressure; what it commits and the errors it reports must be exactly those of
:class:`bitdet.core.protocol.FrameParser` (with ``expire()`` where a gap exceeds the
timeout), and every valid frame that starts while the parser is hunting must be served.
"""

import random

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

from amaranth.back import verilog
from amaranth.hdl import Module, Signal
from amaranth.lib.wiring import connect
from amaranth.sim import Simulator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitdet.core.config import AcceleratorConfig
from bitdet.core.protocol import (
    COMMAND_PAYLOAD_LIMITS,
    CRC_INIT,
    MAGIC,
    MAX_PAYLOAD,
    ErrorCode,
    Frame,
    FrameError,
    FrameParser,
    IdentifyReply,
    Opcode,
    Response,
    crc16_update,
    encode_error,
    encode_frame,
    encode_response,
    parse_response,
)
from bitdet.hw.decoder import (
    CommandDecoder,
    DecoderEvent,
    ResponseEncoder,
    crc16_update_value,
    timeout_cycles,
)
from bitdet.hw.uart import UART

TIMEOUT = 48          # decoder timeout in the tests, in cycles
SHORT_GAP = 12        # gaps that never time out (stalls of the decoder do not count)
LONG_GAP = 160        # gaps that always do
UNKNOWN_OPCODES = [0x00, 0x03, 0x13, 0x7F, 0x80, 0x81, MAGIC, 0xFF]


# -- stimulus ----------------------------------------------------------------------------------

def valid_frame(rng: random.Random) -> bytes:
    opcode = rng.choice(list(COMMAND_PAYLOAD_LIMITS))
    low, high = COMMAND_PAYLOAD_LIMITS[opcode]
    length = rng.randint(low, min(high, low + 10))
    return encode_frame(opcode, bytes(rng.randrange(256) for _ in range(length)),
                        seq=rng.randrange(256))


def garbage(rng: random.Random, *, magic: bool) -> bytes:
    others = [b for b in range(256) if b != MAGIC]
    data = bytes(rng.choice(others) for _ in range(rng.randint(1, 6)))
    if magic:
        cut = rng.randint(0, len(data))
        data = data[:cut] + bytes([MAGIC]) + data[cut:]
    return data


def random_schedule(rng: random.Random, segments: int) -> list:
    """A list of bytes and ``("gap", cycles)`` items."""
    schedule = []
    for _ in range(segments):
        kind = rng.choice(["valid", "valid", "valid", "garbage", "garbage_magic", "bad_crc",
                           "truncated", "unknown", "bad_length", "corrupt"])
        if kind == "valid":
            data = valid_frame(rng)
        elif kind == "garbage":
            data = garbage(rng, magic=False)
        elif kind == "garbage_magic":
            data = garbage(rng, magic=True)
        elif kind == "bad_crc":
            frame = bytearray(valid_frame(rng))
            frame[-rng.randint(1, 2)] ^= 1 << rng.randrange(8)
            data = bytes(frame)
        elif kind == "truncated":
            frame = valid_frame(rng)
            data = frame[:rng.randint(1, len(frame) - 1)]
        elif kind == "unknown":
            data = encode_frame(rng.choice(UNKNOWN_OPCODES),
                                bytes(rng.randrange(256) for _ in range(rng.randint(0, 6))))
        elif kind == "bad_length":
            opcode = rng.choice([Opcode.IDENTIFY, Opcode.READ_RESULTS, Opcode.WRITE_WEIGHTS])
            low, high = COMMAND_PAYLOAD_LIMITS[opcode]
            length = rng.choice([n for n in (low - 1, high + 1, 0x1234) if n >= 0])
            data = bytes([MAGIC, opcode]) + length.to_bytes(2, "little")
        else:                                    # any byte but MAGIC of a frame changed
            frame = bytearray(valid_frame(rng))
            frame[rng.randrange(1, len(frame))] ^= rng.randrange(1, 256)
            data = bytes(frame)
        for byte in data:
            schedule.append(byte)
            if rng.random() < 0.1:
                schedule.append(("gap", rng.randint(1, SHORT_GAP)))
        if kind in ("truncated", "garbage_magic", "corrupt", "bad_length") or rng.random() < 0.1:
            schedule.append(("gap", LONG_GAP))
    schedule.append(("gap", LONG_GAP))
    return schedule


def reference(schedule: list) -> tuple[list, list]:
    """FrameParser's events for ``schedule``, and the valid frames it must serve."""
    parser = FrameParser()
    events, must_serve = [], []
    frame_start = None
    for item in schedule:
        if isinstance(item, tuple):
            if item[1] >= TIMEOUT and (event := parser.expire()) is not None:
                events.append(event)
            continue
        if not parser.in_frame and item == MAGIC:
            frame_start = len(events)
        events += parser.feed([item])
        if frame_start is not None and not parser.in_frame:
            frame_start = None
    for event in events:
        if isinstance(event, Frame):
            must_serve.append(event)
    return events, must_serve


# -- simulation --------------------------------------------------------------------------------

def run_decoder(schedule: list, *, seed: int = 0, ready_probability: float = 0.7,
                dut: CommandDecoder | None = None):
    """Drive ``schedule`` into a decoder; return its log (frames and errors by cycle),
    the aborted frames and the raw event list."""
    dut = dut or CommandDecoder(timeout_cycles=TIMEOUT)
    rng = random.Random(seed)
    log, aborted, raw = [], [], []
    done = []

    async def produce(ctx):
        for item in schedule:
            if isinstance(item, tuple):
                await ctx.tick().repeat(item[1])
                continue
            ctx.set(dut.i.payload, item)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
        await ctx.tick().repeat(30)             # let the last COMMIT / error out
        done.append(True)

    async def consume(ctx):
        cycle = 0
        current = None
        ctx.set(dut.error.ready, 1)
        ctx.set(dut.o.ready, rng.random() < ready_probability)
        async for _, _, valid, ready, payload, e_valid, e_payload in ctx.tick().sample(
                dut.o.valid, dut.o.ready, dut.o.payload, dut.error.valid, dut.error.payload):
            if e_valid:
                log.append((cycle, FrameError(ErrorCode(e_payload.code), e_payload.opcode,
                                              e_payload.seq)))
            if valid and ready:
                event = payload.event
                raw.append((cycle, event))
                if event == DecoderEvent.START:
                    assert current is None
                    current = (payload.opcode, payload.length, bytearray(), payload.seq)
                else:
                    assert current is not None
                    assert (payload.opcode, payload.length) == current[:2]
                    assert payload.seq == current[3]
                    if event == DecoderEvent.DATA:
                        current[2].append(payload.data)
                        assert payload.last == (len(current[2]) == current[1])
                    else:
                        frame = Frame(current[0], bytes(current[2]), current[3])
                        if event == DecoderEvent.COMMIT:
                            assert len(frame.payload) == current[1]
                            log.append((cycle, frame))
                        else:
                            aborted.append(frame)
                        current = None
            ctx.set(dut.o.ready, rng.random() < ready_probability)
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(consume, background=True)
    sim.add_testbench(produce)
    sim.run()
    assert done
    return [event for _, event in sorted(log, key=lambda x: x[0])], aborted, raw


def check_against_reference(schedule, *, seed=0, ready_probability=0.7):
    expected, must_serve = reference(schedule)
    got, aborted, _ = run_decoder(schedule, seed=seed, ready_probability=ready_probability)
    assert got == expected
    served = [event for event in got if isinstance(event, Frame)]
    for frame in must_serve:
        assert frame in served
    # every aborted frame was answered with BAD_CRC or TIMEOUT
    codes = [event.code for event in got if isinstance(event, FrameError)]
    assert len(aborted) <= codes.count(ErrorCode.BAD_CRC) + codes.count(ErrorCode.TIMEOUT)
    return got


# -- CRC ---------------------------------------------------------------------------------------

def test_hardware_crc_equals_protocol_crc():
    crc_in, byte_in = Signal(16), Signal(8)
    crc_out = Signal(16)
    m = Module()
    m.d.comb += crc_out.eq(crc16_update_value(crc_in, byte_in))
    rng = random.Random(5)
    cases = [(CRC_INIT, b) for b in range(256)] + [(0, b) for b in range(256)]
    cases += [(rng.randrange(1 << 16), rng.randrange(256)) for _ in range(1000)]
    cases += [(1 << i, 0) for i in range(16)] + [(0xFFFF, 0xFF), (0, 0)]

    async def tb(ctx):
        for crc, byte in cases:
            ctx.set(crc_in, crc)
            ctx.set(byte_in, byte)
            assert ctx.get(crc_out) == crc16_update(crc, byte), (hex(crc), hex(byte))

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()


def test_crc_value_rejects_wrong_widths():
    with pytest.raises(ValueError, match="16 bits"):
        crc16_update_value(Signal(8), Signal(8))


# -- decoder -----------------------------------------------------------------------------------

def test_valid_commands_back_to_back():
    rng = random.Random(1)
    frames = [encode_frame(op, bytes(rng.randrange(256) for _ in range(lo)))
              for op, (lo, _hi) in COMMAND_PAYLOAD_LIMITS.items()]
    frames.append(encode_frame(Opcode.WRITE_WEIGHTS, bytes(range(256)) * 2))   # 512 bytes
    schedule = [byte for frame in frames for byte in frame]
    got = check_against_reference(schedule, ready_probability=1.0)
    assert len(got) == len(frames)
    assert all(isinstance(event, Frame) for event in got)


def test_each_error_code_then_the_next_command_is_served():
    identify = encode_frame(Opcode.IDENTIFY)
    bad_crc = bytearray(encode_frame(Opcode.RUN_LAYER, b"\x01"))
    bad_crc[5] ^= 0x10                                                  # the payload byte
    schedule = [
        *bad_crc, *identify,
        *encode_frame(0x05, b"abc"), *identify,                         # unknown opcode
        MAGIC, Opcode.IDENTIFY, 2, 0, *identify,                        # BAD_LENGTH (IDENTIFY)
        MAGIC, 0x05, 0xFA, 0x0F, ("gap", LONG_GAP), *identify,          # 4090 > MAX_PAYLOAD
        *encode_frame(Opcode.WRITE_WEIGHTS, bytes(8))[:9], ("gap", LONG_GAP), *identify,
        MAGIC, ("gap", LONG_GAP), *identify,                            # timeout, no opcode
        *encode_frame(0x06, bytes(4))[:6], ("gap", LONG_GAP), *identify,
    ]
    got = check_against_reference(schedule)
    ident = Frame(Opcode.IDENTIFY, b"")
    assert got == [
        FrameError(ErrorCode.BAD_CRC, Opcode.RUN_LAYER), ident,
        FrameError(ErrorCode.UNKNOWN_OPCODE, 0x05), ident,
        FrameError(ErrorCode.BAD_LENGTH, Opcode.IDENTIFY), ident,
        FrameError(ErrorCode.BAD_LENGTH, 0x05), ident,
        FrameError(ErrorCode.TIMEOUT, Opcode.WRITE_WEIGHTS), ident,
        FrameError(ErrorCode.TIMEOUT, 0), ident,
        FrameError(ErrorCode.TIMEOUT, 0x06), ident,
    ]


def test_aborted_frames_end_with_abort():
    """A streamed command whose CRC is bad or which times out ends with ABORT on `o`."""
    bad = bytearray(encode_frame(Opcode.WRITE_ACTIVATIONS, bytes(range(20))))
    bad[-1] ^= 0xFF
    truncated = encode_frame(Opcode.WRITE_THRESHOLDS, bytes(10))[:-2]
    schedule = [*bad, *truncated, ("gap", LONG_GAP), *encode_frame(Opcode.RESET)]
    got, aborted, raw = run_decoder(schedule)
    assert got == [FrameError(ErrorCode.BAD_CRC, Opcode.WRITE_ACTIVATIONS),
                   FrameError(ErrorCode.TIMEOUT, Opcode.WRITE_THRESHOLDS),
                   Frame(Opcode.RESET, b"")]
    assert aborted == [Frame(Opcode.WRITE_ACTIVATIONS, bytes(range(20))),
                       Frame(Opcode.WRITE_THRESHOLDS, bytes(10))]     # all its DATA came
    assert [event for _, event in raw if event != DecoderEvent.DATA] == [
        DecoderEvent.START, DecoderEvent.ABORT, DecoderEvent.START, DecoderEvent.ABORT,
        DecoderEvent.START, DecoderEvent.COMMIT]


@pytest.mark.parametrize("seed", range(4))
def test_random_stream_matches_frame_parser(seed):
    rng = random.Random(100 + seed)
    schedule = random_schedule(rng, 40)
    check_against_reference(schedule, seed=seed, ready_probability=(1.0, 0.7, 0.4, 0.9)[seed])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.integers(0, 255), st.sampled_from([MAGIC] * 3),
                          st.tuples(st.just("gap"), st.sampled_from([1, 5, LONG_GAP]))),
                max_size=60),
       st.integers(0, 2 ** 16))
def test_arbitrary_bytes_never_hang_the_decoder(items, seed):
    """Any input: the decoder agrees with the parser and is back hunting after a
    timeout: a final IDENTIFY after a long gap is always served."""
    schedule = [*items, ("gap", LONG_GAP), *encode_frame(Opcode.IDENTIFY), ("gap", 4)]
    got = check_against_reference(schedule, seed=seed)
    assert got[-1] == Frame(Opcode.IDENTIFY, b"")


def test_seq_of_the_last_committed_frame():
    """``seq`` follows committed frames only: a frame that arrives (or breaks off) while
    the response to the last one is pending cannot change what that response echoes."""
    dut = CommandDecoder(timeout_cycles=TIMEOUT)

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.error.ready, 1)

        async def send(data):
            for byte in data:
                ctx.set(dut.i.payload, byte)
                ctx.set(dut.i.valid, 1)
                await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            await ctx.tick().repeat(4)

        await send(encode_frame(Opcode.IDENTIFY, seq=0x42))
        assert ctx.get(dut.seq) == 0x42
        bad = bytearray(encode_frame(Opcode.RESET, seq=0x99))
        bad[-1] ^= 1
        await send(bad)                                     # BAD_CRC: not committed
        assert ctx.get(dut.seq) == 0x42
        await send(encode_frame(Opcode.RUN_LAYER, b"\x01", seq=0x99)[:6])   # breaks off
        assert ctx.get(dut.seq) == 0x42
        await ctx.tick().repeat(LONG_GAP)
        await send(encode_frame(Opcode.RESET, seq=0x07))
        assert ctx.get(dut.seq) == 0x07

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_pending_error_is_kept_and_new_ones_dropped():
    dut = CommandDecoder(timeout_cycles=TIMEOUT)
    schedule = [*encode_frame(0x05), *encode_frame(0x06), *encode_frame(Opcode.IDENTIFY)]

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        for byte in schedule:
            ctx.set(dut.i.payload, byte)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
        ctx.set(dut.i.valid, 0)
        await ctx.tick().repeat(3)
        assert ctx.get(dut.error.valid)
        assert ctx.get(dut.error.payload.code) == ErrorCode.UNKNOWN_OPCODE
        assert ctx.get(dut.error.payload.opcode) == 0x05          # the first one
        ctx.set(dut.error.ready, 1)
        await ctx.tick()
        assert not ctx.get(dut.error.valid)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_decoder_parameters():
    dut = CommandDecoder(timeout_cycles=10, payload_limits={0x11: (0, 4)}, max_payload=64)
    assert dut.timeout_cycles == 10 and dut.max_payload == 64
    assert dut.payload_limits == {0x11: (0, 4)}
    assert timeout_cycles(25_000_000, 115_200) == 2_222_223
    config = AcceleratorConfig()
    assert timeout_cycles(config.clock_hz, config.baud, 1) == 2171
    with pytest.raises(ValueError, match="timeout_cycles must be at least 1"):
        CommandDecoder(timeout_cycles=0)
    with pytest.raises(TypeError, match="timeout_cycles must be an integer"):
        CommandDecoder(timeout_cycles=1.5)
    with pytest.raises(ValueError, match=r"opcode must be an integer in 1\.\.127"):
        CommandDecoder(timeout_cycles=10, payload_limits={0x80: (0, 1)})
    with pytest.raises(ValueError, match="0 <= min <= max <= 64"):
        CommandDecoder(timeout_cycles=10, payload_limits={0x11: (0, 65)}, max_payload=64)
    with pytest.raises(TypeError, match=r"\(min, max\) pair"):
        CommandDecoder(timeout_cycles=10, payload_limits={0x11: 4})
    with pytest.raises(ValueError, match="max_payload"):
        CommandDecoder(timeout_cycles=10, max_payload=1 << 16)
    with pytest.raises(ValueError, match="baud must be"):
        timeout_cycles(25_000_000, 0)


def test_custom_limits_and_max_payload():
    dut = CommandDecoder(timeout_cycles=TIMEOUT, payload_limits={0x11: (2, 4)}, max_payload=8)
    schedule = [*encode_frame(0x11, b"ab"), *encode_frame(0x11, b"abcde"),
                *encode_frame(0x01, bytes(8)), *encode_frame(0x01, bytes(9))[:4],
                *encode_frame(0x11, b"xyzw")]
    got, _, _ = run_decoder(schedule, dut=dut)
    assert got == [Frame(0x11, b"ab"), FrameError(ErrorCode.BAD_LENGTH, 0x11),
                   FrameError(ErrorCode.UNKNOWN_OPCODE, 0x01),
                   FrameError(ErrorCode.BAD_LENGTH, 0x01), Frame(0x11, b"xyzw")]
    parser = FrameParser(payload_limits={0x11: (2, 4)}, max_payload=8)
    assert parser.feed(schedule) == got


# -- encoder -----------------------------------------------------------------------------------

def item_seq(item) -> int:
    """The seq byte an encoder test gives a response or error item."""
    return (item[1] * 37 + item[2] * 11) & 0xFF


def run_encoder(items, *, seed=0, ready_probability=0.6):
    """Send responses ``("response", opcode, status, data)`` and errors ``("error", code,
    opcode)`` one after the other; return the bytes on ``o``."""
    dut = ResponseEncoder()
    rng = random.Random(seed)
    out = []

    async def produce(ctx):
        for item in items:
            if item[0] == "response":
                _, opcode, status, data = item
                ctx.set(dut.response.payload, {"opcode": opcode, "seq": item_seq(item),
                                               "status": status, "length": len(data)})
                ctx.set(dut.response.valid, 1)
                await ctx.tick().until(dut.response.ready)
                ctx.set(dut.response.valid, 0)
                for byte in data:
                    if rng.random() < 0.2:
                        await ctx.tick().repeat(rng.randint(1, 3))
                    ctx.set(dut.data.payload, byte)
                    ctx.set(dut.data.valid, 1)
                    await ctx.tick().until(dut.data.ready)
                    ctx.set(dut.data.valid, 0)
            else:
                _, code, opcode = item
                ctx.set(dut.error.payload, {"code": code, "opcode": opcode,
                                            "seq": item_seq(item)})
                ctx.set(dut.error.valid, 1)
                await ctx.tick().until(dut.error.ready)
                ctx.set(dut.error.valid, 0)
        await ctx.tick().repeat(40)

    async def consume(ctx):
        ctx.set(dut.o.ready, 1)
        async for _, _, valid, ready, byte in ctx.tick().sample(
                dut.o.valid, dut.o.ready, dut.o.payload):
            if valid and ready:
                out.append(byte)
            ctx.set(dut.o.ready, rng.random() < ready_probability)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(consume, background=True)
    sim.add_testbench(produce)
    sim.run()
    return bytes(out)


def test_encoder_frames_equal_protocol_encoding():
    rng = random.Random(3)
    items = [("response", Opcode.IDENTIFY, ErrorCode.OK, bytes(range(11))),
             ("error", ErrorCode.BAD_CRC, Opcode.RUN_LAYER),
             ("response", Opcode.RESET, ErrorCode.OK, b""),
             ("response", Opcode.CONFIGURE_LAYER, ErrorCode.LAYER_DOES_NOT_FIT, b""),
             ("error", ErrorCode.TIMEOUT, 0)]
    for _ in range(6):
        items.append(("response", rng.choice(list(Opcode)), rng.choice(list(ErrorCode)),
                      bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))))
    items.append(("response", Opcode.READ_ACTIVATIONS, ErrorCode.OK, bytes(300)))
    out = run_encoder(items)
    expected = b"".join(encode_response(item[1], item[2], item[3], seq=item_seq(item))
                        if item[0] == "response"
                        else encode_error(item[1], item[2], seq=item_seq(item))
                        for item in items)
    assert out == expected
    frames = FrameParser(payload_limits=None).feed(out)
    responses = [parse_response(frame) for frame in frames]
    assert [(r.opcode, r.status, r.data, r.framing, r.seq) for r in responses] == [
        (i[1], i[2], i[3], False, item_seq(i)) if i[0] == "response"
        else (i[2], i[1], b"", True, item_seq(i)) for i in items]


def test_decoder_errors_through_the_encoder():
    """The top-level error path: decoder.error → encoder.error → bytes on the link."""
    m = Module()
    m.submodules.decoder = decoder = CommandDecoder(timeout_cycles=TIMEOUT)
    m.submodules.encoder = encoder = ResponseEncoder()
    m.d.comb += [encoder.error.valid.eq(decoder.error.valid),
                 encoder.error.payload.eq(decoder.error.payload),
                 decoder.error.ready.eq(encoder.error.ready)]
    schedule = [*encode_frame(0x05, b"\x00"), ("gap", 30), *encode_frame(Opcode.IDENTIFY, b"x"),
                ("gap", 30), MAGIC, 0x21, ("gap", LONG_GAP)]
    out = []

    async def produce(ctx):
        ctx.set(decoder.o.ready, 1)
        ctx.set(encoder.o.ready, 1)
        for item in schedule:
            if isinstance(item, tuple):
                await ctx.tick().repeat(item[1])
                continue
            ctx.set(decoder.i.payload, item)
            ctx.set(decoder.i.valid, 1)
            await ctx.tick().until(decoder.i.ready)
            ctx.set(decoder.i.valid, 0)
        await ctx.tick().repeat(30)

    async def watch(ctx):
        async for _, _, valid, byte in ctx.tick().sample(encoder.o.valid, encoder.o.payload):
            if valid:
                out.append(byte)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(watch, background=True)
    sim.add_testbench(produce)
    sim.run()
    assert bytes(out) == (encode_error(ErrorCode.UNKNOWN_OPCODE, 0x05)
                          + encode_error(ErrorCode.BAD_LENGTH, Opcode.IDENTIFY)
                          + encode_error(ErrorCode.TIMEOUT, 0x21))


def test_verilog_conversion():
    decoder = CommandDecoder(timeout_cycles=timeout_cycles(25_000_000, 115_200))
    assert "module bitdet_decoder" in verilog.convert(decoder, name="bitdet_decoder")
    assert "module bitdet_encoder" in verilog.convert(ResponseEncoder(), name="bitdet_encoder")
    assert decoder.max_payload == MAX_PAYLOAD



def test_host_link_front_end_over_uarts():
    """A host UART and the device's UART → decoder → (testbench controller) → encoder →
    UART, at 10.5 clock cycles per bit: the host's frames go in as serial bits, and what
    comes back is parsed by the host's FrameParser."""
    divisor = 10.5
    m = Module()
    m.submodules.host = host = UART(divisor=divisor)
    m.submodules.uart = uart = UART(divisor=divisor)
    m.submodules.decoder = decoder = CommandDecoder(timeout_cycles=40 * 11)
    m.submodules.encoder = encoder = ResponseEncoder()
    m.d.comb += [uart.rx_pin.eq(host.tx_pin), host.rx_pin.eq(uart.tx_pin)]
    connect(m, uart.rx, decoder.i)
    connect(m, decoder.error, encoder.error)
    connect(m, encoder.o, uart.tx)
    config = AcceleratorConfig()
    reply = IdentifyReply.for_config(config).pack()
    bad = bytearray(encode_frame(Opcode.RESET))
    bad[-1] ^= 0x40
    commands = [encode_frame(Opcode.IDENTIFY), bytes(bad), encode_frame(Opcode.IDENTIFY)]
    answer_sizes = [19, 9, 19]
    received = []

    async def host_side(ctx):
        """Like the driver: one command, then wait for its answer (the decoder stalls
        while the controller answers, and the UART has no FIFO)."""
        for command, size in zip(commands, answer_sizes, strict=True):
            expected = len(received) + size
            for byte in command:
                ctx.set(host.tx.payload, byte)
                ctx.set(host.tx.valid, 1)
                await ctx.tick().until(host.tx.ready)
            ctx.set(host.tx.valid, 0)
            while len(received) < expected:
                await ctx.tick()
        await ctx.tick().repeat(100)

    async def host_receiver(ctx):
        ctx.set(host.rx.ready, 1)
        async for _, _, valid, byte in ctx.tick().sample(host.rx.valid, host.rx.payload):
            if valid:
                received.append(byte)

    async def controller(ctx):
        """Answers every committed IDENTIFY with the IdentifyReply."""
        ctx.set(decoder.o.ready, 1)
        while True:           # not `async for`: the body awaits other triggers
            _, _, valid, event = await ctx.tick().sample(decoder.o.valid, decoder.o.payload)
            if valid and event.event == DecoderEvent.COMMIT:
                assert event.opcode == Opcode.IDENTIFY
                ctx.set(decoder.o.ready, 0)       # busy answering (the decoder waits)
                ctx.set(encoder.response.payload, {"opcode": Opcode.IDENTIFY,
                                                   "status": ErrorCode.OK,
                                                   "length": len(reply)})
                ctx.set(encoder.response.valid, 1)
                await ctx.tick().until(encoder.response.ready)
                ctx.set(encoder.response.valid, 0)
                for byte in reply:
                    ctx.set(encoder.data.payload, byte)
                    ctx.set(encoder.data.valid, 1)
                    await ctx.tick().until(encoder.data.ready)
                ctx.set(encoder.data.valid, 0)
                ctx.set(decoder.o.ready, 1)

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(host_receiver, background=True)
    sim.add_testbench(controller, background=True)
    sim.add_testbench(host_side)
    sim.run()
    responses = [parse_response(f) for f in FrameParser(payload_limits=None).feed(received)]
    identify = Response(Opcode.IDENTIFY, ErrorCode.OK, reply)
    assert responses == [identify, Response(Opcode.RESET, ErrorCode.BAD_CRC, b"", framing=True),
                         identify]
    assert IdentifyReply.unpack(responses[0].data).config_hash == config.config_hash()
