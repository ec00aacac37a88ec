"""Top level of the accelerator without the UART: commands in, responses out, as bytes.

:class:`CommandExecutor` joins :class:`~bitdet.hw.decoder.CommandDecoder`,
:class:`~bitdet.hw.decoder.ResponseEncoder`, the weight and threshold column memories,
the ping-pong :class:`~bitdet.hw.memory.ActivationBuffer`, the
:class:`~bitdet.hw.controller.LayerController` (binary convolutions), the
:class:`~bitdet.hw.pool.PoolEngine` (binary max-pool passes) and a layer table, and
executes the commands of ``docs/protocol.md`` (payload layouts there and in
:mod:`bitdet.core.protocol`):

* ``IDENTIFY`` → :class:`~bitdet.core.protocol.IdentifyReply` of the config (constant bytes);
* ``WRITE_WEIGHTS`` / ``WRITE_THRESHOLDS`` / ``WRITE_ACTIVATIONS``: address u32 LE, then
  whole entries, written to memory as the bytes arrive (provisionally: a frame that ends
  in ABORT has written what it carried, the host resends it);
* ``CONFIGURE_LAYER``: a 32-byte descriptor (:func:`~bitdet.core.protocol.encode_layer`),
  a convolution or (flag ``LAYER_FLAG_POOL``) a pool pass, checked against the build's
  limits and stored in entry 0 of the layer table; 33 bytes ``[index] + descriptor``
  store it in entry ``index`` (``LAYER_TABLE_ENTRIES`` entries);
* ``RUN_LAYER [index]``: runs table entry ``index`` (default 0) on the controller or the
  pool engine, flips the ping-pong select, answers the busy / stall cycle counts;
* ``RUN_NETWORK n``: runs entries ``0 … n − 1`` back to back (each flips the select),
  answers the summed counts;
* ``READ_ACTIVATIONS``: words of the bank the next layer reads, streamed from memory into
  the response;
* ``READ_COUNTERS``, ``RESET``; ``READ_RESULTS`` is not implemented and answers
  ``UNKNOWN_OPCODE``.

Commands are executed one at a time: while a command executes (a layer runs, a response
goes out) the executor takes no decoder event, so the decoder stalls its input (the host
sends one command and waits for its response, docs/protocol.md).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.protocol import (
    COUNTERS_SIZE,
    LAYER_DESCRIPTOR_SIZE,
    LAYER_FLAG_PAD_BIT,
    LAYER_FLAG_POOL,
    LAYER_TABLE_ENTRIES,
    MAX_PAYLOAD,
    ErrorCode,
    IdentifyReply,
    Opcode,
    threshold_entry_bytes,
    weight_entry_bytes,
)

from .controller import LayerController
from .decoder import CommandDecoder, DecoderEvent, ResponseEncoder, timeout_cycles
from .memory import activation_buffer, threshold_memory, weight_memory
from .pool import PoolEngine, pool_max_kernel
from .window import mul_small

__all__ = ["CommandExecutor"]

# CONFIGURE_LAYER's registered outcome (CommandExecutor._configure_decision)
_CFG_OK, _CFG_BAD_LENGTH, _CFG_BAD_INDEX, _CFG_REFUSED, _CFG_TOO_LARGE, _CFG_MISFIT = range(6)
_CFG_CODES = 6

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

    @property
    def layer_table_entries(self) -> int:
        """Entries of the layer table (:data:`~bitdet.core.protocol.LAYER_TABLE_ENTRIES`)."""
        return LAYER_TABLE_ENTRIES

    def elaborate(self, platform):
        m = Module()
        c = self._config
        timeout = self._timeout
        if timeout is None:
            timeout = timeout_cycles(c.clock_hz, c.baud)

        dec = m.submodules.decoder = CommandDecoder(timeout_cycles=timeout)
        enc = m.submodules.encoder = ResponseEncoder()
        # embedded: the engines read the descriptor from `args` (held while they run) and
        # the executor counts their busy / stall cycles itself
        ctrl = m.submodules.controller = LayerController(config=c, embedded=True)
        pool = m.submodules.pool = PoolEngine(config=c, embedded=True)
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

        ev = dec.o.payload
        resp = enc.response

        # -- state -------------------------------------------------------------------------
        opcode = Signal(8)
        length = Signal(16)
        index = Signal(range(MAX_PAYLOAD + 1))             # payload byte of the DATA event
        # the payload bytes shift in from the top: after a payload of n ≤ 32 bytes its
        # byte i is at 8·(32 − n + i); a descriptor (the last 32 bytes of CONFIGURE_LAYER)
        # fills it, byte i at 8·i
        args = Signal(8 * LAYER_DESCRIPTOR_SIZE)
        arg_clear = Signal()
        arg_shift = Signal()
        arg_byte = Signal(8)
        with m.If(arg_clear):
            m.d.sync += args.eq(0)
        with m.Elif(arg_shift):
            m.d.sync += args.eq(Cat(args[8:], arg_byte))
        # the entry being written: `waddr` counts from the frame's address when that is
        # below 2**(w − 1) (≥ every depth and ≥ the entries of a frame, so it never wraps),
        # otherwise `whigh` marks the whole frame out of range
        max_depth = max(c.weight_depth, c.threshold_depth, c.activation_depth)
        waddr = Signal(max(max_depth, MAX_PAYLOAD).bit_length() + 1)
        whigh = Signal()
        byte_idx = Signal(range(max(c.simd // 8, _SMALL_BYTES, -(
            -c.thresholds_per_channel * c.threshold_width // 8)) + 1))  # byte of a word / reply
        column = Signal(range(max(c.cols, 2)))
        bad = Signal()                                     # a write left its memory
        sel = Signal()                                     # bank the next layer reads
        running = Signal()
        last_busy = Signal(32)                             # summed over the running command
        last_stall = Signal(32)
        count_clear = Signal()
        count_busy = Signal()
        count_stall = Signal()
        # the engines' busy / stall flags are registered before they count (the stall flag
        # is the end of the operand handshake's logic; counting it directly was the
        # iCE40's critical path): the counters run one cycle behind the engine and hold
        # the layer's totals from the cycle after its `done`, while the executor is still
        # in RUN's successor state (RESPOND or LOAD) and long before SMALL reads them
        counted_busy = Signal()
        counted_stall = Signal()
        m.d.sync += [counted_busy.eq(count_busy), counted_stall.eq(count_stall)]
        with m.If(count_clear):
            m.d.sync += [last_busy.eq(0), last_stall.eq(0)]
        with m.Else():
            with m.If(counted_busy):
                m.d.sync += last_busy.eq(last_busy + 1)
            with m.If(counted_stall):
                m.d.sync += last_stall.eq(last_stall + 1)
        # the layer table: LAYER_TABLE_ENTRIES descriptors of 32 bytes, stored as received
        # (after the checks) in one byte-wide memory, loaded back into `args` to run
        entries = LAYER_TABLE_ENTRIES
        valid = Signal(entries)                            # entry i holds a checked layer
        entry = Signal(range(entries))                     # entry being stored / run
        table_index = Signal(8)                            # CONFIGURE_LAYER's index byte
        layers_left = Signal(range(entries + 1))
        step = Signal(range(LAYER_DESCRIPTOR_SIZE + 1))    # byte of the entry
        table = m.submodules.layer_table = Memory(
            shape=8, depth=entries * LAYER_DESCRIPTOR_SIZE, init=[])
        table_w = table.write_port()
        table_r = table.read_port()
        table_addr = entry * LAYER_DESCRIPTOR_SIZE + step[:(LAYER_DESCRIPTOR_SIZE - 1)
                                                         .bit_length()]
        m.d.comb += [table_w.addr.eq(table_addr), table_r.addr.eq(table_addr)]

        status = Signal(8)
        resp_len = Signal(16)
        count = Signal(range(MAX_PAYLOAD + 1))             # words left to send
        raddr = Signal(buf.addr_width)
        fetched = Signal(c.simd)                           # READ_ACTIVATIONS' current word

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
                            in_range = ~whigh & (waddr < depth)
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
        # the host's memory writes pass one register (the decoder's event logic, the
        # range checks and the memories' write enables had been one path, the iCE40's
        # critical one): a word is written the cycle after its last byte, while the
        # frame's CRC bytes are still to come
        w_en = Signal()
        t_en = Signal()
        a_en = Signal()
        w_addr = Signal.like(waddr)
        w_column = Signal.like(column)
        w_data = Signal.like(full_word)
        m.d.sync += [w_en.eq(wmem_en), t_en.eq(tmem_en), a_en.eq(amem_en),
                     w_addr.eq(waddr), w_column.eq(column), w_data.eq(full_word)]
        m.d.comb += [
            wmem.write.en.eq(w_en), wmem.write.addr.eq(w_addr),
            wmem.write.column.eq(w_column), wmem.write.data.eq(w_data),
            tmem.write.en.eq(t_en), tmem.write.addr.eq(w_addr),
            tmem.write.column.eq(w_column), tmem.write.data.eq(w_data),
        ]
        # WRITE_ACTIVATIONS writes the bank the next layer reads: the buffer's write port
        # writes bank 1 − select, so select is flipped while such a frame streams in (the
        # controller and the pool engine are idle then). Otherwise the engine that runs
        # (only one at a time) owns the write port.
        act_frame = Signal()
        run_pool = Signal()                                # the running layer is a pool
        m.d.comb += act_frame.eq(~running & (opcode == Opcode.WRITE_ACTIVATIONS))
        with m.If(act_frame):
            m.d.comb += [buf.select.eq(~sel), buf.write.en.eq(a_en),
                         buf.write.addr.eq(w_addr), buf.write.data.eq(w_data)]
        with m.Elif(run_pool):
            m.d.comb += [buf.select.eq(sel), buf.write.en.eq(pool.act_write.en),
                         buf.write.addr.eq(pool.act_write.addr),
                         buf.write.data.eq(pool.act_write.data)]
        with m.Else():
            m.d.comb += [buf.select.eq(sel), buf.write.en.eq(ctrl.act_write.en),
                         buf.write.addr.eq(ctrl.act_write.addr),
                         buf.write.data.eq(ctrl.act_write.data)]

        # row 0's read port: the controller's or the pool engine's while a layer runs,
        # READ_ACTIVATIONS' otherwise
        read_en = Signal()
        m.d.comb += [
            buf.read[0].addr.eq(Mux(running, Mux(run_pool, pool.act_read.addr,
                                                 ctrl.act_read[0].addr), raddr)),
            buf.read[0].en.eq(Mux(running, Mux(run_pool, pool.act_read.en,
                                               ctrl.act_read[0].en), read_en)),
            ctrl.act_read[0].data.eq(buf.read[0].data),
            pool.act_read.data.eq(buf.read[0].data),
        ]

        # -- argument fields ----------------------------------------------------------------
        def arg(offset, size):
            return args[8 * offset:8 * (offset + size)]

        def short_arg(payload, offset, size):
            """Bytes of a payload of `payload` bytes (at the top of `args`)."""
            return arg(LAYER_DESCRIPTOR_SIZE - payload + offset, size)

        def respond(code, nbytes=0):
            m.d.sync += [status.eq(code), resp_len.eq(nbytes)]
            m.next = "RESPOND"

        identify = int.from_bytes(IdentifyReply.for_config(c).pack(), "little")
        # the engines sample their descriptor in the cycle of `start`: a plain decoding of
        # the entry loaded into `args`
        f = self._fields(arg)
        desc = Signal(ctrl.descriptor_layout)
        pdesc = Signal(pool.descriptor_layout)
        is_pool = f["flags"][2]
        m.d.comb += [
            desc.in_h.eq(f["in_h"]), desc.in_w.eq(f["in_w"]),
            desc.channels.eq(f["channels"]), desc.out_h.eq(f["out_h"]),
            desc.out_w.eq(f["out_w"]), desc.out_channels.eq(f["out_channels"]),
            desc.kernel.eq(f["kernel"]), desc.stride.eq(f["stride"]),
            desc.padding.eq(f["padding"]), desc.pad_bit.eq(f["flags"][0]),
            desc.input_base.eq(f["input_base"]), desc.output_base.eq(f["output_base"]),
            desc.weight_base.eq(f["weight_base"]),
            desc.threshold_base.eq(f["threshold_base"]), desc.raw.eq(0),
            pdesc.in_h.eq(f["in_h"]), pdesc.in_w.eq(f["in_w"]),
            pdesc.channels.eq(f["channels"]), pdesc.out_h.eq(f["out_h"]),
            pdesc.out_w.eq(f["out_w"]), pdesc.kernel.eq(f["kernel"]),
            pdesc.stride.eq(f["stride"]), pdesc.input_base.eq(f["input_base"]),
            pdesc.output_base.eq(f["output_base"]),
            ctrl.layer.eq(desc), pool.layer.eq(pdesc),
        ]
        # CONFIGURE_LAYER of 33 bytes: [index] + descriptor; the descriptor's 32 bytes are
        # the last ones shifted in, at the offsets of a 32-byte one
        shift = Signal()
        m.d.comb += shift.eq((opcode == Opcode.CONFIGURE_LAYER)
                             & (length == LAYER_DESCRIPTOR_SIZE + 1))

        checks = self._checks(m, c, f)
        decision = self._configure_decision(m, checks, length, table_index)

        with m.FSM(name="executor"):
            with m.State("RECEIVE"):
                m.d.comb += dec.o.ready.eq(1)
                with m.If(dec.o.valid):
                    with m.Switch(ev.event):
                        with m.Case(DecoderEvent.START):
                            m.d.sync += [opcode.eq(ev.opcode), length.eq(ev.length),
                                         index.eq(0), byte_idx.eq(0), column.eq(0),
                                         bad.eq(0)]
                            m.d.comb += arg_clear.eq(1)
                        with m.Case(DecoderEvent.DATA):
                            m.d.sync += index.eq(index + 1)
                            m.d.comb += [arg_shift.eq(1), arg_byte.eq(ev.data)]
                            with m.If(shift & (index == 0)):
                                m.d.sync += table_index.eq(ev.data)
                            with m.If(index == _ADDRESS_BYTES - 1):
                                address = Cat(short_arg(_ADDRESS_BYTES - 1, 0, 3), ev.data)
                                m.d.sync += [waddr.eq(address),
                                             whigh.eq(address[len(waddr) - 1:] != 0)]
                        with m.Case(DecoderEvent.COMMIT):
                            m.next = "EXECUTE"
                        # ABORT: the decoder answers; what was written stays provisional

            with m.State("EXECUTE"):
                with m.Switch(opcode):
                    with m.Case(Opcode.IDENTIFY):
                        respond(ErrorCode.OK, IdentifyReply.SIZE)
                    with m.Case(Opcode.RESET):
                        m.d.sync += [sel.eq(0), valid.eq(0)]
                        m.d.comb += count_clear.eq(1)
                        respond(ErrorCode.OK)
                    with m.Case(Opcode.WRITE_WEIGHTS, Opcode.WRITE_THRESHOLDS,
                                Opcode.WRITE_ACTIVATIONS):
                        incomplete = (byte_idx != 0) | (column != 0)
                        respond(Mux(bad | incomplete, ErrorCode.BAD_ADDRESS, ErrorCode.OK))
                    with m.Case(Opcode.CONFIGURE_LAYER):
                        self._configure(m, decision, valid, entry, step, respond)
                    with m.Case(Opcode.RUN_LAYER):
                        which = short_arg(1, 0, 1)         # 0 without a payload (args cleared)
                        with m.If(which >= entries):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif(~valid.bit_select(which[:(entries - 1).bit_length()], 1)):
                            respond(ErrorCode.NOT_CONFIGURED)
                        with m.Else():
                            m.d.sync += [entry.eq(which), layers_left.eq(1), step.eq(0)]
                            m.d.comb += count_clear.eq(1)
                            m.next = "LOAD"
                    with m.Case(Opcode.RUN_NETWORK):
                        n = short_arg(1, 0, 1)
                        needed = Cat(n > i for i in range(entries))
                        with m.If((n == 0) | (n > entries)):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif((valid & needed) != needed):
                            respond(ErrorCode.NOT_CONFIGURED)
                        with m.Else():
                            m.d.sync += [entry.eq(0), layers_left.eq(n), step.eq(0)]
                            m.d.comb += count_clear.eq(1)
                            m.next = "LOAD"
                    with m.Case(Opcode.READ_ACTIVATIONS):
                        address = short_arg(6, 0, 4)
                        words = short_arg(6, 4, 2)
                        # act_bytes is a power of two (simd / 8, simd a multiple of 8 up
                        # to 1024 is not always one: a constant product either way)
                        nbytes = words * act_bytes
                        # with nbytes < MAX_PAYLOAD, words is small: the sum needs only
                        # the low bits of the address and whether it has higher ones
                        low = max(c.activation_depth, MAX_PAYLOAD).bit_length()
                        m.d.sync += [raddr.eq(address), count.eq(words), byte_idx.eq(0)]
                        with m.If(nbytes > MAX_PAYLOAD - 1):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif((address[low:] != 0)
                                    | (address[:low] + words[:low] > c.activation_depth)):
                            respond(ErrorCode.BAD_ADDRESS)
                        with m.Else():
                            respond(ErrorCode.OK, nbytes)
                    with m.Case(Opcode.READ_COUNTERS):
                        respond(ErrorCode.OK, COUNTERS_SIZE)
                    with m.Default():                       # READ_RESULTS
                        respond(ErrorCode.UNKNOWN_OPCODE)

            with m.State("STORE"):
                # a checked CONFIGURE_LAYER: its 32 bytes into the entry, one per cycle,
                # rotating `args` by a byte each time (it is whole again afterwards)
                m.d.comb += [table_w.en.eq(1), table_w.data.eq(args[:8]),
                             arg_shift.eq(1), arg_byte.eq(args[:8])]
                m.d.sync += step.eq(step + 1)
                with m.If(step == LAYER_DESCRIPTOR_SIZE - 1):
                    m.d.sync += valid.bit_select(entry, 1).eq(1)
                    respond(ErrorCode.OK)

            with m.State("LOAD"):
                # the entry back into `args`: read byte `step`, take byte `step − 1`
                m.d.comb += table_r.en.eq(step != LAYER_DESCRIPTOR_SIZE)
                m.d.sync += step.eq(step + 1)
                with m.If(step != 0):
                    m.d.comb += [arg_shift.eq(1), arg_byte.eq(table_r.data)]
                with m.If(step == LAYER_DESCRIPTOR_SIZE):
                    m.next = "START"

            with m.State("START"):
                m.d.comb += [ctrl.start.eq(~is_pool), pool.start.eq(is_pool)]
                m.d.sync += [running.eq(1), run_pool.eq(is_pool)]
                m.next = "RUN"

            with m.State("RUN"):
                # the counters, summed over the layers of the command (u32, wrapping):
                # the engines' busy and stall cycles (only one engine runs)
                m.d.comb += [count_busy.eq(ctrl.busy | pool.busy),
                             count_stall.eq(ctrl.stall | pool.stall)]
                with m.If(Mux(run_pool, pool.done, ctrl.done)):
                    m.d.sync += [running.eq(0), run_pool.eq(0), sel.eq(~sel),
                                 layers_left.eq(layers_left - 1), entry.eq(entry + 1),
                                 step.eq(0)]
                    with m.If(layers_left == 1):
                        respond(ErrorCode.OK, COUNTERS_SIZE)
                    with m.Else():
                        m.next = "LOAD"

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
                # IDENTIFY's constant bytes, or the counters (RUN_*, READ_COUNTERS)
                identify_byte = Const(identify, 8 * IdentifyReply.SIZE).word_select(
                    byte_idx, 8)
                counter_byte = Cat(last_busy, last_stall).word_select(byte_idx[:3], 8)
                m.d.comb += [enc.data.valid.eq(1),
                             enc.data.payload.eq(Mux(opcode == Opcode.IDENTIFY,
                                                     identify_byte, counter_byte))]
                with m.If(enc.data.ready):
                    m.d.sync += byte_idx.eq(byte_idx + 1)
                    with m.If(byte_idx == resp_len - 1):
                        m.next = "RECEIVE"

            with m.State("FETCH"):
                m.d.comb += read_en.eq(1)
                m.next = "LATCH"

            with m.State("LATCH"):
                # the word is registered before its bytes are selected: the block RAM's
                # clock-to-out, the bank multiplexer, the byte select and the encoder's
                # CRC had been one path (the ULX3S' critical one)
                m.d.sync += fetched.eq(buf.read[0].data)
                m.next = "SEND"

            with m.State("SEND"):
                m.d.comb += [enc.data.valid.eq(1),
                             enc.data.payload.eq(fetched.word_select(
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
    def _fields(arg) -> dict:
        """The fields of a 32-byte layer descriptor in ``args`` (protocol.md)."""
        return {
            "in_h": arg(0, 2), "in_w": arg(2, 2), "channels": arg(4, 2),
            "out_h": arg(6, 2), "out_w": arg(8, 2), "out_channels": arg(10, 2),
            "kernel": arg(12, 1), "stride": arg(13, 1), "padding": arg(14, 1),
            "flags": arg(15, 1), "input_base": arg(16, 4), "output_base": arg(20, 4),
            "weight_base": arg(24, 4), "threshold_base": arg(28, 4),
        }

    @staticmethod
    def _checks(m, c, f):
        """CONFIGURE_LAYER's checks of the descriptor in ``args``, registered (a cycle of
        arithmetic of their own): ``(refused, too_large, misfit)``. ``args`` holds the
        descriptor ≥ 2 cycles before EXECUTE (the frame's two CRC bytes follow its
        payload), so there the registers hold its checks."""
        in_h, in_w, channels = f["in_h"], f["in_w"], f["channels"]
        out_h, out_w, out_channels = f["out_h"], f["out_w"], f["out_channels"]
        kernel, stride, padding, flags = f["kernel"], f["stride"], f["padding"], f["flags"]
        input_base, output_base = f["input_base"], f["output_base"]
        weight_base, threshold_base = f["weight_base"], f["threshold_base"]
        pool = flags[2]
        pool_kernel = pool_max_kernel(c)

        def above(value, limit: int):
            """``value > limit`` for a constant ``limit``: the bits above ``limit``'s width
            are any set, or the low bits compare (a narrow comparison, not a wide one)."""
            n = limit.bit_length()
            if len(value) <= n:
                return value > limit
            low = value[:n] > limit if limit != (1 << n) - 1 else Const(0, 1)
            return (value[n:] != 0) | low

        zero = ((in_h == 0) | (in_w == 0) | (channels == 0) | (out_h == 0) | (out_w == 0)
                | (out_channels == 0) | (kernel == 0) | (stride == 0))
        # a conv may set only the pad bit (raw mode needs READ_RESULTS); a pool only its
        # flag, reads no weights or thresholds and keeps the channels
        bad_flags = Mux(pool, (flags != LAYER_FLAG_POOL) | (weight_base != 0)
                        | (threshold_base != 0) | (out_channels != channels),
                        (flags & ~Const(LAYER_FLAG_PAD_BIT, 8)) != 0)
        depth = c.activation_depth
        conv_too_big = (above(kernel, c.max_kernel) | above(stride, c.max_stride)
                        | above(padding, c.max_kernel - 1) | above(out_channels, c.max_channels)
                        | above(weight_base, c.weight_depth - 1)
                        | above(threshold_base, c.threshold_depth - 1))
        pool_too_big = above(kernel, pool_kernel) | above(stride, pool_kernel) | (padding != 0)
        too_big = (Mux(pool, pool_too_big, conv_too_big)
                   | above(channels, c.max_channels)
                   | above(in_h, depth) | above(in_w, depth)
                   | above(out_h, depth) | above(out_w, depth)
                   | above(input_base, depth - 1) | above(output_base, depth - 1))
        # geometry: out = floor((in + 2·padding − kernel) / stride) + 1, i.e.
        # (out − 1)·stride + kernel ≤ in + 2·padding < out·stride + kernel (small products);
        # a pool gets here only with padding 0
        dim = c.activation_depth.bit_length()
        stride_bits = max(c.max_stride, pool_kernel).bit_length()
        # (checked only when nothing is too big: the fields are within their limits)
        geometry = Const(1, 1)
        k = kernel[:max(c.max_kernel, pool_kernel).bit_length()]
        s = stride[:stride_bits]
        for size, out in ((in_h, out_h), (in_w, out_w)):
            # with e = in + 2·padding + stride − out·stride − kernel: 0 ≤ e < stride
            e = Signal(signed(dim + stride_bits + 2))
            m.d.comb += e.eq(size[:dim] + 2 * padding[:c.max_kernel.bit_length()] + s
                             - (mul_small(out[:dim], s) + k))
            geometry = geometry & ~e[-1] & (e[stride_bits:] == 0) & (e[:stride_bits] < s)
        # the maps fit a bank (this also bounds a layer's run time)
        area = ((in_h[:dim] * in_w[:dim] > c.activation_depth)
                | (out_h[:dim] * out_w[:dim] > c.activation_depth))
        refused = Signal()
        too_large = Signal()
        misfit = Signal()
        m.d.sync += [refused.eq(zero | bad_flags), too_large.eq(too_big | area),
                     misfit.eq(~geometry)]
        return refused, too_large, misfit

    @staticmethod
    def _configure_decision(m, checks, length, table_index):
        """CONFIGURE_LAYER's outcome, registered: ``(code, which)``, ``code`` one of
        ``_CFG_*`` (in the order the checks answer) and ``which`` the table entry. It is
        computed every cycle from the registered checks, the frame's length and its index
        byte, so that EXECUTE only decodes it (the whole chain of comparisons into the
        table's valid bits had been the iCE40's critical path). ``args`` holds the
        descriptor ≥ 2 cycles before EXECUTE (the frame's two CRC bytes follow its
        payload): the checks' register, then this one, hold its outcome there."""
        refused, too_large, misfit = checks
        indexed = length == LAYER_DESCRIPTOR_SIZE + 1
        which = Mux(indexed, table_index, 0)
        code = Signal(range(_CFG_CODES))
        which_r = Signal(range(LAYER_TABLE_ENTRIES))
        with m.If((length != LAYER_DESCRIPTOR_SIZE) & ~indexed):
            m.d.sync += code.eq(_CFG_BAD_LENGTH)
        with m.Elif(which >= LAYER_TABLE_ENTRIES):
            m.d.sync += code.eq(_CFG_BAD_INDEX)
        with m.Elif(refused):
            m.d.sync += code.eq(_CFG_REFUSED)
        with m.Elif(too_large):
            m.d.sync += code.eq(_CFG_TOO_LARGE)
        with m.Elif(misfit):
            m.d.sync += code.eq(_CFG_MISFIT)
        with m.Else():
            m.d.sync += code.eq(_CFG_OK)
        m.d.sync += which_r.eq(which[:len(which_r)])
        return code, which_r

    @staticmethod
    def _configure(m, decision, valid, entry, step, respond):
        """CONFIGURE_LAYER: a descriptor that passes the checks is stored in its table
        entry (state STORE), a refused one leaves that entry unconfigured."""
        code, which = decision
        target = valid.bit_select(which, 1)
        with m.Switch(code):
            with m.Case(_CFG_BAD_LENGTH):
                respond(ErrorCode.BAD_LENGTH)
            with m.Case(_CFG_BAD_INDEX):
                respond(ErrorCode.BAD_ARGUMENT)
            with m.Case(_CFG_REFUSED, _CFG_MISFIT):
                m.d.sync += target.eq(0)
                respond(ErrorCode.BAD_ARGUMENT)
            with m.Case(_CFG_TOO_LARGE):
                m.d.sync += target.eq(0)
                respond(ErrorCode.LAYER_DOES_NOT_FIT)
            with m.Default():
                m.d.sync += [target.eq(0), entry.eq(which), step.eq(0)]
                m.next = "STORE"
