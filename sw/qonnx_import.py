"""Import a QONNX binary network (Brevitas ``export_qonnx``) into a bitdet bundle.

``bitdet import MODEL.onnx --out F.bitdet`` (docs/import.md). The graph is cleaned up with
``qonnx.util.cleanup.cleanup_model`` and read pattern by pattern:

* a **binary conv**: ``Conv`` whose weights are a 1-bit quantizer (``BipolarQuant``, or
  ``Quant``/``IntQuant`` at 1 bit with values ±s per output channel) of an initializer, on a
  quantized map (optionally through ``Pad`` with a level's value, or ``MaxPool``), followed
  by elementwise ops (``BatchNormalization``, ``Mul``, ``Add``, ``Sub``, ``Div``, ``Relu``,
  ``Reciprocal``, ``Neg``, requantizers such as ``QuantEltwiseAdd``'s 8-bit ones; one ``Add``
  may take a quantized map, directly or through such ops: the residual shortcut) and an
  activation quantizer (``BipolarQuant``, ``MultiThreshold``, ``Quant``/``IntQuant`` of 1…4
  bits: the conv reading its map gets ``in_bits``). The epilogue is folded by enumeration
  (:func:`bitdet.core.fold.fold_levels`): it is evaluated by qonnx/onnxruntime itself on
  every accumulator value and shortcut level;
* ``MaxPool`` of a quantized map (a pool pass, or the layer's pool in a chain);
* ``Concat`` of one map with itself along the channels, ``Tile`` by ``(1, k, 1, 1)``: a
  channel repeat;
* a **host stem**: a ``Conv`` with integer (``Quant`` ≤ 8 bits) weights on the graph input
  (integer pixels) or on an input ``Quant`` of ≤ 8 bits, then the epilogue and a quantizer:
  a ``conv_threshold`` host layer folded by :func:`bitdet.core.fold.fold_integer_epilogue`;
* a **host head**: a ``Conv`` with real-valued weights on the last quantized map, optionally
  followed by per-channel affine ops, ending the graph: a ``conv_affine`` host layer (int8);
* no stem: the graph input quantized straight away (1…4 bits) is the bundle's input map.

Anything else is refused with one line naming the node, its op type and why
(:class:`QonnxImportError`). :func:`check_bundle` runs the bundle on the golden model and
``qonnx.core.onnx_exec.execute_onnx`` on the original graph and compares every quantized
tensor (the bundle's levels mapped back to the QONNX values), on random inputs and, when the
graph reads integer pixels (a host stem on 1 or 3 channels), on DigitScenes scenes
(:func:`bitdet.sw.data.make_digitscenes`, generated: nothing is downloaded); a format-2
bundle also on the contract-2 emulator (``Device.open("emu", "contract2")``, ``run_graph``
with ``trace``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bitdet.core.bundle import Bundle, HostLayer
from bitdet.core.fold import fold_integer_epilogue, fold_levels, weight_sums
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, GraphNode, PoolPass, run_layer

__all__ = ["HEAD_CONFIG_KEYS", "CheckReport", "EmulatorReport", "HeadConfig", "HeadConfigError",
           "ImportResult", "QonnxImportError", "apply_head_config", "check_bundle",
           "head_error_bound", "import_qonnx", "import_to_file", "load_head_config",
           "pixel_input_problem", "scene_inputs"]

QUANTIZERS = ("BipolarQuant", "Quant", "IntQuant", "MultiThreshold")
ELEMENTWISE = ("BatchNormalization", "Mul", "Add", "Sub", "Div", "Relu", "Reciprocal",
               "Neg")
SUPPORTED = (*QUANTIZERS, *ELEMENTWISE, "Conv", "MaxPool", "Pad", "Concat", "Tile")
MAX_BITS = 4            # activation levels the accelerator holds (contract v2)
STEM_BITS = 8           # host stem: int8 weights, ≤ 8-bit input codes


class QonnxImportError(ValueError):
    """The graph is not an importable binary network (one line, names the node)."""


def _fail(node, why: str):
    """One line naming the node (its name in the file: cleanup renames nodes) and why."""
    raise QonnxImportError(f"node {_original_name(node)!r} ({node.op_type}): {why}")


def _original_name(node) -> str:
    return node.doc_string[len(_NAME_TAG):] if node.doc_string.startswith(_NAME_TAG) \
        else node.name


_NAME_TAG = "bitdet-import-name:"


@dataclass
class QMap:
    """How a quantized tensor's values follow from its levels: ``values[c, level]``
    (float32, one row per channel or one row for all)."""

    bits: int
    values: np.ndarray
    code_min: int = 0          # Quant: integer code = level + code_min
    zero: float = 0.0          # Quant: zero point (value = (code − zero)·scale)

    @property
    def count(self) -> int:
        return self.values.shape[1]

    def to_values(self, levels: np.ndarray) -> np.ndarray:
        """Level map N×C×H×W → the QONNX values."""
        levels = np.asarray(levels, dtype=np.int64)
        table = np.broadcast_to(self.values, (levels.shape[1], self.count))
        return table[np.arange(levels.shape[1])[None, :, None, None], levels]

    def to_levels(self, values: np.ndarray, what: str) -> np.ndarray:
        """QONNX values N×C×… → levels; every value must be one of the levels' values."""
        values = np.asarray(values)
        out = np.full(values.shape, -1, dtype=np.int64)
        shape = (1, -1) + (1,) * (values.ndim - 2)
        for level in range(self.count):
            column = self.values[:, level].reshape(shape)
            out[values == column] = level
        if (out < 0).any():
            raise QonnxImportError(f"{what}: value {values[out < 0].flat[0]!r} is not one of "
                                   "the quantizer's levels")
        return out

    def affine(self) -> tuple[float, float] | None:
        """``(step, offset)`` when value = level·step + offset for every channel alike."""
        v = self.values.astype(np.float64)
        if v.shape[0] != 1 and not (v == v[:1]).all():
            return None
        step = v[0, 1] - v[0, 0] if self.count > 1 else 1.0
        ideal = v[0, 0] + step * np.arange(self.count)
        # float32 codes·scale (e.g. 3·fl(1/3) = 1.0): equal up to a few ulp of the largest
        tolerance = 4 * np.finfo(np.float32).eps * np.abs(v[0]).max(initial=0.0)
        if step <= 0 or np.abs(v[0] - ideal).max(initial=0.0) > tolerance:
            return None
        return float(step), float(v[0, 0])

    def exact(self) -> bool:
        """Whether the values are exactly level·step + offset (the float conv of ±s weights
        over them is then exact when the scales are powers of two)."""
        affine = self.affine()
        if affine is None:
            return False
        step, offset = affine
        return bool(np.array_equal(self.values[0].astype(np.float64),
                                   offset + step * np.arange(self.count)))

    def level_of(self, value: float) -> int | None:
        hits = [lv for lv in range(self.count) if (self.values[:, lv] == value).all()]
        return hits[0] if hits else None


@dataclass
class MapRef:
    """A quantized tensor of the graph: the bundle map that holds its levels."""

    node: str                  # bundle node name, "input" for the bundle input
    qmap: QMap
    channels: int
    prepool_of: str | None = None     # chain: the pre-pool output of this conv node


@dataclass
class ImportResult:
    bundle: Bundle
    tensors: dict[str, MapRef]
    model: object              # the cleaned-up qonnx ModelWrapper
    input_kind: dict
    head_output: str | None = None
    notes: list[str] = field(default_factory=list)
    #: bundle head channel ``j`` is the graph output's channel ``head_channels[j]``
    #: (:func:`apply_head_config`; None: the graph's order)
    head_channels: list[int] | None = None


@dataclass
class EmulatorReport:
    """The bundle on the contract-2 emulator (``Device.open("emu", config)``, one RUN_LAYER
    per node with every map read back) against qonnx, at every quantized tensor."""

    config: str
    tensors: int = 0
    values: int = 0
    difference: str | None = None
    skipped: str | None = None       # why it did not run (the bundle does not fit)


@dataclass
class CheckReport:
    """What :func:`check_bundle` compared.

    Members
    -------
    tensors, values : int
        Quantized tensors compared, and their values summed over every input.
    inputs : int
        Random inputs.
    images : int
        DigitScenes images compared (0: none asked for, or ``images_skipped``).
    images_skipped : str or None
        Why no image was compared although some were asked for (the graph input is not
        integer pixels of 1 or 3 channels, at least 9×9: :func:`pixel_input_problem`).
    difference : str or None
        The first difference (tensor, map, which input or image, index, both values).
    head_error, head_error_images : float or None
        Largest ``|bundle head − qonnx head|`` on the random inputs, on the images.
    head_bound : float or None
        :func:`head_error_bound`'s largest value (the same for both).
    """

    tensors: int
    values: int
    inputs: int
    difference: str | None = None
    head_error: float | None = None
    head_bound: float | None = None
    emulator: EmulatorReport | None = None
    images: int = 0
    images_skipped: str | None = None
    head_error_images: float | None = None

    def inputs_text(self) -> str:
        """``"3 random inputs"`` or ``"3 random inputs and 2 DigitScenes images"``."""
        text = f"{_count(self.inputs, 'random input')}"
        if self.images:
            text += f" and {_count(self.images, 'DigitScenes image')}"
        return text

    @property
    def equal(self) -> bool:
        return self.difference is None and (self.emulator is None
                                            or self.emulator.difference is None)


# --------------------------------------------------------------------------- the graph


