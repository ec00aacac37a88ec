"""The driver's exceptions: one hierarchy for every layer of :mod:`bitdet.sw.driver`.

:class:`DriverError` is the base of what the host side raises (a link that times out, a
device built from another config, a bundle that does not fit, an image that cannot be
read); :class:`DeviceError` (a subclass of the protocol's) is a status other than OK
from the device, with one subclass per :class:`~bitdet.core.protocol.ErrorCode`
(:func:`device_error`).
"""

from __future__ import annotations

from bitdet.core.protocol import DeviceError as _ProtocolDeviceError
from bitdet.core.protocol import ErrorCode

__all__ = [
    "BackendUnavailable",
    "BadAddressError",
    "BadArgumentError",
    "BadCrcError",
    "BadLengthError",
    "BundleDoesNotFit",
    "BusyError",
    "ConfigMismatch",
    "DeviceError",
    "DriverError",
    "FrameTimeoutError",
    "ImageError",
    "LayerDoesNotFitError",
    "LinkTimeout",
    "NotConfiguredError",
    "UnknownOpcodeError",
    "device_error",
]


class DriverError(Exception):
    """Base of the driver's errors (other than :class:`DeviceError`)."""


class LinkTimeout(DriverError, TimeoutError):
    """The device did not answer in time; the message names the port."""


class ConfigMismatch(DriverError):
    """The device was built from another accelerator config (or speaks another protocol
    version) than the one expected."""


class BundleDoesNotFit(DriverError):
    """A bundle needs more than the accelerator provides.

    Members
    -------
    problems : list of str
        One message per problem.
    fit_problems : list of FitProblem
        The same problems, structured (:class:`~bitdet.core.descriptor.FitProblem`: the
        field, the limit, the value), when the planner made them.
    """

    def __init__(self, problems: list, config_name: str = ""):
        self.fit_problems = [p for p in problems if not isinstance(p, str)]
        self.problems = [str(p) for p in problems]
        where = f" accelerator {config_name!r}" if config_name else " accelerator"
        super().__init__(f"the bundle does not fit the{where}: " + "; ".join(self.problems))


class BackendUnavailable(DriverError):
    """A backend's link cannot be created here (module or package missing)."""


class ImageError(DriverError, ValueError):
    """An image that cannot be read or converted."""


class DeviceError(_ProtocolDeviceError):
    """The device answered a status other than OK (``code``, ``opcode``); subclasses per
    status (:func:`device_error` picks one)."""


class BadCrcError(DeviceError):
    """BAD_CRC: the device received a frame with a wrong CRC (link noise)."""


class UnknownOpcodeError(DeviceError):
    """UNKNOWN_OPCODE: the device does not implement the command."""


class BadLengthError(DeviceError):
    """BAD_LENGTH: a payload length outside the command's range."""


class FrameTimeoutError(DeviceError):
    """TIMEOUT: the device dropped a frame that stalled inside."""


class LayerDoesNotFitError(DeviceError):
    """LAYER_DOES_NOT_FIT: a layer descriptor beyond the build's limits."""


class BadAddressError(DeviceError):
    """BAD_ADDRESS: a write or read outside a memory."""


class BadArgumentError(DeviceError):
    """BAD_ARGUMENT: an inconsistent descriptor or argument."""


class NotConfiguredError(DeviceError):
    """NOT_CONFIGURED: a layer table entry was run before it was configured."""


class BusyError(DeviceError):
    """BUSY: the device is running a layer."""


_ERRORS = {
    ErrorCode.BAD_CRC: BadCrcError, ErrorCode.UNKNOWN_OPCODE: UnknownOpcodeError,
    ErrorCode.BAD_LENGTH: BadLengthError, ErrorCode.TIMEOUT: FrameTimeoutError,
    ErrorCode.LAYER_DOES_NOT_FIT: LayerDoesNotFitError, ErrorCode.BAD_ADDRESS: BadAddressError,
    ErrorCode.BAD_ARGUMENT: BadArgumentError, ErrorCode.NOT_CONFIGURED: NotConfiguredError,
    ErrorCode.BUSY: BusyError,
}


def device_error(code: int, opcode: int) -> DeviceError:
    """The :class:`DeviceError` subclass of a status byte (plain DeviceError if unknown)."""
    try:
        cls = _ERRORS.get(ErrorCode(code), DeviceError)
    except ValueError:
        cls = DeviceError
    return cls(code, opcode)
