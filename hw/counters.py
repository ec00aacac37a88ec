"""The executor's performance counters: busy and stall cycles of the engines, summed over
the layers of a command (READ_COUNTERS, RUN_LAYER / RUN_NETWORK's answer,
docs/protocol.md)."""

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from bitdet.core.protocol import COUNTERS_SIZE

__all__ = ["CycleCounters"]

_WIDTH = 8 * COUNTERS_SIZE // 2


class CycleCounters(wiring.Component):
    """Two u32 counters (wrapping) of the cycles with ``busy`` and with ``stall`` high.

    The flags are registered before they count (the stall flag is the end of the operand
    handshake's logic; counting it directly was the iCE40's critical path): the counters
    run one cycle behind the engine and hold a layer's totals from the cycle after its
    ``done``.

    Members
    -------
    clear : ``In(1)``
        Both counters become 0 (this cycle's registered flags are not counted).
    busy, stall : ``In(1)``
    busy_cycles, stall_cycles : ``Out(32)``
    """

    busy: In(1)
    stall: In(1)
    clear: In(1)
    busy_cycles: Out(_WIDTH)
    stall_cycles: Out(_WIDTH)

    def elaborate(self, platform):
        m = Module()
        counted_busy = Signal()
        counted_stall = Signal()
        m.d.sync += [counted_busy.eq(self.busy), counted_stall.eq(self.stall)]
        with m.If(self.clear):
            m.d.sync += [self.busy_cycles.eq(0), self.stall_cycles.eq(0)]
        with m.Else():
            with m.If(counted_busy):
                m.d.sync += self.busy_cycles.eq(self.busy_cycles + 1)
            with m.If(counted_stall):
                m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        return m