class _Graph:
    """The cleaned-up model with producer/consumer indices."""

    def __init__(self, model):
        self.model = model
        g = model.graph
        self.inits = {i.name for i in g.initializer}
        self.producer = {}
        self.consumers: dict[str, list] = {}
        for node in g.node:
            for t in node.output:
                self.producer[t] = node
            for t in node.input:
                if t:
                    self.consumers.setdefault(t, []).append(node)
        self.outputs = [o.name for o in g.output]
        self.input = g.input[0].name

    def init(self, node, index: int, what: str) -> np.ndarray:
        if index >= len(node.input) or not node.input[index]:
            _fail(node, f"its {what} (input {index}) is missing")
        name = node.input[index]
        value = self.model.get_initializer(name)
        if value is None:
            _fail(node, f"its {what} {name!r} is not an initializer (missing initializer or "
                  "a computed parameter)")
        return np.asarray(value)

    def attr(self, node, name: str, default):
        from onnx import helper
        for a in node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def shape(self, tensor: str) -> list[int]:
        return list(self.model.get_tensor_shape(tensor))

    def single_consumer(self, tensor: str):
        readers = self.consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in self.outputs else None


def _load(path) -> _Graph:
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model
    try:
        proto = onnx.load(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise QonnxImportError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        node.doc_string = _NAME_TAG + node.name
    constant = {i.name for i in proto.graph.initializer}
    known = constant | {i.name for i in proto.graph.input}
    for node in proto.graph.node:
        for t in node.input:
            if t and t not in known:
                _fail(node, f"its input {t!r} is missing (no initializer, graph input or "
                      "earlier node makes it)")
        if all(t in constant for t in node.input if t):
            constant.update(node.output)     # folded by the cleanup (e.g. a Pad's pads)
        elif node.op_type not in SUPPORTED:
            _fail(node, _unsupported(node.op_type))
        known.update(node.output)
    _concat_to_tile(proto)
    try:
        model = cleanup_model(ModelWrapper(proto))
    except Exception as e:
        raise QonnxImportError(f"{path}: qonnx cleanup failed ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}): a missing "
                               "initializer or an inconsistent graph?") from None
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        if node.op_type not in SUPPORTED:
            _fail(node, _unsupported(node.op_type))
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise QonnxImportError(f"{path}: the graph must have one input and one output, not "
                               f"{len(model.graph.input)} and {len(model.graph.output)}")
    return _Graph(model)


def _concat_to_tile(proto) -> None:
    """``Concat(x, x, …)`` along the channels → ``Tile(x, (1, k, 1, 1))`` (the same tensor):
    qonnx's tensor renaming loses a repeated input of one node."""
    from onnx import helper, numpy_helper
    for node in proto.graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"),
                    None)
        if node.op_type != "Concat" or len(node.input) < 2 or len(set(node.input)) != 1 \
                or axis not in (1, -3):
            continue
        reps = f"{node.output[0]}_bitdet_repeats"
        proto.graph.initializer.append(numpy_helper.from_array(
            np.array([1, len(node.input), 1, 1], dtype=np.int64), reps))
        source = node.input[0]
        node.op_type = "Tile"
        del node.attribute[:]
        del node.input[:]
        node.input.extend([source, reps])


def _unsupported(op: str) -> str:
    return (f"{op} is not an accelerator op and no host layer kind runs it (supported: "
            f"{', '.join(SUPPORTED)})")


# --------------------------------------------------------------------------- quantizers


def _per_channel(node, value: np.ndarray, what: str) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    if value.size == 1:
        return value.reshape(1)
    squeezed = [d for d in value.shape if d != 1]
    if len(squeezed) != 1 or (value.ndim >= 2 and value.shape[1] != value.size
                              and value.ndim != 1):
        _fail(node, f"its {what} must be a scalar or one value per channel, not shape "
              f"{value.shape}")
    return value.reshape(-1)


def _qmap(graph: _Graph, node, max_bits: int = MAX_BITS) -> QMap:
    """The level → value table of an activation quantizer node."""
    op = node.op_type
    if op == "BipolarQuant":
        s = _per_channel(node, graph.init(node, 1, "scale"), "scale")
        if (s <= 0).any():
            _fail(node, "its scale must be positive")
        return QMap(1, np.stack([-s, s], axis=1).astype(np.float32))
    if op == "MultiThreshold":
        layout = graph.attr(node, "data_layout", "")
        if layout not in ("", "NCHW"):
            _fail(node, f"data layout {layout!r}: bitdet reads NCHW maps (wrong layout)")
        t = graph.init(node, 1, "thresholds")
        if t.ndim != 2:
            _fail(node, f"thresholds must be (C, T), not shape {t.shape}")
        steps = t.shape[1]
        bits = max(1, steps.bit_length())
        scale = float(graph.attr(node, "out_scale", 1.0))
        bias = float(graph.attr(node, "out_bias", 0.0))
        if scale <= 0:
            _fail(node, "out_scale must be positive")
        values = (np.float32(scale) * np.arange(steps + 1, dtype=np.float32)
                  + np.float32(bias))[None]
        return _check_bits(node, QMap(bits, values.astype(np.float32)), max_bits)
    return _int_qmap(graph, node, max_bits)


def _int_qmap(graph: _Graph, node, max_bits: int) -> QMap:
    s = _per_channel(node, graph.init(node, 1, "scale"), "scale")
    z = _per_channel(node, graph.init(node, 2, "zero point"), "zero point")
    width = graph.init(node, 3, "bit width").reshape(-1)
    if width.size != 1 or float(width[0]) != int(width[0]) or int(width[0]) < 1:
        _fail(node, f"bit width {width.tolist()} must be one positive integer")
    width = int(width[0])
    signed = int(graph.attr(node, "signed", 1))
    narrow = int(graph.attr(node, "narrow", 0))
    if (s <= 0).any():
        _fail(node, "its scale must be positive")
    if signed:
        lo, hi = -(1 << (width - 1)) + narrow, (1 << (width - 1)) - 1
    else:
        lo, hi = 0, (1 << width) - 1 - narrow
    if hi <= lo:
        _fail(node, f"a {width}-bit quantizer with signed={signed}, narrow={narrow} has one "
              "level")
    if width > max_bits:
        _fail(node, f"{width}-bit activations: the accelerator's levels have 1…{max_bits} bits")
    codes = np.arange(lo, hi + 1, dtype=np.float32)
    values = (codes[None, :] - z[:, None]) * s[:, None]
    zero = float(z[0]) if z.size == 1 else float("nan")
    return QMap(width, values.astype(np.float32), code_min=lo, zero=zero)


def _check_bits(node, qmap: QMap, max_bits: int) -> QMap:
    if qmap.bits > max_bits:
        _fail(node, f"{qmap.bits}-bit activations: the accelerator's levels have 1…{max_bits} "
              "bits")
    if qmap.count > 1 and (np.diff(qmap.values.astype(np.float64), axis=1) <= 0).any():
        _fail(node, "its levels' values must rise with the level")
    return qmap


# --------------------------------------------------------------------------- epilogues


def _subgraph_runner(graph: _Graph, nodes, x_name: str, shortcut: str | None, out_name: str):
    """Run ``nodes`` (elementwise epilogue and quantizer) alone with qonnx, as in the model."""
    from onnx import TensorProto, helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes
    names = {t for n in nodes for t in n.input if t} - {x_name, shortcut}
    inits = [i for i in graph.model.graph.initializer if i.name in names]
    cache = {}

    def run(x: np.ndarray, sc: np.ndarray | None = None) -> np.ndarray:
        key = x.shape
        if key not in cache:
            inputs = [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, list(x.shape))]
            if shortcut is not None:
                inputs.append(helper.make_tensor_value_info(shortcut, TensorProto.FLOAT,
                                                            list(x.shape)))
            out = [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, list(x.shape))]
            g = helper.make_graph(list(nodes), "epilogue", inputs, out, initializer=inits)
            m = helper.make_model(g, opset_imports=graph.model.model.opset_import)
            cache[key] = ModelWrapper(m).transform(InferShapes())
        feed = {x_name: x.astype(np.float32)}
        if shortcut is not None:
            feed[shortcut] = sc.astype(np.float32)
        return np.asarray(execute_onnx(cache[key], feed)[out_name])
    return run


@dataclass
class _Epilogue:
    """What follows a conv up to its activation quantizer."""

    nodes: list                       # elementwise ops and requantizers, in graph order
    quant: object | None              # the activation quantizer (None: the graph output)
    last: str                         # the tensor the quantizer reads (or the graph output)
    shortcut: str | None = None       # the quantized map the residual Add reads ...
    shortcut_nodes: list = field(default_factory=list)   # ... through these nodes
    add: object | None = None         # the residual Add


def _dynamic_inputs(graph: _Graph, node, t: str | None = None) -> list[str]:
    return [i for i in node.input if i and i not in graph.inits and i != t]


def _quant_bits(graph: _Graph, node) -> int:
    """An activation quantizer's bit width (without the checks of :func:`_qmap`)."""
    if node.op_type == "BipolarQuant":
        return 1
    if node.op_type == "MultiThreshold":
        t = graph.model.get_initializer(node.input[1]) if len(node.input) > 1 else None
        return 1 if t is None or np.ndim(t) != 2 else max(1, np.shape(t)[1].bit_length())
    width = graph.model.get_initializer(node.input[3]) if len(node.input) > 3 else None
    return MAX_BITS if width is None else int(np.asarray(width).reshape(-1)[0])


def _branch_kind(graph: _Graph, tensor: str) -> str:
    """Where the other input of an Add comes from: ``"conv"`` (a conv's real-valued
    epilogue), ``"map"`` (a ≤ 4-bit quantized map, a pool or the graph input, possibly
    requantized) — walking back through elementwise ops and quantizers."""
    while True:
        node = graph.producer.get(tensor)
        if node is None or node.op_type in ("MaxPool", "Concat", "Tile"):
            return "map"
        if node.op_type == "Conv":
            return "conv"
        if node.op_type in QUANTIZERS and _quant_bits(graph, node) <= MAX_BITS:
            return "map"
        if node.op_type not in (*ELEMENTWISE, *QUANTIZERS):
            return "other"
        tensor = node.input[0]


