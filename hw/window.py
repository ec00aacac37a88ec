"""Window generator: reads a group of output pixels' receptive fields from the activation
buffer as the K-words the systolic array consumes.

One **job** is one group of up to ``rows`` consecutive output pixels (row-major over the
output map) of one layer; one **command** runs ``tiles`` jobs over the same group (one per
tile of output channels, each with its own tag), so the group's window is set up once.
The generator emits each job's ``K = kernel²·words`` K-words in
exactly the order of :func:`bitdet.core.packing.pack_weights`: taps ``(ky, kx)`` row-major,
then channel word ``m`` of the tap; K-word ``j = (ky·kernel + kx)·words + m`` carries, for
every array row ``r``, word ``m`` of the input pixel
``(oy_r·stride + ky − padding, ox_r·stride + kx − padding)`` of output pixel ``r``.

* A tap outside the image gives the **spatial padding word**: with ``pad_bit = 0`` all
  zero; with ``pad_bit = 1`` the real channels' bits are 1 and the channel-padding bits
  of the pixel's last word stay 0 (so the word is ``pack_activations`` of an all-+1
  pixel and the padding still never adds to ``P``).
* Rows beyond the group's ``count`` (the last group of a map may be partial) get all-zero
  words, with the same timing, and a 0 in ``row_valid``: the controller drops their
  results.

**Read ports.** Array row ``r`` has its own read port ``read[r]`` on the activation
buffer (:class:`bitdet.hw.memory.ActivationBuffer` with ``read_ports = rows``), so one
K-word of all rows is fetched per cycle. The address of row ``r`` for K-word ``j`` is
``base_r + offset_j``: ``base_r`` is the (possibly negative, wrapping) address of the
top-left tap of pixel ``r``'s window, computed once per job, and ``offset_j =
(ky·in_w + kx)·words + m`` is shared by all rows and advanced by additions only.

**Throughput.** One K-word (of all ``rows`` pixels) per cycle while ``words.ready`` is
high. The jobs of one command follow each other with no idle cycle: the window stays in
the row registers, only the tag and the K-word counters change. A command's setup (accept,
two cycles of base arithmetic, one cycle per row to walk the group's pixels, one to hand
over) takes ``rows + 4`` cycles and runs while the previous command's jobs are read, so
consecutive commands of ``tiles · K ≥ rows + 4`` words follow each other with no idle
cycle; shorter ones start every ``rows + 4`` cycles (:meth:`WindowGenerator.job_cycles`).
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Const, Module, Mux, Signal, Value, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig

from .pe import _check_positive

__all__ = ["WindowGenerator", "WindowLayer", "mul_small", "window_generator"]


def mul_small(value, factor):
    """``value · factor`` (both unsigned) for a narrow ``factor`` (a stride, a padding, a kernel)
    as a sum of shifted copies of ``value``: a ``$mul`` cell of that size would take one of
    the iCE40's few DSP blocks (``synth_ice40 -dsp``), an adder or two is cheaper."""
    factor = Value.cast(factor)
    value = Value.cast(value)
    width = len(value) + len(factor)
    terms = [Mux(factor[i], value << i, 0) for i in range(len(factor))]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total[:width]


