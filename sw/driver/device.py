"""The device: one API for every backend of the accelerator (docs/driver.md).

:class:`Device` is the top layer of the driver. Below it, a
:class:`~bitdet.sw.driver.session.Session` owns the command protocol of
:mod:`bitdet.core.protocol` (framing with sequence bytes, retries, resynchronisation,
chunked writes and reads) over a *link* (:mod:`bitdet.sw.driver.link`):

* ``emu`` — :class:`~bitdet.sw.driver.link.EmuLink` around
  :class:`bitdet.sw.emulator.Emulator` (bit-exact, no hardware, the default);
* ``rtl`` — ``bitdet.sim.link.RtlLink``: the generated RTL under Verilator, bytes injected
  at the stream level;
* ``serial`` — :class:`~bitdet.sw.driver.link.SerialLink` (pyserial) to a board.

The host code above the link is the same for all three. ``Device.open`` checks the
device's IDENTIFY config hash against the expected config; :meth:`Device.load` checks that
a bundle fits (before sending anything) and places it (:mod:`bitdet.sw.driver.planner`):
every layer's weights and thresholds resident (written once) when they fit together, else
the fewest bytes streamed per frame — some layers resident, the others written into one
slot before each of their passes; :meth:`Device.run_binary` streams the first binary
input, runs the layers from the device's layer table (the maps stay on chip) and reads the
last map back; :meth:`Device.detect` is the whole pipeline image → detections with
per-layer statistics.

On a contract-2 build (``config.contract == 2``) the same methods run any bundle, a graph
(format 2) or a chain, from :func:`~bitdet.sw.driver.planner.plan_graph`: every layer
resident, the input map's bit-planes written into its map slot (flat addresses
``slot · activation_depth + word``), one extended descriptor per pass, one RUN_NETWORK
(RUN_LAYER per pass with ``trace``), the map the host reads taken from its slot.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bitdet.core import packing
from bitdet.core.protocol import (
    PROTOCOL_VERSION,
    IdentifyReply,
    Opcode,
    decode_counters,
    encode_layer,
    encode_thresholds,
    encode_weights,
    threshold_entry_bytes,
    weight_entry_bytes,
)

from .errors import (
    BundleDoesNotFit,
    ConfigMismatch,
    DriverError,
    ImageError,
)
from .link import DEFAULT_TIMEOUT, EmuLink, SerialLink, rtl_link
from .planner import (
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

__all__ = ["BACKENDS", "Device", "RunStats", "fit_image", "load_image"]

BACKENDS = ("emu", "rtl", "serial")


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
    from PIL import Image
    mode = "L" if channels == 1 else "RGB"
    if isinstance(image, (str, Path)):
        from bitdet.sw.images import read_image
        return read_image(image, channels)
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
    input_bytes: int = 0                               # the input's WRITE frames, out + in
    overlap: bool = False                              # input written during the last run

    @property
    def busy_cycles(self) -> int:
        return sum(layer["busy"] for layer in self.layers)

    def as_dict(self) -> dict:
        return {"layers": self.layers, "busy_cycles": self.busy_cycles,
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in,
                "weight_bytes": self.weight_bytes, "mode": self.mode,
                "input_bytes": self.input_bytes, "overlap": self.overlap,
                "host_seconds": self.host_seconds}


def layer_payloads(config, layer) -> tuple[bytes, bytes]:
    """WRITE_WEIGHTS and WRITE_THRESHOLDS data of a contract-2 conv (a
    :class:`~bitdet.core.golden.BinaryConvLayer`): the threshold entries of tile ``t`` are
    its ``R = 2**shortcut_bits`` rows, one entry per row (``(tiles, cols, R, L)`` as
    ``(tiles·R, cols, L)``, docs/packing.md); the thresholds an entry holds beyond the
    layer's ``L`` are "never" (a map stored with more planes than its levels need)."""
    c = config
    weights = packing.pack_weights(layer.weights, word_bits=c.simd, cols=c.cols)
    table = packing.pack_thresholds(layer.thresholds, layer.k, cols=c.cols,
                                    in_bits=layer.in_bits)
    if table.ndim == 3:
        table = table[:, :, None]                         # one row: no shortcut
    tiles, cols, rows, levels = table.shape
    entries = table.transpose(0, 2, 1, 3).reshape(tiles * rows, cols, levels)
    return (encode_weights(weights),
            encode_thresholds(entries, threshold_width=c.threshold_width,
                              thresholds_per_channel=c.thresholds_per_channel))