def _requantizer(graph: _Graph, quant) -> bool:
    """Whether a quantizer on a conv's path is a step of the epilogue (Brevitas'
    ``QuantEltwiseAdd`` input/output quantizers), not the layer's activation quantizer:
    read by one elementwise op (or quantizer) and either wider than the accelerator's maps
    or feeding a residual Add whose other input is a quantized map."""
    out = quant.output[0]
    readers = graph.consumers.get(out, [])
    if out in graph.outputs or len(readers) != 1:
        return False
    reader = readers[0]
    if reader.op_type in QUANTIZERS:
        return reader.input[0] == out and _quant_bits(graph, quant) > MAX_BITS
    if reader.op_type not in ELEMENTWISE:
        return False
    other = _dynamic_inputs(graph, reader, out)
    if other:           # a residual Add: this side is the conv's if the other is a map
        return reader.op_type == "Add" and len(other) == 1 and \
            _branch_kind(graph, other[0]) == "map"
    return _quant_bits(graph, quant) > MAX_BITS


def _shortcut_source(graph: _Graph, add, tensor: str, maps) -> tuple[str, list]:
    """The quantized map a residual Add reads, and the elementwise ops / requantizers
    between (Brevitas' ``QuantEltwiseAdd`` requantizes the shortcut)."""
    chain = []
    while tensor not in maps or maps[tensor].node.startswith("<"):
        node = graph.producer.get(tensor)
        if node is None or node.op_type not in (*ELEMENTWISE, *QUANTIZERS) \
                or _dynamic_inputs(graph, node, node.input[0]) or len(chain) > 8:
            made = "" if node is None else f", made by {_original_name(node)!r} ({node.op_type})"
            _fail(add, f"its second input {tensor!r}{made} is not a quantized map (nor a "
                  "per-channel function of one): a residual Add adds a quantized earlier map to "
                  "a binary conv's epilogue")
        if node.op_type == "BatchNormalization":
            for i in range(1, 5):
                graph.init(node, i, "BatchNorm parameter")
        chain.insert(0, node)
        tensor = node.input[0]
    return tensor, chain


def _follow_epilogue(graph: _Graph, conv, maps) -> _Epilogue:
    """Elementwise nodes (and requantizers) after ``conv`` up to its activation quantizer,
    with the residual shortcut (a quantized map in ``maps``) if an Add reads one."""
    t, ep = conv.output[0], _Epilogue([], None, conv.output[0])
    while True:
        ep.last = t
        if t in graph.outputs:
            return ep
        readers = graph.consumers.get(t, [])
        if len(readers) != 1:
            _fail(conv, f"its real-valued output {t!r} is read by {len(readers)} nodes: only "
                  "quantized maps may branch")
        node = readers[0]
        if node.op_type in QUANTIZERS and node.input[0] == t and not _requantizer(graph, node):
            ep.quant = node
            return ep
        if node.op_type not in (*ELEMENTWISE, *QUANTIZERS):
            _fail(node, f"{node.op_type} between conv {conv.name!r} and its activation "
                  f"quantizer: only elementwise ops ({', '.join(ELEMENTWISE)}) and "
                  "requantizers may sit there (move a MaxPool after the quantizer)")
        dynamic = _dynamic_inputs(graph, node, t)
        if dynamic:
            if node.op_type != "Add" or len(dynamic) != 1 or ep.add is not None:
                _fail(node, "only one Add per layer may take a second tensor (the residual "
                      "shortcut); other parameters must be initializers")
            ep.add = node
            ep.shortcut, ep.shortcut_nodes = _shortcut_source(graph, node, dynamic[0], maps)
        if node.op_type == "BatchNormalization":
            for i in range(1, 5):
                graph.init(node, i, "BatchNorm parameter")
        ep.nodes.append(node)
        t = node.output[0]


def _levels_fn(run, qmap: QMap, conv_values, shortcut_values, node):
    """``fn(d, r)`` for fold_levels: conv values of the dots → the quantizer's levels."""
    def fn(d, r):
        x = conv_values(d.numpy())
        sc = None if r is None else np.broadcast_to(shortcut_values(r), x.shape)
        out = run(x, sc)
        return torch.from_numpy(qmap.to_levels(out, f"node {node.name!r}"))
    return fn


# --------------------------------------------------------------------------- the importer