@dataclass(frozen=True)
class WindowLayer:
    """Geometry of one convolution layer as the window generator sees it (host side).

    Members
    -------
    in_h, in_w : int
        Input feature map size.
    channels : int
        Real input channels ``C`` (``words = ceil(C / simd)`` channel words per pixel).
    kernel, stride, padding : int
        Square kernel, stride, spatial padding on every side.
    pad_bit : 0 or 1
        The bit of the spatial padding (0 is −1, 1 is +1).

    Raises
    ------
    ValueError
        A non-positive size, or a kernel larger than the padded input.
    """

    in_h: int
    in_w: int
    channels: int
    kernel: int
    stride: int = 1
    padding: int = 0
    pad_bit: int = 0

    def __post_init__(self):
        for name in ("in_h", "in_w", "channels", "kernel", "stride"):
            _check_positive(name, getattr(self, name))
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) \
                or self.padding < 0:
            raise ValueError(f"padding must be a non-negative integer, not {self.padding!r}")
        if self.pad_bit not in (0, 1):
            raise ValueError(f"pad_bit must be 0 or 1, not {self.pad_bit!r}")
        if self.kernel > min(self.in_h, self.in_w) + 2 * self.padding:
            raise ValueError(f"kernel {self.kernel} is larger than the padded input "
                             f"{self.in_h + 2 * self.padding}×{self.in_w + 2 * self.padding}")

    @property
    def out_h(self) -> int:
        return (self.in_h + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def out_w(self) -> int:
        return (self.in_w + 2 * self.padding - self.kernel) // self.stride + 1

    def words(self, simd: int) -> int:
        """Channel words per pixel, ``ceil(C / simd)``."""
        return -(-self.channels // simd)

    def k_words(self, simd: int) -> int:
        """K-words of one job, ``kernel² · words``."""
        return self.kernel ** 2 * self.words(simd)

    def groups(self, rows: int) -> int:
        """Jobs per output map: ``ceil(out_h · out_w / rows)``."""
        return -(-self.out_h * self.out_w // rows)


class WindowGenerator(wiring.Component):
    """Feeds the receptive fields of ``rows`` output pixels, one K-word per cycle.

    **Command.** A ``command`` transfer starts ``tiles`` jobs over one window: the layer's
    geometry (``in_h``, ``in_w``, ``out_w``, ``channels``, ``words``, ``kernel``,
    ``stride``, ``padding``, ``pad_bit``, and ``base``, the address of input pixel
    ``(0, 0)`` in the read bank), the group: its first output pixel ``(oy, ox)`` and
    ``count`` (how many of the ``rows`` pixels exist, 1 … ``rows``), and ``tiles`` (1 …
    ``max_tiles``; 0 runs one job) jobs tagged ``tag``, ``tag + tag_step``, …
    (modulo ``2**tag_width``). :meth:`command_payload` builds the payload from a
    :class:`WindowLayer` and a group number. ``command.ready`` is high while no command
    is being set up: a command is taken while the previous command's jobs are still
    being read, set up in ``rows + 3`` cycles, and started as soon as the last K-word of
    its last job is read (:attr:`setup_cycles`, :meth:`job_cycles`); the jobs of one
    command follow each other directly. Commands run in order; each may describe a
    different layer.

    **Reads.** ``read[r]`` is row ``r``'s read port on the activation buffer (connect with
    :func:`amaranth.lib.wiring.connect` to :class:`~bitdet.hw.memory.ActivationBuffer`'s
    ``read``). The generator drives ``addr`` (from a register: the address stage) and ``en``
    and uses the data one cycle later;
    with ``en`` low (stall, setup) the port keeps its word.

    **Output.** ``words`` carries one K-word per transfer: ``activations[r]``, ``first``
    (K-word 0), ``last`` (K-word ``K − 1``), ``index`` (the K-word number ``j``, the
    second index of :func:`~bitdet.core.packing.pack_weights`) and ``row_valid`` (bit ``r``:
    row ``r`` is a real pixel). ``activations[r]`` is the read port's data through one
    multiplexer (its other input, the padding word or 0, comes from registers), so it is
    nearly as early as a register output; the array registers it on entry.

    **Tag.** The command's ``tag`` (``tag_width`` bits, opaque to the generator; plus
    ``t · tag_step`` for its job ``t``) comes back on ``fetch.tag`` and ``words.tag``
    with every K-word of that job: the controller can put the job's weight base address,
    output tile or pixel group there.

    **Weights.** ``fetch.en`` is high in the cycle the read ports are given the (registered)
    addresses of K-word ``fetch.index`` of the job tagged ``fetch.tag``; ``fetch.addr`` is
    ``fetch.tag + fetch.index`` (modulo ``2**tag_width``) from a register of the address
    stage. A controller that reads its weight memory with ``addr = fetch.addr`` (the tag
    holding the job's weight base) and ``en = fetch.en`` has the matching weight words on
    its read port exactly while that K-word is on ``words`` (also while ``words`` is
    stalled), so ``words`` and the weight data go to the array's ``operands`` side by side.
    The sum is registered rather than left to the controller: an adder after the address
    stage's registers, into the weight BRAMs' address pins, is both a long path and, on
    the ULX3S, the netlist on which yosys 0.70's ABC9 pass stops with an assertion.

    Parameters
    ----------
    rows : int
        Array rows (output pixels per job).
    simd : int
        Word width.
    depth : int
        Words per activation-buffer bank (address width; largest ``in_h``, ``in_w``).
    max_channels, max_kernel, max_stride : int
        Largest layer the command fields must describe.
    tag_width : int
        Bits of the controller's tag carried from ``command`` to ``fetch`` and ``words``.
    max_tiles : int
        Most jobs per command (default 1).

    Members
    -------
    command : ``In(stream.Signature(command_layout))``
    read : ``In(ReadPort.Signature(addr_width=, shape=simd)).array(rows)``
    words : ``Out(stream.Signature(word_layout))``
    fetch : ``Out(Signature({"en": Out(1), "index": Out(range(max_k_words)),
        "tag": Out(tag_width), "addr": Out(tag_width)}))``

    Raises
    ------
    TypeError, ValueError
        If a parameter is not a positive integer.
    """

    def __init__(self, *, rows: int, simd: int, depth: int, max_channels: int,
                 max_kernel: int, max_stride: int, tag_width: int = 1, max_tiles: int = 1,
                 fixed_layer: bool = False, src_loc_at: int = 0):
        self._rows = _check_positive("rows", rows)
        self._simd = _check_positive("simd", simd)
        self._depth = _check_positive("depth", depth)
        self._max_channels = _check_positive("max_channels", max_channels)
        self._max_kernel = _check_positive("max_kernel", max_kernel)
        self._max_stride = _check_positive("max_stride", max_stride)
        self._tag_width = _check_positive("tag_width", tag_width)
        self._max_tiles = _check_positive("max_tiles", max_tiles)
        self._fixed_layer = bool(fixed_layer)
        self._addr_width = max(1, (depth - 1).bit_length())
        self._max_words = -(-max_channels // simd)
        self._max_k_words = max_kernel ** 2 * self._max_words
        dim = range(depth + 1)
        self._command_layout = data.StructLayout({
            "in_h": dim,
            "in_w": dim,
            "out_w": dim,
            "channels": range(max_channels + 1),
            "words": range(self._max_words + 1),
            "kernel": range(max_kernel + 1),
            "stride": range(max_stride + 1),
            "padding": range(max_kernel),
            "pad_bit": 1,
            "oy": range(depth),
            "ox": range(depth),
            "count": range(rows + 1),
            "base": range(depth),
            "tag": tag_width,
            "tiles": range(max_tiles + 1),
            "tag_step": tag_width,
        })
        self._word_layout = data.StructLayout({
            "activations": data.ArrayLayout(simd, rows),
            "row_valid": rows,
            "first": 1,
            "last": 1,
            "index": range(self._max_k_words),
            "tag": tag_width,
        })
        super().__init__({
            "command": In(stream.Signature(self._command_layout)),
            "read": In(ReadPort.Signature(addr_width=self._addr_width, shape=simd)
                       ).array(rows),
            "words": Out(stream.Signature(self._word_layout)),
            "fetch": Out(wiring.Signature({"en": Out(1),
                                           "index": Out(range(self._max_k_words)),
                                           "tag": Out(tag_width),
                                           "addr": Out(tag_width)})),
        }, src_loc_at=1 + src_loc_at)

    # -- parameters -----------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self._rows

    @property
    def simd(self) -> int:
        return self._simd

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def addr_width(self) -> int:
        return self._addr_width

    @property
    def max_k_words(self) -> int:
        return self._max_k_words

    @property
    def max_tiles(self) -> int:
        return self._max_tiles

    @property
    def command_layout(self) -> data.StructLayout:
        return self._command_layout

    @property
    def word_layout(self) -> data.StructLayout:
        return self._word_layout

    @property
    def setup_cycles(self) -> int:
        """Cycles from a command's acceptance to its first K-word read when no command is
        running: ``rows + 4`` (the word is on ``words`` two cycles later: the address
        register, then the read port's data)."""
        return self._rows + 4

    def job_cycles(self, k_words: int, tiles: int = 1) -> int:
        """Cycles between the first K-words of consecutive commands of ``tiles`` jobs each
        when commands are always waiting and ``words`` is always ready:
        ``max(tiles · K, rows + 4)``. The jobs of one command follow each other with no
        idle cycle (``K`` cycles apart: the window is set up once), and the next command
        is set up while they are read, so commands of ``tiles · K ≥ rows + 4`` words
        follow each other with no idle cycle either."""
        return max(tiles * k_words, self._rows + 4)

    def command_payload(self, layer: WindowLayer, group: int, *, base: int = 0,
                        tag: int = 0, tiles: int = 1, tag_step: int | None = None) -> dict:
        """Payload of the ``command`` that runs group ``group`` of ``layer``, whose input
        map starts at word ``base`` of the read bank: ``tiles`` jobs over the same window,
        job ``t`` tagged ``tag + t · tag_step`` (``tag_step`` defaults to the layer's
        ``K``, so that with the weight base as ``tag`` job ``t`` reads tile ``t``'s
        weights in the :func:`~bitdet.core.packing.pack_weights` layout; the payload of a
        single job has ``tag_step = 0``).

        Raises
        ------
        ValueError
            If the layer exceeds the generator's limits, the group does not exist or the
            tiles or their tags do not fit.
        """
        words = layer.words(self._simd)
        if tag_step is None:
            tag_step = layer.k_words(self._simd)
        problems = []
        if base < 0 or base + layer.in_h * layer.in_w * words > self._depth:
            problems.append(f"the input map needs words {base} … "
                            f"{base + layer.in_h * layer.in_w * words - 1}, "
                            f"a bank holds {self._depth}")
        if layer.channels > self._max_channels:
            problems.append(f"channels {layer.channels} > max_channels {self._max_channels}")
        if layer.kernel > self._max_kernel:
            problems.append(f"kernel {layer.kernel} > max_kernel {self._max_kernel}")
        if layer.stride > self._max_stride:
            problems.append(f"stride {layer.stride} > max_stride {self._max_stride}")
        if layer.padding >= self._max_kernel:
            problems.append(f"padding {layer.padding} must be below max_kernel "
                            f"{self._max_kernel}")
        if isinstance(tiles, bool) or not isinstance(tiles, int) \
                or not 1 <= tiles <= self._max_tiles:
            problems.append(f"tiles must be in 1 … {self._max_tiles}, not {tiles!r}")
        elif tiles > 1 and (isinstance(tag_step, bool) or not isinstance(tag_step, int)
                            or tag_step < 0):
            problems.append(f"tag_step must be a non-negative integer, not {tag_step!r}")
        else:
            last = tag + (tiles - 1) * tag_step if tiles > 1 else tag
            if not 0 <= tag or last >= 1 << self._tag_width:
                problems.append(f"tag {tag}" + (f" … {last}" if tiles > 1 else "")
                                + f" does not fit in {self._tag_width} bits")
        if problems:
            raise ValueError(f"layer {layer} does not fit the window generator: "
                             + "; ".join(problems))
        pixels = layer.out_h * layer.out_w
        if isinstance(group, bool) or not isinstance(group, int) \
                or not 0 <= group < layer.groups(self._rows):
            raise ValueError(f"group must be in 0 … {layer.groups(self._rows) - 1}, "
                             f"not {group!r}")
        first = group * self._rows
        return {
            "in_h": layer.in_h, "in_w": layer.in_w, "out_w": layer.out_w,
            "channels": layer.channels, "words": words, "kernel": layer.kernel,
            "stride": layer.stride, "padding": layer.padding, "pad_bit": layer.pad_bit,
            "oy": first // layer.out_w, "ox": first % layer.out_w,
            "count": min(self._rows, pixels - first),
            "base": base,
            "tag": tag,
            "tiles": tiles,
            "tag_step": tag_step if tiles > 1 else 0,
        }

    # -- hardware ---------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        rows, simd, aw = self._rows, self._simd, self._addr_width
        # a tap of a real pixel of a valid command lies in −padding … in_h + padding − 1
        # (rows beyond `count` may wrap: their words are masked by row_valid)
        coord = signed((self._depth + self._max_kernel).bit_length() + 1)
        ones = Const((1 << simd) - 1, simd)

        # Two engines: *setup* turns a command into per-row window origins (in shadow
        # registers) while *issue* reads the running command's K-words; after the last
        # K-word of its last job the shadow registers become the running ones, so setup
        # hides behind the running command. A command's later jobs (tiles) reuse the
        # running window: only the tag and the K-word counters restart.

        # -- setup engine state --------------------------------------------------------------
        cmd = Signal(self._command_layout)              # the command being set up
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
        setup_done = Signal()                           # the shadow registers hold a job

        # -- issue engine state (the running command and its current job) ----------------------
        run = Signal(self._command_layout)
        # fixed_layer: the layer's fields (all but oy, ox, count) are read from `command`
        # itself, which the controller holds for the whole layer; otherwise from the
        # latched copies of the command being set up and of the running one
        cmd_geo = self.command.payload if self._fixed_layer else cmd
        run_geo = self.command.payload if self._fixed_layer else run
        if self._fixed_layer:
            run_row_words, run_pad_mask = row_words, pad_mask
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

        # -- address stage: the read addresses are registered (the tap-mask select and the
        # row's address adder into eight bank copies had been the ULX3S' critical path),
        # with what the output stage needs of the K-word
        word_meta = data.StructLayout({"row_valid": rows, "first": 1, "last": 1,
                                       "index": range(self._max_k_words),
                                       "tag": self._tag_width})
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
        m.d.comb += [
            # the two stages (address, then data) move together: when the output stage
            # is empty or being taken
            advance.eq(~out_valid | self.words.ready),
            issue.eq(running & advance),
            last_tile.eq(tile == tiles_m1),                 # (tiles = 0 runs one job)
            handoff.eq(setup_done & (~running | (issue & last_word & last_tile))),
        ]

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
                m.d.comb += setup_done.eq(1)
                with m.If(handoff):
                    m.next = "IDLE"

        # -- issue engine: K-word counters -----------------------------------------------------
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
                with m.If(last_tile):
                    m.d.sync += running.eq(0)
                with m.Else():
                    # the command's next job: same window (row registers), next tag
                    m.d.sync += [
                        tile.eq(tile + 1),
                        tag.eq(tag + run_geo.tag_step),
                        ky.eq(0), kx.eq(0), word.eq(0), index.eq(0), offset.eq(0),
                        offset_row.eq(0),
                    ]
        with m.If(handoff):                             # overrides the counting above
            m.d.sync += [
                running.eq(1),
                run.eq(cmd),
                tile.eq(0),
                tag.eq(cmd_geo.tag),
                row_valid.eq(next_valid),
                ky.eq(0), kx.eq(0), word.eq(0), index.eq(0), offset.eq(0), offset_row.eq(0),
                words_m1.eq(cmd_geo.words - 1),
                last_word.eq((cmd_geo.words == 1) & (cmd_geo.kernel == 1)),
                kernel_m1.eq(cmd_geo.kernel - 1),
                tiles_m1.eq(Mux(cmd_geo.tiles == 0, 0, cmd_geo.tiles - 1)),
            ]
            if not self._fixed_layer:
                m.d.sync += [run_row_words.eq(row_words), run_pad_mask.eq(pad_mask)]
            for r in range(rows):
                m.d.sync += [row_ymask[r].eq(next_ymask[r]), row_xmask[r].eq(next_xmask[r]),
                             row_base[r].eq(next_base[r])]

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
        pad_word = Mux(run_geo.pad_bit, Mux(word_at_last, run_pad_mask, ones),
                       0)
        m.d.comb += [self.fetch.en.eq(advance & a_valid), self.fetch.index.eq(a_meta.index),
                     self.fetch.tag.eq(a_meta.tag), self.fetch.addr.eq(a_fetch_addr)]

        with m.If(advance):
            m.d.sync += [
                a_valid.eq(issue),
                a_use.eq(use),
                a_pad.eq(pad),
                a_pad_word.eq(pad_word),
                a_meta.row_valid.eq(row_valid),
                a_meta.first.eq(index == 0),
                a_meta.last.eq(last_word),
                a_meta.index.eq(index),
                a_meta.tag.eq(tag),
                a_fetch_addr.eq(tag + index),
                out_valid.eq(a_valid),
                out_use.eq(a_use),
                out_pad.eq(a_pad),
                out_pad_word.eq(a_pad_word),
                out_meta.eq(a_meta),
            ]
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
        for r in range(rows):
            m.d.comb += payload.activations[r].eq(
                Mux(out_use[r], self.read[r].data, Mux(out_pad[r], out_pad_word, 0)))
        return m


def window_generator(config: AcceleratorConfig, *, tag_width: int | None = None,
                     max_tiles: int | None = None) -> WindowGenerator:
    """The window generator of ``config`` (reads ``config.rows`` ports of the buffer).

    ``tag_width`` defaults to the weight memory's address width, so that the tag can be
    the job's weight base address (``fetch.addr``, their sum, addresses the weights);
    ``max_tiles`` to ``ceil(max_channels / cols)``, the tiles of the widest layer, so that
    one command can run all tiles of a pixel group (as the layer controller does).
    """
    if tag_width is None:
        tag_width = max(1, (config.weight_depth - 1).bit_length())
    if max_tiles is None:
        max_tiles = -(-config.max_channels // config.cols)
    return WindowGenerator(rows=config.rows, simd=config.simd, depth=config.activation_depth,
                           max_channels=config.max_channels, max_kernel=config.max_kernel,
                           max_stride=config.max_stride, tag_width=tag_width,
                           max_tiles=max_tiles, src_loc_at=1)
