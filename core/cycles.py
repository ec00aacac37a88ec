"""Exact cycle model of the layer controller (``bitdet.hw.controller.LayerController``).

``layer_cycles(config, descriptor)`` returns the ``(busy_cycles, stall_cycles)`` that the
RTL counts for one layer and RUN_LAYER reports, without simulating it (pure Python, no
amaranth): the emulator reports the same counts as the hardware. docs/hardware.md,
*Cycle model*, derives the formula from the RTL; ``tests/test_cycles.py`` compares it with
``amaranth.sim`` of the controller on random shapes and configs.

For a convolution of ``groups = ceil(out_h · out_w / rows)`` pixel groups, ``tiles =
ceil(O / cols)`` tiles and ``K = kernel² · ceil(C / simd)`` K-words per job (one job per
group and tile, all tiles of a group in one window-generator command)::

    J     = max(K, cols, rows)      (thresholded)    J = max(K, cols)    (raw)
    G     = max(tiles · J, rows + 4)
    busy  = K + (groups − 1) · G + (tiles − 1) · J + 3·rows + 2·cols + 13  (thresholded)
    busy  = K + (groups − 1) · G + (tiles − 1) · J + 2·rows + 2·cols + 13  (raw: no writes)
    stall = busy − groups · tiles · K                                       (= busy − ideal)

``J`` is the cycles per job within a group: ``K`` the job's own length, ``cols`` the
array's minimum distance between two jobs' last words (its drain), ``rows`` the
controller's guard for the output writer (``rows`` cycles per completed word; raw mode
writes nothing). ``G`` is the cycles per group: ``rows + 4`` is the window generator's
setup per command (the next group's window is set up while the current group's jobs are
read). The constant ``13 = 8 + ARRAY_PIPELINE + THRESHOLD_PIPELINE`` is, with the
``rows`` and ``cols`` terms, the fixed cost of the layer: start-up, the window generator's
set-up and address register, the array's skew, drain and ``ARRAY_PIPELINE`` = 3 pipeline
registers, the ``THRESHOLD_PIPELINE`` = 2 registers of the threshold stage and (the third
``rows``) the output word writes. Both counters are ``COUNTER_WIDTH`` (32) bits wide and
wrap like the hardware's.

**Contract 2** (a contract-2 build, ``config.contract == 2``: ``bitdet.hw.controller_v2``;
an extended descriptor's ``in_bits`` = n, ``out_bits`` = m, ``shortcut_bits`` = s). The
array reads the ``K`` words of every input plane in turn (bit-serial, ``K' = n·K`` words
per job); each job's context (its tile's ``2**s`` threshold rows, its pixels' ``s``
shortcut planes) loads in ``load = max(2**s, rows·s)`` cycles, the first one before the
first command, the next ones within a job period; the output writer writes the ``m``
output planes of each completed word (``rows·m`` cycles)::

    load  = max(2**s, rows·s)
    J     = max(n·K, cols, rows·m, load + 2)
    G     = max(tiles · J, rows + 4)
    busy  = n·K + (groups − 1)·G + (tiles − 1)·J + (2 + m)·rows + 2·cols + 13 + load + 4
    stall = busy − groups · tiles · n·K

A pool pass over an n-bit map reads each window word of each plane (``busy =
n·out_h·out_w·ceil(C/simd)·kernel² + 4``), a channel-repeat pass reads the input words
and writes the output words of every pixel and plane (``busy = n·h·w·(ceil(C/simd) +
ceil(O/simd)) + 4``), each with ``stall = 4``. ``tests/test_hw_controller_v2.py`` checks
the convolution formula against ``amaranth.sim`` of the contract-2 controller; the
emulator reports it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

__all__ = ["ARRAY_PIPELINE", "COUNTER_WIDTH", "PE_LATENCY", "POOL_OVERHEAD_CYCLES",
           "THRESHOLD_PIPELINE",
           "ideal_cycles", "layer_cycles", "pass_cycles", "pool_cycles", "repeat_cycles"]

COUNTER_WIDTH = 32
"""Bits of the controller's ``busy_cycles`` / ``stall_cycles`` counters (the RTL's
counters are this wide: ``bitdet.hw.controller`` imports it)."""

PE_LATENCY = 3
"""Cycles from a PE's input to its ``result`` (its popcount registers, in the middle of the
tree and after it, plus the accumulator): ``bitdet.hw.pe`` imports it."""

ARRAY_PIPELINE = 1 + (PE_LATENCY - 1)
"""Pipeline registers of the systolic array beyond its skew and drain (its input register
and the PEs' two popcount registers, in the middle of the tree and after it:
``bitdet.hw.array`` imports it)."""

THRESHOLD_PIPELINE = 2
"""Registers of the controller's threshold stage, from a result to its output bit (the
threshold memory's word registered with the result, then the threshold units' register:
``bitdet.hw.controller`` imports it)."""

_CONV_FIELDS = ("out_h", "out_w", "channels", "out_channels", "kernel")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_config(config) -> tuple[int, int, int]:
    """``(rows, cols, simd)`` of an ``AcceleratorConfig`` (duck-typed: any object with
    positive integer ``rows``, ``cols``, ``simd``)."""
    try:
        rows, cols, simd = config.rows, config.cols, config.simd
    except AttributeError:
        raise TypeError(f"config must be an AcceleratorConfig, not {config!r}") from None
    for name, value in (("rows", rows), ("cols", cols), ("simd", simd)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"config.{name} must be a positive integer, not {value!r}")
    if simd % cols:
        raise ValueError(f"the layer controller needs simd ({simd}) to be a multiple of "
                         f"cols ({cols})")
    return rows, cols, simd


def _plane_bits(descriptor: Mapping) -> tuple[int, int, int]:
    """``(in_bits, out_bits, shortcut_bits)`` of a descriptor (1, 1, 0 without the
    contract-2 fields)."""
    out = []
    for name, default, low in (("in_bits", 1, 1), ("out_bits", 1, 1), ("shortcut_bits", 0, 0)):
        value = descriptor.get(name, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not low <= value <= 8:
            raise ValueError(f"descriptor {name} must be an integer in {low} … 8, "
                             f"not {value!r}")
        out.append(int(value))
    return out[0], out[1], out[2]


def _conv_sizes(config, descriptor: Mapping) -> tuple[int, int, int, int, int, int]:
    """``(rows, cols, groups, tiles, k_words, raw)`` of a conv descriptor (``k_words``
    of one input plane)."""
    rows, cols, simd = _check_config(config)
    if not isinstance(descriptor, Mapping):
        raise TypeError(f"descriptor must be a dict (decode_layer / LayerController."
                        f"descriptor), not {type(descriptor).__name__}")
    missing = [name for name in _CONV_FIELDS if name not in descriptor]
    if missing:
        raise ValueError(f"the layer descriptor lacks {', '.join(missing)}")
    values = {}
    for name in _CONV_FIELDS:
        value = descriptor[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"descriptor {name} must be a positive integer, not {value!r}")
        values[name] = int(value)
    groups = _ceil_div(values["out_h"] * values["out_w"], rows)
    tiles = _ceil_div(values["out_channels"], cols)
    k_words = values["kernel"] ** 2 * _ceil_div(values["channels"], simd)
    return rows, cols, groups, tiles, k_words, int(bool(descriptor.get("raw", 0)))


def ideal_cycles(config, descriptor: Mapping) -> int:
    """K-words the array consumes for a conv layer, the cycles of a perfectly fed array:
    ``ceil(out_h·out_w / rows) · ceil(O / cols) · kernel²·ceil(C / simd)`` — the same
    number as ``LayerController.ideal_cycles`` and ``busy − stall`` of the counters.

    ``K`` counts packed words per tap (``ceil(C / simd)`` per kernel position, the layout
    of :func:`bitdet.core.packing.pack_weights`), so with ``C`` not a multiple of ``simd``
    it is more than ``ceil(kernel²·C / simd)``: the channel padding of every tap word is
    fed to the array like real channels.

    Raises
    ------
    TypeError, ValueError
        A malformed config or descriptor, or a pool descriptor (a pool pass gives the
        array no K-words; its cycles come from :func:`pool_cycles`).
    """
    if isinstance(descriptor, Mapping) and descriptor.get("pool"):
        raise ValueError("ideal_cycles counts the K-words of a conv layer; a pool pass has "
                         "none (see pool_cycles)")
    _, _, groups, tiles, k_words, _ = _conv_sizes(config, descriptor)
    return groups * tiles * k_words * _plane_bits(descriptor)[0]


def layer_cycles(config, descriptor: Mapping) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of one layer exactly as the controller counts them
    (and RUN_LAYER reports them), for a descriptor of
    :func:`bitdet.core.protocol.decode_layer` / ``LayerController.descriptor``.

    Only ``out_h``, ``out_w``, ``channels``, ``out_channels``, ``kernel``, ``raw`` and
    (contract 2) ``in_bits``, ``out_bits`` and ``shortcut_bits`` matter: the controller's
    timing does not depend on the data, the bases, the slots, the stride, the padding or
    the pad level. A descriptor with a true ``pool`` or ``repeat`` entry goes to
    :func:`pass_cycles`.

    Raises
    ------
    TypeError, ValueError
        A malformed config or descriptor.
    """
    if isinstance(descriptor, Mapping) and (descriptor.get("pool") or descriptor.get("repeat")):
        return pass_cycles(config, descriptor)
    rows, cols, groups, tiles, k_words, raw = _conv_sizes(config, descriptor)
    in_bits, out_bits, shortcut_bits = _plane_bits(descriptor)
    k_words *= in_bits                           # one pass over the K words per plane
    if getattr(config, "contract", 1) == 2:
        return _contract2_cycles(rows, cols, groups, tiles, k_words, out_bits, shortcut_bits)
    writes = 0 if raw else rows * (out_bits + shortcut_bits)
    job_period = max(k_words, cols if raw else max(cols, writes))
    group_period = max(tiles * job_period, rows + 4)
    busy = (k_words + (groups - 1) * group_period + (tiles - 1) * job_period
            + 2 * rows + 2 * cols + 8 + ARRAY_PIPELINE + THRESHOLD_PIPELINE + writes)
    stall = busy - groups * tiles * k_words
    mask = (1 << COUNTER_WIDTH) - 1
    return busy & mask, stall & mask


