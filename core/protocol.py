"""Host-link framing: the one implementation of the command protocol.

The host driver, the emulator and the tests import this module; the hardware decoder
(:mod:`bitdet.hw.decoder`) derives its CRC network and its opcode/length table from it
and is tested against :class:`FrameParser`. The format is documented in
``docs/protocol.md``.

Frame (both directions)::

    MAGIC | opcode | length (u16 LE) | seq | payload (length bytes) | CRC (u16 BIG-endian)

``CRC`` is CRC-16/IBM-3740 (a.k.a. CRC-16/CCITT-FALSE: polynomial 0x1021, init 0xFFFF,
no reflection, no final XOR) over ``opcode``, ``length``, ``seq`` and ``payload``. It is
sent most significant byte first, so that running the same CRC over the whole frame after
MAGIC, CRC bytes included, leaves 0: the decoder checks that residue and needs no
comparator against a stored CRC. :data:`MAX_PAYLOAD` keeps every frame short enough for
the CRC to detect all 1-, 2- and 3-bit errors.

``seq`` is the host's sequence byte: the device echoes it in the response to the command
(and in an error response to a frame that had got as far as its seq byte), so that the
host can tell the answer to the command it waits for from a late or stale one. Hosts use
1 … 255; 0 in a response means "no seq received".

Responses use the same frame. A response to command ``op`` has opcode
``RESPONSE_FLAG | op`` and a payload of one status byte (:class:`ErrorCode`) followed by
the reply data. Errors found while framing (bad CRC, unknown opcode, bad length,
timeout) are answered by an *error response* with opcode :data:`ERROR_OPCODE` and the
payload ``[code, offending opcode byte]`` (0x00 when no opcode byte had arrived).
"""

from __future__ import annotations

import enum
import struct
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .descriptor import EXTENDED_DESCRIPTOR_SIZE, LAYER_DESCRIPTOR_SIZE, LayerDescriptor

__all__ = [
    "COMMAND_PAYLOAD_LIMITS",
    "COUNTERS_SIZE",
    "CRC_CHECK",
    "CRC_COVERED_HEADER",
    "CRC_INIT",
    "CRC_PERIOD",
    "CRC_POLY",
    "ERROR_OPCODE",
    "FRAME_OVERHEAD",
    "LAYER_DESCRIPTOR_SIZE",
    "LAYER_FLAG_PAD_BIT",
    "LAYER_FLAG_POOL",
    "LAYER_FLAG_RAW",
    "LAYER_TABLE_ENTRIES",
    "MAGIC",
    "MAX_PAYLOAD",
    "NOT_REPEATABLE",
    "PROTOCOL_VERSION",
    "RESENDABLE",
    "RESPONSE_FLAG",
    "TIMEOUT_BYTE_TIMES",
    "DeviceError",
    "ErrorCode",
    "Frame",
    "FrameError",
    "FrameParser",
    "HostSession",
    "IdentifyReply",
    "Opcode",
    "ProtocolError",
    "Response",
    "crc16",
    "crc16_update",
    "decode_counters",
    "decode_layer",
    "decode_layer_entry",
    "encode_error",
    "encode_frame",
    "encode_layer",
    "encode_read",
    "encode_response",
    "encode_thresholds",
    "encode_weights",
    "encode_write",
    "parse_response",
    "read_chunk_words",
    "threshold_entry_bytes",
    "weight_entry_bytes",
    "write_chunk_bytes",
    "write_cost",
]

MAGIC = 0xB1
"""First byte of every frame; the decoder hunts for it after an error."""

PROTOCOL_VERSION = 2
"""Reported by IDENTIFY; bumped on any incompatible change of this module (2: the seq
byte, MAX_PAYLOAD capped for the CRC)."""

CRC_PERIOD = 32767
"""Order of ``x`` modulo the CRC polynomial: 0x1021 is ``(x + 1)·p(x)`` with ``p``
primitive of degree 15, so two bit flips ``d`` bits apart escape the CRC exactly when
``d`` is a multiple of 32767 (odd numbers of flips never do, by the ``x + 1`` factor). In
a codeword (CRC-covered bits plus the 16 CRC bits) of at most 32767 bits every 1-, 2-
and 3-bit error is detected."""

CRC_COVERED_HEADER = 4
"""Header bytes the CRC covers besides the payload: opcode, length (2), seq."""

MAX_PAYLOAD = (CRC_PERIOD - 16) // 8 - CRC_COVERED_HEADER
"""Largest payload of any frame, in bytes (a response's status byte counts): 4089, the
most for which a whole frame's codeword, ``8·(CRC_COVERED_HEADER + length) + 16`` bits,
stays within :data:`CRC_PERIOD`. The hardware decoder takes its limit from here."""

RESPONSE_FLAG = 0x80
"""Set in the opcode of a response; command opcodes are below 0x80."""

ERROR_OPCODE = 0xFF
"""Opcode of an error response to a frame the decoder could not accept."""

