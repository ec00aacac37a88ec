# amaranth: UnusedElaboratable=no
"""One binary layer through the top-level RTL, over the byte protocol, against the golden model.

What ``bitdet sim layer`` runs. A :class:`LayerCase` is a ±1 input map and a folded
:class:`~bitdet.core.golden.BinaryConvLayer` (random, or a bundle's layer). :func:`run_case`
loads it into a device through any link with ``write`` / ``read`` (an
:class:`~bitdet.sim.link.RtlLink` here), through the protocol's host session
(:class:`LinkHost`, a :class:`~bitdet.core.protocol.HostSession`), using its frames only —
WRITE_ACTIVATIONS, WRITE_WEIGHTS, WRITE_THRESHOLDS (packed by :mod:`bitdet.core.packing`),
CONFIGURE_LAYER, RUN_LAYER, READ_ACTIVATIONS — and compares the map it reads back with
:func:`bitdet.core.golden.run_layer`, bit for bit (channel padding bits included).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from bitdet.core import golden
from bitdet.core.descriptor import output_size
from bitdet.core.packing import pack_activations, pack_levels, pack_thresholds, pack_weights
from bitdet.core.protocol import (
    HostSession,
    Opcode,
    Response,
    decode_counters,
    encode_layer,
    encode_thresholds,
    encode_weights,
)

__all__ = ["V2_SLOTS", "LayerCase", "LinkHost", "bundle_case", "case_descriptors",
           "compare_levels", "compare_maps", "load_case", "random_case", "random_case_v2",
           "run_case", "run_case_v2", "simulate_layer"]


class LinkHost(HostSession):
    """The host session of :mod:`bitdet.core.protocol` (the one the driver uses,
    :class:`bitdet.sw.driver.session.Session`) with the simulation's longer default
    timeout: one frame out, the response echoing its seq back, retries and
    resynchronisation as docs/protocol.md asks of a host. :meth:`transact` sends raw
    bytes (a test's hand-made frame) and returns the next response whatever its seq."""

    def __init__(self, link, *, timeout: float = 60.0, frame_timeout: float | None = None):
        super().__init__(link, timeout=timeout, frame_timeout=frame_timeout)

    def transact(self, frame: bytes, *, timeout: float | None = None) -> Response:
        """Send ``frame`` (any bytes) and return the next response frame from the device."""
        return self.exchange(frame, timeout=timeout)


@dataclass
class LayerCase:
    """A ±1 input map ``1×C×H×W`` and the folded layer that runs on it."""

    x: torch.Tensor
    layer: golden.BinaryConvLayer
    name: str = "layer"
    #: contract 2: the shortcut map's levels (1×O×H'×W', the conv output's shape) of a
    #: layer with ``shortcut_bits`` > 0
    shortcut: torch.Tensor | None = None

    @property
    def contract2(self) -> bool:
        """Whether the case needs a contract-2 build: n-bit input or output, a shortcut,
        or an input given as levels."""
        layer = self.layer
        return (layer.in_bits != 1 or layer.shortcut_bits != 0 or layer.output_bits != 1
                or not self.x.dtype.is_floating_point)

    @property
    def out_channels(self) -> int:
        return int(self.layer.weights.shape[0])

    @property
    def kernel(self) -> int:
        return int(self.layer.weights.shape[2])

    def window(self):
        from bitdet.hw.window import WindowLayer
        _, c, h, w = self.x.shape
        return WindowLayer(int(h), int(w), int(c), self.kernel, self.layer.stride,
                           self.layer.padding, 1 if self.layer.pad_value == 1 else 0)

    def shape(self) -> str:
        _, c, h, w = self.x.shape
        pool = f" pool{self.layer.pool[0]}/{self.layer.pool[1]}" if self.layer.pool else ""
        bits = ""
        if self.contract2:
            layer = self.layer
            bits = (f" a{layer.in_bits}->a{layer.output_bits}"
                    + (f" +s{layer.shortcut_bits}" if layer.shortcut_bits else ""))
        return (f"{c}x{h}x{w}->{self.out_channels} k{self.kernel}s{self.layer.stride}"
                f"p{self.layer.padding}{pool}{bits}")


def random_case(*, cin: int, cout: int, hw: tuple[int, int], kernel: int, stride: int = 1,
                padding: int | None = None, pad_bit: int = 0, seed: int = 0,
                pool: tuple[int, int] | None = None, in_bits: int = 1, out_bits: int = 1,
                shortcut_bits: int = 0, pad_level: int | None = None) -> LayerCase:
    """A random input, random ±1 weights, thresholds spread around ``K/2`` (so outputs
    are mixed 0/1); ``padding`` defaults to ``kernel // 2``; ``pool`` = (kernel, stride)
    of a binary max-pool after the layer.

    Contract 2 (any of ``in_bits``, ``out_bits`` > 1, ``shortcut_bits`` > 0 or a
    ``pad_level``; :func:`random_case_v2`): random input levels, sorted threshold rows
    spread over the accumulator's range, a random shortcut map."""
    if (in_bits, out_bits, shortcut_bits, pad_level) != (1, 1, 0, None):
        return random_case_v2(cin=cin, cout=cout, hw=hw, kernel=kernel, stride=stride,
                              padding=padding, seed=seed, pool=pool, in_bits=in_bits,
                              out_bits=out_bits, shortcut_bits=shortcut_bits,
                              pad_level=pad_bit if pad_level is None else pad_level)
    _check_geometry(cin, cout, hw, kernel, stride)
    padding = kernel // 2 if padding is None else padding
    if padding < 0:
        raise ValueError(f"padding must be ≥ 0, not {padding}")
    if pad_bit not in (0, 1):
        raise ValueError(f"pad_bit must be 0 or 1, not {pad_bit!r}")
    if kernel > min(hw) + 2 * padding:
        raise ValueError(f"kernel {kernel} is larger than the padded {hw[0]}×{hw[1]} input")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, cin, *hw)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(cout, cin, kernel, kernel)))
    k = cin * kernel * kernel
    spread = max(2, int(np.sqrt(k)))
    t = torch.from_numpy(np.clip(rng.integers(k // 2 - spread, k // 2 + spread + 1,
                                              size=(cout, 1)), 0, k + 1))
    layer = golden.BinaryConvLayer(w, t, stride=stride, padding=padding,
                                   pad_value=1 if pad_bit else -1, pool=pool)
    return LayerCase(x, layer, name=f"random seed {seed}")


