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
"""

from __future__ import annotations

from dataclasses import dataclass

from bitdet.core.descriptor import FitProblem, LayerDescriptor
from bitdet.core.protocol import (
    LAYER_TABLE_ENTRIES,
    threshold_entry_bytes,
    weight_entry_bytes,
    write_cost,
)

__all__ = ["MODES", "LayerPlan", "contract_v2_problems", "device_layer_count",
           "fit_problems_for", "plan_bundle", "plan_problems"]


def contract_v2_problems(bundle) -> list[FitProblem]:
    """What a contract-v2 bundle (bundle format 2: a graph, n-bit maps, shortcuts) asks of
    the accelerator that this build does not have, one problem per node and feature. The
    accelerator runs chains of layers over 1-bit maps (contract v1); empty for such a
    bundle."""
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
    return out


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
    """
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
    not, for the layers the device runs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
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

