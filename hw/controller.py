"""Layer controller: runs one binary convolution layer on chip, from a descriptor to the
packed output map in the other activation bank (or raw ``P`` values on a stream).

The controller owns the compute path — :class:`~bitdet.hw.window.WindowGenerator`,
:class:`~bitdet.hw.array.SystolicArray`, the :class:`~bitdet.hw.output.ThresholdStage`
and the :class:`~bitdet.hw.output.OutputWriter` (the packer) — and reaches the memories
through their ports (the top level joins them with :func:`amaranth.lib.wiring.connect`):

* ``act_read[r]``: row ``r``'s read port on the :class:`~bitdet.hw.memory.ActivationBuffer`
  (bank ``select``, the layer's input);
* ``act_write``: the buffer's write port (bank ``1 − select``, the layer's output);
* ``weights`` / ``thresholds``: the read ports of the :func:`~bitdet.hw.memory.
  weight_memory` and :func:`~bitdet.hw.memory.threshold_memory` column memories.

**Loop order.** For each group of ``rows`` consecutive output pixels (row-major), for each
tile of ``cols`` output channels: one window-generator job whose ``tag`` is the tile's
weight address ``weight_base + t·K_words`` (:func:`~bitdet.core.packing.pack_weights`
layout). All tiles of a group are **one** generator command (``tiles = ceil(O/cols)``,
``tag = weight_base``, ``tag_step = K_words``): the window is set up once per group and
its jobs follow each other directly, while the next group's window is set up. The array
returns each job's ``cols`` result columns in job order, so a second set of counters
(pixel group, tile) follows the results without any tag: it reads the tile's thresholds
at ``threshold_base + t`` (:func:`~bitdet.core.packing.pack_thresholds`) and places the
bits.

**Packing.** ``simd % cols == 0`` (checked by :class:`LayerController`; all presets have it),
so tile ``t``'s channels ``t·cols … t·cols + cols − 1`` fall into one output word
``t·cols // simd``, at bits ``(t·cols) % simd + c``. Each row keeps one word register;
when a word is complete (its last slot, or the layer's last tile) the ``rows`` words go to
a shadow register and are written one per cycle to
``output_base + pixel·ceil(O/simd) + word`` — the layout of
:func:`~bitdet.core.packing.pack_activations` — skipping rows that are not real pixels. Fill
channels beyond ``O`` get ``T = K + 1`` from the host and therefore 0 bits, the channel
padding of ``pack_activations``. The writer needs ``rows`` cycles per completed word, so
in thresholded mode the controller passes a job's ``last`` K-word to the array only
``≥ rows`` cycles after the previous job's (the array itself keeps them ``≥ cols``
apart); raw mode has no such guard.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import COUNTER_WIDTH, THRESHOLD_PIPELINE
from bitdet.core.descriptor import LayerDescriptor, descriptor_fields

from ._util import _ceil_div, delayed
from .array import SystolicArray
from .memory import threshold_layout
from .output import OutputWriter, ThresholdStage
from .pe import valid_stream_signature
from .window import WindowGenerator, WindowLayer

__all__ = ["COUNTER_WIDTH", "THRESHOLD_PIPELINE", "LayerController"]


class LayerController(wiring.Component):
    """Runs one binary convolution layer described by ``layer`` after a ``start`` pulse.

    **Descriptor** (``layer``, sampled in the cycle of ``start`` while idle; build it with
    :meth:`descriptor`): ``in_h``, ``in_w``, ``channels`` (C), ``out_h``, ``out_w``,
    ``out_channels`` (O), ``kernel``, ``stride``, ``padding``, ``pad_bit``,
    ``input_base`` (word of input pixel 0 in the read bank), ``output_base`` (word of
    output pixel 0 in the write bank), ``weight_base`` (weight address of tile 0, K-word 0),
    ``threshold_base`` (threshold entry of tile 0) and ``raw``.

    **Thresholded mode** (``raw = 0``): output channel ``o`` of output pixel ``n`` is
    ``P ≥ T`` (threshold 0 of the entry), written as bit ``o % simd`` of word
    ``output_base + n·ceil(O/simd) + o // simd`` of bank ``1 − select``; only the
    ``ceil(O/simd)`` words of real pixels are written.

    **Raw mode** (``raw = 1``): nothing is written; every result column of real output
    channels appears on ``raw`` (no back-pressure): ``pixel`` (the output pixel of row 0),
    ``channel``, ``p[r]`` (``P`` of output pixel ``pixel + r``) and ``row_valid`` (bit
    ``r``: that pixel exists). At most one transfer per cycle.

    **Status.** ``busy`` is high from the cycle after ``start`` until the last output is
    written; ``done`` pulses in the first idle cycle after a run. ``busy_cycles`` counts
    the busy cycles of the last (or running) layer and ``stall_cycles`` those in which the
    array was not given a K-word; ``busy_cycles − stall_cycles`` is the number of K-words,
    ``groups · tiles · K_words`` (:meth:`ideal_cycles`). ``stall`` is high in the busy
    cycles that ``stall_cycles`` counts.

    Parameters
    ----------
    config : AcceleratorConfig
    embedded : bool
        For :class:`~bitdet.hw.top.CommandExecutor`, which holds ``layer`` constant while a
        layer runs and counts the cycles itself (summed over the layers of a command, from
        ``busy`` and ``stall``): ``layer`` is used as it is instead of being latched at
        ``start``, and ``busy_cycles`` / ``stall_cycles`` stay 0. The timing is the same.

    Members
    -------
    layer : ``In(descriptor_layout)``
    start : ``In(1)``
    busy, done : ``Out(1)``
    busy_cycles, stall_cycles : ``Out(COUNTER_WIDTH)``
    stall : ``Out(1)``
    act_read : ``In(ReadPort.Signature(addr_width=, shape=simd)).array(rows)``
    act_write : ``In(WritePort.Signature(addr_width=, shape=simd))``
    weights : ``In(ReadPort.Signature(addr_width=, shape=ArrayLayout(simd, cols)))``
    thresholds : ``In(ReadPort.Signature(addr_width=, shape=ArrayLayout(threshold_layout,
        cols)))``
    raw : ``Out(valid_stream_signature(raw_layout))``

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    ValueError
        If ``simd`` is not a multiple of ``cols`` (output packing, see the module docs).
    """

    def __init__(self, *, config: AcceleratorConfig, embedded: bool = False,
                 src_loc_at: int = 0):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if config.simd % config.cols:
            raise ValueError(f"the layer controller needs simd ({config.simd}) to be a multiple "
                             f"of cols ({config.cols}): one tile of cols output channels is "
                             f"packed into one simd-bit output word")
        self._config = c = config
        self._embedded = bool(embedded)
        self._act_addr_width = max(1, (c.activation_depth - 1).bit_length())
        self._weight_addr_width = max(1, (c.weight_depth - 1).bit_length())
        self._threshold_addr_width = max(1, (c.threshold_depth - 1).bit_length())
        dim = range(c.activation_depth + 1)
        # the descriptor's fields (LayerDescriptor's, in its order), each narrowed to
        # the build's limits; `pool` is always 0 here (it lets a LayerDescriptor be
        # assigned whole)
        narrowed = {
            "in_h": dim, "in_w": dim, "channels": range(c.max_channels + 1),
            "out_h": dim, "out_w": dim, "out_channels": range(c.max_channels + 1),
            "kernel": range(c.max_kernel + 1), "stride": range(c.max_stride + 1),
            "padding": range(c.max_kernel), "pad_bit": 1, "raw": 1, "pool": 1,
            "input_base": self._act_addr_width, "output_base": self._act_addr_width,
            "weight_base": self._weight_addr_width,
            "threshold_base": self._threshold_addr_width,
        }
        self._descriptor_layout = data.StructLayout(
            {f.name: narrowed[f.name] for f in descriptor_fields() if f.name in narrowed})
        self._raw_layout = data.StructLayout({
            "pixel": range(c.activation_depth + c.rows),
            "channel": range(c.max_channels + c.cols),
            "p": data.ArrayLayout(c.acc_width, c.rows),
            "row_valid": c.rows,
        })
        super().__init__({
            "layer": In(self._descriptor_layout),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "busy_cycles": Out(COUNTER_WIDTH),
            "stall_cycles": Out(COUNTER_WIDTH),
            "stall": Out(1),
            "act_read": In(ReadPort.Signature(addr_width=self._act_addr_width, shape=c.simd)
                           ).array(c.rows),
            "act_write": In(WritePort.Signature(addr_width=self._act_addr_width,
                                                shape=c.simd)),
            "weights": In(ReadPort.Signature(addr_width=self._weight_addr_width,
                                             shape=data.ArrayLayout(c.simd, c.cols))),
            "thresholds": In(ReadPort.Signature(
                addr_width=self._threshold_addr_width,
                shape=data.ArrayLayout(threshold_layout(c), c.cols))),
            "raw": Out(valid_stream_signature(self._raw_layout)),
        }, src_loc_at=1 + src_loc_at)

    # -- parameters and host-side helpers ------------------------------------------------------
    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    @property
    def descriptor_layout(self) -> data.StructLayout:
        return self._descriptor_layout

    @property
    def raw_layout(self) -> data.StructLayout:
        return self._raw_layout

    def ideal_cycles(self, layer: WindowLayer, out_channels: int) -> int:
        """K-words the array consumes for the layer: ``groups · tiles · K_words``, the
        cycles of a perfectly fed array."""
        c = self._config
        return layer.groups(c.rows) * -(-out_channels // c.cols) * layer.k_words(c.simd)

    def descriptor(self, layer: WindowLayer, out_channels: int, *, input_base: int = 0,
                   output_base: int = 0, weight_base: int = 0, threshold_base: int = 0,
                   raw: bool = False) -> LayerDescriptor:
        """The ``layer`` descriptor of a convolution with ``out_channels`` outputs
        (:meth:`LayerDescriptor.conv <bitdet.core.descriptor.LayerDescriptor.conv>`; assign
        it to ``layer`` as it is, or ``encode_layer(**descriptor)``).

        Raises
        ------
        ValueError
            If the layer does not fit the accelerator: every
            :meth:`~bitdet.core.descriptor.LayerDescriptor.problems` of the descriptor
            but raw mode (which the controller runs and only the device refuses): the
            window generator's limits, the maps in their bank, the weights, the
            thresholds or ``K``.
        """
        c = self._config
        if isinstance(out_channels, bool) or not isinstance(out_channels, int):
            raise ValueError(f"out_channels must be an integer, not {out_channels!r}")
        desc = LayerDescriptor.conv(
            in_h=layer.in_h, in_w=layer.in_w, channels=layer.channels,
            out_channels=out_channels, kernel=layer.kernel, stride=layer.stride,
            padding=layer.padding, pad_bit=layer.pad_bit, raw=int(raw),
            input_base=input_base, output_base=output_base, weight_base=weight_base,
            threshold_base=threshold_base)
        problems = [str(p) for p in desc.problems(c) if p.field != "raw"]
        if problems:
            raise ValueError(f"layer {layer} with {out_channels} outputs does not fit: "
                             + "; ".join(problems))
        return desc

    # -- hardware ---------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        c = self._config
        rows, cols, simd = c.rows, c.cols, c.simd
        slots = simd // cols                         # tiles per output word
        max_words = -(-c.max_channels // simd)
        # out_h · out_w ≤ activation_depth: the output map fits its bank (descriptor(),
        # and CONFIGURE_LAYER's check)
        pixel_shape = range(c.activation_depth + rows)

        gen = m.submodules.window = WindowGenerator(
            rows=rows, simd=simd, depth=c.activation_depth, max_channels=c.max_channels,
            max_kernel=c.max_kernel, max_stride=c.max_stride,
            tag_width=self._weight_addr_width, max_tiles=-(-c.max_channels // cols),
            fixed_layer=True)
        array = m.submodules.array = SystolicArray(rows=rows, cols=cols, simd=simd,
                                                   acc_width=c.acc_width)
        stage = m.submodules.thresholds = ThresholdStage(config=c)
        writer = m.submodules.writer = OutputWriter(config=c)

        # the running layer: latched at `start`, or (embedded) the `layer` input itself,
        # which the executor holds while the layer runs
        desc = self.layer if self._embedded else Signal(self._descriptor_layout)

        # -- operand path: generator words + weight words side by side (window.py) -----------
        for r in range(rows):
            wiring.connect(m, wiring.flipped(self.act_read[r]), gen.read[r])
        operands = array.operands
        # the writer stores a completed output word in `rows` cycles, and a job completes
        # at most one word: in thresholded mode a job's `last` word is passed to the array
        # only ≥ rows cycles after the previous one (the array itself keeps them ≥ cols
        # apart), so that the writer is free when the next word completes
        may_pass = Signal()
        if rows > 1:
            since_last = Signal(range(rows), init=rows - 1)
            m.d.comb += may_pass.eq(~gen.words.payload.last | (since_last == rows - 1)
                                    | desc.raw)
            with m.If(operands.valid & operands.ready & operands.payload.last):
                m.d.sync += since_last.eq(0)
            with m.Elif(since_last != rows - 1):
                m.d.sync += since_last.eq(since_last + 1)
        else:
            m.d.comb += may_pass.eq(1)
        m.d.comb += [
            self.weights.addr.eq(gen.fetch.addr),
            self.weights.en.eq(gen.fetch.en),
            operands.valid.eq(gen.words.valid & may_pass),
            operands.payload.activations.eq(gen.words.payload.activations),
            operands.payload.weights.eq(self.weights.data),
            operands.payload.first.eq(gen.words.payload.first),
            operands.payload.last.eq(gen.words.payload.last),
            gen.words.ready.eq(operands.ready & may_pass),
        ]

        # -- derived sizes of the layer ------------------------------------------------------
        words = Signal(range(max_words + 1))              # ceil(C / simd)
        out_words = Signal(range(max_words + 1))          # ceil(O / simd)
        k_words = Signal(range(c.max_kernel ** 2 * max_words + 1))
        tiles = Signal(range(-(-c.max_channels // cols) + 1))   # ceil(O / cols)
        pixels = Signal(pixel_shape)                      # out_h · out_w
        group_step = Signal(self._act_addr_width)         # rows · ceil(O / simd)

        # -- issue side: one window-generator command per group, running all its tiles ------
        iss_n = Signal(pixel_shape)                       # first output pixel of the group
        iss_oy = Signal(range(c.activation_depth))
        iss_ox = Signal(range(c.activation_depth))
        step = Signal(range(rows))
        left = Signal(pixel_shape)
        m.d.comb += left.eq(pixels - iss_n)
        cmd = gen.command.payload
        m.d.comb += [
            cmd.in_h.eq(desc.in_h), cmd.in_w.eq(desc.in_w), cmd.out_w.eq(desc.out_w),
            cmd.channels.eq(desc.channels), cmd.words.eq(words), cmd.kernel.eq(desc.kernel),
            cmd.stride.eq(desc.stride), cmd.padding.eq(desc.padding),
            cmd.pad_bit.eq(desc.pad_bit), cmd.base.eq(desc.input_base),
            cmd.oy.eq(iss_oy), cmd.ox.eq(iss_ox),
            cmd.count.eq(Mux(left < rows, left, rows)),
            # tile t's weights at weight_base + t·K_words (pack_weights layout)
            cmd.tag.eq(desc.weight_base), cmd.tag_step.eq(k_words), cmd.tiles.eq(tiles),
        ]

        # -- result side: follows the array's results in job order -------------------------
        res_n = Signal(pixel_shape)
        res_o = Signal(range(c.max_channels + cols))
        slot = Signal(range(slots))                       # tile's place in its output word
        word_index = Signal(range(max_words + 1))
        group_addr = Signal(self._act_addr_width)         # output_base + res_n · out_words
        thr_addr = Signal(self._threshold_addr_width)
        finishing = Signal()                              # the last result has been packed

        results = array.results
        col = results.payload.column
        res_last_tile = Signal()
        res_last_group = Signal()
        job_end = Signal()
        m.d.comb += [
            res_last_tile.eq(res_o + cols >= desc.out_channels),
            res_last_group.eq(res_n + rows >= pixels),
            job_end.eq(results.valid & results.payload.last),
        ]
        # thresholds: the address of the job whose results are on `results` next cycle
        thr_next = Mux(res_last_tile, desc.threshold_base, thr_addr + 1)
        m.d.comb += [
            self.thresholds.addr.eq(Mux(job_end, thr_next, thr_addr)),
            self.thresholds.en.eq(1),
        ]
        # the threshold stage: the memory's word and the results, THRESHOLD_PIPELINE
        # cycles to the output bits
        m.d.comb += [
            stage.results.valid.eq(results.valid),
            stage.results.payload.column.eq(col),
            stage.results.payload.p.eq(results.payload.p),
            stage.thresholds.eq(self.thresholds.data),
            stage.raw.eq(desc.raw),
        ]
        with m.If(job_end):
            m.d.sync += thr_addr.eq(thr_next)
            with m.If(res_last_tile):
                m.d.sync += [res_o.eq(0), slot.eq(0), word_index.eq(0),
                             res_n.eq(res_n + rows), group_addr.eq(group_addr + group_step)]
            with m.Else():
                m.d.sync += res_o.eq(res_o + cols)
                with m.If(slot == slots - 1):
                    m.d.sync += [slot.eq(0), word_index.eq(word_index + 1)]
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)

        # output-side control, delayed by THRESHOLD_PIPELINE registers to align with the
        # threshold stage's outputs (the first register computes, the others pass it on)
        def delay(name, shape, value):
            return delayed(m, value, shape, THRESHOLD_PIPELINE, name)

        s_valid = delay("s_valid", 1, results.valid)
        s_column = delay("s_column", range(cols), col)
        s_slot = delay("s_slot", range(slots), slot)
        s_word_done = delay("s_word_done", 1, job_end & ((slot == slots - 1) | res_last_tile))
        s_final = delay("s_final", 1, job_end & res_last_tile & res_last_group)
        s_addr = delay("s_addr", self._act_addr_width, group_addr + word_index)
        s_row_valid = delay("s_row_valid", rows, Cat(res_n + r < pixels for r in range(rows)))
        s_channel = delay("s_channel", range(c.max_channels + cols), res_o + col)
        s_pixel = delay("s_pixel", pixel_shape, res_n)

        # -- output writer: bit slot·cols + column of each row's word, the completed words
        # of the real pixels into the write bank ----------------------------------------------
        wiring.connect(m, writer.act_write, wiring.flipped(self.act_write))
        wr_active = writer.busy
        m.d.comb += [
            writer.i.valid.eq(s_valid & ~desc.raw),
            writer.i.payload.bits.eq(Cat(stage.o.payload.value[r][0] for r in range(rows))),
            writer.i.payload.slot.eq(s_slot),
            writer.i.payload.column.eq(s_column),
            writer.i.payload.word_done.eq(s_word_done),
            writer.i.payload.addr.eq(s_addr),
            writer.i.payload.row_valid.eq(s_row_valid),
            writer.step.eq(out_words),
        ]
        with m.If(s_valid & s_final):
            m.d.sync += finishing.eq(1)

        # -- raw output: P of the real channels and pixels ----------------------------------
        m.d.comb += [
            self.raw.valid.eq(s_valid & desc.raw & (s_channel < desc.out_channels)),
            self.raw.payload.pixel.eq(s_pixel),
            self.raw.payload.channel.eq(s_channel),
            self.raw.payload.row_valid.eq(s_row_valid),
        ]
        m.d.comb += self.raw.payload.p.eq(stage.o.payload.value)

        # -- sequencer --------------------------------------------------------------------------
        m.d.sync += self.done.eq(0)
        with m.FSM(name="control"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += self.busy.eq(1)
                    if not self._embedded:
                        m.d.sync += [desc.eq(self.layer), self.busy_cycles.eq(0),
                                     self.stall_cycles.eq(0)]
                    m.next = "SETUP"
            with m.State("SETUP"):
                m.d.sync += [
                    words.eq(_ceil_div(desc.channels, simd, c.max_channels)),
                    out_words.eq(_ceil_div(desc.out_channels, simd, c.max_channels)),
                    pixels.eq(desc.out_h * desc.out_w),
                    tiles.eq(_ceil_div(desc.out_channels, cols, c.max_channels)),
                ]
                m.next = "START"
            with m.State("START"):
                m.d.sync += [
                    k_words.eq(desc.kernel * desc.kernel * words),
                    group_step.eq(out_words * Const(rows)),
                    iss_n.eq(0), iss_oy.eq(0), iss_ox.eq(0),
                    res_n.eq(0), res_o.eq(0), slot.eq(0), word_index.eq(0),
                    group_addr.eq(desc.output_base), thr_addr.eq(desc.threshold_base),
                    finishing.eq(0),
                ]
                m.next = "ISSUE"
            with m.State("ISSUE"):
                m.d.comb += gen.command.valid.eq(1)
                with m.If(gen.command.ready):
                    with m.If(left <= rows):
                        m.next = "DRAIN"
                    with m.Else():
                        m.d.sync += [iss_n.eq(iss_n + rows), step.eq(0)]
                        m.next = "ADVANCE"
            with m.State("ADVANCE"):
                # step the group's first pixel by `rows` pixels, one per cycle; the generator
                # takes its next command only rows + 4 cycles after this one anyway
                with m.If(iss_ox == desc.out_w - 1):
                    m.d.sync += [iss_ox.eq(0), iss_oy.eq(iss_oy + 1)]
                with m.Else():
                    m.d.sync += iss_ox.eq(iss_ox + 1)
                m.d.sync += step.eq(step + 1)
                with m.If(step == rows - 1):
                    m.next = "ISSUE"
            with m.State("DRAIN"):
                with m.If(finishing & ~wr_active):
                    m.d.sync += [self.busy.eq(0), self.done.eq(1)]
                    m.next = "IDLE"

        m.d.comb += self.stall.eq(self.busy & ~(operands.valid & operands.ready))
        if not self._embedded:
            with m.If(self.busy):
                m.d.sync += self.busy_cycles.eq(self.busy_cycles + 1)
            with m.If(self.stall):
                m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        return m