def random_case_v2(*, cin: int, cout: int, hw: tuple[int, int], kernel: int, stride: int = 1,
                   padding: int | None = None, seed: int = 0,
                   pool: tuple[int, int] | None = None, in_bits: int = 1, out_bits: int = 1,
                   shortcut_bits: int = 0, pad_level: int = 0) -> LayerCase:
    """A random contract-2 layer: input levels of ``in_bits`` bits, ±1 weights, sorted
    rows of ``2**out_bits − 1`` thresholds (one row per shortcut level) spread over
    ``0 … (2**in_bits − 1)·K + 1`` so that every level occurs, padding at ``pad_level``
    and, with ``shortcut_bits``, a random shortcut map of the conv output's shape."""
    _check_geometry(cin, cout, hw, kernel, stride)
    for name, value, low in (("in_bits", in_bits, 1), ("out_bits", out_bits, 1),
                             ("shortcut_bits", shortcut_bits, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 4:
            raise ValueError(f"{name} must be an integer in {low} … 4, not {value!r}")
    padding = kernel // 2 if padding is None else padding
    if padding < 0:
        raise ValueError(f"padding must be ≥ 0, not {padding}")
    if isinstance(pad_level, bool) or not isinstance(pad_level, int) \
            or not 0 <= pad_level < 1 << in_bits:
        raise ValueError(f"pad_level must be a {in_bits}-bit level, not {pad_level!r}")
    if kernel > min(hw) + 2 * padding:
        raise ValueError(f"kernel {kernel} is larger than the padded {hw[0]}×{hw[1]} input")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 1 << in_bits, size=(1, cin, *hw), dtype=np.int32))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(cout, cin, kernel, kernel)))
    amax = ((1 << in_bits) - 1) * cin * kernel * kernel
    rows, levels = 1 << shortcut_bits, (1 << out_bits) - 1
    centre = amax / 2
    spread = max(2.0, amax / 4)
    t = np.sort(rng.normal(centre, spread, size=(cout, rows, levels)), axis=-1)
    t = torch.from_numpy(np.clip(np.rint(t), 0, amax + 1).astype(np.int64))
    layer = golden.BinaryConvLayer(
        w, t if shortcut_bits else t[:, 0], stride=stride, padding=padding, pool=pool,
        in_bits=in_bits, pad_level=pad_level, shortcut_bits=shortcut_bits,
        pad_value=2 * pad_level - 1 if in_bits == 1 else -1)
    shortcut = None
    if shortcut_bits:
        oh, ow = (output_size(v, kernel, stride, padding) for v in hw)
        shortcut = torch.from_numpy(rng.integers(0, rows, size=(1, cout, oh, ow),
                                                 dtype=np.int32))
    return LayerCase(x, layer, name=f"random seed {seed}", shortcut=shortcut)


