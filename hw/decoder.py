"""Command decoder and response encoder of the host link (the frames of ``core/protocol.py``).

:class:`CommandDecoder` turns the byte stream from the UART (or a simulation) into a
stream of *events* for the layer controller, and answers framing errors itself;
:class:`ResponseEncoder` frames the controller's responses, and the decoder's errors,
onto the transmit byte stream. Both use :func:`crc16_update_value`, a network of XOR
gates generated from :func:`bitdet.core.protocol.crc16_update`, so the hardware CRC is the
host's by construction (and tested to be). The protocol is described in
``docs/protocol.md``.
"""

import math
import operator
from collections.abc import Mapping
from functools import reduce

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.protocol import (
    COMMAND_PAYLOAD_LIMITS,
    CRC_INIT,
    ERROR_OPCODE,
    MAGIC,
    MAX_PAYLOAD,
    RESPONSE_FLAG,
    TIMEOUT_BYTE_TIMES,
    ErrorCode,
    crc16_update,
)

__all__ = [
    "CommandDecoder",
    "DecoderEvent",
    "ResponseEncoder",
    "crc16_update_value",
    "decoder_event_layout",
    "error_layout",
    "response_layout",
    "timeout_cycles",
]


def crc16_update_value(crc, byte) -> Value:
    """The CRC-16 register after shifting in ``byte``, as a combinational XOR network.

    Each output bit is the XOR of the input bits (of ``crc`` and ``byte``) that reach it;
    the sets are found by applying :func:`bitdet.core.protocol.crc16_update`, which is
    linear over GF(2), to every unit vector. About 2–5 inputs per output bit.
    """
    crc, byte = Value.cast(crc), Value.cast(byte)
    if len(crc) != 16 or len(byte) != 8:
        raise ValueError(f"crc must be 16 bits and byte 8 bits, not {len(crc)} and {len(byte)}")
    crc_columns = [crc16_update(1 << i, 0) for i in range(16)]
    byte_columns = [crc16_update(0, 1 << i) for i in range(8)]
    bits = []
    for j in range(16):
        terms = [crc[i] for i in range(16) if crc_columns[i] >> j & 1]
        terms += [byte[i] for i in range(8) if byte_columns[i] >> j & 1]
        bits.append(reduce(operator.xor, terms) if terms else Const(0, 1))
    return Cat(*bits)


