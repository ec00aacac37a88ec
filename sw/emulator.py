"""Bit-exact emulator of the accelerator's command interface (:class:`bitdet.hw.top.
CommandExecutor`), in numpy, without amaranth.

:class:`Emulator` consumes the same command frames as the device (:mod:`bitdet.core.protocol`,
docs/protocol.md) and produces the same response bytes: framing errors through
:class:`~bitdet.core.protocol.FrameParser`, IDENTIFY with the config hash, RESET, the
WRITE_* commands (entries written as they arrive, so a frame dropped with BAD_CRC or
TIMEOUT leaves what it carried in memory, as on the device), CONFIGURE_LAYER with the
device's checks in the device's order, the layer table (CONFIGURE_LAYER of a descriptor
for entry 0 or ``[index] + descriptor``), RUN_LAYER ``[index]`` and RUN_NETWORK ``n``
(the passes of the entries in order, the counters summed), READ_ACTIVATIONS and
READ_COUNTERS; READ_RESULTS answers UNKNOWN_OPCODE like the device.

On-chip state is numpy arrays: the weight memory (``weight_depth × cols`` words of
``simd`` bits, kept as bytes), the threshold memory (all ``thresholds_per_channel``
thresholds of each entry and column) and the activation memory (``activation_slots ·
activation_depth`` words, slot ``s`` at ``s · activation_depth``).

**Contract 1** (``config.contract == 1``, the RTL today): 32-byte descriptors (33 with
the table index; 48/49 bytes answer BAD_LENGTH), 1-bit maps in two ping-pong banks (the
two slots): a pass reads bank ``select`` and writes the other, then ``select`` flips;
WRITE/READ_ACTIVATIONS address bank ``select``. A convolution compares with threshold 0
of its entry only, a pool pass ORs the window's words.

**Contract 2** (``config.contract == 2``, as the contract-2 RTL; docs/protocol.md,
"Contract 2"): 48-byte extended descriptors (49 with the index; 32/33 bytes answer BAD_LENGTH).
An n-bit map is n bit-planes, plane ``b`` at ``base + b · map_words`` of its slot, each
packed like a 1-bit map. WRITE/READ_ACTIVATIONS addresses are flat (``slot ·
activation_depth + word``); nothing flips. A convolution reads ``in_bits`` input planes
(spatial padding: bit ``b`` of ``pad_level`` in the real channels of plane ``b``, 0 in
the channel padding), accumulates ``A = Σ_b 2**b · P_b``, reads the shortcut level ``r``
of each output pixel and channel from ``shortcut_bits`` planes at ``shortcut_slot`` /
``shortcut_base`` (the output's shape) and outputs ``#{j < 2**out_bits − 1 : A ≥
T[threshold_base + t·2**shortcut_bits + r, col, j]}`` as ``out_bits`` planes at
``output_slot`` / ``output_base``. A pool pass outputs the max of the window's levels per
channel, a repeat pass copies input channel ``o mod C`` to output channel ``o``, plane by
plane.

Both contracts share the datapath: receptive fields are gathered and unpacked, and one
integer matrix product per input plane (in float32, exact below 2**24) gives, for every
output pixel and tile column, ``P`` = popcount of ``XNOR`` over all ``K`` words of the
receptive field (channel padding included, exactly what the array sums). Output levels
are packed into the output words like the controller (the ``cols`` channels of every
tile; unfilled bits 0). Cycle counts come from :func:`bitdet.core.cycles.pass_cycles`,
the RTL's exact model (the contract-2 formula is the specification of the coming RTL).

**Timing** (``Emulator(config, timed=True)``, contract 2 only; docs/protocol.md,
*Commands during a run*): a clock counts byte times (each byte fed is one,
:meth:`Emulator.idle` adds its count). A RUN_LAYER / RUN_NETWORK computes its results at
once but holds its response for ``ceil(busy · baud / (10 · clock_hz))`` byte times; frames
completed meanwhile are answered BUSY, except a WRITE_ACTIVATIONS whose words all lie in
slots no pass of the run reads or writes, which executes. Without ``timed`` (and always
under contract 1) every command is answered as soon as its frame is complete.

Addresses wrap like the hardware's registers (modulo ``2**address_bits``); a memory
word outside a non-power-of-two memory reads as 0 and is not written (the RTL leaves
that case undefined; the driver never configures such a layer). Under contract 2 a map
that runs past the end of its slot wraps within that slot the same way (the host's
:meth:`~bitdet.core.descriptor.LayerDescriptor.problems` refuses such a pass).
"""

