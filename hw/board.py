"""Board-level tops: UART pins ↔ :class:`~bitdet.hw.uart.UART` ↔
:class:`~bitdet.hw.top.CommandExecutor`.

Two tops share the same core:

* :class:`UARTTop` is board independent: its ports are ``clk``, ``rst`` (the ``sync``
  domain), ``uart_rx`` and ``uart_tx``. ``bitdet hw verilog`` writes it as Verilog for
  any toolchain; the clock must run at ``config.clock_hz`` (the UART divisor and the
  decoder timeout are computed from it).
* :class:`BoardTop` elaborates for an ``amaranth-boards`` platform: it makes
  ``config.clock_hz`` from the board oscillator with the FPGA's PLL (iCE40
  ``SB_PLL40_PAD``, ECP5 ``EHXPLLL``, 7-series ``PLLE2_BASE``; no PLL when the oscillator
  already runs at that frequency), holds the core in reset after power-up until the PLL
  has locked and a counter has run out, and while the board's reset button is pressed,
  and shows ``busy`` / "out of reset" on the first LEDs when the board has them.

The PLL dividers are computed here in Python (:func:`ice40_pll`, :func:`ecp5_pll`,
:func:`xilinx_pll`); a frequency that the PLL cannot make exactly raises
:class:`PLLError` with the nearest ones it can.
"""


from dataclasses import dataclass
from fractions import Fraction

from amaranth.build import ResourceError
from amaranth.hdl import ClockDomain, Const, Instance, Module, Signal
from amaranth.lib import io, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig

from .top import CommandExecutor
from .uart import UART

__all__ = [
    "BOARDS",
    "CLOCK_NET",
    "ECP5PLL",
    "ICE40PLL",
    "POR_CYCLES",
    "BoardSpec",
    "BoardTop",
    "PLLError",
    "UARTTop",
    "XilinxPLL",
    "board_platform",
    "board_pll",
    "ecp5_pll",
    "ice40_pll",
    "xilinx_pll",
]

CLOCK_NET = "clk"
"""Name of the core clock net in the flattened iCE40 netlist (the ``sync`` domain's clock
of :class:`BoardTop`); the iCE40 build constrains it to ``clock_hz`` by this name, since
Amaranth's own constraint names one of the net's aliases that flattening does not keep."""

POR_CYCLES = 1 << 12
"""Clock cycles the core stays in reset after the PLL locks (and after a button press)."""


class PLLError(ValueError):
    """The PLL cannot make the requested clock from the board oscillator."""


