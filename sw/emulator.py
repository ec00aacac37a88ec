"""Bit-exact emulator of the accelerator's command interface (:class:`bitdet.hw.top.
CommandExecutor`), in numpy, without amaranth.

:class:`Emulator` consumes the same command frames as the device (:mod:`bitdet.core.protocol`,
docs/protocol.md) and produces the same response bytes: framing errors through
:class:`~bitdet.core.protocol.FrameParser`, IDENTIFY with the config hash, RESET, the
WRITE_* commands (entries written as they arrive, so a frame dropped with BAD_CRC or
TIMEOUT leaves what it carried in memory, as on the device), CONFIGURE_LAYER with the
device's checks in the device's order, the layer table (CONFIGURE_LAYER of 32 bytes for
entry 0 or 33 bytes ``[index] + descriptor``), RUN_LAYER ``[index]`` and RUN_NETWORK ``n``
(a convolution or a pool pass per entry, each followed by the ping-pong bank flip, the
counters summed), READ_ACTIVATIONS and READ_COUNTERS; READ_RESULTS answers
UNKNOWN_OPCODE like the device.

On-chip state is numpy arrays: the weight memory (``weight_depth × cols`` words of
``simd`` bits, kept as bytes), the threshold memory (threshold 0 of each column entry,
the only one the layer controller compares with) and the two activation banks
(``2 · activation_depth`` words, bank ``b`` at ``b · activation_depth``). A convolution is
computed on the unpacked words with one integer matrix product per layer: for every
output pixel and tile column, ``P`` = popcount of ``XNOR`` over all ``K`` words of the
receptive field (channel padding included, exactly what the array sums), then
``bit = P ≥ T``, packed into the output words like the controller (unfilled bits 0).
Cycle counts come from :func:`bitdet.core.cycles.layer_cycles`, the RTL's exact model.

Addresses wrap like the hardware's registers (modulo ``2**address_bits``); a memory
word outside a non-power-of-two memory reads as 0 and is not written (the RTL leaves
that case undefined; the driver never configures such a layer).
"""

from __future__ import annotations

import struct

import numpy as np

from bitdet.core.descriptor import LayerDescriptor
from bitdet.core.protocol import (
    COMMAND_PAYLOAD_LIMITS,
    COUNTERS_SIZE,
    CRC_COVERED_HEADER,
    LAYER_DESCRIPTOR_SIZE,
    LAYER_TABLE_ENTRIES,
    MAX_PAYLOAD,
    TIMEOUT_BYTE_TIMES,
    ErrorCode,
    Frame,
    FrameError,
    FrameParser,
    IdentifyReply,
    Opcode,
    encode_error,
    encode_response,
    threshold_entry_bytes,
)

__all__ = ["Emulator"]

_ADDRESS_BYTES = 4
_WRITES = (Opcode.WRITE_WEIGHTS, Opcode.WRITE_THRESHOLDS, Opcode.WRITE_ACTIVATIONS)
_COUNTER_MASK = 0xFFFFFFFF


def _addr_bits(depth: int) -> int:
    return max(1, (depth - 1).bit_length())