from __future__ import annotations

import struct

import numpy as np

from bitdet.core.descriptor import EXTENDED_DESCRIPTOR_SIZE, LayerDescriptor
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


def _wrap(addrs, depth: int) -> np.ndarray:
    """``addrs`` (int64) wrapped to the address width of a ``depth``-entry memory."""
    return np.asarray(addrs, dtype=np.int64) & ((1 << _addr_bits(depth)) - 1)


class Emulator:
    """The accelerator of ``config`` as a byte-in, byte-out function.

    Parameters
    ----------
    config : AcceleratorConfig
    timed : bool
        Contract 2: hold a RUN's response for its busy cycles (see above; what
        ``Device.open("emu", ...)`` builds). Ignored under contract 1.

    Members
    -------
    config : AcceleratorConfig
    weights : numpy.ndarray
        uint8 ``weight_depth × cols × simd/8`` (each word little-endian).
    thresholds : numpy.ndarray
        int64 ``threshold_depth × cols × thresholds_per_channel``: every threshold of
        each entry and column.
    activations : numpy.ndarray
        uint8 ``activation_slots·activation_depth × simd/8``: slot (contract-1 bank)
        ``s`` at rows ``s·activation_depth``.
    select : int
        Contract 1: the bank the next layer reads (and WRITE/READ_ACTIVATIONS use).
        Contract 2: always 0 (addresses are flat, nothing flips).
    """

    def __init__(self, config, *, timed: bool = False):
        for name in ("rows", "cols", "simd", "weight_depth", "threshold_depth",
                     "activation_depth", "max_channels", "max_kernel", "max_stride"):
            if not hasattr(config, name):
                raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if config.simd % config.cols:
            raise ValueError(f"simd ({config.simd}) must be a multiple of cols ({config.cols})")
        self.config = config
        c = config
        self.contract = getattr(c, "contract", 1)
        if self.contract not in (1, 2):
            raise ValueError(f"config.contract must be 1 or 2, not {self.contract!r}")
        self.slots = getattr(c, "activation_slots", 2)
        self._wbytes = c.simd // 8
        self._thr_bytes = threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel,
                                                1)
        self._descriptor_size = (LAYER_DESCRIPTOR_SIZE if self.contract == 1
                                 else EXTENDED_DESCRIPTOR_SIZE)
        self._identify = IdentifyReply.for_config(c).pack()
        self.weights = np.zeros((c.weight_depth, c.cols, self._wbytes), dtype=np.uint8)
        self.thresholds = np.zeros((c.threshold_depth, c.cols, c.thresholds_per_channel),
                                   dtype=np.int64)
        self.activations = np.zeros((self.slots * c.activation_depth, self._wbytes),
                                    dtype=np.uint8)
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
        #: contract 2: RUN responses wait for the run's busy cycles (in byte times)
        self.timed = bool(timed) and self.contract == 2
        self.clock = 0                     # byte times so far (fed bytes and idle time)
        self._running = None               # (due clock, response, busy slots) of a run

    # -- the byte interface ------------------------------------------------------------------
    def feed(self, data: bytes) -> bytes:
        """Consume command bytes; return the response bytes they produce (possibly none)."""
        out = bytearray()
        for byte in bytes(data):
            out += self._tick(1)
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
        out = self._tick(byte_times)
        if not self._parser.in_frame:
            return out
        self._idle += byte_times
        return out + (self.expire() if self._idle >= TIMEOUT_BYTE_TIMES else b"")

    @property
    def running(self) -> bool:
        """A timed RUN_LAYER / RUN_NETWORK is still computing (its response held)."""
        return self._running is not None

    def busy_slots(self) -> frozenset[int]:
        """The map slots the running command's passes read or write (empty when idle)."""
        return frozenset() if self._running is None else self._running[2]

    def _tick(self, byte_times: int) -> bytes:
        """Advance the clock; the held RUN response once its busy cycles have passed."""
        self.clock += byte_times
        if self._running is None or self.clock < self._running[0]:
            return b""
        response = self._running[1]
        self._running = None
        return response

    def run_byte_times(self, busy_cycles: int) -> int:
        """Byte times a run of ``busy_cycles`` takes at the config's clock and baud:
        ``ceil(busy_cycles · baud / (10 · clock_hz))``."""
        c = self.config
        return -(-busy_cycles * c.baud // (10 * c.clock_hz))

    def _handle(self, event) -> bytes:
        frame = bytes(self._frame)
        self._frame = bytearray()
        if isinstance(event, FrameError):
            self._abort(frame, event)
            return encode_error(event.code, event.opcode, seq=event.seq)
        assert isinstance(event, Frame)
        self.frames += 1
        self._seq = event.seq
        if self._running is not None and not self._concurrent(event.opcode, event.payload):
            return self._respond(event.opcode, ErrorCode.BUSY)
        return self._execute(event.opcode, event.payload)

    def _concurrent(self, opcode: int, payload: bytes) -> bool:
        """While a run computes (contract 2, timed): a WRITE_ACTIVATIONS whose words all
        lie in slots no pass of the run reads or writes may execute; anything else is
        BUSY (docs/protocol.md, "Contract 2")."""
        if opcode != Opcode.WRITE_ACTIVATIONS or len(payload) < _ADDRESS_BYTES:
            return False
        address = int.from_bytes(payload[:_ADDRESS_BYTES], "little")
        words = max(1, (len(payload) - _ADDRESS_BYTES) // self._wbytes)
        depth = self.config.activation_depth
        touched = range(address // depth, (address + words - 1) // depth + 1)
        return not self.busy_slots().intersection(touched)

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
        payload = frame[CRC_COVERED_HEADER:CRC_COVERED_HEADER + length]
        if self._running is not None and not self._concurrent(opcode, payload):
            return                        # refused during a run: nothing written
        self._write(opcode, payload)

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
            return self._run_table(opcode, payload)
        if opcode == Opcode.READ_ACTIVATIONS:
            return self._read_activations(payload)
        if opcode == Opcode.READ_COUNTERS:
            data = struct.pack("<II", self.last_busy, self.last_stall)
            assert len(data) == COUNTERS_SIZE
            return self._respond(opcode, ErrorCode.OK, data)
        return self._respond(opcode, ErrorCode.UNKNOWN_OPCODE)   # READ_RESULTS

    def _activation_window(self) -> tuple[int, int]:
        """``(first row, words)`` of the activation memory that WRITE/READ_ACTIVATIONS
        address: bank ``select`` (contract 1) or all slots, flat (contract 2)."""
        depth = self.config.activation_depth
        if self.contract == 1:
            return self.select * depth, depth
        return 0, self.slots * depth

    def _read_activations(self, payload: bytes) -> bytes:
        opcode = Opcode.READ_ACTIVATIONS
        address, words = struct.unpack("<IH", payload)
        if words * self._wbytes > MAX_PAYLOAD - 1:
            return self._respond(opcode, ErrorCode.BAD_ARGUMENT)
        first, size = self._activation_window()
        if address + words > size:
            return self._respond(opcode, ErrorCode.BAD_ADDRESS)
        base = first + address
        return self._respond(opcode, ErrorCode.OK, self.activations[base:base + words].tobytes())

    def _run_table(self, opcode: int, payload: bytes) -> bytes:
        """RUN_LAYER ``[index]`` / RUN_NETWORK ``n``: the entries' passes in order, their
        counters summed (32-bit, wrapping)."""
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
        response = self._respond(opcode, ErrorCode.OK, struct.pack("<II", busy, stall))
        wait = self.run_byte_times(busy) if self.timed else 0
        if wait <= 0:
            return response
        slots = set()
        for i in entries:
            d = self.table[i]
            slots |= {d.input_slot, d.output_slot}
            if d.shortcut_bits and not (d.pool or d.repeat):
                slots.add(d.shortcut_slot)
        self._running = (self.clock + wait, response, frozenset(slots))
        return b""

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
            first, depth = self._activation_window()
            unit = self._wbytes
        # entries are written word by word (column by column): count whole words
        word = unit // (1 if opcode == Opcode.WRITE_ACTIVATIONS else c.cols)
        whole_words = len(data) // word
        incomplete = len(data) % word != 0 or whole_words % (unit // word) != 0
        entries = -(-whole_words // (unit // word))
        addrs = address + np.arange(entries)
        ok = addrs < depth
        bad = bool((~ok).any())
        words = data[:whole_words * word].reshape(-1, word)
        if opcode == Opcode.WRITE_ACTIVATIONS:
            self.activations[first + addrs[ok]] = words[ok]
        else:
            for column_count, (entry, rows) in self._entries(words, addrs, ok, c.cols):
                if opcode == Opcode.WRITE_WEIGHTS:
                    self.weights[entry, :column_count] = rows
                else:
                    self.thresholds[entry, :column_count] = self._threshold_fields(rows)
        return ErrorCode.BAD_ADDRESS if bad or incomplete else ErrorCode.OK

    def _threshold_fields(self, rows: np.ndarray) -> np.ndarray:
        """int64 ``columns × thresholds_per_channel``: the thresholds of each column's
        little-endian bit field (threshold ``l`` at bits ``l·threshold_width``)."""
        c = self.config
        width, count = c.threshold_width, c.thresholds_per_channel
        bits = np.unpackbits(rows[:, :self._thr_bytes], axis=1, bitorder="little")
        bits = bits[:, :count * width].reshape(len(rows), count, width).astype(np.int64)
        return bits @ (np.int64(1) << np.arange(width, dtype=np.int64))

    @staticmethod
    def _entries(words, addrs, ok, cols):
        """``(columns written, (entry address, words))`` per in-range entry, the last one
        possibly partial."""
        for i, (address, inside) in enumerate(zip(addrs, ok, strict=True)):
            chunk = words[i * cols:(i + 1) * cols]
            if inside and len(chunk):
                yield len(chunk), (int(address), chunk)

    def _configure(self, payload: bytes) -> ErrorCode:
        """CONFIGURE_LAYER: a descriptor of the contract's size (32 bytes under contract
        1, 48 under contract 2; one more with the table index) or BAD_LENGTH; then the
        descriptor's own checks (:meth:`LayerDescriptor.refusal`, the device's order and
        codes) decide; a refused descriptor clears its entry."""
        size = self._descriptor_size
        if len(payload) not in (size, size + 1):
            return ErrorCode.BAD_LENGTH
        which = payload[0] if len(payload) > size else 0
        if which >= LAYER_TABLE_ENTRIES:
            return ErrorCode.BAD_ARGUMENT
        descriptor = LayerDescriptor.decode(payload[-size:])
        refusal = descriptor.refusal(self.config)
        self.table[which] = descriptor if refusal is None else None
        return ErrorCode.OK if refusal is None else ErrorCode[refusal]

    # -- activation memory -------------------------------------------------------------------
    def _slot_read(self, addrs: np.ndarray, slot: int) -> np.ndarray:
        """Words at ``addrs`` (wrapped to the address width) of ``slot`` (a contract-1
        bank); a word beyond ``activation_depth`` reads as 0."""
        depth = self.config.activation_depth
        addrs = _wrap(addrs, depth)
        inside = addrs < depth
        out = np.zeros((*addrs.shape, self._wbytes), dtype=np.uint8)
        out[inside] = self.activations[slot * depth + addrs[inside]]
        return out

    def _slot_write(self, addrs: np.ndarray, words: np.ndarray, slot: int) -> None:
        depth = self.config.activation_depth
        addrs = _wrap(addrs, depth).reshape(-1)
        words = words.reshape(-1, self._wbytes)
        inside = addrs < depth
        self.activations[slot * depth + addrs[inside]] = words[inside]

    def _plane_bits(self, addrs: np.ndarray, slot: int) -> np.ndarray:
        """0/1 uint8 ``(planes, …, words·simd)`` of the words at ``addrs`` ``(planes, …,
        words)``: channel ``c`` of a pixel at index ``c`` (padding bits included)."""
        words = self._slot_read(addrs, slot)
        flat = words.reshape(*addrs.shape[:-1], addrs.shape[-1] * self._wbytes)
        return np.unpackbits(flat, axis=-1, bitorder="little")

    @staticmethod
    def _levels(bits: np.ndarray) -> np.ndarray:
        """int64 levels ``Σ_b 2**b · bits[b]`` of bit-planes ``bits`` (planes first)."""
        shifts = np.arange(bits.shape[0], dtype=np.int64).reshape(-1, *[1] * (bits.ndim - 1))
        return (bits.astype(np.int64) << shifts).sum(axis=0)

    def _read_map(self, slot: int, base: int, pixels: int, words: int,
                  planes: int) -> np.ndarray:
        """int64 levels ``pixels × words·simd`` of a ``planes``-plane map (plane ``b`` at
        ``base + b·pixels·words``), channel padding included."""
        plane_words = pixels * words
        addrs = (base + np.arange(planes)[:, None, None] * plane_words
                 + np.arange(pixels)[None, :, None] * words + np.arange(words))
        return self._levels(self._plane_bits(addrs, slot))

    def _write_map(self, slot: int, base: int, levels: np.ndarray, words: int,
                   planes: int) -> None:
        """Write levels ``pixels × channels`` as ``planes`` planes of ``words`` words per
        pixel (plane ``b`` at ``base + b·pixels·words``); channel bits beyond
        ``channels`` are 0."""
        simd = self.config.simd
        pixels, channels = levels.shape
        bits = np.zeros((planes, pixels, words * simd), dtype=np.uint8)
        bits[:, :, :channels] = (levels[None] >> np.arange(planes).reshape(-1, 1, 1)) & 1
        packed = np.packbits(bits.reshape(planes, pixels, words, simd), axis=3,
                             bitorder="little")
        self._slot_write(base + np.arange(planes * pixels * words), packed, slot)

    # -- passes --------------------------------------------------------------------------------
    def _slots(self, d: LayerDescriptor) -> tuple[int, int]:
        """``(input slot, output slot)`` of a pass: the banks ``select`` and ``1 − select``
        (contract 1) or the descriptor's slots (contract 2)."""
        if self.contract == 1:
            return self.select, 1 - self.select
        return d.input_slot, d.output_slot

    def _run(self, d: LayerDescriptor) -> tuple[int, int]:
        """Run one checked descriptor (contract 1: then flip the banks); its ``(busy,
        stall)`` cycles."""
        from bitdet.core import cycles
        if d.pool:
            self._run_pool(d)
        elif d.repeat:
            self._run_repeat(d)
        else:
            self._run_conv(d)
        busy, stall = cycles.pass_cycles(self.config, dict(d, raw=0))
        if self.contract == 1:
            self.select ^= 1
        return busy & _COUNTER_MASK, stall & _COUNTER_MASK

    def _run_pool(self, d: LayerDescriptor) -> None:
        """The max of each ``kernel × kernel`` window's levels per channel (contract 1:
        the OR of the window's words)."""
        simd, planes = self.config.simd, d.in_bits
        words = -(-d.channels // simd)
        k, s = d.kernel, d.stride
        b, oy, ox, ky, kx, w = np.meshgrid(np.arange(planes), np.arange(d.out_h),
                                           np.arange(d.out_w), np.arange(k), np.arange(k),
                                           np.arange(words), indexing="ij")
        addrs = (d.input_base + b * d.map_words(simd, output=False)
                 + ((oy * s + ky) * d.in_w + ox * s + kx) * words + w)
        source, target = self._slots(d)
        levels = self._levels(self._plane_bits(addrs, source))   # oh, ow, k, k, words·simd
        pooled = levels.reshape(d.out_h * d.out_w, k * k, words * simd).max(axis=1)
        self._write_map(target, d.output_base, pooled, words, planes)

    def _run_repeat(self, d: LayerDescriptor) -> None:
        """Output channel ``o`` is input channel ``o mod channels``, plane by plane."""
        simd, planes = self.config.simd, d.in_bits
        pixels = d.out_h * d.out_w
        source, target = self._slots(d)
        levels = self._read_map(source, d.input_base, pixels, -(-d.channels // simd), planes)
        copied = levels[:, np.arange(d.out_channels) % d.channels]
        self._write_map(target, d.output_base, copied, -(-d.out_channels // simd), planes)

    def _run_conv(self, d: LayerDescriptor) -> None:
        """A convolution: accumulators of the input planes, thresholded per output pixel
        and channel with the row of its shortcut level, written as ``out_bits`` planes."""
        c = self.config
        tiles = -(-d.out_channels // c.cols)
        k_words = d.kernel ** 2 * -(-d.channels // c.simd)
        source, target = self._slots(d)
        fields = self._receptive_fields(d, source)                # planes, pixels, bytes
        w_bits = self._weight_bits(d, tiles, k_words)             # tiles·cols, bits
        acc = self._accumulate(fields, w_bits)                    # pixels, tiles·cols
        table = self._threshold_table(d, tiles)                   # R, tiles·cols, L
        pixels, filled = acc.shape
        if d.shortcut_bits:
            shortcut = self._read_map(d.shortcut_slot, d.shortcut_base, pixels,
                                      -(-d.out_channels // c.simd), d.shortcut_bits)
            rows = shortcut[:, :filled]
        else:
            rows = np.zeros((pixels, filled), dtype=np.int64)
        thresholds = table[rows, np.arange(filled)[None, :]]      # pixels, tiles·cols, L
        levels = (acc[:, :, None] >= thresholds).sum(axis=2)
        self._write_map(target, d.output_base, levels, -(-d.out_channels // c.simd),
                        d.out_bits)

    def _receptive_fields(self, d: LayerDescriptor, slot: int) -> np.ndarray:
        """uint8 ``in_bits × out_h·out_w × K·simd/8``: each output pixel's receptive field
        as K-words (taps row-major, then channel word) per input plane; a tap that leaves
        the image reads the padding word of its plane (bit ``b`` of the padding level in
        the real channels, 0 in the channel padding)."""
        simd, planes = self.config.simd, d.in_bits
        words = -(-d.channels // simd)
        k, s, p = d.kernel, d.stride, d.padding
        b, oy, ox, ky, kx, m = np.meshgrid(np.arange(planes), np.arange(d.out_h),
                                           np.arange(d.out_w), np.arange(k), np.arange(k),
                                           np.arange(words), indexing="ij")
        y, x = oy * s + ky - p, ox * s + kx - p
        inside = (y >= 0) & (y < d.in_h) & (x >= 0) & (x < d.in_w)
        addrs = (d.input_base + b * d.map_words(simd, output=False)
                 + (y * d.in_w + x) * words + m)
        fields = self._slot_read(np.where(inside, addrs, 0), slot)
        pad_level = d.pad_level if d.extended else d.pad_bit
        real = np.arange(words * simd).reshape(words, simd) < d.channels    # words, simd
        pad_bits = ((pad_level >> np.arange(planes)) & 1).astype(np.uint8)[:, None, None]
        pad_words = np.packbits(pad_bits & real, axis=2, bitorder="little")  # planes, words
        fields = np.where(inside[..., None], fields, pad_words[b, m])
        return fields.reshape(planes, d.out_h * d.out_w, -1)

    def _weight_bits(self, d: LayerDescriptor, tiles: int, k_words: int) -> np.ndarray:
        """float32 0/1 ``tiles·cols × K·simd``: the weights of tile ``t``, K-word ``j``,
        column ``c`` at ``weight_base + t·K + j`` (wrapped; unreadable words are 0)."""
        c = self.config
        waddr = _wrap(d.weight_base + np.arange(tiles * k_words), c.weight_depth)
        wwords = np.zeros((tiles * k_words, c.cols, self._wbytes), dtype=np.uint8)
        winside = waddr < c.weight_depth
        wwords[winside] = self.weights[waddr[winside]]
        wwords = wwords.reshape(tiles, k_words, c.cols, self._wbytes).transpose(0, 2, 1, 3)
        return np.unpackbits(wwords.reshape(tiles * c.cols, k_words * self._wbytes), axis=1,
                             bitorder="little").astype(np.float32)

    def _accumulate(self, fields: np.ndarray, w_bits: np.ndarray) -> np.ndarray:
        """int64 ``pixels × tiles·cols``: ``A = Σ_b 2**b · P_b`` (wrapped to
        ``acc_width`` bits), ``P_b`` = popcount(XNOR) of plane ``b``'s receptive fields
        (``fields[b]``, packed) with the weights: one matrix product per plane."""
        w_sums = w_bits.sum(1, dtype=np.int64)[None, :]
        acc = np.zeros((fields.shape[1], w_bits.shape[0]), dtype=np.int64)
        for plane, packed in enumerate(fields):
            a_bits = np.unpackbits(packed, axis=1, bitorder="little").astype(np.float32)
            # popcount(XNOR) = n − Σa − Σw + 2·a·w: integers below 2**24 (n = K·simd
            # bits), exact in float32
            n = a_bits.shape[1]
            assert n < 1 << 24
            products = (a_bits @ w_bits.T).astype(np.int64)
            popcount = n - a_bits.sum(1, dtype=np.int64)[:, None] - w_sums + 2 * products
            acc += popcount << plane
        return acc & ((1 << self.config.acc_width) - 1)

    def _threshold_table(self, d: LayerDescriptor, tiles: int) -> np.ndarray:
        """int64 ``R × tiles·cols × L`` (``R = 2**shortcut_bits``, ``L = 2**out_bits −
        1``): entry ``threshold_base + t·R + r`` (wrapped) holds the row of shortcut level
        ``r`` of tile ``t``; an unreadable entry compares with 0. Contract 1: threshold 0
        of entry ``threshold_base + t``."""
        c = self.config
        rows = d.threshold_rows
        used = (1 << d.out_bits) - 1 if d.extended else 1
        taddr = _wrap(d.threshold_base + np.arange(tiles * rows), c.threshold_depth)
        table = np.zeros((tiles * rows, c.cols, used), dtype=np.int64)
        tinside = taddr < c.threshold_depth
        table[tinside] = self.thresholds[taddr[tinside], :, :used]
        return table.reshape(tiles, rows, c.cols, used).transpose(1, 0, 2, 3).reshape(
            rows, tiles * c.cols, used)
