"""UART PHY of the host link: 8N1 receiver and transmitter with byte streams.

Bit timing uses an exact rational divisor ``clock_hz / baud`` (e.g. 10.5 clock cycles per
bit) with a Bresenham-style phase counter, so the average bit period is exact and no
bit drifts by more than one clock cycle, without a 16× oversampling clock.

The receiver synchronises the line with two flip-flops, takes a falling edge from idle
as a candidate start bit and samples every bit once, in its middle: sample ``k`` (0 =
start bit, 1–8 = data LSB first, 9 = stop bit) is taken ``ceil(divisor·(k + ½))`` cycles
after the edge was seen. A start bit that is high again at its middle is a glitch and
is ignored (so any low pulse shorter than half a bit is rejected); a low stop bit is a
framing error: the byte is dropped, ``framing_error`` pulses, and the receiver waits for
the line to return high (a break) before it looks for the next start bit.
"""

from fractions import Fraction
from numbers import Rational

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["MIN_DIVISOR", "UART", "UARTReceiver", "UARTTransmitter", "uart_divisor"]

MIN_DIVISOR = 4
"""Fewest clock cycles per bit the receiver supports (edge detection + mid-bit sample)."""

_MAX_DENOMINATOR = 256


def uart_divisor(clock_hz: int, baud: int) -> Fraction:
    """Clock cycles per bit, ``clock_hz / baud``, as a fraction with a denominator of at
    most 256 (within 1/(256·divisor) of exact, i.e. far below the UART's tolerance)."""
    for name, value in (("clock_hz", clock_hz), ("baud", baud)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return Fraction(clock_hz, baud).limit_denominator(_MAX_DENOMINATOR)


def _check_divisor(divisor) -> Fraction:
    if isinstance(divisor, bool) or not isinstance(divisor, (Rational, float)):
        raise TypeError(f"divisor must be an integer, a Fraction or a float, not {divisor!r}")
    value = Fraction(divisor)
    if value.denominator > _MAX_DENOMINATOR:
        value = value.limit_denominator(_MAX_DENOMINATOR)
    if value < MIN_DIVISOR:
        raise ValueError(f"divisor must be at least {MIN_DIVISOR} clock cycles per bit, "
                         f"not {divisor!r}")
    return value


class UARTReceiver(wiring.Component):
    """8N1 UART receiver with mid-bit sampling and a rational divisor.

    Parameters
    ----------
    divisor : int, Fraction or float
        Clock cycles per bit (:func:`uart_divisor`), at least :data:`MIN_DIVISOR`.

    Members
    -------
    pin : ``In(1, init=1)``
        The serial line (asynchronous; synchronised inside).
    rx : ``Out(stream.Signature(8))``
        Received bytes. A byte completed while the previous one is still waiting is
        dropped and ``overrun`` pulses.
    framing_error : ``Out(1)``
        One-cycle pulse: a byte had a low stop bit and was dropped.
    overrun : ``Out(1)``
        One-cycle pulse: a byte was dropped because ``rx`` was not read in time.

    Raises
    ------
    TypeError, ValueError
        If ``divisor`` is not a number of at least :data:`MIN_DIVISOR`.
    """

    pin: In(1, init=1)
    rx: Out(stream.Signature(8))
    framing_error: Out(1)
    overrun: Out(1)

    def __init__(self, *, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__()

    @property
    def divisor(self) -> Fraction:
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        # Phase counter in units of 1/(2·den) cycle: a cycle is 2·den, a bit is 2·num.
        num, den = self._divisor.numerator, self._divisor.denominator
        step, period = 2 * den, 2 * num

        line = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.pin, line, init=1)

        phase = Signal(range(period + 1))
        index = Signal(range(10))               # 0 start, 1..8 data, 9 stop
        shift = Signal(8)
        sample = Signal()
        m.d.comb += sample.eq(phase <= step)
        m.d.sync += [self.framing_error.eq(0), self.overrun.eq(0)]

        with m.If(self.rx.ready):
            m.d.sync += self.rx.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~line):
                    m.d.sync += [phase.eq(num), index.eq(0)]
                    m.next = "RECEIVE"
            with m.State("RECEIVE"):
                with m.If(sample):
                    m.d.sync += [phase.eq(phase + period - step), index.eq(index + 1)]
                    with m.If(index == 0):
                        with m.If(line):
                            m.next = "IDLE"             # a glitch, not a start bit
                    with m.Elif(index == 9):
                        with m.If(line):
                            with m.If(self.rx.valid & ~self.rx.ready):
                                m.d.sync += self.overrun.eq(1)
                            with m.Else():
                                m.d.sync += [self.rx.payload.eq(shift), self.rx.valid.eq(1)]
                            m.next = "IDLE"
                        with m.Else():
                            m.d.sync += self.framing_error.eq(1)
                            m.next = "BREAK"
                    with m.Else():
                        m.d.sync += shift.eq(Cat(shift[1:], line))
                with m.Else():
                    m.d.sync += phase.eq(phase - step)
            with m.State("BREAK"):
                with m.If(line):
                    m.next = "IDLE"
        return m