class _Importer:
    def __init__(self, graph: _Graph, probe: dict):
        self.g = graph
        self.probe = probe               # a full execution context (for weight values)
        self.maps: dict[str, MapRef] = {}
        self.nodes: list[GraphNode] = []
        self.handled: set[str] = set()
        self.stem: HostLayer | None = None
        self.head: HostLayer | None = None
        self.head_output: str | None = None
        self.input_bits = 1
        self.input_shape = None
        self.input_kind: dict = {}
        self.notes: list[str] = []

    # -- helpers ------------------------------------------------------------------
    def weight_quantizer(self, conv):
        """The weight quantizer node of a conv (None: plain initializer weights)."""
        node = self.g.producer.get(conv.input[1])
        if node is None:
            if conv.input[1] not in self.g.inits:
                _fail(conv, f"its weight {conv.input[1]!r} is neither an initializer nor "
                      "computed (missing initializer)")
            return None
        if node.op_type not in QUANTIZERS[:3] or node.input[0] not in self.g.inits:
            _fail(conv, f"its weights come from {node.op_type} {node.name!r}: expected a "
                  "quantizer of an initializer")
        return node

    def is_binary_weight(self, quant) -> bool:
        if quant is None:
            return False
        if quant.op_type == "BipolarQuant":
            return True
        width = self.g.init(quant, 3, "bit width").reshape(-1)
        return width.size == 1 and float(width[0]) == 1.0

    def conv_geometry(self, conv) -> tuple[int, int]:
        g = self.g
        if int(g.attr(conv, "group", 1)) != 1:
            _fail(conv, "grouped/depthwise convolution is not an accelerator op")
        if any(int(v) != 1 for v in g.attr(conv, "dilations", [1, 1])):
            _fail(conv, "dilated convolution is not an accelerator op")
        if g.attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", ""):
            _fail(conv, "auto_pad is not supported (export explicit pads)")
        strides = [int(v) for v in g.attr(conv, "strides", [1, 1])]
        pads = [int(v) for v in g.attr(conv, "pads", [0, 0, 0, 0])]
        if len(set(strides)) != 1 or len(set(pads)) != 1:
            _fail(conv, f"strides {strides} and pads {pads} must be the same on every side")
        return strides[0], pads[0]

    def register(self, tensor: str, ref: MapRef) -> None:
        self.maps[tensor] = ref

    # -- the walk -----------------------------------------------------------------
    def run(self):
        """Read the graph in node order; a node whose input maps are not made yet (a conv
        whose residual Add reads a pool listed after it) waits for them."""
        pending = [n for n in self.g.model.graph.node if self.walks(n)]
        while pending:
            node = next((n for n in pending if self.ready(n)), pending[0])
            pending.remove(node)
            if node.name in self.handled:
                continue
            op = node.op_type
            if op in QUANTIZERS:
                self.input_quantizer(node)
            elif op == "Conv":
                self.conv(node)
            elif op == "MaxPool":
                self.maxpool(node)
            else:
                self.repeat(node)
        for node in self.g.model.graph.node:
            if node.name in self.handled or (node.op_type in QUANTIZERS[:3]
                                             and node.input[0] in self.g.inits):
                continue
            _fail(node, "not part of a supported pattern (a binary conv with its epilogue "
                  "and activation quantizer, a max-pool of a quantized map, a host stem or head)")
        out = self.g.outputs[0]
        if self.head is None and out not in self.maps:
            raise QonnxImportError(f"the graph output {out!r} is neither a quantized map nor "
                                   "a host head's output")
        if self.head is None and self.maps[out].node != self.nodes[-1].name:
            raise QonnxImportError(f"the graph output {out!r} is not the last node's map")

    def walks(self, node) -> bool:
        """The nodes :meth:`run` starts from: convs, pools, channel repeats and quantizers of
        the graph input (the others are read with the conv whose epilogue they are)."""
        if node.op_type in ("Conv", "MaxPool", "Concat", "Tile"):
            return True
        if node.op_type not in QUANTIZERS or node.input[0] in self.g.inits:
            return False
        t = node.input[0]
        while t != self.g.input:
            producer = self.g.producer.get(t)
            if producer is None or producer.op_type not in ELEMENTWISE:
                return False
            t = producer.input[0]
        return True

    def ready(self, node) -> bool:
        """Whether the maps ``node`` reads are made (a conv: its input and its shortcut)."""
        op = node.op_type
        if op in QUANTIZERS:
            return True
        if op != "Conv":
            return all(t in self.maps for t in _dynamic_inputs(self.g, node))
        src = node.input[0]
        producer = self.g.producer.get(src)
        if producer is not None and producer.op_type == "Pad":
            src = producer.input[0]
        if src != self.g.input and src not in self.maps:
            return False
        try:
            _follow_epilogue(self.g, node, self.maps)
        except QonnxImportError:
            return False             # not yet (or never: then dispatched last, it says why)
        return True

    def input_quantizer(self, quant) -> None:
        """A quantizer not after a conv: it must quantize the graph input (through
        elementwise preprocessing); its map is the bundle's input (no stem) or the stem's."""
        t, chain = quant.input[0], []
        while t != self.g.input:
            node = self.g.producer.get(t)
            if node is None or node.op_type not in ELEMENTWISE or any(
                    i not in self.g.inits for i in node.input[1:] if i):
                _fail(quant, "an activation quantizer must follow a conv's epilogue or "
                      "quantize the graph input")
            chain.append(node)
            t = node.input[0]
        feeds_stem = any(r.op_type == "Conv" and not self.is_binary_weight(
            self.weight_quantizer(r)) for r in self.g.consumers.get(quant.output[0], []))
        qmap = _qmap(self.g, quant, STEM_BITS if feeds_stem else MAX_BITS)
        self.handled.update(n.name for n in (*chain, quant))
        shape = self.g.shape(quant.output[0])
        if feeds_stem:
            self.register(quant.output[0], MapRef("<stem input>", qmap, shape[1]))
            self.input_kind = {"kind": "quantized", "tensor": quant.output[0],
                               "quantizer": quant.op_type, "code_min": qmap.code_min,
                               "zero_point": qmap.zero, "bits": qmap.bits,
                               "step": float(qmap.values[0, 1] - qmap.values[0, 0])}
            return
        self.input_bits = qmap.bits
        self.input_shape = tuple(shape[1:])
        self.register(quant.output[0], MapRef("input", qmap, shape[1]))
        self.input_kind = {"kind": "levels", "tensor": quant.output[0],
                           "quantizer": quant.op_type, "bits": qmap.bits,
                           "preprocessing": [n.op_type for n in reversed(chain)]}

    def conv(self, conv) -> None:
        quant = self.weight_quantizer(conv)
        if quant is not None:
            self.handled.add(quant.name)
        self.handled.add(conv.name)
        if self.is_binary_weight(quant):
            self.binary_conv(conv)
            return
        src = conv.input[0]
        if src == self.g.input or (src in self.maps and self.maps[src].node == "<stem input>"):
            self.stem_conv(conv, quant)
        elif src in self.maps:
            self.head_conv(conv)
        else:
            _fail(conv, f"reads {src!r}, which is neither the graph input nor a quantized map")

    def maxpool(self, node) -> None:
        g = self.g
        src = node.input[0]
        if src not in self.maps or self.maps[src].node.startswith("<"):
            _fail(node, "a MaxPool must read a quantized map (put it after the activation "
                  "quantizer)")
        kernel = [int(v) for v in g.attr(node, "kernel_shape", [])]
        strides = [int(v) for v in g.attr(node, "strides", kernel)]
        pads = [int(v) for v in g.attr(node, "pads", [0, 0, 0, 0])]
        if (len(set(kernel)) != 1 or len(set(strides)) != 1 or any(pads)
                or int(g.attr(node, "ceil_mode", 0))
                or any(int(v) != 1 for v in g.attr(node, "dilations", [1, 1]))):
            _fail(node, f"only square max-pools without padding, dilation or ceil_mode are "
                  f"accelerator ops (kernel {kernel}, strides {strides}, pads {pads})")
        if len(node.output) > 1 and node.output[1]:
            _fail(node, "the Indices output is not supported")
        ref = self.maps[src]
        self.nodes.append(GraphNode(node.name, PoolPass(kernel[0], strides[0]), ref.node))
        self.register(node.output[0], MapRef(node.name, ref.qmap, ref.channels))
        self.handled.add(node.name)

    def repeat(self, node) -> None:
        """``Concat`` of one quantized map with itself along the channels, or ``Tile`` by
        ``(1, k, 1, 1)``: a channel repeat (channel c reads channel c mod C)."""
        g = self.g
        if node.op_type == "Concat":
            if int(g.attr(node, "axis", 1)) not in (1, -3) or len(set(node.input)) != 1:
                _fail(node, "only a Concat of one quantized map with itself along the channels "
                      "(a channel repeat) is an accelerator op")
            times = len(node.input)
        else:
            reps = [int(v) for v in g.init(node, 1, "repeats").reshape(-1)]
            if len(reps) != 4 or reps[0] != 1 or reps[2:] != [1, 1] or reps[1] < 1:
                _fail(node, f"repeats {reps}: only a channel repeat (1, k, 1, 1) is an "
                      "accelerator op")
            times = reps[1]
        src = node.input[0]
        if src not in self.maps or self.maps[src].node.startswith("<"):
            _fail(node, f"a channel repeat must read a quantized map, but {src!r} is not one")
        ref = self.maps[src]
        qmap = dataclasses.replace(ref.qmap, values=np.tile(ref.qmap.values, (times, 1))
                                   if ref.qmap.values.shape[0] > 1 else ref.qmap.values)
        self.nodes.append(GraphNode(node.name, ChannelRepeat(ref.channels * times), ref.node))
        self.register(node.output[0], MapRef(node.name, qmap, ref.channels * times))
        self.handled.add(node.name)

    def input_map(self, conv) -> tuple[MapRef, int, int]:
        """The conv's quantized input map, its padding and the padding level."""
        stride_pad = self.conv_geometry(conv)[1]
        src, extra, pad_value = conv.input[0], 0, None
        pad = self.g.producer.get(src)
        if pad is not None and pad.op_type == "Pad":
            extra, pad_value = self.pad(pad)
            src = pad.input[0]
        if src not in self.maps or self.maps[src].node.startswith("<"):
            _fail(conv, f"a binary conv must read a quantized map, but {src!r} is not one "
                  "(quantize the conv's input)")
        ref = self.maps[src]
        level = None
        for value, width in ((0.0, stride_pad), (pad_value, extra)):
            if not width:
                continue
            here = ref.qmap.level_of(value)
            if here is None:
                what = "zero padding" if value == 0.0 else f"padding with {value}"
                _fail(conv, f"{what} is not a level of its input map (levels: "
                      f"{ref.qmap.values[0].tolist()}): pad explicitly with a level's value")
            if level is not None and here != level:
                _fail(conv, "its Pad value and its own zero padding are different levels")
            level = here
        return ref, stride_pad + extra, 0 if level is None else level

    def pad(self, pad) -> tuple[int, float]:
        g = self.g
        self.handled.add(pad.name)
        if g.attr(pad, "mode", "constant") != "constant" or len(g.consumers[pad.output[0]]) != 1:
            _fail(pad, "only a constant Pad read by one conv is supported")
        pads = g.init(pad, 1, "pads").reshape(-1).tolist() if len(pad.input) > 1 \
            else g.attr(pad, "pads", [])
        value = float(g.init(pad, 2, "value").reshape(-1)[0]) \
            if len(pad.input) > 2 and pad.input[2] else 0.0
        if len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or len(set(pads[2:4] + pads[6:]))\
                != 1:
            _fail(pad, f"pads {pads}: only the same padding on every spatial side is supported")
        return int(pads[2]), value

    def binary_conv(self, conv) -> None:
        ref, padding, pad_level = self.input_map(conv)
        stride, _ = self.conv_geometry(conv)
        affine = ref.qmap.affine()
        if affine is None:
            _fail(conv, "its input map's values must be level·step + offset with one positive "
                  "step for all channels")
        step, offset = affine
        w = np.asarray(self.probe[conv.input[1]], dtype=np.float32)
        scale = np.abs(w).reshape(w.shape[0], -1)
        if (scale == 0).any() or (scale != scale[:, :1]).any():
            _fail(conv, "1-bit weights must be ±s (one magnitude per output channel)")
        s_o = scale[:, 0].astype(np.float64)
        if not ref.qmap.exact() or not all(_pow2(v) for v in (*s_o, step,
                                                              *(np.abs(offset),) * bool(offset))):
            self.notes.append(f"conv {conv.name!r}: weight scale {s_o[0]:g} or input step "
                              f"{step:g} is not a power of two, so qonnx's float32 sums are "
                              "rounded and may break ties differently (use power-of-two "
                              "scales, e.g. a binary weight quantizer with scaling_const 1 and "
                              "activation quantizers with power-of-two scales)")
        signs = torch.from_numpy(np.where(w >= 0, 1.0, -1.0).astype(np.float32))
        sums = weight_sums(signs)
        bias = None
        if len(conv.input) > 2 and conv.input[2]:
            bias = self.g.init(conv, 2, "bias").astype(np.float32).reshape(1, -1, 1, 1)
        ep = _follow_epilogue(self.g, conv, self.maps)
        if ep.quant is None:
            _fail(conv, "a binary conv needs an activation quantizer after its epilogue (a raw "
                  "binary last layer is not imported)")
        qmap = _qmap(self.g, ep.quant)
        sref = None if ep.shortcut is None else self.maps[ep.shortcut]
        run = _subgraph_runner(self.g, [*ep.shortcut_nodes, *ep.nodes, ep.quant],
                               conv.output[0], ep.shortcut, ep.quant.output[0])
        sums64 = sums.numpy().astype(np.float64).reshape(1, -1, 1, 1)
        s_col = s_o.reshape(1, -1, 1, 1)

        def conv_values(d):
            x = (s_col * (step * d.astype(np.float64) + offset * sums64)).astype(np.float32)
            return x if bias is None else x + bias

        def shortcut_values(r):
            v = np.broadcast_to(sref.qmap.values[:, r], (sref.channels,))
            return v.reshape(1, -1, 1, 1)

        k = int(np.prod(w.shape[1:]))
        try:
            folded = fold_levels(_levels_fn(run, qmap, conv_values, shortcut_values, ep.quant),
                                 k=k, in_bits=ref.qmap.bits, weight_sums=sums,
                                 out_bits=qmap.bits,
                                 shortcut_bits=0 if sref is None else sref.qmap.bits)
        except QonnxImportError:
            raise
        except ValueError as e:
            _fail(conv, f"its epilogue cannot be folded: {e}")
        signs = torch.where(folded.flip[:, None, None, None], -signs, signs)
        in_bits = ref.qmap.bits
        layer = BinaryConvLayer(
            weights=signs, thresholds=folded.thresholds, stride=stride, padding=padding,
            pad_value=2 * pad_level - 1 if in_bits == 1 else -1, in_bits=in_bits,
            pad_level=pad_level, shortcut_bits=0 if sref is None else sref.qmap.bits)
        self.nodes.append(GraphNode(conv.name, layer, ref.node,
                                    None if sref is None else sref.node))
        self.handled.update(n.name for n in (*ep.shortcut_nodes, *ep.nodes, ep.quant))
        self.register(ep.quant.output[0], MapRef(conv.name, qmap, w.shape[0]))

    # -- host layers --------------------------------------------------------------
    def int_weights(self, conv, quant) -> tuple[np.ndarray, np.ndarray]:
        """Integer weights (|w| ≤ 127) and the per-output-channel scale of a stem conv."""
        w = np.asarray(self.probe[conv.input[1]], dtype=np.float32)
        o = w.shape[0]
        if quant is None:
            s = np.ones(o, dtype=np.float32)
        else:
            if quant.op_type == "BipolarQuant":
                _fail(conv, "a host stem needs integer weights")
            s = np.broadcast_to(_per_channel(quant, self.g.init(quant, 1, "scale"), "scale"),
                                (o,)).astype(np.float32)
            z = self.g.init(quant, 2, "zero point")
            if (np.asarray(z) != 0).any():
                _fail(conv, "a host stem's weight quantizer must have zero point 0")
        q = w / s.reshape(-1, 1, 1, 1)
        if not np.array_equal(q, np.round(q)) or np.abs(q).max() > 127 or not np.array_equal(
                q * s.reshape(-1, 1, 1, 1), w):
            _fail(conv, "the host stem runs in fixed point: its weights must be integers of at "
                  "most 8 bits times a per-channel scale (Brevitas QuantConv2d with "
                  "weight_bit_width ≤ 8); float weights are not imported")
        return q.astype(np.int64), s

    def stem_conv(self, conv, quant) -> None:
        if self.stem is not None or self.nodes:
            _fail(conv, "only the first conv may be a host stem (a real-valued conv in the "
                  "middle of the network is not an accelerator op)")
        q, s_w = self.int_weights(conv, quant)
        stride, padding = self.conv_geometry(conv)
        src = conv.input[0]
        if src == self.g.input:
            lo_code, hi_code, zero, s_x = 0, 255, 0, 1.0
            self.input_kind = {"kind": "integer pixels", "range": [0, 255]}
        else:
            qm = self.maps[src].qmap
            affine = qm.affine()
            if affine is None or not float(qm.zero).is_integer():
                _fail(conv, "the stem's input quantizer must have one scale and an integer "
                      "zero point")
            s_x, zero = affine[0], int(qm.zero)
            lo_code, hi_code = qm.code_min, qm.code_min + qm.count - 1
        ep = _follow_epilogue(self.g, conv, self.maps)
        nodes, out_quant = ep.nodes, ep.quant
        if out_quant is None or ep.shortcut is not None:
            _fail(conv, "the host stem must end in an activation quantizer (no shortcut)")
        qmap = _qmap(self.g, out_quant)
        bias = None
        if len(conv.input) > 2 and conv.input[2]:
            bias = self.g.init(conv, 2, "bias").astype(np.float32).reshape(1, -1, 1, 1)
        run = _subgraph_runner(self.g, [*nodes, out_quant], conv.output[0], None,
                               out_quant.output[0])
        lo_x, hi_x = lo_code - zero, hi_code - zero
        flat = q.reshape(q.shape[0], -1)
        lo = int(np.minimum(flat * lo_x, flat * hi_x).sum(axis=1).min())
        hi = int(np.maximum(flat * lo_x, flat * hi_x).sum(axis=1).max())
        col = (s_w.astype(np.float64) * s_x).reshape(1, -1, 1, 1)

        def fn(acc):
            x = (acc.numpy().astype(np.float64) * col).astype(np.float32)
            x = x if bias is None else x + bias
            return torch.from_numpy(qmap.to_levels(run(x), f"node {out_quant.name!r}"))

        try:
            thresholds, sign = fold_integer_epilogue(fn, lo=lo, hi=hi, channels=q.shape[0],
                                                     n_levels=qmap.count - 1)
        except QonnxImportError:
            raise
        except ValueError as e:
            _fail(conv, f"its epilogue cannot be folded: {e}")
        if qmap.count != 1 << qmap.bits:
            _fail(out_quant, "the stem's quantizer must use all 2**bits levels")
        self.stem = HostLayer(
            name="stem", kind="conv_threshold", stride=stride, padding=padding,
            attrs={"zero_point": zero},
            arrays={"weight": q.astype(np.int8), "thresholds": thresholds.numpy().astype(np.int32),
                    "sign": sign.numpy().astype(np.int8)})
        self.handled.update(n.name for n in (*nodes, out_quant))
        self.input_bits = qmap.bits
        self.input_shape = tuple(self.g.shape(out_quant.output[0])[1:])
        self.register(out_quant.output[0], MapRef("input", qmap, q.shape[0]))

    def head_conv(self, conv) -> None:
        ref = self.maps[conv.input[0]]
        if not self.nodes or ref.node != self.nodes[-1].name:
            _fail(conv, "a real-valued conv runs on the host only as the head, on the last "
                  "binary node's map")
        stride, padding = self.conv_geometry(conv)
        ep = _follow_epilogue(self.g, conv, self.maps)
        nodes, last = ep.nodes, ep.last
        if ep.quant is not None or ep.shortcut is not None or last not in self.g.outputs:
            _fail(conv, "the host head must end the graph (affine per-channel ops only after "
                  "it)")
        w = np.asarray(self.probe[conv.input[1]], dtype=np.float64)
        o = w.shape[0]
        b = np.zeros(o) if len(conv.input) < 3 or not conv.input[2] else \
            self.g.init(conv, 2, "bias").astype(np.float64).reshape(-1)
        gain, shift = np.ones(o), np.zeros(o)
        if nodes:
            run = _subgraph_runner(self.g, nodes, conv.output[0], None, last)
            grid = np.broadcast_to(np.array([0.0, 1.0, 2.0]).reshape(1, 1, 3, 1), (1, o, 3, 1))
            y = run(np.ascontiguousarray(grid)).astype(np.float64)[0, :, :, 0]
            shift, gain = y[:, 0], y[:, 1] - y[:, 0]
            if not np.allclose(y[:, 2], shift + 2 * gain, rtol=1e-5, atol=1e-6):
                _fail(conv, "the ops after the host head must be affine per channel")
        v = np.broadcast_to(ref.qmap.values.astype(np.float64), (ref.channels, ref.qmap.count))
        if ref.qmap.bits == 1:        # the head reads ±1: value = mid + half·u
            p, c = (v[:, 1] - v[:, 0]) / 2, (v[:, 1] + v[:, 0]) / 2
        else:                         # the head reads levels: value = v0 + step·u
            p, c = v[:, 1] - v[:, 0], v[:, 0]
        if padding and np.any(c != 0):
            _fail(conv, "a padded host head needs inputs whose zero is a level")
        w_eff = gain.reshape(-1, 1, 1, 1) * w * p.reshape(1, -1, 1, 1)
        bias_eff = gain * (b + (w * c.reshape(1, -1, 1, 1)).sum(axis=(1, 2, 3))) + shift
        scale = np.abs(w_eff).reshape(o, -1).max(axis=1) / 127
        scale = np.where(scale > 0, scale, 1.0)
        w_int = np.round(w_eff / scale.reshape(-1, 1, 1, 1))
        bias_int = np.round(bias_eff / scale)
        if np.abs(bias_int).max(initial=0) >= 2 ** 31:
            _fail(conv, "the head's bias does not fit the fixed-point head (int32)")
        self.head = HostLayer(
            name="head", kind="conv_affine", stride=stride, padding=padding,
            arrays={"weight": w_int.astype(np.int8), "bias": bias_int.astype(np.int32),
                    "scale": scale.astype(np.float32)})
        self.head_output = last
        self.handled.update(n.name for n in nodes)


