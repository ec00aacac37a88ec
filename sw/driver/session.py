"""The driver's host session: :class:`bitdet.core.protocol.HostSession` raising the
driver's typed errors.

The session is the layer between the links (:mod:`.link`) and the device
(:mod:`.device`): framing with a fresh sequence byte per frame, waiting for the response
that echoes it (a late or stale reply is discarded, never taken for a later command's),
resending frames the device dropped as damaged, resynchronising after a failure (the line
quiet for the device's inter-byte timeout), splitting writes and reads into frames of
at most ``MAX_PAYLOAD``, and (contract 2) one RUN in flight while writes go on
(``send`` / ``await_reply``: replies paired by seq, whatever their order). Its
implementation is in :mod:`bitdet.core.protocol`, so that the
RTL simulation's layer runs (:mod:`bitdet.sim.layer`, which may not import the
application) drive the device through the same code; here it raises
:class:`~.errors.LinkTimeout` naming the port, and one :class:`~.errors.DeviceError`
subclass per status (:func:`~.errors.device_error`).
"""

from __future__ import annotations

from bitdet.core.protocol import HostSession

from .errors import LinkTimeout, device_error
from .link import DEFAULT_TIMEOUT

__all__ = ["Session"]


class Session(HostSession):
    """One host session over ``link`` (see :class:`~bitdet.core.protocol.HostSession`).

    Raises :class:`~.errors.LinkTimeout` (a :class:`TimeoutError`) when a command gets no
    answer and :func:`~.errors.device_error`'s subclass of
    :class:`~.errors.DeviceError` for a status other than OK.
    """

    def __init__(self, link, *, timeout: float = DEFAULT_TIMEOUT,
                 frame_timeout: float | None = None, port_name: str | None = None):
        super().__init__(link, timeout=timeout, frame_timeout=frame_timeout,
                         port_name=port_name)

    def _timeout_error(self, message: str) -> Exception:
        return LinkTimeout(message)

    def _status_error(self, code: int, opcode: int) -> Exception:
        return device_error(code, opcode)
