"""cocotb testbench: the UART PHY (``hw/uart.py``) at the bit level, in a loopback.

:class:`UARTLoopback` wires :class:`~bitdet.hw.uart.UART`'s receiver stream straight into
its transmitter, so every byte the serial line brings in goes back out on ``tx_pin``. The
tests drive ``rx_pin`` with 8N1 frames at a chosen baud rate (the device's, or off by a
few percent), at arbitrary picosecond times (not aligned to the clock), and decode
``tx_pin`` by sampling each bit in its middle. Parameters from the environment:
``BITDET_UART_DIVISOR`` (clock cycles per bit, ``"p/q"``), ``BITDET_SEED``,
``BITDET_UART_BYTES``.
"""

import os
import random
from fractions import Fraction

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from bitdet.hw.uart import UART

PERIOD_PS = 10_000                 # 100 MHz simulation clock (only the time axis)


class UARTLoopback(wiring.Component):
    """``UART(divisor)`` with ``rx`` connected to ``tx`` (an echo), for bit-level tests.

    Members
    -------
    rx_pin : ``In(1, init=1)``
    tx_pin, framing_error, overrun : ``Out(1)``
    """

    rx_pin: In(1, init=1)
    tx_pin: Out(1, init=1)
    framing_error: Out(1)
    overrun: Out(1)

    def __init__(self, *, divisor):
        self._divisor = divisor
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.submodules.uart = uart = UART(divisor=self._divisor)
        wiring.connect(m, uart.rx, uart.tx)
        m.d.comb += [uart.rx_pin.eq(self.rx_pin), self.tx_pin.eq(uart.tx_pin),
                     self.framing_error.eq(uart.framing_error), self.overrun.eq(uart.overrun)]
        return m


def loopback_verilog(divisor) -> str:
    from amaranth.back import verilog
    return verilog.convert(UARTLoopback(divisor=divisor), name="uart_loopback")


# -- cocotb side ------------------------------------------------------------------------------
try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge, Timer
    from cocotb.utils import get_sim_time
except ImportError:            # only the Verilog helper above is needed outside the simulator
    cocotb = None


class SerialLine:
    """Drives ``rx_pin`` with 8N1 frames and decodes ``tx_pin``; times in picoseconds."""

    def __init__(self, dut, divisor: Fraction):
        self.dut = dut
        self.bit_ps = divisor * PERIOD_PS
        self.received: list[int] = []
        self.bad_frames = 0
        self.framing_errors = 0

    async def _until(self, t_ps: Fraction) -> None:
        delay = round(t_ps) - get_sim_time(unit="ps")
        if delay > 0:
            await Timer(delay, unit="ps")

    async def send(self, byte: int, *, scale: float = 1.0, stop: int = 1,
                   gap_bits: float = 0.0) -> None:
        """One frame on ``rx_pin`` with bit time ``scale`` × the device's."""
        bit = self.bit_ps * Fraction(scale)
        start = Fraction(get_sim_time(unit="ps"))
        levels = [0] + [(byte >> i) & 1 for i in range(8)] + [stop]
        for k, level in enumerate(levels):
            await self._until(start + k * bit)
            self.dut.rx_pin.value = level
        await self._until(start + (10 + Fraction(gap_bits)) * bit)
        self.dut.rx_pin.value = 1

    async def glitch(self, fraction: float) -> None:
        """A low pulse of ``fraction`` of a bit on an idle line."""
        self.dut.rx_pin.value = 0
        await Timer(round(self.bit_ps * Fraction(fraction)), unit="ps")
        self.dut.rx_pin.value = 1

    async def monitor(self) -> None:
        """Decode every frame on ``tx_pin`` (sampling bits in their middle)."""
        while True:
            await FallingEdge(self.dut.tx_pin)
            t0 = Fraction(get_sim_time(unit="ps"))
            bits = []
            for k in range(10):
                await self._until(t0 + (k + Fraction(1, 2)) * self.bit_ps)
                bits.append(int(self.dut.tx_pin.value))
            if bits[0] != 0 or bits[9] != 1:
                self.bad_frames += 1
            self.received.append(sum(b << i for i, b in enumerate(bits[1:9])))

    async def count_framing_errors(self) -> None:
        while True:
            await RisingEdge(self.dut.framing_error)
            self.framing_errors += 1


def _setup(dut):
    divisor = Fraction(os.environ.get("BITDET_UART_DIVISOR", "50"))
    rng = random.Random(int(os.environ.get("BITDET_SEED", "0")))
    count = int(os.environ.get("BITDET_UART_BYTES", "24"))
    Clock(dut.clk, PERIOD_PS, unit="ps").start()
    dut.rx_pin.value = 1
    line = SerialLine(dut, divisor)
    cocotb.start_soon(line.monitor())
    cocotb.start_soon(line.count_framing_errors())
    return line, rng, count, divisor


async def _reset(dut):
    dut.rst.value = 1
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0
    await ClockCycles(dut.clk, 3)


async def _settle(line: SerialLine, divisor: Fraction, frames: int = 2) -> None:
    """Wait until the echo of everything sent has gone out."""
    await ClockCycles(line.dut.clk, int(divisor * 10 * frames) + 10)


if cocotb is not None:
    @cocotb.test()
    async def echo_at_device_baud(dut):
        """Back-to-back random bytes at exactly the device's baud rate come back intact."""
        line, rng, count, divisor = _setup(dut)
        await _reset(dut)
        data = [rng.randrange(256) for _ in range(count)] + [0x00, 0xFF, 0x55, 0xB1]
        for byte in data:
            await line.send(byte)
        await _settle(line, divisor)
        assert line.received == data, (line.received, data)
        assert line.bad_frames == 0 and line.framing_errors == 0
        assert dut.overrun.value == 0

    @cocotb.test()
    async def echo_with_baud_error(dut):
        """A host clock 2 % fast or slow (with half a stop bit of slack per frame, as a
        real UART's idle time): every byte still arrives."""
        line, rng, count, divisor = _setup(dut)
        await _reset(dut)
        sent = []
        for scale in (0.98, 1.02):
            for _ in range(count // 2):
                byte = rng.randrange(256)
                sent.append(byte)
                await line.send(byte, scale=scale, gap_bits=0.5)
        await _settle(line, divisor)
        assert line.received == sent, (line.received, sent)
        assert line.bad_frames == 0 and line.framing_errors == 0

    @cocotb.test()
    async def framing_error_and_glitch(dut):
        """A low stop bit drops the byte and pulses ``framing_error``; after the line
        idles the next byte is received. A pulse shorter than half a bit is no start bit."""
        line, _, _, divisor = _setup(dut)
        await _reset(dut)
        await line.send(0xA5, stop=0, gap_bits=2)       # break-like: line low past stop
        await ClockCycles(dut.clk, int(divisor * 3))
        await line.send(0x3C)
        await line.glitch(0.3)
        await ClockCycles(dut.clk, int(divisor * 12))
        await line.send(0xC3)
        await _settle(line, divisor)
        assert line.framing_errors == 1
        assert line.received == [0x3C, 0xC3], line.received
        assert line.bad_frames == 0