def _pow2(value: float) -> bool:
    mantissa, _ = np.frexp(value)
    return value > 0 and mantissa == 0.5


def _chain(nodes: list[GraphNode]):
    """A graph that is a plain chain (each node reads the previous, no shortcut, pools right
    after their conv): its layers with the pools merged, and the names; else None."""
    layers, names = [], []
    for i, node in enumerate(nodes):
        previous = nodes[i - 1].name if i else "input"
        if node.input != previous or node.shortcut is not None:
            return None
        if isinstance(node.op, PoolPass):
            if not layers or layers[-1].pool is not None or not isinstance(nodes[i - 1].op,
                                                                          BinaryConvLayer):
                return None
            stride = node.op.stride or node.op.kernel
            layers[-1] = dataclasses.replace(layers[-1], pool=(node.op.kernel, stride))
            names[-1] = (names[-1], node.name)
            continue
        layers.append(node.op)
        names.append(node.name)
    return layers, names


def _metadata(graph: _Graph, path, importer: _Importer) -> dict:
    props = {p.key: p.value for p in graph.model.model.metadata_props}
    # "input": [C, H, W] of the graph input, as bitdet's own bundles record it (what
    # `bitdet detect` letterboxes an image into); "input_kind": what the bundle reads
    model = {"name": graph.model.graph.name or Path(path).stem, "source": "qonnx import",
             "source_file": Path(path).name,
             "input": [int(d) for d in graph.shape(graph.input)[1:]],
             "input_kind": importer.input_kind, "task": "features"}
    if "bitdet.grid_stride" in props:       # the model says it is a detector
        model.update(task="detection", grid_stride=int(props["bitdet.grid_stride"]))
        if "bitdet.classes" in props:
            model["classes"] = json.loads(props["bitdet.classes"])
        if "bitdet.decode_prior" in props:
            model["decode"] = {"prior": float(props["bitdet.decode_prior"])}
    elif "bitdet.task" in props:
        model["task"] = props["bitdet.task"]
    return model


