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

**Bit-planes** (contract 2, ``max_planes > 1``). An n-bit input map is stored as ``n``
bit-planes one after the other (docs/packing.md, *planes in slots*): plane ``b`` at
``base + b·plane_step`` (``plane_step = map_words = in_h·in_w·words``), each packed like a
1-bit map. A job then makes ``planes`` passes over its ``K`` K-words, plane 0 first: pass
``b`` reads K-word ``j`` of plane ``b`` (address ``base_r + b·plane_step + offset_j``) and
tags it ``shift = b``, so that the array accumulates ``A = Σ_b 2**b · P_b`` with the same
weight words (``index = j``) in every pass. ``first`` marks plane 0's K-word 0, ``last``
plane ``planes − 1``'s K-word ``K − 1``. The spatial padding word of plane ``b`` is the
padding word above built from bit ``b`` of ``pad_level`` (the level the padding reads)
instead of ``pad_bit``.

**Read ports.** Array row ``r`` has its own read port ``read[r]`` on the activation
buffer (:class:`bitdet.hw.memory.ActivationBuffer` with ``read_ports = rows``), so one
K-word of all rows is fetched per cycle. The address of row ``r`` for K-word ``j`` is
``base_r + offset_j``: ``base_r`` is the (possibly negative, wrapping) address of the
top-left tap of pixel ``r``'s window, computed once per job, and ``offset_j =
(ky·in_w + kx)·words + m`` is shared by all rows and advanced by additions only.