def _check_geometry(cin, cout, hw, kernel, stride) -> None:
    for name, value in (("cin", cin), ("cout", cout), ("kernel", kernel), ("stride", stride),
                        ("height", hw[0]), ("width", hw[1])):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")


def bundle_case(path, index: int, *, seed: int = 0) -> LayerCase:
    """Binary layer ``index`` of a bundle (with its max-pool, if any), on a random ±1
    input of its input shape."""
    from bitdet.core.bundle import BundleError, load
    bundle = load(path)
    if bundle.uses_v2():
        return _graph_case(bundle, path, index, seed)
    layers = bundle.binary_layers
    if not 0 <= index < len(layers):
        raise BundleError(f"{path}: --layer must be in 0 … {len(layers) - 1}, not {index}")
    layer = layers[index]
    if layer.in_bits != 1 or layer.shortcut_bits:
        what = (f"reads {layer.in_bits}-bit maps" if layer.in_bits != 1 else
                f"adds a {layer.shortcut_bits}-bit shortcut")
        raise BundleError(f"{path}: binary layer {index} {what}; the device's layer runs "
                          "1-bit maps without shortcuts (contract v1)")
    if layer.thresholds is None or layer.output_bits != 1:
        what = "raw P" if layer.thresholds is None else f"{layer.output_bits}-bit outputs"
        raise BundleError(f"{path}: binary layer {index} has {what}; the device's layer "
                          "runs 1-bit layers (READ_RESULTS is not implemented)")
    c, _, kh, kw, (h, w), _ = bundle.layer_shapes()[index]
    if kh != kw:
        raise BundleError(f"{path}: binary layer {index} has a {kh}×{kw} kernel; the device "
                          "runs square kernels")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, c, h, w)))
    return LayerCase(x, layer, name=f"{path} layer {index} ({bundle.layer_names[index]})")


def _graph_case(bundle, path, index: int, seed: int) -> LayerCase:
    """Conv node ``index`` of a format-2 (graph) bundle: the graph run on random input
    levels gives the node's input map and its shortcut map (the data that reaches it)."""
    from bitdet.core.bundle import BundleError
    convs = [n for n in bundle.nodes() if isinstance(n.op, golden.BinaryConvLayer)]
    if not 0 <= index < len(convs):
        raise BundleError(f"{path}: --layer must be in 0 … {len(convs) - 1} (the graph's "
                          f"convolutions), not {index}")
    node = convs[index]
    if node.op.thresholds is None:
        raise BundleError(f"{path}: conv {node.name!r} outputs raw A, which runs on the "
                          "host (READ_RESULTS is not implemented)")
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, 1 << bundle.input_bits,
                                      size=(1, *bundle.input_shape), dtype=np.int32))
    maps = bundle.run_graph(x)
    source = x if node.input == "input" else maps[node.input]
    shortcut = None
    if node.shortcut is not None:
        shortcut = x if node.shortcut == "input" else maps[node.shortcut]
    return LayerCase(source.to(torch.int32), node.op,
                     name=f"{path} conv {index} ({node.name})", shortcut=shortcut)