def _probe(graph: _Graph):
    from qonnx.core.onnx_exec import execute_onnx
    shape = graph.shape(graph.input)
    try:
        return execute_onnx(graph.model, {graph.input: np.zeros(shape, dtype=np.float32)},
                            return_full_exec_context=True)
    except Exception as e:
        raise QonnxImportError(f"qonnx cannot execute the graph ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None


def import_qonnx(path: str | os.PathLike) -> ImportResult:
    """Read a QONNX model and fold it into a bundle (not checked, not written)."""
    graph = _load(path)
    shape = graph.shape(graph.input)
    if len(shape) != 4:
        raise QonnxImportError(f"the graph input {graph.input!r} must be N×C×H×W (NCHW), not "
                               f"shape {shape} (wrong layout)")
    importer = _Importer(graph, _probe(graph))
    importer.run()
    if not importer.nodes or importer.input_shape is None:
        raise QonnxImportError("the graph has no binary conv (nothing runs on the accelerator)")
    host = [h for h in (importer.stem, importer.head) if h is not None]
    common = {"input_shape": importer.input_shape, "host_layers": host,
              "model": _metadata(graph, path, importer), "input_bits": importer.input_bits}
    tensors = dict(importer.maps)
    chain = _chain(importer.nodes)
    if chain is not None:
        layers, names = chain
        bundle = Bundle(binary_layers=layers, layer_names=[n if isinstance(n, str) else n[0]
                                                           for n in names], **common)
        if bundle.uses_v2():
            chain = None
        else:
            for ref in tensors.values():     # a merged pool: its conv's map is pre-pool
                for n in names:
                    if isinstance(n, tuple) and ref.node == n[0]:
                        ref.prepool_of = n[0]
                    elif isinstance(n, tuple) and ref.node == n[1]:
                        ref.node = n[0]
    if chain is None:
        bundle = Bundle(binary_layers=[], graph=importer.nodes, **common)
    tensors = {t: r for t, r in tensors.items() if not r.node.startswith("<")}
    bundle.validate()
    return ImportResult(bundle, tensors, graph.model, importer.input_kind,
                        importer.head_output, importer.notes)


# --------------------------------------------------------------------------- the head config


class HeadConfigError(QonnxImportError):
    """The ``--head-config`` YAML is malformed or does not fit the graph (one line, names
    the file and the key)."""


#: Keys of a head config (docs/import.md, "A detection head"); every one is optional but
#: ``classes`` or ``num_classes``.
HEAD_CONFIG_KEYS = ("classes", "num_classes", "stride", "grid", "channels", "box_encoding",
                    "box_prior", "score_threshold", "nms_iou", "max_detections")
#: Keys of ``channels``: where bitdet's head-map parts sit in the graph output's channels.
CHANNEL_KEYS = ("objectness", "box", "classes")
#: The one box encoding bitdet decodes (:mod:`bitdet.sw.detection`): centre
#: ``(g + sigmoid(t)) · stride``, size ``prior · exp(t)``, one box per cell.
BOX_ENCODINGS = ("bitdet",)


@dataclass(frozen=True)
class HeadConfig:
    """A ``--head-config`` YAML, read and checked for types (:func:`load_head_config`); the
    checks against the graph are :func:`apply_head_config`'s.

    Members
    -------
    source : str
        The file's name (for messages and the manifest).
    num_classes : int
    class_names : list of str or None
    stride, grid : int / (int, int) or None
        The grid stride in input pixels and the grid ``(S_h, S_w)``; None: derived from
        the graph (input size / output size), checked when given.
    channels : dict or None
        ``{"objectness": int, "box": [tx, ty, tw, th], "classes": [int] * C}`` graph output
        channels; None: bitdet's own order (0 objectness, 1…4 box, 5… classes).
    box_prior, score_threshold, nms_iou : float
    max_detections : int
    """

    source: str
    num_classes: int
    class_names: list[str] | None = None
    stride: int | None = None
    grid: tuple[int, int] | None = None
    channels: dict | None = None
    box_prior: float = 16.0
    score_threshold: float = 0.25
    nms_iou: float = 0.5
    max_detections: int = 100

    def permutation(self) -> list[int]:
        """Graph output channel of each head-map channel in bitdet's order (objectness,
        tx, ty, tw, th, class 0 … C−1)."""
        if self.channels is None:
            return list(range(5 + self.num_classes))
        c = self.channels
        return [c["objectness"], *c["box"], *c["classes"]]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and bool(np.isfinite(value)))


def load_head_config(path) -> HeadConfig:
    """Read a head config YAML; :class:`HeadConfigError` (one line naming the file and the
    key) for a malformed one: not YAML, not a mapping, an unknown key, a wrong type or
    range, ``classes`` and ``num_classes`` that disagree, a ``channels`` mapping that
    repeats a channel or lacks a part."""
    path = Path(path)
    where = path.name
    data = _read_yaml(path)
    for key in data:
        if key not in HEAD_CONFIG_KEYS:
            _bad_key(where, key, f"unknown key (known: {', '.join(HEAD_CONFIG_KEYS)})")
    names, count = _head_classes(data, where)
    stride = data.get("stride")
    if stride is not None and (not _is_int(stride) or stride < 1):
        _bad_key(where, "stride", f"must be an integer >= 1 (input pixels per grid cell), "
                 f"not {stride!r}")
    grid = data.get("grid")
    if grid is not None:
        grid = [grid, grid] if _is_int(grid) else grid
        if (not isinstance(grid, list) or len(grid) != 2
                or not all(_is_int(g) and g >= 1 for g in grid)):
            _bad_key(where, "grid", f"must be [rows, columns] (integers >= 1) or one "
                     f"integer, not {data['grid']!r}")
        grid = tuple(grid)
    encoding = data.get("box_encoding", "bitdet")
    if encoding not in BOX_ENCODINGS:
        _bad_key(where, "box_encoding", f"{encoding!r} is not decoded by bitdet (known: "
                 f"{', '.join(BOX_ENCODINGS)}: centre (cell + sigmoid(t))·stride, size "
                 "prior·exp(t); permute the channels with 'channels')")
    numbers = {}
    for key, default, low, high, what in (
            ("box_prior", 16.0, 1e-9, 1e9, "a positive number (pixels)"),
            ("score_threshold", 0.25, 0.0, 1.0, "a number in [0, 1]"),
            ("nms_iou", 0.5, 0.0, 1.0, "a number in [0, 1]")):
        value = data.get(key, default)
        if not _is_number(value) or not low <= value <= high:
            _bad_key(where, key, f"must be {what}, not {value!r}")
        numbers[key] = float(value)
    most = data.get("max_detections", 100)
    if not _is_int(most) or most < 1:
        _bad_key(where, "max_detections", f"must be an integer >= 1, not {most!r}")
    channels = data.get("channels")
    if channels is not None:
        channels = _head_channels(channels, count, where)
    return HeadConfig(source=where, num_classes=count, class_names=names, stride=stride,
                      grid=grid, channels=channels, max_detections=most, **numbers)


def _bad_key(where: str, key: str, why: str):
    raise HeadConfigError(f"{where}: key {key!r}: {why}")


def _read_yaml(path: Path) -> dict:
    import yaml
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise HeadConfigError(f"{path}: no such head config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise HeadConfigError(f"{path}: cannot read the head config "
                              f"({type(e).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise HeadConfigError(f"{path.name}: not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise HeadConfigError(f"{path.name}: a head config is a mapping of keys "
                              f"({', '.join(HEAD_CONFIG_KEYS)}), not {type(data).__name__}")
    return data


def _head_classes(data: dict, where: str) -> tuple[list[str] | None, int]:
    """``(class names or None, class count)`` from ``classes`` / ``num_classes``."""
    names, count = data.get("classes"), data.get("num_classes")
    if names is None and count is None:
        _bad_key(where, "classes", "missing (a list of class names, or num_classes: C)")
    if count is not None and (not _is_int(count) or count < 1):
        _bad_key(where, "num_classes", f"must be an integer >= 1, not {count!r}")
    if names is None:
        return None, count
    if _is_int(names) and names >= 1:              # classes: C (no names)
        if count is not None and count != names:
            _bad_key(where, "num_classes", f"{count!r} but classes is {names!r}")
        return None, names
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names)):
        _bad_key(where, "classes", f"must be a non-empty list of class names (strings) or a "
                 f"count, not {names!r}")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        _bad_key(where, "classes", f"repeats a name ({twice!r})")
    if count is not None and count != len(names):
        _bad_key(where, "num_classes", f"{count} but classes lists {len(names)} names")
    return names, len(names)


def _head_channels(channels, count: int, where: str) -> dict:
    """``channels`` checked: each part present, integers, no channel twice; ``classes``
    may be the first of ``count`` consecutive channels."""
    def bad(key, why):
        raise HeadConfigError(f"{where}: key 'channels.{key}': {why}")

    if not isinstance(channels, dict):
        raise HeadConfigError(f"{where}: key 'channels': must be a mapping of "
                              f"{', '.join(CHANNEL_KEYS)}, not {channels!r}")
    for key in channels:
        if key not in CHANNEL_KEYS:
            bad(key, f"unknown key (known: {', '.join(CHANNEL_KEYS)})")
    for key in CHANNEL_KEYS:
        if key not in channels:
            bad(key, "missing (channels gives objectness, box and classes together)")
    obj, box, cls = (channels[k] for k in CHANNEL_KEYS)
    if not _is_int(obj) or obj < 0:
        bad("objectness", f"must be a channel index (integer >= 0), not {obj!r}")
    if not isinstance(box, list) or len(box) != 4 or not all(_is_int(b) and b >= 0
                                                              for b in box):
        bad("box", f"must be 4 channel indices [tx, ty, tw, th], not {box!r}")
    if _is_int(cls) and cls >= 0:
        cls = list(range(cls, cls + count))
    elif not isinstance(cls, list) or not all(_is_int(c) and c >= 0 for c in cls):
        bad("classes", f"must be the first class channel or a list of channel indices, "
            f"not {cls!r}")
    elif len(cls) != count:
        bad("classes", f"lists {len(cls)} channels for {count} classes")
    used = [obj, *box, *cls]
    twice = [c for c in used if used.count(c) > 1]
    if twice:
        raise HeadConfigError(f"{where}: key 'channels': channel {twice[0]} is used twice")
    return {"objectness": obj, "box": list(box), "classes": cls}