class UARTTransmitter(wiring.Component):
    """8N1 UART transmitter with a rational divisor.

    A byte accepted on ``tx`` goes out as a start bit, 8 data bits LSB first and a stop
    bit; bit ``k`` starts about ``k·divisor`` cycles (rounded up) after the start bit.
    ``tx.ready`` is high while the line is idle, i.e. from the end of the stop bit on.

    Parameters
    ----------
    divisor : int, Fraction or float
        Clock cycles per bit (:func:`uart_divisor`), at least :data:`MIN_DIVISOR`.

    Members
    -------
    tx : ``In(stream.Signature(8))``
        Bytes to send.
    pin : ``Out(1, init=1)``
        The serial line, driven straight from a flip-flop.

    Raises
    ------
    TypeError, ValueError
        If ``divisor`` is not a number of at least :data:`MIN_DIVISOR`.
    """

    tx: In(stream.Signature(8))
    pin: Out(1, init=1)

    def __init__(self, *, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__()

    @property
    def divisor(self) -> Fraction:
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        num, den = self._divisor.numerator, self._divisor.denominator

        frame = Signal(10, init=0x3FF)          # line level in bit 0; ones shift in
        bits_left = Signal(range(11))
        phase = Signal(range(num + 1))
        m.d.comb += [self.pin.eq(frame[0]), self.tx.ready.eq(bits_left == 0)]

        with m.If(self.tx.valid & self.tx.ready):
            m.d.sync += [frame.eq(Cat(0, self.tx.payload, 1)), bits_left.eq(10),
                         phase.eq(num)]
        with m.Elif(bits_left != 0):
            with m.If(phase <= den):
                m.d.sync += [frame.eq(Cat(frame[1:], 1)), bits_left.eq(bits_left - 1),
                             phase.eq(phase + num - den)]
            with m.Else():
                m.d.sync += phase.eq(phase - den)
        return m


class UART(wiring.Component):
    """:class:`UARTReceiver` and :class:`UARTTransmitter` with one divisor.

    Parameters
    ----------
    divisor : int, Fraction or float
        Clock cycles per bit; ``uart_divisor(config.clock_hz, config.baud)`` for an
        :class:`~bitdet.core.config.AcceleratorConfig`.

    Members
    -------
    rx_pin : ``In(1, init=1)``
    tx_pin : ``Out(1, init=1)``
    rx : ``Out(stream.Signature(8))``
    tx : ``In(stream.Signature(8))``
    framing_error, overrun : ``Out(1)``
        As :class:`UARTReceiver`.

    Raises
    ------
    TypeError, ValueError
        If ``divisor`` is not a number of at least :data:`MIN_DIVISOR`.
    """

    rx_pin: In(1, init=1)
    tx_pin: Out(1, init=1)
    rx: Out(stream.Signature(8))
    tx: In(stream.Signature(8))
    framing_error: Out(1)
    overrun: Out(1)

    def __init__(self, *, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__()

    @classmethod
    def for_config(cls, config) -> "UART":
        """The UART of an :class:`~bitdet.core.config.AcceleratorConfig` (its clock and
        baud rate)."""
        return cls(divisor=uart_divisor(config.clock_hz, config.baud))

    @property
    def divisor(self) -> Fraction:
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        m.submodules.receiver = receiver = UARTReceiver(divisor=self._divisor)
        m.submodules.transmitter = transmitter = UARTTransmitter(divisor=self._divisor)
        wiring.connect(m, wiring.flipped(self.rx), receiver.rx)
        wiring.connect(m, wiring.flipped(self.tx), transmitter.tx)
        m.d.comb += [
            receiver.pin.eq(self.rx_pin),
            self.tx_pin.eq(transmitter.pin),
            self.framing_error.eq(receiver.framing_error),
            self.overrun.eq(receiver.overrun),
        ]
        return m
