"""The two engines of the :class:`~bitdet.hw.window.WindowGenerator`: the *setup* engine
turns a command into per-row window origins (in shadow registers) while the *issue* engine
reads the running command's K-words; after the last K-word of its last job the shadow
registers become the running ones (a ``window`` stream transfer), so setup hides behind
the running command. A command's later jobs (tiles) reuse the running window: only the
tag and the K-word counters restart. With ``max_planes > 1`` each job is ``planes`` passes
over its K-words, one per bit-plane of the input map; a pass restarts the K-word counters
at the plane's offset ``b · plane_step`` (so the row's address adder stays the only one in
the read-address path)."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from ._util import _check_positive, mul_small

__all__ = ["IssueEngine", "SetupEngine", "window_layout"]


#: The command fields of a generator that streams bit-planes (``max_planes > 1``).
PLANE_FIELDS = ("planes", "plane_step", "pad_level")


def _check_plane_fields(command_layout: data.StructLayout, max_planes: int) -> int:
    """``max_planes`` if the command layout has the plane fields exactly when it is > 1."""
    _check_positive("max_planes", max_planes)
    names = set(command_layout.members)
    if (max_planes > 1) != all(name in names for name in PLANE_FIELDS):
        raise ValueError(f"max_planes {max_planes} needs a command layout "
                         + ("with" if max_planes > 1 else "without")
                         + " the fields " + ", ".join(PLANE_FIELDS))
    return max_planes


def window_layout(command_layout: data.StructLayout, *, rows: int, simd: int,
                  addr_width: int, max_kernel: int) -> data.StructLayout:
    """A set-up window, from the setup engine to the issue engine: the command's layer
    ``geometry``, ``row_words`` (``in_w · words``), ``pad_mask`` (the real channels of a
    pixel's last word) and per row the address of the window's top-left tap (``base``),
    which of its tap rows / columns lie inside the image (``ymask``, ``xmask``: bit ``k``
    for tap ``k``) and whether the row is a real pixel (``row_valid``)."""
    return data.StructLayout({
        "geometry": command_layout,
        "row_words": addr_width,
        "pad_mask": simd,
        "base": data.ArrayLayout(addr_width, rows),
        "ymask": data.ArrayLayout(max_kernel, rows),
        "xmask": data.ArrayLayout(max_kernel, rows),
        "row_valid": rows,
    })


class SetupEngine(wiring.Component):
    """Sets up a command's window: accepts it, two cycles of base arithmetic, one cycle per
    row to walk the group's pixels, then offers the window on ``window`` until the issue
    engine takes it (``rows + 3`` cycles from acceptance to the offer).

    Parameters
    ----------
    command_layout : data.StructLayout
        :attr:`WindowGenerator.command_layout <bitdet.hw.window.WindowGenerator.command_layout>`.
    rows, simd, depth, max_kernel : int
        As the generator's.
    max_planes : int
        As the generator's (default 1); the command's plane fields (present when it is
        > 1) pass to the issue engine in ``window.payload.geometry``.
    fixed_layer : bool
        The layer's fields (all but ``oy``, ``ox``, ``count``) are read from ``command``
        itself, which the caller holds for the whole layer, instead of a latched copy;
        ``window.payload.geometry`` is then ``command.payload``.

    Raises
    ------
    ValueError
        If the command layout has the plane fields but ``max_planes`` is 1, or lacks them
        but ``max_planes`` is above 1.

    Members
    -------
    command : ``In(stream.Signature(command_layout))``
    window : ``Out(stream.Signature(window_layout(...)))``
    """

    def __init__(self, *, command_layout: data.StructLayout, rows: int, simd: int,
                 depth: int, max_kernel: int, max_planes: int = 1,
                 fixed_layer: bool = False):
        self._rows, self._simd, self._depth = rows, simd, depth
        self._max_kernel = max_kernel
        self._max_planes = _check_plane_fields(command_layout, max_planes)
        self._fixed_layer = bool(fixed_layer)
        self._addr_width = max(1, (depth - 1).bit_length())
        self._command_layout = command_layout
        self._window_layout = window_layout(command_layout, rows=rows, simd=simd,
                                            addr_width=self._addr_width,
                                            max_kernel=max_kernel)
        super().__init__({
            "command": In(stream.Signature(command_layout)),
            "window": Out(stream.Signature(self._window_layout)),
        })

    @property
    def window_layout(self) -> data.StructLayout:
        return self._window_layout

    def elaborate(self, platform):
        m = Module()
        rows, simd, aw = self._rows, self._simd, self._addr_width
        # a tap of a real pixel of a valid command lies in −padding … in_h + padding − 1
        # (rows beyond `count` may wrap: their words are masked by row_valid)
        coord = signed((self._depth + self._max_kernel).bit_length() + 1)
        ones = Const((1 << simd) - 1, simd)

        cmd = Signal(self._command_layout)              # the command being set up
        # fixed_layer: the layer's fields (all but oy, ox, count) are read from `command`
        # itself, which the controller holds for the whole layer
        cmd_geo = self.command.payload if self._fixed_layer else cmd
        # addresses are computed modulo 2**aw: a negative base (window in the top/left
        # padding) wraps, and base + offset is exact for the taps inside the image
        row_words = Signal(aw)                          # in_w · words
        stride_words = Signal(aw)                       # stride · words
        pad_words = Signal(aw)                          # padding · words
        stride_rows = Signal(aw)                        # stride · in_w · words
        pad_mask = Signal(simd)                         # real channels of the last word
        walk_y = Signal(coord)                          # walker: top-left tap of a window
        walk_x = Signal(coord)
        walk_ox = Signal(range(self._depth + 1))
        walk_base = Signal(aw)
        walk_row_base = Signal(aw)                      # base of output pixel (oy, 0)
        walk_n = Signal(range(rows + 1))
        # per-row window of the next job, shifted in from the walker (row 0 first): the
        # address of its top-left tap and which of its tap rows / columns lie inside the
        # image (bit k of the y mask: tap row ky = k is inside). The masks are computed
        # from the walker's coordinates during setup, so the issue engine's bounds check
        # is a mask bit selected by ky / kx, not a comparison of (y + ky) in the cycle
        # that drives the read address (it had been the iCE40 critical path).
        kmax = self._max_kernel
        walk_ymask = Signal(kmax)
        walk_xmask = Signal(kmax)
        next_ymask = [Signal(kmax, name=f"next{r}_ymask") for r in range(rows)]
        next_xmask = [Signal(kmax, name=f"next{r}_xmask") for r in range(rows)]
        next_base = [Signal(aw, name=f"next{r}_base") for r in range(rows)]
        next_valid = Signal(rows)

        window = self.window.payload
        m.d.comb += [window.geometry.eq(cmd_geo), window.row_words.eq(row_words),
                     window.pad_mask.eq(pad_mask), window.row_valid.eq(next_valid)]
        for r in range(rows):
            m.d.comb += [window.base[r].eq(next_base[r]), window.ymask[r].eq(next_ymask[r]),
                         window.xmask[r].eq(next_xmask[r])]

        # window origin of the group's first pixel; signed first, so that the padding
        # subtraction below goes negative instead of wrapping
        origin_y = Signal(coord)
        origin_x = Signal(coord)
        row_start = Signal(aw)                          # address of the walker's (y, 0)
        # modulo 2**aw: the low bits of the signed walker times the row length
        m.d.comb += row_start.eq(cmd_geo.base + (walk_y[:aw] * row_words)[:aw] - pad_words)
        m.d.comb += [origin_y.eq(mul_small(cmd.oy, cmd_geo.stride)),
                     origin_x.eq(mul_small(cmd.ox, cmd_geo.stride))]
        for k in range(kmax):
            tap_y = walk_y + k
            tap_x = walk_x + k
            m.d.comb += [walk_ymask[k].eq((tap_y >= 0) & (tap_y < cmd_geo.in_h)),
                         walk_xmask[k].eq((tap_x >= 0) & (tap_x < cmd_geo.in_w))]

        with m.FSM(name="setup"):
            with m.State("IDLE"):
                m.d.comb += self.command.ready.eq(1)
                with m.If(self.command.valid):
                    m.d.sync += cmd.eq(self.command.payload)
                    m.next = "PREPARE"
            with m.State("PREPARE"):
                m.d.sync += [
                    row_words.eq(cmd_geo.in_w * cmd_geo.words),
                    stride_words.eq(mul_small(cmd_geo.words, cmd_geo.stride)),
                    pad_words.eq(mul_small(cmd_geo.words, cmd_geo.padding)),
                    walk_y.eq(origin_y - cmd_geo.padding),
                    walk_x.eq(origin_x - cmd_geo.padding),
                    walk_ox.eq(cmd.ox),
                    # channel-padding bits of the last word: words·simd − channels
                    pad_mask.eq(ones >> (cmd_geo.words * simd
                                         - cmd_geo.channels)[:simd.bit_length()]),
                ]
                m.next = "BASE"
            with m.State("BASE"):
                m.d.sync += [
                    stride_rows.eq(mul_small(row_words, cmd_geo.stride)),
                    walk_row_base.eq(row_start),
                    walk_base.eq(row_start + cmd.ox * stride_words),
                    walk_n.eq(0),
                ]
                m.next = "WALK"
            with m.State("WALK"):
                # shift the walker's pixel into the shadow registers, then step one pixel
                m.d.sync += [
                    next_ymask[rows - 1].eq(walk_ymask),
                    next_xmask[rows - 1].eq(walk_xmask),
                    next_base[rows - 1].eq(walk_base),
                    next_valid.eq((next_valid >> 1) | ((walk_n < cmd.count) << (rows - 1))),
                    walk_n.eq(walk_n + 1),
                ]
                for r in range(rows - 1):
                    m.d.sync += [next_ymask[r].eq(next_ymask[r + 1]),
                                 next_xmask[r].eq(next_xmask[r + 1]),
                                 next_base[r].eq(next_base[r + 1])]
                with m.If(walk_ox == cmd_geo.out_w - 1):
                    m.d.sync += [
                        walk_ox.eq(0),
                        walk_x.eq(-cmd_geo.padding),
                        walk_y.eq(walk_y + cmd_geo.stride),
                        walk_row_base.eq(walk_row_base + stride_rows),
                        walk_base.eq(walk_row_base + stride_rows),
                    ]
                with m.Else():
                    m.d.sync += [
                        walk_ox.eq(walk_ox + 1),
                        walk_x.eq(walk_x + cmd_geo.stride),
                        walk_base.eq(walk_base + stride_words),
                    ]
                with m.If(walk_n == rows - 1):
                    m.next = "READY"
            with m.State("READY"):
                m.d.comb += self.window.valid.eq(1)
                with m.If(self.window.ready):
                    m.next = "IDLE"
        return m


class IssueEngine(wiring.Component):
    """Reads the K-words of a set-up window's jobs, one K-word of every row per cycle:
    the address stage (registered read addresses and the weight address), then the
    output stage (the read ports' words, the padding word or 0), stalling together while
    ``words`` is not ready. It takes the next ``window`` in the cycle it issues the last
    K-word of the last job (or while idle). With ``max_planes > 1`` a job is ``planes``
    passes over its ``K`` K-words (plane ``b``: addresses ``base + b·plane_step +
    offset``, ``shift = b``, padding word from bit ``b`` of ``pad_level``), with no idle
    cycle between them.

    Parameters
    ----------
    window_layout : data.StructLayout
        :attr:`SetupEngine.window_layout`.
    word_layout : data.StructLayout
        :attr:`WindowGenerator.word_layout <bitdet.hw.window.WindowGenerator.word_layout>`.
    rows, simd, depth, max_kernel, max_words, max_tiles, tag_width : int
        As the generator's (``max_words = ceil(max_channels / simd)``).
    max_planes : int
        As the generator's (default 1): above 1, the geometry has the plane fields and
        ``word_layout`` has ``shift``.
    fixed_layer : bool
        As the setup engine's: the geometry of ``window`` is read while the command
        runs instead of being latched.

    Members
    -------
    window : ``In(stream.Signature(window_layout))``
    read : ``In(ReadPort.Signature(addr_width=, shape=simd)).array(rows)``
    words : ``Out(stream.Signature(word_layout))``
    fetch : ``Out(Signature({"en", "index", "tag", "addr"}))``
    """

    def __init__(self, *, window_layout: data.StructLayout, word_layout: data.StructLayout,
                 rows: int, simd: int, depth: int, max_kernel: int, max_words: int,
                 max_tiles: int, tag_width: int, max_planes: int = 1,
                 fixed_layer: bool = False):
        self._rows, self._simd = rows, simd
        self._max_planes = _check_plane_fields(window_layout["geometry"].shape, max_planes)
        if (max_planes > 1) != ("shift" in word_layout.members):
            raise ValueError(f"max_planes {max_planes} needs a word layout "
                             + ("with" if max_planes > 1 else "without") + " shift")
        self._max_kernel, self._max_words = max_kernel, max_words
        self._max_k_words = max_kernel ** 2 * max_words
        self._max_tiles, self._tag_width = max_tiles, tag_width
        self._fixed_layer = bool(fixed_layer)
        self._addr_width = max(1, (depth - 1).bit_length())
        self._window_layout = window_layout
        super().__init__({
            "window": In(stream.Signature(window_layout)),
            "read": In(ReadPort.Signature(addr_width=self._addr_width, shape=simd)
                       ).array(rows),
            "words": Out(stream.Signature(word_layout)),
            "fetch": Out(wiring.Signature({"en": Out(1),
                                           "index": Out(range(self._max_k_words)),
                                           "tag": Out(tag_width),
                                           "addr": Out(tag_width)})),
        })

    def elaborate(self, platform):
        m = Module()
        rows, simd, aw = self._rows, self._simd, self._addr_width
        ones = Const((1 << simd) - 1, simd)
        kmax = self._max_kernel
        nxt = self.window.payload
        cmd_geo = nxt.geometry

        # -- the running command and its current job -----------------------------------------
        run = Signal(self._window_layout["geometry"].shape)
        run_geo = cmd_geo if self._fixed_layer else run
        if self._fixed_layer:
            run_row_words, run_pad_mask = nxt.row_words, nxt.pad_mask
        else:
            run_row_words = Signal(aw)
            run_pad_mask = Signal(simd)
        row_ymask = [Signal(kmax, name=f"row{r}_ymask") for r in range(rows)]
        row_xmask = [Signal(kmax, name=f"row{r}_xmask") for r in range(rows)]
        row_base = [Signal(aw, name=f"row{r}_base") for r in range(rows)]
        row_valid = Signal(rows)
        running = Signal()
        tile = Signal(range(self._max_tiles + 1))      # job of the running command
        tag = Signal(self._tag_width)                   # its tag, run_geo.tag + tile·tag_step
        ky = Signal(range(self._max_kernel))
        kx = Signal(range(self._max_kernel))
        word = Signal(range(max(1, self._max_words)))
        index = Signal(range(self._max_k_words))
        offset = Signal(aw)                             # (ky·in_w + kx)·words + word
        offset_row = Signal(aw)                         # ky·in_w·words
        planar = self._max_planes > 1
        if planar:
            # bit-planes: the plane of the running pass, and registers that keep its
            # change out of the read-address path: a pass starts its K-word counters at
            # offset = offset_row = b·plane_step (plane_next, a running sum), so that
            # row_base + offset stays the only adder in front of the address registers;
            # last_plane and the padding bit (pad_bits[0]) are registers, not selects of
            # the plane number in the issuing cycle
            plane = Signal(range(self._max_planes))
            planes_m1 = Signal(range(self._max_planes))
            last_plane = Signal()                       # plane == planes_m1
            plane_next = Signal(aw)                     # (plane + 1)·plane_step
            pad_bits = Signal(self._max_planes)         # pad_level >> plane

        # -- address stage: the read addresses are registered (the tap-mask select and the
        # row's address adder into eight bank copies had been the ULX3S' critical path),
        # with what the output stage needs of the K-word
        meta_fields = {"row_valid": rows, "first": 1, "last": 1,
                       "index": range(self._max_k_words), "tag": self._tag_width}
        if planar:
            meta_fields["shift"] = range(self._max_planes)
        word_meta = data.StructLayout(meta_fields)
        a_valid = Signal()
        a_addr = [Signal(aw, name=f"a{r}_addr") for r in range(rows)]
        a_use = Signal(rows)
        a_pad = Signal(rows)
        a_pad_word = Signal(simd)
        a_meta = Signal(word_meta)
        a_fetch_addr = Signal(self._tag_width)          # tag + index of the K-word at a_addr

        # -- output stage (valid together with the read ports' data) ---------------------------
        out_valid = Signal()
        out_use = Signal(rows)                          # row r: the read port's word
        out_pad = Signal(rows)                          # row r: the padding word
        out_pad_word = Signal(simd)
        out_meta = Signal(word_meta)

        # the running command's last counter values, set at the hand-over: the K-word
        # counters compare with registers of their own width (an equality of a few bits)
        # instead of subtracting from the layer's fields in the cycle that issues a read
        words_m1 = Signal(range(max(1, self._max_words)))
        kernel_m1 = Signal(range(self._max_kernel))
        tiles_m1 = Signal(range(self._max_tiles))
        word_at_last = Signal()
        kx_at_last = Signal()
        m.d.comb += [word_at_last.eq(word == words_m1), kx_at_last.eq(kx == kernel_m1)]

        advance = Signal()
        issue = Signal()
        # the K-word about to be read is the job's last: a register, set a cycle ahead
        # from the counters' next values (it had been compared in the issuing cycle, at
        # the head of the hand-over's enable logic)
        last_word = Signal()
        word_n = Mux(word_at_last, 0, word + 1)
        kx_n = Mux(word_at_last, Mux(kx_at_last, 0, kx + 1), kx)
        ky_n = Mux(word_at_last & kx_at_last, ky + 1, ky)
        next_is_last = Signal()
        m.d.comb += next_is_last.eq((word_n == words_m1) & (kx_n == kernel_m1)
                                    & (ky_n == kernel_m1))
        last_tile = Signal()
        handoff = Signal()
        # the command's last K-word: the last of the last plane of its last job
        last_of_command = issue & last_word & last_plane & last_tile if planar \
            else issue & last_word & last_tile
        m.d.comb += [
            # the two stages (address, then data) move together: when the output stage
            # is empty or being taken
            advance.eq(~out_valid | self.words.ready),
            issue.eq(running & advance),
            last_tile.eq(tile == tiles_m1),                 # (tiles = 0 runs one job)
            self.window.ready.eq(~running | last_of_command),
            handoff.eq(self.window.valid & self.window.ready),
        ]

        # -- K-word counters -------------------------------------------------------------------
        with m.If(issue):
            m.d.sync += [index.eq(index + 1), offset.eq(offset + 1)]
            with m.If(word_at_last):
                m.d.sync += word.eq(0)
                with m.If(kx_at_last):
                    m.d.sync += [
                        kx.eq(0),
                        ky.eq(ky + 1),
                        offset_row.eq(offset_row + run_row_words),
                        offset.eq(offset_row + run_row_words),
                    ]
                with m.Else():
                    m.d.sync += kx.eq(kx + 1)
            with m.Else():
                m.d.sync += word.eq(word + 1)
            m.d.sync += last_word.eq(next_is_last)
            with m.If(last_word):
                m.d.sync += last_word.eq((words_m1 == 0) & (kernel_m1 == 0))
                if planar:
                    with m.If(~last_plane):
                        # the job's next plane: K-word 0 at offset b·plane_step
                        m.d.sync += [
                            plane.eq(plane + 1),
                            last_plane.eq(plane + 1 == planes_m1),
                            plane_next.eq(plane_next + run_geo.plane_step),
                            pad_bits.eq(pad_bits >> 1),
                            ky.eq(0), kx.eq(0), word.eq(0), index.eq(0),
                            offset.eq(plane_next), offset_row.eq(plane_next),
                        ]
                with m.If(last_plane & last_tile if planar else last_tile):
                    m.d.sync += running.eq(0)
                with m.Elif(last_plane) if planar else m.Else():
                    # the command's next job: same window (row registers), next tag
                    m.d.sync += [
                        tile.eq(tile + 1),
                        tag.eq(tag + run_geo.tag_step),
                        ky.eq(0), kx.eq(0), word.eq(0), index.eq(0), offset.eq(0),
                        offset_row.eq(0),
                    ]
                    if planar:
                        m.d.sync += [plane.eq(0), last_plane.eq(planes_m1 == 0),
                                     plane_next.eq(run_geo.plane_step),
                                     pad_bits.eq(run_geo.pad_level)]
        with m.If(handoff):                             # overrides the counting above
            m.d.sync += [
                running.eq(1),
                run.eq(cmd_geo),
                tile.eq(0),
                tag.eq(cmd_geo.tag),
                row_valid.eq(nxt.row_valid),
                ky.eq(0), kx.eq(0), word.eq(0), index.eq(0), offset.eq(0), offset_row.eq(0),
                words_m1.eq(cmd_geo.words - 1),
                last_word.eq((cmd_geo.words == 1) & (cmd_geo.kernel == 1)),
                kernel_m1.eq(cmd_geo.kernel - 1),
                tiles_m1.eq(Mux(cmd_geo.tiles == 0, 0, cmd_geo.tiles - 1)),
            ]
            if planar:
                m.d.sync += [
                    plane.eq(0),
                    planes_m1.eq(Mux(cmd_geo.planes == 0, 0, cmd_geo.planes - 1)),
                    last_plane.eq(cmd_geo.planes <= 1),     # (planes = 0 reads one)
                    plane_next.eq(cmd_geo.plane_step),
                    pad_bits.eq(cmd_geo.pad_level),
                ]
            if not self._fixed_layer:
                m.d.sync += [run_row_words.eq(nxt.row_words), run_pad_mask.eq(nxt.pad_mask)]
            for r in range(rows):
                m.d.sync += [row_ymask[r].eq(nxt.ymask[r]), row_xmask[r].eq(nxt.xmask[r]),
                             row_base[r].eq(nxt.base[r])]

        # -- read issue: one address per row --------------------------------------------------
        use = Signal(rows)
        pad = Signal(rows)
        for r in range(rows):
            inside = row_ymask[r].bit_select(ky, 1) & row_xmask[r].bit_select(kx, 1)
            m.d.comb += [
                use[r].eq(row_valid[r] & inside),
                pad[r].eq(row_valid[r] & ~inside),
                self.read[r].addr.eq(a_addr[r]),
                self.read[r].en.eq(advance),
            ]
        # the padding word: pad_bit's, or in plane b bit b of pad_level's
        pad_word = Mux(pad_bits[0] if planar else run_geo.pad_bit,
                       Mux(word_at_last, run_pad_mask, ones), 0)
        m.d.comb += [self.fetch.en.eq(advance & a_valid), self.fetch.index.eq(a_meta.index),
                     self.fetch.tag.eq(a_meta.tag), self.fetch.addr.eq(a_fetch_addr)]

        with m.If(advance):
            m.d.sync += [
                a_valid.eq(issue),
                a_use.eq(use),
                a_pad.eq(pad),
                a_pad_word.eq(pad_word),
                a_meta.row_valid.eq(row_valid),
                a_meta.first.eq((index == 0) & (plane == 0) if planar else index == 0),
                a_meta.last.eq(last_word & last_plane if planar else last_word),
                a_meta.index.eq(index),
                a_meta.tag.eq(tag),
                a_fetch_addr.eq(tag + index),
                out_valid.eq(a_valid),
                out_use.eq(a_use),
                out_pad.eq(a_pad),
                out_pad_word.eq(a_pad_word),
                out_meta.eq(a_meta),
            ]
            if planar:
                m.d.sync += a_meta.shift.eq(plane)
            for r in range(rows):
                m.d.sync += a_addr[r].eq(Mux(use[r], row_base[r] + offset, 0))

        # -- output: the read ports' words, the padding word, or 0 for unused rows ----------
        payload = self.words.payload
        m.d.comb += [
            self.words.valid.eq(out_valid),
            payload.row_valid.eq(out_meta.row_valid),
            payload.first.eq(out_meta.first),
            payload.last.eq(out_meta.last),
            payload.index.eq(out_meta.index),
            payload.tag.eq(out_meta.tag),
        ]
        if planar:
            m.d.comb += payload.shift.eq(out_meta.shift)
        for r in range(rows):
            m.d.comb += payload.activations[r].eq(
                Mux(out_use[r], self.read[r].data, Mux(out_pad[r], out_pad_word, 0)))
        return m
