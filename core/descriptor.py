"""The layer descriptor: one device pass (a binary convolution or a max-pool pass).

:class:`LayerDescriptor` is the one home of the descriptor. Its dataclass fields *are*
the field table: each carries its width in bits (``metadata["bits"]``), and the fields'
order is their order in the CONFIGURE_LAYER payload, least significant bit first
(docs/protocol.md, "CONFIGURE_LAYER"). Everything else is derived from that table:

* :meth:`LayerDescriptor.encode` / :meth:`LayerDescriptor.decode`, the 32-byte payload
  (48 bytes extended);
* :func:`descriptor_layout`, the Amaranth ``data.StructLayout`` the hardware views its
  argument register through (:mod:`bitdet.hw.top`);
* :meth:`LayerDescriptor.problems`, every reason a build refuses the pass, each a
  :class:`FitProblem` naming the field, the limit and the value, and the error code the
  device answers (the emulator's CONFIGURE_LAYER check) or none where only the host can
  tell (a map that runs off the end of its memory from its base).

Adding a field is one line in :class:`LayerDescriptor` (taking its bits from
``reserved``) plus the logic that uses it.

**Contract 2** (``AcceleratorConfig.contract == 2``: n-bit maps, residual shortcuts, map
slots; docs/protocol.md, "Contract 2") extends the descriptor by
:data:`EXTENSION_SIZE` bytes: the fields marked ``metadata["extension"]`` follow the base
fields (an *extended* descriptor, a CONFIGURE_LAYER payload of
:data:`EXTENDED_DESCRIPTOR_SIZE` bytes, one more with the table index). A contract-1
build answers BAD_LENGTH to it; a contract-2 build takes only extended descriptors. The
base fields, :func:`descriptor_fields` and :func:`descriptor_layout` (what today's RTL
reads) are unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "EXTENDED_DESCRIPTOR_SIZE",
    "EXTENSION_SIZE",
    "LAYER_DESCRIPTOR_SIZE",
    "FitProblem",
    "LayerDescriptor",
    "descriptor_fields",
    "descriptor_layout",
    "extended_descriptor_layout",
    "extension_fields",
    "output_size",
]

LAYER_DESCRIPTOR_SIZE = 32
"""Bytes of a layer descriptor (the CONFIGURE_LAYER payload without its table index)."""

EXTENSION_SIZE = 16
"""Bytes of the contract-2 extension that follows the base fields."""

EXTENDED_DESCRIPTOR_SIZE = LAYER_DESCRIPTOR_SIZE + EXTENSION_SIZE
"""Bytes of an extended (contract-2) descriptor."""

MAX_LEVEL_BITS = 4
"""Widest level of a map the contract-2 descriptor describes (input, output, shortcut)."""


def _bits(n: int, doc: str, default=dataclasses.MISSING):
    return field(default=default, metadata={"bits": n, "doc": doc})


def _ext(n: int, doc: str, default: int = 0):
    return field(default=default, metadata={"bits": n, "doc": doc, "extension": True})


def output_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    """Output rows (or columns) of a ``kernel``/``stride`` window over ``size`` inputs with
    ``padding`` on each side: ``(size + 2·padding − kernel) // stride + 1`` (docs/numerics.md).
    The one implementation of the formula: convolutions, pool passes, the golden model's
    shapes and the driver's plan all call it."""
    return (size + 2 * padding - kernel) // stride + 1