def load_case(host: LinkHost, config, case: LayerCase, *, input_base: int = 0,
              output_base: int = 0, weight_base: int = 0, threshold_base: int = 0,
              load_input: bool = True) -> dict:
    """Write the case's weights, thresholds (and input) and configure the layer.

    Returns the descriptor. Raises ``ValueError`` (from the controller's host-side check)
    if the layer does not fit the config.
    """
    from bitdet.core.protocol import threshold_entry_bytes, weight_entry_bytes
    from bitdet.hw.controller import LayerController
    simd, cols = config.simd, config.cols
    layer = case.layer
    k = layer.k
    desc = LayerController(config=config).descriptor(
        case.window(), case.out_channels, input_base=input_base, output_base=output_base,
        weight_base=weight_base, threshold_base=threshold_base)
    if load_input:
        host.write_memory(Opcode.WRITE_ACTIVATIONS, input_base,
                          pack_activations(case.x, word_bits=simd)[0].tobytes(), simd // 8)
    host.write_memory(Opcode.WRITE_WEIGHTS, weight_base,
                      encode_weights(pack_weights(layer.weights, word_bits=simd, cols=cols)),
                      weight_entry_bytes(simd, cols))
    host.write_memory(Opcode.WRITE_THRESHOLDS, threshold_base, encode_thresholds(
        pack_thresholds(layer.thresholds, k, cols=cols),
        threshold_width=config.threshold_width,
        thresholds_per_channel=config.thresholds_per_channel),
        threshold_entry_bytes(config.threshold_width, config.thresholds_per_channel, cols))
    host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc))
    return desc


def expected_map(case: LayerCase, word_bits: int, x: torch.Tensor | None = None) -> np.ndarray:
    """Packed golden output ``H×W×bytes`` of the case (on ``x`` if given)."""
    bits = golden.run_layer(case.x if x is None else x, case.layer)
    return pack_activations(bits.to(torch.float32) * 2 - 1, word_bits=word_bits)[0]


def compare_maps(got: bytes, expected: np.ndarray) -> dict:
    """Bitwise comparison of a read-back map with the packed golden one (``H×W×bytes``)."""
    h, w, nbytes = expected.shape
    got_arr = np.frombuffer(got, dtype=np.uint8)
    if got_arr.size != expected.size:
        return {"match": False, "mismatches": None,
                "first_mismatch": f"read {got_arr.size} bytes, expected {expected.size}"}
    diff = np.unpackbits(got_arr.reshape(h, w, nbytes) ^ expected, axis=-1, bitorder="little")
    where = np.argwhere(diff)
    result = {"match": not where.size, "mismatches": int(where.shape[0])}
    if where.size:
        y, x, channel = (int(v) for v in where[0])
        result["first_mismatch"] = {"y": y, "x": x, "channel": channel}
    return result


