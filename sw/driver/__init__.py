"""The host driver, in layers (docs/driver.md):

* :mod:`.link` — byte transports (:class:`EmuLink`, :class:`SerialLink`, the RTL
  simulation's link) behind one small interface (:class:`Link`);
* :mod:`.session` — one host session per link: framing with sequence bytes, retries,
  resynchronisation, chunked writes and reads (:class:`Session`);
* :mod:`.planner` — placement of a bundle's weights and maps, and the fit check
  (:func:`plan_bundle`, :func:`fit_problems_for`; contract 2: :func:`plan_graph`, map
  slots);
* :mod:`.device` — :class:`Device`: open, load, run, detect.

Errors are in :mod:`.errors`. ``bitdet.sw.device`` re-exports this package's names.
"""

from .device import BACKENDS, Device, RunStats, fit_image, load_image
from .errors import (
    BackendUnavailable,
    BadAddressError,
    BadArgumentError,
    BadCrcError,
    BadLengthError,
    BundleDoesNotFit,
    BusyError,
    ConfigMismatch,
    DeviceError,
    DriverError,
    FrameTimeoutError,
    ImageError,
    LayerDoesNotFitError,
    LinkTimeout,
    NotConfiguredError,
    UnknownOpcodeError,
    device_error,
)
from .link import DEFAULT_TIMEOUT, EmuLink, Link, SerialLink, rtl_link
from .planner import (
    MODES,
    GraphPlan,
    LayerPlan,
    MapPlan,
    device_layer_count,
    fit_problems_for,
    plan_bundle,
    plan_graph,
    plan_problems,
)
from .session import Session

__all__ = [
    "BACKENDS",
    "DEFAULT_TIMEOUT",
    "MODES",
    "BackendUnavailable",
    "BadAddressError",
    "BadArgumentError",
    "BadCrcError",
    "BadLengthError",
    "BundleDoesNotFit",
    "BusyError",
    "ConfigMismatch",
    "Device",
    "DeviceError",
    "DriverError",
    "EmuLink",
    "FrameTimeoutError",
    "GraphPlan",
    "ImageError",
    "LayerDoesNotFitError",
    "LayerPlan",
    "Link",
    "LinkTimeout",
    "MapPlan",
    "NotConfiguredError",
    "RunStats",
    "SerialLink",
    "Session",
    "UnknownOpcodeError",
    "device_error",
    "device_layer_count",
    "fit_image",
    "fit_problems_for",
    "load_image",
    "plan_bundle",
    "plan_graph",
    "plan_problems",
    "rtl_link",
]
