"""Contract-2 layer controller: bit-serial n-bit input planes, n-bit outputs and
shortcut-selected threshold rows, on flat map-slot addresses (docs/protocol.md,
"Contract 2"; docs/hardware.md, "Contract-2 controller").

The issue side is the contract-1 controller's (:mod:`bitdet.hw.controller`): one
window-generator command per group of ``rows`` output pixels runs all ``tiles`` tiles of
``cols`` output channels, and each job now streams the ``K`` words of every input plane in
turn (``n·K`` words, the plane number travelling as the array's ``shift``), so the array
accumulates ``A = Σ_b 2**b·P_b`` (:mod:`bitdet.hw.array`).

**Job context.** Output channel ``o`` of output pixel ``p`` is the level
``#{k < 2**m − 1 : A ≥ T[o, r, k]}`` of threshold row ``r``, the shortcut map's level at
``(p, o)`` (``r = 0`` without a shortcut). Before a job's results reach the threshold
stage its **context** is loaded: the ``R = 2**s`` threshold entries of its tile
(``threshold_base + t·R + r``, one read each on the threshold memories' shared port) and
the ``s`` planes of the shortcut words of its ``rows`` pixels (``rows·s`` reads on
``sc_read``), both in the same ``load = max(R, rows·s)`` cycles. The loader fills a
second context register while the current one is in use; the two swap at the end of a
job (the array's last result column), so a job's context must be loaded within one job
period: the issue side passes a job's last K-word to the array only ``guard = max(cols,
rows·m, load + 2)`` cycles after the previous one, which also leaves the output writer
the ``rows·m`` cycles it needs for the ``m`` planes of a completed word. The first job's
context is loaded before the first command is issued (state ``PRELOAD``).

**Threshold stage.** The result column ``c`` of every row selects its thresholds from the
context (column ``c`` of entry ``r``: a ``cols``:1 and an ``R``:1 multiplexer), registered
with ``A``; a :class:`~bitdet.hw.threshold.LevelThresholdUnit` per row gives the level one
cycle later (``THRESHOLD_PIPELINE`` = 2 registers, as contract 1).

**Output writer.** Each row keeps ``output_bits`` plane words; bit ``b`` of a level goes
to plane ``b``'s word at bit ``slot·cols + column``. A completed word (the tile's last
slot, or the layer's last tile) moves to the shadow registers and is written plane by
plane, row by row (``rows·m`` cycles, rows that are not real pixels skipped) at
``output + b·map_words + pixel·ceil(O/simd) + word``, the layout of
:func:`~bitdet.core.packing.pack_levels` in the output slot.

**Cycles.** ``bitdet.core.cycles.layer_cycles`` gives the busy and stall cycles this
controller counts (docs/hardware.md derives it); ``tests/test_hw_controller_v2.py``
checks it on random layers.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import data, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import COUNTER_WIDTH, THRESHOLD_PIPELINE
from bitdet.core.descriptor import extended_descriptor_layout

from ._util import _ceil_div, delayed
from .array import SystolicArray
from .memory import threshold_layout
from .pass_engine import slot_addr_width
from .pe import valid_stream_signature
from .threshold import LevelThresholdUnit
from .window import WindowGenerator

__all__ = ["LayerControllerV2"]


class JobContext(wiring.Component):
    """The context of the job whose results the threshold stage takes: its tile's ``R =
    2**s`` threshold entries and its pixels' shortcut levels, loaded one job ahead
    (module docs, "Job context").

    ``init`` (a pulse, with ``sizes`` valid from that cycle on) restarts the loader at job
    0; it then loads each job's context in the result side's order (group-major, tile-minor)
    into a second register set, in ``load = max(R, rows·s)`` cycles of reads on
    ``threshold_read`` (entry ``threshold_base + t·R + r``) and ``sc_read`` (plane ``b`` of
    the shortcut word of pixel ``n + i`` at ``sc_flat + b·out_plane + (n + i)·out_words +
    word``; rows that are not real pixels are not read), and swaps it in when the current
    job ends (``job_end``: its last result column) — or at once while none is loaded.
    ``loaded`` is high while a context is in use; ``thresholds[r]`` is, combinationally,
    the thresholds of result column ``column`` for row ``r`` (the entry of that pixel's
    shortcut level).

    A context is always loaded in time if consecutive ``job_end`` s are at least ``load +
    2`` cycles apart and the first results come after ``loaded``.

    Parameters
    ----------
    config : AcceleratorConfig
        A contract-2 build.

    Members
    -------
    init, job_end : ``In(1)``
    sizes : ``In(sizes_layout)``
        ``threshold_base``, ``sc_flat``, ``pixels``, ``out_channels``, ``out_words``,
        ``out_plane`` (``pixels·out_words``), ``group_step`` (``rows·out_words``),
        ``t_rows`` (R), ``sc_reads`` (``rows·s``), ``load``.
    column : ``In(range(cols))``
    loaded : ``Out(1)``
    thresholds : ``Out(ArrayLayout(threshold_layout, rows))``
    threshold_read, sc_read : the read ports (threshold memories, slot memory).
    """

    def __init__(self, *, config: AcceleratorConfig):
        self._config = c = config
        aw = slot_addr_width(c)
        rows, cols, s_max = c.rows, c.cols, c.max_shortcut_bits
        self._threshold_addr_width = max(1, (c.threshold_depth - 1).bit_length())
        self._load_max = max(1 << s_max, rows * s_max)
        self._sizes_layout = data.StructLayout({
            "threshold_base": self._threshold_addr_width,
            "sc_flat": aw,
            "pixels": range(c.activation_depth + rows),
            "out_channels": range(c.max_channels + 1),
            "out_words": range(-(-c.max_channels // c.simd) + 1),
            "out_plane": aw,
            "group_step": aw,
            "t_rows": range((1 << s_max) + 1),
            "sc_reads": range(rows * s_max + 1),
            "load": range(self._load_max + 1),
        })
        super().__init__({
            "init": In(1),
            "job_end": In(1),
            "sizes": In(self._sizes_layout),
            "column": In(range(cols)),
            "loaded": Out(1),
            "thresholds": Out(data.ArrayLayout(threshold_layout(c), rows)),
            "threshold_read": In(ReadPort.Signature(
                addr_width=self._threshold_addr_width,
                shape=data.ArrayLayout(threshold_layout(c), cols))),
            "sc_read": In(ReadPort.Signature(addr_width=aw, shape=c.simd)),
        })

    @property
    def sizes_layout(self) -> data.StructLayout:
        return self._sizes_layout

    def elaborate(self, platform):
        m = Module()
        c = self._config
        rows, cols, simd = c.rows, c.cols, c.simd
        s_max = c.max_shortcut_bits
        r_max = 1 << s_max
        tiles_per_word = simd // cols
        aw = slot_addr_width(c)
        load_max = self._load_max
        z = self.sizes
        entry = threshold_layout(c)

        ctx_thr = [Signal(data.ArrayLayout(entry, cols), name=f"ctx_thr{e}")
                   for e in range(r_max)]
        nxt_thr = [Signal(data.ArrayLayout(entry, cols), name=f"nxt_thr{e}")
                   for e in range(r_max)]
        # levels of row r: s_max bits per column, bit b of column j at j·s_max + b
        lvl_bits = cols * max(1, s_max)
        ctx_lvl = [Signal(lvl_bits, name=f"ctx_lvl{r}") for r in range(rows)]
        nxt_lvl = [Signal(lvl_bits, name=f"nxt_lvl{r}") for r in range(rows)]
        ctx_free = Signal(init=1)
        nxt_full = Signal()
        swap = Signal()
        m.d.comb += [swap.eq(nxt_full & (ctx_free | self.job_end)),
                     self.loaded.eq(~ctx_free)]
        with m.If(swap):
            m.d.sync += [ctx_free.eq(0), nxt_full.eq(0)]
            m.d.sync += [ctx_thr[e].eq(nxt_thr[e]) for e in range(r_max)]
            m.d.sync += [ctx_lvl[r].eq(nxt_lvl[r]) for r in range(rows)]
        with m.Elif(self.job_end):
            m.d.sync += ctx_free.eq(1)

        # -- the selection: column `column` of each row's entry --------------------------
        col_thr = [Signal(entry, name=f"col_thr{e}") for e in range(r_max)]
        m.d.comb += [col_thr[e].eq(ctx_thr[e][self.column]) for e in range(r_max)]
        for r in range(rows):
            sel = col_thr[0]
            if s_max:
                # only the layer's s planes were loaded: the bits above them are stale (a
                # layer with a wider shortcut ran before), R − 1 masks them
                level = ctx_lvl[r].word_select(self.column, s_max) & (z.t_rows - 1)
                for e in range(1, r_max):
                    sel = Mux(level == e, col_thr[e], sel)
            m.d.comb += self.thresholds[r].eq(sel)

        # -- the loader: the jobs in the result side's order, one context ahead ------------
        more = Signal()                                   # jobs left to load
        busy = Signal()
        k = Signal(range(load_max + 1))                   # read cycle of the load
        n = Signal(range(c.activation_depth + rows))      # the job's first pixel
        o = Signal(range(c.max_channels + cols))          # the job's first channel
        tile_slot = Signal(range(tiles_per_word))         # the tile within its word
        thr = Signal(self._threshold_addr_width)          # threshold_base + t·R
        taddr = Signal(self._threshold_addr_width)        # thr + k
        group = Signal(aw)                                # sc_flat + n·out_words
        word = Signal(aw)                                 # … + the tile's word
        plane = Signal(aw)                                # row 0's word of plane b
        addr = Signal(aw)                                 # the shortcut word being read
        r_i = Signal(range(rows))
        b_i = Signal(range(max(1, s_max)))
        sc = Signal()
        m.d.comb += [
            sc.eq(busy & (k < z.sc_reads) & (n + r_i < z.pixels)),
            self.threshold_read.addr.eq(taddr),
            self.threshold_read.en.eq(busy & (k < z.t_rows)),
            self.sc_read.addr.eq(addr),
            self.sc_read.en.eq(sc),
        ]
        # the read data, one cycle later
        got_thr, got_sc, got_last = Signal(), Signal(), Signal()
        got_k = Signal.like(k)
        got_r, got_b, got_slot = Signal.like(r_i), Signal.like(b_i), Signal.like(tile_slot)
        m.d.sync += [got_thr.eq(self.threshold_read.en), got_k.eq(k), got_sc.eq(sc),
                     got_r.eq(r_i), got_b.eq(b_i), got_slot.eq(tile_slot),
                     got_last.eq(busy & (k == z.load - 1))]
        with m.If(got_thr):
            for e in range(r_max):
                with m.If(got_k == e):
                    m.d.sync += nxt_thr[e].eq(self.threshold_read.data)
        if s_max:
            tile_bits = self.sc_read.data.word_select(got_slot, cols)
            with m.If(got_sc):
                for r in range(rows):
                    for b in range(s_max):
                        with m.If((got_r == r) & (got_b == b)):
                            m.d.sync += [nxt_lvl[r][j * s_max + b].eq(tile_bits[j])
                                         for j in range(cols)]
        with m.If(got_last):
            m.d.sync += nxt_full.eq(1)

        with m.If(busy):
            m.d.sync += [k.eq(k + 1), taddr.eq(taddr + 1)]
            with m.If(r_i == rows - 1):                 # plane by plane, row by row
                m.d.sync += [r_i.eq(0), b_i.eq(b_i + 1), plane.eq(plane + z.out_plane),
                             addr.eq(plane + z.out_plane)]
            with m.Else():
                m.d.sync += [r_i.eq(r_i + 1), addr.eq(addr + z.out_words)]
            with m.If(k == z.load - 1):                 # the load ends: the next job
                m.d.sync += [busy.eq(0), k.eq(0), r_i.eq(0), b_i.eq(0)]
                with m.If(o + cols >= z.out_channels):
                    m.d.sync += [o.eq(0), tile_slot.eq(0), n.eq(n + rows),
                                 thr.eq(z.threshold_base), group.eq(group + z.group_step),
                                 word.eq(group + z.group_step),
                                 more.eq(n + rows < z.pixels)]
                with m.Else():
                    m.d.sync += [o.eq(o + cols), thr.eq(thr + z.t_rows)]
                    with m.If(tile_slot == tiles_per_word - 1):
                        m.d.sync += [tile_slot.eq(0), word.eq(word + 1)]
                    with m.Else():
                        m.d.sync += tile_slot.eq(tile_slot + 1)
        with m.Elif(more & ~got_last & (~nxt_full | swap)):
            # (in the cycle of a swap `nxt` is free from the next cycle on, when the first
            # read's data can arrive at the earliest)
            m.d.sync += [busy.eq(1), plane.eq(word), addr.eq(word), taddr.eq(thr)]
        with m.If(self.init):                             # overrides the above
            m.d.sync += [more.eq(1), busy.eq(0), k.eq(0), n.eq(0), o.eq(0),
                         tile_slot.eq(0), r_i.eq(0), b_i.eq(0), thr.eq(z.threshold_base),
                         group.eq(z.sc_flat), word.eq(z.sc_flat), ctx_free.eq(1),
                         nxt_full.eq(0)]
        return m


class PlaneWriter(wiring.Component):
    """The contract-2 output writer: packs each row's output levels into ``m`` plane
    words and writes a completed word's planes, plane by plane and row by row.

    Each row keeps ``output_bits`` plane words; a transfer on ``i`` sets bit ``slot·cols
    + column`` of row ``r``'s plane-``b`` word to bit ``b`` of ``levels[r]``. With
    ``word_done`` the words (with that bit) move to the shadow registers and are written
    one per cycle over ``writes`` (``rows·m``) cycles: plane ``b``, row ``r`` at ``addr
    + b·plane_step + r·step``, skipping rows that ``row_valid`` marks as no real pixel. A
    word must complete at most once per ``rows·m`` cycles (the controller's guard).

    Members
    -------
    i : ``In(valid_stream_signature(input_layout))``
        ``levels`` (``rows`` × ``output_bits``), ``slot``, ``column``, ``word_done``,
        ``addr`` (row 0's word of plane 0), ``row_valid``.
    step, plane_step : ``In(addr_width)``
        ``ceil(O / simd)`` and the words of one output plane.
    writes : ``In(range(rows·output_bits + 1))``
    act_write : ``In(WritePort.Signature(addr_width=, shape=simd))``
    busy : ``Out(1)``
    """

    def __init__(self, *, config: AcceleratorConfig):
        self._config = c = config
        aw = slot_addr_width(c)
        self._input_layout = data.StructLayout({
            "levels": data.ArrayLayout(c.output_bits, c.rows),
            "slot": range(c.simd // c.cols),
            "column": range(c.cols),
            "word_done": 1,
            "addr": aw,
            "row_valid": c.rows,
        })
        super().__init__({
            "i": In(valid_stream_signature(self._input_layout)),
            "step": In(aw),
            "plane_step": In(aw),
            "writes": In(range(c.rows * c.output_bits + 1)),
            "act_write": In(WritePort.Signature(addr_width=aw, shape=c.simd)),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        c = self._config
        rows, cols, simd, m_max = c.rows, c.cols, c.simd, c.output_bits
        i = self.i.payload
        aw = slot_addr_width(c)
        word = [[Signal(simd, name=f"word{r}_{b}") for b in range(m_max)] for r in range(rows)]
        shadow = [Signal(simd, name=f"shadow{k}") for k in range(rows * m_max)]  # b·rows + r
        count = Signal(range(rows * m_max + 1))
        mask = Signal(rows * m_max)
        addr = Signal(aw)
        plane = Signal(aw)                                # row 0's word of the plane
        row = Signal(range(rows))
        m.d.comb += self.busy.eq(count != 0)
        hot = Cat(Cat((i.slot == k) & (i.column == j) for j in range(cols))
                  for k in range(simd // cols))           # bit k·cols + j
        with m.If(self.busy):                             # the shift (below) …
            m.d.sync += [shadow[k].eq(shadow[k + 1]) for k in range(rows * m_max - 1)]
        for r in range(rows):
            for b in range(m_max):
                bit = i.levels[r][b]
                word_next = Cat(Mux(hot[k], bit, word[r][b][k]) for k in range(simd))
                with m.If(self.i.valid):
                    with m.If(i.word_done):               # … yields to a new word
                        m.d.sync += [shadow[b * rows + r].eq(word_next), word[r][b].eq(0)]
                    with m.Else():
                        m.d.sync += word[r][b].eq(word_next)
        m.d.comb += [
            self.act_write.en.eq(self.busy & mask[0]),
            self.act_write.addr.eq(addr),
            self.act_write.data.eq(shadow[0]),
        ]
        with m.If(self.busy):
            m.d.sync += [count.eq(count - 1), mask.eq(mask >> 1)]
            with m.If(row == rows - 1):
                m.d.sync += [row.eq(0), plane.eq(plane + self.plane_step),
                             addr.eq(plane + self.plane_step)]
            with m.Else():
                m.d.sync += [row.eq(row + 1), addr.eq(addr + self.step)]
        with m.If(self.i.valid & i.word_done):
            m.d.sync += [count.eq(self.writes),
                         mask.eq(Cat(i.row_valid for _ in range(m_max))),
                         addr.eq(i.addr), plane.eq(i.addr), row.eq(0)]
        return m


class LayerControllerV2(wiring.Component):
    """Runs one contract-2 convolution described by ``layer`` after a ``start`` pulse.

    **Descriptor** (``layer``, the 48-byte extended descriptor of
    :class:`~bitdet.core.descriptor.LayerDescriptor`; sampled in the cycle of ``start``
    unless ``embedded``): the geometry, ``in_bits`` (n), ``out_bits`` (m),
    ``shortcut_bits`` (s), ``pad_level``, the slots and bases of the input, output and
    shortcut maps, ``weight_base`` and ``threshold_base``. Addresses on the activation
    ports are flat: ``slot·activation_depth + word``. The controller assumes a descriptor
    that CONFIGURE_LAYER has accepted (``LayerDescriptor.problems`` is empty).

    **Status.** As :class:`~bitdet.hw.controller.LayerController`: ``busy`` from the
    cycle after ``start`` until the last word is written, ``done`` pulses in the first
    idle cycle, ``stall`` is high in the busy cycles in which the array takes no K-word,
    ``busy_cycles`` / ``stall_cycles`` count them (not ``embedded``).

    Parameters
    ----------
    config : AcceleratorConfig
        A contract-2 build (``simd`` a multiple of ``cols``).
    embedded : bool
        For the executor: ``layer`` is used as it is (held while the layer runs) and the
        counters stay 0.

    Members
    -------
    layer : ``In(extended_descriptor_layout())``
    start : ``In(1)``
    busy, done, stall : ``Out(1)``
    busy_cycles, stall_cycles : ``Out(COUNTER_WIDTH)``
    act_read : ``In(ReadPort.Signature(addr_width=, shape=simd)).array(rows)``
        The window generator's ports (array row ``r``).
    sc_read : ``In(ReadPort.Signature(addr_width=, shape=simd))``
        The shortcut map's reads.
    act_write : ``In(WritePort.Signature(addr_width=, shape=simd))``
    weights, thresholds : the column memories' read ports, as the contract-1 controller's.
    ctx_miss : ``Out(1)``
        For verification: a result column reached the threshold stage with no context
        loaded (never, if the guard is right).

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    ValueError
        If ``config`` is not a contract-2 build or ``simd`` is not a multiple of ``cols``.
    """

    def __init__(self, *, config: AcceleratorConfig, embedded: bool = False):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        if config.contract != 2:
            raise ValueError(f"LayerControllerV2 runs contract 2, config {config.name!r} is "
                             f"contract {config.contract} (use LayerController)")
        if config.simd % config.cols:
            raise ValueError(f"the layer controller needs simd ({config.simd}) to be a "
                             f"multiple of cols ({config.cols})")
        self._config = c = config
        self._embedded = bool(embedded)
        aw = slot_addr_width(c)
        self._weight_addr_width = max(1, (c.weight_depth - 1).bit_length())
        self._threshold_addr_width = max(1, (c.threshold_depth - 1).bit_length())
        super().__init__({
            "layer": In(extended_descriptor_layout()),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "stall": Out(1),
            "busy_cycles": Out(COUNTER_WIDTH),
            "stall_cycles": Out(COUNTER_WIDTH),
            "act_read": In(ReadPort.Signature(addr_width=aw, shape=c.simd)).array(c.rows),
            "sc_read": In(ReadPort.Signature(addr_width=aw, shape=c.simd)),
            "act_write": In(WritePort.Signature(addr_width=aw, shape=c.simd)),
            "weights": In(ReadPort.Signature(addr_width=self._weight_addr_width,
                                             shape=data.ArrayLayout(c.simd, c.cols))),
            "thresholds": In(ReadPort.Signature(
                addr_width=self._threshold_addr_width,
                shape=data.ArrayLayout(threshold_layout(c), c.cols))),
            "ctx_miss": Out(1),
        })

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    # -- hardware ---------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        c = self._config
        rows, cols, simd = c.rows, c.cols, c.simd
        n_max, m_max, s_max = c.max_input_bits, c.output_bits, c.max_shortcut_bits
        r_max = 1 << s_max                               # threshold rows per tile
        tiles_per_word = simd // cols
        max_words = -(-c.max_channels // simd)
        max_tiles = -(-c.max_channels // cols)
        aw = slot_addr_width(c)
        depth = c.activation_depth
        pixel_shape = range(depth + rows)
        load_max = max(r_max, rows * s_max)
        guard_max = max(cols, rows * m_max, load_max + 2)

        gen = m.submodules.window = WindowGenerator(
            rows=rows, simd=simd, depth=c.activation_slots * depth,
            max_channels=c.max_channels, max_kernel=c.max_kernel, max_stride=c.max_stride,
            tag_width=self._weight_addr_width, max_tiles=max_tiles, fixed_layer=True,
            max_planes=n_max)
        array = m.submodules.array = SystolicArray(rows=rows, cols=cols, simd=simd,
                                                   acc_width=c.acc_width,
                                                   max_input_bits=n_max)

        desc = self.layer if self._embedded else Signal(extended_descriptor_layout())

        def flat(slot, base):
            """``slot·activation_depth + base`` (a concatenation for a power-of-two depth)."""
            if depth & (depth - 1) == 0:
                return Cat(base[:(depth - 1).bit_length()], slot)[:aw]
            return (slot * depth + base)[:aw]

        # -- derived sizes (SETUP, START) --------------------------------------------------
        words = Signal(range(max_words + 1))              # ceil(C / simd)
        out_words = Signal(range(max_words + 1))          # ceil(O / simd)
        k_words = Signal(range(c.max_kernel ** 2 * max_words + 1))
        tiles = Signal(range(max_tiles + 1))
        pixels = Signal(pixel_shape)                      # out_h · out_w
        in_plane = Signal(aw)                             # in_h · in_w · words
        out_plane = Signal(aw)                            # pixels · out_words
        group_step = Signal(aw)                           # rows · out_words
        in_flat = Signal(aw)
        out_flat = Signal(aw)
        sc_flat = Signal(aw)
        t_rows = Signal(range(r_max + 1))                 # R = 2**s
        load = Signal(range(load_max + 1))                # max(R, rows·s)
        sc_reads = Signal(range(rows * s_max + 1))        # rows·s
        guard = Signal(range(guard_max + 1))
        writes = Signal(range(rows * m_max + 1))          # rows·m

        # -- operand path --------------------------------------------------------------------
        for r in range(rows):
            wiring.connect(m, wiring.flipped(self.act_read[r]), gen.read[r])
        operands = array.operands
        # a job's last word passes ≥ guard cycles after the previous job's (module docs)
        may_pass = Signal()
        since_last = Signal(range(guard_max + 1))
        m.d.comb += may_pass.eq(~gen.words.payload.last | (since_last >= guard - 1))
        with m.If(operands.valid & operands.ready & operands.payload.last):
            m.d.sync += since_last.eq(0)
        with m.Elif(since_last < guard_max):
            m.d.sync += since_last.eq(since_last + 1)
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
        if n_max > 1:
            m.d.comb += operands.payload.shift.eq(gen.words.payload.shift)

        # -- issue side: one generator command per group, all its tiles ----------------------
        iss_n = Signal(pixel_shape)
        iss_oy = Signal(range(depth))
        iss_ox = Signal(range(depth))
        step = Signal(range(rows))
        left = Signal(pixel_shape)
        m.d.comb += left.eq(pixels - iss_n)
        cmd = gen.command.payload
        m.d.comb += [
            cmd.in_h.eq(desc.in_h), cmd.in_w.eq(desc.in_w), cmd.out_w.eq(desc.out_w),
            cmd.channels.eq(desc.channels), cmd.words.eq(words), cmd.kernel.eq(desc.kernel),
            cmd.stride.eq(desc.stride), cmd.padding.eq(desc.padding),
            cmd.pad_bit.eq(desc.pad_level[0]),
            cmd.base.eq(in_flat), cmd.oy.eq(iss_oy), cmd.ox.eq(iss_ox),
            cmd.count.eq(Mux(left < rows, left, rows)),
            cmd.tag.eq(desc.weight_base), cmd.tag_step.eq(k_words), cmd.tiles.eq(tiles),
        ]
        if n_max > 1:
            m.d.comb += [cmd.planes.eq(desc.in_bits), cmd.plane_step.eq(in_plane),
                         cmd.pad_level.eq(desc.pad_level)]

        # -- job contexts: R threshold entries and the rows' shortcut levels ----------------
        context = m.submodules.context = JobContext(config=c)
        wiring.connect(m, wiring.flipped(self.thresholds), context.threshold_read)
        wiring.connect(m, wiring.flipped(self.sc_read), context.sc_read)
        z = context.sizes
        m.d.comb += [
            z.threshold_base.eq(desc.threshold_base), z.sc_flat.eq(sc_flat),
            z.pixels.eq(pixels), z.out_channels.eq(desc.out_channels),
            z.out_words.eq(out_words), z.out_plane.eq(out_plane),
            z.group_step.eq(group_step), z.t_rows.eq(t_rows), z.sc_reads.eq(sc_reads),
            z.load.eq(load),
        ]

        # -- result side: follows the array's results in job order ----------------------------
        res_n = Signal(pixel_shape)
        res_o = Signal(range(c.max_channels + cols))
        slot = Signal(range(tiles_per_word))
        word_index = Signal(range(max_words + 1))
        group_addr = Signal(aw)                           # out_flat + res_n · out_words
        finishing = Signal()
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
        with m.If(job_end):
            with m.If(res_last_tile):
                m.d.sync += [res_o.eq(0), slot.eq(0), word_index.eq(0),
                             res_n.eq(res_n + rows), group_addr.eq(group_addr + group_step)]
            with m.Else():
                m.d.sync += res_o.eq(res_o + cols)
                with m.If(slot == tiles_per_word - 1):
                    m.d.sync += [slot.eq(0), word_index.eq(word_index + 1)]
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)

        # threshold stage 1: A and each row's thresholds (the context's selection)
        q_valid = Signal()
        q_a = [Signal(c.acc_width, name=f"q_a{r}") for r in range(rows)]
        q_thr = [Signal(threshold_layout(c), name=f"q_thr{r}") for r in range(rows)]
        m.d.comb += [context.column.eq(col), context.job_end.eq(job_end),
                     self.ctx_miss.eq(results.valid & ~context.loaded)]
        m.d.sync += q_valid.eq(results.valid)
        m.d.sync += [q_a[r].eq(results.payload.p[r]) for r in range(rows)]
        m.d.sync += [q_thr[r].eq(context.thresholds[r]) for r in range(rows)]
        # threshold stage 2: the levels
        levels = []
        for r in range(rows):
            unit = m.submodules[f"threshold{r}"] = LevelThresholdUnit(
                acc_width=c.acc_width, output_bits=m_max)
            m.d.comb += [unit.i.valid.eq(q_valid), unit.i.payload.a.eq(q_a[r]),
                         unit.i.payload.out_bits.eq(desc.out_bits)]
            m.d.comb += [unit.i.payload.thresholds[j].eq(q_thr[r][j])
                         for j in range(unit.threshold_count)]
            levels.append(unit.o.payload.level)

        def delay(name, shape, value):
            return delayed(m, value, shape, THRESHOLD_PIPELINE, name)

        s_valid = delay("s_valid", 1, results.valid)
        s_column = delay("s_column", range(cols), col)
        s_slot = delay("s_slot", range(tiles_per_word), slot)
        s_word_done = delay("s_word_done", 1,
                            job_end & ((slot == tiles_per_word - 1) | res_last_tile))
        s_final = delay("s_final", 1, job_end & res_last_tile & res_last_group)
        s_addr = delay("s_addr", aw, group_addr + word_index)
        s_row_valid = delay("s_row_valid", rows, Cat(res_n + r < pixels for r in range(rows)))
        with m.If(s_valid & s_final):
            m.d.sync += finishing.eq(1)

        # -- output writer: the m planes of each completed word ------------------------------
        writer = m.submodules.writer = PlaneWriter(config=c)
        wiring.connect(m, writer.act_write, wiring.flipped(self.act_write))
        wr_busy = writer.busy
        m.d.comb += [
            writer.i.valid.eq(s_valid),
            writer.i.payload.slot.eq(s_slot),
            writer.i.payload.column.eq(s_column),
            writer.i.payload.word_done.eq(s_word_done),
            writer.i.payload.addr.eq(s_addr),
            writer.i.payload.row_valid.eq(s_row_valid),
            writer.step.eq(out_words),
            writer.plane_step.eq(out_plane),
            writer.writes.eq(writes),
        ]
        m.d.comb += [writer.i.payload.levels[r].eq(levels[r]) for r in range(rows)]

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
                    in_flat.eq(flat(desc.input_slot, desc.input_base)),
                    out_flat.eq(flat(desc.output_slot, desc.output_base)),
                    sc_flat.eq(flat(desc.shortcut_slot, desc.shortcut_base)),
                    t_rows.eq(Const(1, r_max.bit_length() + 1)
                              << desc.shortcut_bits[:max(1, s_max.bit_length())]
                              if s_max else 1),
                    sc_reads.eq(desc.shortcut_bits * rows if s_max else 0),
                    writes.eq(desc.out_bits * rows),
                ]
                m.next = "START"
            with m.State("START"):
                m.d.sync += [
                    k_words.eq(desc.kernel * desc.kernel * words),
                    group_step.eq(out_words * Const(rows)),
                    in_plane.eq(desc.in_h * desc.in_w * words),
                    out_plane.eq(pixels * out_words),
                    load.eq(Mux(t_rows > sc_reads, t_rows, sc_reads)),
                    iss_n.eq(0), iss_oy.eq(0), iss_ox.eq(0),
                    res_n.eq(0), res_o.eq(0), slot.eq(0), word_index.eq(0),
                    group_addr.eq(out_flat), finishing.eq(0),
                ]
                # the loader restarts: the first job's context, swapped in at once
                m.d.comb += context.init.eq(1)
                m.next = "GUARD"
            with m.State("GUARD"):
                # the job period guard: max(cols, rows·m, load + 2)
                g = Mux(Const(cols) > writes, Const(cols), writes)
                m.d.sync += [guard.eq(Mux(g > load + 2, g, load + 2)),
                             since_last.eq(guard_max)]
                m.next = "PRELOAD"
            with m.State("PRELOAD"):
                with m.If(context.loaded):
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
                with m.If(iss_ox == desc.out_w - 1):
                    m.d.sync += [iss_ox.eq(0), iss_oy.eq(iss_oy + 1)]
                with m.Else():
                    m.d.sync += iss_ox.eq(iss_ox + 1)
                m.d.sync += step.eq(step + 1)
                with m.If(step == rows - 1):
                    m.next = "ISSUE"
            with m.State("DRAIN"):
                with m.If(finishing & ~wr_busy):
                    m.d.sync += [self.busy.eq(0), self.done.eq(1)]
                    m.next = "IDLE"

        m.d.comb += self.stall.eq(self.busy & ~(operands.valid & operands.ready))
        if not self._embedded:
            with m.If(self.busy):
                m.d.sync += self.busy_cycles.eq(self.busy_cycles + 1)
            with m.If(self.stall):
                m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        return m