@dataclass(frozen=True)
class FitProblem:
    """One reason a device pass does not fit a build.

    Members
    -------
    field : str
        The descriptor field (or ``"K"``, ``"out_words"``, ...) at fault.
    limit : str
        The limit, as the config names it (``"max_kernel = 3"``).
    value : int
        The descriptor's value.
    message : str
        One line for a person.
    code : str or None
        The :class:`~bitdet.core.protocol.ErrorCode` name the device answers at
        CONFIGURE_LAYER (``"BAD_ARGUMENT"``, ``"LAYER_DOES_NOT_FIT"``), or ``None`` for a
        problem only the host checks.
    stage : int
        The order in which the device's checks answer (1: a zero size or a bad flag, 2: a
        size beyond the build, 3: an output size that does not match the window); 0 for
        the host's checks.
    """

    field: str
    limit: str
    value: int
    message: str
    code: str | None = None
    stage: int = 0

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, eq=False)
class LayerDescriptor(Mapping):
    """One pass of the device: a binary convolution (``pool = 0``) or a binary max-pool
    (``pool = 1``). Bases are in entries of their memory (words of the activation bank,
    K-words of the weight memory, entries of the threshold memory).

    Build one with :meth:`conv` or :meth:`pool_pass`, which derive the output shape; the
    constructor checks only that every field fits its bits.

    It is also a read-only mapping of its fields (but ``reserved``, which a valid
    descriptor leaves 0): ``desc["kernel"]``, ``dict(desc)``, ``f(**desc)``, and equal to a
    dict with the same items.
    """

    in_h: int = _bits(16, "input rows")
    in_w: int = _bits(16, "input columns")
    channels: int = _bits(16, "input channels")
    out_h: int = _bits(16, "output rows")
    out_w: int = _bits(16, "output columns")
    out_channels: int = _bits(16, "output channels (= channels for a pool pass)")
    kernel: int = _bits(8, "kernel size (square)")
    stride: int = _bits(8, "stride")
    padding: int = _bits(8, "padding on each side (convolution only)")
    pad_bit: int = _bits(1, "the bit padding reads (0 = −1, 1 = +1)", 0)
    raw: int = _bits(1, "output raw P instead of thresholded bits (not on the device yet)", 0)
    pool: int = _bits(1, "a max-pool pass, not a convolution", 0)
    reserved: int = _bits(5, "must be 0", 0)
    input_base: int = _bits(32, "first activation word of the input map", 0)
    output_base: int = _bits(32, "first activation word of the output map", 0)
    weight_base: int = _bits(32, "first weight entry (0 for a pool pass)", 0)
    threshold_base: int = _bits(32, "first threshold entry (0 for a pool pass)", 0)
    # -- the contract-2 extension (an extended descriptor only) --------------------------
    in_bits: int = _ext(3, "bits per input level, 1 … 4 (bit-planes of the input map)", 1)
    out_bits: int = _ext(3, "bits per output level, 1 … 4 (2**out_bits − 1 thresholds)", 1)
    shortcut_bits: int = _ext(3, "bits of the shortcut map, 0 (none) … 4")
    pad_level: int = _ext(4, "the level spatial padding reads (pad_bit must be 0)")
    repeat: int = _ext(1, "a channel-repeat pass: output channel o is input channel o mod C")
    input_slot: int = _ext(4, "activation slot of the input map")
    output_slot: int = _ext(4, "activation slot of the output map")
    shortcut_slot: int = _ext(4, "activation slot of the shortcut map")
    ext_reserved: int = _ext(70, "must be 0")
    shortcut_base: int = _ext(32, "first word of the shortcut map in its slot")
    extended: bool = field(default=False, compare=False, metadata={
        "doc": "an extended (contract-2) descriptor; set by any extension field that is "
               "not its default"})

    def __post_init__(self):
        for f in (*descriptor_fields(), *extension_fields()):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                object.__setattr__(self, f.name, int(value))
                value = int(value)
            top = (1 << f.metadata["bits"]) - 1
            if not isinstance(value, int) or not 0 <= value <= top:
                raise ValueError(f"{f.name} must be an integer in 0 … {top}, not {value!r}")
        if not isinstance(self.extended, (bool, int)) or self.extended not in (0, 1):
            raise ValueError(f"extended must be a bool, not {self.extended!r}")
        extended = bool(self.extended) or any(
            getattr(self, f.name) != f.default for f in extension_fields())
        object.__setattr__(self, "extended", extended)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def conv(cls, *, in_h: int, in_w: int, channels: int, out_channels: int, kernel: int,
             stride: int = 1, padding: int = 0, pad_bit: int = 0, raw: int = 0,
             input_base: int = 0, output_base: int = 0, weight_base: int = 0,
             threshold_base: int = 0, **extension) -> LayerDescriptor:
        """A binary convolution; the output size by :func:`output_size`. ``extension``:
        contract-2 fields (``in_bits``, ``out_bits``, ``shortcut_bits``, ``pad_level``,
        the slots, ``shortcut_base``, ``extended``)."""
        return cls(in_h=in_h, in_w=in_w, channels=channels,
                   out_h=output_size(in_h, kernel, stride, padding),
                   out_w=output_size(in_w, kernel, stride, padding),
                   out_channels=out_channels, kernel=kernel, stride=stride, padding=padding,
                   pad_bit=pad_bit, raw=raw, input_base=input_base, output_base=output_base,
                   weight_base=weight_base, threshold_base=threshold_base, **extension)

    @classmethod
    def pool_pass(cls, *, in_h: int, in_w: int, channels: int, kernel: int,
                  stride: int | None = None, input_base: int = 0,
                  output_base: int = 0, **extension) -> LayerDescriptor:
        """A max-pool pass (``stride`` defaults to ``kernel``): no padding, no weights; over
        an n-bit map (``in_bits = out_bits = n``) the max of the levels."""
        stride = kernel if stride is None else stride
        return cls(in_h=in_h, in_w=in_w, channels=channels,
                   out_h=output_size(in_h, kernel, stride), out_w=output_size(in_w, kernel, stride),
                   out_channels=channels, kernel=kernel, stride=stride, padding=0, pool=1,
                   input_base=input_base, output_base=output_base, **extension)

    @classmethod
    def repeat_pass(cls, *, h: int, w: int, channels: int, out_channels: int, bits: int = 1,
                    **extension) -> LayerDescriptor:
        """A channel-repeat pass (contract 2): ``out_channels`` channels, channel ``o``
        copying input channel ``o mod channels`` of a ``bits``-bit map."""
        return cls(in_h=h, in_w=w, channels=channels, out_h=h, out_w=w,
                   out_channels=out_channels, kernel=1, stride=1, padding=0, repeat=1,
                   in_bits=bits,
                   out_bits=bits, **extension)

    # -- the payload ----------------------------------------------------------------------
    def encode(self, index: int | None = None) -> bytes:
        """The CONFIGURE_LAYER payload: the fields packed least significant bit first in
        :data:`LAYER_DESCRIPTOR_SIZE` bytes (an extended descriptor: the extension after
        them, :data:`EXTENDED_DESCRIPTOR_SIZE` bytes), little-endian; with ``index`` the
        layer table entry precedes them (33 or 49 bytes)."""
        table = (*descriptor_fields(), *(extension_fields() if self.extended else ()))
        value, shift = 0, 0
        for f in table:
            value |= getattr(self, f.name) << shift
            shift += f.metadata["bits"]
        payload = value.to_bytes(shift // 8, "little")
        return payload if index is None else bytes([index]) + payload

    @classmethod
    def decode(cls, payload: bytes) -> LayerDescriptor:
        """Inverse of :meth:`encode` (without the index byte): a base descriptor of
        :data:`LAYER_DESCRIPTOR_SIZE` bytes or an extended one of
        :data:`EXTENDED_DESCRIPTOR_SIZE`."""
        payload = bytes(payload)
        if len(payload) not in (LAYER_DESCRIPTOR_SIZE, EXTENDED_DESCRIPTOR_SIZE):
            from .protocol import ProtocolError
            raise ProtocolError(f"layer descriptor of {len(payload)} bytes, expected "
                                f"{LAYER_DESCRIPTOR_SIZE} (or {EXTENDED_DESCRIPTOR_SIZE} "
                                "extended)")
        extended = len(payload) == EXTENDED_DESCRIPTOR_SIZE
        table = (*descriptor_fields(), *(extension_fields() if extended else ()))
        value, values = int.from_bytes(payload, "little"), {}
        for f in table:
            bits = f.metadata["bits"]
            values[f.name] = value & ((1 << bits) - 1)
            value >>= bits
        return cls(**values, extended=extended)

    def as_dict(self) -> dict:
        """Every field, ``reserved`` (and ``ext_reserved``, ``extended``) too."""
        return dataclasses.asdict(self)

    @property
    def _mapped(self) -> tuple[str, ...]:
        return _MAPPED_EXTENDED if self.extended else _MAPPED

    def __getitem__(self, name: str) -> int:
        if name not in self._mapped:
            raise KeyError(name)
        return getattr(self, name)

    def __iter__(self):
        return iter(self._mapped)

    def __len__(self) -> int:
        return len(self._mapped)

    def __eq__(self, other):
        if isinstance(other, LayerDescriptor):
            return self.as_dict() == other.as_dict()   # "extended" included
        return Mapping.__eq__(self, other)

    def __hash__(self):
        return hash(tuple(self.as_dict().values()))

    def replace(self, **changes) -> LayerDescriptor:
        return dataclasses.replace(self, **changes)

    # -- shapes ------------------------------------------------------------------------------
    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(channels, in_h, in_w)``."""
        return self.channels, self.in_h, self.in_w

    @property
    def out_shape(self) -> tuple[int, int, int]:
        """``(out_channels, out_h, out_w)``."""
        return self.out_channels, self.out_h, self.out_w

    @property
    def k(self) -> int:
        """Products per output of a convolution, ``channels · kernel²``."""
        return self.channels * self.kernel ** 2

    def map_words(self, simd: int, *, output: bool = True) -> int:
        """Activation words of one bit-plane of the output (or input) map: one
        ``simd``-bit word per pixel and group of ``simd`` channels. An n-bit map takes n
        such planes, plane ``b`` at ``base + b·map_words`` (docs/packing.md)."""
        c, h, w = self.out_shape if output else self.in_shape
        return h * w * -(-c // simd)

    @property
    def kind(self) -> str:
        """``"conv"``, ``"pool"`` or ``"repeat"``."""
        return "pool" if self.pool else "repeat" if self.repeat else "conv"

    @property
    def accumulator_max(self) -> int:
        """Largest accumulator of a convolution, ``(2**in_bits − 1)·K``."""
        return ((1 << self.in_bits) - 1) * self.k

    @property
    def threshold_rows(self) -> int:
        """Threshold-memory entries per tile: ``2**shortcut_bits`` (one per shortcut
        level, docs/packing.md)."""
        return 1 << self.shortcut_bits

    # -- fit -------------------------------------------------------------------------------
    def problems(self, config) -> list[FitProblem]:
        """Every reason a build of ``config`` (an
        :class:`~bitdet.core.config.AcceleratorConfig`) refuses or cannot run this pass.

        The problems with a ``code`` are the device's own CONFIGURE_LAYER checks (the
        emulator answers with the first code in the order BAD_ARGUMENT for a zero size or
        a bad flag, LAYER_DOES_NOT_FIT for a size beyond the build, BAD_ARGUMENT for an
        inconsistent output size); those without one the host adds (a map, the weights
        or the thresholds running past the end of their memory from their base, ``K``
        beyond the accumulator).
        """
        return (self._flag_problems() + self._size_problems(config)
                + self._window_problems() + self._memory_problems(config))

    def _flag_problems(self) -> list[FitProblem]:
        """Stage 1: zero sizes, reserved or misplaced flags (BAD_ARGUMENT)."""
        what = {"conv": "layer", "pool": "pool pass", "repeat": "repeat pass"}[self.kind]
        out = [_problem(name, "≥ 1", 0, f"the {what}'s {name} is 0", 1)
               for name in ("in_h", "in_w", "channels", "out_h", "out_w", "out_channels",
                            "kernel", "stride") if getattr(self, name) == 0]
        if self.reserved:
            out.append(_problem("reserved", "0", self.reserved,
                                f"reserved flag bits {self.reserved:#x} set", 1))
        if self.extended:
            out += self._extension_flag_problems(what)
        if self.repeat:
            return out
        if not self.pool:
            if self.raw:
                out.append(_problem("raw", "0", 1, "the layer controller thresholds every "
                                    "output (raw P runs on the host)", 1))
            return out
        out += [_problem(name, "0 in a pool pass", getattr(self, name),
                         f"a pool pass has no {name.replace('_base', ' memory')}", 1)
                for name in ("pad_bit", "raw", "weight_base", "threshold_base")
                if getattr(self, name)]
        if self.out_channels != self.channels:
            out.append(_problem("out_channels", f"channels = {self.channels}",
                                self.out_channels, f"a pool pass keeps its {self.channels} "
                                f"channels, not {self.out_channels}", 1))
        return out

    def _extension_flag_problems(self, what: str) -> list[FitProblem]:
        """Stage 1 of an extended descriptor: bit widths, padding level, pass kinds and
        slots that contradict each other (BAD_ARGUMENT)."""
        out = []
        for name, low in (("in_bits", 1), ("out_bits", 1), ("shortcut_bits", 0)):
            value = getattr(self, name)
            if not low <= value <= MAX_LEVEL_BITS:
                out.append(_problem(name, f"{low} … {MAX_LEVEL_BITS}", value,
                                    f"the {what}'s {name} is {value}, not {low} … "
                                    f"{MAX_LEVEL_BITS}", 1))
        if self.ext_reserved:
            out.append(_problem("ext_reserved", "0", self.ext_reserved,
                                "reserved extension bits set", 1))
        if self.pad_bit:
            out.append(_problem("pad_bit", "0 in an extended descriptor", 1,
                                "an extended descriptor pads with pad_level, not pad_bit", 1))
        if self.pad_level >= 1 << min(self.in_bits, MAX_LEVEL_BITS):
            out.append(_problem("pad_level", "≤ 2**in_bits − 1", self.pad_level,
                                f"pad_level {self.pad_level} is not a {self.in_bits}-bit level",
                                1))
        if self.pool and self.repeat:
            out.append(_problem("repeat", "0 in a pool pass", 1,
                                "a pass is a pool pass or a repeat pass, not both", 1))
        if self.pool or self.repeat:
            if self.out_bits != self.in_bits:
                out.append(_problem("out_bits", f"in_bits = {self.in_bits}", self.out_bits,
                                    f"a {what} keeps its {self.in_bits}-bit levels, not "
                                    f"{self.out_bits}", 1))
            out += [_problem(name, f"0 in a {what}", getattr(self, name),
                             f"a {what} has no {name.replace('_', ' ')}", 1)
                    for name in ("shortcut_bits", "pad_level")
                    if getattr(self, name)]
        if self.repeat:
            out += [_problem(name, f"{want} in a repeat pass", getattr(self, name),
                             f"a repeat pass has {name} {want}, not {getattr(self, name)}", 1)
                    for name, want in (("kernel", 1), ("stride", 1), ("padding", 0),
                                       ("pad_bit", 0), ("raw", 0), ("weight_base", 0),
                                       ("threshold_base", 0))
                    if getattr(self, name) != want]
        if not self.shortcut_bits and (self.shortcut_slot or self.shortcut_base):
            out.append(_problem("shortcut_slot", "0 without a shortcut",
                                self.shortcut_slot or self.shortcut_base,
                                "shortcut_slot / shortcut_base set but shortcut_bits is 0", 1))
        if self.output_slot == self.input_slot:
            out.append(_problem("output_slot", f"≠ input_slot {self.input_slot}",
                                self.output_slot, f"the {what} reads and writes slot "
                                f"{self.output_slot}", 1))
        if self.shortcut_bits and self.output_slot == self.shortcut_slot:
            out.append(_problem("output_slot", f"≠ shortcut_slot {self.shortcut_slot}",
                                self.output_slot, f"the {what} writes slot "
                                f"{self.output_slot}, where its shortcut is", 1))
        return out

    def _size_problems(self, c) -> list[FitProblem]:
        """Stage 2: sizes beyond the build (LAYER_DOES_NOT_FIT)."""
        if self.pool:
            limits = [("kernel", c.pool_max_kernel, "the pool engine's largest kernel"),
                      ("stride", c.pool_max_kernel, "the pool engine's largest stride"),
                      ("padding", 0, "a pool pass's padding")]
        elif self.repeat:
            limits = [("out_channels", c.max_channels, "max_channels")]
        else:
            limits = [("kernel", c.max_kernel, "max_kernel"),
                      ("stride", c.max_stride, "max_stride"),
                      ("padding", c.max_kernel - 1, "max_kernel − 1"),
                      ("out_channels", c.max_channels, "max_channels"),
                      ("weight_base", c.weight_depth - 1, "weight_depth − 1"),
                      ("threshold_base", c.threshold_depth - 1, "threshold_depth − 1")]
        depth = c.activation_depth
        limits += [("channels", c.max_channels, "max_channels"),
                   *((name, depth, "activation_depth")
                     for name in ("in_h", "in_w", "out_h", "out_w")),
                   ("input_base", depth - 1, "activation_depth − 1"),
                   ("output_base", depth - 1, "activation_depth − 1")]
        if self.extended:
            slots = getattr(c, "activation_slots", 2)
            limits += [("in_bits", getattr(c, "max_input_bits", 1), "max_input_bits"),
                       ("out_bits", c.output_bits, "output_bits"),
                       ("shortcut_bits", getattr(c, "max_shortcut_bits", 0),
                        "max_shortcut_bits"),
                       *((name, slots - 1, "activation_slots − 1")
                         for name in ("input_slot", "output_slot", "shortcut_slot")),
                       ("shortcut_base", depth - 1, "activation_depth − 1")]
        out = [_problem(name, f"{label} = {limit}", getattr(self, name),
                        f"{name} {getattr(self, name)} exceeds {label} ({limit})", 2)
               for name, limit, label in limits if getattr(self, name) > limit]
        for side, h, w in (("in", self.in_h, self.in_w), ("out", self.out_h, self.out_w)):
            if h * w > depth:
                out.append(_problem(f"{side}_h", f"{side}_h·{side}_w ≤ activation_depth = "
                                    f"{depth}", h * w, f"the {side}put map has {h}×{w} "
                                    f"pixels, activation_depth is {depth}", 2))
        return out

    def _window_problems(self) -> list[FitProblem]:
        """Stage 3: an output size that does not match the window (BAD_ARGUMENT)."""
        if not (self.stride and self.kernel):
            return []
        pad = 0 if self.pool else self.padding
        out = []
        for name, size, got in (("out_h", self.in_h, self.out_h),
                                ("out_w", self.in_w, self.out_w)):
            span, reach = size + 2 * pad, got * self.stride
            if not reach - self.stride + self.kernel <= span < reach + self.kernel:
                want = output_size(size, self.kernel, self.stride, pad)
                out.append(_problem(name, f"{want}", got, f"{name} {got} does not match a "
                                    f"{self.kernel}×{self.kernel} / {self.stride} window over "
                                    f"{size} (padding {pad}): it is {want}", 3))
        return out

    def _memory_problems(self, c) -> list[FitProblem]:
        out = []
        spans = [("input_base", "input map needs", self.input_base,
                  self.in_bits * self.map_words(c.simd, output=False), c.activation_depth,
                  "activation_depth"),
                 ("output_base", "output map needs", self.output_base,
                  self.out_bits * self.map_words(c.simd), c.activation_depth,
                  "activation_depth")]
        if self.shortcut_bits:
            spans.append(("shortcut_base", "shortcut map needs", self.shortcut_base,
                          self.shortcut_bits * self.map_words(c.simd), c.activation_depth,
                          "activation_depth"))
        if self.kind == "conv":
            tiles = -(-self.out_channels // c.cols)
            k_words = self.kernel ** 2 * -(-self.channels // c.simd)
            spans += [("weight_base", "weights need", self.weight_base, tiles * k_words,
                       c.weight_depth, "weight_depth"),
                      ("threshold_base", "thresholds need", self.threshold_base,
                       tiles * self.threshold_rows, c.threshold_depth, "threshold_depth")]
            if self.k > c.max_k:
                out.append(FitProblem("K", f"max_k = {c.max_k}", self.k,
                                      f"K = {self.k} exceeds the accelerator's max_k {c.max_k}"))
            elif self.accumulator_max.bit_length() > c.acc_width:
                out.append(FitProblem("K", f"acc_width = {c.acc_width}", self.accumulator_max,
                                      f"A reaches (2**{self.in_bits} − 1)·K = "
                                      f"{self.accumulator_max}, beyond the {c.acc_width}-bit "
                                      "accumulator"))
        for name, what, base, size, limit, limit_name in spans:
            if base + size > limit:
                out.append(FitProblem(name, f"{limit_name} = {limit}", base + size,
                                      f"the {what} entries {base} … {base + size - 1}, "
                                      f"{limit_name} is {limit}"))
        return out

    def refusal(self, config) -> str | None:
        """The :class:`~bitdet.core.protocol.ErrorCode` name the device answers to this
        descriptor at CONFIGURE_LAYER (``None``: it accepts it): the code of the
        problem of the earliest stage (:class:`FitProblem`)."""
        checked = [p for p in self.problems(config) if p.stage]
        return min(checked, key=lambda p: p.stage).code if checked else None


_STAGE_CODES = {1: "BAD_ARGUMENT", 2: "LAYER_DOES_NOT_FIT", 3: "BAD_ARGUMENT"}


def _problem(name: str, limit: str, value: int, message: str, stage: int) -> FitProblem:
    return FitProblem(name, limit, value, message, _STAGE_CODES[stage], stage)


def descriptor_fields() -> tuple[dataclasses.Field, ...]:
    """The field table: :class:`LayerDescriptor`'s fields in payload order, each with its
    ``metadata["bits"]`` and ``metadata["doc"]``."""
    return tuple(f for f in dataclasses.fields(LayerDescriptor)
                 if "bits" in f.metadata and not f.metadata.get("extension"))


def descriptor_layout():
    """The Amaranth ``data.StructLayout`` of a descriptor (field ``i`` at the bits after
    field ``i − 1``, as :meth:`LayerDescriptor.encode` packs them); needs amaranth."""
    from amaranth.lib import data
    return data.StructLayout({f.name: f.metadata["bits"] for f in descriptor_fields()})


def extended_descriptor_layout():
    """The Amaranth ``data.StructLayout`` of an extended (contract-2) descriptor: the base
    fields, then the extension's, as :meth:`LayerDescriptor.encode` packs
    :data:`EXTENDED_DESCRIPTOR_SIZE` bytes; needs amaranth."""
    from amaranth.lib import data
    return data.StructLayout({f.name: f.metadata["bits"]
                              for f in (*descriptor_fields(), *extension_fields())})


def extension_fields() -> tuple[dataclasses.Field, ...]:
    """The contract-2 extension's field table, in payload order after the base fields."""
    return tuple(f for f in dataclasses.fields(LayerDescriptor)
                 if f.metadata.get("extension"))


_MAPPED = tuple(f.name for f in descriptor_fields() if f.name != "reserved")
_MAPPED_EXTENDED = (*_MAPPED, *(f.name for f in extension_fields()
                                if f.name != "ext_reserved"), "extended")

assert sum(f.metadata["bits"] for f in descriptor_fields()) == 8 * LAYER_DESCRIPTOR_SIZE
assert sum(f.metadata["bits"] for f in extension_fields()) == 8 * EXTENSION_SIZE