def timeout_cycles(clock_hz: int, baud: int, byte_times: int = TIMEOUT_BYTE_TIMES) -> int:
    """Clock cycles of ``byte_times`` UART byte times (10 bits each): the decoder's
    inter-byte timeout for a link at ``baud``."""
    for name, value in (("clock_hz", clock_hz), ("baud", baud), ("byte_times", byte_times)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return math.ceil(10 * byte_times * clock_hz / baud)


class DecoderEvent(enum.Enum, shape=2):
    """What one transfer on :attr:`CommandDecoder.o` means."""

    START = 0       #: a frame with a known opcode and a valid length begins
    DATA = 1        #: one payload byte (``last`` on the final one)
    COMMIT = 2      #: the CRC was correct: execute the command
    ABORT = 3       #: the frame was dropped (bad CRC or timeout): discard what it wrote


decoder_event_layout = data.StructLayout({
    "event": DecoderEvent,
    "opcode": 8,
    "length": 16,
    "seq": 8,
    "data": 8,
    "last": 1,
})
"""Payload of :attr:`CommandDecoder.o`. ``opcode``, ``length`` and ``seq`` are those of
the current frame in every event; ``data`` and ``last`` only mean something in DATA
events."""

error_layout = data.StructLayout({"code": 8, "opcode": 8, "seq": 8})
"""A framing error: the :class:`~bitdet.core.protocol.ErrorCode`, and the opcode and seq
bytes received (0 if none)."""

response_layout = data.StructLayout({"opcode": 8, "seq": 8, "status": 8, "length": 16})
"""A response header: the command ``opcode`` it answers (below 0x80), the ``seq`` byte it
echoes (:attr:`CommandDecoder.seq`), the status byte, and the number of data bytes that
follow on :attr:`ResponseEncoder.data` (at most ``MAX_PAYLOAD − 1``)."""


def _check_limits(payload_limits, max_payload) -> dict[int, tuple[int, int]]:
    if not isinstance(payload_limits, Mapping):
        raise TypeError(f"payload_limits must be a mapping of opcode to (min, max), not "
                        f"{payload_limits!r}")
    limits = {}
    for opcode, bounds in payload_limits.items():
        if isinstance(opcode, bool) or not isinstance(opcode, int) \
                or not 0 < opcode < RESPONSE_FLAG:
            raise ValueError(f"opcode must be an integer in 1..127, not {opcode!r}")
        try:
            low, high = bounds
        except (TypeError, ValueError):
            raise TypeError(f"payload limits of opcode 0x{opcode:02X} must be a (min, max) "
                            f"pair, not {bounds!r}") from None
        if not (isinstance(low, int) and isinstance(high, int)
                and 0 <= low <= high <= max_payload):
            raise ValueError(f"payload limits of opcode 0x{opcode:02X} must satisfy "
                             f"0 <= min <= max <= {max_payload}, not {bounds!r}")
        limits[int(opcode)] = (low, high)
    return limits


class CommandDecoder(wiring.Component):
    """Frame decoder: bytes in; command events and framing errors out.

    Every frame that starts with MAGIC, has an opcode of ``payload_limits`` and a
    length in its range produces, on ``o``, exactly this sequence::

        START, DATA × length (the last one with last=1), then COMMIT or ABORT

    The frame's seq byte (after the length) is latched per frame and given in every event;
    :attr:`seq` holds that of the last *committed* frame, for the response header, so that
    bytes arriving while a command executes cannot change what its response echoes.

    The payload is **streamed, not buffered**: a DATA event is the byte as it arrives, so
    a consumer that writes memory (WRITE_WEIGHTS, …) must treat what it wrote as
    provisional until COMMIT; on ABORT (bad CRC, or the inter-byte timeout in the middle
    of the frame) it discards it. Commands with small payloads are simply executed on
    COMMIT. ``o`` has back-pressure: while the consumer is not ready the decoder does
    not accept input bytes either (the consumer must keep up with the link, or the top
    level adds a FIFO).

    Framing errors are answered on ``error`` (for :class:`ResponseEncoder`), and the
    decoder then hunts for the next MAGIC from the next byte on, as
    :class:`bitdet.core.protocol.FrameParser` does:

    * BAD_LENGTH, as soon as the length has arrived: above ``max_payload``, or outside
      the range of a known opcode (no START is emitted; no seq received, 0 reported);
    * BAD_CRC, after the CRC (an ABORT ends the frame on ``o``);
    * UNKNOWN_OPCODE, after the CRC, for a correct frame with an opcode not in
      ``payload_limits`` (its payload is consumed and dropped; no event on ``o``);
    * TIMEOUT, when ``timeout_cycles`` cycles pass inside a frame without a byte
      arriving (cycles in which the decoder itself stalls do not count), with an ABORT
      if the frame had started on ``o``. So no input can leave the decoder waiting:
      it is back hunting at most ``timeout_cycles`` after the last byte.

    ``error`` holds one error until it is taken; an error found while the previous one is
    still waiting is dropped (the input is never stalled for an error response).

    Parameters
    ----------
    timeout_cycles : int
        Inter-byte timeout inside a frame, in clock cycles (:func:`timeout_cycles`).
    payload_limits : mapping of int to (int, int)
        Known opcodes (1..127) and their payload length ranges; by default
        :data:`bitdet.core.protocol.COMMAND_PAYLOAD_LIMITS`.
    max_payload : int
        Largest length a frame may declare; by default
        :data:`bitdet.core.protocol.MAX_PAYLOAD`.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Bytes from the host.
    o : ``Out(stream.Signature(decoder_event_layout))``
        Command events for the controller.
    error : ``Out(stream.Signature(error_layout))``
        Framing errors, for :attr:`ResponseEncoder.error`.
    seq : ``Out(8)``
        The seq byte of the last committed frame (the response to it echoes it).

    Raises
    ------
    TypeError, ValueError
        If a parameter is of the wrong type or out of range.
    """

    def __init__(self, *, timeout_cycles: int,
                 payload_limits: Mapping[int, tuple[int, int]] = COMMAND_PAYLOAD_LIMITS,
                 max_payload: int = MAX_PAYLOAD):
        if isinstance(timeout_cycles, bool) or not isinstance(timeout_cycles, int):
            raise TypeError(f"timeout_cycles must be an integer, not {timeout_cycles!r}")
        if timeout_cycles < 1:
            raise ValueError(f"timeout_cycles must be at least 1, not {timeout_cycles!r}")
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) \
                or not 0 <= max_payload <= 0xFFFF:
            raise ValueError(f"max_payload must be an integer in 0..65535, not {max_payload!r}")
        self._timeout_cycles = timeout_cycles
        self._max_payload = max_payload
        self._limits = _check_limits(payload_limits, max_payload)
        super().__init__({
            "i": In(stream.Signature(8)),
            "o": Out(stream.Signature(decoder_event_layout)),
            "error": Out(stream.Signature(error_layout)),
            "seq": Out(8),
        })

    @property
    def timeout_cycles(self) -> int:
        return self._timeout_cycles

    @property
    def max_payload(self) -> int:
        return self._max_payload

    @property
    def payload_limits(self) -> dict[int, tuple[int, int]]:
        return dict(self._limits)

    def elaborate(self, platform):
        m = Module()
        i, o, error = self.i, self.o, self.error

        opcode = Signal(8)
        length = Signal(16)
        seq = Signal(8)             # the seq byte of the frame being received
        count = Signal(16)
        crc = Signal(16)
        known = Signal()            # the frame's opcode is in the table (events on `o`)
        commit = Signal()           # END: COMMIT rather than ABORT
        idle = Signal(range(self._timeout_cycles))

        accepted = Signal()
        m.d.comb += accepted.eq(i.valid & i.ready)
        crc_next = Signal(16)
        m.d.comb += crc_next.eq(crc16_update_value(crc, i.payload))

        # Table of the known opcodes, looked up as the last length byte arrives.
        full_length = Signal(16)
        m.d.comb += full_length.eq(Cat(length[:8], i.payload))
        is_known = Signal()
        low = Signal(range(self._max_payload + 1))
        high = Signal(range(self._max_payload + 1))
        with m.Switch(opcode):
            for code, (lo, hi) in sorted(self._limits.items()):
                with m.Case(code):
                    m.d.comb += [is_known.eq(1), low.eq(lo), high.eq(hi)]
        bad_length = Signal()
        m.d.comb += bad_length.eq((full_length > self._max_payload)
                                  | (is_known & ((full_length < low) | (full_length > high))))

        with m.If(error.ready):
            m.d.sync += error.valid.eq(0)

        def report(code, reported_opcode):
            # Drop the new error if the previous one has not been taken yet.
            with m.If(~error.valid | error.ready):
                m.d.sync += [error.valid.eq(1), error.payload.code.eq(code),
                             error.payload.opcode.eq(reported_opcode),
                             error.payload.seq.eq(seq)]

        m.d.comb += [
            o.payload.opcode.eq(opcode),
            o.payload.length.eq(length),
            o.payload.seq.eq(seq),
            o.payload.data.eq(i.payload),
            o.payload.last.eq(count == length - 1),
        ]

        waiting = Signal()          # inside a frame, waiting for a byte (the timeout runs)
        timed_out = Signal()
        m.d.comb += timed_out.eq(waiting & ~i.valid & (idle == self._timeout_cycles - 1))
        with m.If(~waiting | accepted):
            m.d.sync += idle.eq(0)
        with m.Elif(~i.valid):
            m.d.sync += idle.eq(idle + 1)

        with m.FSM():
            with m.State("HUNT"):
                m.d.comb += i.ready.eq(1)
                with m.If(accepted & (i.payload == MAGIC)):
                    m.d.sync += [crc.eq(CRC_INIT), opcode.eq(0), seq.eq(0), known.eq(0)]
                    m.next = "OPCODE"

            for state, field, after in (("OPCODE", opcode, "LENGTH_LOW"),
                                        ("LENGTH_LOW", length[:8], "LENGTH_HIGH")):
                with m.State(state):
                    m.d.comb += [i.ready.eq(1), waiting.eq(1)]
                    with m.If(accepted):
                        m.d.sync += [field.eq(i.payload), crc.eq(crc_next)]
                        m.next = after
                    with m.If(timed_out):
                        report(ErrorCode.TIMEOUT, opcode)
                        m.next = "HUNT"

            with m.State("LENGTH_HIGH"):
                m.d.comb += [i.ready.eq(1), waiting.eq(1)]
                with m.If(accepted):
                    m.d.sync += [length.eq(full_length), crc.eq(crc_next), count.eq(0),
                                 known.eq(is_known)]
                    with m.If(bad_length):
                        report(ErrorCode.BAD_LENGTH, opcode)
                        m.next = "HUNT"
                    with m.Else():
                        m.next = "SEQ"
                with m.If(timed_out):
                    report(ErrorCode.TIMEOUT, opcode)
                    m.next = "HUNT"

            with m.State("SEQ"):
                m.d.comb += [i.ready.eq(1), waiting.eq(1)]
                with m.If(accepted):
                    m.d.sync += [seq.eq(i.payload), crc.eq(crc_next)]
                    with m.If(known):
                        m.next = "START"
                    with m.Elif(length == 0):
                        m.next = "CRC_HIGH"
                    with m.Else():
                        m.next = "PAYLOAD"
                with m.If(timed_out):
                    report(ErrorCode.TIMEOUT, opcode)
                    m.next = "HUNT"

            with m.State("START"):
                m.d.comb += [o.valid.eq(1), o.payload.event.eq(DecoderEvent.START)]
                with m.If(o.ready & (length == 0)):
                    m.next = "CRC_HIGH"
                with m.Elif(o.ready):
                    m.next = "PAYLOAD"

            with m.State("PAYLOAD"):
                m.d.comb += [waiting.eq(1), o.payload.event.eq(DecoderEvent.DATA)]
                with m.If(known):
                    m.d.comb += [o.valid.eq(i.valid), i.ready.eq(o.ready)]
                with m.Else():
                    m.d.comb += i.ready.eq(1)
                with m.If(accepted):
                    m.d.sync += [crc.eq(crc_next), count.eq(count + 1)]
                    with m.If(count == length - 1):
                        m.next = "CRC_HIGH"
                self._on_timeout(m, timed_out, known, commit, opcode, report)

            with m.State("CRC_HIGH"):
                m.d.comb += [i.ready.eq(1), waiting.eq(1)]
                with m.If(accepted):
                    m.d.sync += crc.eq(crc_next)
                    m.next = "CRC_LOW"
                self._on_timeout(m, timed_out, known, commit, opcode, report)

            with m.State("CRC_LOW"):
                m.d.comb += [i.ready.eq(1), waiting.eq(1)]
                with m.If(accepted):
                    crc_ok = crc_next == 0     # the CRC is sent MSB first: residue 0
                    with m.If(known):
                        m.d.sync += commit.eq(crc_ok)
                        with m.If(~crc_ok):
                            report(ErrorCode.BAD_CRC, opcode)
                        m.next = "END"
                    with m.Else():
                        report(Mux(crc_ok, ErrorCode.UNKNOWN_OPCODE, ErrorCode.BAD_CRC), opcode)
                        m.next = "HUNT"
                self._on_timeout(m, timed_out, known, commit, opcode, report)

            with m.State("END"):
                m.d.comb += [o.valid.eq(1),
                             o.payload.event.eq(Mux(commit, DecoderEvent.COMMIT,
                                                    DecoderEvent.ABORT))]
                with m.If(o.ready):
                    with m.If(commit):
                        m.d.sync += self.seq.eq(seq)
                    m.next = "HUNT"
        return m

    @staticmethod
    def _on_timeout(m, timed_out, known, commit, opcode, report):
        with m.If(timed_out):
            report(ErrorCode.TIMEOUT, opcode)
            m.d.sync += commit.eq(0)
            with m.If(known):
                m.next = "END"          # the frame had started on `o`: ABORT it
            with m.Else():
                m.next = "HUNT"


