# amaranth: UnusedElaboratable=no
"""UART PHY at the bit level (amaranth.sim): loopback, bit timing, baud error, glitches,
framing errors and breaks, overrun, integer and non-integer divisors."""

import itertools
import math
import random
from fractions import Fraction

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.sim import Simulator

from bitdet.core.config import AcceleratorConfig
from bitdet.hw.uart import UART, UARTReceiver, UARTTransmitter, uart_divisor

DIVISORS = [16, Fraction(21, 2)]          # 16× and a non-integer 10.5× clock per bit


def line_levels(byte: int, divisor: Fraction, *, stop: int = 1) -> list[int]:
    """The line, one level per clock cycle, of an ideal 8N1 sender at ``divisor``."""
    bits = [0, *((byte >> i) & 1 for i in range(8)), stop]
    return [bits[math.floor(n / divisor)] for n in range(math.ceil(10 * divisor))]


def decode_line(levels: list[int], divisor: Fraction) -> list[int]:
    """Bytes of a recorded line (one level per cycle), sampled ideally at mid-bit."""
    out, n = [], 0
    while n < len(levels):
        if levels[n]:
            n += 1
            continue
        bits = [levels[n + math.floor((k + Fraction(1, 2)) * divisor)] for k in range(10)]
        assert bits[0] == 0 and bits[9] == 1, f"bad frame on the line at cycle {n}: {bits}"
        out.append(sum(b << i for i, b in enumerate(bits[1:9])))
        n += math.floor(9.5 * divisor) + 1
    return out


class RxMonitor:
    """Background testbench: keeps ``rx.ready`` as told, records bytes and pulses."""

    def __init__(self, rx: UARTReceiver, *, ready: bool = True):
        self.rx, self.ready = rx, ready
        self.data, self.framing_errors, self.overruns = [], [], []

    async def run(self, ctx):
        rx = self.rx
        cycle = 0
        ctx.set(rx.rx.ready, self.ready)
        async for _, _, valid, payload, ferr, ovr in ctx.tick().sample(
                rx.rx.valid, rx.rx.payload, rx.framing_error, rx.overrun):
            if valid and self.ready:
                self.data.append(payload)
            if ferr:
                self.framing_errors.append(cycle)
            if ovr:
                self.overruns.append(cycle)
            cycle += 1


def simulate_receiver(divisor, script, *, ready=True):
    """Drive the receiver's pin with ``script`` (a list of levels, one per cycle)."""
    dut = UARTReceiver(divisor=divisor)
    monitor = RxMonitor(dut, ready=ready)

    async def drive(ctx):
        for level in script:
            ctx.set(dut.pin, level)
            await ctx.tick()
        ctx.set(dut.pin, 1)
        await ctx.tick().repeat(4 * math.ceil(divisor))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(monitor.run, background=True)
    sim.add_testbench(drive)
    sim.run()
    return monitor


@pytest.mark.parametrize("divisor", DIVISORS, ids=str)
def test_loopback_random_bytes(divisor):
    rng = random.Random(int(divisor * 2))
    payload = [rng.randrange(256) for _ in range(24)] + [0x00, 0xFF, 0x55, 0xAA]
    uart = UART(divisor=divisor)
    m = Module()
    m.submodules.uart = uart
    m.d.comb += uart.rx_pin.eq(uart.tx_pin)
    line, received = [], []

    async def send(ctx):
        for byte in payload:
            if rng.random() < 0.3:
                await ctx.tick().repeat(rng.randrange(1, 40))
            ctx.set(uart.tx.payload, byte)
            ctx.set(uart.tx.valid, 1)
            await ctx.tick().until(uart.tx.ready)
            ctx.set(uart.tx.valid, 0)
        await ctx.tick().repeat(20 * math.ceil(divisor))

    async def watch(ctx):
        ctx.set(uart.rx.ready, 1)
        async for _, _, pin, valid, data, ferr, ovr in ctx.tick().sample(
                uart.tx_pin, uart.rx.valid, uart.rx.payload, uart.framing_error, uart.overrun):
            line.append(pin)
            if valid:
                received.append(data)
            assert not ferr and not ovr

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(watch, background=True)
    sim.add_testbench(send)
    sim.run()
    assert received == payload
    assert decode_line(line, Fraction(divisor)) == payload     # the line itself is 8N1


