# amaranth: UnusedElaboratable=no
"""Random layers through the top-level RTL on several configs, each compared with the
golden model; prints one table row per layer.

    python -m bitdet.sim.sweep                 # 20 shapes over 3 configs (Verilator)
    python -m bitdet.sim.sweep --shapes 6 --configs tiny --json
    python -m bitdet.sim.sweep --shapes 32 --configs v2   # contract 2 (n-bit, shortcuts)

One simulation per config runs all of its layers (random idle cycles on ``i`` and
back-pressure on ``o``); every layer is loaded at its own bases, run and read back over
the byte protocol (:func:`bitdet.sim.layer.run_case`). Exit status 1 if any layer
mismatches or its ``busy − stall`` is not the ideal cycle count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from bitdet.core.config import AcceleratorConfig, load_config

from .layer import random_case, run_case
from .link import RtlLink

__all__ = ["SWEEP_CONFIGS", "V2_CONFIGS", "random_shapes", "random_shapes_v2", "sweep"]

#: name → config of the sweep: the tiny preset (2×2×8), the iCEBreaker preset (1×4×16),
#: and a 3-row array (3×4×16) so that pixel groups do not divide evenly
SWEEP_CONFIGS = {
    "tiny": lambda: load_config("tiny"),
    "icebreaker": lambda: load_config("icebreaker"),
    "3x4x16": lambda: AcceleratorConfig(rows=3, cols=4, simd=16, weight_depth=512,
                                        threshold_depth=32, activation_depth=256,
                                        max_channels=48),
    # contract 2: n-bit maps, shortcuts and slots (random_shapes then draws the bits)
    "v2-3x2x8": lambda: load_config("tiny2"),
    "v2-2x4x16": lambda: AcceleratorConfig(
        name="v2-2x4x16", rows=2, cols=4, simd=16, weight_depth=512, threshold_depth=256,
        activation_depth=512, max_channels=48, output_bits=2, contract=2, max_input_bits=2,
        max_shortcut_bits=2, activation_slots=3),
}
#: the contract-2 sweep's configs (``--configs v2``)
V2_CONFIGS = [name for name in SWEEP_CONFIGS if name.startswith("v2-")]


def random_shapes(config: AcceleratorConfig, count: int, seed: int) -> list[dict]:
    """``count`` random layer shapes that fit ``config``: channels not multiples of
    ``simd``/``cols`` as often as not, kernels 1 and 3, strides 1 and 2, both pad bits
    (contract 2: :func:`random_shapes_v2`)."""
    if config.contract == 2:
        return random_shapes_v2(config, count, seed)
    from bitdet.hw.controller import LayerController
    from bitdet.hw.window import WindowLayer
    ctrl = LayerController(config=config)
    rng = np.random.default_rng(seed)
    shapes = []
    while len(shapes) < count:
        kernel = int(rng.choice([1, 3], p=[0.3, 0.7]))
        shape = {"cin": int(rng.integers(1, min(3 * config.simd, config.max_channels) + 1)),
                 "cout": int(rng.integers(1, min(4 * config.cols + 2, config.max_channels) + 1)),
                 "hw": (int(rng.integers(kernel, 9)), int(rng.integers(kernel, 9))),
                 "kernel": kernel, "stride": int(rng.choice([1, 2])),
                 "pad_bit": int(rng.integers(0, 2))}
        padding = kernel // 2
        try:
            window = WindowLayer(*shape["hw"], shape["cin"], kernel, shape["stride"], padding,
                                 shape["pad_bit"])
            ctrl.descriptor(window, shape["cout"])
        except ValueError:
            continue
        shapes.append(shape)
    return shapes


def random_shapes_v2(config: AcceleratorConfig, count: int, seed: int) -> list[dict]:
    """``count`` random contract-2 layers that fit ``config``: the geometry of
    :func:`random_shapes` with input and output bits 1 … the config's, shortcut bits 0 …
    the config's, padding at a random level and a 2×2 pool (over levels) on one layer in
    four. The first shapes cycle through the bit widths so that a short sweep covers each."""
    from .layer import case_descriptors, random_case
    rng = np.random.default_rng(seed)
    corners = [(n, m, s) for n in range(1, config.max_input_bits + 1)
               for m in range(1, config.output_bits + 1)
               for s in range(config.max_shortcut_bits + 1)]
    rng.shuffle(corners)
    shapes = []
    while len(shapes) < count:
        kernel = int(rng.choice([1, 3], p=[0.3, 0.7]))
        n, m, s = (corners[len(shapes)] if len(shapes) < len(corners) else
                   (int(rng.integers(1, config.max_input_bits + 1)),
                    int(rng.integers(1, config.output_bits + 1)),
                    int(rng.integers(0, config.max_shortcut_bits + 1))))
        shape = {"cin": int(rng.integers(1, min(3 * config.simd, config.max_channels) + 1)),
                 "cout": int(rng.integers(1, min(4 * config.cols + 2, config.max_channels) + 1)),
                 "hw": (int(rng.integers(kernel, 9)), int(rng.integers(kernel, 9))),
                 "kernel": kernel, "stride": int(rng.choice([1, 2])),
                 "in_bits": n, "out_bits": m, "shortcut_bits": s,
                 "pad_level": int(rng.integers(0, 1 << n))}
        if rng.random() < 0.25:
            shape["pool"] = (2, 2)
        try:
            case_descriptors(config, random_case(**shape, seed=0))
        except ValueError:
            continue
        shapes.append(shape)
    return shapes


def sweep(configs: list[str], shapes: int, *, simulator: str = "verilator", seed: int = 0,
          idle: float = 0.2, backpressure: float = 0.2, log=print) -> list[dict]:
    """Run ``shapes`` random layers spread over ``configs``; returns one row per layer."""
    per_config = [shapes // len(configs) + (i < shapes % len(configs))
                  for i in range(len(configs))]
    rows = []
    for name, count in zip(configs, per_config, strict=True):
        if not count:
            continue
        config = SWEEP_CONFIGS[name]()
        started = time.perf_counter()
        with RtlLink(config, simulator, seed=seed, idle=idle, backpressure=backpressure) as link:
            log(f"# {name}: {config.rows}x{config.cols}x{config.simd}, built and started in "
                f"{time.perf_counter() - started:.1f} s")
            for i, shape in enumerate(random_shapes(config, count, seed + 1000 * len(rows))):
                case = random_case(**shape, seed=seed + i)
                start = time.perf_counter()
                result = run_case(link, config, case)
                pad = shape.get("pad_level", shape.get("pad_bit", 0))
                row = {"config": name, "shape": case.shape(), "pad_bit": pad,
                       **result, "seconds": round(time.perf_counter() - start, 3)}
                rows.append(row)
                log(_format_row(row))
    return rows


HEADER = (f"{'config':11} {'shape':40} {'cycles':>7} {'stall':>6} {'ideal':>7} "
          f"{'util':>6} {'match':>5} {'model':>5} {'sim s':>6}")


def _format_row(row: dict) -> str:
    model = {True: "yes", False: "NO"}.get(row.get("cycles_match"), "-")
    return (f"{row['config']:11} {row['shape'] + ' pad' + str(row['pad_bit']):40} "
            f"{row['cycles']:7d} {row['stall_cycles']:6d} {row['ideal_cycles']:7d} "
            f"{row['utilization']:6.3f} {'yes' if row['match'] else 'NO':>5} {model:>5} "
            f"{row['seconds']:6.2f}")


def _ok(row: dict) -> bool:
    """The map matches, ``busy − stall`` is the ideal count and (contract 2) every pass's
    counters equal the cycle model's."""
    return (row["match"] and row["cycles"] - row["stall_cycles"] == row["ideal_cycles"]
            and row.get("cycles_match", True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitdet.sim.sweep", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--shapes", type=int, default=20, help="layers in all (default 20)")
    parser.add_argument("--configs", nargs="+", choices=[*SWEEP_CONFIGS, "v2"],
                        default=[n for n in SWEEP_CONFIGS if n not in V2_CONFIGS],
                        help="configs to spread them over (default: the contract-1 ones; "
                        "v2: the contract-2 ones)")
    parser.add_argument("--simulator", choices=("verilator", "icarus"), default="verilator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = parser.parse_args(argv)
    if args.shapes < 1:
        parser.error("--shapes must be at least 1")
    configs = [c for name in args.configs for c in (V2_CONFIGS if name == "v2" else [name])]
    print(HEADER)
    rows = sweep(configs, args.shapes, simulator=args.simulator, seed=args.seed)
    bad = [row for row in rows if not _ok(row)]
    print(f"# {len(rows) - len(bad)} of {len(rows)} layers match the golden model with "
          f"busy - stall = ideal (and, contract 2, the cycle model's counts)")
    if args.json:
        print(json.dumps(rows, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
