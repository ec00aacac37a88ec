"""Host-link framing: the one implementation of the command protocol.

The host driver, the emulator and the tests import this module; the hardware decoder
(:mod:`bitdet.hw.decoder`) derives its CRC network and its opcode/length table from it
and is tested against :class:`FrameParser`. The format is documented in
``docs/protocol.md``.

Frame (both directions)::

    MAGIC | opcode | length (u16 LE) | payload (length bytes) | CRC (u16 BIG-endian)

``CRC`` is CRC-16/IBM-3740 (a.k.a. CRC-16/CCITT-FALSE: polynomial 0x1021, init 0xFFFF,
no reflection, no final XOR) over ``opcode``, ``length`` and ``payload``. It is sent most
significant byte first, so that running the same CRC over the whole frame after MAGIC,
CRC bytes included, leaves 0: the decoder checks that residue and needs no comparator
against a stored CRC.

Responses use the same frame. A response to command ``op`` has opcode
``RESPONSE_FLAG | op`` and a payload of one status byte (:class:`ErrorCode`) followed by
the reply data. Errors found while framing (bad CRC, unknown opcode, bad length,
timeout) are answered by an *error response* with opcode :data:`ERROR_OPCODE` and the
payload ``[code, offending opcode byte]`` (0x00 when no opcode byte had arrived).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .descriptor import LAYER_DESCRIPTOR_SIZE, LayerDescriptor

__all__ = [
    "COMMAND_PAYLOAD_LIMITS",
    "COUNTERS_SIZE",
    "CRC_CHECK",
    "CRC_INIT",
    "CRC_POLY",
    "ERROR_OPCODE",
    "LAYER_DESCRIPTOR_SIZE",
    "LAYER_FLAG_PAD_BIT",
    "LAYER_FLAG_POOL",
    "LAYER_FLAG_RAW",
    "LAYER_TABLE_ENTRIES",
    "MAGIC",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "RESPONSE_FLAG",
    "TIMEOUT_BYTE_TIMES",
    "DeviceError",
    "ErrorCode",
    "Frame",
    "FrameError",
    "FrameParser",
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
    "threshold_entry_bytes",
    "weight_entry_bytes",
]

MAGIC = 0xB1
"""First byte of every frame; the decoder hunts for it after an error."""

PROTOCOL_VERSION = 1
"""Reported by IDENTIFY; bumped on any incompatible change of this module."""

MAX_PAYLOAD = 4096
"""Largest payload of any frame, in bytes (a response's status byte counts)."""

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

HEADER_SIZE = 4          # MAGIC, opcode, length
CRC_SIZE = 2


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

def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """The bytes of one frame carrying ``payload`` under ``opcode``.

    Raises
    ------
    ValueError
        If ``opcode`` is not a byte or ``payload`` is longer than :data:`MAX_PAYLOAD`.
    """
    if isinstance(opcode, bool) or not isinstance(opcode, int) or not 0 <= opcode <= 0xFF:
        raise ValueError(f"opcode must be an integer in 0..255, not {opcode!r}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    body = struct.pack("<BH", opcode, len(payload)) + payload
    return bytes([MAGIC]) + body + crc16(body).to_bytes(2, "big")


def encode_response(opcode: int, status: int = ErrorCode.OK, data: bytes = b"") -> bytes:
    """A response frame to command ``opcode``: ``[status, *data]`` under
    ``RESPONSE_FLAG | opcode``."""
    if not 0 <= opcode < RESPONSE_FLAG:
        raise ValueError(f"command opcode must be in 0..127, not {opcode!r}")
    return encode_frame(RESPONSE_FLAG | opcode, bytes([ErrorCode(status)]) + bytes(data))


def encode_error(code: int, opcode: int = 0) -> bytes:
    """An error response (opcode :data:`ERROR_OPCODE`, payload ``[code, opcode]``)."""
    return encode_frame(ERROR_OPCODE, bytes([ErrorCode(code), opcode]))


# -- parsing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    """A frame with a correct CRC (and, for a command parser, a known opcode)."""

    opcode: int
    payload: bytes


@dataclass(frozen=True)
class FrameError:
    """A frame the parser dropped: the code its error response carries, and the opcode
    byte it had received (0 if none)."""

    code: ErrorCode
    opcode: int


class FrameParser:
    """Incremental frame parser with the resync rules of the hardware decoder.

    Bytes outside a frame are skipped until :data:`MAGIC`. After MAGIC come the opcode,
    the length (checked at once: above ``max_payload``, or, for an opcode in
    ``payload_limits``, outside its range, is BAD_LENGTH), the payload and the CRC. A CRC
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
        self._buffer = bytearray()          # opcode, length, payload, CRC received so far

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
        if len(buf) < 3 or len(buf) < 3 + (buf[1] | buf[2] << 8) + CRC_SIZE:
            return None
        opcode, payload = buf[0], bytes(buf[3:-CRC_SIZE])
        residue = crc16(buf)
        self._hunt()
        if residue != 0:
            return FrameError(ErrorCode.BAD_CRC, opcode)
        if self._limits is not None and opcode not in self._limits:
            return FrameError(ErrorCode.UNKNOWN_OPCODE, opcode)
        return Frame(opcode, payload)

    def expire(self) -> FrameError | None:
        """The inter-byte timeout ran out: drop a partial frame (TIMEOUT), else nothing."""
        if self._hunting:
            return None
        opcode = self._buffer[0] if self._buffer else 0
        self._hunt()
        return FrameError(ErrorCode.TIMEOUT, opcode)


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
    true for an error response of the decoder (opcode :data:`ERROR_OPCODE`).
    """

    opcode: int
    status: int
    data: bytes
    framing: bool = False

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
        return Response(frame.payload[1], frame.payload[0], b"", framing=True)
    if not frame.opcode & RESPONSE_FLAG:
        raise ProtocolError(f"frame with opcode 0x{frame.opcode:02X} is not a response")
    if not frame.payload:
        raise ProtocolError(f"response 0x{frame.opcode:02X} without a status byte")
    return Response(frame.opcode & ~RESPONSE_FLAG & 0xFF, frame.payload[0], frame.payload[1:])


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
    payload is 33 bytes, ``[index] + descriptor``: it configures that entry of the layer
    table (RUN_LAYER ``[index]``, RUN_NETWORK); the 32-byte payload configures entry 0."""
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
    33 bytes (``[index] + descriptor``); the index is not range-checked (the device
    answers BAD_ARGUMENT for ``index ≥ LAYER_TABLE_ENTRIES``)."""
    payload = bytes(payload)
    if len(payload) == LAYER_DESCRIPTOR_SIZE + 1:
        return payload[0], decode_layer(payload[1:])
    return 0, decode_layer(payload)


def decode_counters(data: bytes) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of a RUN_LAYER or READ_COUNTERS response."""
    if len(data) != COUNTERS_SIZE:
        raise ProtocolError(f"counters of {len(data)} bytes, expected {COUNTERS_SIZE}")
    busy, stall = struct.unpack("<II", bytes(data))
    return busy, stall
