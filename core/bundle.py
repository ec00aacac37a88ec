"""Deployment bundle: everything the host driver needs to run a folded detector.

A bundle is a ZIP archive (``*.bitdet``) with a JSON manifest and one ``.npy`` file per
array (numpy's format, loaded with ``allow_pickle=False``). ZIP gives per-member CRC-32
checks and lets anyone inspect a bundle with ``unzip -l``. docs/bundle.md documents the
format. :data:`FORMAT_VERSION` (1) is the version of a chain of 1-bit layers and is what
such a bundle is still written as, byte for byte; :data:`GRAPH_FORMAT_VERSION` (2) is
written only when a bundle uses a contract v2 feature (a graph of nodes, n-bit levels,
residual shortcuts and their ``(O, R, L)`` threshold tables). :func:`load` reads both.

What it holds:

* the binary layers the accelerator runs, folded (:class:`bitdet.core.golden.BinaryConvLayer`):
  weights packed with :func:`bitdet.core.packing.pack_weights` in 8-bit words (the driver
  repacks them for the device's SIMD width), integer thresholds, geometry; either a chain
  (version 1) or a graph of :class:`bitdet.core.golden.GraphNode` (convs, pool passes,
  channel repetitions with named inputs and shortcuts; version 2);
* the host-side layers in fixed point (:class:`HostLayer`): the first conv on the image
  and the real-valued head;
* free-form model metadata (classes, input normalization, box decoding);
* the accelerator requirements derived from the layers (:class:`Requirements`), checked
  against the layers again on load.

:func:`load` validates everything and raises :class:`BundleError` with a message that
names the file, the layer and the field; it never returns a bundle that would give
silently wrong results.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from zlib import error as zlib_error

import numpy as np
import torch

from . import packing
from .golden import (
    MAX_LEVEL_BITS,
    BinaryConvLayer,
    ChannelRepeat,
    GraphNode,
    PoolPass,
    _check_graph,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "GRAPH_FORMAT_VERSION",
    "HOST_LAYER_KINDS",
    "NODE_OPS",
    "Bundle",
    "BundleError",
    "HostLayer",
    "Requirements",
    "load",
]

FORMAT = "bitdet-bundle"
#: Version of a chain of 1-bit binary layers (written exactly as before contract v2).
FORMAT_VERSION = 1
#: Version of a bundle that uses a contract v2 feature: a graph, n-bit levels, shortcuts.
GRAPH_FORMAT_VERSION = 2
#: Versions :func:`load` reads.
FORMAT_VERSIONS = (FORMAT_VERSION, GRAPH_FORMAT_VERSION)
#: Graph node op kinds of a version 2 manifest.
NODE_OPS = ("conv", "pool", "repeat")
#: Requirements fields a version 1 manifest does not store.
_V2_REQUIREMENTS = ("max_input_bits", "max_shortcut_bits", "live_maps", "node_maps")
MANIFEST = "manifest.json"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: reproducible bytes
#: Word width of the packed weights stored in a bundle (the byte is the common divisor of
#: every SIMD width; the driver repacks for the device).
STORAGE_WORD_BITS = 8

#: Arrays each host layer kind must hold: name → (dtype, number of dimensions).
HOST_LAYER_KINDS: dict[str, dict[str, tuple[str, int]]] = {
    # out = count of thresholds reached by sign · Σ w·(x − zero_point)   (first layer)
    "conv_threshold": {"weight": ("int8", 4), "thresholds": ("int32", 2), "sign": ("int8", 1)},
    # out = (Σ w·x + bias) · scale   (the real-valued head)
    "conv_affine": {"weight": ("int8", 4), "bias": ("int32", 1), "scale": ("float32", 1)},
}


class BundleError(ValueError):
    """A bundle file is unreadable, corrupt, or describes an inconsistent model."""


@dataclass
class HostLayer:
    """A layer that runs on the host in fixed point (first conv, head).

    Members
    -------
    name : str
    kind : "conv_threshold" or "conv_affine" (see :data:`HOST_LAYER_KINDS`)
    arrays : dict of numpy arrays, as the kind requires
    stride, padding : int
    attrs : dict
        Extra JSON-serializable attributes (e.g. ``zero_point`` of the input).
    """

    name: str
    kind: str
    arrays: dict[str, np.ndarray]
    stride: int = 1
    padding: int = 0
    attrs: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        if self.kind not in HOST_LAYER_KINDS:
            raise BundleError(f"{where}: unknown host layer kind {self.kind!r} "
                              f"(known: {', '.join(HOST_LAYER_KINDS)})")
        for name, (dtype, ndim) in HOST_LAYER_KINDS[self.kind].items():
            if name not in self.arrays:
                raise BundleError(f"{where}: missing array {name!r}")
            a = self.arrays[name]
            if a.dtype != np.dtype(dtype) or a.ndim != ndim:
                raise BundleError(f"{where}: array {name!r} must be {ndim}-D {dtype}, "
                                  f"not {a.ndim}-D {a.dtype}")
        out_channels = self.arrays["weight"].shape[0]
        for name, a in self.arrays.items():
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf" or a.ndim < 1:
                raise BundleError(f"{where}: array {name!r} must be a numeric numpy array "
                                  "with at least one axis")
            if name != "weight" and a.shape[0] != out_channels:
                raise BundleError(f"{where}: array {name!r} has {a.shape[0]} rows but the "
                                  f"weight has {out_channels} output channels")
        if self.kind == "conv_threshold":
            zero_point = self.attrs.get("zero_point", 0)
            if not isinstance(zero_point, int) or isinstance(zero_point, bool):
                raise BundleError(f"{where}: attrs 'zero_point' must be an integer, "
                                  f"not {zero_point!r}")
            if not np.isin(self.arrays["sign"], (-1, 1)).all():
                raise BundleError(f"{where}: 'sign' must hold only -1 and +1")
            t = self.arrays["thresholds"]
            levels = t.shape[1] + 1
            if levels < 2 or levels & (levels - 1) or (np.diff(t, axis=1) < 0).any():
                raise BundleError(f"{where}: thresholds must be (O, 2**n - 1) with sorted rows")
        if self.kind == "conv_affine" and not np.isfinite(self.arrays["scale"]).all():
            raise BundleError(f"{where}: 'scale' must be finite")
        if self.stride < 1 or self.padding < 0:
            raise BundleError(f"{where}: stride must be ≥ 1 and padding ≥ 0")
        _check_json(self.attrs, f"{where}: attrs")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """Run the layer in fixed point on integer input ``N×C×H×W``.

        ``conv_threshold``: ``x`` is the raw integer input (e.g. uint8 pixels); the
        accumulator is ``Σ w·(x − zero_point)`` with padding at the zero point, the output
        is the number of thresholds that ``sign · acc`` reaches (0/1 bits for one).
        ``conv_affine``: ``x`` is ±1 activations (or integers); returns float32
        ``(acc + bias) · scale``.
        """
        from .golden import fixed_point_conv2d, threshold
        self.validate(f"host layer {self.name!r}")
        w = torch.from_numpy(self.arrays["weight"].astype(np.int64))
        if self.kind == "conv_threshold":
            zero_point = int(self.attrs.get("zero_point", 0))
            acc = fixed_point_conv2d(x.to(torch.int64) - zero_point, w, stride=self.stride,
                                     padding=self.padding, pad_value=0)
            sign = torch.from_numpy(self.arrays["sign"].astype(np.int64)).reshape(1, -1, 1, 1)
            return threshold(acc * sign, torch.from_numpy(self.arrays["thresholds"]))
        acc = fixed_point_conv2d(x, w, stride=self.stride, padding=self.padding, pad_value=0)
        acc = acc + torch.from_numpy(self.arrays["bias"].astype(np.int64)).reshape(1, -1, 1, 1)
        scale = torch.from_numpy(self.arrays["scale"]).reshape(1, -1, 1, 1)
        return acc.to(torch.float32) * scale


@dataclass(frozen=True)
class Requirements:
    """What an accelerator must provide to run a bundle's binary layers resident on chip.

    Counts are logical (unpadded); :meth:`weight_words` and :meth:`activation_words` give
    the storage for a given SIMD width.
    """

    layers: int
    max_in_channels: int
    max_out_channels: int
    max_k: int
    max_kernel: int
    max_stride: int
    max_padding: int
    max_pool_kernel: int
    max_output_bits: int
    raw_output: bool
    max_pixels: int
    layer_shapes: tuple = ()
    #: ``(H, W)`` of each layer's conv output *before* its pool: the device writes that map
    #: into an activation bank before the pool pass reads it. Derived, not stored in the
    #: manifest (``layer_shapes`` and the layers determine it).
    conv_shapes: tuple = ()
    #: Largest ``in_bits`` and ``shortcut_bits`` of a binary layer (contract v2).
    max_input_bits: int = 1
    max_shortcut_bits: int = 0
    #: Maps that must be held at once (map slots): over the node order, a map is live from
    #: the node that makes it (the network input: from the start) to its last reader (the
    #: last node's map: to the end); a node's sources and its output are live together.
    #: 2 for a chain (ping-pong).
    live_maps: int = 2
    #: ``(name, op, C, H, W, bits)`` of every map: the network input (``"input"``, op
    #: ``"input"``) then each node's, in node order (``bits`` None: raw A).
    node_maps: tuple = ()
    #: The bundle format version these requirements need (1: no v2 feature). Derived, not
    #: stored in the manifest.
    format_version: int = 1

    def weight_words(self, word_bits: int) -> int:
        """SIMD words of weights for all layers (channel padding included)."""
        return sum(o * kh * kw * -(-c // word_bits)
                   for (c, o, kh, kw, _hw, _ohw) in self.layer_shapes)

    def threshold_entries(self) -> int:
        """Thresholds for all layers (one per output channel and level)."""
        return sum(o for (_c, o, *_rest) in self.layer_shapes)

    def activation_words(self, word_bits: int) -> int:
        """SIMD words of the largest feature map a ping-pong half must hold: every layer's
        input, its conv output before a pool, and its (pooled) output."""
        conv = self.conv_shapes or tuple(ohw for (*_, ohw) in self.layer_shapes)
        return max(max(h * w * -(-c // word_bits), ch * cw * -(-o // word_bits),
                       oh * ow * -(-o // word_bits))
                   for (c, o, _kh, _kw, (h, w), (oh, ow)), (ch, cw)
                   in zip(self.layer_shapes, conv, strict=True))


def _bitdet_version() -> str:
    try:
        return version("bitdet")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "unknown"


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@dataclass
class Bundle:
    """A folded detector: host layers, device (binary) layers, metadata.

    Members
    -------
    binary_layers : list of BinaryConvLayer
        Consecutive device layers; all but the last output 1-bit activations (a layer with
        ``in_bits`` n may read up to n bits). For a graph bundle: the graph's convs in node
        order (filled in from ``graph`` when left empty).
    input_shape : (C, H, W)
        Shape of the first binary layer's input (the host's first layer output).
    host_layers : list of HostLayer
    layer_names : list of str, one per binary layer (a graph's conv node names)
    model : dict
        Free-form JSON metadata (classes, input normalization, decoding).
    graph : list of GraphNode or None
        Contract v2: the binary network as a graph (convs, pool passes, channel
        repetitions with named inputs and shortcuts), run by
        :func:`bitdet.core.golden.run_graph`; ``None`` for a chain.
    input_bits : int
        Bits of the network input's levels (the stem's output), 1…4.
    """

    binary_layers: list[BinaryConvLayer]
    input_shape: tuple[int, int, int]
    host_layers: list[HostLayer] = field(default_factory=list)
    layer_names: list[str] | None = None
    model: dict = field(default_factory=dict)
    graph: list[GraphNode] | None = None
    input_bits: int = 1

    def __post_init__(self):
        self.input_shape = tuple(int(v) for v in self.input_shape)
        if self.graph is not None:
            self.graph = list(self.graph)
            if not self.binary_layers and self.layer_names is None:
                convs = [n for n in self.graph if isinstance(getattr(n, "op", None),
                                                             BinaryConvLayer)]
                self.binary_layers = [n.op for n in convs]
                self.layer_names = [n.name for n in convs]
        if self.layer_names is None:
            self.layer_names = [f"binary{i}" for i in range(len(self.binary_layers))]

    # -- contract v2 --------------------------------------------------------------------
    def uses_v2(self) -> bool:
        """Whether the bundle needs format version 2: a graph, n-bit input levels, a layer
        with ``in_bits`` > 1 or a shortcut."""
        return (self.graph is not None or self.input_bits != 1
                or any(layer.in_bits != 1 or layer.shortcut_bits
                       for layer in self.binary_layers))

    @property
    def format_version(self) -> int:
        """The format version :meth:`save` writes."""
        return GRAPH_FORMAT_VERSION if self.uses_v2() else FORMAT_VERSION

    def nodes(self) -> list[GraphNode]:
        """The binary network as graph nodes: ``graph``, or the chain with each layer
        reading the previous one (the first: ``"input"``)."""
        if self.graph is not None:
            return list(self.graph)
        nodes = []
        for i, (name, layer) in enumerate(zip(self.layer_names, self.binary_layers,
                                              strict=True)):
            try:
                nodes.append(GraphNode(name, layer, self.layer_names[i - 1] if i else "input"))
            except ValueError as e:
                raise BundleError(f"binary layer {i}: {e}") from None
        return nodes

    def _node_maps(self) -> list[_NodeMap]:
        """Check the graph statically (no tensor is run) and give each node's map."""
        self._check_input_bits()
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise BundleError(f"input_shape must be (C, H, W) positive, not {self.input_shape}")
        return _check_nodes(self.nodes(), self.input_shape, self.input_bits)

    def _check_input_bits(self) -> None:
        if isinstance(self.input_bits, bool) or not isinstance(self.input_bits, int) \
                or not 1 <= self.input_bits <= MAX_LEVEL_BITS:
            raise BundleError(f"input_bits must be an integer in [1, {MAX_LEVEL_BITS}], "
                              f"not {self.input_bits!r}")

    # -- geometry -----------------------------------------------------------------------
    def layer_shapes(self) -> list[tuple]:  # noqa: C901
        """Per binary layer ``(C, O, kh, kw, (H, W) in, (H, W) out)``; validates the chain
        (a graph: per conv node, the graph checked as a whole)."""
        if self.graph is not None:
            return [m.layer_shape for m in self._node_maps() if m.layer_shape is not None]
        self._check_input_bits()
        shapes = []
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise BundleError(f"input_shape must be (C, H, W) positive, not {self.input_shape}")
        c, h, w = self.input_shape
        for i, layer in enumerate(self.binary_layers):
            where = f"binary layer {i} ({self.layer_names[i]!r})"
            weights = layer.weights
            if weights.dim() != 4:
                raise BundleError(f"{where}: weights must be O×C×kh×kw")
            o, wc, kh, kw = weights.shape
            if wc != c:
                raise BundleError(f"{where}: takes {wc} input channels but receives {c}")
            if layer.stride < 1 or layer.padding < 0 or layer.pad_value not in (-1, 1):
                raise BundleError(f"{where}: stride must be ≥ 1, padding ≥ 0, pad_value ±1; "
                                  f"got {layer.stride}, {layer.padding}, {layer.pad_value}")
            oh = _conv_out(h, kh, layer.stride, layer.padding)
            ow = _conv_out(w, kw, layer.stride, layer.padding)
            if oh < 1 or ow < 1:
                raise BundleError(f"{where}: kernel {kh}×{kw} does not fit the {h}×{w} input")
            if layer.shortcut_bits:
                raise BundleError(f"{where}: takes a shortcut, which needs a graph bundle")
            if i == 0 and self.input_bits > layer.in_bits:
                raise BundleError(f"{where}: the input has {self.input_bits}-bit levels but "
                                  f"the layer's in_bits is {layer.in_bits}")
            if layer.thresholds is None:
                if i != len(self.binary_layers) - 1:
                    raise BundleError(f"{where}: only the last layer may output raw P")
                if layer.pool is not None:
                    raise BundleError(f"{where}: a raw layer cannot be pooled")
            else:
                t = layer.thresholds
                levels = t.shape[1] + 1 if t.dim() == 2 else 0
                if t.dim() != 2 or t.shape[0] != o or levels < 2 or levels & (levels - 1):
                    raise BundleError(f"{where}: thresholds must be (O, 2**n - 1) = ({o}, ...), "
                                      f"not {tuple(t.shape)}")
                top = layer.accumulator_max + 1
                if t.numel() and (int(t.min()) < 0 or int(t.max()) > top):
                    bad = int(t.max()) if int(t.max()) > top else int(t.min())
                    bound = "K + 1" if layer.in_bits == 1 else "(2**in_bits - 1)·K + 1"
                    raise BundleError(f"{where}: threshold {bad} out of range "
                                      f"[0, {bound} = {top}]")
                if bool((t[:, 1:] < t[:, :-1]).any()):
                    raise BundleError(f"{where}: thresholds of a channel must be sorted")
                if i != len(self.binary_layers) - 1:
                    reads = self.binary_layers[i + 1].in_bits
                    if levels > 1 << reads:
                        most = "1 bit" if reads == 1 else f"at most {reads} bits"
                        raise BundleError(f"{where}: feeds another binary layer, so it must "
                                          f"output {most}, not {levels.bit_length() - 1}")
            if layer.pool is not None:
                pk, ps = layer.pool
                if pk < 1 or ps < 1:
                    raise BundleError(f"{where}: pool kernel and stride must be ≥ 1")
                oh, ow = _conv_out(oh, pk, ps, 0), _conv_out(ow, pk, ps, 0)
                if oh < 1 or ow < 1:
                    raise BundleError(f"{where}: pool {pk}×{pk} does not fit the output")
            shapes.append((c, o, kh, kw, (h, w), (oh, ow)))
            c, h, w = o, oh, ow
        return shapes

    def output_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the last binary layer's output (a graph: of the last node's map)."""
        if self.graph is not None:
            last = self._node_maps()[-1]
            return (last.c, last.h, last.w)
        _c, o, _kh, _kw, _hw, (oh, ow) = self.layer_shapes()[-1]
        return (o, oh, ow)

    def output_bits(self) -> int | None:
        """Bits of the last map's levels (the last node's; ``None``: raw A)."""
        return self._node_maps()[-1].bits

    def requirements(self) -> Requirements:
        if self.graph is not None and not self.graph:
            raise BundleError("a graph bundle needs at least one node")
        shapes = self.layer_shapes()
        if not shapes:
            raise BundleError("a bundle needs at least one binary layer")
        maps = self._node_maps()
        layers = self.binary_layers
        pools = [m.pool_kernel for m in maps if m.pool_kernel]
        return Requirements(
            layers=len(layers),
            max_in_channels=max(s[0] for s in shapes),
            max_out_channels=max(s[1] for s in shapes),
            max_k=max(layer.k for layer in layers),
            max_kernel=max(max(s[2], s[3]) for s in shapes),
            max_stride=max(layer.stride for layer in layers),
            max_padding=max(layer.padding for layer in layers),
            max_pool_kernel=max(pools, default=0),
            max_output_bits=max(layer.output_bits or 0 for layer in layers),
            raw_output=maps[-1].bits is None,
            max_pixels=max(max(max(h * w, oh * ow) for (*_, (h, w), (oh, ow)) in shapes),
                           max(m.h * m.w for m in maps)),
            layer_shapes=tuple(shapes),
            conv_shapes=tuple((_conv_out(h, kh, layer.stride, layer.padding),
                               _conv_out(w, kw, layer.stride, layer.padding))
                              for layer, (_c, _o, kh, kw, (h, w), _ohw)
                              in zip(layers, shapes, strict=True)),
            max_input_bits=max(layer.in_bits for layer in layers),
            max_shortcut_bits=max(layer.shortcut_bits for layer in layers),
            live_maps=_live_maps(self.nodes()),
            node_maps=(("input", "input", *self.input_shape, self.input_bits),
                       *((m.name, m.op, m.c, m.h, m.w, m.bits) for m in maps)),
            format_version=self.format_version,
        )

    def validate(self) -> Requirements:
        """Check every layer and host layer; returns the requirements."""
        if len(self.layer_names) != len(self.binary_layers) or not all(
                isinstance(name, str) for name in self.layer_names):
            raise BundleError("layer_names must name every binary layer with a string")
        if self.graph is not None:
            for i, node in enumerate(self.graph):
                if not isinstance(node, GraphNode):
                    raise BundleError(f"graph node {i} must be a GraphNode, not "
                                      f"{type(node).__name__}")
            convs = [n for n in self.graph if isinstance(n.op, BinaryConvLayer)]
            if (len(convs) != len(self.binary_layers)
                    or any(n.op is not layer for n, layer in zip(convs, self.binary_layers,
                                                                  strict=False))
                    or [n.name for n in convs] != self.layer_names):
                raise BundleError("a graph bundle's binary_layers and layer_names must be its "
                                  "conv nodes' ops and names in node order (leave them empty "
                                  "to have them filled in)")
        requirements = self.requirements()
        _check_json(self.model, "model")
        for i, layer in enumerate(self.host_layers):
            layer.validate(f"host layer {i} ({layer.name!r})")
        return requirements

    # -- running ------------------------------------------------------------------------
    def run_binary(self, x: torch.Tensor, *, method: str = "fast") -> list[torch.Tensor]:
        """Run the binary layers on ±1 input with the golden model (every layer's output:
        0/1 bits, or raw ``P`` for a layer without thresholds).

        A version 2 bundle (a graph, n-bit levels) runs :func:`bitdet.core.golden.run_graph`
        and returns every node's map in node order; ``x`` is then ±1 (a 1-bit map) or
        integer levels of at most ``input_bits`` bits."""
        from .golden import run_network
        if tuple(x.shape[1:]) != self.input_shape:
            shape = "×".join(map(str, self.input_shape))
            raise ValueError(f"the bundle's binary layers take N×{shape} input, "
                             f"not {tuple(x.shape)}")
        if not self.uses_v2():
            return run_network(x, self.binary_layers, method=method)
        maps = self.run_graph(x, method=method)
        return [maps[node.name] for node in self.nodes()]

    def run_graph(self, x: torch.Tensor, *, method: str = "fast") -> dict[str, torch.Tensor]:
        """Every node's map by name (:func:`bitdet.core.golden.run_graph`; a chain runs as
        its :meth:`nodes`). ``x``: ±1, or integer levels of at most ``input_bits`` bits."""
        from .golden import run_graph
        if tuple(x.shape[1:]) != self.input_shape:
            shape = "×".join(map(str, self.input_shape))
            raise ValueError(f"the bundle's binary layers take N×{shape} input, "
                             f"not {tuple(x.shape)}")
        bits = None if x.dtype.is_floating_point else self.input_bits
        return run_graph(x, self.nodes(), input_bits=bits, method=method)

    # -- the host part: stem, head, decoding settings, one forward pass -----------------
    def host_layer(self, name: str) -> HostLayer:
        """The host layer called ``name`` (``"stem"``, ``"head"``)."""
        for layer in self.host_layers:
            if layer.name == name:
                return layer
        raise BundleError(f"the bundle has no host layer {name!r} (has: "
                          f"{', '.join(h.name for h in self.host_layers) or 'none'})")

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """The host stem in fixed point on integer pixels ``N×C×H×W`` (0 … 255): the first
        binary layer's input as 0/1 bits."""
        return self.host_layer("stem").run(pixels.to(torch.int64))

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """The host head in fixed point on the last binary layer's output (0/1 bits, or
        raw ``P`` when that layer has no thresholds): the head map.

        A version 2 bundle's head reads the last node's map: 1-bit levels as ±1, n-bit
        levels (n > 1) as the levels themselves (0 … 2**n − 1), raw A as it is."""
        if not self.uses_v2():
            if self.binary_layers[-1].thresholds is not None:
                last = last.to(torch.float32) * 2 - 1      # bits as ±1; raw P as it is
        elif self.output_bits() == 1:
            last = last.to(torch.float32) * 2 - 1
        else:
            last = last.to(torch.float32)                  # n-bit levels, raw A: as they are
        return self.host_layer("head").run(last)

    def forward(self, pixels: torch.Tensor, binary=None) -> torch.Tensor:
        """Head map of the whole detector on integer pixels ``N×C×H×W``: :meth:`stem`, the
        binary layers, :meth:`head`. ``binary`` runs the binary layers: a function of the
        stem's 0/1 bits returning the list of maps whose last is the last layer's output
        (a device: :meth:`bitdet.sw.device.Device.run_bundle_layers`); by default the
        golden model (:meth:`run_binary`)."""
        bits = self.stem(pixels)
        if binary is None and self.uses_v2():
            maps = self.run_binary(bits.to(torch.int32))   # the stem's levels
        elif binary is None:
            maps = self.run_binary(bits.to(torch.float32) * 2 - 1)
        else:
            maps = binary(bits)
        return self.head(maps[-1])

    def decode_settings(self) -> dict:
        """The decoding settings the model metadata carries: ``{"stride": grid_stride}``
        and ``"prior"`` where ``decode.prior`` is given (the decoder's defaults for the
        rest)."""
        stride = self.model.get("grid_stride")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            task = self.model.get("task")
            what = f"a {task!r} bundle" if isinstance(task, str) else "this bundle"
            raise BundleError(f"{what} has no detection head (no valid 'grid_stride' in its "
                              "model metadata), so it cannot detect: import the model with "
                              "`bitdet import --head-config H.yaml`, or run its layers with "
                              "the driver (Device.run_graph) or `bitdet sim layer --bundle`")
        settings = {"stride": stride}
        decode = self.model.get("decode", {})
        if isinstance(decode, dict) and "prior" in decode:
            settings["prior"] = float(decode["prior"])
        return settings

    # -- files --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the bundle (validated first); returns the path. Version 1 unless the bundle
        uses a contract v2 feature (:meth:`uses_v2`), then version 2 with graph nodes."""
        requirements = self.validate()
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        binary = []
        for i, layer in enumerate(self.binary_layers if not self.uses_v2() else ()):
            o, c, kh, kw = layer.weights.shape
            prefix = f"binary/{i}"
            packed = packing.pack_weights(layer.weights, word_bits=STORAGE_WORD_BITS)
            arrays[f"{prefix}/weights.npy"] = packed.reshape(o, kh, kw, -1)
            record = {
                "name": self.layer_names[i], "in_channels": c, "out_channels": o,
                "kernel": [kh, kw], "stride": layer.stride, "padding": layer.padding,
                "pad_value": layer.pad_value,
                "pool": list(layer.pool) if layer.pool is not None else None,
                "output": "raw" if layer.thresholds is None else "bits",
                "output_bits": layer.output_bits, "k": layer.k,
                "weights": f"{prefix}/weights.npy", "thresholds": None,
            }
            if layer.thresholds is not None:
                arrays[f"{prefix}/thresholds.npy"] = layer.thresholds.numpy().astype(np.int32)
                record["thresholds"] = f"{prefix}/thresholds.npy"
            binary.append(record)
        host = []
        for i, layer in enumerate(self.host_layers):
            names = {}
            for name, a in layer.arrays.items():
                member = f"host/{i}/{name}.npy"
                arrays[member] = a
                names[name] = member
            host.append({"name": layer.name, "kind": layer.kind, "stride": layer.stride,
                         "padding": layer.padding, "attrs": layer.attrs, "arrays": names})
        if not self.uses_v2():
            manifest = {
                "format": FORMAT, "version": FORMAT_VERSION,
                "bitdet_version": _bitdet_version(), "weight_word_bits": STORAGE_WORD_BITS,
                "input_shape": list(self.input_shape), "binary_layers": binary,
                "host_layers": host, "model": self.model,
                "requirements": _requirements_json(requirements),
            }
        else:
            node_arrays: dict[str, np.ndarray] = {}
            nodes = _node_records(self.nodes(), node_arrays)
            arrays = {**node_arrays, **arrays}         # node arrays first, then the host's
            manifest = {
                "format": FORMAT, "version": GRAPH_FORMAT_VERSION,
                "bitdet_version": _bitdet_version(), "weight_word_bits": STORAGE_WORD_BITS,
                "input_shape": list(self.input_shape), "input_bits": self.input_bits,
                "nodes": nodes,
                "host_layers": host, "model": self.model,
                "requirements": _requirements_json(requirements),
            }
        tmp = path.with_name(path.name + ".tmp")
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(_member(MANIFEST), json.dumps(manifest, indent=1))
                for member, a in arrays.items():
                    buffer = io.BytesIO()
                    np.save(buffer, np.ascontiguousarray(a), allow_pickle=False)
                    zf.writestr(_member(member), buffer.getvalue())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _member(name: str) -> zipfile.ZipInfo:
    """A zip member with a fixed date, so that the same model always writes the same bytes."""
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _check_json(value, where: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where} must be plain JSON (str, int, float, bool, None, "
                          f"lists, dicts): {e}") from None


def _requirements_json(requirements: Requirements) -> dict:
    """The manifest's ``requirements``: version 1 keeps exactly its fields of format 1;
    version 2 adds the contract v2 fields (bits, live maps, node maps)."""
    out = asdict(requirements)
    out.pop("conv_shapes")      # derived from the layers; manifests of format 1 lack it
    out.pop("format_version")   # derived
    out["layer_shapes"] = [[c, o, kh, kw, list(hw), list(ohw)]
                           for (c, o, kh, kw, hw, ohw) in requirements.layer_shapes]
    if requirements.format_version == FORMAT_VERSION:
        for key in _V2_REQUIREMENTS:
            out.pop(key)
    else:
        out["node_maps"] = [list(m) for m in requirements.node_maps]
    return out


# -- graphs (contract v2) -------------------------------------------------------------------

@dataclass(frozen=True)
class _NodeMap:
    """The map a node makes, from the static check."""

    name: str
    op: str                      # "conv", "pool", "repeat"
    c: int
    h: int
    w: int
    bits: int | None             # None: raw accumulator
    pool_kernel: int = 0         # a conv's pool kernel or a pool pass's kernel
    layer_shape: tuple | None = None   # a conv's (C, O, kh, kw, (H, W), (H', W'))


def _op_kind(op) -> str:
    if isinstance(op, BinaryConvLayer):
        return "conv"
    if isinstance(op, PoolPass):
        return "pool"
    if isinstance(op, ChannelRepeat):
        return "repeat"
    raise BundleError(f"unknown op {type(op).__name__} (known: {', '.join(NODE_OPS)})")


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_table(layer: BinaryConvLayer, o: int, where: str) -> None:
    """Thresholds (O, L) or, with a shortcut, (O, 2**shortcut_bits, L); sorted rows in
    ``[0, accumulator_max + 1]``."""
    t = layer.thresholds
    sb = layer.shortcut_bits
    expected = f"(O = {o}, 2**n - 1)" if not sb else f"(O = {o}, R = {1 << sb}, 2**n - 1)"
    levels = t.shape[-1] + 1 if t.dim() else 0
    if (t.dim() != (3 if sb else 2) or t.shape[0] != o or (sb and t.shape[1] != 1 << sb)
            or levels < 2 or levels & (levels - 1)):
        raise BundleError(f"{where}: thresholds must be {expected}, not {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise BundleError(f"{where}: thresholds must be integers, not {t.dtype}")
    top = layer.accumulator_max + 1
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > top):
        bad = int(t.max()) if int(t.max()) > top else int(t.min())
        raise BundleError(f"{where}: threshold {bad} out of range [0, accumulator_max + 1 = "
                          f"{top}]")
    if bool((t[..., 1:] < t[..., :-1]).any()):
        raise BundleError(f"{where}: thresholds must be sorted along each row")


def _check_conv(node: GraphNode, source: _NodeMap, maps: dict, last: bool,  # noqa: C901
                where: str) -> _NodeMap:
    layer = node.op
    weights = layer.weights
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
        raise BundleError(f"{where}: weights must be O×C×kh×kw")
    o, wc, kh, kw = weights.shape
    if wc != source.c:
        raise BundleError(f"{where}: takes {wc} input channels but its input {node.input!r} "
                          f"has {source.c}")
    if source.bits > layer.in_bits:
        raise BundleError(f"{where}: input {node.input!r} has {source.bits}-bit levels but the "
                          f"conv's in_bits is {layer.in_bits}")
    if not (_positive(layer.stride) and isinstance(layer.padding, int) and layer.padding >= 0
            and layer.pad_value in (-1, 1)):
        raise BundleError(f"{where}: stride must be ≥ 1, padding ≥ 0, pad_value ±1; got "
                          f"{layer.stride}, {layer.padding}, {layer.pad_value}")
    if not 0 <= layer.padding_level < 1 << layer.in_bits:
        raise BundleError(f"{where}: pad_level {layer.padding_level} is not a "
                          f"{layer.in_bits}-bit level")
    ch = _conv_out(source.h, kh, layer.stride, layer.padding)
    cw = _conv_out(source.w, kw, layer.stride, layer.padding)
    if ch < 1 or cw < 1:
        raise BundleError(f"{where}: kernel {kh}×{kw} does not fit the {source.h}×{source.w} "
                          "input")
    if layer.thresholds is None:
        if not last:
            raise BundleError(f"{where}: only the last node may output raw A")
        if layer.pool is not None or layer.shortcut_bits:
            raise BundleError(f"{where}: a raw conv takes no pool and no shortcut")
    else:
        _check_table(layer, o, where)
    if node.shortcut is not None:
        short = maps[node.shortcut]
        if short.bits is None or short.bits > layer.shortcut_bits:
            made = "a raw accumulator" if short.bits is None else f"{short.bits}-bit levels"
            raise BundleError(f"{where}: shortcut {node.shortcut!r} has {made} but the conv's "
                              f"shortcut_bits is {layer.shortcut_bits}")
        if (short.c, short.h, short.w) != (o, ch, cw):
            raise BundleError(f"{where}: shortcut {node.shortcut!r} is {short.c}×{short.h}×"
                              f"{short.w} but the conv's output (before its pool) is "
                              f"{o}×{ch}×{cw}")
    oh, ow = ch, cw
    if layer.pool is not None:
        pk, ps = layer.pool
        if not (_positive(pk) and _positive(ps)):
            raise BundleError(f"{where}: pool kernel and stride must be ≥ 1")
        oh, ow = _conv_out(ch, pk, ps, 0), _conv_out(cw, pk, ps, 0)
        if oh < 1 or ow < 1:
            raise BundleError(f"{where}: pool {pk}×{pk} does not fit the output")
    return _NodeMap(node.name, "conv", o, oh, ow, layer.output_bits,
                    layer.pool[0] if layer.pool else 0,
                    (wc, o, kh, kw, (source.h, source.w), (oh, ow)))


def _check_nodes(nodes: list, input_shape: tuple, input_bits: int) -> list[_NodeMap]:
    """Check a graph statically, without running a tensor: order and sources
    (:func:`bitdet.core.golden._check_graph`: no cycle, no forward or missing reference),
    shapes, bit widths, threshold tables. Each error is a BundleError naming the node."""
    if not nodes:
        raise BundleError("a graph bundle needs at least one node")
    try:
        _check_graph(nodes)
    except ValueError as e:
        raise BundleError(f"graph: {e}") from None
    c, h, w = input_shape
    maps = {"input": _NodeMap("input", "input", c, h, w, input_bits)}
    out = []
    for i, node in enumerate(nodes):
        where = f"node {i} ({node.name!r})"
        op = node.op
        kind = _op_kind(op)
        source = maps[node.input]
        if source.bits is None:
            raise BundleError(f"{where}: input {node.input!r} is a raw accumulator, not a "
                              "level map")
        if kind == "conv":
            made = _check_conv(node, source, maps, i == len(nodes) - 1, where)
        elif kind == "pool":
            stride = op.kernel if op.stride is None else op.stride
            if not (_positive(op.kernel) and _positive(stride)):
                raise BundleError(f"{where}: pool kernel and stride must be ≥ 1, not "
                                  f"{op.kernel!r} and {op.stride!r}")
            oh, ow = _conv_out(source.h, op.kernel, stride, 0), _conv_out(source.w, op.kernel,
                                                                          stride, 0)
            if oh < 1 or ow < 1:
                raise BundleError(f"{where}: pool {op.kernel}×{op.kernel} does not fit the "
                                  f"{source.h}×{source.w} map {node.input!r}")
            made = _NodeMap(node.name, kind, source.c, oh, ow, source.bits, op.kernel)
        else:
            if not _positive(op.out_channels) or op.out_channels % source.c:
                raise BundleError(f"{where}: out_channels {op.out_channels!r} is not a "
                                  f"positive multiple of input {node.input!r}'s {source.c} "
                                  "channels")
            made = _NodeMap(node.name, kind, op.out_channels, source.h, source.w, source.bits)
        maps[node.name] = made
        out.append(made)
    return out


def _live_maps(nodes: list) -> int:
    """Most maps live at once over the node order: a map from its maker (the input: from
    the start) to its last reader (the last node's map: to the end), a node's sources and
    output together."""
    born = {"input": -1}
    last = {"input": -1}
    for i, node in enumerate(nodes):
        born[node.name] = last[node.name] = i
        for source in (node.input, node.shortcut):
            if source is not None:
                last[source] = max(last[source], i)
    if nodes:
        last[nodes[-1].name] = len(nodes)
    return max((sum(born[m] <= i <= last[m] for m in born) for i in range(len(nodes))),
               default=0)


def _node_records(nodes: list[GraphNode], arrays: dict) -> list[dict]:
    """Version 2 manifest records of graph nodes; arrays go to ``nodes/<i>/…``."""
    records = []
    for i, node in enumerate(nodes):
        op = node.op
        kind = _op_kind(op)
        record = {"name": node.name, "op": kind, "input": node.input}
        if kind == "pool":
            record.update(kernel=op.kernel, stride=op.kernel if op.stride is None else op.stride)
        elif kind == "repeat":
            record["out_channels"] = op.out_channels
        else:
            o, c, kh, kw = op.weights.shape
            prefix = f"nodes/{i}"
            packed = packing.pack_weights(op.weights, word_bits=STORAGE_WORD_BITS)
            arrays[f"{prefix}/weights.npy"] = packed.reshape(o, kh, kw, -1)
            record.update({
                "shortcut": node.shortcut, "in_channels": c, "out_channels": o,
                "kernel": [kh, kw], "stride": op.stride, "padding": op.padding,
                "pad_value": op.pad_value, "in_bits": op.in_bits, "pad_level": op.padding_level,
                "shortcut_bits": op.shortcut_bits,
                "pool": list(op.pool) if op.pool is not None else None,
                "output": "raw" if op.thresholds is None else "bits",
                "output_bits": op.output_bits, "k": op.k,
                "accumulator_max": op.accumulator_max,
                "thresholds_shape": (list(op.thresholds.shape) if op.thresholds is not None
                                     else None),
                "weights": f"{prefix}/weights.npy", "thresholds": None,
            })
            if op.thresholds is not None:
                arrays[f"{prefix}/thresholds.npy"] = op.thresholds.numpy().astype(np.int32)
                record["thresholds"] = f"{prefix}/thresholds.npy"
        records.append(record)
    return records


# -- loading ------------------------------------------------------------------------------

def _get(record: dict, key: str, kind, where: str):
    if key not in record:
        raise BundleError(f"{where}: missing field {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ if k is not type(None) else "null" for k in kinds)
        raise BundleError(f"{where}: field {key!r} must be {names}, not {value!r}")
    return value


class _Reader:
    def __init__(self, zf: zipfile.ZipFile, source: str):
        self.zf = zf
        self.source = source

    def read(self, member: str) -> bytes:
        try:
            return self.zf.read(member)
        except KeyError:
            raise BundleError(f"{self.source}: missing member {member!r}") from None
        except zipfile.BadZipFile as e:
            raise BundleError(f"{self.source}: member {member!r} is corrupt ({e})") from None
        except (EOFError, OSError, zlib_error, NotImplementedError, RuntimeError,
                ValueError) as e:
            # zipfile reports damaged headers in many ways (unsupported version or method,
            # "encrypted" flags, bad offsets): all of them mean a corrupt bundle
            raise BundleError(f"{self.source}: member {member!r} is truncated or corrupt "
                              f"({e})") from None

    def array(self, member, where: str, dtype: str | None = None) -> np.ndarray:
        if not isinstance(member, str):
            raise BundleError(f"{where}: array reference must be a member name, not {member!r}")
        try:
            a = np.load(io.BytesIO(self.read(member)), allow_pickle=False)
        except (ValueError, EOFError, OSError) as e:
            raise BundleError(f"{self.source}: {where}: {member!r} is not a valid .npy array "
                              f"({e})") from None
        if not isinstance(a, np.ndarray):
            raise BundleError(f"{self.source}: {where}: {member!r} is not a single .npy array")
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise BundleError(f"{self.source}: {where}: {member!r} must be {dtype}, "
                              f"not {a.dtype}")
        return a


def load(path: str | os.PathLike) -> Bundle:
    """Read and validate a bundle file.

    Raises
    ------
    BundleError
        Missing, not a bundle (wrong magic), unsupported version, truncated, corrupt
        (CRC), inconsistent shapes, thresholds out of range, requirements that disagree
        with the layers.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise BundleError(f"{source}: no such bundle file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":
        raise BundleError(f"{source}: not a bitdet bundle (wrong magic: expected a ZIP archive "
                          f"starting with b'PK\\x03\\x04', found {head!r})")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, OSError, EOFError) as e:
        raise BundleError(f"{source}: truncated or corrupt bundle ({e})") from None
    with zf:
        reader = _Reader(zf, source)
        try:
            manifest = json.loads(reader.read(MANIFEST))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise BundleError(f"{source}: manifest is not valid JSON "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise BundleError(f"{source}: not a bitdet bundle (format {found!r}, "
                              f"expected {FORMAT!r})")
        ver = manifest.get("version")
        if not isinstance(ver, int) or isinstance(ver, bool):
            raise BundleError(f"{source}: bundle version must be an integer, not {ver!r}")
        if ver not in FORMAT_VERSIONS:
            hint = "upgrade bitdet" if ver > max(FORMAT_VERSIONS) else "re-export the model"
            raise BundleError(f"{source}: bundle format version {ver} is not supported "
                              f"(this bitdet reads versions "
                              f"{' and '.join(map(str, FORMAT_VERSIONS))}); {hint}")
        if ver == FORMAT_VERSION:
            bundle = _from_manifest(manifest, reader)
        else:
            bundle = _from_manifest_v2(manifest, reader)
    try:
        requirements = bundle.validate()
    except BundleError as e:
        raise BundleError(f"{source}: {e}") from None
    if requirements.format_version != ver:
        raise BundleError(f"{source}: a version {ver} manifest describes a bundle of version "
                          f"{requirements.format_version}")
    stored = manifest.get("requirements")
    if stored != _requirements_json(requirements):
        raise BundleError(f"{source}: the manifest's requirements disagree with its layers "
                          "(edited or corrupt manifest)")
    if ver == GRAPH_FORMAT_VERSION:
        return bundle
    for i, (record, layer) in enumerate(zip(manifest["binary_layers"], bundle.binary_layers,
                                            strict=True)):
        if record["output_bits"] != layer.output_bits:
            raise BundleError(f"{source}: binary layer {i} ({record['name']!r}): output_bits is "
                              f"{record['output_bits']} but its thresholds give "
                              f"{layer.output_bits}")
    return bundle


def _manifest_header(manifest: dict, where: str) -> list[int]:
    """The fields every manifest version starts with: the storage word width (checked) and
    the binary input shape ``[C, H, W]``."""
    word_bits = _get(manifest, "weight_word_bits", int, where)
    if word_bits != STORAGE_WORD_BITS:
        raise BundleError(f"{where}: weight_word_bits must be {STORAGE_WORD_BITS}, not {word_bits}")
    input_shape = _get(manifest, "input_shape", list, where)
    if len(input_shape) != 3 or not all(_positive(v) for v in input_shape):
        raise BundleError(f"{where}: input_shape must be three positive integers (C, H, W), "
                          f"not {input_shape!r}")
    return input_shape


def _from_manifest(manifest: dict, reader: _Reader) -> Bundle:
    source = reader.source
    where = f"{source}: manifest"
    input_shape = _manifest_header(manifest, where)
    records = _get(manifest, "binary_layers", list, where)
    if not records:
        raise BundleError(f"{where}: no binary layers")
    layers, names = [], []
    for i, record in enumerate(records):
        at = f"{source}: binary layer {i}"
        if not isinstance(record, dict):
            raise BundleError(f"{at}: must be a JSON object")
        names.append(_get(record, "name", str, at))
        at = f"{at} ({names[-1]!r})"
        c, _o, (kh, kw), pool, output, weights = _conv_record(record, reader, at)
        thresholds = None
        if output == "bits":
            t = reader.array(_get(record, "thresholds", str, at), at, "int32")
            thresholds = torch.from_numpy(t.astype(np.int64))
        elif record.get("thresholds") is not None:
            raise BundleError(f"{at}: a raw layer has no thresholds")
        layer = _conv_layer(record, at, weights, thresholds, pool)
        _get(record, "output_bits", (int, type(None)), at)    # checked after validation
        layers.append(layer)
        stored_k = _get(record, "k", int, at)
        if stored_k != c * kh * kw:
            raise BundleError(f"{at}: k = {stored_k} but C·kh·kw = {c * kh * kw}")
    host = _host_layers(manifest, reader, where)
    model = _get(manifest, "model", dict, where)
    return Bundle(binary_layers=layers, input_shape=tuple(input_shape), host_layers=host,
                  layer_names=names, model=model)


def _conv_record(record: dict, reader: _Reader, at: str):
    """The fields every conv record has (format 1 layers and format 2 conv nodes):
    ``(C, O, (kh, kw), pool, output, ±1 weights)``."""
    c = _get(record, "in_channels", int, at)
    o = _get(record, "out_channels", int, at)
    kernel = _get(record, "kernel", list, at)
    if len(kernel) != 2 or not all(_positive(v) for v in kernel):
        raise BundleError(f"{at}: kernel must be [kh, kw] positive, not {kernel!r}")
    if c < 1 or o < 1:
        raise BundleError(f"{at}: channel counts must be positive, not {c} and {o}")
    pool = _get(record, "pool", (list, type(None)), at)
    if pool is not None and (len(pool) != 2 or not all(_positive(v) for v in pool)):
        raise BundleError(f"{at}: pool must be [kernel, stride] or null (positive), "
                          f"not {pool!r}")
    output = _get(record, "output", str, at)
    if output not in ("bits", "raw"):
        raise BundleError(f"{at}: output must be 'bits' or 'raw', not {output!r}")
    kh, kw = kernel
    packed = reader.array(_get(record, "weights", str, at), at, "uint8")
    expected = (o, kh, kw, packing.packed_width(c, STORAGE_WORD_BITS))
    if packed.shape != expected:
        raise BundleError(f"{at}: weights array has shape {packed.shape}, but {o} output "
                          f"channels, {c} input channels and a {kh}×{kw} kernel need "
                          f"{expected}")
    try:
        weights = packing.unpack_weights(packed.reshape(o, kh * kw * expected[3], 1, 1),
                                         (o, c, kh, kw), word_bits=STORAGE_WORD_BITS)
    except ValueError as e:
        raise BundleError(f"{at}: {e}") from None
    return c, o, (kh, kw), pool, output, weights


def _conv_layer(record: dict, at: str, weights, thresholds, pool, **v2) -> BinaryConvLayer:
    """The layer of a conv record: its geometry fields with the weights and thresholds read
    already (``v2``: the format-2 fields); the layer's own checks as a ``BundleError``."""
    try:
        return BinaryConvLayer(
            weights=weights, thresholds=thresholds,
            stride=_get(record, "stride", int, at), padding=_get(record, "padding", int, at),
            pad_value=_get(record, "pad_value", int, at),
            pool=tuple(pool) if pool is not None else None, **v2)
    except ValueError as e:
        raise BundleError(f"{at}: {e}") from None


def _load_conv(record: dict, reader: _Reader, at: str) -> tuple[BinaryConvLayer, str | None]:
    """A version 2 conv node: the layer and its shortcut source."""
    shortcut = _get(record, "shortcut", (str, type(None)), at)
    _c, _o, _kernel, pool, output, weights = _conv_record(record, reader, at)
    bits = {}
    for key, low in (("in_bits", 1), ("shortcut_bits", 0)):
        bits[key] = _get(record, key, int, at)
        if not low <= bits[key] <= MAX_LEVEL_BITS:
            raise BundleError(f"{at}: {key} must be in [{low}, {MAX_LEVEL_BITS}], "
                              f"not {bits[key]}")
    shape = _get(record, "thresholds_shape", (list, type(None)), at)
    thresholds = None
    if output == "bits":
        t = reader.array(_get(record, "thresholds", str, at), at, "int32")
        if shape != list(t.shape):
            raise BundleError(f"{at}: thresholds_shape is {shape} but the thresholds array "
                              f"has shape {list(t.shape)}")
        thresholds = torch.from_numpy(t.astype(np.int64))
    elif record.get("thresholds") is not None or shape is not None:
        raise BundleError(f"{at}: a raw conv has no thresholds")
    layer = _conv_layer(record, at, weights, thresholds, pool,
                        pad_level=_get(record, "pad_level", int, at), **bits)
    for key, value in (("k", layer.k), ("accumulator_max", layer.accumulator_max),
                       ("output_bits", layer.output_bits)):
        stored = _get(record, key, (int, type(None)), at)
        if stored != value:
            raise BundleError(f"{at}: {key} is {stored} but the layer gives {value}")
    return layer, shortcut


def _from_manifest_v2(manifest: dict, reader: _Reader) -> Bundle:
    """A version 2 manifest: graph nodes (conv, pool, repeat) with named sources."""
    source = reader.source
    where = f"{source}: manifest"
    input_shape = _manifest_header(manifest, where)
    input_bits = _get(manifest, "input_bits", int, where)
    records = _get(manifest, "nodes", list, where)
    if not records:
        raise BundleError(f"{where}: no graph nodes")
    nodes = []
    for i, record in enumerate(records):
        at = f"{source}: node {i}"
        if not isinstance(record, dict):
            raise BundleError(f"{at}: must be a JSON object")
        name = _get(record, "name", str, at)
        at = f"{at} ({name!r})"
        kind = _get(record, "op", str, at)
        source_name = _get(record, "input", str, at)
        # only a conv takes a shortcut: one on another node is refused by the graph check
        shortcut = _get(record, "shortcut", (str, type(None)), at) if "shortcut" in record \
            else None
        if kind == "conv":
            op, shortcut = _load_conv(record, reader, at)
        elif kind == "pool":
            op = PoolPass(_get(record, "kernel", int, at), _get(record, "stride", int, at))
        elif kind == "repeat":
            op = ChannelRepeat(_get(record, "out_channels", int, at))
        else:
            raise BundleError(f"{at}: unknown op {kind!r} (known: {', '.join(NODE_OPS)})")
        try:
            nodes.append(GraphNode(name, op, source_name, shortcut))
        except ValueError as e:
            raise BundleError(f"{at}: {e}") from None
    host = _host_layers(manifest, reader, where)
    model = _get(manifest, "model", dict, where)
    return Bundle(binary_layers=[], input_shape=tuple(input_shape), host_layers=host,
                  model=model, graph=nodes, input_bits=input_bits)


def _host_layers(manifest: dict, reader: _Reader, where: str) -> list[HostLayer]:
    host = []
    for i, record in enumerate(_get(manifest, "host_layers", list, where)):
        at = f"{reader.source}: host layer {i}"
        if not isinstance(record, dict):
            raise BundleError(f"{at}: must be a JSON object")
        refs = _get(record, "arrays", dict, at)
        host.append(HostLayer(
            name=_get(record, "name", str, at), kind=_get(record, "kind", str, at),
            arrays={name: reader.array(member, at) for name, member in refs.items()},
            stride=_get(record, "stride", int, at), padding=_get(record, "padding", int, at),
            attrs=_get(record, "attrs", dict, at)))
    return host
