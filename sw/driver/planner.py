"""Placement of a bundle on a build: device passes, residency, and the fit check.

:func:`plan_bundle` turns a bundle's binary layers into device passes (a convolution per
layer, a pool pass after a pooled one) with their descriptors, and places weights and
thresholds: all resident when they fit, else some streamed through one slot
(:func:`_streamed_set`). :func:`fit_problems_for` says why a bundle cannot run on a
build, one :class:`~bitdet.core.descriptor.FitProblem` per problem: the descriptor's own
checks (:meth:`~bitdet.core.descriptor.LayerDescriptor.problems`, the ones the device
makes at CONFIGURE_LAYER and the host's) on every planned pass, worded per layer, plus
what only a plan knows (a layer's weights alone against the memory it may use, the
resident totals, the layer table, 1-bit outputs). Nothing here talks to a device.

**Contract 2** (``config.contract == 2``: n-bit maps, shortcuts, map slots): every bundle,
a graph (format 2) or a chain (format 1, as its :meth:`~bitdet.core.bundle.Bundle.nodes`),
is planned by :func:`plan_graph` — extended descriptors, one pass per node (and a pool pass
after a pooled conv), every map in a slot of the activation memory from its maker to its
last reader (:class:`MapPlan`), weights and thresholds resident. :func:`plan_bundle`,
:func:`plan_problems` and :func:`fit_problems_for` take that path for a contract-2 config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bitdet.core.descriptor import FitProblem, LayerDescriptor, output_size
from bitdet.core.protocol import (
    LAYER_TABLE_ENTRIES,
    threshold_entry_bytes,
    weight_entry_bytes,
    write_cost,
)

__all__ = ["MODES", "GraphPlan", "LayerPlan", "MapPlan", "contract_v2_problems",
           "device_layer_count", "fit_problems_for", "plan_bundle", "plan_graph",
           "plan_problems"]

CONTRACT_2_HINT = ("contract 1; a contract-2 build runs it, e.g. the 'contract2' preset on "
                   "the emulator")
"""What every refusal of a contract-v2 bundle by a contract-1 build adds."""


def contract_v2_problems(bundle) -> list[FitProblem]:
    """What a contract-v2 bundle (bundle format 2: a graph, n-bit maps, shortcuts) asks of
    the accelerator that this build does not have, one problem per node and feature. The
    accelerator runs chains of layers over 1-bit maps (contract 1); empty for such a
    bundle. Each message ends by naming what runs it (:data:`CONTRACT_2_HINT`)."""
    if not bundle.uses_v2():
        return []
    from bitdet.core.golden import BinaryConvLayer, ChannelRepeat
    out = []
    if bundle.input_bits > 1:
        out.append(FitProblem("input_bits", "1", bundle.input_bits,
                              f"the bundle's input map has {bundle.input_bits}-bit levels, "
                              "the accelerator reads 1-bit maps"))
    for node in bundle.nodes():
        op, name = node.op, node.name
        if isinstance(op, BinaryConvLayer):
            if op.in_bits > 1:
                out.append(FitProblem("in_bits", "1", op.in_bits,
                                      f"layer {name!r} reads {op.in_bits}-bit maps, the "
                                      "accelerator reads 1-bit maps"))
            if op.shortcut_bits:
                out.append(FitProblem("shortcut_bits", "0", op.shortcut_bits,
                                      f"layer {name!r} adds a {op.shortcut_bits}-bit shortcut "
                                      f"from {node.shortcut!r}, the accelerator has no "
                                      "shortcut path"))
        elif isinstance(op, ChannelRepeat):
            out.append(FitProblem("op", "conv or pool", 0, f"node {name!r} repeats channels, "
                                  "the accelerator has no channel repetition"))
    if not out:
        out.append(FitProblem("graph", "a chain", 0, "the bundle is a graph of named nodes "
                              "(bundle format 2), the accelerator runs chains of layers"))
    return [FitProblem(p.field, p.limit, p.value, f"{p.message} ({CONTRACT_2_HINT})")
            for p in out]


@dataclass
class LayerPlan:
    """One pass on the device: a conv layer of the bundle or the pool pass after it.

    ``residency`` is ``"resident"`` (a conv whose weights and thresholds are written once by
    :meth:`Device.load`), ``"streamed"`` (a conv whose weights and thresholds are written
    into the streaming slot before each run of it) or ``""`` (a pool pass, no weights).
    ``weight_words`` (per column) and ``threshold_entries`` are the conv's memory use;
    ``stream_bytes`` the host → device bytes of its WRITE_WEIGHTS / WRITE_THRESHOLDS
    frames (framing included), sent once at load when resident, per frame when streamed.

    A contract-2 pass (:func:`plan_graph`) also names its graph ``node``, the maps it
    ``reads`` (its input, then a conv's shortcut) and the map it ``writes``
    (:class:`MapPlan` names); its descriptor is extended (``"repeat"`` passes too).
    """

    name: str
    kind: str                                  # "conv", "pool" (or "repeat": contract 2)
    descriptor: dict
    in_shape: tuple[int, int, int]             # C, H, W
    out_shape: tuple[int, int, int]
    layer: object = None                       # the BinaryConvLayer of a conv pass
    residency: str = ""
    weight_words: int = 0
    threshold_entries: int = 0
    stream_bytes: int = 0
    node: str = ""                             # contract 2: the graph node of the pass
    reads: tuple = ()                          # contract 2: maps read (input, shortcut)
    writes: str = ""                           # contract 2: the map written


MODES = ("auto", "resident", "streamed")
"""Residency modes of :meth:`Device.load`: ``auto`` (resident if everything fits, else
streamed), ``resident`` (refuse a bundle that does not fit resident), ``streamed`` (every
conv layer through the streaming slot)."""

_SEARCH_LAYERS = 12
"""Up to this many conv layers the streamed plan is the best of all subsets; beyond, every
conv layer is streamed."""


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
    (:func:`fit_problems_for`).

    Raises
    ------
    ValueError
        For a contract-v2 bundle (:func:`contract_v2_problems`), which has no such plan.

    A contract-2 config (``config.contract == 2``) gets :func:`plan_graph`'s passes.
    """
    if getattr(config, "contract", 1) == 2:
        return plan_graph(config, bundle, weight_depth=weight_depth,
                          threshold_depth=threshold_depth).passes
    v2 = contract_v2_problems(bundle)
    if v2:
        raise ValueError("; ".join(p.message for p in v2))
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
                              stream_bytes=write_cost(words * w_entry, w_entry)
                              + write_cost(tiles * t_entry, t_entry)))
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