def run_case(link, config, case: LayerCase, *, input_base: int = 0, output_base: int = 0,
             weight_base: int = 0, threshold_base: int = 0, timeout: float | None = None
             ) -> dict:
    """Load, configure, run and read back ``case`` through ``link``; compare with golden.

    Returns ``match``, ``mismatches``, ``first_mismatch`` (when not matching),
    ``cycles`` (busy, from RUN_LAYER), ``stall_cycles``, ``ideal_cycles``,
    ``utilization`` (ideal / busy), and the link bytes each way. A layer with a max-pool
    runs a pool pass after the convolution (its counters: ``pool_cycles``,
    ``pool_stall_cycles``) and the pooled map is compared.
    """
    if config.contract == 2:
        return run_case_v2(link, config, case, timeout=timeout)
    if case.contract2:
        raise ValueError(f"the case {case.shape()} needs a contract-2 build; config "
                         f"{config.name!r} is contract 1")
    from bitdet.hw.controller import LayerController
    ctrl = LayerController(config=config)
    window = case.window()
    ideal = ctrl.ideal_cycles(window, case.out_channels)
    # the RTL simulation runs at ≳ 20 k cycles/s even with a Python step per cycle
    run_timeout = timeout if timeout is not None else 60 + 4 * ideal / 20000
    host = LinkHost(link, timeout=run_timeout)
    written, read = getattr(link, "bytes_written", 0), getattr(link, "bytes_read", 0)
    load_case(host, config, case, input_base=input_base, output_base=output_base,
              weight_base=weight_base, threshold_base=threshold_base)
    busy, stall = decode_counters(host.command(Opcode.RUN_LAYER))
    out_h, out_w, read_base = window.out_h, window.out_w, output_base
    pool_counters = None
    if case.layer.pool is not None:
        # a pool pass reads the conv's output (now in the bank the next layer reads) and
        # writes the other bank, at the conv's input base
        from bitdet.hw.pool import PoolEngine
        kernel, stride = case.layer.pool
        pool_desc = PoolEngine(config=config).descriptor(
            in_h=out_h, in_w=out_w, channels=case.out_channels, kernel=kernel, stride=stride,
            input_base=output_base, output_base=input_base)
        host.command(Opcode.CONFIGURE_LAYER, encode_layer(**pool_desc))
        pool_counters = decode_counters(host.command(Opcode.RUN_LAYER))
        out_h, out_w, read_base = pool_desc["out_h"], pool_desc["out_w"], input_base
    expected = expected_map(case, config.simd)
    words = out_h * out_w * -(-case.out_channels // config.simd)
    got = host.read_activations(read_base, words, config.simd // 8)
    result = compare_maps(got, expected)
    result.update({"cycles": busy, "stall_cycles": stall, "ideal_cycles": ideal,
                   "utilization": round(ideal / busy, 4) if busy else None})
    if pool_counters is not None:
        result["pool_cycles"], result["pool_stall_cycles"] = pool_counters
    result.update({"link_bytes_in": getattr(link, "bytes_written", 0) - written,
                   "link_bytes_out": getattr(link, "bytes_read", 0) - read})
    return result


#: Map slots of a contract-2 case: the input, the conv's output, the shortcut; a pool
#: pass writes the input's slot (no longer needed).
V2_SLOTS = {"input": 0, "output": 1, "shortcut": 2}


def case_descriptors(config, case: LayerCase) -> list:
    """The extended descriptors of a contract-2 case: the conv (slots :data:`V2_SLOTS`,
    bases 0) and, with a pool, the pool pass from the conv's slot into the input's.

    Raises
    ------
    ValueError
        One line naming every problem if a pass does not fit ``config``
        (:meth:`~bitdet.core.descriptor.LayerDescriptor.problems`).
    """
    from bitdet.core.descriptor import LayerDescriptor
    layer = case.layer
    _, c, h, w = case.x.shape
    shortcut = layer.shortcut_bits
    conv = LayerDescriptor.conv(
        in_h=int(h), in_w=int(w), channels=int(c), out_channels=case.out_channels,
        kernel=case.kernel, stride=layer.stride, padding=layer.padding).replace(
        in_bits=layer.in_bits, out_bits=layer.output_bits, shortcut_bits=shortcut,
        pad_level=layer.padding_level, input_slot=V2_SLOTS["input"],
        output_slot=V2_SLOTS["output"],
        shortcut_slot=V2_SLOTS["shortcut"] if shortcut else 0, extended=True)
    passes = [conv]
    if layer.pool is not None:
        passes.append(LayerDescriptor.pool_pass(
            in_h=conv.out_h, in_w=conv.out_w, channels=case.out_channels,
            kernel=layer.pool[0], stride=layer.pool[1], in_bits=conv.out_bits,
            out_bits=conv.out_bits, input_slot=V2_SLOTS["output"],
            output_slot=V2_SLOTS["input"]))
    problems = [f"{d.kind}: {p}" for d in passes for p in d.problems(config)]
    if problems:
        raise ValueError(f"layer {case.shape()} does not fit {config.name}: "
                         + "; ".join(problems))
    return passes


def run_case_v2(link, config, case: LayerCase, *, timeout: float | None = None) -> dict:
    """:func:`run_case` on a contract-2 build: the input levels' planes into slot 0, the
    shortcut's into slot 2, the weights and the threshold rows
    (:func:`bitdet.sw.driver.device.layer_payloads`), extended descriptors, RUN_LAYER per
    pass, and the output planes read back and compared with
    :func:`bitdet.core.golden.run_layer`, bit for bit. Adds ``cycles_match``: the counters
    of every pass equal :func:`bitdet.core.cycles.pass_cycles` (the cycle model)."""
    from bitdet.core.cycles import ideal_cycles, pass_cycles
    from bitdet.core.protocol import threshold_entry_bytes, weight_entry_bytes
    from bitdet.sw.driver.device import layer_payloads
    passes = case_descriptors(config, case)
    conv = passes[0]
    simd, depth, wbytes = config.simd, config.activation_depth, config.simd // 8
    ideal = ideal_cycles(config, dict(conv))
    run_timeout = timeout if timeout is not None else 60 + 4 * ideal / 20000
    host = LinkHost(link, timeout=run_timeout)
    written, read = getattr(link, "bytes_written", 0), getattr(link, "bytes_read", 0)
    layer = case.layer
    x = case.x if not case.x.dtype.is_floating_point else ((case.x + 1) // 2).to(torch.int32)
    host.write_memory(Opcode.WRITE_ACTIVATIONS, V2_SLOTS["input"] * depth,
                      pack_levels(x, layer.in_bits, word_bits=simd).tobytes(), wbytes)
    if layer.shortcut_bits:
        host.write_memory(Opcode.WRITE_ACTIVATIONS, V2_SLOTS["shortcut"] * depth,
                          pack_levels(case.shortcut, layer.shortcut_bits,
                                      word_bits=simd).tobytes(), wbytes)
    weights, thresholds = layer_payloads(config, layer)
    host.write_memory(Opcode.WRITE_WEIGHTS, 0, weights, weight_entry_bytes(simd, config.cols))
    host.write_memory(Opcode.WRITE_THRESHOLDS, 0, thresholds, threshold_entry_bytes(
        config.threshold_width, config.thresholds_per_channel, config.cols))
    counters = []
    for d in passes:
        host.command(Opcode.CONFIGURE_LAYER, d.encode())
        counters.append(decode_counters(host.command(Opcode.RUN_LAYER)))
    last = passes[-1]
    expected = golden.run_layer(x, layer, case.shortcut)
    planes = pack_levels(expected, conv.out_bits, word_bits=simd)     # m, 1, H, W, bytes
    got = host.read_activations(last.output_slot * depth,
                                conv.out_bits * last.map_words(simd), wbytes)
    result = compare_levels(got, planes)
    busy, stall = counters[0]
    result.update({"cycles": busy, "stall_cycles": stall, "ideal_cycles": ideal,
                   "utilization": round(ideal / busy, 4) if busy else None,
                   "model_cycles": list(pass_cycles(config, dict(conv))),
                   "cycles_match": all(tuple(got_c) == pass_cycles(config, dict(d))
                                       for got_c, d in zip(counters, passes, strict=True))})
    if len(passes) > 1:
        result["pool_cycles"], result["pool_stall_cycles"] = counters[1]
    result.update({"link_bytes_in": getattr(link, "bytes_written", 0) - written,
                   "link_bytes_out": getattr(link, "bytes_read", 0) - read})
    return result


def compare_levels(got: bytes, planes: np.ndarray) -> dict:
    """Bitwise comparison of read-back planes with :func:`pack_levels`' ``m×1×H×W×bytes``
    (the first mismatch names its plane, pixel and channel)."""
    m, _, h, w, nbytes = planes.shape
    got_arr = np.frombuffer(got, dtype=np.uint8)
    if got_arr.size != planes.size:
        return {"match": False, "mismatches": None,
                "first_mismatch": f"read {got_arr.size} bytes, expected {planes.size}"}
    diff = np.unpackbits(got_arr.reshape(m, h, w, nbytes) ^ planes[:, 0], axis=-1,
                         bitorder="little")
    where = np.argwhere(diff)
    result = {"match": not where.size, "mismatches": int(where.shape[0])}
    if where.size:
        b, y, x, channel = (int(v) for v in where[0])
        result["first_mismatch"] = {"plane": b, "y": y, "x": x, "channel": channel}
    return result


def simulate_layer(config, case: LayerCase, *, simulator: str = "verilator", seed: int = 0,
                   waves: bool = False, work_dir=None, idle: float = 0.0,
                   backpressure: float = 0.0) -> dict:
    """:func:`run_case` on a fresh :class:`~bitdet.sim.link.RtlLink`; adds the shape,
    ``sim_seconds`` (wall time from starting the simulator to its end; Verilog
    generation and a first build excluded),
    ``link_cycles`` (clock cycles simulated) and ``waves`` (the trace, when asked)."""
    from bitdet.hw.controller import LayerController

    from .link import RtlLink
    # the host-side fit check first: a layer that cannot run needs no simulator
    if config.contract == 2:
        case_descriptors(config, case)
    elif case.contract2:
        raise ValueError(f"the case {case.shape()} needs a contract-2 build; config "
                         f"{config.name!r} is contract 1")
    else:
        LayerController(config=config).descriptor(case.window(), case.out_channels)
    link = RtlLink(config, simulator, waves, seed=seed, idle=idle, backpressure=backpressure,
                   work_dir=work_dir)
    try:
        result = run_case(link, config, case)
    finally:
        try:
            cycles = link.close()
        except Exception:
            cycles = None
    result = {"shape": case.shape(), "case": case.name, "simulator": simulator, **result,
              "link_cycles": cycles,
              "sim_seconds": round(time.perf_counter() - link.started, 3)}
    if waves:
        result["waves"] = str(link.waves_path) if link.waves_path else None
    return result