TIMEOUT_BYTE_TIMES = 1024
"""Inter-byte timeout of the device inside a frame, in byte times (10 bit periods):
about 89 ms at 115200 Bd. A frame that stalls longer is dropped with TIMEOUT."""

CRC_POLY = 0x1021
CRC_INIT = 0xFFFF
CRC_CHECK = 0x29B1
"""CRC of ``b"123456789"`` (the catalogue's check value of CRC-16/IBM-3740)."""

HEADER_SIZE = 5          # MAGIC, opcode, length, seq
CRC_SIZE = 2
FRAME_OVERHEAD = HEADER_SIZE + CRC_SIZE
"""Bytes of a frame besides its payload (7)."""


class Opcode(enum.IntEnum):
    """Commands of the accelerator (all below :data:`RESPONSE_FLAG`; 0x00 is reserved)."""

    IDENTIFY = 0x01
    RESET = 0x02
    WRITE_WEIGHTS = 0x10
    WRITE_THRESHOLDS = 0x11
    WRITE_ACTIVATIONS = 0x12
    CONFIGURE_LAYER = 0x20
    RUN_LAYER = 0x21
    RUN_NETWORK = 0x22
    READ_ACTIVATIONS = 0x30
    READ_RESULTS = 0x31
    READ_COUNTERS = 0x32


class ErrorCode(enum.IntEnum):
    """Status byte of a response. 0x01–0x0F: framing (decoder); 0x10 up: execution."""

    OK = 0x00
    BAD_CRC = 0x01
    UNKNOWN_OPCODE = 0x02
    BAD_LENGTH = 0x03
    TIMEOUT = 0x04
    LAYER_DOES_NOT_FIT = 0x10
    BAD_ADDRESS = 0x11
    BAD_ARGUMENT = 0x12
    NOT_CONFIGURED = 0x13
    BUSY = 0x14


#: Payload length range ``(min, max)`` of each command, checked by the decoder as soon
#: as the length field has arrived (a length outside it is answered with BAD_LENGTH).
#: Commands with an address carry it as the first 4 bytes (u32 LE); the rest of each
#: layout is defined by the layer controller (docs/protocol.md).
COMMAND_PAYLOAD_LIMITS: dict[int, tuple[int, int]] = {
    Opcode.IDENTIFY: (0, 0),
    Opcode.RESET: (0, 0),
    Opcode.WRITE_WEIGHTS: (5, MAX_PAYLOAD),
    Opcode.WRITE_THRESHOLDS: (5, MAX_PAYLOAD),
    Opcode.WRITE_ACTIVATIONS: (5, MAX_PAYLOAD),
    Opcode.CONFIGURE_LAYER: (1, 64),
    Opcode.RUN_LAYER: (0, 1),
    Opcode.RUN_NETWORK: (1, 1),
    Opcode.READ_ACTIVATIONS: (6, 6),
    Opcode.READ_RESULTS: (6, 6),
    Opcode.READ_COUNTERS: (0, 0),
}


# -- CRC ---------------------------------------------------------------------------------------

def _crc16_bitwise(crc: int, byte: int) -> int:
    crc ^= byte << 8
    for _ in range(8):
        crc = ((crc << 1) ^ CRC_POLY if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


_CRC_TABLE = tuple(_crc16_bitwise(0, n) for n in range(256))


def crc16_update(crc: int, byte: int) -> int:
    """One byte of CRC-16/IBM-3740: the register after shifting in ``byte``, MSB first.

    The function is linear over GF(2) in ``(crc, byte)``; the hardware CRC network is
    generated from it (:func:`bitdet.hw.decoder.crc16_update_value`).
    """
    return ((crc << 8) & 0xFF00) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]


def crc16(data: bytes | Iterable[int], crc: int = CRC_INIT) -> int:
    """CRC-16/IBM-3740 of ``data`` (``crc16(b"123456789") == 0x29B1``)."""
    for byte in data:
        crc = ((crc << 8) & 0xFF00) ^ _CRC_TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


# -- encoding ----------------------------------------------------------------------------------

