"""Binary max-pool engine: the OR of each ``kernel × kernel`` window of a packed feature map,
from one activation bank into the other.

After a thresholded binary layer a max-pool is the OR of the bits in the window
(docs/numerics.md, :func:`bitdet.core.golden.binary_maxpool2d`). The map is stored as
:func:`~bitdet.core.packing.pack_activations` lays it out (pixels row-major, ``W =
ceil(C / simd)`` channel words per pixel, channel padding bits 0), so a pool needs no
unpacking: word ``w`` of an output pixel is the OR of word ``w`` of the ``kernel²`` input
pixels of its window, and the padding bits stay 0.

**Loop order.** For each output pixel (row-major), for each channel word ``w``, for each
tap ``(ky, kx)`` (row-major): one read of input word ``input_base + ((oy·stride + ky)·in_w
+ ox·stride + kx)·W + w`` per cycle through the one read port. The read port answers one
cycle later; the OR is accumulated there, and the word of the last tap is written (OR
included) in that same cycle to ``output_base + (oy·out_w + ox)·W + w``, so the write
port writes every ``kernel²``-th cycle and the reads never pause. All addresses advance
by additions of steps computed once per pass (``W``, ``stride·W``, ``in_w·W``,
``stride·in_w·W``).

**Cycles.** ``start`` in cycle 0; ``busy`` from cycle 1: three setup cycles (``W``, then
the steps), ``R = out_h · out_w · W · kernel²`` read cycles, one cycle for the last
write; ``done`` pulses in the cycle after. Hence, exactly (see :func:`pool_busy_cycles`)::

    busy_cycles  = out_h · out_w · ceil(C / simd) · kernel² + 4
    stall_cycles = 4            (busy cycles without a read)
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import (  # the one cycle model
    COUNTER_WIDTH,
    POOL_OVERHEAD_CYCLES,
    pool_cycles,
)
from bitdet.core.descriptor import LayerDescriptor

from ._util import _ceil_div, mul_small

__all__ = ["POOL_OVERHEAD_CYCLES", "PoolEngine", "pool_busy_cycles"]


def pool_busy_cycles(config: AcceleratorConfig, descriptor) -> tuple[int, int]:
    """``(busy_cycles, stall_cycles)`` of a pool pass (the closed form of the module
    docstring): ``out_h·out_w·ceil(C/simd)·kernel² + 4`` and ``4``."""
    return pool_cycles(config, descriptor)


class PoolEngine(wiring.Component):
    """Runs one binary max-pool pass described by ``layer`` after a ``start`` pulse.

    **Descriptor** (``layer``, sampled in the cycle of ``start`` while idle; build it with
    :meth:`descriptor`): ``in_h``, ``in_w``, ``channels`` (C), ``out_h``, ``out_w``,
    ``kernel``, ``stride``, ``input_base`` (word of input pixel 0 in the read bank),
    ``output_base`` (word of output pixel 0 in the write bank). There is no padding:
    ``out = output_size(in, kernel, stride)`` (:func:`~bitdet.core.descriptor.output_size`;
    the hardware does not check it, the top level does at CONFIGURE_LAYER).

    **Status.** As :class:`~bitdet.hw.controller.LayerController`: ``busy`` from the cycle
    after ``start`` until the last word is written, ``done`` pulses in the first idle
    cycle, ``busy_cycles`` / ``stall_cycles`` count the busy cycles and those without a
    read (:func:`pool_busy_cycles`); ``stall`` is high in the latter.

    Parameters
    ----------
    config : AcceleratorConfig
    embedded : bool
        As the controller's: ``layer`` is used as it is (the executor holds it while the
        pass runs) and ``busy_cycles`` / ``stall_cycles`` stay 0.

    Members
    -------
    layer : ``In(descriptor_layout)``
    start : ``In(1)``
    busy, done : ``Out(1)``
    busy_cycles, stall_cycles : ``Out(COUNTER_WIDTH)``
    stall : ``Out(1)``
    act_read : ``In(ReadPort.Signature(addr_width=, shape=simd))``
        A read port of the activation buffer (bank ``select``, the input map).
    act_write : ``In(WritePort.Signature(addr_width=, shape=simd))``
        The buffer's write port (bank ``1 − select``, the pooled map).

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    """

    def __init__(self, *, config: AcceleratorConfig, embedded: bool = False,
                 src_loc_at: int = 0):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = c = config
        self._embedded = bool(embedded)
        self._addr_width = max(1, (c.activation_depth - 1).bit_length())
        self._max_kernel = c.pool_max_kernel
        dim = range(c.activation_depth + 1)
        self._descriptor_layout = data.StructLayout({
            "in_h": dim,
            "in_w": dim,
            "channels": range(c.max_channels + 1),
            "out_h": dim,
            "out_w": dim,
            "kernel": range(self._max_kernel + 1),
            "stride": range(self._max_kernel + 1),
            "input_base": self._addr_width,
            "output_base": self._addr_width,
        })
        super().__init__({
            "layer": In(self._descriptor_layout),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "busy_cycles": Out(COUNTER_WIDTH),
            "stall_cycles": Out(COUNTER_WIDTH),
            "stall": Out(1),
            "act_read": In(ReadPort.Signature(addr_width=self._addr_width, shape=c.simd)),
            "act_write": In(WritePort.Signature(addr_width=self._addr_width, shape=c.simd)),
        }, src_loc_at=1 + src_loc_at)

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    @property
    def descriptor_layout(self) -> data.StructLayout:
        return self._descriptor_layout

    @property
    def max_kernel(self) -> int:
        """Largest kernel and stride (``config.pool_max_kernel``)."""
        return self._max_kernel

    def descriptor(self, *, in_h: int, in_w: int, channels: int, kernel: int,
                   stride: int | None = None, input_base: int = 0,
                   output_base: int = 0) -> LayerDescriptor:
        """The CONFIGURE_LAYER descriptor of a pool pass
        (:meth:`LayerDescriptor.pool_pass <bitdet.core.descriptor.LayerDescriptor.pool_pass>`,
        ``stride`` defaults to ``kernel``), checked for every field the device checks and
        the ones it cannot (both maps fit from their bases on):
        :meth:`~bitdet.core.descriptor.LayerDescriptor.problems`.

        Raises
        ------
        ValueError
            If the pass does not fit this build or its geometry is empty.
        """
        stride = kernel if stride is None else stride
        problems = [f"{name} must be a positive integer, not {value!r}"
                    for name, value in (("in_h", in_h), ("in_w", in_w),
                                        ("channels", channels), ("kernel", kernel),
                                        ("stride", stride))
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if problems:
            raise ValueError("pool pass does not fit: " + "; ".join(problems))
        if kernel > in_h or kernel > in_w:
            raise ValueError(f"pool kernel {kernel} is larger than the {in_h}×{in_w} map")
        desc = LayerDescriptor.pool_pass(in_h=in_h, in_w=in_w, channels=channels,
                                         kernel=kernel, stride=stride,
                                         input_base=input_base, output_base=output_base)
        problems = desc.problems(self._config)
        if problems:
            raise ValueError("pool pass does not fit: " + "; ".join(map(str, problems)))
        return desc

    def elaborate(self, platform):
        m = Module()
        c = self._config
        aw = self._addr_width
        max_words = -(-c.max_channels // c.simd)

        # latched at `start`, or (embedded) the `layer` input, held by the executor
        desc = self.layer if self._embedded else Signal(self._descriptor_layout)
        words = Signal(range(max_words + 1))          # W = ceil(C / simd)
        col_step = Signal(aw)                         # stride · W: next output pixel
        row_step = Signal(aw)                         # in_w · W: next input row
        line_step = Signal(aw)                        # stride · in_w · W: next output row

        # loop counters and the addresses they stand for (all wrap modulo 2**aw, as the
        # port's address does)
        oy = Signal(range(c.activation_depth))
        ox = Signal(range(c.activation_depth))
        w = Signal(range(max(max_words, 2)))
        ky = Signal(range(self._max_kernel))
        kx = Signal(range(self._max_kernel))
        line_addr = Signal(aw)                        # window origin of output pixel (oy, 0)
        pix_addr = Signal(aw)                         # window origin of (oy, ox)
        word_addr = Signal(aw)                        # … + w
        row_addr = Signal(aw)                         # … + ky · row_step
        tap_addr = Signal(aw)                         # … + kx · W
        out_addr = Signal(aw)

        reading = Signal()
        m.d.comb += [self.act_read.addr.eq(tap_addr), self.act_read.en.eq(reading)]

        # -- OR stage: the word read in the previous cycle ----------------------------------
        d_valid = Signal()
        d_first = Signal()
        d_last = Signal()
        acc = Signal(c.simd)
        merged = Signal(c.simd)
        first_tap = (kx == 0) & (ky == 0)
        last_tap = (kx == desc.kernel - 1) & (ky == desc.kernel - 1)
        m.d.sync += [d_valid.eq(reading), d_first.eq(first_tap), d_last.eq(last_tap)]
        m.d.comb += merged.eq(Mux(d_first, self.act_read.data, acc | self.act_read.data))
        with m.If(d_valid):
            m.d.sync += acc.eq(merged)
        m.d.comb += [self.act_write.en.eq(d_valid & d_last),
                     self.act_write.addr.eq(out_addr),
                     self.act_write.data.eq(merged)]
        with m.If(d_valid & d_last):
            m.d.sync += out_addr.eq(out_addr + 1)

        # -- sequencer ------------------------------------------------------------------------
        m.d.sync += self.done.eq(0)
        with m.FSM(name="pool"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += self.busy.eq(1)
                    if not self._embedded:
                        m.d.sync += [desc.eq(self.layer), self.busy_cycles.eq(0),
                                     self.stall_cycles.eq(0)]
                    m.next = "WORDS"
            with m.State("WORDS"):
                m.d.sync += words.eq(_ceil_div(desc.channels, c.simd, c.max_channels))
                m.next = "STEPS"
            with m.State("STEPS"):
                m.d.sync += [col_step.eq(mul_small(words, desc.stride)),
                             row_step.eq(desc.in_w * words)]
                m.next = "LINE"
            with m.State("LINE"):
                base = desc.input_base
                m.d.sync += [line_step.eq(mul_small(row_step, desc.stride)),
                             line_addr.eq(base), pix_addr.eq(base), word_addr.eq(base),
                             row_addr.eq(base), tap_addr.eq(base),
                             out_addr.eq(desc.output_base),
                             oy.eq(0), ox.eq(0), w.eq(0), ky.eq(0), kx.eq(0)]
                m.next = "READ"
            with m.State("READ"):
                m.d.comb += reading.eq(1)
                with m.If(kx != desc.kernel - 1):
                    m.d.sync += [kx.eq(kx + 1), tap_addr.eq(tap_addr + words)]
                with m.Else():
                    m.d.sync += kx.eq(0)
                    with m.If(ky != desc.kernel - 1):
                        m.d.sync += [ky.eq(ky + 1), row_addr.eq(row_addr + row_step),
                                     tap_addr.eq(row_addr + row_step)]
                    with m.Else():
                        m.d.sync += ky.eq(0)
                        with m.If(w != words - 1):
                            nxt = word_addr + 1
                            m.d.sync += [w.eq(w + 1), word_addr.eq(nxt), row_addr.eq(nxt),
                                         tap_addr.eq(nxt)]
                        with m.Else():
                            m.d.sync += w.eq(0)
                            with m.If(ox != desc.out_w - 1):
                                nxt = pix_addr + col_step
                                m.d.sync += [ox.eq(ox + 1), pix_addr.eq(nxt),
                                             word_addr.eq(nxt), row_addr.eq(nxt),
                                             tap_addr.eq(nxt)]
                            with m.Else():
                                m.d.sync += ox.eq(0)
                                nxt = line_addr + line_step
                                m.d.sync += [oy.eq(oy + 1), line_addr.eq(nxt),
                                             pix_addr.eq(nxt), word_addr.eq(nxt),
                                             row_addr.eq(nxt), tap_addr.eq(nxt)]
                                with m.If(oy == desc.out_h - 1):
                                    m.next = "FLUSH"
            with m.State("FLUSH"):
                # the last word's data is on the port: the OR stage writes it now
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
                m.next = "IDLE"

        m.d.comb += self.stall.eq(self.busy & ~reading)
        if not self._embedded:
            with m.If(self.busy):
                m.d.sync += self.busy_cycles.eq(self.busy_cycles + 1)
            with m.If(self.stall):
                m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        return m