**Throughput.** One K-word (of all ``rows`` pixels) per cycle while ``words.ready`` is
high. The planes of a job and the jobs of one command follow each other with no idle
cycle: the window stays in the row registers, only the tag, the plane and the K-word
counters change. A command's setup (accept, two cycles of base arithmetic, one cycle per
row to walk the group's pixels, one to hand over) takes ``rows + 4`` cycles and runs while
the previous command's jobs are read, so consecutive commands of ``tiles · planes · K ≥
rows + 4`` words follow each other with no idle cycle; shorter ones start every ``rows +
4`` cycles (:meth:`WindowGenerator.job_cycles`).
"""

from __future__ import annotations

from dataclasses import dataclass

from amaranth.hdl import Module
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out

from bitdet.core.config import AcceleratorConfig
from bitdet.core.descriptor import output_size

from ._util import _check_positive
from .window_engines import IssueEngine, SetupEngine

__all__ = ["WindowGenerator", "WindowLayer", "window_generator"]


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
        return output_size(self.in_h, self.kernel, self.stride, self.padding)

    @property
    def out_w(self) -> int:
        return output_size(self.in_w, self.kernel, self.stride, self.padding)

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
    (modulo ``2**tag_width``). With ``max_planes > 1`` the layout has three more fields:
    ``planes`` (bit-planes of the input map, 1 … ``max_planes``; 0 reads one), ``plane_step``
    (``addr_width`` bits: words from one plane to the next, ``in_h · in_w · words`` for
    planes stored back to back) and ``pad_level`` (``max_planes`` bits: plane ``b``'s
    spatial padding word is built from bit ``b``; ``pad_bit`` is unused and 0 in an
    extended descriptor). :meth:`command_payload` builds the payload from a
    :class:`WindowLayer` and a group number. ``command.ready`` is high while no command
    is being set up: a command is taken while the previous command's jobs are still
    being read, set up (its first K-word can be read :attr:`setup_cycles` ``= rows + 4``
    cycles after its acceptance), and started as soon as the last K-word of the previous
    command's last job is read (:meth:`job_cycles`); the jobs of one
    command follow each other directly. Commands run in order; each may describe a
    different layer.

    **Reads.** ``read[r]`` is row ``r``'s read port on the activation buffer (connect with
    :func:`amaranth.lib.wiring.connect` to :class:`~bitdet.hw.memory.ActivationBuffer`'s
    ``read``). The generator drives ``addr`` (from a register: the address stage) and ``en``
    and uses the data one cycle later;
    with ``en`` low (stall, setup) the port keeps its word.

    **Output.** ``words`` carries one K-word per transfer: ``activations[r]``, ``first``
    (K-word 0 of the job, of plane 0), ``last`` (K-word ``K − 1`` of the job, of its last
    plane), ``index`` (the K-word number ``j`` within its plane, the second index of
    :func:`~bitdet.core.packing.pack_weights`), ``row_valid`` (bit ``r``: row ``r`` is a
    real pixel) and, with ``max_planes > 1`` only, ``shift`` (``range(max_planes)``: the
    plane ``b`` of the K-word, for the array's operand ``shift``). A job of ``planes``
    planes is ``planes · K`` transfers: plane 0's ``K`` K-words, then plane 1's, ….
    ``activations[r]`` is the read port's data through one multiplexer (its other input,
    the padding word or 0, comes from registers), so it is nearly as early as a register
    output; the array registers it on entry.

    **Tag.** The command's ``tag`` (``tag_width`` bits, opaque to the generator; plus
    ``t · tag_step`` for its job ``t``) comes back on ``fetch.tag`` and ``words.tag``
    with every K-word of that job (of every plane): the controller can put the job's weight
    base address, output tile or pixel group there.

    **Weights.** ``fetch.en`` is high in the cycle the read ports are given the (registered)
    addresses of K-word ``fetch.index`` of the job tagged ``fetch.tag``; ``fetch.addr`` is
    ``fetch.tag + fetch.index`` (modulo ``2**tag_width``) from a register of the address
    stage. A controller that reads its weight memory with ``addr = fetch.addr`` (the tag
    holding the job's weight base) and ``en = fetch.en`` has the matching weight words on
    its read port exactly while that K-word is on ``words`` (also while ``words`` is
    stalled), so ``words`` and the weight data go to the array's ``operands`` side by side.
    The sum is registered rather than left to the controller: an adder after the address
    stage's registers, into the weight BRAMs' address pins, is both a long path and, on
    the ULX3S, the netlist on which yosys 0.70's ABC9 pass stops with an assertion. Every
    plane of a job reads the same weight words (``fetch.index`` is ``j`` within the
    plane).

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
    max_planes : int
        Most bit-planes of an input map (default 1: 1-bit maps, contract 1, and neither the
        plane fields in ``command`` nor ``shift`` in ``words``).
    fixed_layer : bool
        The layer's fields of ``command`` are read while its jobs run (the caller holds
        ``command.payload`` for the whole layer) instead of being latched.

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
                 max_planes: int = 1, fixed_layer: bool = False, src_loc_at: int = 0):
        self._rows = _check_positive("rows", rows)
        self._simd = _check_positive("simd", simd)
        self._depth = _check_positive("depth", depth)
        self._max_channels = _check_positive("max_channels", max_channels)
        self._max_kernel = _check_positive("max_kernel", max_kernel)
        self._max_stride = _check_positive("max_stride", max_stride)
        self._tag_width = _check_positive("tag_width", tag_width)
        self._max_tiles = _check_positive("max_tiles", max_tiles)
        self._max_planes = _check_positive("max_planes", max_planes)
        self._fixed_layer = bool(fixed_layer)
        self._addr_width = max(1, (depth - 1).bit_length())
        self._max_words = -(-max_channels // simd)
        self._max_k_words = max_kernel ** 2 * self._max_words
        dim = range(depth + 1)
        command_fields = {
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
        }
        word_fields = {
            "activations": data.ArrayLayout(simd, rows),
            "row_valid": rows,
            "first": 1,
            "last": 1,
            "index": range(self._max_k_words),
            "tag": tag_width,
        }
        if max_planes > 1:              # contract 2: the fields exist only on such builds
            command_fields |= {
                "planes": range(max_planes + 1),
                "plane_step": self._addr_width,
                "pad_level": max_planes,
            }
            word_fields["shift"] = range(max_planes)
        self._command_layout = data.StructLayout(command_fields)
        self._word_layout = data.StructLayout(word_fields)
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
    def max_planes(self) -> int:
        return self._max_planes

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

    def job_cycles(self, k_words: int, tiles: int = 1, planes: int = 1) -> int:
        """Cycles between the first K-words of consecutive commands of ``tiles`` jobs of
        ``planes`` bit-planes each when commands are always waiting and ``words`` is
        always ready: ``max(tiles · planes · K, rows + 4)``. The planes of a job and the
        jobs of one command follow each other with no idle cycle (``K`` cycles apart: the
        window is set up once), and the next command is set up while they are read, so
        commands of ``tiles · planes · K ≥ rows + 4`` words follow each other with no
        idle cycle either."""
        return max(tiles * max(planes, 1) * k_words, self._rows + 4)

    def command_payload(self, layer: WindowLayer, group: int, *, base: int = 0,
                        tag: int = 0, tiles: int = 1, tag_step: int | None = None,
                        planes: int = 1, plane_step: int | None = None,
                        pad_level: int | None = None) -> dict:
        """Payload of the ``command`` that runs group ``group`` of ``layer``, whose input
        map starts at word ``base`` of the read bank: ``tiles`` jobs over the same window,
        job ``t`` tagged ``tag + t · tag_step`` (``tag_step`` defaults to the layer's
        ``K``, so that with the weight base as ``tag`` job ``t`` reads tile ``t``'s
        weights in the :func:`~bitdet.core.packing.pack_weights` layout; the payload of a
        single job has ``tag_step = 0``).

        With ``max_planes > 1`` the input map has ``planes`` bit-planes, plane ``b`` from
        word ``base + b · plane_step`` (``plane_step`` defaults to the map's ``in_h · in_w
        · words`` words, the :func:`~bitdet.core.packing.pack_levels` layout; the payload
        of one plane has ``plane_step = 0``), and the spatial padding reads the level
        ``pad_level`` (``0 … 2**planes − 1``; it defaults to the layer's ``pad_bit``, which
        must be 0 when a ``pad_level`` is given); the payload's ``pad_bit`` is 0. A
        generator of ``max_planes = 1`` takes only ``planes = 1`` (and a ``plane_step`` or
        ``pad_level`` of 0) and its payload has no plane fields.

        Raises
        ------
        ValueError
            If the layer exceeds the generator's limits, the group does not exist, the
            tiles or their tags do not fit, or the planes do not fit the bank.
        """
        words = layer.words(self._simd)
        map_words = layer.in_h * layer.in_w * words
        if tag_step is None:
            tag_step = layer.k_words(self._simd)
        problems = []
        planes, plane_step, pad_level = self._check_planes(layer, planes, plane_step,
                                                           pad_level, problems)
        end = base + (planes - 1) * plane_step + map_words
        if base < 0 or end > self._depth:
            problems.append((f"the input map's {planes} planes need" if planes > 1
                             else "the input map needs")
                            + f" words {base} … {end - 1}, a bank holds {self._depth}")
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
        payload = {
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
        if self._max_planes > 1:
            payload |= {"pad_bit": 0, "planes": planes,
                        "plane_step": plane_step if planes > 1 else 0,
                        "pad_level": pad_level}
        return payload

    def _check_planes(self, layer: WindowLayer, planes, plane_step, pad_level,
                      problems: list) -> tuple[int, int, int]:
        """``planes``, ``plane_step`` and ``pad_level`` of :meth:`command_payload` with
        their defaults filled in; each problem is appended to ``problems``."""
        map_words = layer.in_h * layer.in_w * layer.words(self._simd)
        if isinstance(planes, bool) or not isinstance(planes, int) \
                or not 1 <= planes <= self._max_planes:
            problems.append(f"planes must be in 1 … {self._max_planes}, not {planes!r}")
            planes = 1
        if plane_step is None:
            plane_step = map_words if planes > 1 else 0
        elif isinstance(plane_step, bool) or not isinstance(plane_step, int) \
                or plane_step < 0:
            problems.append(f"plane_step must be a non-negative integer, not {plane_step!r}")
            plane_step = map_words
        elif self._max_planes == 1 and plane_step:
            problems.append(f"plane_step {plane_step} needs max_planes > 1")
        elif planes > 1 and plane_step < map_words:
            problems.append(f"plane_step {plane_step} is below the map's {map_words} "
                            "words: the planes overlap")
        if pad_level is None or (self._max_planes == 1 and pad_level == 0):
            pad_level = layer.pad_bit
        elif isinstance(pad_level, bool) or not isinstance(pad_level, int) \
                or not 0 <= pad_level < 1 << planes:
            problems.append(f"pad_level must be in 0 … {(1 << planes) - 1} for {planes} "
                            f"plane{'s' if planes > 1 else ''}, not {pad_level!r}")
        elif self._max_planes == 1 and pad_level:
            problems.append(f"pad_level {pad_level} needs max_planes > 1")
        elif layer.pad_bit:
            problems.append("pad_bit must be 0 with a pad_level (the padding is pad_level)")
        return planes, plane_step, pad_level

    # -- hardware ---------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        # two engines (window_engines.py): *setup* turns a command into per-row window
        # origins while *issue* reads the running command's K-words; the set-up window
        # passes from one to the other after the last K-word of the running command
        setup = m.submodules.setup = SetupEngine(
            command_layout=self._command_layout, rows=self._rows, simd=self._simd,
            depth=self._depth, max_kernel=self._max_kernel, max_planes=self._max_planes,
            fixed_layer=self._fixed_layer)
        issue = m.submodules.issue = IssueEngine(
            window_layout=setup.window_layout, word_layout=self._word_layout,
            rows=self._rows, simd=self._simd, depth=self._depth,
            max_kernel=self._max_kernel, max_words=self._max_words,
            max_tiles=self._max_tiles, tag_width=self._tag_width,
            max_planes=self._max_planes, fixed_layer=self._fixed_layer)
        wiring.connect(m, wiring.flipped(self.command), setup.command)
        wiring.connect(m, setup.window, issue.window)
        for r in range(self._rows):
            wiring.connect(m, issue.read[r], wiring.flipped(self.read[r]))
        wiring.connect(m, issue.words, wiring.flipped(self.words))
        wiring.connect(m, issue.fetch, wiring.flipped(self.fetch))
        return m


def window_generator(config: AcceleratorConfig, *, tag_width: int | None = None,
                     max_tiles: int | None = None) -> WindowGenerator:
    """The window generator of ``config`` (reads ``config.rows`` ports of the buffer).

    ``tag_width`` defaults to the weight memory's address width, so that the tag can be
    the job's weight base address (``fetch.addr``, their sum, addresses the weights);
    ``max_tiles`` to ``ceil(max_channels / cols)``, the tiles of the widest layer, so that
    one command can run all tiles of a pixel group (as the layer controller does). The
    generator streams up to ``config.max_input_bits`` bit-planes (``max_planes``; 1 on
    a contract-1 config, whose generator is the contract-1 one).
    """
    if tag_width is None:
        tag_width = max(1, (config.weight_depth - 1).bit_length())
    if max_tiles is None:
        max_tiles = -(-config.max_channels // config.cols)
    return WindowGenerator(rows=config.rows, simd=config.simd, depth=config.activation_depth,
                           max_channels=config.max_channels, max_kernel=config.max_kernel,
                           max_stride=config.max_stride, tag_width=tag_width,
                           max_tiles=max_tiles, max_planes=config.max_input_bits,
                           src_loc_at=1)
