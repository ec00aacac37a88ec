"""Contract-2 pass engine: max-pool passes over n-bit levels and channel-repeat passes,
from one map slot into another (docs/protocol.md, "Contract 2"; docs/hardware.md).

Both passes address the activation memory flat, word ``slot · activation_depth + word``
(:func:`slot_addr_width` bits); an n-bit map is n bit-planes, plane ``b`` at ``base +
b · map_words`` of its slot (docs/packing.md), each packed like a 1-bit map (``W =
ceil(C / simd)`` channel words per pixel, pixels row-major, channel padding bits 0).

**Pool** (``pool = 1``). The loop of :class:`bitdet.hw.pool.PoolEngine` (output pixel,
channel word ``w``, tap ``(ky, kx)``) with one more, innermost loop over the planes,
**most significant first**: ``n`` reads per tap, one per cycle, never pausing. The max is
taken bit-serially: per channel the running max's level ``acc`` (``n × simd`` bits) and two
flags per tap (``tap_gt``: the tap's higher bits already exceed the max's, ``acc_gt``: the
other way round), reset at each tap's top plane. For the tap bit ``t`` and the max's bit
``a`` of the same plane the new max's bit is ``(t & ~acc_gt) | (a & ~tap_gt)``, and
``tap_gt |= t & ~a & ~acc_gt``, ``acc_gt |= a & ~t & ~tap_gt``: no n-bit comparators, and
the output plane ``b`` of a word is known in the cycle plane ``b`` of its last tap
arrives, so it is written then (``n`` writes at the end of every ``kernel² · n`` reads)
without a shadow register, and only the last word's plane 0 is written after the last
read. For ``n = 1`` this is the OR of the window. Addresses step by additions of values
derived once per pass: ``W``, ``stride·W``, ``in_w·W``, ``stride·in_w·W`` as the contract-1
engine, and the plane steps ``in_h·in_w·W`` / ``out_h·out_w·W`` (one shared multiplier
``h × w`` in the setup cycles; none in a ``max_input_bits = 1`` build).

**Repeat** (``repeat = 1``). Plane by plane, pixel by pixel (so both maps are read and
written at consecutive addresses): ``Win = ceil(C / simd)`` read cycles into a buffer of
``ceil(max_channels / simd)`` words, then ``Wout = ceil(O / simd)`` write cycles. Output
word ``j`` is ``simd`` bits of the input's ``C`` channels repeated, from channel ``p =
(j · simd) mod C`` on (``p`` advances by ``simd mod C``, one conditional subtraction):
the buffer shifted right by ``p`` for the first ``C − p`` channels, then the first word of
the repetition (``Y[i]`` = channel ``i mod C``) shifted left by ``C − p``; bits beyond
``O`` are 0. Each word is written one cycle after its write cycle, so the next pixel's
reads overlap the last write.

**Cycles.** ``start`` in cycle 0; ``busy`` from cycle 1: three setup cycles, the loop
(one read, or one write cycle of a repeat pass, every cycle), one cycle for the last
write; ``done`` pulses in the cycle after. Exactly :func:`bitdet.core.cycles.pass_cycles`::

    pool    busy = n · out_h · out_w · ceil(C / simd) · kernel² + 4,   stall = 4
    repeat  busy = n · h · w · (ceil(C / simd) + ceil(O / simd)) + 4,    stall = 4

``stall`` is high in the busy cycles outside the loop (the setup and the last write).
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.cycles import COUNTER_WIDTH
from bitdet.core.descriptor import extended_descriptor_layout

from ._util import _ceil_div, mul_small

__all__ = ["PassEngine", "slot_addr_width"]


def slot_addr_width(config: AcceleratorConfig) -> int:
    """Bits of a flat activation address ``slot · activation_depth + word`` of a
    contract-2 build."""
    return max(1, (config.activation_slots * config.activation_depth - 1).bit_length())


def _low_mask(count, width: int) -> Value:
    """``width`` bits, bit ``i`` set where ``i < count`` (all of them for ``count ≥
    width``): the complement of all ones shifted left by ``count`` (a thermometer from
    ``log2(width)`` stages of constant-folded muxes, no comparators)."""
    return ~_shift_left(Const((1 << width) - 1, width), count, width)


def _shift_left(value, amount, width: int) -> Value:
    """``(value << amount)`` truncated to ``width`` bits (0 for ``amount ≥ width``): a
    barrel shifter of ``log2(width)`` stages."""
    x = Value.cast(value)[:width]
    amount = Value.cast(amount)
    for k in range(len(amount)):
        step = 1 << k
        if step >= width:
            x = Mux(amount[k], 0, x)
        else:
            x = Mux(amount[k], Cat(Const(0, step), x[:width - step]), x)
    return x


def _extract(value, offset, width: int) -> Value:
    """``width`` bits of ``value`` from bit ``offset`` on (0 beyond its end): a shifter
    whose stages shrink to the bits the lower stages still need."""
    x = Value.cast(value)
    offset = Value.cast(offset)
    for k in reversed(range(len(offset))):
        step = 1 << k
        keep = width + step - 1
        shifted = x[step:] if step < len(x) else Const(0, 1)
        x = Mux(offset[k], shifted, x)[:keep]
    return x[:width]


class PassEngine(wiring.Component):
    """Runs one pool or repeat pass described by ``layer`` (an extended descriptor) after a
    ``start`` pulse (the module docstring describes both loops and their cycles).

    **Descriptor** (``layer``: sampled in the cycle of ``start`` while idle, or with
    ``embedded`` used as it is): ``pool`` or ``repeat`` picks the pass; ``in_h``, ``in_w``,
    ``channels`` (C), ``out_h``, ``out_w``, ``out_channels`` (O, a repeat pass), ``kernel``,
    ``stride`` (a pool pass), ``in_bits`` (n planes; ``out_bits`` is the same),
    ``input_slot`` / ``input_base`` and ``output_slot`` / ``output_base``. The engine
    checks nothing: the executor refuses what does not fit at CONFIGURE_LAYER
    (:meth:`LayerDescriptor.problems <bitdet.core.descriptor.LayerDescriptor.problems>`).

    **Status.** As :class:`~bitdet.hw.pool.PoolEngine`: ``busy`` from the cycle after
    ``start`` until the last word is written, ``done`` pulses in the first idle cycle,
    ``busy_cycles`` / ``stall_cycles`` count the busy cycles and those outside the loop
    (:func:`bitdet.core.cycles.pass_cycles`); ``stall`` is high in the latter.

    Parameters
    ----------
    config : AcceleratorConfig
        Sizes the engine: ``simd``, ``activation_depth``, ``activation_slots``,
        ``max_channels``, ``max_input_bits`` (a build of 1 has no plane logic),
        ``pool_max_kernel``.
    embedded : bool
        ``layer`` is used as it is (the executor holds it while the pass runs) and
        ``busy_cycles`` / ``stall_cycles`` stay 0 (the executor counts ``busy`` /
        ``stall``).

    Members
    -------
    layer : ``In(extended_descriptor_layout())``
    start : ``In(1)``
    busy, done, stall : ``Out(1)``
    busy_cycles, stall_cycles : ``Out(COUNTER_WIDTH)``
    act_read : ``In(ReadPort.Signature(addr_width=slot_addr_width(config), shape=simd))``
        A read port of the flat slot memory (data one cycle after ``addr`` / ``en``).
    act_write : ``In(WritePort.Signature(addr_width=slot_addr_width(config), shape=simd))``
        Its write port.

    Raises
    ------
    TypeError
        If ``config`` is not an :class:`AcceleratorConfig`.
    """

    def __init__(self, *, config: AcceleratorConfig, embedded: bool = False):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        self._embedded = bool(embedded)
        aw = slot_addr_width(config)
        super().__init__({
            "layer": In(extended_descriptor_layout()),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "stall": Out(1),
            "busy_cycles": Out(COUNTER_WIDTH),
            "stall_cycles": Out(COUNTER_WIDTH),
            "act_read": In(ReadPort.Signature(addr_width=aw, shape=config.simd)),
            "act_write": In(WritePort.Signature(addr_width=aw, shape=config.simd)),
        })

    @property
    def config(self) -> AcceleratorConfig:
        return self._config

    def elaborate(self, platform):  # noqa: C901 (one FSM, two loops)
        m = Module()
        c = self._config
        simd = c.simd
        aw = slot_addr_width(c)
        depth = c.activation_depth
        local_bits = max(1, (depth - 1).bit_length())
        dim_bits = depth.bit_length()                     # a size up to activation_depth
        chan_bits = c.max_channels.bit_length()
        max_words = -(-c.max_channels // simd)
        planes = c.max_input_bits                         # N: 1 builds no plane logic
        multi = planes > 1
        max_kernel = c.pool_max_kernel

        # latched at `start`, or (embedded) the `layer` input, held by the executor
        desc = self.layer if self._embedded else Signal(extended_descriptor_layout())
        chans = desc.channels[:chan_bits]
        out_chans = desc.out_channels[:chan_bits]
        in_h, in_w = desc.in_h[:dim_bits], desc.in_w[:dim_bits]
        out_h, out_w = desc.out_h[:dim_bits], desc.out_w[:dim_bits]
        stride = desc.stride[:max_kernel.bit_length()]
        n_bits = desc.in_bits[:max(1, (planes - 1).bit_length() + 1)]

        def flat(slot, base):
            """``slot · activation_depth + base`` (the slot's field cut to the build's)."""
            slot = slot[:max(1, (c.activation_slots - 1).bit_length())]
            return (mul_small(Const(depth, aw), slot) + base[:local_bits])[:aw]

        words = Signal(range(max_words + 1))              # W = ceil(C / simd)
        looping = Signal()                                # a read or write cycle of the loop

        # -- pool: address steps and loop counters (as PoolEngine's) ------------------------
        col_step = Signal(aw)                             # stride · W
        row_step = Signal(aw)                             # in_w · W
        line_step = Signal(aw)                            # stride · in_w · W
        oy = Signal(range(depth))
        ox = Signal(range(depth))
        w = Signal(range(max(max_words, 2)))
        ky = Signal(range(max_kernel))
        kx = Signal(range(max_kernel))
        line_addr = Signal(aw)                            # window origin of (oy, 0), top plane
        pix_addr = Signal(aw)                             # … of (oy, ox)
        word_addr = Signal(aw)                            # … + w
        row_addr = Signal(aw)                             # … + ky · row_step
        tap_addr = Signal(aw)                             # … + kx · W
        rd_ptr = Signal(aw)                               # … − (n − 1 − b) · in_plane
        pool_reading = Signal()

        # -- repeat: words, counters, pointers ------------------------------------------------
        out_words = Signal(range(max_words + 1))          # Wout = ceil(O / simd)
        rep_step = Signal(range(simd + 1))                # simd mod C
        rx = Signal(range(depth))
        ry = Signal(range(depth))
        rk = Signal(range(max(max_words, 2)))             # word of the read / write phase
        writing_phase = Signal()
        rep_ptr = Signal(aw)                              # next input word (consecutive)
        rep_reading = Signal()
        rep_writing = Signal()

        # -- planes ---------------------------------------------------------------------------
        if multi:
            b = Signal(range(planes))                     # plane being read (n − 1 … 0)
            rb = Signal(range(planes))                    # repeat: plane being copied
            in_pix = Signal(2 * dim_bits)                 # in_h · in_w
            out_pix = Signal(2 * dim_bits)                # out_h · out_w
            in_plane = Signal(aw)                         # in_h · in_w · W
            out_plane = Signal(aw)                        # out_h · out_w · W
            top = Signal(range(planes))                   # n − 1
            # one multiplier for the setup's pixel counts, its operands by state
            mul_a = Signal(dim_bits)
            mul_b = Signal(dim_bits)
            product = Signal(2 * dim_bits)
            m.d.comb += product.eq(mul_a * mul_b)
            m.d.comb += top.eq(n_bits - 1)

        reading = Signal()
        m.d.comb += reading.eq(pool_reading | rep_reading)
        m.d.comb += [self.act_read.addr.eq(Mux(desc.repeat, rep_ptr, rd_ptr)),
                     self.act_read.en.eq(reading)]

        # -- pool: the max stage (the word read in the previous cycle) -----------------------
        d_valid = Signal()
        d_first = Signal()                                # tap 0 of the word
        d_last = Signal()                                 # the word's last tap
        data = self.act_read.data
        pool_out = Signal(simd)
        first_tap = (kx == 0) & (ky == 0)
        last_tap = (kx == desc.kernel - 1) & (ky == desc.kernel - 1)
        m.d.sync += [d_valid.eq(pool_reading), d_first.eq(first_tap), d_last.eq(last_tap)]
        wr_ptr = Signal(aw)                               # pool: next write address
        out_word = Signal(aw)                             # pool: top plane of the output word
        if multi:
            d_b = Signal(range(planes))
            d_top = Signal()                              # the tap's first (top) plane
            m.d.sync += [d_b.eq(b), d_top.eq(b == top)]
            acc = Array(Signal(simd, name=f"acc{i}") for i in range(planes))
            tap_gt = Signal(simd)
            acc_gt = Signal(simd)
            a = acc[d_b]
            gt_t = Mux(d_top, 0, tap_gt)
            gt_a = Mux(d_top, 0, acc_gt)
            m.d.comb += pool_out.eq(Mux(d_first, data, (data & ~gt_a) | (a & ~gt_t)))
            with m.If(d_valid):
                m.d.sync += [acc[d_b].eq(pool_out),
                             tap_gt.eq(gt_t | (data & ~a & ~gt_a)),
                             acc_gt.eq(gt_a | (a & ~data & ~gt_t))]
            pool_write = d_valid & d_last
            with m.If(pool_write):
                with m.If(d_b != 0):
                    m.d.sync += wr_ptr.eq(wr_ptr - out_plane)
                with m.Else():
                    m.d.sync += [out_word.eq(out_word + 1), wr_ptr.eq(out_word + 1)]
        else:
            acc = Signal(simd)
            m.d.comb += pool_out.eq(Mux(d_first, data, acc | data))
            with m.If(d_valid):
                m.d.sync += acc.eq(pool_out)
            pool_write = d_valid & d_last
            with m.If(pool_write):
                m.d.sync += wr_ptr.eq(wr_ptr + 1)

        # -- repeat: the buffer and the write stage -------------------------------------------
        buf = Array(Signal(simd, name=f"buf{i}") for i in range(max_words))
        r_valid = Signal()
        r_k = Signal.like(rk)
        m.d.sync += [r_valid.eq(rep_reading), r_k.eq(rk)]
        with m.If(r_valid):
            m.d.sync += buf[r_k].eq(data)
        buf_bits = Cat(*buf)
        # Y: the first word of the repetition, channel i mod C in bit i
        equal = {cc: chans == cc for cc in range(1, simd)}
        first_word = Signal(simd)
        for i in range(simd):
            terms = [(chans > i) & buf[0][i]]
            sources = {}
            for cc in range(1, i + 1):
                sources.setdefault(i % cc, []).append(equal[cc])
            for j, eqs in sources.items():
                hit = eqs[0]
                for e in eqs[1:]:
                    hit = hit | e
                terms.append(hit & buf[0][j])
            bit = terms[0]
            for t in terms[1:]:
                bit = bit | t
            m.d.comb += first_word[i].eq(bit)
        w_valid = Signal()                                # a write stage cycle
        w_last = Signal()                                 # … of the pixel's last word
        ptr = Signal(range(c.max_channels + 1))           # first channel of the word
        rem = Signal(range(c.max_channels + 1))           # O − j · simd
        wout_ptr = Signal(aw)
        head = chans - ptr                                # channels before the wrap
        rep_out = Signal(simd)
        m.d.comb += rep_out.eq(
            ((_extract(buf_bits, ptr, simd) & _low_mask(head, simd))
             | _shift_left(first_word, head, simd)) & _low_mask(rem, simd))
        m.d.sync += [w_valid.eq(rep_writing), w_last.eq(rk == out_words - 1)]
        with m.If(w_valid):
            m.d.sync += wout_ptr.eq(wout_ptr + 1)
            with m.If(w_last):
                m.d.sync += [ptr.eq(0), rem.eq(out_chans)]
            with m.Else():
                nxt = ptr + rep_step
                m.d.sync += [ptr.eq(Mux(nxt >= chans, nxt - chans, nxt)), rem.eq(rem - simd)]

        m.d.comb += [self.act_write.en.eq(pool_write | w_valid),
                     self.act_write.addr.eq(Mux(w_valid, wout_ptr, wr_ptr)),
                     self.act_write.data.eq(Mux(w_valid, rep_out, pool_out))]

        # -- sequencer ------------------------------------------------------------------------
        def go_tap(value):
            m.d.sync += [tap_addr.eq(value), rd_ptr.eq(value)]

        m.d.sync += self.done.eq(0)
        with m.FSM(name="pass"):
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += self.busy.eq(1)
                    if not self._embedded:
                        m.d.sync += [desc.eq(self.layer), self.busy_cycles.eq(0),
                                     self.stall_cycles.eq(0)]
                    m.next = "WORDS"
            with m.State("WORDS"):
                m.d.sync += [words.eq(_ceil_div(chans, simd, c.max_channels)),
                             out_words.eq(_ceil_div(out_chans, simd, c.max_channels))]
                with m.Switch(chans):
                    for cc in range(1, simd + 1):
                        with m.Case(cc):
                            m.d.sync += rep_step.eq(simd % cc)
                    with m.Default():
                        m.d.sync += rep_step.eq(simd)
                if multi:
                    m.d.comb += [mul_a.eq(in_h), mul_b.eq(in_w)]
                    m.d.sync += in_pix.eq(product)
                m.next = "STEPS"
            with m.State("STEPS"):
                m.d.sync += [col_step.eq(mul_small(words, stride)),
                             row_step.eq(mul_small(in_w, words))]
                if multi:
                    m.d.comb += [mul_a.eq(out_h), mul_b.eq(out_w)]
                    m.d.sync += [out_pix.eq(product), in_plane.eq(mul_small(in_pix, words))]
                m.next = "LINE"
            with m.State("LINE"):
                base_in = flat(desc.input_slot, desc.input_base)
                base_out = flat(desc.output_slot, desc.output_base)
                if multi:
                    plane_out = mul_small(out_pix, words)[:aw]
                    m.d.sync += out_plane.eq(plane_out)
                    # a pool pass starts at the top plane, a repeat pass at plane 0
                    base_in = (base_in + Mux(desc.repeat, 0, mul_small(in_plane, top)))[:aw]
                    base_out = (base_out + Mux(desc.repeat, 0, mul_small(plane_out, top)))[:aw]
                    m.d.sync += [b.eq(top), rb.eq(0)]
                m.d.sync += [line_step.eq(mul_small(row_step, stride)),
                             line_addr.eq(base_in), pix_addr.eq(base_in),
                             word_addr.eq(base_in), row_addr.eq(base_in),
                             tap_addr.eq(base_in), rd_ptr.eq(base_in),
                             out_word.eq(base_out), wr_ptr.eq(base_out),
                             oy.eq(0), ox.eq(0), w.eq(0), ky.eq(0), kx.eq(0),
                             rep_ptr.eq(base_in), wout_ptr.eq(base_out),
                             rx.eq(0), ry.eq(0), rk.eq(0), writing_phase.eq(0),
                             ptr.eq(0), rem.eq(out_chans)]
                with m.If(desc.repeat):
                    m.next = "COPY"
                with m.Else():
                    m.next = "READ"
            with m.State("READ"):
                m.d.comb += [pool_reading.eq(1), looping.eq(1)]
                tap_done = (b == 0) if multi else Const(1)
                if multi:
                    with m.If(b != 0):
                        m.d.sync += [b.eq(b - 1), rd_ptr.eq(rd_ptr - in_plane)]
                    with m.Else():
                        m.d.sync += b.eq(top)
                with m.If(tap_done):
                    with m.If(kx != desc.kernel - 1):
                        m.d.sync += kx.eq(kx + 1)
                        go_tap(tap_addr + words)
                    with m.Else():
                        m.d.sync += kx.eq(0)
                        with m.If(ky != desc.kernel - 1):
                            nxt = row_addr + row_step
                            m.d.sync += [ky.eq(ky + 1), row_addr.eq(nxt)]
                            go_tap(nxt)
                        with m.Else():
                            m.d.sync += ky.eq(0)
                            with m.If(w != words - 1):
                                nxt = word_addr + 1
                                m.d.sync += [w.eq(w + 1), word_addr.eq(nxt), row_addr.eq(nxt)]
                                go_tap(nxt)
                            with m.Else():
                                m.d.sync += w.eq(0)
                                with m.If(ox != out_w - 1):
                                    nxt = pix_addr + col_step
                                    m.d.sync += [ox.eq(ox + 1), pix_addr.eq(nxt),
                                                 word_addr.eq(nxt), row_addr.eq(nxt)]
                                    go_tap(nxt)
                                with m.Else():
                                    m.d.sync += ox.eq(0)
                                    nxt = line_addr + line_step
                                    m.d.sync += [oy.eq(oy + 1), line_addr.eq(nxt),
                                                 pix_addr.eq(nxt), word_addr.eq(nxt),
                                                 row_addr.eq(nxt)]
                                    go_tap(nxt)
                                    with m.If(oy == out_h - 1):
                                        m.next = "FLUSH"
            with m.State("COPY"):
                m.d.comb += looping.eq(1)
                with m.If(~writing_phase):
                    m.d.comb += rep_reading.eq(1)
                    m.d.sync += rep_ptr.eq(rep_ptr + 1)
                    with m.If(rk != words - 1):
                        m.d.sync += rk.eq(rk + 1)
                    with m.Else():
                        m.d.sync += [rk.eq(0), writing_phase.eq(1)]
                with m.Else():
                    m.d.comb += rep_writing.eq(1)
                    with m.If(rk != out_words - 1):
                        m.d.sync += rk.eq(rk + 1)
                    with m.Else():
                        m.d.sync += [rk.eq(0), writing_phase.eq(0)]
                        last_plane = (rb == top) if multi else Const(1)
                        with m.If(rx != in_w - 1):
                            m.d.sync += rx.eq(rx + 1)
                        with m.Else():
                            m.d.sync += rx.eq(0)
                            with m.If(ry != in_h - 1):
                                m.d.sync += ry.eq(ry + 1)
                            with m.Else():
                                m.d.sync += ry.eq(0)
                                if multi:
                                    m.d.sync += rb.eq(rb + 1)
                                with m.If(last_plane):
                                    m.next = "FLUSH"
            with m.State("FLUSH"):
                # the last word's data is on the port (pool) or in the write stage (repeat)
                m.d.sync += [self.busy.eq(0), self.done.eq(1)]
                m.next = "IDLE"

        m.d.comb += self.stall.eq(self.busy & ~looping)
        if not self._embedded:
            with m.If(self.busy):
                m.d.sync += self.busy_cycles.eq(self.busy_cycles + 1)
            with m.If(self.stall):
                m.d.sync += self.stall_cycles.eq(self.stall_cycles + 1)
        return m