def _contract2_cycles(rows: int, cols: int, groups: int, tiles: int, k_words: int,
                      out_bits: int, shortcut_bits: int) -> tuple[int, int]:
    """The contract-2 controller (``bitdet.hw.controller_v2``): each job's context (its
    tile's ``2**s`` threshold rows and its pixels' ``s`` shortcut planes) loads in
    ``load = max(2**s, rows·s)`` cycles, the first one before the first command (``load
    + 4`` cycles), the others within a job period ``J ≥ load + 2``; the writer writes
    ``rows·m`` words per completed word (``k_words`` counts all ``n`` planes)."""
    load = max(1 << shortcut_bits, rows * shortcut_bits)
    job_period = max(k_words, cols, rows * out_bits, load + 2)
    group_period = max(tiles * job_period, rows + 4)
    busy = (k_words + (groups - 1) * group_period + (tiles - 1) * job_period
            + 2 * rows + 2 * cols + 8 + ARRAY_PIPELINE + THRESHOLD_PIPELINE
            + rows * out_bits + load + 4)
    stall = busy - groups * tiles * k_words
    mask = (1 << COUNTER_WIDTH) - 1
    return busy & mask, stall & mask


POOL_OVERHEAD_CYCLES = 4
"""Cycles of a pool pass without a read: three setup cycles and the last write."""


