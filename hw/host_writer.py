"""The host's memory writes: WRITE_WEIGHTS, WRITE_THRESHOLDS and WRITE_ACTIVATIONS payloads
into their memories as the bytes stream in (docs/protocol.md)."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.protocol import MAX_PAYLOAD, Opcode

from .memory import column_write_signature, threshold_layout
from .pe import valid_stream_signature

__all__ = ["HostWriter"]


class HostWriter(wiring.Component):
    """Writes the entries of a WRITE_* frame to their memory as its bytes arrive.

    A frame's payload is a u32 LE address, then whole entries: ``simd / 8`` bytes per
    weight word (``cols`` words, column 0 first, per weight entry), ``ceil(
    thresholds_per_channel · threshold_width / 8)`` bytes per threshold column (``cols``
    per entry), ``simd / 8`` bytes per activation word. The entries are written from the
    frame's address on, as the bytes arrive (provisionally: a frame that ends in ABORT has
    written what it carried).

    Each write passes one register: the entry is written the cycle after its last byte
    (the decoder's event logic, the range checks and the memories' write enables had been
    one path, the iCE40's critical one), while the frame's CRC bytes are still to come.

    Parameters
    ----------
    config : AcceleratorConfig
    activation_words : int or None
        The words WRITE_ACTIVATIONS addresses (and range-checks): by default
        ``config.activation_depth`` (contract 1: the bank the caller selects); a contract-2
        executor passes ``activation_slots · activation_depth`` (all slots, flat).

    Members
    -------
    start : ``In(1)``
        A frame starts: the entry position and ``error`` are cleared.
    opcode : ``In(8)``
        The frame's opcode, held while its payload arrives; other opcodes write nothing.
    address : ``In(32)``
        The frame's address, taken while ``address_valid`` is high.
    address_valid : ``In(1)``
    data : ``In(valid_stream_signature(8))``
        A payload byte after the address.
    weights : ``In(column_write_signature(...))``
        To the weight memory's ``write``.
    thresholds : ``In(column_write_signature(...))``
        To the threshold memory's ``write``.
    activations : ``In(WritePort.Signature(addr_width=, shape=simd))``
        For the activation memory's ``write`` (``activation_words`` words; contract 1: the
        bank the next layer reads, the caller selects it).
    error : ``Out(1)``
        The frame wrote outside its memory or ended inside an entry (BAD_ADDRESS).

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    ValueError
        If ``activation_words`` is not a positive integer.
    """

    ADDRESS_BYTES = 4

    def __init__(self, *, config: AcceleratorConfig, activation_words: int | None = None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if activation_words is None:
            activation_words = config.activation_depth
        if (isinstance(activation_words, bool) or not isinstance(activation_words, int)
                or activation_words < 1):
            raise ValueError(f"activation_words must be a positive integer, not "
                             f"{activation_words!r}")
        self._config = c = config
        self._activation_words = activation_words
        thr_bits = c.thresholds_per_channel * c.threshold_width
        # (bytes per word, words per entry, depth) of each target
        self._targets = {
            Opcode.WRITE_WEIGHTS: (c.simd // 8, c.cols, c.weight_depth),
            Opcode.WRITE_THRESHOLDS: (-(-thr_bits // 8), c.cols, c.threshold_depth),
            Opcode.WRITE_ACTIVATIONS: (c.simd // 8, 1, activation_words),
        }

        def aw(depth):
            return max(1, (depth - 1).bit_length())

        super().__init__({
            "start": In(1),
            "opcode": In(8),
            "address": In(32),
            "address_valid": In(1),
            "data": In(valid_stream_signature(8)),
            "weights": In(column_write_signature(aw(c.weight_depth), c.cols, c.simd)),
            "thresholds": In(column_write_signature(aw(c.threshold_depth), c.cols,
                                                    threshold_layout(c))),
            "activations": In(WritePort.Signature(addr_width=aw(activation_words),
                                                  shape=c.simd)),
            "error": Out(1),
        })

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    @property
    def activation_words(self) -> int:
        """The words WRITE_ACTIVATIONS addresses."""
        return self._activation_words

    def elaborate(self, platform):
        m = Module()
        c = self._config
        targets = self._targets
        word_bytes = max(t[0] for t in targets.values())
        # the entry being written: `waddr` counts from the frame's address when that is
        # below 2**(w − 1) (≥ every depth and ≥ the entries of a frame, so it never wraps),
        # otherwise `whigh` marks the whole frame out of range
        max_depth = max(c.weight_depth, c.threshold_depth, self._activation_words)
        waddr = Signal(max(max_depth, MAX_PAYLOAD).bit_length() + 1)
        whigh = Signal()
        byte_idx = Signal(range(max(word_bytes, 2)))      # byte of the word
        column = Signal(range(max(c.cols, 2)))
        bad = Signal()                                     # a write left its memory
        word = Signal(8 * word_bytes)
        full_word = Signal(8 * word_bytes)
        m.d.comb += self.error.eq(bad | (byte_idx != 0) | (column != 0))

        with m.If(self.start):
            m.d.sync += [byte_idx.eq(0), column.eq(0), bad.eq(0)]
        with m.If(self.address_valid):
            m.d.sync += [waddr.eq(self.address),
                         whigh.eq(self.address[len(waddr) - 1:] != 0)]

        enables = {}
        with m.Switch(self.opcode):
            for op, (nbytes, ncols, depth) in targets.items():
                en = enables[op] = Signal(name=f"{op.name.lower()}_en")
                with m.Case(op):
                    m.d.comb += full_word.eq(Cat(word[:8 * (nbytes - 1)], self.data.payload))
                    with m.If(self.data.valid):
                        for k in range(nbytes - 1):
                            with m.If(byte_idx == k):
                                m.d.sync += word[8 * k:8 * k + 8].eq(self.data.payload)
                        with m.If(byte_idx == nbytes - 1):
                            in_range = ~whigh & (waddr < depth)
                            m.d.comb += en.eq(in_range)
                            m.d.sync += [byte_idx.eq(0), bad.eq(bad | ~in_range)]
                            with m.If(column == ncols - 1):
                                m.d.sync += [column.eq(0), waddr.eq(waddr + 1)]
                            with m.Else():
                                m.d.sync += column.eq(column + 1)
                        with m.Else():
                            m.d.sync += byte_idx.eq(byte_idx + 1)

        # the register stage between the bytes and the memories' write ports
        w_en = {op: Signal(name=f"{op.name.lower()}_write") for op in targets}
        w_addr = Signal.like(waddr)
        w_column = Signal.like(column)
        w_data = Signal.like(full_word)
        m.d.sync += [w_en[op].eq(enables[op]) for op in targets]
        m.d.sync += [w_addr.eq(waddr), w_column.eq(column), w_data.eq(full_word)]
        for port, op in ((self.weights, Opcode.WRITE_WEIGHTS),
                         (self.thresholds, Opcode.WRITE_THRESHOLDS)):
            m.d.comb += [port.en.eq(w_en[op]), port.addr.eq(w_addr),
                         port.column.eq(w_column), port.data.eq(w_data)]
        m.d.comb += [self.activations.en.eq(w_en[Opcode.WRITE_ACTIVATIONS]),
                     self.activations.addr.eq(w_addr),
                     self.activations.data.eq(w_data)]
        return m
