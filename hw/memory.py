"""On-chip memories of the accelerator, sized from an
:class:`~bitdet.core.config.AcceleratorConfig`.

Three memories, all built on :class:`amaranth.lib.memory.Memory` with synchronous read
ports (the address presented in cycle ``t`` is read out in cycle ``t + 1``; a port whose
``en`` is low keeps its data), so that yosys infers block RAM:

* **weights** (:func:`weight_memory`): one ``simd``-bit × ``weight_depth`` memory per
  array column. Column ``c`` holds the K-words of output channels ``t·cols + c``, in the
  order of :func:`bitdet.core.packing.pack_weights` (``packed[t, j, c]``). All columns are
  read at the same address in the same cycle (the array skews the columns itself).
* **thresholds** (:func:`threshold_memory`): one memory per column, ``threshold_depth``
  entries of ``thresholds_per_channel`` values of ``threshold_width`` bits
  (:func:`bitdet.core.packing.pack_thresholds`, ``[t, c]``).
* **activations** (:class:`ActivationBuffer`): two ping-pong banks of ``activation_depth``
  ``simd``-bit words (pixels row-major, channel words innermost, as
  :func:`bitdet.core.packing.pack_activations`). ``select`` chooses the bank that is read
  (the current layer's input); the one write port writes the other bank (its output).
  Contract 2 replaces it by :class:`SlotMemory`: ``activation_slots`` map slots addressed
  flat (``slot · activation_depth + word``), no ``select``.

The read ports use the signature of :class:`amaranth.lib.memory.ReadPort`
(``addr``, ``en``, ``data``), so a reader declares ``In(ReadPort.Signature(...))`` and is
joined to the memory with :func:`amaranth.lib.wiring.connect`.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory, ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig

from ._util import _check_positive

__all__ = [
    "ActivationBuffer",
    "ColumnMemory",
    "SlotMemory",
    "activation_buffer",
    "column_write_signature",
    "slot_memory",
    "threshold_layout",
    "threshold_memory",
    "weight_memory",
]


def column_write_signature(addr_width: int, columns: int, shape) -> wiring.Signature:
    """Write port of a :class:`ColumnMemory`, from the memory's side.

    ``en``, ``addr``, ``column`` and ``data`` are all inputs: when ``en`` is high,
    ``data`` is written to entry ``addr`` of column ``column`` at the end of the cycle.
    """
    return wiring.Signature({
        "en": In(1),
        "addr": In(addr_width),
        "column": In(range(columns)),
        "data": In(shape),
    })


class ColumnMemory(wiring.Component):
    """One memory per array column, read in parallel at one address, written one column at
    a time.

    **Read.** ``read.addr`` presented in cycle ``t`` (with ``read.en`` high) gives entry
    ``addr`` of every column on ``read.data[c]`` in cycle ``t + 1``. While ``read.en`` is
    low the data of the previous read is held, so a reader that stalls keeps its word.
    **Write.** ``write.data`` goes to entry ``write.addr`` of column ``write.column`` when
    ``write.en`` is high. **A write wins**: in a cycle with ``write.en`` high the read is
    not performed (``read.data`` keeps the previous word); the memories are loaded only
    while no layer runs, so the controller never reads and writes at once.

    Each column is its own :class:`~amaranth.lib.memory.Memory` of ``depth`` entries of
    ``shape`` with **one address** shared by its read and write port, so every column maps
    to its own single-port RAM: an iCE40UP5K SPRAM (yosys ``synth_ice40 -spram``) as well
    as a block RAM elsewhere.

    Parameters
    ----------
    shape : shape-castable
        One entry of one column (``simd`` bits for weights, :func:`threshold_layout` for
        thresholds).
    depth : int
        Entries per column.
    columns : int
        Number of columns (the array's ``cols``).

    Members
    -------
    read : ``Out(ReadPort.Signature(addr_width=, shape=ArrayLayout(shape, columns)))``
        ``addr`` and ``en`` in, ``data[c]`` out (one cycle later).
    write : ``Out(column_write_signature(addr_width, columns, shape))``
        ``en``, ``addr``, ``column``, ``data``, all in.

    Raises
    ------
    TypeError, ValueError
        If ``depth`` or ``columns`` is not a positive integer.
    """

    def __init__(self, *, shape, depth: int, columns: int, src_loc_at: int = 0):
        self._depth = _check_positive("depth", depth)
        self._columns = _check_positive("columns", columns)
        self._shape = shape
        self._addr_width = max(1, (depth - 1).bit_length())
        super().__init__({
            "read": Out(ReadPort.Signature(addr_width=self._addr_width,
                                           shape=data.ArrayLayout(shape, columns))),
            "write": Out(column_write_signature(self._addr_width, columns, shape)),
        }, src_loc_at=1 + src_loc_at)

    @property
    def shape(self):
        return self._shape

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def columns(self) -> int:
        return self._columns

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def elaborate(self, platform):
        m = Module()
        for c in range(self._columns):
            mem = Memory(shape=self._shape, depth=self._depth, init=[])
            m.submodules[f"column{c}"] = mem
            rd = mem.read_port()
            wr = mem.write_port()
            addr = Mux(self.write.en, self.write.addr, self.read.addr)
            m.d.comb += [
                rd.addr.eq(addr),
                rd.en.eq(self.read.en & ~self.write.en),
                self.read.data[c].eq(rd.data),
                wr.addr.eq(addr),
                wr.data.eq(self.write.data),
                wr.en.eq(self.write.en & (self.write.column == c)),
            ]
        return m


def threshold_layout(config: AcceleratorConfig) -> data.ArrayLayout:
    """One threshold entry: ``thresholds_per_channel`` values of ``threshold_width`` bits
    (the ``thresholds`` member of :class:`~bitdet.hw.threshold.ThresholdUnit`'s input)."""
    return data.ArrayLayout(config.threshold_width, config.thresholds_per_channel)


def weight_memory(config: AcceleratorConfig) -> ColumnMemory:
    """The weight memories: ``cols`` columns of ``weight_depth`` × ``simd`` bits."""
    return ColumnMemory(shape=config.simd, depth=config.weight_depth, columns=config.cols,
                        src_loc_at=1)


def threshold_memory(config: AcceleratorConfig) -> ColumnMemory:
    """The threshold memories: ``cols`` columns of ``threshold_depth`` entries of
    :func:`threshold_layout`."""
    return ColumnMemory(shape=threshold_layout(config), depth=config.threshold_depth,
                        columns=config.cols, src_loc_at=1)


class ActivationBuffer(wiring.Component):
    """Ping-pong activation buffer: two banks of ``depth`` × ``simd``-bit words.

    ``select`` names the bank the read ports read (the input feature map of the running
    layer); the write port writes the other bank (the layer's output). Swapping ``select``
    between layers turns an output into the next input without copying. Both banks live in
    one :class:`~amaranth.lib.memory.Memory` of ``2·depth`` words (bank ``b`` at
    ``b·depth … b·depth + depth − 1``) with one write port and ``read_ports`` synchronous
    read ports; yosys builds the extra read ports by replicating the block RAMs
    (``read_ports`` copies of the ``2·depth·simd`` bits).

    **Read** (each port ``read[i]``): ``addr`` presented in cycle ``t`` with ``en`` high
    gives the word of bank ``select`` (sampled in cycle ``t``) on ``data`` in cycle
    ``t + 1``; while ``en`` is low the port holds its data (and the bank it came from).
    **Write**: ``write.data`` goes to word ``write.addr`` of bank ``1 − select`` at the
    end of a cycle with ``write.en`` high.

    Change ``select`` only between layers, when no reader depends on the held data.

    Parameters
    ----------
    simd : int
        Word width.
    depth : int
        Words per bank.
    read_ports : int
        Number of independent read ports (the window generator uses one per array row).

    Members
    -------
    select : ``In(1)``
        Bank read by the read ports; the other one is written.
    read : ``Out(ReadPort.Signature(addr_width=, shape=simd)).array(read_ports)``
    write : ``Out(WritePort.Signature(addr_width=, shape=simd))`` (``en``, ``addr``,
        ``data``, all in).

    Raises
    ------
    TypeError, ValueError
        If a parameter is not a positive integer.
    """

    def __init__(self, *, simd: int, depth: int, read_ports: int = 1, src_loc_at: int = 0):
        self._simd = _check_positive("simd", simd)
        self._depth = _check_positive("depth", depth)
        self._read_ports = _check_positive("read_ports", read_ports)
        self._addr_width = max(1, (depth - 1).bit_length())
        super().__init__({
            "select": In(1),
            "read": Out(ReadPort.Signature(addr_width=self._addr_width, shape=simd)
                        ).array(read_ports),
            "write": Out(WritePort.Signature(addr_width=self._addr_width, shape=simd)),
        }, src_loc_at=1 + src_loc_at)

    @property
    def simd(self) -> int:
        return self._simd

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def read_ports(self) -> int:
        return self._read_ports

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def _physical(self, addr, bank):
        if self._depth == 1 << self._addr_width:
            return Cat(addr, bank)                  # power of two: the bank is the MSB
        return Mux(bank, addr + self._depth, addr)

    def elaborate(self, platform):
        m = Module()
        mem = Memory(shape=self._simd, depth=2 * self._depth, init=[])
        m.submodules.banks = mem

        wr = mem.write_port()
        m.d.comb += [
            wr.addr.eq(self._physical(self.write.addr, ~self.select)),
            wr.data.eq(self.write.data),
            wr.en.eq(self.write.en),
        ]
        for i in range(self._read_ports):
            rd = mem.read_port()
            port = self.read[i]
            m.d.comb += [
                rd.addr.eq(self._physical(port.addr, self.select)),
                rd.en.eq(port.en),
                port.data.eq(rd.data),
            ]
        return m


def activation_buffer(config: AcceleratorConfig, *, read_ports: int | None = None
                      ) -> ActivationBuffer:
    """The ping-pong activation buffer of ``config``, with ``read_ports`` read ports
    (default ``config.rows``: one per array row, as :class:`~bitdet.hw.window.
    WindowGenerator` needs)."""
    return ActivationBuffer(simd=config.simd, depth=config.activation_depth,
                            read_ports=config.rows if read_ports is None else read_ports,
                            src_loc_at=1)


class SlotMemory(wiring.Component):
    """The contract-2 activation memory: ``slots`` map slots of ``depth`` × ``simd``-bit
    words in one :class:`~amaranth.lib.memory.Memory` of ``slots · depth`` words, addressed
    **flat** (word ``w`` of slot ``s`` at ``s · depth + w``, docs/protocol.md, "Map slots
    and flat addresses"), with ``read_ports`` synchronous read ports and one write port.
    Every descriptor names its slots, so there is no ``select``. As for
    :class:`ActivationBuffer`, yosys builds the extra read ports by replicating the block
    RAMs (``read_ports`` copies of the ``slots·depth·simd`` bits; banking comes later).

    **Read** (each port ``read[i]``): ``addr`` presented in cycle ``t`` with ``en`` high
    gives its word on ``data`` in cycle ``t + 1``; while ``en`` is low the port holds its
    data. **Write**: ``write.data`` goes to word ``write.addr`` at the end of a cycle with
    ``write.en`` high. An address at or beyond ``slots · depth`` (a memory whose size is not
    a power of two) is not checked here: the callers keep their addresses inside.

    Parameters
    ----------
    simd : int
        Word width.
    depth : int
        Words per slot.
    slots : int
        Map slots.
    read_ports : int
        Number of independent read ports (the window generator's ``rows`` and one more:
        :func:`slot_memory`).

    Members
    -------
    read : ``Out(ReadPort.Signature(addr_width=, shape=simd)).array(read_ports)``
    write : ``Out(WritePort.Signature(addr_width=, shape=simd))`` (``en``, ``addr``,
        ``data``, all in).

    Raises
    ------
    TypeError, ValueError
        If a parameter is not a positive integer.
    """

    def __init__(self, *, simd: int, depth: int, slots: int, read_ports: int = 1,
                 src_loc_at: int = 0):
        self._simd = _check_positive("simd", simd)
        self._depth = _check_positive("depth", depth)
        self._slots = _check_positive("slots", slots)
        self._read_ports = _check_positive("read_ports", read_ports)
        self._addr_width = max(1, (slots * depth - 1).bit_length())
        super().__init__({
            "read": Out(ReadPort.Signature(addr_width=self._addr_width, shape=simd)
                        ).array(read_ports),
            "write": Out(WritePort.Signature(addr_width=self._addr_width, shape=simd)),
        }, src_loc_at=1 + src_loc_at)

    @property
    def simd(self) -> int:
        return self._simd

    @property
    def depth(self) -> int:
        """Words per slot."""
        return self._depth

    @property
    def slots(self) -> int:
        return self._slots

    @property
    def words(self) -> int:
        """Words of all slots, ``slots · depth``."""
        return self._slots * self._depth

    @property
    def read_ports(self) -> int:
        return self._read_ports

    @property
    def addr_width(self) -> int:
        """Bits of a flat address (:func:`bitdet.hw.pass_engine.slot_addr_width`)."""
        return self._addr_width

    def elaborate(self, platform):
        m = Module()
        mem = Memory(shape=self._simd, depth=self.words, init=[])
        m.submodules.slots = mem
        wr = mem.write_port()
        m.d.comb += [wr.addr.eq(self.write.addr), wr.data.eq(self.write.data),
                     wr.en.eq(self.write.en)]
        for i in range(self._read_ports):
            rd = mem.read_port()
            port = self.read[i]
            m.d.comb += [rd.addr.eq(port.addr), rd.en.eq(port.en), port.data.eq(rd.data)]
        return m


def slot_memory(config: AcceleratorConfig) -> SlotMemory:
    """The contract-2 activation memory of ``config``: ``activation_slots`` slots of
    ``activation_depth`` words, ``rows + 1`` read ports (port ``r < rows``: the window
    generator's row ``r``; port ``rows``: the auxiliary port of the shortcut reads, the
    pass engine and READ_ACTIVATIONS)."""
    return SlotMemory(simd=config.simd, depth=config.activation_depth,
                      slots=config.activation_slots, read_ports=config.rows + 1,
                      src_loc_at=1)