class ResponseEncoder(wiring.Component):
    """Frames responses and error responses onto a byte stream.

    A response is a header on ``response`` followed by ``length`` bytes on ``data``; the
    encoder sends ``MAGIC, RESPONSE_FLAG | opcode, length + 1 (u16 LE), seq, status,
    data…, CRC (u16 BE)``. An error on ``error`` is sent as the error response ``MAGIC,
    ERROR_OPCODE, 2, 0, seq, code, opcode, CRC``. When both wait, ``response`` goes first.
    Headers are taken only between frames; ``data`` is read while the frame is sent, so
    its producer may stall (the link then idles).

    Members
    -------
    response : ``In(stream.Signature(response_layout))``
        Response headers from the controller.
    data : ``In(stream.Signature(8))``
        The response's data bytes, exactly ``length`` of them.
    error : ``In(stream.Signature(error_layout))``
        Framing errors (:attr:`CommandDecoder.error`).
    o : ``Out(stream.Signature(8))``
        Bytes to the host (UART transmitter).
    """

    response: In(stream.Signature(response_layout))
    data: In(stream.Signature(8))
    error: In(stream.Signature(error_layout))
    o: Out(stream.Signature(8))

    def elaborate(self, platform):
        m = Module()
        response, error, o = self.response, self.error, self.o

        opcode = Signal(8)
        seq = Signal(8)
        status = Signal(8)
        frame_length = Signal(16)               # the length field: data bytes + status
        detail = Signal(8)                      # the data byte of an error response
        from_error = Signal()
        count = Signal(16)
        crc = Signal(16)

        sent = Signal()
        m.d.comb += sent.eq(o.valid & o.ready)
        crc_next = Signal(16)
        m.d.comb += crc_next.eq(crc16_update_value(crc, o.payload))

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += [response.ready.eq(1), error.ready.eq(~response.valid)]
                with m.If(response.valid):
                    m.d.sync += [opcode.eq(response.payload.opcode | RESPONSE_FLAG),
                                 seq.eq(response.payload.seq),
                                 status.eq(response.payload.status),
                                 frame_length.eq(response.payload.length + 1),
                                 from_error.eq(0)]
                    m.next = "MAGIC"
                with m.Elif(error.valid):
                    m.d.sync += [opcode.eq(ERROR_OPCODE),
                                 seq.eq(error.payload.seq),
                                 status.eq(error.payload.code),
                                 frame_length.eq(2),
                                 detail.eq(error.payload.opcode),
                                 from_error.eq(1)]
                    m.next = "MAGIC"

            def send(state, value, after, *, crc_update=True):
                with m.State(state):
                    m.d.comb += [o.valid.eq(1), o.payload.eq(value)]
                    with m.If(sent):
                        if crc_update:
                            m.d.sync += crc.eq(crc_next)
                        m.next = after

            with m.State("MAGIC"):
                m.d.comb += [o.valid.eq(1), o.payload.eq(MAGIC)]
                with m.If(sent):
                    m.d.sync += [crc.eq(CRC_INIT), count.eq(1)]
                    m.next = "OPCODE"
            send("OPCODE", opcode, "LENGTH_LOW")
            send("LENGTH_LOW", frame_length[:8], "LENGTH_HIGH")
            send("LENGTH_HIGH", frame_length[8:], "SEQ")
            send("SEQ", seq, "STATUS")

            with m.State("STATUS"):
                m.d.comb += [o.valid.eq(1), o.payload.eq(status)]
                with m.If(sent):
                    m.d.sync += crc.eq(crc_next)
                    with m.If(frame_length == 1):
                        m.next = "CRC_HIGH"
                    with m.Else():
                        m.next = "DATA"

            with m.State("DATA"):
                with m.If(from_error):
                    m.d.comb += [o.valid.eq(1), o.payload.eq(detail)]
                with m.Else():
                    m.d.comb += [o.valid.eq(self.data.valid), o.payload.eq(self.data.payload),
                                 self.data.ready.eq(o.ready)]
                with m.If(sent):
                    m.d.sync += [crc.eq(crc_next), count.eq(count + 1)]
                    with m.If(count == frame_length - 1):
                        m.next = "CRC_HIGH"

            send("CRC_HIGH", crc[8:], "CRC_LOW", crc_update=False)
            send("CRC_LOW", crc[:8], "IDLE", crc_update=False)
        return m