def _check_hz(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer number of Hz, not {value!r}")
    return value


def _mhz(hz) -> str:
    return f"{float(hz) / 1e6:.6f}".rstrip("0").rstrip(".")


def _no_exact(family: str, f_in: int, f_out: int, nearest: set[Fraction]) -> PLLError:
    near = sorted(nearest, key=lambda f: (abs(f - f_out), f))[:2]
    near_text = " or ".join(f"{_mhz(f)} MHz" for f in sorted(near))
    return PLLError(f"the {family} cannot make exactly {_mhz(f_out)} MHz from the "
                    f"{_mhz(f_in)} MHz oscillator (nearest: {near_text or 'none'}); "
                    f"choose one of those as clock_hz")


# -- iCE40 (SB_PLL40, SIMPLE feedback) ------------------------------------------------------

@dataclass(frozen=True)
class ICE40PLL:
    """``SB_PLL40_*`` parameters: ``f_out = f_in·(divf + 1) / ((divr + 1)·2**divq)``."""

    divr: int
    divf: int
    divq: int
    filter_range: int
    f_in: int
    f_out: int

    @property
    def f_pfd(self) -> Fraction:
        return Fraction(self.f_in, self.divr + 1)

    @property
    def f_vco(self) -> Fraction:
        return self.f_pfd * (self.divf + 1)


def _ice40_filter_range(f_pfd: Fraction) -> int:
    # Loop filter setting by phase-detector frequency (iCE40 sysCLOCK PLL guide, as icepll).
    for limit, value in ((17, 1), (26, 2), (44, 3), (66, 4), (101, 5)):
        if f_pfd < limit * 1_000_000:
            return value
    return 6


def ice40_pll(f_in: int, f_out: int) -> ICE40PLL:
    """Dividers of an iCE40 PLL making exactly ``f_out`` from ``f_in`` (Hz).

    Limits (iCE40 sysCLOCK PLL guide): input 10–133 MHz, phase detector 10–133 MHz,
    VCO 533–1066 MHz, output 16–275 MHz; DIVR 0–15, DIVF 0–127, DIVQ 1–6. Among exact
    solutions the one with the lowest VCO frequency wins (the least power).

    Raises
    ------
    PLLError
        If no divider setting makes ``f_out`` exactly.
    """
    _check_hz("f_in", f_in)
    _check_hz("f_out", f_out)
    if not 10_000_000 <= f_in <= 133_000_000:
        raise PLLError(f"the iCE40 PLL needs a 10–133 MHz input, not {f_in / 1e6:g} MHz")
    if not 16_000_000 <= f_out <= 275_000_000:
        raise PLLError(f"the iCE40 PLL makes 16–275 MHz, not {f_out / 1e6:g} MHz")
    best, nearest = None, set()
    for divr in range(16):
        f_pfd = Fraction(f_in, divr + 1)
        if not 10_000_000 <= f_pfd <= 133_000_000:
            continue
        for divq in range(1, 7):
            # f_vco = f_out·2**divq must lie in 533–1066 MHz and be f_pfd·(divf + 1).
            f_vco = f_out * (1 << divq)
            if not 533_000_000 <= f_vco <= 1_066_000_000:
                continue
            mult = f_vco / f_pfd
            for divf in {int(mult) - 1, int(mult)}:
                if 0 <= divf <= 127:
                    nearest.add(f_pfd * (divf + 1) / (1 << divq))
            if mult.denominator == 1 and 1 <= mult <= 128:
                pll = ICE40PLL(divr=divr, divf=int(mult) - 1, divq=divq,
                               filter_range=_ice40_filter_range(f_pfd), f_in=f_in, f_out=f_out)
                if best is None or pll.f_vco < best.f_vco:
                    best = pll
    if best is None:
        raise _no_exact("iCE40 PLL", f_in, f_out, nearest)
    return best


# -- ECP5 (EHXPLLL, feedback from CLKOP) ------------------------------------------------------

@dataclass(frozen=True)
class ECP5PLL:
    """``EHXPLLL`` parameters: ``f_out = f_in·clkfb_div / clki_div``,
    ``f_vco = f_out·clkop_div``."""

    clki_div: int
    clkfb_div: int
    clkop_div: int
    f_in: int
    f_out: int

    @property
    def f_pfd(self) -> Fraction:
        return Fraction(self.f_in, self.clki_div)

    @property
    def f_vco(self) -> Fraction:
        return Fraction(self.f_out * self.clkop_div)


def ecp5_pll(f_in: int, f_out: int) -> ECP5PLL:
    """Dividers of an ECP5 PLL making exactly ``f_out`` from ``f_in`` (Hz).

    Limits (ECP5 sysCLOCK guide, as ecppll): input 8–400 MHz, phase detector
    3.125–400 MHz, VCO 400–800 MHz, output 3.125–400 MHz; CLKI_DIV 1–128, CLKFB_DIV 1–80,
    CLKOP_DIV 1–128. Among exact solutions the one with the VCO nearest 600 MHz wins.

    Raises
    ------
    PLLError
        If no divider setting makes ``f_out`` exactly.
    """
    _check_hz("f_in", f_in)
    _check_hz("f_out", f_out)
    if not 8_000_000 <= f_in <= 400_000_000:
        raise PLLError(f"the ECP5 PLL needs an 8–400 MHz input, not {f_in / 1e6:g} MHz")
    if not 3_125_000 <= f_out <= 400_000_000:
        raise PLLError(f"the ECP5 PLL makes 3.125–400 MHz, not {f_out / 1e6:g} MHz")
    best, nearest = None, set()
    for clki_div in range(1, 129):
        f_pfd = Fraction(f_in, clki_div)
        if f_pfd < 3_125_000:
            break
        mult = f_out / f_pfd
        for fb in {int(mult), int(mult) + 1}:
            if 1 <= fb <= 80:
                nearest.add(f_pfd * fb)
        if mult.denominator != 1 or not 1 <= mult <= 80:
            continue
        for clkop_div in range(1, 129):
            f_vco = f_out * clkop_div
            if 400_000_000 <= f_vco <= 800_000_000:
                pll = ECP5PLL(clki_div=clki_div, clkfb_div=int(mult), clkop_div=clkop_div,
                              f_in=f_in, f_out=f_out)
                if best is None or abs(pll.f_vco - 600_000_000) < abs(best.f_vco - 600_000_000):
                    best = pll
    if best is None:
        raise _no_exact("ECP5 PLL", f_in, f_out, nearest)
    return best


# -- Xilinx 7-series (PLLE2_BASE) ------------------------------------------------------------

@dataclass(frozen=True)
class XilinxPLL:
    """``PLLE2_BASE`` parameters: ``f_vco = f_in·mult / divclk``, ``f_out = f_vco / div``."""

    divclk: int
    mult: int
    div: int
    f_in: int
    f_out: int

    @property
    def f_vco(self) -> Fraction:
        return Fraction(self.f_in * self.mult, self.divclk)


def xilinx_pll(f_in: int, f_out: int) -> XilinxPLL:
    """Dividers of a 7-series PLLE2 making exactly ``f_out`` from ``f_in`` (Hz).

    Limits (7-series clocking guide, speed grade -1): input 19–800 MHz, phase detector
    19–450 MHz, VCO 800–1600 MHz, output ≤ 800 MHz; DIVCLK 1–56, CLKFBOUT_MULT 2–64,
    CLKOUT0_DIVIDE 1–128. Among exact solutions the lowest VCO wins.

    Raises
    ------
    PLLError
        If no divider setting makes ``f_out`` exactly.
    """
    _check_hz("f_in", f_in)
    _check_hz("f_out", f_out)
    if not 19_000_000 <= f_in <= 800_000_000:
        raise PLLError(f"the PLLE2 needs a 19–800 MHz input, not {f_in / 1e6:g} MHz")
    if not 6_250_000 <= f_out <= 800_000_000:
        raise PLLError(f"the PLLE2 makes 6.25–800 MHz, not {f_out / 1e6:g} MHz")
    best, nearest = None, set()
    for divclk in range(1, 57):
        f_pfd = Fraction(f_in, divclk)
        if f_pfd < 19_000_000:
            break
        if f_pfd > 450_000_000:
            continue
        for div in range(1, 129):
            f_vco = f_out * div
            if not 800_000_000 <= f_vco <= 1_600_000_000:
                continue
            mult = f_vco / f_pfd
            for m in {int(mult), int(mult) + 1}:
                if 2 <= m <= 64:
                    nearest.add(f_pfd * m / div)
            if mult.denominator == 1 and 2 <= mult <= 64:
                pll = XilinxPLL(divclk=divclk, mult=int(mult), div=div, f_in=f_in, f_out=f_out)
                if best is None or pll.f_vco < best.f_vco:
                    best = pll
    if best is None:
        raise _no_exact("PLLE2", f_in, f_out, nearest)
    return best


# -- boards -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BoardSpec:
    """A supported board: its ``amaranth_boards`` platform and how the top uses it."""

    name: str
    module: str
    platform_class: str
    family: str                     # "ice40", "ecp5" or "xilinx"
    reset_button: tuple[str, int] | None


BOARDS: dict[str, BoardSpec] = {
    "icebreaker": BoardSpec("icebreaker", "amaranth_boards.icebreaker", "ICEBreakerPlatform",
                            "ice40", ("button", 0)),
    "ulx3s": BoardSpec("ulx3s", "amaranth_boards.ulx3s", "ULX3S_85F_Platform", "ecp5",
                       ("button", 0)),        # FIRE1 (button 0 of amaranth-boards, R1)
    "arty_a7": BoardSpec("arty_a7", "amaranth_boards.arty_a7", "ArtyA7_35Platform", "xilinx",
                         ("rst", 0)),         # CPU_RESET
}


def board_platform(board: str):
    """A new ``amaranth_boards`` platform object for ``board`` (a key of :data:`BOARDS`).

    Raises
    ------
    ValueError
        For an unknown board name.
    ImportError
        If ``amaranth-boards`` (the ``fpga`` extra) is not installed.
    """
    import importlib
    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
    spec = BOARDS[board]
    module = importlib.import_module(spec.module)
    return getattr(module, spec.platform_class)()


def board_pll(board: str, platform, clock_hz: int):
    """The PLL parameters :class:`BoardTop` uses to make ``clock_hz`` on ``board``'s
    ``platform``, or ``None`` when the oscillator already runs at ``clock_hz``.

    Raises
    ------
    PLLError
        If the board's PLL cannot make ``clock_hz`` exactly.
    """
    f_in = int(platform.default_clk_frequency)
    if f_in == clock_hz:
        return None
    family = BOARDS[board].family
    return {"ice40": ice40_pll, "ecp5": ecp5_pll, "xilinx": xilinx_pll}[family](f_in, clock_hz)


def _input(m: Module, platform, name: str, number: int = 0):
    """The value of input resource ``name#number`` through an input buffer."""
    buffer = io.Buffer("i", platform.request(name, number, dir="-"))
    m.submodules[f"pin_{name}_{number}"] = buffer
    return buffer.i


# -- tops -------------------------------------------------------------------------------------

class UARTTop(wiring.Component):
    """The accelerator behind its UART, without any board: ports ``clk``, ``rst`` (the
    ``sync`` domain, ``rst`` active high and synchronous), ``uart_rx`` and ``uart_tx``.

    Parameters
    ----------
    config : AcceleratorConfig
        The clock on ``clk`` must run at ``config.clock_hz``.

    Members
    -------
    uart_rx : ``In(1, init=1)``
        Serial input from the host (idle high).
    uart_tx : ``Out(1, init=1)``
        Serial output to the host.
    busy : ``Out(1)``
        A layer is running.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    """

    uart_rx: In(1, init=1)
    uart_tx: Out(1, init=1)
    busy: Out(1)

    def __init__(self, config: AcceleratorConfig):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        super().__init__()

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    def elaborate(self, platform):
        m = Module()
        uart = m.submodules.uart = UART.for_config(self._config)
        core = m.submodules.core = CommandExecutor(self._config)
        wiring.connect(m, uart.rx, core.i)
        wiring.connect(m, core.o, uart.tx)
        m.d.comb += [
            uart.rx_pin.eq(self.uart_rx),
            self.uart_tx.eq(uart.tx_pin),
            self.busy.eq(core.busy),
        ]
        return m


class BoardTop(wiring.Component):
    """:class:`UARTTop` on an ``amaranth-boards`` platform, with clock and reset.

    The ``sync`` domain runs at ``config.clock_hz``, made from the board's default clock
    by the FPGA's PLL (no PLL when the oscillator already has that frequency). Reset is
    held for :data:`POR_CYCLES` cycles after the PLL locks and after the board's reset
    button (if it has one) is released. LED 0 lights once out of reset, LED 1 while a
    layer runs (when the board has LEDs).

    Parameters
    ----------
    config : AcceleratorConfig
    board : str
        A key of :data:`BOARDS`; elaborate with that board's platform.

    Raises
    ------
    ValueError
        For an unknown board.
    """

    def __init__(self, config: AcceleratorConfig, *, board: str):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if board not in BOARDS:
            raise ValueError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
        self._config = config
        self._spec = BOARDS[board]
        super().__init__({})

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    @property
    def board(self) -> BoardSpec:
        return self._spec

    def _clock(self, m, platform, clk, locked):
        pll = board_pll(self._spec.name, platform, self._config.clock_hz)
        family = self._spec.family
        if pll is None:
            m.d.comb += [clk.eq(_input(m, platform, platform.default_clk)), locked.eq(1)]
        elif family == "ice40":
            # SB_PLL40_PAD takes the oscillator straight from its pin (no input buffer).
            pad = platform.request(platform.default_clk, dir="-")
            m.submodules.pll = Instance(
                "SB_PLL40_PAD",
                p_FEEDBACK_PATH="SIMPLE",
                p_DIVR=pll.divr, p_DIVF=pll.divf, p_DIVQ=pll.divq,
                p_FILTER_RANGE=pll.filter_range,
                i_PACKAGEPIN=pad.io,
                i_RESETB=Const(1), i_BYPASS=Const(0),
                o_PLLOUTGLOBAL=clk, o_LOCK=locked)
        elif family == "ecp5":
            osc = _input(m, platform, platform.default_clk)
            m.submodules.pll = Instance(
                "EHXPLLL",
                a_FREQUENCY_PIN_CLKI=f"{pll.f_in / 1e6:g}",
                a_FREQUENCY_PIN_CLKOP=f"{pll.f_out / 1e6:g}",
                a_ICP_CURRENT="12", a_LPF_RESISTOR="8",
                a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
                p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
                p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA",
                p_CLKI_DIV=pll.clki_div, p_CLKFB_DIV=pll.clkfb_div,
                p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=pll.clkop_div,
                p_CLKOP_CPHASE=pll.clkop_div - 1, p_CLKOP_FPHASE=0,
                p_FEEDBK_PATH="CLKOP",
                i_CLKI=osc, i_CLKFB=clk, i_RST=Const(0), i_STDBY=Const(0),
                i_PHASESEL0=Const(0), i_PHASESEL1=Const(0), i_PHASEDIR=Const(1),
                i_PHASESTEP=Const(1), i_PHASELOADREG=Const(1), i_PLLWAKESYNC=Const(0),
                i_ENCLKOP=Const(0),
                o_CLKOP=clk, o_LOCK=locked)
        else:
            osc = _input(m, platform, platform.default_clk)
            feedback = Signal()
            unbuffered = Signal()
            m.submodules.pll = Instance(
                "PLLE2_BASE",
                p_CLKIN1_PERIOD=round(1e9 / pll.f_in, 3),
                p_DIVCLK_DIVIDE=pll.divclk, p_CLKFBOUT_MULT=pll.mult,
                p_CLKOUT0_DIVIDE=pll.div,
                i_CLKIN1=osc, i_CLKFBIN=feedback, i_RST=Const(0), i_PWRDWN=Const(0),
                o_CLKFBOUT=feedback, o_CLKOUT0=unbuffered, o_LOCKED=locked)
            m.submodules.bufg = Instance("BUFG", i_I=unbuffered, o_O=clk)

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = cd_sync = ClockDomain("sync")
        locked = Signal()
        self._clock(m, platform, cd_sync.clk, locked)

        # Power-on reset: a reset-less counter in the same clock counts POR_CYCLES after
        # the PLL locks (and after the button is released) before the core leaves reset.
        m.domains.por = cd_por = ClockDomain("por", reset_less=True)
        m.d.comb += cd_por.clk.eq(cd_sync.clk)
        button = Signal()
        if self._spec.reset_button is not None:
            name, number = self._spec.reset_button
            m.submodules.button_sync = FFSynchronizer(
                _input(m, platform, name, number), button, o_domain="por")
        # LOCK comes from the PLL, not from this clock domain
        locked_sync = Signal()
        m.submodules.lock_sync = FFSynchronizer(locked, locked_sync, o_domain="por")
        count = Signal(range(POR_CYCLES + 1))
        in_reset = Signal(init=1)
        with m.If(~locked_sync | button):
            m.d.por += count.eq(0)
        with m.Elif(count != POR_CYCLES):
            m.d.por += count.eq(count + 1)
        m.d.por += in_reset.eq(count != POR_CYCLES)
        m.d.comb += cd_sync.rst.eq(in_reset)

        top = m.submodules.top = UARTTop(self._config)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = tx = io.Buffer("o", uart.tx)
        m.d.comb += [
            top.uart_rx.eq(rx.i),
            tx.o.eq(top.uart_tx),
        ]
        leds = []
        for number in range(2):
            try:
                port = platform.request("led", number, dir="-")
            except ResourceError:                 # a board without (enough) LEDs
                break
            m.submodules[f"led{number}"] = led = io.Buffer("o", port)
            leds.append(led.o)
        for led, value in zip(leds, (~in_reset, top.busy), strict=False):
            m.d.comb += led.eq(value)
        return m