@pytest.mark.parametrize("divisor", DIVISORS, ids=str)
def test_transmitter_bit_timing(divisor):
    """Back-to-back bytes: every bit edge within one cycle of its ideal time, and a
    whole byte (start to start) of 10·divisor cycles, up to one cycle."""
    divisor = Fraction(divisor)
    dut = UARTTransmitter(divisor=divisor)
    levels = []
    payload = [0x55, 0xAA, 0x55, 0x0F]       # many edges

    async def send(ctx):
        for byte in payload:
            ctx.set(dut.tx.payload, byte)
            ctx.set(dut.tx.valid, 1)
            await ctx.tick().until(dut.tx.ready)
        ctx.set(dut.tx.valid, 0)
        await ctx.tick().repeat(12 * math.ceil(divisor))

    async def watch(ctx):
        async for _, _, pin in ctx.tick().sample(dut.pin):
            levels.append(pin)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(watch, background=True)
    sim.add_testbench(send)
    sim.run()
    assert levels[0] == 1
    starts = []
    n = 0
    while len(starts) < len(payload):
        n = levels.index(0, n)
        starts.append(n)
        bits = [0, *((payload[len(starts) - 1] >> i) & 1 for i in range(8)), 1]
        for k in range(1, 10):                   # the edges inside the byte
            if bits[k] != bits[k - 1]:
                edge = n + next(j for j in range(30 * math.ceil(divisor))
                                if levels[n + j] == bits[k] and j >= (k - 1) * divisor)
                assert abs(edge - n - k * divisor) <= 1, (k, edge - n, float(k * divisor))
        n += math.floor(9.5 * divisor)
    for a, b in itertools.pairwise(starts):
        assert abs((b - a) - 10 * divisor) <= 1, (b - a, float(10 * divisor))
    assert decode_line(levels, divisor) == payload


@pytest.mark.parametrize("divisor", DIVISORS, ids=str)
@pytest.mark.parametrize("baud_error", [-0.03, 0.0, 0.03])
def test_receiver_tolerates_baud_error(divisor, baud_error):
    rng = random.Random(17)
    sender = Fraction(divisor) * Fraction(1 + baud_error).limit_denominator(1000)
    payload = [rng.randrange(256) for _ in range(12)]
    script = []
    for byte in payload:
        script += [1] * rng.randrange(0, 8) + line_levels(byte, sender)
    monitor = simulate_receiver(divisor, script)
    assert monitor.data == payload
    assert not monitor.framing_errors and not monitor.overruns


@pytest.mark.parametrize("divisor", DIVISORS, ids=str)
def test_glitch_shorter_than_half_a_bit_is_not_a_start_bit(divisor):
    d = Fraction(divisor)
    glitch = math.ceil(d / 2) - 1                    # the longest low pulse under half a bit
    assert glitch < d / 2
    script = [1] * 5 + [0] * glitch + [1] * 3 + [0] + [1] * 20       # and a 1-cycle one
    script += line_levels(0x3C, d) + [1] * 2 + [0] * glitch + line_levels(0xC3, d)
    monitor = simulate_receiver(divisor, script)
    assert monitor.data == [0x3C, 0xC3]
    assert not monitor.framing_errors


@pytest.mark.parametrize("divisor", DIVISORS, ids=str)
def test_framing_error_and_break(divisor):
    d = Fraction(divisor)
    script = line_levels(0x5A, d, stop=0)                # low stop bit: framing error
    script += [1] * 8 + line_levels(0xA5, d)
    script += [0] * math.ceil(30 * d) + [1] * math.ceil(d)    # a break: one error only
    script += line_levels(0x81, d)
    monitor = simulate_receiver(divisor, script)
    assert monitor.data == [0xA5, 0x81]
    assert len(monitor.framing_errors) == 2


def test_overrun_drops_the_new_byte():
    d = Fraction(16)
    script = line_levels(0x11, d) + line_levels(0x22, d)
    monitor = simulate_receiver(d, script, ready=False)
    assert len(monitor.overruns) == 1
    assert not monitor.framing_errors


def test_receiver_holds_the_byte_until_read():
    d = Fraction(16)
    dut = UARTReceiver(divisor=d)

    async def tb(ctx):
        for level in line_levels(0x96, d) + [1] * 40:
            ctx.set(dut.pin, level)
            await ctx.tick()
        assert ctx.get(dut.rx.valid) and ctx.get(dut.rx.payload) == 0x96
        ctx.set(dut.rx.ready, 1)
        await ctx.tick()
        assert not ctx.get(dut.rx.valid)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()


def test_divisor_from_config_and_validation():
    assert uart_divisor(25_000_000, 115_200) == Fraction(15625, 72)
    assert uart_divisor(21, 2) == Fraction(21, 2)
    config = AcceleratorConfig()
    assert UART(divisor=uart_divisor(config.clock_hz, config.baud)).divisor == Fraction(15625, 72)
    assert UARTReceiver(divisor=10.5).divisor == Fraction(21, 2)
    assert UARTTransmitter(divisor=16).divisor == 16
    with pytest.raises(ValueError, match="at least 4"):
        UARTReceiver(divisor=3)
    with pytest.raises(TypeError, match="divisor must be"):
        UARTTransmitter(divisor="16")
    with pytest.raises(TypeError, match="divisor must be"):
        UART(divisor=True)
    with pytest.raises(ValueError, match="baud must be"):
        uart_divisor(25_000_000, 0)


def test_verilog_conversion():
    uart = UART.for_config(AcceleratorConfig())      # elaborated below, so no warning
    assert uart.divisor == Fraction(15625, 72)
    text = verilog.convert(uart, name="bitdet_uart")
    assert "module bitdet_uart" in text
    assert "rx_pin" in text and "tx_pin" in text
