"""Top level of the accelerator without the UART: commands in, responses out, as bytes.

:class:`CommandExecutor` joins :class:`~bitdet.hw.decoder.CommandDecoder`,
:class:`~bitdet.hw.decoder.ResponseEncoder`, the weight and threshold column memories,
the ping-pong :class:`~bitdet.hw.memory.ActivationBuffer` and the
:class:`~bitdet.hw.controller.LayerController`, and executes the commands of
``docs/protocol.md`` (payload layouts there and in :mod:`bitdet.sw.protocol`):

* ``IDENTIFY`` → :class:`~bitdet.sw.protocol.IdentifyReply` of the config (constant bytes);
* ``WRITE_WEIGHTS`` / ``WRITE_THRESHOLDS`` / ``WRITE_ACTIVATIONS``: address u32 LE, then
  whole entries, written to memory as the bytes arrive (provisionally: a frame that ends
  in ABORT has written what it carried, the host resends it);
* ``CONFIGURE_LAYER``: a 32-byte descriptor (:func:`~bitdet.sw.protocol.encode_layer`),
  checked against the build's limits;
* ``RUN_LAYER``: runs the configured layer, flips the ping-pong select, answers the
  busy / stall cycle counts;
* ``READ_ACTIVATIONS``: words of the bank the next layer reads, streamed from memory into
  the response;
* ``READ_COUNTERS``, ``RESET``; ``RUN_NETWORK`` and ``READ_RESULTS`` are not implemented
  and answer ``UNKNOWN_OPCODE``.

Commands are executed one at a time: while a command executes (a layer runs, a response
goes out) the executor takes no decoder event, so the decoder stalls its input (the host
sends one command and waits for its response, docs/protocol.md).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from bitdet.sw.protocol import (
    COUNTERS_SIZE,
    LAYER_DESCRIPTOR_SIZE,
    LAYER_FLAG_PAD_BIT,
    MAX_PAYLOAD,
    ErrorCode,
    IdentifyReply,
    Opcode,
    threshold_entry_bytes,
    weight_entry_bytes,
)

from .config import AcceleratorConfig
from .controller import LayerController
from .decoder import CommandDecoder, DecoderEvent, ResponseEncoder, timeout_cycles
from .memory import activation_buffer, threshold_memory, weight_memory

__all__ = ["CommandExecutor"]

_ADDRESS_BYTES = 4
_SMALL_BYTES = max(IdentifyReply.SIZE, COUNTERS_SIZE)


class CommandExecutor(wiring.Component):
    """The accelerator core on a byte stream: frames in on ``i``, responses out on ``o``.

    Parameters
    ----------
    config : AcceleratorConfig
    timeout_cycles : int or None
        The decoder's inter-byte timeout in clock cycles; by default
        ``timeout_cycles(config.clock_hz, config.baud)``.

    Members
    -------
    i : ``In(stream.Signature(8))``
        Bytes from the host (a UART receiver, or a simulation).
    o : ``Out(stream.Signature(8))``
        Bytes to the host.
    select : ``Out(1)``
        The activation bank the next layer reads (for observation).
    busy : ``Out(1)``
        A layer is running.
    """

    def __init__(self, config: AcceleratorConfig, *, timeout_cycles: int | None = None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        self._timeout = timeout_cycles
        super().__init__({
            "i": In(stream.Signature(8)),
            "o": Out(stream.Signature(8)),
            "select": Out(1),
            "busy": Out(1),
        })

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    # -- host-side sizes (the same numbers the hardware uses) ---------------------------------
    @property
    def weight_entry_bytes(self) -> int:
        return weight_entry_bytes(self._config.simd, self._config.cols)

    @property
    def threshold_entry_bytes(self) -> int:
        c = self._config
        return threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel, c.cols)

    @property
    def activation_word_bytes(self) -> int:
        return self._config.simd // 8

    def elaborate(self, platform):
        m = Module()
        c = self._config
        timeout = self._timeout
        if timeout is None:
            timeout = timeout_cycles(c.clock_hz, c.baud)

        dec = m.submodules.decoder = CommandDecoder(timeout_cycles=timeout)
        enc = m.submodules.encoder = ResponseEncoder()
        ctrl = m.submodules.controller = LayerController(config=c)
        wmem = m.submodules.weights = weight_memory(c)
        tmem = m.submodules.thresholds = threshold_memory(c)
        buf = m.submodules.activations = activation_buffer(c)

        wiring.connect(m, wiring.flipped(self.i), dec.i)
        wiring.connect(m, enc.o, wiring.flipped(self.o))
        wiring.connect(m, dec.error, enc.error)
        wiring.connect(m, ctrl.weights, wmem.read)
        wiring.connect(m, ctrl.thresholds, tmem.read)
        for r in range(1, c.rows):
            wiring.connect(m, ctrl.act_read[r], buf.read[r])
        wiring.connect(m, ctrl.act_write, buf.write)

        ev = dec.o.payload
        resp = enc.response

        # -- state -------------------------------------------------------------------------
        opcode = Signal(8)
        length = Signal(16)
        index = Signal(16)                                 # payload byte of the DATA event
        args = Signal(8 * LAYER_DESCRIPTOR_SIZE)           # small payloads, byte i at 8·i
        waddr = Signal(33)                                 # entry being written
        byte_idx = Signal(16)                              # byte within the word / read word
        column = Signal(range(max(c.cols, 2)))
        bad = Signal()                                     # a write left its memory
        sel = Signal()                                     # bank the next layer reads
        configured = Signal()
        running = Signal()
        last_busy = Signal(32)
        last_stall = Signal(32)
        desc = Signal(ctrl.descriptor_layout)

        status = Signal(8)
        resp_len = Signal(16)
        small = Signal(8 * _SMALL_BYTES)                   # data of short responses
        count = Signal(16)                                 # data bytes / words left
        raddr = Signal(buf.addr_width)

        m.d.comb += [self.select.eq(sel), self.busy.eq(running),
                     resp.payload.opcode.eq(opcode), resp.payload.status.eq(status),
                     resp.payload.length.eq(resp_len)]

        # -- memory writes, as the payload streams in ------------------------------------
        act_bytes = c.simd // 8
        thr_bits = c.thresholds_per_channel * c.threshold_width
        targets = {
            Opcode.WRITE_WEIGHTS: (c.simd // 8, c.cols, c.weight_depth),
            Opcode.WRITE_THRESHOLDS: (-(-thr_bits // 8), c.cols, c.threshold_depth),
            Opcode.WRITE_ACTIVATIONS: (act_bytes, 1, c.activation_depth),
        }
        word_bytes = max(t[0] for t in targets.values())
        word = Signal(8 * word_bytes)
        data_event = Signal()
        m.d.comb += data_event.eq(dec.o.valid & dec.o.ready & (ev.event == DecoderEvent.DATA))
        writing = data_event & (index >= _ADDRESS_BYTES)

        wmem_en = Signal()
        tmem_en = Signal()
        amem_en = Signal()
        full_word = Signal(8 * word_bytes)
        with m.Switch(opcode):
            for op, (nbytes, ncols, depth) in targets.items():
                with m.Case(op):
                    m.d.comb += full_word.eq(Cat(word[:8 * (nbytes - 1)], ev.data))
                    with m.If(writing):
                        for k in range(nbytes - 1):
                            with m.If(byte_idx == k):
                                m.d.sync += word[8 * k:8 * k + 8].eq(ev.data)
                        with m.If(byte_idx == nbytes - 1):
                            in_range = waddr < depth
                            en = {Opcode.WRITE_WEIGHTS: wmem_en,
                                  Opcode.WRITE_THRESHOLDS: tmem_en,
                                  Opcode.WRITE_ACTIVATIONS: amem_en}[op]
                            m.d.comb += en.eq(in_range)
                            m.d.sync += [byte_idx.eq(0), bad.eq(bad | ~in_range)]
                            with m.If(column == ncols - 1):
                                m.d.sync += [column.eq(0), waddr.eq(waddr + 1)]
                            with m.Else():
                                m.d.sync += column.eq(column + 1)
                        with m.Else():
                            m.d.sync += byte_idx.eq(byte_idx + 1)
        m.d.comb += [
            wmem.write.en.eq(wmem_en), wmem.write.addr.eq(waddr),
            wmem.write.column.eq(column), wmem.write.data.eq(full_word),
            tmem.write.en.eq(tmem_en), tmem.write.addr.eq(waddr),
            tmem.write.column.eq(column), tmem.write.data.eq(full_word),
        ]
        # WRITE_ACTIVATIONS writes the bank the next layer reads: the buffer's write port
        # writes bank 1 − select, so select is flipped while such a frame streams in (the
        # controller is idle then). Otherwise the controller owns the write port.
        act_frame = Signal()
        m.d.comb += act_frame.eq(~running & (opcode == Opcode.WRITE_ACTIVATIONS))
        with m.If(act_frame):
            m.d.comb += [buf.select.eq(~sel), buf.write.en.eq(amem_en),
                         buf.write.addr.eq(waddr), buf.write.data.eq(full_word)]
        with m.Else():
            m.d.comb += buf.select.eq(sel)

        # row 0's read port: the controller's while a layer runs, READ_ACTIVATIONS' otherwise
        read_en = Signal()
        m.d.comb += [
            buf.read[0].addr.eq(Mux(running, ctrl.act_read[0].addr, raddr)),
            buf.read[0].en.eq(Mux(running, ctrl.act_read[0].en, read_en)),
            ctrl.act_read[0].data.eq(buf.read[0].data),
        ]

        # -- argument fields ----------------------------------------------------------------
        def arg(offset, size):
            return args[8 * offset:8 * (offset + size)]

        def respond(code, nbytes=0):
            m.d.sync += [status.eq(code), resp_len.eq(nbytes)]
            m.next = "RESPOND"

        identify = int.from_bytes(IdentifyReply.for_config(c).pack(), "little")
        m.d.comb += ctrl.layer.eq(desc)

        with m.FSM(name="executor"):
            with m.State("RECEIVE"):
                m.d.comb += dec.o.ready.eq(1)
                with m.If(dec.o.valid):
                    with m.Switch(ev.event):
                        with m.Case(DecoderEvent.START):
                            m.d.sync += [opcode.eq(ev.opcode), length.eq(ev.length),
                                         index.eq(0), byte_idx.eq(0), column.eq(0),
                                         bad.eq(0), args.eq(0)]
                        with m.Case(DecoderEvent.DATA):
                            m.d.sync += index.eq(index + 1)
                            for k in range(LAYER_DESCRIPTOR_SIZE):
                                with m.If(index == k):
                                    m.d.sync += args[8 * k:8 * k + 8].eq(ev.data)
                            with m.If(index == _ADDRESS_BYTES - 1):
                                m.d.sync += waddr.eq(Cat(args[:24], ev.data))
                        with m.Case(DecoderEvent.COMMIT):
                            m.next = "EXECUTE"
                        # ABORT: the decoder answers; what was written stays provisional

            with m.State("EXECUTE"):
                with m.Switch(opcode):
                    with m.Case(Opcode.IDENTIFY):
                        m.d.sync += small.eq(identify)
                        respond(ErrorCode.OK, IdentifyReply.SIZE)
                    with m.Case(Opcode.RESET):
                        m.d.sync += [sel.eq(0), configured.eq(0), last_busy.eq(0),
                                     last_stall.eq(0)]
                        respond(ErrorCode.OK)
                    with m.Case(Opcode.WRITE_WEIGHTS, Opcode.WRITE_THRESHOLDS,
                                Opcode.WRITE_ACTIVATIONS):
                        incomplete = (byte_idx != 0) | (column != 0)
                        respond(Mux(bad | incomplete, ErrorCode.BAD_ADDRESS, ErrorCode.OK))
                    with m.Case(Opcode.CONFIGURE_LAYER):
                        self._configure(m, c, ctrl, arg, length, desc, configured, respond)
                    with m.Case(Opcode.RUN_LAYER):
                        with m.If((length != 0) & (arg(0, 1) != 0)):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif(~configured):
                            respond(ErrorCode.NOT_CONFIGURED)
                        with m.Else():
                            m.d.comb += ctrl.start.eq(1)
                            m.d.sync += running.eq(1)
                            m.next = "RUN"
                    with m.Case(Opcode.READ_ACTIVATIONS):
                        address = arg(0, 4)
                        words = arg(4, 2)
                        nbytes = words * act_bytes
                        m.d.sync += [raddr.eq(address), count.eq(words), byte_idx.eq(0)]
                        with m.If(nbytes > MAX_PAYLOAD - 1):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif(address + words > c.activation_depth):
                            respond(ErrorCode.BAD_ADDRESS)
                        with m.Else():
                            respond(ErrorCode.OK, nbytes)
                    with m.Case(Opcode.READ_COUNTERS):
                        m.d.sync += small.eq(Cat(last_busy, last_stall))
                        respond(ErrorCode.OK, COUNTERS_SIZE)
                    with m.Default():                       # RUN_NETWORK, READ_RESULTS
                        respond(ErrorCode.UNKNOWN_OPCODE)

            with m.State("RUN"):
                with m.If(ctrl.done):
                    m.d.sync += [running.eq(0), sel.eq(~sel),
                                 last_busy.eq(ctrl.busy_cycles),
                                 last_stall.eq(ctrl.stall_cycles),
                                 small.eq(Cat(ctrl.busy_cycles, ctrl.stall_cycles))]
                    respond(ErrorCode.OK, COUNTERS_SIZE)

            with m.State("RESPOND"):
                m.d.comb += resp.valid.eq(1)
                with m.If(resp.ready):
                    m.d.sync += byte_idx.eq(0)
                    with m.If(resp_len == 0):
                        m.next = "RECEIVE"
                    with m.Elif(opcode == Opcode.READ_ACTIVATIONS):
                        m.next = "FETCH"
                    with m.Else():
                        m.next = "SMALL"

            with m.State("SMALL"):
                m.d.comb += [enc.data.valid.eq(1),
                             enc.data.payload.eq(small.word_select(byte_idx, 8))]
                with m.If(enc.data.ready):
                    m.d.sync += byte_idx.eq(byte_idx + 1)
                    with m.If(byte_idx == resp_len - 1):
                        m.next = "RECEIVE"

            with m.State("FETCH"):
                m.d.comb += read_en.eq(1)
                m.next = "SEND"

            with m.State("SEND"):
                m.d.comb += [enc.data.valid.eq(1),
                             enc.data.payload.eq(buf.read[0].data.word_select(
                                 byte_idx[:max(1, (act_bytes - 1).bit_length())], 8))]
                with m.If(enc.data.ready):
                    with m.If(byte_idx == act_bytes - 1):
                        m.d.sync += [byte_idx.eq(0), raddr.eq(raddr + 1), count.eq(count - 1)]
                        with m.If(count == 1):
                            m.next = "RECEIVE"
                        with m.Else():
                            m.next = "FETCH"
                    with m.Else():
                        m.d.sync += byte_idx.eq(byte_idx + 1)
        return m

    @staticmethod
    def _configure(m, c, ctrl, arg, length, desc, configured, respond):
        """CONFIGURE_LAYER: check what is cheap to check, then latch the descriptor."""
        in_h, in_w, channels = arg(0, 2), arg(2, 2), arg(4, 2)
        out_h, out_w, out_channels = arg(6, 2), arg(8, 2), arg(10, 2)
        kernel, stride, padding, flags = arg(12, 1), arg(13, 1), arg(14, 1), arg(15, 1)
        input_base, output_base = arg(16, 4), arg(20, 4)
        weight_base, threshold_base = arg(24, 4), arg(28, 4)
        zero = ((in_h == 0) | (in_w == 0) | (channels == 0) | (out_h == 0) | (out_w == 0)
                | (out_channels == 0) | (kernel == 0) | (stride == 0))
        # only the pad bit is supported: raw mode needs READ_RESULTS
        bad_flags = (flags & ~Const(LAYER_FLAG_PAD_BIT, 8)) != 0
        too_big = ((kernel > c.max_kernel) | (stride > c.max_stride)
                   | (padding > c.max_kernel - 1)
                   | (channels > c.max_channels) | (out_channels > c.max_channels)
                   | (in_h > c.activation_depth) | (in_w > c.activation_depth)
                   | (out_h > c.activation_depth) | (out_w > c.activation_depth)
                   | (input_base >= c.activation_depth) | (output_base >= c.activation_depth)
                   | (weight_base >= c.weight_depth)
                   | (threshold_base >= c.threshold_depth))
        # geometry: out = floor((in + 2·padding − kernel) / stride) + 1, i.e.
        # (out − 1)·stride + kernel ≤ in + 2·padding < out·stride + kernel (small products)
        dim = c.activation_depth.bit_length()
        geometry = Const(1, 1)
        for size, out in ((in_h, out_h), (in_w, out_w)):
            span = size[:dim] + 2 * padding[:3]
            reach = out[:dim] * stride[:3]
            geometry = geometry & (reach - stride + kernel <= span) & (span < reach + kernel)
        # the maps fit a bank (this also bounds a layer's run time)
        area = ((in_h[:dim] * in_w[:dim] > c.activation_depth)
                | (out_h[:dim] * out_w[:dim] > c.activation_depth))
        with m.If(length != LAYER_DESCRIPTOR_SIZE):
            m.d.sync += configured.eq(0)
            respond(ErrorCode.BAD_LENGTH)
        with m.Elif(zero | bad_flags):
            m.d.sync += configured.eq(0)
            respond(ErrorCode.BAD_ARGUMENT)
        with m.Elif(too_big | area):
            m.d.sync += configured.eq(0)
            respond(ErrorCode.LAYER_DOES_NOT_FIT)
        with m.Elif(~geometry):
            m.d.sync += configured.eq(0)
            respond(ErrorCode.BAD_ARGUMENT)
        with m.Else():
            m.d.sync += [
                configured.eq(1),
                desc.in_h.eq(in_h), desc.in_w.eq(in_w), desc.channels.eq(channels),
                desc.out_h.eq(out_h), desc.out_w.eq(out_w),
                desc.out_channels.eq(out_channels), desc.kernel.eq(kernel),
                desc.stride.eq(stride), desc.padding.eq(padding), desc.pad_bit.eq(flags[0]),
                desc.input_base.eq(input_base), desc.output_base.eq(output_base),
                desc.weight_base.eq(weight_base), desc.threshold_base.eq(threshold_base),
                desc.raw.eq(0),
            ]
            respond(ErrorCode.OK)
