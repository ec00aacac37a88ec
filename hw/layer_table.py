"""The executor's layer table: CONFIGURE_LAYER's checks of a descriptor
(:class:`LayerCheck`) and the table of checked descriptors (:class:`LayerTable`),
docs/protocol.md ("CONFIGURE_LAYER", "RUN_LAYER", "RUN_NETWORK")."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.descriptor import (
    EXTENDED_DESCRIPTOR_SIZE,
    LAYER_DESCRIPTOR_SIZE,
    MAX_LEVEL_BITS,
    descriptor_layout,
    extended_descriptor_layout,
)
from bitdet.core.protocol import LAYER_TABLE_ENTRIES

from ._util import mul_small
from .pe import valid_stream_signature

__all__ = ["LayerCheck", "LayerTable"]


def _above(value, limit: int):
    """``value > limit`` for a constant ``limit``: the bits above ``limit``'s width are any
    set, or the low bits compare (a narrow comparison, not a wide one)."""
    n = limit.bit_length()
    if len(value) <= n:
        return value > limit
    low = value[:n] > limit if limit != (1 << n) - 1 else Const(0, 1)
    return (value[n:] != 0) | low


class LayerCheck(wiring.Component):
    """CONFIGURE_LAYER's checks of a descriptor against the build, registered (a cycle of
    arithmetic of their own): the hardware form of the device checks of
    :meth:`~bitdet.core.descriptor.LayerDescriptor.problems` (those with a ``stage``).

    A contract-2 build (``config.contract == 2``) checks an extended descriptor: the
    contract-1 checks, which a pool pass, a repeat pass and a convolution share as there,
    and the extension's (bit widths, padding level, pass kinds, slots; docs/protocol.md,
    "Extended descriptor").

    Parameters
    ----------
    config : AcceleratorConfig

    Members
    -------
    descriptor : ``In(descriptor_layout())``
        The 32-byte descriptor (:func:`~bitdet.core.descriptor.descriptor_layout`); under
        contract 2 the 48-byte one (:func:`~bitdet.core.descriptor.
        extended_descriptor_layout`).
    refused : ``Out(1)``
        A zero size or a bad flag (stage 1: BAD_ARGUMENT), a cycle after ``descriptor``.
    too_large : ``Out(1)``
        A size beyond the build (stage 2: LAYER_DOES_NOT_FIT).
    misfit : ``Out(1)``
        An output size that does not match the window (stage 3: BAD_ARGUMENT); meaningful
        only when the others are low.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    """

    def __init__(self, *, config: AcceleratorConfig):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        super().__init__({
            "descriptor": In(extended_descriptor_layout() if config.contract == 2
                             else descriptor_layout()),
            "refused": Out(1),
            "too_large": Out(1),
            "misfit": Out(1),
        })

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    def elaborate(self, platform):
        m = Module()
        c = self._config
        f = self.descriptor
        pool = f.pool
        pool_kernel = c.pool_max_kernel
        above = _above

        zero = ((f.in_h == 0) | (f.in_w == 0) | (f.channels == 0) | (f.out_h == 0)
                | (f.out_w == 0) | (f.out_channels == 0) | (f.kernel == 0) | (f.stride == 0))
        # a conv may set only the pad bit (raw mode needs READ_RESULTS); a pool only its
        # flag, reads no weights or thresholds and keeps the channels
        bad_flags = (f.reserved != 0) | Mux(
            pool, f.pad_bit | f.raw | (f.weight_base != 0) | (f.threshold_base != 0)
            | (f.out_channels != f.channels), f.raw)
        depth = c.activation_depth
        conv_too_big = (above(f.kernel, c.max_kernel) | above(f.stride, c.max_stride)
                        | above(f.padding, c.max_kernel - 1)
                        | above(f.out_channels, c.max_channels)
                        | above(f.weight_base, c.weight_depth - 1)
                        | above(f.threshold_base, c.threshold_depth - 1))
        pool_too_big = (above(f.kernel, pool_kernel) | above(f.stride, pool_kernel)
                        | (f.padding != 0))
        too_big = (Mux(pool, pool_too_big, conv_too_big)
                   | above(f.channels, c.max_channels)
                   | above(f.in_h, depth) | above(f.in_w, depth)
                   | above(f.out_h, depth) | above(f.out_w, depth)
                   | above(f.input_base, depth - 1) | above(f.output_base, depth - 1))
        # geometry: out = floor((in + 2·padding − kernel) / stride) + 1, i.e.
        # (out − 1)·stride + kernel ≤ in + 2·padding < out·stride + kernel (small products);
        # a pool gets here only with padding 0
        dim = c.activation_depth.bit_length()
        stride_bits = max(c.max_stride, pool_kernel).bit_length()
        # (checked only when nothing is too big: the fields are within their limits)
        geometry = Const(1, 1)
        k = f.kernel[:max(c.max_kernel, pool_kernel).bit_length()]
        s = f.stride[:stride_bits]
        for size, out in ((f.in_h, f.out_h), (f.in_w, f.out_w)):
            # with e = in + 2·padding + stride − out·stride − kernel: 0 ≤ e < stride
            e = Signal(signed(dim + stride_bits + 2))
            m.d.comb += e.eq(size[:dim] + 2 * f.padding[:c.max_kernel.bit_length()] + s
                             - (mul_small(out[:dim], s) + k))
            geometry = geometry & ~e[-1] & (e[stride_bits:] == 0) & (e[:stride_bits] < s)
        # the maps fit a bank (this also bounds a layer's run time)
        area = ((f.in_h[:dim] * f.in_w[:dim] > c.activation_depth)
                | (f.out_h[:dim] * f.out_w[:dim] > c.activation_depth))
        refused, too_large = zero | bad_flags, too_big | area
        if c.contract == 2:
            # (a repeat pass takes the conv's stage-2 limits above: with its stage-1
            # fields right, kernel 1, stride 1, padding 0 and no bases, they are its own)
            ext_refused, ext_too_big = self._extension_checks(f)
            refused, too_large = refused | ext_refused, too_large | ext_too_big
        m.d.sync += [self.refused.eq(refused), self.too_large.eq(too_large),
                     self.misfit.eq(~geometry)]
        return m

    def _extension_checks(self, f):
        """``(refused, too_large)`` of an extended descriptor's own checks: stage 1
        (:meth:`~bitdet.core.descriptor.LayerDescriptor._extension_flag_problems`) and the
        extension's stage-2 limits."""
        c = self._config
        above = _above
        passes = f.pool | f.repeat
        has_shortcut = f.shortcut_bits != 0
        refused = ((f.in_bits == 0) | above(f.in_bits, MAX_LEVEL_BITS)
                   | (f.out_bits == 0) | above(f.out_bits, MAX_LEVEL_BITS)
                   | above(f.shortcut_bits, MAX_LEVEL_BITS)
                   | (f.ext_reserved != 0) | f.pad_bit
                   # pad_level ≥ 2**in_bits (in_bits outside 1 … 4 is refused anyway)
                   | ((f.pad_level >> f.in_bits) != 0)
                   | (f.pool & f.repeat)
                   | (passes & ((f.out_bits != f.in_bits) | has_shortcut
                                | (f.pad_level != 0)))
                   | (f.repeat & ((f.kernel != 1) | (f.stride != 1) | (f.padding != 0)
                                  | f.raw | (f.weight_base != 0)
                                  | (f.threshold_base != 0)))
                   | (~has_shortcut & ((f.shortcut_slot != 0) | (f.shortcut_base != 0)))
                   | (f.output_slot == f.input_slot)
                   | (has_shortcut & (f.output_slot == f.shortcut_slot)))
        slots = c.activation_slots - 1
        too_big = (above(f.in_bits, c.max_input_bits) | above(f.out_bits, c.output_bits)
                   | above(f.shortcut_bits, c.max_shortcut_bits)
                   | above(f.input_slot, slots) | above(f.output_slot, slots)
                   | above(f.shortcut_slot, slots)
                   | above(f.shortcut_base, c.activation_depth - 1))
        return refused, too_big