def apply_head_config(result: ImportResult, config: HeadConfig) -> None:
    """Make ``result.bundle`` a detector: check ``config`` against the graph (a host head,
    its output channels ``5 + C``, every channel index in range, the grid and stride
    against the input and output sizes, an input of integer pixels), permute the head's
    output channels into bitdet's order and set the model metadata (``task:
    "detection"``, ``grid_stride``, ``classes``, ``num_classes``, ``decode``). Raises
    :class:`HeadConfigError` naming the key."""
    where = config.source
    bundle = result.bundle
    head = next((h for h in bundle.host_layers if h.name == "head"), None)
    if head is None:
        raise HeadConfigError(f"{where}: the graph has no host head (a real-valued last "
                              "Conv) whose output could be a detection head map; import "
                              "it without --head-config (a feature bundle)")
    if result.input_kind.get("kind") != "integer pixels":
        raise HeadConfigError(f"{where}: `bitdet detect` feeds integer pixels 0…255 to the "
                              "bundle's stem; this graph's input is "
                              f"{result.input_kind.get('kind', 'not read by a stem')!r} "
                              "(import it without --head-config)")
    shape = list(result.model.get_tensor_shape(result.head_output))
    out = shape[1]
    need = 5 + config.num_classes
    if out != need:
        raise HeadConfigError(f"{where}: key 'classes': {config.num_classes} classes need "
                              f"5 + {config.num_classes} = {need} head channels (objectness, "
                              f"4 box, classes), but the graph output {result.head_output!r} "
                              f"has {out}")
    if config.channels is not None:
        for key in CHANNEL_KEYS:
            value = config.channels[key]
            high = max(value) if isinstance(value, list) else value
            if high >= out:
                raise HeadConfigError(f"{where}: key 'channels.{key}': channel {high} is out "
                                      f"of range (the graph output has {out} channels, "
                                      f"0…{out - 1})")
    height, width = bundle.model["input"][1:]
    grid = (int(shape[2]), int(shape[3]))
    if config.grid is not None and tuple(config.grid) != grid:
        raise HeadConfigError(f"{where}: key 'grid': {list(config.grid)} but the graph output "
                              f"is a {grid[0]}×{grid[1]} grid")
    stride = config.stride
    if stride is None:
        if height % grid[0] or width % grid[1] or height // grid[0] != width // grid[1]:
            raise HeadConfigError(f"{where}: key 'stride': missing, and the {height}×{width} "
                                  f"input over the {grid[0]}×{grid[1]} grid gives no integer "
                                  "stride")
        stride = height // grid[0]
    elif (grid[0] * stride, grid[1] * stride) != (height, width):
        raise HeadConfigError(f"{where}: key 'stride': {stride} × the {grid[0]}×{grid[1]} "
                              f"grid is {grid[0] * stride}×{grid[1] * stride}, but the input "
                              f"is {height}×{width}")
    order = config.permutation()
    head.arrays = {k: np.ascontiguousarray(v[order]) for k, v in head.arrays.items()}
    result.head_channels = order
    model = bundle.model
    model.update(task="detection", grid_stride=int(stride), num_classes=config.num_classes,
                 decode={"prior": config.box_prior, "score_threshold": config.score_threshold,
                         "iou_threshold": config.nms_iou,
                         "max_detections": config.max_detections},
                 head_config={"file": config.source, "box_encoding": "bitdet",
                              "graph_output": result.head_output,
                              "graph_channels": order})
    if config.class_names is not None:
        model["classes"] = list(config.class_names)
    else:
        model.pop("classes", None)
    bundle.validate()


def head_error_bound(layer: HostLayer, input_max: float) -> np.ndarray:
    """Per output channel, the most the fixed-point head can differ from the float head
    it was rounded from, on inputs of magnitude ≤ ``input_max`` (±1 maps: 1; n-bit level
    maps: 2**n − 1): ``scale · (K · input_max + 1) / 2``, ``K = C·kh·kw`` (each int8 weight
    and the int32 bias are within half a step ``scale`` of the exact value). Float32
    rounding of the two sides comes on top (a few ulp of the outputs)."""
    k = int(np.prod(layer.arrays["weight"].shape[1:]))
    return layer.arrays["scale"].astype(np.float64) * (k * input_max + 1) / 2


# --------------------------------------------------------------------------- the check


def _random_input(result: ImportResult, shape, rng) -> np.ndarray:
    kind = result.input_kind
    if kind.get("kind") == "integer pixels":
        return rng.integers(0, 256, size=shape).astype(np.float32)
    tensor = kind.get("tensor")
    ref = result.tensors.get(tensor)
    qmap = ref.qmap if ref is not None else None
    if qmap is None:          # the stem's input quantizer (not a bundle map)
        return (rng.standard_normal(shape) * 2).astype(np.float32)
    if kind.get("preprocessing") or qmap.values.shape[0] != 1:
        v = qmap.values
        return (rng.uniform(v.min() * 1.2, v.max() * 1.2, size=shape)).astype(np.float32)
    levels = rng.integers(0, qmap.count, size=shape)
    return qmap.values[0][levels].astype(np.float32)


def _stem_input(result: ImportResult, ctx, x: np.ndarray) -> torch.Tensor:
    """What the bundle's stem reads: integer pixels, or the input quantizer's codes."""
    kind = result.input_kind
    if kind.get("kind") == "integer pixels":
        return torch.from_numpy(x.astype(np.int64))
    values = np.asarray(ctx[kind["tensor"]], dtype=np.float64)
    step = kind["step"]
    codes = np.round(values / step + kind["zero_point"])
    return torch.from_numpy(codes.astype(np.int64))


def pixel_input_problem(result: ImportResult) -> str | None:
    """Why the graph input is not an image the bundle's host stem takes (integer pixels
    0…255 on 1 or 3 channels, at least 9×9: the smallest DigitScenes scenes
    :func:`scene_inputs` makes), or None."""
    model = result.model
    shape = list(model.get_tensor_shape(model.graph.input[0].name))
    kind = result.input_kind
    if kind.get("kind") == "quantized":
        return (f"the host stem reads the codes of an input {kind.get('quantizer')} "
                f"({kind.get('bits')} bits), not integer pixels 0…255")
    if kind.get("kind") != "integer pixels":
        return (f"the graph input is quantized straight to a {kind.get('bits')}-bit level "
                "map (no host stem on integer pixels 0…255)")
    channels, height, width = shape[1:]
    if channels not in (1, 3):
        return (f"the graph input has {channels} channels, not an image's 1 or 3")
    if height < 9 or width < 9:     # make_digitscenes' clutter arcs need 9 px on a side
        return f"the graph input is {height}×{width}, smaller than DigitScenes' 9×9 minimum"
    return None


def scene_inputs(shape, images: int, seed: int) -> list[tuple[np.ndarray, list[int]]]:
    """``images`` DigitScenes test scenes of the graph input's ``H×W`` (seed ``seed``,
    :func:`bitdet.sw.data.make_digitscenes`) as float32 pixel batches of ``shape``
    (N×C×H×W; a grayscale scene repeated over 3 channels where C is 3; a last batch that
    the scenes do not fill is topped up with the first ones), each with its scenes'
    indices."""
    from .data import make_digitscenes
    batch, channels, height, width = shape
    scenes = make_digitscenes("test", count=images, image_size=(height, width),
                              seed=seed).images
    out = []
    for start in range(0, images, batch):
        index = [(start + j) % images for j in range(batch)]
        x = np.repeat(scenes[index][:, None], channels, axis=1).astype(np.float32)
        out.append((x, index))
    return out


def check_bundle(result: ImportResult, bundle: Bundle, *, inputs: int = 3,
                 seed: int = 0, emulator: str | None = None,
                 images: int = 0) -> CheckReport:
    """Run ``bundle`` (golden model) and the QONNX graph (``execute_onnx``) on random
    inputs and on ``images`` DigitScenes scenes; compare every quantized tensor bit for bit
    (the bundle's levels mapped to the QONNX values). The head's float output is compared
    for information only.

    The scenes (:func:`scene_inputs`: the test split, seed ``seed``, of the graph input's
    size) are fed as integer pixels only where the graph reads them
    (:func:`pixel_input_problem`); otherwise ``report.images_skipped`` says why and only
    the random inputs are compared.

    ``emulator``: a contract-2 config (``"contract2"``): the bundle also runs on the
    emulator of that build, every node's map read back after its pass (``Device.run_graph``
    with ``trace``), and each is compared with qonnx's tensor (``report.emulator``), on the
    random inputs and the images alike."""
    from qonnx.core.onnx_exec import execute_onnx
    model = result.model
    name = model.graph.input[0].name
    shape = list(model.get_tensor_shape(name))
    rng = np.random.default_rng(seed)
    report = CheckReport(tensors=len(result.tensors), values=0, inputs=inputs)
    runs = [(_random_input(result, shape, rng), f"random input {i}", "head_error")
            for i in range(inputs)]
    if images > 0:
        report.images_skipped = pixel_input_problem(result)
        if report.images_skipped is None:
            report.images = images
            for x, index in scene_inputs(shape, images, seed):
                where = (f"DigitScenes image {index[0]}" if len(index) == 1 else
                         f"DigitScenes images {', '.join(map(str, index))} (one batch)")
                runs.append((x, where, "head_error_images"))
    device = None if emulator is None else _open_emulator(bundle, emulator, report)
    try:
        for x, where, head_key in runs:
            ctx = execute_onnx(model, {name: x}, return_full_exec_context=True)
            maps = _bundle_maps(result, bundle, ctx, x)
            if not _compare_golden(result, maps, ctx, where, report):
                return report
            if device is not None and not _compare_emulator(result, device, maps["input"],
                                                            ctx, where, report.emulator):
                return report
            if any(h.name == "head" for h in bundle.host_layers):
                _compare_head(result, bundle, maps, ctx, report, head_key)
    finally:
        if device is not None:
            device.close()
    return report


