"""AcceleratorConfig: every parameter of the generated accelerator, validated at once.

One frozen object sizes the hardware and generates the constants the host side needs
(:meth:`AcceleratorConfig.host_constants`), so hardware and driver cannot disagree
silently. Presets live in ``configs/*.yaml``; :func:`load_config` reads them.

Memory organisation the sizes refer to (all words are ``simd`` bits wide):

* weights: one memory per array column, ``weight_depth`` words each; column ``c`` holds
  the K-words of output channels ``t·cols + c`` for every tile ``t`` of every resident
  layer (the order of :func:`bitdet.core.packing.pack_weights`);
* thresholds: one memory per column, ``threshold_depth`` entries of
  ``(2**output_bits − 1)`` thresholds, each ``acc_width + 1`` bits (``T = K + 1``);
* activations: ``activation_slots`` map slots of ``activation_depth`` words each (pixels
  row-major, channel words innermost, as :func:`bitdet.core.packing.pack_activations`; an
  n-bit map as n bit-planes one after the other). Contract 1 uses two slots as ping-pong
  banks; contract 2 names the slots in every descriptor (docs/protocol.md, "Contract 2").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path

__all__ = ["CONTRACT_1_VALUES", "PRESETS_DIR", "AcceleratorConfig", "ConfigError",
           "load_config"]

PRESETS_DIR = Path(str(files("bitdet.configs")))
"""The folder of the preset YAML files (``configs/`` of the checkout, package data of an
install: ``bitdet.configs``)."""


class ConfigError(ValueError):
    """An accelerator configuration that cannot be built, with the field and the limit."""


#: Upper bounds of the integer fields (the lower bound of each is 1). They keep a config
#: within what an FPGA (and the emulator's memory) can hold; the error names the field and
#: the bound. :data:`MAX_MEMORY_BITS` bounds the memories together.
FIELD_MAX = {
    "rows": 256, "cols": 256,
    "weight_depth": 1 << 22, "threshold_depth": 1 << 20, "activation_depth": 1 << 22,
    "max_channels": 1 << 16, "clock_hz": 2_000_000_000, "baud": 100_000_000,
    "contract": 2, "max_input_bits": 4, "max_shortcut_bits": 4, "activation_slots": 16,
}

#: The contract-2 fields and the value each has in a contract-1 build. A config whose
#: contract-2 fields all have these values hashes as it did before they existed
#: (:meth:`AcceleratorConfig.config_hash`), so shipped bitstreams keep their identity.
CONTRACT_1_VALUES = {"contract": 1, "max_input_bits": 1, "max_shortcut_bits": 0,
                     "activation_slots": 2}
MAX_MEMORY_BITS = 1 << 32
"""Largest total of :meth:`AcceleratorConfig.memory_bits` (4 Gibit = 512 MiB, beyond any
FPGA's block RAM)."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class AcceleratorConfig:
    """Parameters of one accelerator build.

    Parameters
    ----------
    name : str
    rows : int
        Array rows: output pixels computed in parallel (activations flow along rows).
    cols : int
        Array columns: output channels computed in parallel (weights flow along columns).
    simd : int
        XNOR-popcount bits per PE per cycle; a multiple of 8 (the packing word) and of
        ``cols`` (the layer controller packs a tile of ``cols`` outputs into one word).
    weight_depth, threshold_depth, activation_depth : int
        Memory depths in words / entries (see the module docstring).
    max_channels : int
        Largest input or output channel count of a layer.
    max_kernel, max_stride : int
        Largest square kernel and stride the window generator supports.
    output_bits : int
        Widest thresholded output (1 for binary; n uses 2**n − 1 thresholds).
    acc_width : int or None
        Accumulator bits; ``None`` picks the smallest that holds the largest K.
    clock_hz : int
        Core clock the timing and throughput figures assume.
    baud : int
        UART rate of the host link.
    board : str or None
        Board this preset targets (``bitdet hw build --board`` names the platform; a
        build for another board prints a warning).
    contract : int
        The device contract the build implements (docs/protocol.md): 1, chains of layers
        over 1-bit maps in two ping-pong banks (the RTL today); 2, extended descriptors:
        n-bit maps, residual shortcuts and map slots (the emulator; the RTL follows).
    max_input_bits : int
        Widest input level a layer reads (1 … 4; contract 2 for more than 1).
    max_shortcut_bits : int
        Widest shortcut map a layer adds (0: no shortcut path … 4; contract 2).
    activation_slots : int
        Map slots of ``activation_depth`` words (2 … 16; contract 2 for more than 2).

    Raises
    ------
    ConfigError
        A field of the wrong type or out of range, or a combination that cannot work
        (e.g. an accumulator too narrow for the largest K the weight memory admits).
    """

    name: str = "custom"
    rows: int = 4
    cols: int = 4
    simd: int = 32
    weight_depth: int = 1024
    threshold_depth: int = 256
    activation_depth: int = 4096
    max_channels: int = 256
    max_kernel: int = 3
    max_stride: int = 2
    output_bits: int = 1
    acc_width: int | None = None
    clock_hz: int = 25_000_000
    baud: int = 115_200
    board: str | None = None
    contract: int = 1
    max_input_bits: int = 1
    max_shortcut_bits: int = 0
    activation_slots: int = 2

    def __post_init__(self):  # noqa: C901
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("name", "board"):
                if not (isinstance(value, str) or (f.name == "board" and value is None)):
                    raise ConfigError(f"{f.name} must be a string, not {value!r}")
                continue
            if f.name == "acc_width" and value is None:
                continue
            if not _is_int(value):
                raise ConfigError(f"{f.name} must be an integer, not {value!r}")
            low = {"max_shortcut_bits": 0, "activation_slots": 2}.get(f.name, 1)
            if value < low:
                raise ConfigError(f"{f.name} must be at least {low}, not {value}")
            if f.name in FIELD_MAX and value > FIELD_MAX[f.name]:
                raise ConfigError(f"{f.name} must be at most {FIELD_MAX[f.name]}, not {value}")
        if self.simd % 8:
            raise ConfigError(f"simd must be a multiple of 8 (the packing word), not {self.simd}")
        if self.simd > 1024:
            raise ConfigError(f"simd must be at most 1024, not {self.simd}")
        if self.simd % self.cols:
            raise ConfigError(f"the layer controller needs simd ({self.simd}) to be a multiple "
                              f"of cols ({self.cols}): one tile of cols output channels is "
                              f"packed into one simd-bit output word")
        if self.max_kernel > 7:
            raise ConfigError(f"max_kernel must be at most 7, not {self.max_kernel}")
        if self.max_stride > self.max_kernel:
            raise ConfigError(f"max_stride ({self.max_stride}) must not exceed max_kernel "
                              f"({self.max_kernel})")
        if self.output_bits > 4:
            raise ConfigError(f"output_bits must be at most 4, not {self.output_bits}")
        if self.baud * 16 > self.clock_hz:
            raise ConfigError(f"baud {self.baud} needs a clock of at least 16× ({self.baud * 16}"
                              f" Hz); clock_hz is {self.clock_hz}")
        if self.contract == 1:
            for name, value in CONTRACT_1_VALUES.items():
                if getattr(self, name) != value:
                    raise ConfigError(f"{name} {getattr(self, name)} needs contract 2 (n-bit "
                                      f"maps, shortcuts, map slots); contract 1 has {value}")
        needed = (((1 << self.max_input_bits) - 1) * self.max_k).bit_length()
        if self.acc_width is None:
            object.__setattr__(self, "acc_width", needed)
        elif self.acc_width < needed:
            raise ConfigError(
                f"acc_width {self.acc_width} cannot hold the accumulator up to "
                f"(2**max_input_bits − 1)·K for the largest K the config admits "
                f"(min(max_channels·max_kernel² = "
                f"{self.max_channels * self.max_kernel ** 2}, weight_depth·simd = "
                f"{self.weight_depth * self.simd}) = {self.max_k}, needs {needed} bits)")
        if self.acc_width > 32:
            raise ConfigError(f"acc_width must be at most 32, not {self.acc_width}")
        total = sum(self.memory_bits().values())
        if total > MAX_MEMORY_BITS:
            raise ConfigError(f"the memories (weights, thresholds, activations) need {total} "
                              f"bits, more than the limit of {MAX_MEMORY_BITS} bits "
                              f"(MAX_MEMORY_BITS); lower weight_depth, threshold_depth, "
                              f"activation_depth, cols or simd")

    # -- derived -----------------------------------------------------------------------------
    @property
    def max_k(self) -> int:
        """Largest K of a layer: limited by the channels and kernel, and by a column's
        weight memory (one output channel's weights must fit in it)."""
        return min(self.max_channels * self.max_kernel ** 2, self.weight_depth * self.simd)

    @property
    def pool_max_kernel(self) -> int:
        """Largest kernel (and stride) of a pool pass: ``max(3, max_kernel)`` (the pool
        engine's window counters are at least 2 bits wide)."""
        return max(3, self.max_kernel)

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    @property
    def xnor_bits_per_cycle(self) -> int:
        return self.pes * self.simd

    @property
    def peak_gops(self) -> float:
        """Peak binary operations per second / 1e9 (an XNOR and an add per bit: 2 ops)."""
        return 2 * self.xnor_bits_per_cycle * self.clock_hz / 1e9

    @property
    def threshold_width(self) -> int:
        """Bits of one threshold: ``acc_width + 1``, since ``T = Amax + 1`` means
        "never"."""
        return self.acc_width + 1

    @property
    def thresholds_per_channel(self) -> int:
        return (1 << self.output_bits) - 1

    def memory_bits(self) -> dict[str, int]:
        """Bits of each on-chip memory (all columns / all activation slots)."""
        return {
            "weights": self.cols * self.weight_depth * self.simd,
            "thresholds": self.cols * self.threshold_depth * self.thresholds_per_channel
            * self.threshold_width,
            "activations": self.activation_slots * self.activation_depth * self.simd,
        }

    def fit_problems(self, requirements) -> list[str]:
        """Why a bundle's :class:`~bitdet.core.bundle.Requirements` do not fit this build.

        Empty when the network runs with every layer's weights and thresholds resident.
        """
        r = requirements
        problems = []
        for what, need, have, field in (
                ("input/output channels", max(r.max_in_channels, r.max_out_channels),
                 self.max_channels, "max_channels"),
                ("K (C·kh·kw)", r.max_k, self.max_k, "max_k"),
                ("kernel", r.max_kernel, self.max_kernel, "max_kernel"),
                ("stride", r.max_stride, self.max_stride, "max_stride"),
                ("output bits", r.max_output_bits, self.output_bits, "output_bits")):
            if need > have:
                problems.append(f"the network needs {what} up to {need}, the accelerator's "
                                f"{field} is {have}")
        weight_words = sum(-(-o // self.cols) * kh * kw * -(-c // self.simd)
                           for (c, o, kh, kw, _hw, _ohw) in r.layer_shapes)
        if weight_words > self.weight_depth:
            problems.append(f"resident weights need {weight_words} words per column, "
                            f"weight_depth is {self.weight_depth}")
        threshold_entries = sum(-(-o // self.cols) for (_c, o, *_rest) in r.layer_shapes)
        if threshold_entries > self.threshold_depth:
            problems.append(f"resident thresholds need {threshold_entries} entries per column, "
                            f"threshold_depth is {self.threshold_depth}")
        activation_words = r.activation_words(self.simd)
        if activation_words > self.activation_depth:
            problems.append(f"the largest feature map needs {activation_words} words, "
                            f"activation_depth is {self.activation_depth}")
        return problems

    def config_hash(self) -> str:
        """Short hash of every parameter (the device reports it in `identify`). The
        contract-2 fields count only where they differ from a contract-1 build
        (:data:`CONTRACT_1_VALUES`), so contract-1 configs keep the hash they had."""
        hashed = {key: value for key, value in self.to_dict().items()
                  if CONTRACT_1_VALUES.get(key, object()) != value}
        text = json.dumps(hashed, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def host_constants(self) -> dict:
        """Everything the host driver needs to know about this build."""
        return {**self.to_dict(), "max_k": self.max_k, "pes": self.pes,
                "thresholds_per_channel": self.thresholds_per_channel,
                "memory_bits": self.memory_bits(), "config_hash": self.config_hash()}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> AcceleratorConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of fields, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        odd = [key for key in data if not isinstance(key, str)]
        if odd:
            raise ConfigError(f"{source}: field names must be strings, not {odd[0]!r} "
                              f"(known: {', '.join(sorted(known))})")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """A SafeLoader that refuses a key given twice in one mapping (not last-wins)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first on line "
                            f"{seen[key].line + 1})", key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:          # an unhashable key: SafeLoader reports it
                    pass
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(path_or_preset: str | Path) -> AcceleratorConfig:
    """Load a YAML config file, or a preset by name (``configs/<name>.yaml``)."""
    import yaml
    path = Path(path_or_preset)
    if not path.exists() and not path.suffix:
        path = PRESETS_DIR / f"{path_or_preset}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"{path_or_preset}: no such config file or preset "
                          f"(presets: {', '.join(presets) or 'none'})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r})") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())     # a SafeLoader
    except yaml.YAMLError as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        if mark is not None and problem:
            raise ConfigError(f"{path}: not valid YAML (line {mark.line + 1}: {problem})") \
                from None
        first = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        raise ConfigError(f"{path}: empty config (no fields; give at least the ones that "
                          "differ from the defaults, e.g. rows: 4)")
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return AcceleratorConfig.from_dict(data, source=str(path))