def _resolve_config(config):
    from bitdet.core.config import AcceleratorConfig, load_config
    if isinstance(config, AcceleratorConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    raise TypeError(f"config must be a preset name, a YAML path or an AcceleratorConfig, "
                    f"not {config!r}")


def _input_levels(levels, source: MapPlan) -> torch.Tensor:
    """A contract-2 input map as int64 levels ``1×C×H×W`` (from integer levels, or 0/1 or
    ±1 floats of a 1-bit map); a ``ValueError`` naming the shape or the level range."""
    x = torch.as_tensor(levels)
    if x.dim() == 3:
        x = x[None]
    shape = "×".join(map(str, source.shape))
    if x.dim() != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != source.shape:
        raise ValueError(f"the input map is one 1×{shape} map, not {tuple(x.shape)}")
    if x.dtype.is_floating_point and not bool(((x == 0) | (x == 1)).all()):
        if not bool(((x == 1) | (x == -1)).all()):
            raise ValueError("a floating-point input map holds 0/1 bits or ±1 values")
        x = x > 0
    x = x.to(torch.int64)
    top = (1 << source.level_bits) - 1
    if x.numel() and (int(x.min()) < 0 or int(x.max()) > top):
        raise ValueError(f"the input map holds {source.level_bits}-bit levels in 0 … {top}, "
                         f"found {int(x.min()) if int(x.min()) < 0 else int(x.max())}")
    return x


class Device:
    """A connected accelerator (emulated, simulated or real).

    Use :meth:`open`; ``Device(link, config)`` wraps an existing link (IDENTIFY is checked
    either way).

    Members
    -------
    config : AcceleratorConfig
    link : the link object
    session : Session
        The host session over the link (framing, retries, resynchronisation).
    identity : IdentifyReply
    plan : list of LayerPlan, after :meth:`load`
    graph_plan : GraphPlan or None
        On a contract-2 build, after :meth:`load`: the passes with their map slots.
    concurrent_writes : bool
        The device takes WRITE_ACTIVATIONS while a run goes on (docs/protocol.md,
        "Commands during a run"), so :meth:`detect_many` may pipeline frames: the timed
        emulator of ``Device.open("emu", ...)`` and the RTL of a contract-2 config
        (``bitdet.sim.link.RtlLink``, ``Device.open("rtl", ...)``); not a serial link (no
        board runs contract 2).
    """

    def __init__(self, link, config, *, timeout: float = DEFAULT_TIMEOUT,
                 port_name: str | None = None):
        self.link = link
        self.config = _resolve_config(config)
        self.session = Session(link, timeout=timeout, port_name=port_name)
        self.port_name = self.session.port_name
        self.bundle = None
        self.plan: list[LayerPlan] = []
        self.graph_plan: GraphPlan | None = None
        self._slot = None                      # the streamed pass whose weights are in the slot
        self._payloads: dict[int, tuple[bytes, bytes]] = {}
        self._input_slot = 0                   # contract 2: the slot the passes read input from
        # docs/protocol.md, "Commands during a run": the timed emulator and the contract-2
        # RTL (an RtlLink, named so that the driver does not import bitdet.sim) take a
        # WRITE_ACTIVATIONS while a run goes on; no board runs contract 2 (serial: False)
        self.concurrent_writes = (
            bool(getattr(getattr(link, "emulator", None), "timed", False))
            or (type(link).__name__ == "RtlLink" and self.config.contract == 2))
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
            from bitdet.sw.emulator import Emulator
            link = EmuLink(Emulator(config, timed=True))
            timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        elif backend == "rtl":
            link = rtl_link(config, timeout)
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

    # -- commands (through the session) ------------------------------------------------------
    @property
    def timeout(self) -> float:
        """Seconds to wait for a response."""
        return self.session.timeout

    @timeout.setter
    def timeout(self, value: float) -> None:
        self.session.timeout = value

    @property
    def bytes_out(self) -> int:
        """Host → device bytes so far."""
        return self.session.bytes_out

    @property
    def bytes_in(self) -> int:
        """Device → host bytes so far."""
        return self.session.bytes_in

    def command(self, opcode: int, payload: bytes = b"") -> bytes:
        """Send one command, wait for its response; the response data, or a typed
        :class:`~.errors.DeviceError` / :class:`~.errors.LinkTimeout`
        (:meth:`Session.command <bitdet.core.protocol.HostSession.command>`)."""
        return self.session.command(opcode, payload)

    def identify(self) -> IdentifyReply:
        return IdentifyReply.unpack(self.command(Opcode.IDENTIFY))

    def reset(self) -> None:
        self.command(Opcode.RESET)

    def write_activations(self, address: int, data: bytes) -> None:
        self.session.write_memory(Opcode.WRITE_ACTIVATIONS, address, data,
                                  self.config.simd // 8)

    def read_activations(self, address: int, words: int) -> bytes:
        return self.session.read_activations(address, words, self.config.simd // 8)

    # -- bundles ------------------------------------------------------------------------------
    def fit_problems(self, bundle, *, mode: str = "auto", weight_depth: int | None = None,
                     threshold_depth: int | None = None) -> list[str]:
        """Why ``bundle`` cannot run on this device (empty if it can)."""
        return fit_problems_for(self.config, bundle, mode=mode, weight_depth=weight_depth,
                                threshold_depth=threshold_depth)

    fit_problems_for = staticmethod(fit_problems_for)


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

        On a contract-2 build every bundle (a graph or a chain) is planned by
        :func:`plan_graph` (:attr:`graph_plan`) and every layer is resident (``mode``
        ``"streamed"`` does not fit).
        """
        from bitdet.core.bundle import Bundle
        from bitdet.core.bundle import load as load_bundle
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle)
        problems = plan_problems(self.config, bundle, mode=mode, weight_depth=weight_depth,
                                 threshold_depth=threshold_depth)
        if problems:
            raise BundleDoesNotFit(problems, self.config.name)
        if self.config.contract == 2:
            return self._load_graph(bundle)
        self.graph_plan = None
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

    def _load_graph(self, bundle) -> list[LayerPlan]:
        """:meth:`load` on a contract-2 build (the bundle is known to fit): every conv's
        weights and thresholds resident, an extended descriptor per pass."""
        graph = plan_graph(self.config, bundle)
        self.bundle, self.plan, self.graph_plan = None, [], None
        self._slot, self._payloads = None, {}
        self.reset()
        for index, entry in enumerate(graph.passes):
            if entry.kind == "conv":
                self._payloads[index] = self._graph_payloads(entry)
                self._write_layer(index, entry)
        for index, entry in enumerate(graph.passes):
            self.command(Opcode.CONFIGURE_LAYER, encode_layer(**entry.descriptor, index=index))
        self.bundle, self.plan, self.graph_plan = bundle, graph.passes, graph
        self._input_slot = graph.maps["input"].slot
        return graph.passes

    # -- overlap (contract 2) -------------------------------------------------------------------
    @property
    def overlap_slots(self) -> tuple[int, int] | None:
        """The two map slots a contract-2 plan's input alternates between when frames
        are pipelined (:meth:`detect_many`), or None (contract 1, nothing loaded, a device
        that does not take writes during a run — :attr:`concurrent_writes`: the timed
        emulator and the contract-2 RTL do — or no two slots that no other map of the plan
        uses). The input's own slot comes first when no other map reuses it, then the slots
        the plan leaves free."""
        graph = self.graph_plan
        if graph is None or not self.plan or not self.concurrent_writes:
            return None
        used = {m.slot for m in graph.maps.values() if m.name != "input"}
        own = graph.maps["input"].slot
        pool = ([own] if own not in used else []) + [
            s for s in range(graph.slots) if s not in used and s != own]
        return (pool[0], pool[1]) if len(pool) >= 2 else None

    def overlap_gain(self) -> float | None:
        """Seconds per frame that pipelining (:meth:`detect_many`) saves at the config's
        clock and baud, from the plan: ``min(T_compute, T_input) − T_configure``, the
        compute (cycle model) or the input's link time, whichever is shorter, hidden
        behind the other, less the link time of the per-frame re-CONFIGUREs of the passes
        that read the input (56 bytes out, 8 in, each). None without :attr:`overlap_slots`;
        negative when the CONFIGUREs cost more than the overlap hides."""
        from bitdet.core.cycles import pass_cycles
        from bitdet.core.descriptor import EXTENDED_DESCRIPTOR_SIZE
        from bitdet.core.protocol import FRAME_OVERHEAD, write_chunk_bytes, write_cost
        if self.overlap_slots is None:
            return None
        c = self.config
        busy = sum(pass_cycles(c, entry.descriptor)[0] for entry in self.plan)
        word = c.simd // 8
        data = self.graph_plan.maps["input"].words(c.simd) * word
        input_bytes = (write_cost(data, word)
                       + -(-data // write_chunk_bytes(word)) * (FRAME_OVERHEAD + 1))
        readers = sum("input" in entry.reads for entry in self.plan)
        configure = readers * (2 * FRAME_OVERHEAD + EXTENDED_DESCRIPTOR_SIZE + 2)
        byte_time = 10 / c.baud
        return min(busy / c.clock_hz, input_bytes * byte_time) - configure * byte_time

    def _configure_input(self, slot: int) -> None:
        """Re-CONFIGURE the passes that read the input map to read it from ``slot``."""
        if slot == self._input_slot:
            return
        self._input_slot = None                # a CONFIGURE that breaks off: unknown
        for index, entry in enumerate(self.plan):
            if "input" not in entry.reads:
                continue
            d = dict(entry.descriptor)
            if entry.reads[0] == "input":
                d["input_slot"] = slot
            if len(entry.reads) > 1 and entry.reads[1] == "input":
                d["shortcut_slot"] = slot
            self.command(Opcode.CONFIGURE_LAYER, encode_layer(**d, index=index))
        self._input_slot = slot

    def _write_input(self, levels, slot: int, stats: RunStats) -> tuple[int, int]:
        """The input map's bit-planes into ``slot`` (contract 2); its WRITE frames' bytes
        (out, and their 8-byte responses in) into ``stats.input_bytes``."""
        from bitdet.core.protocol import FRAME_OVERHEAD, write_chunk_bytes
        source = self.graph_plan.maps["input"]
        data = packing.pack_levels(_input_levels(levels, source), source.bits,
                                   word_bits=self.config.simd).tobytes()
        out0 = self.bytes_out
        self.write_activations(slot * self.config.activation_depth, data)
        frames = -(-len(data) // write_chunk_bytes(self.config.simd // 8))
        sent, received = self.bytes_out - out0, frames * (FRAME_OVERHEAD + 1)
        stats.input_bytes = sent + received
        return sent, received

    def _graph_payloads(self, entry: LayerPlan) -> tuple[bytes, bytes]:
        """WRITE_WEIGHTS and WRITE_THRESHOLDS data of a contract-2 conv
        (:func:`layer_payloads`)."""
        return layer_payloads(self.config, entry.layer)

    def _write_layer(self, index: int, entry: LayerPlan) -> None:
        """WRITE_WEIGHTS and WRITE_THRESHOLDS of pass ``index`` at its descriptor's bases."""
        c = self.config
        weights, thresholds = self._payloads[index]
        self.session.write_memory(Opcode.WRITE_WEIGHTS, entry.descriptor["weight_base"],
                                  weights, weight_entry_bytes(c.simd, c.cols))
        self.session.write_memory(Opcode.WRITE_THRESHOLDS, entry.descriptor["threshold_base"],
                                  thresholds, threshold_entry_bytes(
                                      c.threshold_width, c.thresholds_per_channel, c.cols))

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

        With every pass resident and no ``trace``, one RUN_NETWORK runs them all (one
        command frame instead of one per pass); the per-pass cycles in ``stats`` are then
        the cycle model's, checked against the device's sums. Otherwise each pass is a
        RUN_LAYER (a streamed layer's weights are written just before it).

        On a contract-2 build (:meth:`run_graph`): ``bits`` are the input map's levels
        (the stem's output); the maps returned are int32 levels, with ``trace`` every node's
        the device runs in node order, else the one the host reads
        (``graph_plan.host_map``: the last node's, or the input of a raw last conv).
        """
        if not self.plan:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        if self.graph_plan is not None:
            graph = self.graph_plan
            maps = self.run_graph(bits, trace=trace, stats=stats)
            return ([maps[name] for name in graph.node_maps()] if trace
                    else [maps[graph.host_map]])
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
        if not trace and all(entry.residency != "streamed" for entry in self.plan):
            self._run_network(stats)
            outputs.append(self._read_map(self.plan[-1].out_shape))
            stats.bytes_out += self.bytes_out - out0
            stats.bytes_in += self.bytes_in - in0
            return outputs
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

    def _run_network(self, stats: RunStats) -> None:
        """Every pass with one RUN_NETWORK (all weights resident, nothing read in between:
        one command frame instead of one per pass). The per-pass cycles are the cycle
        model's (:mod:`bitdet.core.cycles`, the RTL's exact counts); the device's sums must
        equal theirs."""
        self._network_counters(self.command(Opcode.RUN_NETWORK, bytes([len(self.plan)])),
                               stats)

    def _network_counters(self, data: bytes, stats: RunStats) -> None:
        """The per-pass cycles of a RUN_NETWORK answered ``data``, checked (see
        :meth:`_run_network`), into ``stats``."""
        from bitdet.core.cycles import pass_cycles
        busy, stall = decode_counters(data)
        layers = []
        for entry in self.plan:
            b, s = pass_cycles(self.config, entry.descriptor)
            layers.append({"name": entry.name, "kind": entry.kind, "busy": b, "stall": s,
                           "weight_bytes": 0})
        mask = 0xFFFFFFFF
        expected = (sum(x["busy"] for x in layers) & mask,
                    sum(x["stall"] for x in layers) & mask)
        if (busy, stall) != expected:
            raise DriverError(f"the device ran the network in {busy} busy / {stall} stall "
                              f"cycles, the cycle model says {expected[0]} / {expected[1]}")
        stats.layers += layers

    def run_host_tail(self, bits: torch.Tensor) -> torch.Tensor | None:
        """The loaded bundle's raw last layer on the host: its ``P`` (int32 ``1×O×H×W``,
        golden model) from the device's last map ``bits`` (0/1); ``None`` when every
        binary layer runs on the device. On a contract-2 build: the raw last conv's ``A``
        from the levels of the map it reads (``graph_plan.host_map``)."""
        if self.bundle is None:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        from bitdet.core.golden import run_layer
        if self.graph_plan is not None:            # the levels of graph_plan.host_map
            if self.graph_plan.host_layer is None:
                return None
            return run_layer(torch.as_tensor(bits).to(torch.int32), self.bundle.nodes()[-1].op)
        if device_layer_count(self.bundle) == len(self.bundle.binary_layers):
            return None
        return run_layer(bits.to(torch.float32) * 2 - 1, self.bundle.binary_layers[-1])

    def run_graph(self, levels, *, trace: bool = False, stats: RunStats | None = None
                  ) -> dict[str, torch.Tensor]:
        """Run the loaded bundle on a contract-2 device; the maps read back, by name
        (:class:`~bitdet.sw.driver.planner.MapPlan` names: node names, ``"input"``).

        ``levels``: the input map, ``C×H×W`` or ``1×C×H×W``, integer levels of the bundle's
        ``input_bits`` (the stem's output), or 0/1 or ±1 floats of a 1-bit input. Its
        bit-planes are written into its slot; without ``trace`` one RUN_NETWORK runs every
        pass (the device's cycle sums checked against :func:`~bitdet.core.cycles.
        pass_cycles`) and only ``graph_plan.host_map`` is read back; with ``trace`` every
        pass is a RUN_LAYER and each node's map is read right after the pass that makes it.
        Maps are int32 levels ``1×C×H×W``.
        """
        graph = self.graph_plan
        if graph is None or not self.plan:
            raise DriverError("no bundle loaded on a contract-2 build: call "
                              "Device.load(bundle) first (contract 1: run_binary)")
        stats = RunStats() if stats is None else stats
        if self._input_slot is None:           # a re-CONFIGURE broke off
            self._configure_input(graph.maps["input"].slot)
        _input_levels(levels, graph.maps["input"])          # checked before anything is sent
        out0, in0 = self.bytes_out, self.bytes_in
        self._write_input(levels, self._input_slot, stats)
        stats.mode = self.mode
        maps = {}
        if trace:
            for index, entry in enumerate(self.plan):
                busy, stall = decode_counters(self.command(Opcode.RUN_LAYER, bytes([index])))
                stats.layers.append({"name": entry.name, "kind": entry.kind, "busy": busy,
                                     "stall": stall, "weight_bytes": 0})
                made = graph.maps[entry.writes]
                if not made.before_pool:
                    maps[made.name] = self._read_levels(made)
        else:
            self._run_network(stats)
        if graph.host_map not in maps:
            maps[graph.host_map] = self._read_levels(graph.maps[graph.host_map])
        stats.bytes_out += self.bytes_out - out0
        stats.bytes_in += self.bytes_in - in0
        return maps

    def _read_levels(self, m: MapPlan) -> torch.Tensor:
        """A contract-2 map's levels (its ``level_bits`` planes) from its slot."""
        ch, h, w = m.shape
        words = m.level_bits * m.plane_words(self.config.simd)
        slot = self._input_slot if m.name == "input" and self._input_slot is not None \
            else m.slot
        data = self.read_activations(slot * self.config.activation_depth, words)
        packed = np.frombuffer(data, dtype=np.uint8).reshape(m.level_bits, 1, h, w, -1)
        return packing.unpack_levels(packed, ch, word_bits=self.config.simd,
                                     check_padding=False)

    def _device_maps(self, stem: torch.Tensor, trace: bool, stats: RunStats
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """:meth:`detect`'s device part: the maps (:meth:`run_binary`) and the one a raw
        last layer reads (:meth:`run_host_tail`)."""
        if self.graph_plan is None:
            maps = self.run_binary(stem, trace=trace, stats=stats)
            return maps, maps[-1]
        graph = self.graph_plan
        found = self.run_graph(stem, trace=trace, stats=stats)
        maps = [found[name] for name in graph.node_maps()] if trace else [found[graph.host_map]]
        return maps, found[graph.host_map]

    def _read_map(self, shape) -> torch.Tensor:
        ch, h, w = shape
        data = self.read_activations(0, self._map_words(shape))
        packed = np.frombuffer(data, dtype=np.uint8).reshape(1, h, w, -1)
        pm1 = packing.unpack_activations(packed, ch, word_bits=self.config.simd,
                                         check_padding=False)
        return (pm1 > 0).to(torch.int32)

    DECODE_DEFAULTS = {  # noqa: RUF012 - read only
        "score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 100}
    """Decoding limits of :meth:`detect` for a bundle whose ``model["decode"]`` gives none
    (read only)."""

    @classmethod
    def decode_settings_for(cls, bundle, *, score_threshold: float | None = None,
                            iou_threshold: float | None = None,
                            max_detections: int | None = None) -> dict:
        """Keyword arguments of :func:`bitdet.sw.detection.decode` that :meth:`detect` uses
        for ``bundle``: its stride and box prior
        (:meth:`~bitdet.core.bundle.Bundle.decode_settings`) and the score threshold, NMS
        IoU threshold and detection limit, each the argument when given (not None), else
        the bundle's ``model["decode"]`` value (``bitdet import --head-config``), else
        :attr:`DECODE_DEFAULTS` (0.25, 0.5, 100).

        Raises
        ------
        BundleError
            For a bundle without a detection head (no valid ``grid_stride``), or a
            ``model.decode`` limit out of range (naming the key).
        ValueError
            For an argument out of range (thresholds in [0, 1], ``max_detections`` an
            integer >= 1).
        """
        import numbers

        from bitdet.core.bundle import BundleError
        from bitdet.sw.evaluate import decode_settings

        def checked(key, value, error, where):
            if key == "max_detections":
                ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                      and value >= 1)
                need = "an integer >= 1"
            else:
                ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
                      and 0 <= value <= 1)              # False for NaN too
                need = "a number in [0, 1]"
            if not ok:
                raise error(f"{where} must be {need}, not {value!r}")
            return int(value) if key == "max_detections" else float(value)

        settings = decode_settings(**bundle.decode_settings())   # no head: BundleError
        stored = bundle.model.get("decode")
        stored = stored if isinstance(stored, dict) else {}
        given = {"score_threshold": score_threshold, "iou_threshold": iou_threshold,
                 "max_detections": max_detections}
        for key, value in given.items():
            if value is not None:
                settings[key] = checked(key, value, ValueError, key)
            elif key in stored:
                settings[key] = checked(key, stored[key], BundleError,
                                        f"the bundle's model.decode.{key}")
            else:
                settings[key] = cls.DECODE_DEFAULTS[key]
        return settings

    def _decode_kwargs(self, **limits) -> dict:
        """:meth:`decode_settings_for` the loaded bundle (checked before a frame runs)."""
        if self.bundle is None:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        return self.decode_settings_for(self.bundle, **limits)

    def detect(self, image, *, score_threshold: float | None = None,
               iou_threshold: float | None = None, max_detections: int | None = None,
               trace: bool = False) -> dict:
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

        On a contract-2 build the stem's levels are the input map (:meth:`run_graph`);
        ``"maps"`` with ``trace`` are every node's map in node order (a raw last conv's
        ``A`` last), and the head reads the last node's map as
        :meth:`~bitdet.core.bundle.Bundle.head` expects.

        ``score_threshold``, ``iou_threshold`` (NMS) and ``max_detections``: None (the
        default) takes the bundle's ``model["decode"]`` value, else 0.25, 0.5 and 100
        (:meth:`decode_settings_for`, which also raises :class:`BundleError` for a bundle
        without a detection head, before the frame runs).
        """
        settings = self._decode_kwargs(score_threshold=score_threshold,
                                       iou_threshold=iou_threshold,
                                       max_detections=max_detections)
        frame = self._prepare(image)
        maps, tail_input = self._device_maps(frame["stem"], trace, frame["stats"])
        frame["times"].append(time.perf_counter())
        return self._finish(frame, maps, tail_input, trace, settings)

    def _prepare(self, image) -> dict:
        """:meth:`detect`'s host part before the device: the image fitted to the model's
        input and run through the stem."""
        if self.bundle is None:
            raise DriverError("no bundle loaded: call Device.load(bundle) first")
        bundle = self.bundle
        clock = time.perf_counter
        t0 = clock()
        in_ch, in_h, in_w = bundle.model.get("input", [1, None, None])
        if in_h is None:
            raise DriverError("the bundle's model metadata has no 'input' shape")
        original = load_image(image, in_ch)
        fitted, scale, offset = fit_image(original, (in_h, in_w))
        pixels = torch.from_numpy(np.array(
            fitted[None, None] if fitted.ndim == 2 else np.moveaxis(fitted, -1, 0)[None]))
        t1 = clock()
        stem = bundle.stem(pixels)
        t2 = clock()
        return {"original": original, "scale": scale, "offset": offset, "stem": stem,
                "size": (in_h, in_w), "stats": RunStats(), "times": [t0, t1, t2],
                "stem_seconds": t2 - t1}

    def _finish(self, frame: dict, maps: list, tail_input, trace: bool,
                settings: dict) -> dict:
        """:meth:`detect`'s host part after the device: the raw tail, the head, the
        decoding (``settings``: :meth:`decode_settings_for`), the boxes in the original
        image's pixels."""
        from bitdet.sw.detection import decode
        bundle, stats, original = self.bundle, frame["stats"], frame["original"]
        (left, top), scale, (in_h, in_w) = frame["offset"], frame["scale"], frame["size"]
        p = self.run_host_tail(tail_input)
        if p is not None:                       # a raw last layer: its P on the host
            maps = [*maps, p] if trace else [p]
        head = bundle.head(maps[-1])
        found = decode(head, image_size=(in_h, in_w), **settings)[0]
        boxes = found["boxes"].clone()
        boxes -= torch.tensor([left, top, left, top], dtype=boxes.dtype)
        boxes /= scale
        limits = torch.tensor([original.shape[1], original.shape[0]] * 2, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        t0, t1, t2, t3 = frame["times"]
        stats.host_seconds = {"preprocess": t1 - t0, "stem": frame["stem_seconds"],
                              "device": t3 - t2,
                              "head_decode": time.perf_counter() - t3}
        return {"boxes": boxes, "scores": found["scores"], "labels": found["labels"],
                "class_names": list(bundle.model.get("classes", [])), "head": head,
                "maps": maps, "image": original, "stats": stats}

    def detect_many(self, images, *, score_threshold: float | None = None,
                    iou_threshold: float | None = None, max_detections: int | None = None,
                    trace: bool = False, pipeline: bool | None = None):
        """:meth:`detect` of every image of the iterable ``images``, yielded in order.

        On a contract-2 build whose plan leaves two slots for the input
        (:attr:`overlap_slots`), without ``trace``, the frames are pipelined: frame
        ``k``'s RUN_NETWORK is sent, frame ``k + 1``'s input is written into the other
        input slot while it runs, then frame ``k``'s answer is awaited and its output read;
        before each RUN the passes that read the input are re-CONFIGUREd to its slot. The
        detections are those of :meth:`detect`; a frame's ``stats`` count its input
        (written during the run before), its CONFIGUREs, RUN and read, with
        ``stats.overlap`` true for a frame after the first. ``pipeline``: None (default)
        pipelines when it pays (:meth:`overlap_gain` > 0), True whenever the slots allow
        it, False never. Otherwise (one image, too) each image is one :meth:`detect`.
        The decoding limits are :meth:`detect`'s (None: the bundle's, else the defaults),
        resolved once, before the first frame."""
        settings = self._decode_kwargs(score_threshold=score_threshold,
                                       iou_threshold=iou_threshold,
                                       max_detections=max_detections)
        kwargs = {key: settings[key]
                  for key in ("score_threshold", "iou_threshold", "max_detections")}
        slots = None if trace or pipeline is False else self.overlap_slots
        if slots is not None and pipeline is None and not self.overlap_gain() > 0:
            slots = None
        if slots is None:
            for image in images:
                yield self.detect(image, trace=trace, **kwargs)
            return
        end = object()
        images = iter(images)
        first, second = next(images, end), next(images, end)
        if second is end:                      # one frame: nothing to overlap
            if first is not end:
                yield self.detect(first, **kwargs)
            return
        images = itertools.chain([second], images)
        frame, k = self._prepare(first), 0
        _input_levels(frame["stem"], self.graph_plan.maps["input"])
        frame["input"] = self._write_input(frame["stem"], slots[0], frame["stats"])
        while frame is not None:
            upcoming = next(images, end)
            following = None if upcoming is end else self._prepare(upcoming)
            device_start = time.perf_counter()
            maps = self._pipelined_run(frame, following, slots[k % 2], slots[(k + 1) % 2])
            frame["times"][2:] = [device_start, time.perf_counter()]
            yield self._finish(frame, maps, maps[0], False, settings)
            frame, k = following, k + 1

    def _pipelined_run(self, frame: dict, following: dict | None, slot: int,
                       next_slot: int) -> list[torch.Tensor]:
        """One frame of :meth:`detect_many`: its input is in ``slot``; ``following``'s
        input goes into ``next_slot`` during the run. Returns ``[host map]``."""
        graph, stats = self.graph_plan, frame["stats"]
        stats.mode = self.mode
        out0, in0 = self.bytes_out, self.bytes_in
        if following is not None:             # checked before the run starts
            _input_levels(following["stem"], graph.maps["input"])
        self._configure_input(slot)
        seq = self.session.send(Opcode.RUN_NETWORK, bytes([len(self.plan)]))
        written = (0, 0)
        try:
            if following is not None:
                written = following["input"] = self._write_input(
                    following["stem"], next_slot, following["stats"])
                following["stats"].overlap = True
        finally:
            data = self.session.await_reply(seq)
        self._network_counters(data, stats)
        host = self._read_levels(graph.maps[graph.host_map])
        # this frame: its input (written before), its CONFIGUREs, RUN and read
        stats.bytes_out += self.bytes_out - out0 - written[0] + frame["input"][0]
        stats.bytes_in += self.bytes_in - in0 - written[1] + frame["input"][1]
        return [host]