class LayerTable(wiring.Component):
    """``LAYER_TABLE_ENTRIES`` checked descriptors of ``size`` bytes in one byte-wide
    memory, with a valid bit per entry.

    **Store** (``store`` high for ``size`` consecutive cycles): byte ``i`` of the
    descriptor on ``store_data`` in the ``i``-th cycle goes to entry ``entry``; ``stored``
    is high in the last cycle, and the entry is valid from the next.

    **Load** (``load`` high for ``size + 1`` consecutive cycles): byte ``i`` of entry
    ``entry`` is on ``load_data`` (``valid`` high) in cycle ``i + 1``; ``loaded`` is high
    in the last cycle, after the last byte.

    Parameters
    ----------
    entries : int
        Table entries (default :data:`~bitdet.core.protocol.LAYER_TABLE_ENTRIES`).
    size : int
        Bytes of a descriptor: :data:`~bitdet.core.descriptor.LAYER_DESCRIPTOR_SIZE`
        (contract 1, the default) or :data:`~bitdet.core.descriptor.
        EXTENDED_DESCRIPTOR_SIZE` (contract 2).

    Members
    -------
    entry : ``In(range(entries))``
        The entry stored or loaded (held while it is).
    store : ``In(1)``
    store_data : ``In(8)``
    stored : ``Out(1)``
    load : ``In(1)``
    load_data : ``Out(valid_stream_signature(8))``
    loaded : ``Out(1)``
    valid : ``Out(entries)``
        Bit ``i``: entry ``i`` holds a checked descriptor.
    clear : ``In(1)``
        Every entry becomes invalid (RESET).
    invalidate : ``In(1)``
        Entry ``invalidate_entry`` becomes invalid (a CONFIGURE_LAYER of it).
    invalidate_entry : ``In(range(entries))``
    """

    def __init__(self, *, entries: int = LAYER_TABLE_ENTRIES,
                 size: int = LAYER_DESCRIPTOR_SIZE):
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
            raise ValueError(f"entries must be a positive integer, not {entries!r}")
        if size not in (LAYER_DESCRIPTOR_SIZE, EXTENDED_DESCRIPTOR_SIZE):
            raise ValueError(f"size must be {LAYER_DESCRIPTOR_SIZE} or "
                             f"{EXTENDED_DESCRIPTOR_SIZE}, not {size!r}")
        self._entries = entries
        self._size = size
        super().__init__({
            "entry": In(range(entries)),
            "store": In(1),
            "store_data": In(8),
            "stored": Out(1),
            "load": In(1),
            "load_data": Out(valid_stream_signature(8)),
            "loaded": Out(1),
            "valid": Out(entries),
            "clear": In(1),
            "invalidate": In(1),
            "invalidate_entry": In(range(entries)),
        })

    @property
    def entries(self) -> int:
        return self._entries

    @property
    def size(self) -> int:
        """Bytes of a descriptor."""
        return self._size

    def elaborate(self, platform):
        m = Module()
        size = self._size
        step = Signal(range(size + 1))                     # byte of the entry
        table = m.submodules.memory = Memory(shape=8, depth=self._entries * size, init=[])
        wr = table.write_port()
        rd = table.read_port()
        addr = self.entry * size + step[:(size - 1).bit_length()]
        m.d.comb += [wr.addr.eq(addr), rd.addr.eq(addr)]

        with m.If(self.clear):
            m.d.sync += self.valid.eq(0)
        with m.If(self.invalidate):
            m.d.sync += self.valid.bit_select(self.invalidate_entry, 1).eq(0)

        with m.If(self.store):
            m.d.comb += [wr.en.eq(1), wr.data.eq(self.store_data),
                         self.stored.eq(step == size - 1)]
            m.d.sync += step.eq(step + 1)
            with m.If(step == size - 1):
                m.d.sync += [self.valid.bit_select(self.entry, 1).eq(1), step.eq(0)]
        with m.Elif(self.load):
            # read byte `step`, present byte `step − 1`
            m.d.comb += [rd.en.eq(step != size), self.load_data.valid.eq(step != 0),
                         self.load_data.payload.eq(rd.data), self.loaded.eq(step == size)]
            m.d.sync += step.eq(step + 1)
            with m.If(step == size):
                m.d.sync += step.eq(0)
        return m