def _positive_fields(descriptor: Mapping, names: tuple[str, ...], kind: str) -> dict:
    """``names`` of a pool or repeat pass's descriptor as ints, each a positive integer."""
    if not isinstance(descriptor, Mapping):
        raise TypeError(f"descriptor must be a dict, not {type(descriptor).__name__}")
    values = {}
    for name in names:
        value = descriptor.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{kind} descriptor {name} must be a positive integer, "
                             f"not {value!r}")
        values[name] = int(value)
    return values


def pool_cycles(config, descriptor: Mapping) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of a max-pool pass of :class:`bitdet.hw.pool.
    PoolEngine`: one activation read per cycle without pauses,
    ``busy = out_h·out_w·ceil(C/simd)·kernel² + 4`` and ``stall = 4`` (three setup cycles
    and the last write; docs/hardware.md, "Pool engine"). Wraps at 32 bits like the
    counters."""
    _rows, _cols, simd = _check_config(config)
    values = _positive_fields(descriptor, ("out_h", "out_w", "channels", "kernel"), "pool")
    reads = (values["out_h"] * values["out_w"] * _ceil_div(values["channels"], simd)
             * values["kernel"] ** 2 * _plane_bits(descriptor)[0])
    return (reads + POOL_OVERHEAD_CYCLES) % 2 ** COUNTER_WIDTH, POOL_OVERHEAD_CYCLES


def repeat_cycles(config, descriptor: Mapping) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of a channel-repeat pass (contract 2): per pixel and
    plane the input words are read and the output words written,
    ``busy = in_bits·out_h·out_w·(ceil(C/simd) + ceil(O/simd)) + 4``, ``stall = 4``."""
    _rows, _cols, simd = _check_config(config)
    values = _positive_fields(descriptor, ("out_h", "out_w", "channels", "out_channels"),
                              "repeat")
    words = _ceil_div(values["channels"], simd) + _ceil_div(values["out_channels"], simd)
    busy = values["out_h"] * values["out_w"] * words * _plane_bits(descriptor)[0]
    return (busy + POOL_OVERHEAD_CYCLES) % 2 ** COUNTER_WIDTH, POOL_OVERHEAD_CYCLES


def pass_cycles(config, descriptor: Mapping) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of any device pass: a convolution
    (:func:`layer_cycles`), a pool pass (:func:`pool_cycles`) or a repeat pass
    (:func:`repeat_cycles`), by the descriptor's ``pool`` / ``repeat`` flags."""
    if isinstance(descriptor, Mapping) and descriptor.get("repeat"):
        return repeat_cycles(config, descriptor)
    if isinstance(descriptor, Mapping) and descriptor.get("pool"):
        return pool_cycles(config, descriptor)
    return layer_cycles(config, descriptor)