def encode_frame(opcode: int, payload: bytes = b"", *, seq: int = 0) -> bytes:
    """The bytes of one frame carrying ``payload`` under ``opcode`` with sequence byte
    ``seq``.

    Raises
    ------
    ValueError
        If ``opcode`` or ``seq`` is not a byte or ``payload`` is longer than
        :data:`MAX_PAYLOAD`.
    """
    if isinstance(opcode, bool) or not isinstance(opcode, int) or not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode must be an integer in 0..255, not {opcode!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= 0xFF:
        raise ValueError(f"seq must be an integer in 0..255, not {seq!r}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    body = struct.pack("<BHB", opcode, len(payload), seq) + payload
    return bytes([MAGIC]) + body + crc16(body).to_bytes(2, "big")


def encode_response(opcode: int, status: int = ErrorCode.OK, data: bytes = b"", *,
                    seq: int = 0) -> bytes:
    """A response frame to command ``opcode`` with sequence byte ``seq``:
    ``[status, *data]`` under ``RESPONSE_FLAG | opcode``, seq echoed."""
    if not 0 <= opcode < RESPONSE_FLAG:
        raise ValueError(f"command opcode must be in 0..127, not {opcode!r}")
    return encode_frame(RESPONSE_FLAG | opcode, bytes([ErrorCode(status)]) + bytes(data),
                        seq=seq)


def encode_error(code: int, opcode: int = 0, *, seq: int = 0) -> bytes:
    """An error response (opcode :data:`ERROR_OPCODE`, payload ``[code, opcode]``) to a
    frame whose seq byte was ``seq`` (0 if it broke off before it)."""
    return encode_frame(ERROR_OPCODE, bytes([ErrorCode(code), opcode]), seq=seq)


# -- parsing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A frame with a correct CRC (and, for a command parser, a known opcode)."""

    opcode: int
    payload: bytes
    seq: int = 0


@dataclass(frozen=True)
class FrameError:
    """A frame the parser dropped: the code its error response carries, and the opcode
    and seq bytes it had received (0 if none)."""

    code: ErrorCode
    opcode: int
    seq: int = 0


class FrameParser:
    """Incremental frame parser with the resync rules of the hardware decoder.

    Bytes outside a frame are skipped until :data:`MAGIC`. After MAGIC come the opcode,
    the length (checked at once: above ``max_payload``, or, for an opcode in
    ``payload_limits``, outside its range, is BAD_LENGTH), the seq byte, the payload and
    the CRC. A CRC
    residue other than 0 is BAD_CRC; a correct frame whose opcode is not in
    ``payload_limits`` is UNKNOWN_OPCODE (so the corrupt opcode of a damaged frame is
    reported as BAD_CRC). After an error the parser hunts for MAGIC from the next byte
    on: it never re-reads bytes it has consumed, exactly as the hardware, which has no
    buffer to re-read them from.

    Parameters
    ----------
    payload_limits : mapping of int to (int, int), or None
        Known opcodes and their payload length ranges; ``None`` accepts any opcode (a
        host parsing responses). The default is :data:`COMMAND_PAYLOAD_LIMITS`.
    max_payload : int
        Largest length any frame may declare.
    """

    def __init__(self, *, payload_limits: Mapping[int, tuple[int, int]] | None
                 = COMMAND_PAYLOAD_LIMITS, max_payload: int = MAX_PAYLOAD):
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) \
                or not 0 <= max_payload <= 0xFFFF:
            raise ValueError(f"max_payload must be an integer in 0..65535, not {max_payload!r}")
        self._limits = None if payload_limits is None else dict(payload_limits)
        self._max_payload = max_payload
        self._hunting = True                # looking for MAGIC
        self._buffer = bytearray()          # opcode, length, seq, payload, CRC so far

    @property
    def in_frame(self) -> bool:
        """A MAGIC has been seen and its frame is not complete yet."""
        return not self._hunting

    def _hunt(self):
        self._hunting = True
        self._buffer = bytearray()

    def feed(self, data: bytes | Iterable[int]) -> list[Frame | FrameError]:
        """Consume ``data``; return the frames and errors it completed, in order."""
        events: list[Frame | FrameError] = []
        for byte in bytes(data):
            event = self._feed_byte(byte)
            if event is not None:
                events.append(event)
        return events

    def _feed_byte(self, byte: int) -> Frame | FrameError | None:
        if self._hunting:
            if byte == MAGIC:
                self._hunting = False
                self._buffer = bytearray()
            return None
        buf = self._buffer
        buf.append(byte)
        if len(buf) == 3:
            opcode, length = buf[0], buf[1] | buf[2] << 8
            limits = None if self._limits is None else self._limits.get(opcode)
            if length > self._max_payload or (limits is not None
                                              and not limits[0] <= length <= limits[1]):
                self._hunt()
                return FrameError(ErrorCode.BAD_LENGTH, opcode)
            return None
        body = CRC_COVERED_HEADER
        if len(buf) < body or len(buf) < body + (buf[1] | buf[2] << 8) + CRC_SIZE:
            return None
        opcode, seq, payload = buf[0], buf[3], bytes(buf[body:-CRC_SIZE])
        residue = crc16(buf)
        self._hunt()
        if residue != 0:
            return FrameError(ErrorCode.BAD_CRC, opcode, seq)
        if self._limits is not None and opcode not in self._limits:
            return FrameError(ErrorCode.UNKNOWN_OPCODE, opcode, seq)
        return Frame(opcode, payload, seq)

    def expire(self) -> FrameError | None:
        """The inter-byte timeout ran out: drop a partial frame (TIMEOUT), else nothing."""
        if self._hunting:
            return None
        opcode = self._buffer[0] if self._buffer else 0
        seq = self._buffer[3] if len(self._buffer) > 3 else 0
        self._hunt()
        return FrameError(ErrorCode.TIMEOUT, opcode, seq)


# -- host side ---------------------------------------------------------------------------------

class ProtocolError(Exception):
    """The device's reply is not a well-formed response to the command sent (bad CRC,
    wrong opcode, truncated, or no reply at all)."""


class DeviceError(Exception):
    """The device answered with a status other than OK.

    Members
    -------
    code : ErrorCode or int
        The status byte (an :class:`ErrorCode` when known).
    opcode : int
        The command opcode the error refers to (for a framing error, the opcode byte the
        decoder had received, 0 if none).
    """

    def __init__(self, code: int, opcode: int = 0):
        try:
            code = ErrorCode(code)
            name = code.name
        except ValueError:
            name = f"unknown status 0x{code:02X}"
        try:
            op_name = Opcode(opcode).name
        except ValueError:
            op_name = f"0x{opcode:02X}"
        super().__init__(f"device error {name} (command {op_name})")
        self.code = code
        self.opcode = opcode


@dataclass(frozen=True)
class Response:
    """A decoded response frame.

    ``opcode`` is the command it answers (without :data:`RESPONSE_FLAG`); ``framing`` is
    true for an error response of the decoder (opcode :data:`ERROR_OPCODE`); ``seq`` the
    sequence byte echoed (that of the frame the error response is about, 0 if none).
    """

    opcode: int
    status: int
    data: bytes
    framing: bool = False
    seq: int = 0

    @property
    def ok(self) -> bool:
        return self.status == ErrorCode.OK

    def raise_for_status(self) -> Response:
        """Return ``self`` if OK, else raise :class:`DeviceError`."""
        if not self.ok:
            raise DeviceError(self.status, self.opcode)
        return self


def parse_response(frame: Frame) -> Response:
    """Decode a frame received from the device (does not raise on a non-OK status).

    Raises
    ------
    ProtocolError
        If the frame is not a response (no status byte, or an opcode without
        :data:`RESPONSE_FLAG`), or an error response with a payload other than 2 bytes.
    """
    if frame.opcode == ERROR_OPCODE:
        if len(frame.payload) != 2:
            raise ProtocolError(f"error response with {len(frame.payload)} payload bytes, "
                                f"expected 2")
        return Response(frame.payload[1], frame.payload[0], b"", framing=True,
                        seq=frame.seq)
    if not frame.opcode & RESPONSE_FLAG:
        raise ProtocolError(f"frame with opcode 0x{frame.opcode:02X} is not a response")
    if not frame.payload:
        raise ProtocolError(f"response 0x{frame.opcode:02X} without a status byte")
    return Response(frame.opcode & ~RESPONSE_FLAG & 0xFF, frame.payload[0], frame.payload[1:],
                    seq=frame.seq)


@dataclass(frozen=True)
class IdentifyReply:
    """Data of the IDENTIFY response (after the status byte), 11 bytes::

        version (u8) | max_payload (u16 LE) | config hash (8 bytes)

    ``config_hash`` is :meth:`bitdet.core.config.AcceleratorConfig.config_hash` (16 hex
    digits) as 8 raw bytes, most significant first.
    """

    version: int
    max_payload: int
    config_hash: str

    SIZE = 11

    @classmethod
    def for_config(cls, config) -> IdentifyReply:
        """The reply a device built from ``config`` (an AcceleratorConfig) gives."""
        return cls(PROTOCOL_VERSION, MAX_PAYLOAD, config.config_hash())

    def pack(self) -> bytes:
        digest = bytes.fromhex(self.config_hash)
        if len(digest) != 8:
            raise ValueError(f"config_hash must be 16 hex digits, not {self.config_hash!r}")
        return struct.pack("<BH", self.version, self.max_payload) + digest

    @classmethod
    def unpack(cls, data: bytes) -> IdentifyReply:
        if len(data) != cls.SIZE:
            raise ProtocolError(f"IDENTIFY reply of {len(data)} bytes, expected {cls.SIZE}")
        version, max_payload = struct.unpack_from("<BH", data)
        return cls(version, max_payload, bytes(data[3:]).hex())


# -- the host session --------------------------------------------------------------------------

#: Commands the session does not repeat after a missing response: a lost RUN_* response
#: may mean the device ran it (and flipped its banks), docs/protocol.md.
NOT_REPEATABLE = frozenset({Opcode.RUN_LAYER, Opcode.RUN_NETWORK})

#: Error responses that prove the frame was dropped unexecuted: the session resends it.
RESENDABLE = frozenset({ErrorCode.BAD_CRC, ErrorCode.TIMEOUT})


def write_chunk_bytes(entry_bytes: int) -> int:
    """Data bytes per WRITE_* frame: the most whole entries of ``entry_bytes`` that fit
    beside the 4-byte address in :data:`MAX_PAYLOAD`."""
    if isinstance(entry_bytes, bool) or not isinstance(entry_bytes, int) \
            or not 1 <= entry_bytes <= MAX_PAYLOAD - 4:
        raise ValueError(f"entry_bytes must be an integer in 1 … {MAX_PAYLOAD - 4}, not "
                         f"{entry_bytes!r}")
    return (MAX_PAYLOAD - 4) // entry_bytes * entry_bytes


def write_cost(data_bytes: int, entry_bytes: int) -> int:
    """Host → device bytes of the WRITE_* frames that carry ``data_bytes`` as
    :meth:`HostSession.write_memory` splits them (address and framing included)."""
    return data_bytes + -(-data_bytes // write_chunk_bytes(entry_bytes)) * (4 + FRAME_OVERHEAD)


def read_chunk_words(word_bytes: int) -> int:
    """Words per READ_ACTIVATIONS frame: the most whose bytes fit a response beside its
    status byte (``MAX_PAYLOAD − 1``)."""
    if isinstance(word_bytes, bool) or not isinstance(word_bytes, int) \
            or not 1 <= word_bytes <= MAX_PAYLOAD - 1:
        raise ValueError(f"word_bytes must be an integer in 1 … {MAX_PAYLOAD - 1}, not "
                         f"{word_bytes!r}")
    return (MAX_PAYLOAD - 1) // word_bytes


class HostSession:
    """The host's side of the link: one command at a time, each answered or failed.

    The one implementation of the host's framing, used by the driver
    (:class:`bitdet.sw.driver.session.Session`, which raises the driver's typed errors)
    and by the simulation's layer runs (:mod:`bitdet.sim.layer`). It owns

    * **sequence numbers**: every frame it sends carries a fresh seq (1 … 255, then 1
      again), and only a response that echoes that seq *and* the command's opcode is
      taken as the answer; any other (a late reply to an earlier command, a reply to a
      frame the device pieced together from noise, a corrupt frame) is discarded
      (:attr:`stale`). So a late reply is never taken for a later command's;
    * **retries**: a frame the device dropped as damaged (an error response BAD_CRC or
      TIMEOUT echoing the frame's seq and opcode) was not executed and is resent, up to
      :attr:`retries` times, each time under a new seq; a command without an answer
      within ``timeout`` is resent too unless it is in :data:`NOT_REPEATABLE` (RUN_*);
    * **resynchronisation**: after any failure the next command first waits until the
      line has been quiet for the device's inter-byte timeout (``frame_timeout``; a
      partial frame in the device's decoder expires, docs/protocol.md) and drops what
      came meanwhile, so after garbage, a timeout or a device reset the next command
      goes to a decoder that hunts for MAGIC;
    * **chunking**: :meth:`write_memory` and :meth:`read_activations` split transfers
      into frames of at most :data:`MAX_PAYLOAD` (:func:`write_chunk_bytes`,
      :func:`read_chunk_words`);
    * **one command in flight** (contract 2): :meth:`send` sends a RUN without waiting,
      commands go on through :meth:`command` meanwhile (WRITE_ACTIVATIONS into idle
      slots), and :meth:`await_reply` takes the RUN's answer, which may have come while
      another command waited (replies that echo an outstanding seq are kept, not counted
      stale). With nothing outstanding every path is exactly the one-at-a-time one.

    Parameters
    ----------
    link : object with ``write(data)``, ``read(n, timeout)`` (raises a
        :class:`TimeoutError` when fewer than ``n`` bytes come) and ``close()``
    timeout : float
        Seconds to wait for a command's response.
    frame_timeout : float or None
        Seconds of silence after which the device drops a partial frame; default the
        link's ``frame_timeout`` attribute, else 1024 byte times at 115200 Bd.
    port_name : str or None
        Named in error messages (default: the link's ``name``).

    Members
    -------
    bytes_out, bytes_in : int
        Link traffic so far (resends and discarded bytes included).
    stale : int
        Frames received and discarded as not the awaited answer.
    resyncs : int
        Resynchronisations so far.
    """

    retries = 2
    #: Resynchronisation waits this many times ``frame_timeout`` of silence.
    quiet_margin = 1.5

    def __init__(self, link, *, timeout: float = 2.0, frame_timeout: float | None = None,
                 port_name: str | None = None):
        self.link = link
        self.timeout = timeout
        if frame_timeout is None:
            frame_timeout = getattr(link, "frame_timeout", None)
        self.frame_timeout = (TIMEOUT_BYTE_TIMES * 10 / 115200 if frame_timeout is None
                              else float(frame_timeout))
        self.port_name = port_name or getattr(link, "name", type(link).__name__)
        self.bytes_out = 0
        self.bytes_in = 0
        self.stale = 0
        self.resyncs = 0
        self._seq = 0
        self._dirty = False
        self._outstanding: dict[int, int] = {}      # seq → opcode of a frame from send()
        self._replies: dict[int, Response] = {}     # replies to them, come early

    # -- the errors it raises (the driver's session raises its own types) ------------------
    def _timeout_error(self, message: str) -> Exception:
        return TimeoutError(message)

    def _status_error(self, code: int, opcode: int) -> Exception:
        return DeviceError(code, opcode)

    # -- commands ---------------------------------------------------------------------------
    @property
    def seq(self) -> int:
        """The seq of the last frame sent (0 before the first)."""
        return self._seq

    def _next_seq(self) -> int:
        self._seq = self._seq % 255 + 1
        while self._seq in self._outstanding:        # never reuse an outstanding seq
            self._seq = self._seq % 255 + 1
        return self._seq

    @property
    def outstanding(self) -> dict[int, int]:
        """``{seq: opcode}`` of the frames :meth:`send` sent whose reply has not been
        taken with :meth:`await_reply`."""
        return dict(self._outstanding)

    def send(self, opcode: int, payload: bytes = b"") -> int:
        """Send one command without waiting for its answer; its seq, for
        :meth:`await_reply`. Meanwhile other commands may go through :meth:`command`
        (a contract-2 device runs a WRITE_ACTIVATIONS into idle slots during a RUN,
        docs/protocol.md): a reply that echoes an outstanding seq is kept for it, not
        discarded as stale. A frame from :meth:`send` is never resent."""
        if self._dirty and not self._outstanding:
            self.resync()
        seq = self._next_seq()
        frame = encode_frame(opcode, bytes(payload), seq=seq)
        self.link.write(frame)
        self.bytes_out += len(frame)
        self._outstanding[seq] = opcode
        return seq

    def await_reply(self, seq: int, *, timeout: float | None = None,
                    check: bool = True) -> bytes:
        """The response data of the frame :meth:`send` sent under ``seq`` (taken from the
        replies kept meanwhile, or awaited now).

        Raises
        ------
        DeviceError
            The frame was dropped (an error response), or (with ``check``) the device
            answered a status other than OK (BUSY: it was running another command).
        TimeoutError
            No answer within ``timeout``.
        """
        if seq not in self._outstanding:
            raise ValueError(f"seq {seq!r} is not outstanding (send() it first)")
        timeout = self.timeout if timeout is None else timeout
        opcode = self._outstanding[seq]
        try:
            response = self._replies.pop(seq, None)
            if response is None:
                response = self._await(opcode, seq, timeout, False)
        except TimeoutError as e:
            self._dirty = True
            name = Opcode(opcode).name if opcode in Opcode._value2member_map_ \
                else f"0x{opcode:02X}"
            raise self._timeout_error(f"no answer from the device on {self.port_name} "
                                      f"to {name} within {timeout:g} s ({e})") from None
        finally:
            self._outstanding.pop(seq, None)
        if response.framing:
            self._dirty = True
            raise self._status_error(response.status, response.opcode)
        if check and not response.ok:
            raise self._status_error(response.status, opcode)
        return response.data

    def command(self, opcode: int, payload: bytes = b"", *, timeout: float | None = None,
                check: bool = True, repeat: bool | None = None) -> bytes:
        """Send one command and return its response data.

        Raises
        ------
        DeviceError
            (with ``check``) the device answered a status other than OK, or dropped the
            frame ``retries + 1`` times (the error response's code).
        TimeoutError
            No answer within ``timeout`` (after the retries allowed by ``repeat``,
            default: not for :data:`NOT_REPEATABLE`).
        """
        response = self.request(opcode, payload, timeout=timeout, repeat=repeat)
        if check and not response.ok:
            raise self._status_error(response.status, opcode)
        return response.data

    def request(self, opcode: int, payload: bytes = b"", *, timeout: float | None = None,
                repeat: bool | None = None) -> Response:
        """:meth:`command` without the status check: the response (OK or not)."""
        timeout = self.timeout if timeout is None else timeout
        repeat = opcode not in NOT_REPEATABLE if repeat is None else repeat
        payload = bytes(payload)
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            if self._dirty:
                self.resync()
            seq = self._next_seq()
            frame = encode_frame(opcode, payload, seq=seq)
            self.link.write(frame)
            self.bytes_out += len(frame)
            try:
                response = self._await(opcode, seq, timeout, repeat)
            except TimeoutError as e:
                self._dirty = True
                if repeat and not last:
                    continue
                name = Opcode(opcode).name if opcode in Opcode._value2member_map_ \
                    else f"0x{opcode:02X}"
                raise self._timeout_error(f"no answer from the device on {self.port_name} "
                                          f"to {name} within {timeout:g} s ({e})") from None
            if response.framing:
                self._dirty = True
                if response.status in RESENDABLE and not last:
                    continue
                raise self._status_error(response.status, response.opcode)
            return response
        raise AssertionError("unreachable")          # pragma: no cover

    def _await(self, opcode: int, seq: int, timeout: float, repeat: bool) -> Response:
        """The response echoing ``seq`` and ``opcode``; others are discarded. After a
        stale error response (the device dropped a frame, maybe this one) a repeatable
        command waits only until the line has been quiet for the resync time: the device
        would have started its answer by then, or the frame was lost."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._receive_frame(deadline)
            try:
                response = None if frame is None else parse_response(frame)
            except ProtocolError:
                response = None
            if response is not None and response.seq == seq and response.opcode == opcode:
                return response
            if response is not None and response.seq != seq \
                    and self._outstanding.get(response.seq) == response.opcode:
                self._replies[response.seq] = response   # an outstanding send()'s reply
                continue
            self.stale += 1
            if repeat and (response is None or response.framing):
                deadline = min(deadline, time.monotonic()
                               + self.frame_timeout * self.quiet_margin)

    def _receive_frame(self, deadline: float) -> Frame | None:
        """The next frame from the link (None for a corrupt one). TimeoutError when no
        frame has started by ``deadline``; a frame that has started gets ``timeout`` more
        seconds to arrive in full."""

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        while True:                                    # hunt for MAGIC
            byte = self.link.read(1, left())
            self.bytes_in += 1
            if byte[0] == MAGIC:
                break
        header = self.link.read(HEADER_SIZE - 1, self.timeout)
        self.bytes_in += len(header)
        length = header[1] | header[2] << 8
        if length > MAX_PAYLOAD:
            return None
        rest = self.link.read(length + CRC_SIZE, self.timeout)
        self.bytes_in += len(rest)
        events = FrameParser(payload_limits=None).feed(bytes([MAGIC]) + header + rest)
        return events[0] if len(events) == 1 and isinstance(events[0], Frame) else None

    def resync(self) -> None:
        """Wait until the line has been quiet for ``quiet_margin · frame_timeout`` (the
        device's decoder is hunting for MAGIC again) and drop what came meanwhile."""
        quiet = self.frame_timeout * self.quiet_margin
        drained = 0
        while drained < 4 * (MAX_PAYLOAD + FRAME_OVERHEAD):
            try:
                self.link.read(1, quiet)
            except TimeoutError:
                break
            drained += 1
        self.bytes_in += drained
        self.resyncs += 1
        self._dirty = False

    def exchange(self, data: bytes, *, timeout: float | None = None) -> Response:
        """Write raw bytes (a test's malformed or hand-made frame) and return the next
        response frame whatever its seq.

        Raises
        ------
        ProtocolError
            If what comes is not a well-formed response frame.
        """
        timeout = self.timeout if timeout is None else timeout
        self.link.write(bytes(data))
        self.bytes_out += len(data)
        frame = self._receive_frame(time.monotonic() + timeout)
        if frame is None:
            raise ProtocolError("a corrupt response frame")
        return parse_response(frame)

    # -- transfers ----------------------------------------------------------------------------
    def write_memory(self, opcode: int, address: int, data: bytes, entry_bytes: int) -> None:
        """WRITE_* of ``data`` from entry ``address``, in frames of whole entries."""
        per_frame = write_chunk_bytes(entry_bytes)
        for offset in range(0, len(data), per_frame):
            self.command(opcode, encode_write(address + offset // entry_bytes,
                                              data[offset:offset + per_frame]))

    def read_activations(self, address: int, words: int, word_bytes: int) -> bytes:
        """``words`` words of ``word_bytes`` from ``address`` (READ_ACTIVATIONS), in as
        many frames as :data:`MAX_PAYLOAD` needs."""
        per_frame = read_chunk_words(word_bytes)
        out = bytearray()
        for start in range(0, words, per_frame):
            count = min(per_frame, words - start)
            data = self.command(Opcode.READ_ACTIVATIONS, encode_read(address + start, count))
            if len(data) != count * word_bytes:
                raise ProtocolError(f"READ_ACTIVATIONS of {count} words answered "
                                    f"{len(data)} bytes, expected {count * word_bytes}")
            out += data
        return bytes(out)


# -- command payloads (layouts in docs/protocol.md, executed by bitdet.hw.top) ---------------

LAYER_FLAG_PAD_BIT = 0x01
LAYER_FLAG_RAW = 0x02
LAYER_FLAG_POOL = 0x04
"""CONFIGURE_LAYER flags bit 2: the descriptor is a binary max-pool pass (the OR of each
``kernel × kernel`` window, docs/protocol.md), not a convolution."""

LAYER_TABLE_ENTRIES = 16
"""Entries of the device's layer table (CONFIGURE_LAYER with a leading index, RUN_LAYER's
index, RUN_NETWORK's count). A constant of the protocol until the accelerator config has
a field for it."""

COUNTERS_SIZE = 8
"""Bytes of the RUN_LAYER, RUN_NETWORK and READ_COUNTERS response data: busy u32 LE, stall
u32 LE."""


def encode_write(address: int, data: bytes) -> bytes:
    """Payload of a WRITE_* command: ``address`` (u32 LE, in entries of that memory) then
    the entries' bytes (at most ``MAX_PAYLOAD − 4``)."""
    if isinstance(address, bool) or not isinstance(address, int) \
            or not 0 <= address <= 0xFFFFFFFF:
        raise ValueError(f"address must be an integer in 0 … 2**32 − 1, not {address!r}")
    data = bytes(data)
    if not 1 <= len(data) <= MAX_PAYLOAD - 4:
        raise ValueError(f"a write carries 1 … {MAX_PAYLOAD - 4} data bytes, not {len(data)}")
    return struct.pack("<I", address) + data


def encode_read(address: int, count: int) -> bytes:
    """Payload of READ_ACTIVATIONS / READ_RESULTS: address u32 LE, count u16 LE (words)."""
    if isinstance(address, bool) or not isinstance(address, int) \
            or not 0 <= address <= 0xFFFFFFFF:
        raise ValueError(f"address must be an integer in 0 … 2**32 − 1, not {address!r}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 0xFFFF:
        raise ValueError(f"count must be an integer in 0 … 65535, not {count!r}")
    return struct.pack("<IH", address, count)


def weight_entry_bytes(simd: int, cols: int) -> int:
    """Bytes of one weight-memory entry on the link: ``cols`` words of ``simd / 8`` bytes."""
    return cols * (simd // 8)


def threshold_entry_bytes(threshold_width: int, thresholds_per_channel: int, cols: int) -> int:
    """Bytes of one threshold-memory entry on the link: per column,
    ``ceil(thresholds_per_channel · threshold_width / 8)`` bytes."""
    return cols * -(-(thresholds_per_channel * threshold_width) // 8)


def encode_weights(packed) -> bytes:
    """WRITE_WEIGHTS data of :func:`bitdet.core.packing.pack_weights` output (uint8
    ``tiles × K-words × cols × word bytes``): entry ``t·K_words + j`` relative to the
    address is ``[t, j]``, column 0's word first, each word little-endian. This is just
    the array's bytes in C order."""
    import numpy as np
    array = np.asarray(packed)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"packed weights must be a 4-D uint8 array, not {array.dtype} "
                         f"{array.shape}")
    return np.ascontiguousarray(array).tobytes()


def encode_thresholds(packed, *, threshold_width: int, thresholds_per_channel: int) -> bytes:
    """WRITE_THRESHOLDS data of :func:`bitdet.core.packing.pack_thresholds` output (integers
    ``tiles × cols × L``): per entry (tile), per column, the ``L ≤ thresholds_per_channel``
    thresholds as one little-endian bit field (threshold ``l`` at bits
    ``l·threshold_width``), in ``ceil(thresholds_per_channel · threshold_width / 8)``
    bytes. Thresholds a layer does not use (``l ≥ L``) are all ones ("never")."""
    import numpy as np
    array = np.asarray(packed)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"packed thresholds must be a 3-D integer array, not {array.dtype} "
                         f"{array.shape}")
    if array.shape[2] > thresholds_per_channel:
        raise ValueError(f"{array.shape[2]} thresholds per channel, the device holds "
                         f"{thresholds_per_channel}")
    top = (1 << threshold_width) - 1
    if array.size and (array.min() < 0 or array.max() > top):
        raise ValueError(f"thresholds must be in 0 … {top} ({threshold_width} bits)")
    size = -(-(thresholds_per_channel * threshold_width) // 8)
    out = bytearray()
    for entry in array.reshape(-1, array.shape[2]):
        values = [int(v) for v in entry] + [top] * (thresholds_per_channel - len(entry))
        field = 0
        for i, value in enumerate(values):
            field |= value << (i * threshold_width)
        out += field.to_bytes(size, "little")
    return bytes(out)


def encode_layer(*, index: int | None = None, **fields) -> bytes:
    """CONFIGURE_LAYER payload of a descriptor given as its fields
    (:class:`~bitdet.core.descriptor.LayerDescriptor` is the layout, docs/protocol.md):
    ``encode_layer(**descriptor)``. With ``index`` (``0 … LAYER_TABLE_ENTRIES − 1``) the
    payload is ``[index] + descriptor`` (33 bytes; 49 for an extended, contract-2
    descriptor): it configures that entry of the layer table (RUN_LAYER ``[index]``,
    RUN_NETWORK); the payload without an index configures entry 0."""
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)
                              or not 0 <= index < LAYER_TABLE_ENTRIES):
        raise ValueError(f"index must be an integer in 0 … {LAYER_TABLE_ENTRIES - 1}, "
                         f"not {index!r}")
    return LayerDescriptor(**fields).encode(index)


def decode_layer(payload: bytes) -> LayerDescriptor:
    """Inverse of :func:`encode_layer`, without the index byte."""
    return LayerDescriptor.decode(payload)


def decode_layer_entry(payload: bytes) -> tuple[int, LayerDescriptor]:
    """``(table index, descriptor)`` of a CONFIGURE_LAYER payload of 32 bytes (entry 0) or
    33 bytes (``[index] + descriptor``), or of an extended descriptor (48 or 49 bytes);
    the index is not range-checked (the device answers BAD_ARGUMENT for
    ``index ≥ LAYER_TABLE_ENTRIES``)."""
    payload = bytes(payload)
    if len(payload) in (LAYER_DESCRIPTOR_SIZE + 1, EXTENDED_DESCRIPTOR_SIZE + 1):
        return payload[0], decode_layer(payload[1:])
    return 0, decode_layer(payload)


def decode_counters(data: bytes) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of a RUN_LAYER or READ_COUNTERS response."""
    if len(data) != COUNTERS_SIZE:
        raise ProtocolError(f"counters of {len(data)} bytes, expected {COUNTERS_SIZE}")
    busy, stall = struct.unpack("<II", bytes(data))
    return busy, stall
