"""Top level of the accelerator without the UART: commands in, responses out, as bytes.

:class:`CommandExecutor` joins :class:`~bitdet.hw.decoder.CommandDecoder`,
:class:`~bitdet.hw.decoder.ResponseEncoder`, the weight and threshold column memories,
the ping-pong :class:`~bitdet.hw.memory.ActivationBuffer`, the
:class:`~bitdet.hw.controller.LayerController` (binary convolutions), the
:class:`~bitdet.hw.pool.PoolEngine` (binary max-pool passes), the
:class:`~bitdet.hw.host_writer.HostWriter` (the host's memory writes), the
:class:`~bitdet.hw.layer_table.LayerCheck` and :class:`~bitdet.hw.layer_table.LayerTable`
(CONFIGURE_LAYER's checks and the layer table) and the
:class:`~bitdet.hw.counters.CycleCounters`, and executes the commands of
``docs/protocol.md`` (payload layouts there and in :mod:`bitdet.core.protocol`):

* ``IDENTIFY`` → :class:`~bitdet.core.protocol.IdentifyReply` of the config (constant bytes);
* ``WRITE_WEIGHTS`` / ``WRITE_THRESHOLDS`` / ``WRITE_ACTIVATIONS``: address u32 LE, then
  whole entries, written to memory as the bytes arrive (provisionally: a frame that ends
  in ABORT has written what it carried, the host resends it);
* ``CONFIGURE_LAYER``: a 32-byte descriptor (:class:`~bitdet.core.descriptor.LayerDescriptor`),
  a convolution or (its ``pool`` bit) a pool pass, checked against the build's
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

**Contract 2** (``config.contract == 2``; docs/protocol.md, "Contract 2"): the same
executor with these parts swapped (the contract-1 Verilog is unchanged):

* CONFIGURE_LAYER takes 48-byte extended descriptors (49 with the index; 32/33 bytes are
  BAD_LENGTH), checked by :class:`~bitdet.hw.layer_table.LayerCheck`'s contract-2 checks
  and kept in a table of 48-byte entries;
* the activations are a :class:`~bitdet.hw.memory.SlotMemory` (``activation_slots``
  slots, flat addresses ``slot · activation_depth + word``, ``rows + 1`` read ports);
  WRITE/READ_ACTIVATIONS address all slots flat (``address + words ≤ activation_slots ·
  activation_depth``, else BAD_ADDRESS); there is no select (``select`` stays 0) and RUN_*
  flip nothing;
* RUN_LAYER / RUN_NETWORK run a convolution on
  :class:`~bitdet.hw.controller_v2.LayerControllerV2` and a pool or repeat pass (its
  ``pool`` or ``repeat`` bit) on :class:`~bitdet.hw.pass_engine.PassEngine`, both fed the
  whole extended descriptor (held while they run).

Ports of the activation memory: contract 1: the write port is the host writer's while a
WRITE_ACTIVATIONS frame streams in (no layer runs then), otherwise the running engine's
(the pool engine's or the controller's); contract 2: the running engine's (the pass
engine's or the controller's, from the cycle of its start pulse) in every cycle it writes,
the host writer's in the others (below). The window generator's rows read their own
ports; one more port (contract 1: row 0's) is the running engine's (contract 1: the
controller's row 0 or the pool engine's; contract 2: the controller's shortcut reads
``sc_read`` or the pass engine's), otherwise READ_ACTIVATIONS'.

Contract 1 executes commands one at a time: while a command executes (a layer runs, a
response goes out) the executor takes no decoder event, so the decoder stalls its input
(the host sends one command and waits for its response, docs/protocol.md).

**Commands during a run** (contract 2; docs/protocol.md, "Commands during a run"): a
RUN_LAYER / RUN_NETWORK is handed to a second FSM (``runner``: the table entries into a
descriptor register of their own, the engines, the counters) and the executor goes back to
taking frames. The run's busy slots are the union of its entries' ``input_slot``,
``output_slot`` and (with a shortcut) ``shortcut_slot``, kept per entry by CONFIGURE_LAYER
and ORed at the RUN. During the run:

* a WRITE_ACTIVATIONS whose words (from its address and the frame's length) all lie in
  idle slots writes them as they arrive and is answered (OK / BAD_ADDRESS); the engine has
  priority on the write port: a host word that meets an engine write waits in a register
  and is written in the next cycle without one, and while it waits the executor takes no
  byte that would complete another word and no COMMIT (``ready`` low: the byte stream
  stalls, only after the engine has written in every cycle for about ``simd / 8`` byte
  times — docs/protocol.md bounds it);
* a WRITE_* whose address came during the run otherwise writes nothing and answers BUSY
  (even if the run ends before its last byte); any other frame completed during the run
  answers BUSY; a damaged one gets the decoder's error response;
* when the run ends its response (the RUN's opcode and seq, the counters) goes out as soon
  as the executor is between frames' responses; a COMMIT waits for it, so a frame
  completed after the run's end is answered after it.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig, ConfigError
from bitdet.core.descriptor import (
    EXTENDED_DESCRIPTOR_SIZE,
    LAYER_DESCRIPTOR_SIZE,
    descriptor_layout,
    extended_descriptor_layout,
)
from bitdet.core.protocol import (
    COUNTERS_SIZE,
    LAYER_TABLE_ENTRIES,
    MAX_PAYLOAD,
    ErrorCode,
    IdentifyReply,
    Opcode,
    threshold_entry_bytes,
    weight_entry_bytes,
)

from .controller import LayerController
from .controller_v2 import LayerControllerV2
from .counters import CycleCounters
from .decoder import CommandDecoder, DecoderEvent, ResponseEncoder, timeout_cycles
from .host_writer import HostWriter
from .layer_table import LayerCheck, LayerTable
from .memory import activation_buffer, slot_memory, threshold_memory, weight_memory
from .pass_engine import PassEngine
from .pool import PoolEngine

__all__ = ["CommandExecutor"]

# CONFIGURE_LAYER's registered outcome (CommandExecutor._configure_decision)
_CFG_OK, _CFG_BAD_LENGTH, _CFG_BAD_INDEX, _CFG_REFUSED, _CFG_TOO_LARGE, _CFG_MISFIT = range(6)
_CFG_CODES = 6

_ADDRESS_BYTES = HostWriter.ADDRESS_BYTES
_SMALL_BYTES = max(IdentifyReply.SIZE, COUNTERS_SIZE)


def require_board_contract(config: AcceleratorConfig) -> None:
    """Raise :class:`~bitdet.core.config.ConfigError` for a config that no board build
    implements yet: contract 2 (n-bit maps, shortcuts, map slots) runs in RTL simulation
    and on the emulator, but its slot memory is one copy per read port (not banked), which
    no preset's FPGA holds."""
    if config.contract != 1:
        raise ConfigError(f"config {config.name!r} asks for contract {config.contract} "
                          "(n-bit maps, shortcuts, map slots): board builds implement "
                          "contract 1 (the contract-2 slot memory is not banked yet); "
                          "simulate it (bitdet sim layer, --backend rtl) or run it on the "
                          "emulator (--backend emu)")