#: Descriptor fields whose problems the plan words per layer itself (the maps, by words
#: of each map; the weights and thresholds, against the memory the plan may use).
_MAP_FIELDS = frozenset({"in_h", "in_w", "out_h", "out_w", "input_base", "output_base"})
_MEMORY_FIELDS = frozenset({"weight_base", "threshold_base"})


def fit_problems_for(config, bundle, *, mode: str = "auto", weight_depth: int | None = None,
                     threshold_depth: int | None = None) -> list[str]:
    """Why ``bundle`` cannot run on a device built from ``config``: the messages of
    :func:`plan_problems` (empty if it can)."""
    return [p.message for p in plan_problems(config, bundle, mode=mode,
                                             weight_depth=weight_depth,
                                             threshold_depth=threshold_depth)]


def plan_problems(config, bundle, *, mode: str = "auto", weight_depth: int | None = None,  # noqa: C901
                  threshold_depth: int | None = None) -> list[FitProblem]:
    """Why ``bundle`` cannot run on a device built from ``config``, one
    :class:`~bitdet.core.descriptor.FitProblem` per problem, its message naming the layer,
    the quantity and the limit.

    Every planned pass's descriptor is checked with
    :meth:`~bitdet.core.descriptor.LayerDescriptor.problems`: channels, ``K`` (the
    accumulator), kernel, stride, padding, the pool engine's kernel and stride, and the
    maps (input of the first layer, the map before a pool, the output), which are worded
    by their words per map. The plan adds what a single descriptor cannot tell: a
    layer's own weights and thresholds against the memory the plan may use
    (``weight_depth`` / ``threshold_depth``; when streamed), the resident totals (with
    ``mode="resident"``; streaming lifts them otherwise), 1-bit thresholded outputs,
    square kernels and the layer table's size. The config's summary check
    (:meth:`~bitdet.core.config.AcceleratorConfig.fit_problems`) says nothing these do
    not, for the layers the device runs.

    A contract-2 config gets the graph plan's problems (:func:`plan_graph`): bits beyond
    the build, more maps live at once than map slots, a map beyond a slot, weights or
    thresholds beyond their memories (every layer resident), the layer table, and every
    pass's descriptor problems, each naming the node and the limit."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if getattr(config, "contract", 1) == 2:
        return _graph_problems(config, bundle, mode, weight_depth, threshold_depth)
    v2 = contract_v2_problems(bundle)
    if v2:                     # not a chain of 1-bit layers: there is nothing to plan
        return v2
    c = config
    depth_w, depth_t = _memory_limits(c, weight_depth, threshold_depth)
    problems: list[FitProblem] = []

    def add(field, limit, value, message):
        problems.append(FitProblem(field, str(limit), int(value), message))

    plan = plan_bundle(c, bundle, mode=mode, weight_depth=depth_w, threshold_depth=depth_t)
    convs = [p for p in plan if p.kind == "conv"]
    w_limit = (f"weight_depth is {depth_w}" if depth_w == c.weight_depth else
               f"the plan may use {depth_w} of weight_depth {c.weight_depth}")
    t_limit = (f"threshold_depth is {depth_t}" if depth_t == c.threshold_depth else
               f"the plan may use {depth_t} of threshold_depth {c.threshold_depth}")
    pooled = {plan[i - 1].name: p for i, p in enumerate(plan) if p.kind == "pool"}
    on_device = device_layer_count(bundle)
    if not on_device:
        add("layers", "a thresholded layer", 0,
            f"the bundle's only binary layer ({bundle.layer_names[0]!r}) outputs raw P, "
            "which the host runs: nothing is left for the device")
    shapes = bundle.layer_shapes()
    for i, (entry, layer, name) in enumerate(zip(convs, bundle.binary_layers[:on_device],
                                                 bundle.layer_names[:on_device],
                                                 strict=True)):
        d = entry.descriptor
        ch, o, k = d["channels"], d["out_channels"], d["kernel"]
        found = _descriptor_problems(d, c, name, add)
        if {"channels", "out_channels"} & found.keys():
            add("channels", f"max_channels = {c.max_channels}", max(ch, o),
                f"layer {name!r} has {ch} input and {o} output channels, "
                f"max_channels is {c.max_channels}")
        if "K" in found:
            add("K", f"max_k = {c.max_k}", found["K"].value,
                f"layer {name!r} has K = C·kh·kw = {found['K'].value}, max_k (the "
                f"{c.acc_width}-bit accumulator) is {c.max_k}")
        if "padding" in found:
            add("padding", f"max_kernel − 1 = {c.max_kernel - 1}", layer.padding,
                f"layer {name!r} has padding {layer.padding}, the device allows up to "
                f"{c.max_kernel - 1}")
        for field in ("kernel", "stride"):
            if field in found:
                add(field, found[field].limit, found[field].value,
                    f"layer {name!r}: {found[field].message}")
        kw = shapes[i][3]
        if kw != k:
            add("kernel", "square", kw, f"layer {name!r} has a {k}×{kw} kernel, the device "
                "runs square kernels")
        conv = LayerDescriptor(**d) if not found.get("_invalid") else None
        maps = []
        if entry is convs[0] and conv is not None:
            maps.append(("input map", conv.map_words(c.simd, output=False)))
        if name in pooled:
            maps.append(("map before its pool", _map_words(entry.out_shape, c.simd)))
            maps.append(("output map", _map_words(pooled[name].out_shape, c.simd)))
            pool_found = _descriptor_problems(pooled[name].descriptor, c, name, add)
            if {"kernel", "stride"} & pool_found.keys():
                add("pool", f"pool kernel ≤ {c.pool_max_kernel}", max(layer.pool),
                    f"layer {name!r} pools {layer.pool[0]}×{layer.pool[0]} / "
                    f"{layer.pool[1]}, the pool engine allows up to {c.pool_max_kernel}")
        else:
            maps.append(("output map", _map_words(entry.out_shape, c.simd)))
        for what, words in maps:
            if words > c.activation_depth:
                add("activation_depth", f"activation_depth = {c.activation_depth}", words,
                    f"layer {name!r}'s {what} needs {words} words, activation_depth is "
                    f"{c.activation_depth}")
        if mode != "resident":
            if entry.weight_words > depth_w:
                add("weight_depth", w_limit, entry.weight_words,
                    f"layer {name!r}'s weights alone need {entry.weight_words} words per "
                    f"column, {w_limit}")
            if entry.threshold_entries > depth_t:
                add("threshold_depth", t_limit, entry.threshold_entries,
                    f"layer {name!r}'s thresholds alone need {entry.threshold_entries} "
                    f"entries per column, {t_limit}")
        if layer.output_bits != 1:
            add("output_bits", "1", layer.output_bits or 0,
                f"layer {name!r} outputs {layer.output_bits} bits: the layer controller "
                f"thresholds to 1 bit")
    if mode == "resident":
        total_w = sum(p.weight_words for p in convs)
        total_t = sum(p.threshold_entries for p in convs)
        if total_w > depth_w:
            add("weight_depth", w_limit, total_w,
                f"resident weights need {total_w} words per column, {w_limit}")
        if total_t > depth_t:
            add("threshold_depth", t_limit, total_t,
                f"resident thresholds need {total_t} entries per column, {t_limit}")
    if len(plan) > LAYER_TABLE_ENTRIES:
        add("passes", f"{LAYER_TABLE_ENTRIES} layer table entries", len(plan),
            f"the network needs {len(plan)} device passes (convs and pools), the layer "
            f"table holds {LAYER_TABLE_ENTRIES}")
    return problems


def _map_words(shape, simd: int) -> int:
    ch, h, w = shape
    return h * w * -(-ch // simd)


def _descriptor_problems(descriptor: dict, config, name: str, add) -> dict:
    """The descriptor's problems by field, less those the plan words itself (maps,
    memories); problems of other fields are added as they are, naming the layer."""
    try:
        d = LayerDescriptor(**descriptor)
    except ValueError as e:                       # a size beyond the descriptor's fields
        add("descriptor", "the descriptor's field widths", 0,
            f"layer {name!r} cannot be described to the device: {e}")
        return {"_invalid": True}
    found = {}
    worded = {"channels", "out_channels", "K", "padding", "kernel", "stride"}
    for problem in d.problems(config):
        if problem.field in _MAP_FIELDS or problem.field in _MEMORY_FIELDS:
            continue
        if problem.field in worded:
            found.setdefault(problem.field, problem)
            continue
        if problem.field not in found:
            found[problem.field] = problem
            add(problem.field, problem.limit, problem.value, f"layer {name!r}: {problem}")
    return found



# -- contract 2: graphs, n-bit maps, map slots ------------------------------------------------

@dataclass
class MapPlan:
    """One activation map of a contract-2 plan (:func:`plan_graph`): where it lives and for
    how long.

    ``level_bits`` are the bits of its levels, ``bits`` the planes stored: more where a
    reader reads more (a conv's ``in_bits`` or ``shortcut_bits`` beyond the map's; the
    extra planes hold 0). The map takes ``slot`` from pass ``born`` (−1: the host writes
    it before the run) through pass ``last``, its last reader (``len(passes)``: the host
    reads it after the run; ``born`` when nothing reads it); it starts at word 0 of the
    slot (flat address ``slot · activation_depth``), plane ``b`` at ``b · plane_words``.
    ``node`` is the node whose map it is (``"input"`` for the network input);
    ``before_pool`` marks a pooled conv's map before its pool pass.
    """

    name: str
    shape: tuple[int, int, int]                # C, H, W
    level_bits: int
    bits: int
    node: str
    before_pool: bool = False
    born: int = -1
    last: int = -1
    slot: int = 0

    def plane_words(self, simd: int) -> int:
        """Activation words of one plane: a ``simd``-bit word per pixel and channel group."""
        return _map_words(self.shape, simd)

    def words(self, simd: int) -> int:
        """Activation words of all its planes."""
        return self.bits * self.plane_words(simd)

    def describe(self) -> str:
        """The map in a message: ``"the input map"``, ``"node 'x''s map"``, ..."""
        if self.node == "input":
            return "the input map"
        if self.before_pool:
            return f"layer {self.node!r}'s map before its pool"
        return f"node {self.node!r}'s map"


@dataclass
class GraphPlan:
    """A bundle on a contract-2 build (:func:`plan_graph`).

    Members
    -------
    passes : list of LayerPlan
        The device passes in order (the layer table): a conv per conv node (and a pool pass
        after a pooled one), a pool pass per pool node, a repeat pass per repeat node.
    maps : dict of MapPlan
        Every map by name: ``"input"``, each node's (its name) and a pooled conv's map
        before its pool.
    host_map : str
        The map the host reads after the run: the last node's, or the input of a raw last
        conv.
    host_layer : str or None
        The raw (thresholds None) last conv the host runs on ``host_map``.
    slots : int
        The config's ``activation_slots``.
    overflow : list of FitProblem
        Passes that found no free slot (given the slots after the last, which no build has).
    """

    passes: list[LayerPlan]
    maps: dict[str, MapPlan]
    host_map: str
    host_layer: str | None
    slots: int
    overflow: list[FitProblem] = dataclasses.field(default_factory=list)

    @property
    def slots_used(self) -> int:
        """Map slots the plan uses (the highest slot + 1)."""
        return 1 + max(m.slot for m in self.maps.values())

    def node_maps(self) -> list[str]:
        """The maps of the nodes the device runs, in node order."""
        return [m.name for m in self.maps.values() if m.node != "input" and not m.before_pool]


def _device_nodes(nodes: list) -> list:
    """The nodes the device runs: all, or all but a raw last conv (the host runs it)."""
    last = nodes[-1].op if nodes else None
    return nodes[:-1] if getattr(last, "thresholds", 0) is None else nodes


def _stored_bits(nodes: list, bits: dict) -> dict:
    """Planes to store per map: its bits, or more where a reader reads more planes (a
    conv's ``in_bits`` / ``shortcut_bits``; what a pool or repeat pass passes on)."""
    from bitdet.core.golden import BinaryConvLayer
    need = dict(bits)
    for node in reversed(nodes):           # every reader of a node comes after it
        op = node.op
        if isinstance(op, BinaryConvLayer):
            need[node.input] = max(need[node.input], op.in_bits)
            if node.shortcut is not None:
                need[node.shortcut] = max(need[node.shortcut], op.shortcut_bits)
        else:
            need[node.input] = max(need[node.input], need[node.name])
    return need


def _extended(**fields) -> dict:
    """An extended descriptor's fields (the rest 0, slots filled in later)."""
    d = dict(padding=0, pad_bit=0, raw=0, pool=0, input_base=0, output_base=0, weight_base=0,
             threshold_base=0, shortcut_bits=0, pad_level=0, repeat=0, input_slot=0,
             output_slot=0, shortcut_slot=0, shortcut_base=0, extended=True)
    d.update(fields)
    return d


def _unique(name: str, maps: dict) -> str:
    while name in maps:
        name += "'"
    return name


def _conv_passes(config, node, maps: dict, stored: dict) -> list[LayerPlan]:
    """The conv pass of a conv node (and the pool pass of a pooled one)."""
    c, layer = config, node.op
    ch, h, w = maps[node.input].shape
    o, _c, k, _kw = layer.weights.shape
    oh = output_size(h, k, layer.stride, layer.padding)
    ow = output_size(w, k, layer.stride, layer.padding)
    bits = stored[node.name]
    d = _extended(in_h=h, in_w=w, channels=ch, out_h=oh, out_w=ow, out_channels=o, kernel=k,
                  stride=layer.stride, padding=layer.padding, in_bits=layer.in_bits,
                  out_bits=bits, shortcut_bits=layer.shortcut_bits,
                  pad_level=layer.padding_level)
    tiles = -(-o // c.cols)
    words = tiles * k * k * -(-ch // c.simd)
    entries = tiles << layer.shortcut_bits
    w_entry = weight_entry_bytes(c.simd, c.cols)
    t_entry = threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel, c.cols)
    conv_map = node.name if layer.pool is None else _unique(f"{node.name}.conv", maps)
    reads = (node.input,) if node.shortcut is None else (node.input, node.shortcut)
    out = [LayerPlan(node.name, "conv", d, (ch, h, w), (o, oh, ow), layer, "resident", words,
                     entries, write_cost(words * w_entry, w_entry)
                     + write_cost(entries * t_entry, t_entry),
                     node=node.name, reads=reads, writes=conv_map)]
    maps[conv_map] = MapPlan(conv_map, (o, oh, ow), layer.output_bits, bits, node.name,
                             before_pool=layer.pool is not None)
    if layer.pool is not None:
        pk, ps = layer.pool
        ph, pw = output_size(oh, pk, ps), output_size(ow, pk, ps)
        d = _extended(in_h=oh, in_w=ow, channels=o, out_h=ph, out_w=pw, out_channels=o,
                      kernel=pk, stride=ps, pool=1, in_bits=bits, out_bits=bits)
        out.append(LayerPlan(f"{node.name}.pool", "pool", d, (o, oh, ow), (o, ph, pw),
                             node=node.name, reads=(conv_map,), writes=node.name))
        maps[node.name] = MapPlan(node.name, (o, ph, pw), layer.output_bits, bits, node.name)
    return out


def _node_passes(config, node, maps: dict, stored: dict) -> list[LayerPlan]:
    """The passes of one node; adds the maps they write to ``maps``."""
    from bitdet.core.golden import BinaryConvLayer, PoolPass
    if isinstance(node.op, BinaryConvLayer):
        return _conv_passes(config, node, maps, stored)
    source = maps[node.input]
    ch, h, w = source.shape
    bits = stored[node.name]
    if isinstance(node.op, PoolPass):
        k = node.op.kernel
        s = k if node.op.stride is None else node.op.stride
        shape = (ch, output_size(h, k, s), output_size(w, k, s))
        d = _extended(in_h=h, in_w=w, channels=ch, out_h=shape[1], out_w=shape[2],
                      out_channels=ch, kernel=k, stride=s, pool=1, in_bits=bits, out_bits=bits)
        kind = "pool"
    else:
        shape = (node.op.out_channels, h, w)
        d = _extended(in_h=h, in_w=w, channels=ch, out_h=h, out_w=w, out_channels=shape[0],
                      kernel=1, stride=1, repeat=1, in_bits=bits, out_bits=bits)
        kind = "repeat"
    maps[node.name] = MapPlan(node.name, shape, source.level_bits, bits, node.name)
    return [LayerPlan(node.name, kind, d, source.shape, shape, node=node.name,
                      reads=(node.input,), writes=node.name)]


def _assign_slots(passes: list[LayerPlan], maps: dict, slots: int) -> list[FitProblem]:
    """Give every map a slot: each pass writes the lowest slot no live map holds (the maps
    it reads are live); a map frees its slot after its last reader. A pass that finds
    only slots beyond the build's gets one anyway; the first is the problem returned."""
    held = {0: "input"}
    problems = []
    for i, entry in enumerate(passes):
        for slot, name in list(held.items()):
            if maps[name].last < i:
                del held[slot]
        slot = min(set(range(len(held) + 1)) - held.keys())
        if slot >= slots and not problems:
            live = sorted(held.values(), key=lambda name: maps[name].born)
            problems.append(FitProblem(
                "activation_slots", f"activation_slots = {slots}", len(held) + 1,
                f"{_pass_label(entry)} needs a map slot more than the {slots} of "
                f"activation_slots: {len(held) + 1} maps are live at once there "
                f"({', '.join(map(repr, [*live, entry.writes]))})"))
        held[slot] = entry.writes
        maps[entry.writes].slot = slot
    return problems


def plan_graph(config, bundle, *, weight_depth: int | None = None,
               threshold_depth: int | None = None) -> GraphPlan:
    """The device passes of ``bundle`` on a contract-2 build of ``config``
    (:class:`GraphPlan`): a graph bundle (format 2) or a chain (format 1, as its nodes).

    Every pass has an extended descriptor. A conv node is a conv pass (``in_bits``,
    ``shortcut_bits``, ``pad_level`` of the layer; ``out_bits`` the planes its map stores,
    :class:`MapPlan`) and, when pooled, a pool pass after it; a pool node a pool pass, a
    repeat node a repeat pass. A raw (thresholds None) last conv is not planned: the host
    runs it on the map it reads (``host_map``). Each map gets a slot (:func:`_assign_slots`)
    from its maker through its last reader — the map the host reads through the end —,
    at word 0 of the slot. Weights and thresholds are resident, one conv after the other
    from address 0 (``2**shortcut_bits`` threshold entries per tile). Does not check the
    fit (:func:`plan_problems`); ``weight_depth`` / ``threshold_depth`` are checked there.
    """
    _memory_limits(config, weight_depth, threshold_depth)
    nodes = bundle.nodes()
    device = _device_nodes(nodes)
    info = {m[0]: m for m in bundle.requirements().node_maps}     # name, op, C, H, W, bits
    stored = _stored_bits(device, {name: m[5] for name, m in info.items()})
    _n, _op, ch, h, w, bits = info["input"]
    maps = {"input": MapPlan("input", (ch, h, w), bits, stored["input"], "input")}
    passes: list[LayerPlan] = []
    for node in device:
        passes += _node_passes(config, node, maps, stored)
    host_layer = nodes[-1].name if len(device) < len(nodes) else None
    host_map = nodes[-1].input if host_layer else device[-1].name
    for i, entry in enumerate(passes):
        maps[entry.writes].born = maps[entry.writes].last = i
        for name in entry.reads:
            maps[name].last = max(maps[name].last, i)
    maps[host_map].last = len(passes)
    overflow = _assign_slots(passes, maps, config.activation_slots)
    weight_base = threshold_base = 0
    for entry in passes:
        d = entry.descriptor
        d.update(input_slot=maps[entry.reads[0]].slot, output_slot=maps[entry.writes].slot)
        if len(entry.reads) > 1:
            d["shortcut_slot"] = maps[entry.reads[1]].slot
        if entry.kind == "conv":
            d.update(weight_base=weight_base, threshold_base=threshold_base)
            weight_base += entry.weight_words
            threshold_base += entry.threshold_entries
    return GraphPlan(passes, maps, host_map, host_layer, config.activation_slots, overflow)


def _pass_label(entry: LayerPlan) -> str:
    """A pass in a message: ``layer 'c1'``, ``layer 'c1''s pool pass``, ``node 'down' (pool
    pass)``, ``node 'rep' (repeat pass)``."""
    if entry.kind == "conv":
        return f"layer {entry.node!r}"
    if entry.name != entry.node:
        return f"layer {entry.node!r}'s pool pass"
    return f"node {entry.node!r} ({entry.kind} pass)"


#: Descriptor fields whose problems the graph plan words itself (maps and slots per map,
#: weights and thresholds by their totals).
_GRAPH_FIELDS = _MAP_FIELDS | _MEMORY_FIELDS | {"input_slot", "output_slot", "shortcut_slot",
                                                "shortcut_base"}


def _graph_pass_problems(config, entry: LayerPlan, maps: dict, add) -> None:
    """One pass's descriptor problems (:meth:`LayerDescriptor.problems`), naming the pass;
    its bits against the build in words of their own."""
    c, label = config, _pass_label(entry)
    d = dict(entry.descriptor)
    for name in ("input_slot", "output_slot", "shortcut_slot"):   # worded per map instead
        d[name] = min(d[name], 15)
    try:
        desc = LayerDescriptor(**d)
    except ValueError as e:                       # a size beyond the descriptor's fields
        add("descriptor", "the descriptor's field widths", 0,
            f"{label} cannot be described to the device: {e}")
        return
    if entry.kind == "conv" and entry.layer.weights.shape[3] != desc.kernel:
        add("kernel", "square", entry.layer.weights.shape[3],
            f"{label} has a {desc.kernel}×{entry.layer.weights.shape[3]} kernel, the device "
            "runs square kernels")
    made = maps[entry.writes]
    padded = (f" ({made.level_bits} bits of its own, stored as the {made.bits} planes its "
              f"readers read)" if made.bits > made.level_bits else "")
    worded = {
        "in_bits": f"{label} reads {desc.in_bits}-bit maps, max_input_bits is "
                   f"{c.max_input_bits}",
        "out_bits": f"{label} writes {desc.out_bits}-bit maps{padded}, output_bits is "
                    f"{c.output_bits}",
        "shortcut_bits": f"{label} adds a {desc.shortcut_bits}-bit shortcut from "
                         f"{entry.reads[-1]!r}, max_shortcut_bits is {c.max_shortcut_bits}"}
    for problem in desc.problems(c):
        if problem.field in _GRAPH_FIELDS:
            continue
        if problem.field in worded and problem.stage == 2:
            add(problem.field, problem.limit, problem.value, worded[problem.field])
        else:
            add(problem.field, problem.limit, problem.value, f"{label}: {problem}")


def _graph_problems(config, bundle, mode: str, weight_depth, threshold_depth
                    ) -> list[FitProblem]:
    """:func:`plan_problems` of a contract-2 config."""
    c = config
    depth_w, depth_t = _memory_limits(c, weight_depth, threshold_depth)
    problems: list[FitProblem] = []

    def add(field, limit, value, message):
        problems.append(FitProblem(field, str(limit), int(value), message))

    if mode == "streamed":
        add("mode", "resident", 0, "a contract-2 build runs every layer resident (the driver "
            "streams weights per layer on contract-1 builds only)")
    graph = plan_graph(c, bundle)
    if not graph.passes:
        add("layers", "a thresholded layer", 0,
            f"the bundle's only node ({graph.host_layer!r}) outputs raw A, which the host "
            "runs: nothing is left for the device")
        return problems
    problems += graph.overflow
    for entry in graph.passes:
        _graph_pass_problems(c, entry, graph.maps, add)
    for m in graph.maps.values():
        words = m.words(c.simd)
        if words > c.activation_depth:
            planes = f"{m.bits} planes of " if m.bits > 1 else ""
            add("activation_depth", f"activation_depth = {c.activation_depth}", words,
                f"{m.describe()} ({planes}{'×'.join(map(str, m.shape))}) needs {words} words, "
                f"a slot's activation_depth is {c.activation_depth}")
    convs = [p for p in graph.passes if p.kind == "conv"]
    for what, total, depth, top, unit in (
            ("weights", sum(p.weight_words for p in convs), depth_w, c.weight_depth, "words"),
            ("thresholds", sum(p.threshold_entries for p in convs), depth_t,
             c.threshold_depth, "entries")):
        name = "weight_depth" if what == "weights" else "threshold_depth"
        limit = (f"{name} is {depth}" if depth == top else
                 f"the plan may use {depth} of {name} {top}")
        if total > depth:
            add(name, limit, total, f"resident {what} need {total} {unit} per column, "
                f"{limit} (a contract-2 build keeps every layer resident)")
    if len(graph.passes) > LAYER_TABLE_ENTRIES:
        add("passes", f"{LAYER_TABLE_ENTRIES} layer table entries", len(graph.passes),
            f"the network needs {len(graph.passes)} device passes (convs, pools, repeats), "
            f"the layer table holds {LAYER_TABLE_ENTRIES}")
    return problems