class Emulator:
    """The accelerator of ``config`` as a byte-in, byte-out function.

    Parameters
    ----------
    config : AcceleratorConfig

    Members
    -------
    config : AcceleratorConfig
    weights : numpy.ndarray
        uint8 ``weight_depth × cols × simd/8`` (each word little-endian).
    thresholds : numpy.ndarray
        int64 ``threshold_depth × cols``: threshold 0 of each entry and column.
    activations : numpy.ndarray
        uint8 ``2·activation_depth × simd/8``: bank ``b`` at rows ``b·activation_depth``.
    select : int
        The bank the next layer reads (and WRITE/READ_ACTIVATIONS use).
    """

    def __init__(self, config):
        for name in ("rows", "cols", "simd", "weight_depth", "threshold_depth",
                     "activation_depth", "max_channels", "max_kernel", "max_stride"):
            if not hasattr(config, name):
                raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if config.simd % config.cols:
            raise ValueError(f"simd ({config.simd}) must be a multiple of cols ({config.cols})")
        self.config = config
        c = config
        self._wbytes = c.simd // 8
        self._thr_bytes = threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel,
                                                1)
        self._identify = IdentifyReply.for_config(c).pack()
        self.weights = np.zeros((c.weight_depth, c.cols, self._wbytes), dtype=np.uint8)
        self.thresholds = np.zeros((c.threshold_depth, c.cols), dtype=np.int64)
        self.activations = np.zeros((2 * c.activation_depth, self._wbytes), dtype=np.uint8)
        self._parser = FrameParser()
        self._frame = bytearray()          # opcode, length, seq, payload, CRC of the frame
        self._idle = 0                     # byte times the line has been quiet in a frame
        self._seq = 0                      # seq byte of the command being executed
        self.select = 0
        #: the layer table: an accepted LayerDescriptor or None per entry
        self.table: list[LayerDescriptor | None] = [None] * LAYER_TABLE_ENTRIES
        self.last_busy = 0
        self.last_stall = 0
        self.frames = 0                    # commands executed (for statistics)

    # -- the byte interface ------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume command bytes; return the response bytes they produce (possibly none)."""
        out = bytearray()
        for byte in bytes(data):
            self._idle = 0
            was_in = self._parser.in_frame
            events = self._parser.feed(bytes([byte]))
            if was_in:
                self._frame.append(byte)
            elif self._parser.in_frame:
                self._frame = bytearray()
            for event in events:
                out += self._handle(event)
        return bytes(out)

    def expire(self) -> bytes:
        """The device's inter-byte timeout ran out (the host stalled inside a frame): the
        partial frame is dropped with TIMEOUT, what its payload wrote stays."""
        self._idle = 0
        event = self._parser.expire()
        return b"" if event is None else self._handle(event)

    def idle(self, byte_times: int) -> bytes:
        """The line stays quiet for ``byte_times`` byte times (10 bit periods each): as the
        decoder, once a frame has waited :data:`~bitdet.core.protocol.TIMEOUT_BYTE_TIMES`
        in all since its last byte it is dropped with TIMEOUT (:meth:`expire`); outside a
        frame nothing happens. Returns the response bytes (the error response, or none)."""
        if isinstance(byte_times, bool) or not isinstance(byte_times, int) or byte_times < 0:
            raise ValueError(f"byte_times must be a non-negative integer, not {byte_times!r}")
        if not self._parser.in_frame:
            return b""
        self._idle += byte_times
        return self.expire() if self._idle >= TIMEOUT_BYTE_TIMES else b""

    def _handle(self, event) -> bytes:
        frame = bytes(self._frame)
        self._frame = bytearray()
        if isinstance(event, FrameError):
            self._abort(frame, event)
            return encode_error(event.code, event.opcode, seq=event.seq)
        assert isinstance(event, Frame)
        self.frames += 1
        self._seq = event.seq
        return self._execute(event.opcode, event.payload)

    def _respond(self, opcode: int, status: int, data: bytes = b"") -> bytes:
        """The response to the command being executed, its seq echoed."""
        return encode_response(opcode, status, data, seq=self._seq)

    def _abort(self, frame: bytes, event: FrameError) -> None:
        # The decoder streamed the payload of a known opcode with a valid length before
        # it found the bad CRC / the timeout: the executor has written its whole entries.
        if event.code not in (ErrorCode.BAD_CRC, ErrorCode.TIMEOUT) or len(frame) < 3:
            return
        opcode, length = frame[0], frame[1] | frame[2] << 8
        if opcode not in _WRITES:
            return
        low, high = COMMAND_PAYLOAD_LIMITS[opcode]
        if not low <= length <= high:
            return
        self._write(opcode, frame[CRC_COVERED_HEADER:CRC_COVERED_HEADER + length])

    # -- execution ---------------------------------------------------------------------------
    def _execute(self, opcode: int, payload: bytes) -> bytes:
        if opcode == Opcode.IDENTIFY:
            return self._respond(opcode, ErrorCode.OK, self._identify)
        if opcode == Opcode.RESET:
            self.select = 0
            self.table = [None] * LAYER_TABLE_ENTRIES
            self.last_busy = self.last_stall = 0
            return self._respond(opcode, ErrorCode.OK)
        if opcode in _WRITES:
            return self._respond(opcode, self._write(opcode, payload))
        if opcode == Opcode.CONFIGURE_LAYER:
            return self._respond(opcode, self._configure(payload))
        if opcode in (Opcode.RUN_LAYER, Opcode.RUN_NETWORK):
            if opcode == Opcode.RUN_LAYER:
                first = payload[0] if payload else 0
                entries = range(first, first + 1)
                bad = first >= LAYER_TABLE_ENTRIES
            else:
                entries = range(payload[0])
                bad = not 1 <= payload[0] <= LAYER_TABLE_ENTRIES
            if bad:
                return self._respond(opcode, ErrorCode.BAD_ARGUMENT)
            if any(self.table[i] is None for i in entries):
                return self._respond(opcode, ErrorCode.NOT_CONFIGURED)
            busy = stall = 0
            for i in entries:
                b, s = self._run(self.table[i])
                busy, stall = (busy + b) & _COUNTER_MASK, (stall + s) & _COUNTER_MASK
            self.last_busy, self.last_stall = busy, stall
            return self._respond(opcode, ErrorCode.OK, struct.pack("<II", busy, stall))
        if opcode == Opcode.READ_ACTIVATIONS:
            address, words = struct.unpack("<IH", payload)
            if words * self._wbytes > MAX_PAYLOAD - 1:
                return self._respond(opcode, ErrorCode.BAD_ARGUMENT)
            if address + words > self.config.activation_depth:
                return self._respond(opcode, ErrorCode.BAD_ADDRESS)
            base = self.select * self.config.activation_depth + address
            return self._respond(opcode, ErrorCode.OK,
                                 self.activations[base:base + words].tobytes())
        if opcode == Opcode.READ_COUNTERS:
            data = struct.pack("<II", self.last_busy, self.last_stall)
            assert len(data) == COUNTERS_SIZE
            return self._respond(opcode, ErrorCode.OK, data)
        return self._respond(opcode, ErrorCode.UNKNOWN_OPCODE)   # READ_RESULTS

    def _write(self, opcode: int, payload: bytes) -> ErrorCode:
        """Write the whole entries of a WRITE_* payload (``address`` u32 LE, then entries);
        BAD_ADDRESS if an entry fell outside the memory or the last one is incomplete."""
        c = self.config
        if len(payload) < _ADDRESS_BYTES:
            return ErrorCode.BAD_ADDRESS
        address = int.from_bytes(payload[:_ADDRESS_BYTES], "little")
        data = np.frombuffer(payload[_ADDRESS_BYTES:], dtype=np.uint8)
        if opcode == Opcode.WRITE_WEIGHTS:
            unit, depth = self._wbytes * c.cols, c.weight_depth
        elif opcode == Opcode.WRITE_THRESHOLDS:
            unit, depth = self._thr_bytes * c.cols, c.threshold_depth
        else:
            unit, depth = self._wbytes, c.activation_depth
        # entries are written word by word (column by column): count whole words
        word = unit // (1 if opcode == Opcode.WRITE_ACTIVATIONS else c.cols)
        whole_words = len(data) // word
        incomplete = len(data) % word != 0 or whole_words % (unit // word) != 0
        entries = -(-whole_words // (unit // word))
        addrs = address + np.arange(entries)
        ok = addrs < depth
        bad = bool((~ok).any())
        if opcode == Opcode.WRITE_ACTIVATIONS:
            words = data[:whole_words * word].reshape(-1, word)
            target = self.select * c.activation_depth + addrs
            self.activations[target[ok]] = words[ok]
        else:
            words = data[:whole_words * word].reshape(-1, word)
            for column_count, (entry, rows) in self._entries(words, addrs, ok, c.cols):
                if opcode == Opcode.WRITE_WEIGHTS:
                    self.weights[entry, :column_count] = rows
                else:
                    fields = rows[:, :self._thr_bytes]
                    values = np.zeros(len(rows), dtype=np.int64)
                    for k in range(min(self._thr_bytes, -(-c.threshold_width // 8))):
                        values |= fields[:, k].astype(np.int64) << (8 * k)
                    mask = (1 << c.threshold_width) - 1
                    self.thresholds[entry, :column_count] = values & mask
        return ErrorCode.BAD_ADDRESS if bad or incomplete else ErrorCode.OK

    @staticmethod
    def _entries(words, addrs, ok, cols):
        """``(columns written, (entry address, words))`` per in-range entry, the last one
        possibly partial."""
        for i, (address, inside) in enumerate(zip(addrs, ok, strict=True)):
            chunk = words[i * cols:(i + 1) * cols]
            if inside and len(chunk):
                yield len(chunk), (int(address), chunk)

    def _configure(self, payload: bytes) -> ErrorCode:
        """CONFIGURE_LAYER: the descriptor's own checks (:meth:`LayerDescriptor.refusal`,
        the device's order and codes) decide; a refused descriptor clears its entry."""
        if len(payload) not in (LAYER_DESCRIPTOR_SIZE, LAYER_DESCRIPTOR_SIZE + 1):
            return ErrorCode.BAD_LENGTH
        which = payload[0] if len(payload) > LAYER_DESCRIPTOR_SIZE else 0
        if which >= LAYER_TABLE_ENTRIES:
            return ErrorCode.BAD_ARGUMENT
        descriptor = LayerDescriptor.decode(payload[-LAYER_DESCRIPTOR_SIZE:])
        refusal = descriptor.refusal(self.config)
        self.table[which] = descriptor if refusal is None else None
        return ErrorCode.OK if refusal is None else ErrorCode[refusal]

    # -- layers --------------------------------------------------------------------------------
    def _bank_read(self, addrs: np.ndarray, bank: int) -> np.ndarray:
        """Words at ``addrs`` (wrapped to the address width) of ``bank``."""
        depth = self.config.activation_depth
        addrs = np.asarray(addrs, dtype=np.int64) & ((1 << _addr_bits(depth)) - 1)
        inside = addrs < depth
        out = np.zeros((*addrs.shape, self._wbytes), dtype=np.uint8)
        out[inside] = self.activations[bank * depth + addrs[inside]]
        return out

    def _bank_write(self, addrs: np.ndarray, words: np.ndarray, bank: int) -> None:
        depth = self.config.activation_depth
        addrs = np.asarray(addrs, dtype=np.int64).reshape(-1) & ((1 << _addr_bits(depth)) - 1)
        words = words.reshape(-1, self._wbytes)
        inside = addrs < depth
        self.activations[bank * depth + addrs[inside]] = words[inside]

    def _run(self, d: dict) -> tuple[int, int]:
        """Run one checked descriptor, flip the banks; its ``(busy, stall)`` cycles."""
        from bitdet.core import cycles
        if d["pool"]:
            self._run_pool(d)
            busy, stall = cycles.pool_cycles(self.config, d)
        else:
            self._run_conv(d)
            busy, stall = cycles.layer_cycles(self.config, dict(d, raw=0))
        self.select ^= 1
        return busy & _COUNTER_MASK, stall & _COUNTER_MASK

    def _run_pool(self, d: dict) -> None:
        simd = self.config.simd
        words = -(-d["channels"] // simd)
        k, s = d["kernel"], d["stride"]
        oy, ox, ky, kx, w = np.meshgrid(np.arange(d["out_h"]), np.arange(d["out_w"]),
                                        np.arange(k), np.arange(k), np.arange(words),
                                        indexing="ij")
        addrs = d["input_base"] + ((oy * s + ky) * d["in_w"] + ox * s + kx) * words + w
        taps = self._bank_read(addrs, self.select)             # oh, ow, k, k, W, bytes
        pooled = np.bitwise_or.reduce(taps.reshape(d["out_h"], d["out_w"], k * k, words,
                                                   self._wbytes), axis=2)
        out_addrs = d["output_base"] + np.arange(d["out_h"] * d["out_w"] * words)
        self._bank_write(out_addrs, pooled, 1 - self.select)

    def _run_conv(self, d: dict) -> None:
        c = self.config
        simd, cols = c.simd, c.cols
        words = -(-d["channels"] // simd)
        k, s, p = d["kernel"], d["stride"], d["padding"]
        in_h, in_w, out_h, out_w = d["in_h"], d["in_w"], d["out_h"], d["out_w"]
        k_words = k * k * words
        tiles = -(-d["out_channels"] // cols)
        # receptive fields as K-words (taps row-major, then channel word), padding words
        # where a tap leaves the image
        oy, ox, ky, kx, m = np.meshgrid(np.arange(out_h), np.arange(out_w), np.arange(k),
                                        np.arange(k), np.arange(words), indexing="ij")
        y, x = oy * s + ky - p, ox * s + kx - p
        inside = (y >= 0) & (y < in_h) & (x >= 0) & (x < in_w)
        addrs = d["input_base"] + (y * in_w + x) * words + m
        fields = self._bank_read(np.where(inside, addrs, 0), self.select)
        if d["pad_bit"]:
            real = np.clip(d["channels"] - np.arange(words) * simd, 0, simd)
            pad_bits = (np.arange(simd)[None, :] < real[:, None]).astype(np.uint8)
            pad_words = np.packbits(pad_bits, axis=1, bitorder="little")     # words, bytes
            pad = pad_words[m]
        else:
            pad = np.zeros((*m.shape, self._wbytes), dtype=np.uint8)
        fields = np.where(inside[..., None], fields, pad)
        a_bits = np.unpackbits(fields.reshape(out_h * out_w, k_words * self._wbytes),
                               axis=1, bitorder="little").astype(np.float32)
        # weights of tile t, K-word j, column c at weight_base + t·K + j (wrapped)
        wdepth = c.weight_depth
        waddr = (d["weight_base"] + np.arange(tiles * k_words)) & ((1 << _addr_bits(wdepth)) - 1)
        wwords = np.zeros((tiles * k_words, cols, self._wbytes), dtype=np.uint8)
        winside = waddr < wdepth
        wwords[winside] = self.weights[waddr[winside]]
        wwords = wwords.reshape(tiles, k_words, cols, self._wbytes).transpose(0, 2, 1, 3)
        w_bits = np.unpackbits(wwords.reshape(tiles * cols, k_words * self._wbytes), axis=1,
                               bitorder="little").astype(np.float32)
        # popcount(XNOR) = n − Σa − Σw + 2·a·w: integers below 2**24 (n = K·simd bits),
        # exact in float32
        n = a_bits.shape[1]
        assert n < 1 << 24
        products = (a_bits @ w_bits.T).astype(np.int64)
        popcount = (n - a_bits.sum(1, dtype=np.int64)[:, None]
                    - w_bits.sum(1, dtype=np.int64)[None, :] + 2 * products)
        popcount &= (1 << c.acc_width) - 1
        tdepth = c.threshold_depth
        taddr = (d["threshold_base"] + np.arange(tiles)) & ((1 << _addr_bits(tdepth)) - 1)
        thresholds = np.full((tiles, cols), -1, dtype=np.int64)
        tinside = taddr < tdepth
        thresholds[tinside] = self.thresholds[taddr[tinside]]
        thresholds = np.where(thresholds < 0, 0, thresholds).reshape(-1)   # 0 if unreadable
        bits = (popcount >= thresholds[None, :]).astype(np.uint8)        # pixels, tiles·cols
        out_words = -(-d["out_channels"] // simd)
        packed_bits = np.zeros((out_h * out_w, out_words * simd), dtype=np.uint8)
        packed_bits[:, :tiles * cols] = bits
        packed = np.packbits(packed_bits.reshape(-1, out_words, simd), axis=2,
                             bitorder="little")
        out_addrs = d["output_base"] + np.arange(out_h * out_w * out_words)
        self._bank_write(out_addrs, packed, 1 - self.select)