class _RunState:
    """Contract 2: the signals of the run that goes on beside the executor (its FSM
    ``runner``), and the executor's logic around it. The static helpers take ``run =
    None`` under contract 1 and then do what contract 1 does."""

    def __init__(self, config: AcceleratorConfig, entries: int):
        self.config = config
        self.slots = slots = config.activation_slots
        self.go = Signal()                     # EXECUTE starts a run
        self.active = Signal()                 # the runner is busy: BUSY answers
        self.reply_wait = Signal()             # the run ended, its response is not out
        self.replying = Signal()               # the encoder takes the run's header
        self.receiving = Signal()              # the executor is in state RECEIVE
        self.opcode = Signal(8)                # the RUN's opcode and seq
        self.seq = Signal(8)
        self.busy_slots = Signal(slots)        # the slots the run reads or writes
        #: per table entry, the slots its descriptor reads or writes
        self.entry_slots = Signal(entries * slots)
        self.entries = entries
        self.rep_idx = Signal(range(COUNTERS_SIZE))
        # the running entry (`args` takes the frames that arrive during the run); an
        # engine owns its ports from the cycle of its start pulse (state START) on
        self.desc = Signal(8 * EXTENDED_DESCRIPTOR_SIZE)
        self.layer = data.View(extended_descriptor_layout(), self.desc)
        self.is_pool = self.layer.pool | self.layer.repeat
        self.starting = Signal()
        self.start_pool = Signal()

    def launch(self, m, first, n, opcode, seq):
        """A RUN of entries ``first … first + n − 1``: its busy slots (those of its
        entries), its opcode and seq; the runner starts. The executor's next state."""
        used = [Mux((first <= i) & (i < first + n),
                    self.entry_slots.word_select(i, self.slots), 0)
                for i in range(self.entries)]
        mask = used[0]
        for u in used[1:]:
            mask = mask | u
        m.d.comb += self.go.eq(1)
        m.d.sync += [self.busy_slots.eq(mask), self.opcode.eq(opcode), self.seq.eq(seq)]
        return "RECEIVE"

    @staticmethod
    def runner(run, m, table, ctrl, pool, counters, resp, enc, running, run_pool,
               layers_left, entry):
        """The FSM ``runner`` (contract 2; nothing under contract 1): a launched RUN's
        entries one after the other into ``desc``, each started on its engine and run
        (the counters count the engines' busy and stall cycles), then the run's response,
        once the executor is between responses."""
        if run is not None:
            run._runner(m, table, ctrl, pool, counters, resp, enc, running, run_pool,
                        layers_left, entry)

    def _runner(self, m, table, ctrl, pool, counters, resp, enc, running, run_pool,
                layers_left, entry):
        counter_bytes = Cat(counters.busy_cycles, counters.stall_cycles)
        with m.FSM(name="runner"):
            with m.State("IDLE"):
                with m.If(self.go):
                    m.next = "LOAD"

            with m.State("LOAD"):
                # the entry into `desc`, a byte per cycle
                m.d.comb += [self.active.eq(1), table.load.eq(1)]
                with m.If(table.load_data.valid):
                    m.d.sync += self.desc.eq(Cat(self.desc[8:], table.load_data.payload))
                with m.If(table.loaded):
                    m.next = "START"

            with m.State("START"):
                m.d.comb += [self.active.eq(1), ctrl.start.eq(~self.is_pool),
                             pool.start.eq(self.is_pool), self.starting.eq(1),
                             self.start_pool.eq(self.is_pool)]
                m.d.sync += [running.eq(1), run_pool.eq(self.is_pool)]
                m.next = "RUN"

            with m.State("RUN"):
                # the counters, summed over the passes of the command (u32, wrapping): the
                # engines' busy and stall cycles (only one engine runs); nothing flips
                m.d.comb += [self.active.eq(1), counters.busy.eq(ctrl.busy | pool.busy),
                             counters.stall.eq(ctrl.stall | pool.stall)]
                with m.If(Mux(run_pool, pool.done, ctrl.done)):
                    m.d.sync += [running.eq(0), run_pool.eq(0),
                                 layers_left.eq(layers_left - 1), entry.eq(entry + 1)]
                    with m.If(layers_left == 1):
                        m.next = "REPLY"
                    with m.Else():
                        m.next = "LOAD"

            with m.State("REPLY"):
                # the run's response, once the executor has sent its own (it takes no
                # COMMIT meanwhile); the counters hold the totals from the cycle after the
                # last `done`
                m.d.comb += [self.active.eq(1), self.reply_wait.eq(1)]
                with m.If(self.receiving):
                    m.d.comb += [self.replying.eq(1), resp.valid.eq(1)]
                    with m.If(resp.ready):
                        m.d.sync += self.rep_idx.eq(0)
                        m.next = "COUNTERS"

            with m.State("COUNTERS"):
                m.d.comb += [self.active.eq(1), self.reply_wait.eq(1), enc.data.valid.eq(1),
                             enc.data.payload.eq(counter_bytes.word_select(self.rep_idx, 8))]
                with m.If(enc.data.ready):
                    m.d.sync += self.rep_idx.eq(self.rep_idx + 1)
                    with m.If(self.rep_idx == COUNTERS_SIZE - 1):
                        m.next = "IDLE"

    @staticmethod
    def judge_address(run, m, index, frame_ok, opcode, address, length):
        """The address of a WRITE_* is complete (payload byte ``index``): during a run it
        writes only when it is a WRITE_ACTIVATIONS into idle slots (``frame_ok``)."""
        if run is None:
            return
        with m.If(index == _ADDRESS_BYTES - 1):
            idle = (opcode == Opcode.WRITE_ACTIVATIONS) & ~(
                run.busy_slots & CommandExecutor._touched_slots(address, length,
                                                                run.config)).any()
            m.d.sync += frame_ok.eq(~run.active | idle)

    @staticmethod
    def remember(run, m, decision, f):
        """CONFIGURE_LAYER: the slots of an accepted descriptor ``f``, for a run's busy
        slots."""
        if run is None:
            return
        code, which = decision
        with m.If(code == _CFG_OK):
            m.d.sync += run.entry_slots.word_select(which, run.slots).eq(
                CommandExecutor._descriptor_slots(f, run.slots))

    @staticmethod
    def guard(run, m, opcode, frame_ok, respond, execute):
        """EXECUTE: during a run BUSY, but for a WRITE_ACTIVATIONS into idle slots (a
        WRITE_* whose address came during the run wrote nothing: BUSY)."""
        if run is None:
            execute()
            return
        writes = Cat(opcode == op for op in (Opcode.WRITE_WEIGHTS, Opcode.WRITE_THRESHOLDS,
                                             Opcode.WRITE_ACTIVATIONS)).any()
        with m.If(Mux(writes, ~frame_ok, run.active)):
            respond(ErrorCode.BUSY)
        with m.Else():
            execute()


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
        The activation bank the next layer reads (for observation; contract 2: 0).
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

        # contract 2: extended descriptors, map slots (flat addresses), no select; the
        # conv goes to LayerControllerV2, a pool or repeat pass to the PassEngine
        v2 = c.contract == 2
        desc_size = EXTENDED_DESCRIPTOR_SIZE if v2 else LAYER_DESCRIPTOR_SIZE
        # the words WRITE/READ_ACTIVATIONS address: all slots (v2), bank `select` (v1)
        act_words = c.activation_slots * c.activation_depth if v2 else c.activation_depth

        dec = m.submodules.decoder = CommandDecoder(timeout_cycles=timeout)
        enc = m.submodules.encoder = ResponseEncoder()
        # embedded: the engines read the descriptor from `args` (held while they run) and
        # the executor counts their busy / stall cycles itself
        if v2:
            ctrl = m.submodules.controller = LayerControllerV2(config=c, embedded=True)
            pool = m.submodules.pass_engine = PassEngine(config=c, embedded=True)
        else:
            ctrl = m.submodules.controller = LayerController(config=c, embedded=True)
            pool = m.submodules.pool = PoolEngine(config=c, embedded=True)
        wmem = m.submodules.weights = weight_memory(c)
        tmem = m.submodules.thresholds = threshold_memory(c)
        buf = m.submodules.activations = slot_memory(c) if v2 else activation_buffer(c)
        writer = m.submodules.host_writer = HostWriter(config=c, activation_words=act_words)
        check = m.submodules.layer_check = LayerCheck(config=c)
        table = m.submodules.layer_table = LayerTable(size=desc_size)
        counters = m.submodules.counters = CycleCounters()

        wiring.connect(m, wiring.flipped(self.i), dec.i)
        wiring.connect(m, enc.o, wiring.flipped(self.o))
        wiring.connect(m, dec.error, enc.error)
        wiring.connect(m, ctrl.weights, wmem.read)
        wiring.connect(m, ctrl.thresholds, tmem.read)
        frame_ok = self._host_memory_writes(m, writer, wmem, tmem, v2)
        # the window generator's rows: v1's row 0 shares its port with READ_ACTIVATIONS
        for r in range(0 if v2 else 1, c.rows):
            wiring.connect(m, ctrl.act_read[r], buf.read[r])

        ev = dec.o.payload
        resp = enc.response

        # -- state -------------------------------------------------------------------------
        opcode = Signal(8)
        length = Signal(16)
        index = Signal(range(MAX_PAYLOAD + 1))             # payload byte of the DATA event
        # the payload bytes shift in from the top: after a payload of n ≤ desc_size (32,
        # v2: 48) bytes its byte i is at 8·(desc_size − n + i); a descriptor (the last
        # desc_size bytes of CONFIGURE_LAYER) fills it, byte i at 8·i, the order of
        # descriptor_layout() (v2: extended_descriptor_layout())
        args = Signal(8 * desc_size)
        arg_clear = Signal()
        arg_shift = Signal()
        arg_byte = Signal(8)
        with m.If(arg_clear):
            m.d.sync += args.eq(0)
        with m.Elif(arg_shift):
            m.d.sync += args.eq(Cat(args[8:], arg_byte))
        byte_idx = Signal(range(max(c.simd // 8, _SMALL_BYTES) + 1))  # byte of a word / reply
        sel = Signal()                                     # bank the next layer reads
        running = Signal()
        entries = table.entries
        entry = Signal(range(entries))                     # entry being stored / run
        table_index = Signal(8)                            # CONFIGURE_LAYER's index byte
        layers_left = Signal(range(entries + 1))
        m.d.comb += table.entry.eq(entry)

        status = Signal(8)
        resp_len = Signal(16)
        count = Signal(range(MAX_PAYLOAD + 1))             # words left to send
        raddr = Signal(buf.addr_width)
        fetched = Signal(c.simd)                           # READ_ACTIVATIONS' current word

        # contract 2: the run goes on beside the executor (FSM "runner"), its response
        # header (the RUN's opcode and seq) replaces the executor's while it is sent
        run = _RunState(c, entries) if v2 else None

        def header(frame_value, run_value):
            return Mux(run.replying, run_value, frame_value) if v2 else frame_value

        m.d.comb += [self.select.eq(sel), self.busy.eq(running),
                     resp.payload.opcode.eq(header(opcode, run.opcode if v2 else None)),
                     resp.payload.status.eq(header(status, ErrorCode.OK)),
                     resp.payload.length.eq(header(resp_len, COUNTERS_SIZE)),
                     resp.payload.seq.eq(header(dec.seq, run.seq if v2 else None))]

        # -- argument fields ----------------------------------------------------------------
        def arg(offset, size):
            return args[8 * offset:8 * (offset + size)]

        def short_arg(payload, offset, size):
            """Bytes of a payload of `payload` bytes (at the top of `args`)."""
            return arg(desc_size - payload + offset, size)

        def respond(code, nbytes=0):
            m.d.sync += [status.eq(code), resp_len.eq(nbytes)]
            m.next = "RESPOND"

        def launch(first, n):
            """RUN_LAYER / RUN_NETWORK of table entries ``first … first + n − 1``."""
            m.d.sync += [entry.eq(first), layers_left.eq(n)]
            m.d.comb += counters.clear.eq(1)
            # (v2: the runner takes it, the executor goes on taking frames)
            m.next = run.launch(m, first, n, opcode, dec.seq) if v2 else "LOAD"

        # -- memory writes, as the payload streams in ------------------------------------
        act_bytes = c.simd // 8
        data_event = Signal()
        m.d.comb += data_event.eq(dec.o.valid & dec.o.ready & (ev.event == DecoderEvent.DATA))
        m.d.comb += [
            writer.opcode.eq(opcode),
            writer.data.valid.eq(data_event & (index >= _ADDRESS_BYTES)),
            writer.data.payload.eq(ev.data),
            writer.address.eq(Cat(short_arg(_ADDRESS_BYTES - 1, 0, 3), ev.data)),
            writer.address_valid.eq(data_event & (index == _ADDRESS_BYTES - 1)),
        ]
        # WRITE_ACTIVATIONS writes the bank the next layer reads: the buffer's write port
        # writes bank 1 − select, so select is flipped while such a frame streams in (the
        # controller and the pool engine are idle then). Otherwise the engine that runs
        # (only one at a time) owns the write port.
        act_frame = Signal()
        run_pool = Signal()                                # the running layer is a pool
        if v2:
            # an engine owns its ports from the cycle of its start pulse (state START) on
            engine_on, engine_pool = running | run.starting, run_pool | run.start_pool
            hold_word = self._slot_write_port(m, buf, writer, ctrl, pool, engine_on,
                                              engine_pool, frame_ok)
        else:
            m.d.comb += act_frame.eq(~running & (opcode == Opcode.WRITE_ACTIVATIONS))
            engine_on, engine_pool = running, run_pool
            with m.If(act_frame):
                m.d.comb += [buf.select.eq(~sel), buf.write.en.eq(writer.activations.en),
                             buf.write.addr.eq(writer.activations.addr),
                             buf.write.data.eq(writer.activations.data)]
            with m.Elif(engine_pool):
                m.d.comb += [buf.select.eq(sel), buf.write.en.eq(pool.act_write.en),
                             buf.write.addr.eq(pool.act_write.addr),
                             buf.write.data.eq(pool.act_write.data)]
            with m.Else():
                m.d.comb += [buf.select.eq(sel), buf.write.en.eq(ctrl.act_write.en),
                             buf.write.addr.eq(ctrl.act_write.addr),
                             buf.write.data.eq(ctrl.act_write.data)]

        # the auxiliary read port: the running engine's while a layer runs (the pool
        # engine's or the controller's row 0; v2: the pass engine's or the controller's
        # shortcut reads, on port `rows`), READ_ACTIVATIONS' otherwise
        aux = buf.read[c.rows] if v2 else buf.read[0]
        ctrl_aux = ctrl.sc_read if v2 else ctrl.act_read[0]
        read_en = Signal()
        m.d.comb += [
            aux.addr.eq(Mux(engine_on, Mux(engine_pool, pool.act_read.addr, ctrl_aux.addr),
                            raddr)),
            aux.en.eq(Mux(engine_on, Mux(engine_pool, pool.act_read.en, ctrl_aux.en),
                          read_en)),
            ctrl_aux.data.eq(aux.data),
            pool.act_read.data.eq(aux.data),
        ]

        # -- the descriptor in `args` ------------------------------------------------------
        identify = int.from_bytes(IdentifyReply.for_config(c).pack(), "little")
        # the engines sample their descriptor in the cycle of `start`: a plain decoding of
        # the entry loaded into `args`
        f = data.View(extended_descriptor_layout() if v2 else descriptor_layout(), args)
        if v2:
            # the run's entry has its own register (`args` takes the frames that arrive
            # during the run); the whole extended descriptor to both engines
            # (CONFIGURE_LAYER refused raw mode)
            m.d.comb += [ctrl.layer.eq(run.layer), pool.layer.eq(run.layer)]
        else:
            is_pool = f.pool
        for engine, forced in () if v2 else ((ctrl, {"raw": 0}), (pool, {})):
            # (each field truncated to the engine's narrower one: CONFIGURE_LAYER's
            # checks keep the values within; raw mode is refused there)
            for name, _field in engine.descriptor_layout:
                m.d.comb += engine.layer[name].eq(forced.get(name, f[name]))
        # CONFIGURE_LAYER's checks, registered: `args` holds the descriptor ≥ 2 cycles
        # before EXECUTE (the frame's two CRC bytes follow its payload), so there the
        # check's registers hold its outcome
        m.d.comb += check.descriptor.eq(f)
        # CONFIGURE_LAYER of 33 (v2: 49) bytes: [index] + descriptor; the descriptor's
        # bytes are the last ones shifted in, at the offsets of one without the index
        shift = Signal()
        m.d.comb += shift.eq((opcode == Opcode.CONFIGURE_LAYER)
                             & (length == desc_size + 1))
        decision = self._configure_decision(
            m, (check.refused, check.too_large, check.misfit), length, table_index, entries,
            desc_size)

        with m.FSM(name="executor"):
            with m.State("RECEIVE"):
                m.d.comb += dec.o.ready.eq(~self._hold_event(
                    m, ev, opcode, index, data_event, hold_word, run.reply_wait, act_bytes)
                    if v2 else 1)
                m.d.comb += [run.receiving.eq(1)] if v2 else []
                with m.If(dec.o.valid & dec.o.ready if v2 else dec.o.valid):
                    with m.Switch(ev.event):
                        with m.Case(DecoderEvent.START):
                            m.d.sync += [opcode.eq(ev.opcode), length.eq(ev.length),
                                         index.eq(0), byte_idx.eq(0)]
                            m.d.comb += [arg_clear.eq(1), writer.start.eq(1)]
                            # (v2: a frame too short for an address, as one with it)
                            m.d.sync += [frame_ok.eq(~run.active)] if v2 else []
                        with m.Case(DecoderEvent.DATA):
                            m.d.sync += index.eq(index + 1)
                            m.d.comb += [arg_shift.eq(1), arg_byte.eq(ev.data)]
                            with m.If(shift & (index == 0)):
                                m.d.sync += table_index.eq(ev.data)
                            _RunState.judge_address(run, m, index, frame_ok, opcode,
                                                    writer.address, length)
                        with m.Case(DecoderEvent.COMMIT):
                            m.next = "EXECUTE"
                        # ABORT: the decoder answers; what was written stays provisional

            def execute():
                with m.Switch(opcode):
                    with m.Case(Opcode.IDENTIFY):
                        respond(ErrorCode.OK, IdentifyReply.SIZE)
                    with m.Case(Opcode.RESET):
                        m.d.sync += sel.eq(0)
                        m.d.comb += [table.clear.eq(1), counters.clear.eq(1)]
                        respond(ErrorCode.OK)
                    with m.Case(Opcode.WRITE_WEIGHTS, Opcode.WRITE_THRESHOLDS,
                                Opcode.WRITE_ACTIVATIONS):
                        respond(Mux(writer.error, ErrorCode.BAD_ADDRESS, ErrorCode.OK))
                    with m.Case(Opcode.CONFIGURE_LAYER):
                        self._configure(m, decision, table, entry, respond)
                        _RunState.remember(run, m, decision, f)
                    with m.Case(Opcode.RUN_LAYER):
                        which = short_arg(1, 0, 1)         # 0 without a payload (args cleared)
                        with m.If(which >= entries):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif(~table.valid.bit_select(
                                which[:(entries - 1).bit_length()], 1)):
                            respond(ErrorCode.NOT_CONFIGURED)
                        with m.Else():
                            launch(which, 1)
                    with m.Case(Opcode.RUN_NETWORK):
                        n = short_arg(1, 0, 1)
                        needed = Cat(n > i for i in range(entries))
                        with m.If((n == 0) | (n > entries)):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif((table.valid & needed) != needed):
                            respond(ErrorCode.NOT_CONFIGURED)
                        with m.Else():
                            launch(0, n)
                    with m.Case(Opcode.READ_ACTIVATIONS):
                        address = short_arg(6, 0, 4)
                        words = short_arg(6, 4, 2)
                        # act_bytes is a power of two (simd / 8, simd a multiple of 8 up
                        # to 1024 is not always one: a constant product either way)
                        nbytes = words * act_bytes
                        # with nbytes < MAX_PAYLOAD, words is small: the sum needs only
                        # the low bits of the address and whether it has higher ones
                        low = max(act_words, MAX_PAYLOAD).bit_length()
                        m.d.sync += [raddr.eq(address), count.eq(words), byte_idx.eq(0)]
                        with m.If(nbytes > MAX_PAYLOAD - 1):
                            respond(ErrorCode.BAD_ARGUMENT)
                        with m.Elif((address[low:] != 0)
                                    | (address[:low] + words[:low] > act_words)):
                            respond(ErrorCode.BAD_ADDRESS)
                        with m.Else():
                            respond(ErrorCode.OK, nbytes)
                    with m.Case(Opcode.READ_COUNTERS):
                        respond(ErrorCode.OK, COUNTERS_SIZE)
                    with m.Default():                       # READ_RESULTS
                        respond(ErrorCode.UNKNOWN_OPCODE)

            with m.State("EXECUTE"):
                _RunState.guard(run, m, opcode, frame_ok, respond, execute)

            with m.State("STORE"):
                # a checked CONFIGURE_LAYER: its 32 (v2: 48) bytes into the entry, one per
                # cycle, rotating `args` by a byte each time (it is whole again afterwards)
                m.d.comb += [table.store.eq(1), table.store_data.eq(args[:8]),
                             arg_shift.eq(1), arg_byte.eq(args[:8])]
                with m.If(table.stored):
                    respond(ErrorCode.OK)

            if not v2:                 # (v2: these are the runner's, below)
                with m.State("LOAD"):
                    # the entry back into `args`, a byte per cycle
                    m.d.comb += [table.load.eq(1), arg_shift.eq(table.load_data.valid),
                                 arg_byte.eq(table.load_data.payload)]
                    with m.If(table.loaded):
                        m.next = "START"

                with m.State("START"):
                    m.d.comb += [ctrl.start.eq(~is_pool), pool.start.eq(is_pool)]
                    m.d.sync += [running.eq(1), run_pool.eq(is_pool)]
                    m.next = "RUN"

                with m.State("RUN"):
                    # the counters, summed over the layers of the command (u32, wrapping):
                    # the engines' busy and stall cycles (only one engine runs)
                    m.d.comb += [counters.busy.eq(ctrl.busy | pool.busy),
                                 counters.stall.eq(ctrl.stall | pool.stall)]
                    with m.If(Mux(run_pool, pool.done, ctrl.done)):
                        m.d.sync += [running.eq(0), run_pool.eq(0), sel.eq(~sel),
                                     layers_left.eq(layers_left - 1), entry.eq(entry + 1)]
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
                # IDENTIFY's constant bytes, or the counters (RUN_*, READ_COUNTERS); the
                # counters hold the last layer's totals from the cycle after its `done`,
                # while the executor is still in RUN's successor state (RESPOND or LOAD)
                identify_byte = Const(identify, 8 * IdentifyReply.SIZE).word_select(
                    byte_idx, 8)
                counter_byte = Cat(counters.busy_cycles, counters.stall_cycles).word_select(
                    byte_idx[:3], 8)
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
                m.d.sync += fetched.eq(aux.data)
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

        # contract 2: the run, beside the executor
        _RunState.runner(run, m, table, ctrl, pool, counters, resp, enc, running, run_pool,
                         layers_left, entry)
        return m

    @staticmethod
    def _host_memory_writes(m, writer, wmem, tmem, v2):
        """The host writer's weight and threshold writes; contract 2: only while
        ``frame_ok`` (returned; a WRITE_* whose address came during a run writes nothing,
        state RECEIVE sets it), contract 1: always (None)."""
        if not v2:
            wiring.connect(m, writer.weights, wmem.write)
            wiring.connect(m, writer.thresholds, tmem.write)
            return None
        frame_ok = Signal()
        for source, target in ((writer.weights, wmem.write), (writer.thresholds, tmem.write)):
            m.d.comb += [target.en.eq(source.en & frame_ok), target.addr.eq(source.addr),
                         target.column.eq(source.column), target.data.eq(source.data)]
        return frame_ok

    @staticmethod
    def _descriptor_slots(f, slots):
        """The slots a contract-2 descriptor ``f`` reads or writes, a mask of ``slots``
        bits: ``input_slot``, ``output_slot`` and, with a shortcut, ``shortcut_slot``
        (CONFIGURE_LAYER refuses a pool or repeat pass with one, and slots beyond the
        build)."""
        return Cat((f.input_slot == s) | (f.output_slot == s)
                   | ((f.shortcut_bits != 0) & (f.shortcut_slot == s)) for s in range(slots))

    @staticmethod
    def _touched_slots(address, length, config):
        """The slots a WRITE_ACTIVATIONS of payload ``length`` bytes at flat ``address``
        writes, a mask of ``activation_slots`` bits: its words (at least one, as the
        emulator counts them) run from ``address`` to ``address + words − 1``. Constant
        comparisons per slot, no division by the depth."""
        c = config
        word_bytes, depth = c.simd // 8, c.activation_depth
        data_bytes = length - _ADDRESS_BYTES
        if word_bytes & (word_bytes - 1) == 0:
            whole = data_bytes >> (word_bytes.bit_length() - 1)
        else:
            whole = data_bytes // word_bytes
        words = Mux(length >= _ADDRESS_BYTES + word_bytes, whole, 1)
        end = address + words                              # one past the last word
        return Cat((address < (s + 1) * depth) & (end > s * depth)
                   for s in range(c.activation_slots))

    @staticmethod
    def _slot_write_port(m, buf, writer, ctrl, pool, engine_on, engine_pool, frame_ok):
        """The slot memory's write port (contract 2): the running engine's in every cycle
        it writes, the host's words (a WRITE_ACTIVATIONS whose ``frame_ok`` is set) in the
        others. A host word that meets an engine write waits in a register (``held``) and
        is written in the next cycle without one. Returns ``hold_word``: a host word waits
        or is about to; the executor then takes no byte that completes another word (so
        at most one ever waits) and no COMMIT (a frame is answered once its words are
        written)."""
        engine_we = Signal()
        engine_addr = Signal.like(buf.write.addr)
        engine_data = Signal.like(buf.write.data)
        m.d.comb += [
            engine_we.eq(engine_on & Mux(engine_pool, pool.act_write.en, ctrl.act_write.en)),
            engine_addr.eq(Mux(engine_pool, pool.act_write.addr, ctrl.act_write.addr)),
            engine_data.eq(Mux(engine_pool, pool.act_write.data, ctrl.act_write.data)),
        ]
        host = writer.activations
        host_we = Signal()
        m.d.comb += host_we.eq(host.en & frame_ok)
        held = Signal()
        held_addr = Signal.like(buf.write.addr)
        held_data = Signal.like(buf.write.data)
        with m.If(engine_we):
            m.d.comb += [buf.write.en.eq(1), buf.write.addr.eq(engine_addr),
                         buf.write.data.eq(engine_data)]
            with m.If(host_we):                            # (never while `held`)
                m.d.sync += [held.eq(1), held_addr.eq(host.addr), held_data.eq(host.data)]
        with m.Elif(held):
            m.d.comb += [buf.write.en.eq(1), buf.write.addr.eq(held_addr),
                         buf.write.data.eq(held_data)]
            m.d.sync += held.eq(0)
        with m.Elif(host_we):
            m.d.comb += [buf.write.en.eq(1), buf.write.addr.eq(host.addr),
                         buf.write.data.eq(host.data)]
        hold_word = Signal()
        m.d.comb += hold_word.eq(held | (host_we & engine_we))
        return hold_word

    @staticmethod
    def _hold_event(m, ev, opcode, index, data_event, hold_word, reply_wait, word_bytes):
        """Contract 2: the decoder event that the executor does not take this cycle (its
        ``ready`` low): while a host word waits for the write port (``hold_word``), a
        WRITE_ACTIVATIONS byte that completes another word, and a COMMIT; a COMMIT also
        while the run's response waits (``reply_wait``: it goes out first)."""
        # the byte of the word (the host writer's count): 0 during the address
        position = Signal(range(max(word_bytes, 2)))
        with m.If(data_event):
            with m.If((index < _ADDRESS_BYTES) | (position == word_bytes - 1)):
                m.d.sync += position.eq(0)
            with m.Else():
                m.d.sync += position.eq(position + 1)
        completes = ((ev.event == DecoderEvent.DATA) & (opcode == Opcode.WRITE_ACTIVATIONS)
                     & (index >= _ADDRESS_BYTES) & (position == word_bytes - 1))
        commit = ev.event == DecoderEvent.COMMIT
        return (completes & hold_word) | (commit & (hold_word | reply_wait))

    @staticmethod
    def _configure_decision(m, checks, length, table_index, entries, size):
        """CONFIGURE_LAYER's outcome, registered: ``(code, which)``, ``code`` one of
        ``_CFG_*`` (in the order the checks answer) and ``which`` the table entry. It is
        computed every cycle from the registered checks, the frame's length and its index
        byte, so that EXECUTE only decodes it (the whole chain of comparisons into the
        table's valid bits had been the iCE40's critical path). ``args`` holds the
        descriptor ≥ 2 cycles before EXECUTE (the frame's two CRC bytes follow its
        payload): the checks' register, then this one, hold its outcome there."""
        refused, too_large, misfit = checks
        indexed = length == size + 1
        which = Mux(indexed, table_index, 0)
        code = Signal(range(_CFG_CODES))
        which_r = Signal(range(entries))
        with m.If((length != size) & ~indexed):
            m.d.sync += code.eq(_CFG_BAD_LENGTH)
        with m.Elif(which >= entries):
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
    def _configure(m, decision, table, entry, respond):
        """CONFIGURE_LAYER: a descriptor that passes the checks is stored in its table
        entry (state STORE), a refused one leaves that entry unconfigured."""
        code, which = decision
        m.d.comb += table.invalidate_entry.eq(which)
        with m.Switch(code):
            with m.Case(_CFG_BAD_LENGTH):
                respond(ErrorCode.BAD_LENGTH)
            with m.Case(_CFG_BAD_INDEX):
                respond(ErrorCode.BAD_ARGUMENT)
            with m.Case(_CFG_REFUSED, _CFG_MISFIT):
                m.d.comb += table.invalidate.eq(1)
                respond(ErrorCode.BAD_ARGUMENT)
            with m.Case(_CFG_TOO_LARGE):
                m.d.comb += table.invalidate.eq(1)
                respond(ErrorCode.LAYER_DOES_NOT_FIT)
            with m.Default():
                m.d.comb += table.invalidate.eq(1)
                m.d.sync += entry.eq(which)
                m.next = "STORE"