def _compare_head(result: ImportResult, bundle: Bundle, maps: dict, ctx,
                  report: CheckReport, key: str) -> None:
    """The fixed-point head against qonnx's float one (``report.<key>``, informational)."""
    last = maps[bundle.nodes()[-1].name]
    head = bundle.head(last).numpy()
    want = np.asarray(ctx[result.head_output])
    if result.head_channels is not None:      # bitdet's order (head config)
        want = want[:, result.head_channels]
    setattr(report, key, max(getattr(report, key) or 0.0, float(np.abs(head - want).max())))
    bits = bundle.output_bits()
    if bits is not None:
        report.head_bound = float(head_error_bound(
            bundle.host_layer("head"), 1 if bits == 1 else 2 ** bits - 1).max())


def _compare_golden(result: ImportResult, maps: dict, ctx, where: str, report: CheckReport
                    ) -> bool:
    for tensor, ref in result.tensors.items():
        key = f"{ref.node}@prepool" if ref.prepool_of else ref.node
        got = ref.qmap.to_values(maps[key].numpy())
        want = np.asarray(ctx[tensor])
        report.values += want.size
        diff = got != want
        if got.shape != want.shape or diff.any():
            report.difference = _describe(tensor, ref, where, got, want, diff)
            return False
    return True


def _open_emulator(bundle: Bundle, config: str, report: CheckReport):
    """The contract-2 emulator with ``bundle`` loaded, or None (``report.emulator.skipped``
    says why: the bundle does not fit that build)."""
    from .driver import BundleDoesNotFit, Device
    device = Device.open("emu", config)
    report.emulator = EmulatorReport(config=device.config.name)
    if device.config.contract != 2:
        device.close()
        raise QonnxImportError(f"the emulator check needs a contract-2 build, not "
                               f"{device.config.name!r} (contract {device.config.contract})")
    try:
        device.load(bundle)
    except BundleDoesNotFit as e:
        device.close()
        report.emulator.skipped = str(e)
        return None
    return device


def _compare_emulator(result: ImportResult, device, levels: torch.Tensor, ctx, where: str,
                      report: EmulatorReport) -> bool:
    """Every node's map of the emulator (one image at a time) against qonnx's tensors."""
    per_image = [device.run_graph(levels[j:j + 1], trace=True) for j in range(levels.shape[0])]
    report.tensors = 0
    for tensor, ref in result.tensors.items():
        if ref.node not in per_image[0]:
            continue                      # the input map: what the emulator was given
        report.tensors += 1
        got = ref.qmap.to_values(torch.cat([m[ref.node] for m in per_image]).numpy())
        want = np.asarray(ctx[tensor])
        report.values += want.size
        diff = got != want
        if got.shape != want.shape or diff.any():
            report.difference = _describe(tensor, ref, where, got, want, diff, "emulator")
            return False
    return True


def _bundle_maps(result: ImportResult, bundle: Bundle, ctx, x) -> dict:
    """Every bundle map by node name (``input`` too; a merged pool's conv: pre-pool)."""
    if any(h.name == "stem" for h in bundle.host_layers):
        levels = bundle.stem(_stem_input(result, ctx, x)).to(torch.int32)
    else:
        ref = result.tensors[result.input_kind["tensor"]]
        levels = torch.from_numpy(ref.qmap.to_levels(ctx[result.input_kind["tensor"]],
                                                     "the input").astype(np.int32))
    maps = dict(bundle.run_graph(levels))
    maps["input"] = levels
    if bundle.graph is None:
        for i, (lname, layer) in enumerate(zip(bundle.layer_names, bundle.binary_layers,
                                               strict=True)):
            if layer.pool is not None:
                source = maps[bundle.layer_names[i - 1]] if i else levels
                if layer.in_bits == 1:
                    source = source.to(torch.float32) * 2 - 1
                maps[f"{lname}@prepool"] = run_layer(source,
                                                     dataclasses.replace(layer, pool=None))
    return maps


def _describe(tensor, ref, where: str, got, want, diff, who: str = "bundle") -> str:
    if got.shape != want.shape:
        return (f"tensor {tensor!r} ({who} map {ref.node!r}): shape {got.shape} but qonnx "
                f"{want.shape} on {where}")
    index = tuple(int(v) for v in np.argwhere(diff)[0])
    return (f"tensor {tensor!r} ({who} map {ref.node!r}) differs on {where} at "
            f"{index}: qonnx {float(want[index])!r}, {who} {float(got[index])!r} "
            f"({int(diff.sum())} of {diff.size} values)")


def import_to_file(path, out, *, force: bool = False, inputs: int = 3, seed: int = 0,
                   emulator: str | None = "contract2", head_config=None, images: int = 2,
                   log=print) -> CheckReport:
    """Import, save to a temporary file beside ``out``, load it back, check it against
    qonnx (and a format-2 bundle on the ``emulator`` build too, unless None) on ``inputs``
    random inputs and ``images`` DigitScenes scenes (:func:`check_bundle`; 0: none; a graph
    that does not read integer pixels gets one line saying so and random inputs only);
    only an equal bundle is renamed to ``out`` (nothing written otherwise).
    ``head_config``: a head config YAML (:func:`load_head_config`,
    :func:`apply_head_config`) that makes the bundle a detector; without it the bundle is a
    feature bundle (``model.task: "features"``)."""
    from bitdet.core.bundle import load

    from .files import atomic_path, check_new_file
    check_new_file(out, force=force, inputs=[path] + ([head_config] if head_config else []))
    config = load_head_config(head_config) if head_config is not None else None
    result = import_qonnx(path)
    if config is not None:
        apply_head_config(result, config)
    with atomic_path(out) as tmp:
        result.bundle.save(tmp)
        bundle = load(tmp)
        report = check_bundle(result, bundle, inputs=inputs, seed=seed,
                              emulator=emulator if bundle.format_version == 2 else None,
                              images=images)
        log(_summary(path, bundle))
        if report.images_skipped is not None:
            log(f"DigitScenes images: not run: {report.images_skipped}; checked on random "
                "inputs only")
        if report.difference is not None:
            log(f"check: {report.tensors} quantized tensors on {report.inputs_text()}: "
                f"DIFFERENT: {report.difference}")
            for note in result.notes:
                log(f"note: {note}")
            raise _CheckFailed(report)
        log(f"check: {report.tensors} quantized tensors on {report.inputs_text()}, "
            f"{report.values} values: all equal to qonnx execute_onnx")
        _log_emulator(report, log)
        if report.head_error is not None or report.head_error_images is not None:
            log(_head_line(report))
        if config is not None:
            log(_detector_summary(bundle))
    log(f"wrote {out}")
    return report


def _head_line(report: CheckReport) -> str:
    parts = []
    if report.head_error is not None:
        parts.append(f"{report.head_error:.4g} on the random inputs")
    if report.head_error_images is not None:
        parts.append(f"{report.head_error_images:.4g} on the DigitScenes images")
    bound = "" if report.head_bound is None else \
        f" (bound scale·(K·max|x| + 1)/2 = {report.head_bound:.4g})"
    return f"head (fixed point, informational): max |bundle − qonnx| = {', '.join(parts)}{bound}"


def _summary(path, bundle: Bundle) -> str:
    host = ", ".join(h.name for h in bundle.host_layers) or "none"
    tail = (f"host layers {host}, input {'×'.join(map(str, bundle.input_shape))} "
            f"{bundle.input_bits}-bit, format {bundle.format_version}")
    if bundle.graph is None:
        return (f"{path}: {len(bundle.binary_layers)} binary layers "
                f"({', '.join(bundle.layer_names)}), {tail}")
    nodes = bundle.nodes()
    kinds = {"BinaryConvLayer": "binary conv", "PoolPass": "pool",
             "ChannelRepeat": "channel repeat"}
    counts: dict[str, int] = {}
    for node in nodes:
        kind = kinds[type(node.op).__name__]
        counts[kind] = counts.get(kind, 0) + 1
    adds = sum(1 for node in nodes if node.shortcut is not None)
    if adds:
        counts["residual add"] = adds
    what = ", ".join(_count(n, k) for k, n in counts.items())
    bits = sorted({node.op.output_bits for node in nodes
                   if isinstance(node.op, BinaryConvLayer)})
    bits = "/".join(map(str, bits))
    return (f"{path}: graph of {_count(len(nodes), 'node')} ({what}; {bits}-bit maps): "
            f"{', '.join(node.name for node in nodes)}; {tail}")


def _detector_summary(bundle: Bundle) -> str:
    model = bundle.model
    decode = model["decode"]
    _c, height, width = model["input"]
    stride = model["grid_stride"]
    order = model["head_config"]["graph_channels"]
    moved = "" if order == list(range(len(order))) else \
        f", graph channels {order} → bitdet's order"
    names = model.get("classes")
    classes = (f"{len(names)} classes ({', '.join(names)})" if names else
               f"{model['num_classes']} classes")
    return (f"detection head: {classes}, grid {height // stride}×{width // stride} stride "
            f"{stride}, box prior {decode['prior']:g} px{moved}; score ≥ "
            f"{decode['score_threshold']:g}, NMS IoU {decode['iou_threshold']:g}, at most "
            f"{decode['max_detections']} detections")


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _log_emulator(report: CheckReport, log) -> None:
    emu = report.emulator
    if emu is None:
        return
    if emu.skipped is not None:
        log(f"emulator: not run: {emu.skipped}")
        return
    where = f"emulator ({emu.config}, one RUN_LAYER per node, every map read back)"
    if emu.difference is not None:
        log(f"{where}: DIFFERENT: {emu.difference}")
        raise _CheckFailed(report)
    log(f"{where}: {_count(emu.tensors, 'quantized tensor')} on {report.inputs_text()}, "
        f"{emu.values} values: all equal to qonnx execute_onnx")


class _CheckFailed(Exception):
    def __init__(self, report: CheckReport):
        super().__init__(report.difference or (report.emulator and report.emulator.difference))
        self.report = report
