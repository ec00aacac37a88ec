#!/usr/bin/env python
"""n-bit layers (contract 2): the golden model and the emulator, 1 … 4 input bits side by side.

Run from the repository root (bitdet installed, e.g. ``pip install -e .``)::

    OPENBLAS_NUM_THREADS=1 python bench/bench_levels.py          # full run
    python bench/bench_levels.py --quick                         # tiny shapes, 1 sample
    python bench/bench_levels.py --json levels.json --markdown levels.md

On the same layer shapes (a 32×32×32 → 32 and a 16×16×64 → 64 3×3 convolution, padding
1), it times

(a) the golden model's fast path: ``level_conv2d`` + ``threshold`` for ``in_bits`` 1, 2, 3
    and 4, and the 1-bit ``popcount_conv2d`` + ``threshold`` of the same layer;
(b) the emulator (``bitdet.sw.emulator.Emulator`` of the ``contract2`` preset) driven
    through command frames: the input planes with WRITE_ACTIVATIONS (flat address
    ``slot·activation_depth + word``), a 48-byte CONFIGURE_LAYER, RUN_LAYER, for
    ``in_bits`` 1 … 4 and one case with a shortcut map. *run* is the RUN_LAYER frame
    alone, *total* the writes, the CONFIGURE_LAYER and the RUN_LAYER. Every case is
    checked once: the output read back with READ_ACTIVATIONS equals the golden model's,
    and the counters equal ``bitdet.core.cycles.pass_cycles``.

Threads are pinned (``torch.set_num_threads(1)``, ``OPENBLAS_NUM_THREADS=1`` unless set),
so the numbers are single-core. Per function: warm-up calls, then samples (each at least
``--min-sample`` seconds of calls) taken round-robin across the functions of a layer;
the tables report MEDIANS per call, and ratios of medians of this run: *ratio* is the
time over the ``in_bits = 1`` case's, *per plane* that ratio divided by ``in_bits``
(1.00: the cost grows with the planes; 1/n: it does not). The device column is the
cycle model's ``busy`` cycles (the hardware's bit-serial passes, docs/hardware.md,
*Cycle model*) for comparison. Exit status 1 if a result disagrees.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")    # before numpy is imported

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bitdet.core.config import load_config
from bitdet.core.cycles import pass_cycles
from bitdet.core.descriptor import LayerDescriptor
from bitdet.core.golden import (
    level_conv2d,
    popcount_conv2d,
    threshold,
    threshold_shortcut,
)
from bitdet.core.packing import (
    pack_levels,
    pack_thresholds,
    pack_weights,
    unpack_levels,
)
from bitdet.core.protocol import (
    ErrorCode,
    Frame,
    FrameParser,
    Opcode,
    encode_frame,
    encode_read,
    encode_thresholds,
    encode_weights,
    encode_write,
    parse_response,
    read_chunk_words,
    threshold_entry_bytes,
    write_chunk_bytes,
)

PRESET = "contract2"
BITS = (1, 2, 3, 4)


@dataclass(frozen=True)
class Layer:
    """A 3×3 convolution with padding 1: input ``channels × size × size``."""

    name: str
    size: int
    channels: int
    out_channels: int
    kernel: int = 3
    padding: int = 1


LAYERS = (Layer("c32", 32, 32, 32), Layer("c64", 16, 64, 64))
QUICK_LAYERS = (Layer("q8", 6, 8, 8),)
OUT_BITS = 1          # every case thresholds to 1-bit outputs, so only in_bits varies
SHORTCUT = (2, 2)     # the shortcut case: (in_bits, shortcut_bits)


# ----------------------------------------------------------------------------- timing


def measure(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
            min_sample_s: float) -> dict[str, dict[str, float]]:
    """Time zero-argument callables side by side (as bench_foundation.py): ``warmup``
    untimed calls each, a calibrated number of calls per sample (at least ``min_sample_s``
    long, at least 1 call), ``repeats`` samples round-robin. Per-call statistics."""
    per_sample = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        calls = 1
        while True:
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_sample_s or calls >= 1 << 16:
                break
            calls = max(calls * 2, int(calls * min_sample_s / max(elapsed, 1e-9) * 1.1))
        per_sample[name] = calls
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(per_sample[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / per_sample[name])
    stats = {}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        stats[name] = {"median_s": statistics.median(times), "iqr_s": q[2] - q[0],
                       "calls": per_sample[name], "samples": len(times)}
    return stats


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def spread(stat: dict) -> str:
    return f"{100 * stat['iqr_s'] / stat['median_s']:.0f}%"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    """One layer with ``in_bits`` input planes (and a shortcut map of ``shortcut_bits``)."""

    layer: Layer
    in_bits: int
    shortcut_bits: int
    levels: torch.Tensor              # 1×C×H×W int32 input levels
    weights: torch.Tensor             # ±1 O×C×k×k
    thresholds: torch.Tensor          # (O, L), or (O, R, L) with a shortcut
    shortcut: torch.Tensor | None     # 1×O×H'×W' int32 shortcut levels

    @property
    def label(self) -> str:
        return f"{self.in_bits}" + (f" + s{self.shortcut_bits}" if self.shortcut_bits else "")

    def accumulator(self) -> torch.Tensor:
        lay = self.layer
        return level_conv2d(self.levels, self.weights, in_bits=self.in_bits, stride=1,
                            padding=lay.padding, pad_level=0, method="fast")

    def golden(self) -> torch.Tensor:
        """``level_conv2d`` + ``threshold`` (the output levels)."""
        a = self.accumulator()
        if self.shortcut is not None:
            return threshold_shortcut(a, self.thresholds, self.shortcut)
        return threshold(a, self.thresholds)


def make_cases(layer: Layer, generator: torch.Generator) -> list[Case]:
    """``in_bits`` 1 … 4 without a shortcut, then the shortcut case, on one set of weights.
    Thresholds are sorted random integers around the middle of the accumulator's range."""
    c, o, k = layer.channels, layer.out_channels, layer.kernel
    shape = (1, c, layer.size, layer.size)
    weights = torch.randint(0, 2, (o, c, k, k), generator=generator).to(torch.float32) * 2 - 1
    out = layer.size + 2 * layer.padding - k + 1
    cases = []
    for bits, shortcut_bits in [*((b, 0) for b in BITS), SHORTCUT]:
        top = (1 << bits) - 1
        levels = torch.randint(0, top + 1, shape, generator=generator, dtype=torch.int32)
        kk = c * k * k
        middle, width = top * kk // 2, max(2, top * kk // 16)
        rows = (o, 1 << shortcut_bits, (1 << OUT_BITS) - 1) if shortcut_bits else \
            (o, (1 << OUT_BITS) - 1)
        t = torch.randint(middle - width, middle + width + 1, rows, generator=generator)
        t = torch.sort(t, dim=-1).values
        shortcut = None
        if shortcut_bits:
            shortcut = torch.randint(0, 1 << shortcut_bits, (1, o, out, out),
                                     generator=generator, dtype=torch.int32)
        cases.append(Case(layer, bits, shortcut_bits, levels, weights, t, shortcut))
    return cases


def bench_golden(layer: Layer, cases: list[Case], timing: dict) -> list[dict]:
    """(a): ``level_conv2d`` + ``threshold`` per case, and the 1-bit ``popcount_conv2d``
    path on the 1-bit case's map (as ±1), checked equal to it."""
    one = cases[0]
    x = one.levels.to(torch.float32) * 2 - 1

    def popcount_path():
        p = popcount_conv2d(x, one.weights, padding=layer.padding, pad_value=-1, method="fast")
        return threshold(p, one.thresholds)

    fns = {"popcount 1-bit": popcount_path}
    fns.update({case.label: case.golden for case in cases})
    stats = measure(fns, **timing)
    exact = bool(torch.equal(popcount_path(), one.golden()))
    base = stats[one.label]["median_s"]
    rows = [{"layer": layer.name, "path": "popcount_conv2d", "in_bits": 1, "shortcut_bits": 0,
             **stats["popcount 1-bit"], "ratio": stats["popcount 1-bit"]["median_s"] / base,
             "per_plane": stats["popcount 1-bit"]["median_s"] / base, "exact": exact}]
    for case in cases:
        stat = stats[case.label]
        rows.append({"layer": layer.name, "path": "level_conv2d", "in_bits": case.in_bits,
                     "shortcut_bits": case.shortcut_bits, **stat,
                     "ratio": stat["median_s"] / base,
                     "per_plane": stat["median_s"] / base / case.in_bits, "exact": True})
    return rows


# ----------------------------------------------------------------------------- the emulator


class EmulatorMissing(RuntimeError):
    """The emulator does not run an extended (contract-2) layer (yet)."""


def command(emu, opcode: int, payload: bytes = b"") -> bytes:
    """One command frame into the emulator; its response data (status OK checked)."""
    frames = FrameParser(payload_limits=None).feed(emu.feed(encode_frame(opcode, payload)))
    if len(frames) != 1 or not isinstance(frames[0], Frame):
        raise RuntimeError(f"{Opcode(opcode).name}: no single response frame ({frames})")
    response = parse_response(frames[0])
    if response.status != ErrorCode.OK:
        raise RuntimeError(f"{Opcode(opcode).name} answered "
                           f"{ErrorCode(response.status).name}")
    return response.data


def write_frames(address: int, data: bytes, entry_bytes: int) -> list[bytes]:
    """WRITE_* payloads of ``data`` from ``address``, each as many whole entries as fit."""
    chunk = write_chunk_bytes(entry_bytes)
    return [encode_write(address + start // entry_bytes, data[start:start + chunk])
            for start in range(0, len(data), chunk)]


class EmulatedCase:
    """One case on its own contract-2 emulator: weights and thresholds written once; the
    input map in slot 0, the output in slot 1, the shortcut map in slot 2, all at word 0."""

    def __init__(self, config, case: Case):
        from bitdet.sw.emulator import Emulator
        self.config, self.case = config, case
        lay, c = case.layer, config
        self.emu = Emulator(config)
        self.descriptor = LayerDescriptor.conv(
            in_h=lay.size, in_w=lay.size, channels=lay.channels, out_channels=lay.out_channels,
            kernel=lay.kernel, padding=lay.padding, in_bits=case.in_bits, out_bits=OUT_BITS,
            shortcut_bits=case.shortcut_bits, input_slot=0, output_slot=1,
            shortcut_slot=2 if case.shortcut_bits else 0, extended=True)
        problems = self.descriptor.problems(config)
        if problems:
            raise ValueError(f"{lay.name} in_bits {case.in_bits}: {problems[0]}")
        word = c.simd // 8
        weights = pack_weights(case.weights, word_bits=c.simd, cols=c.cols)
        table = pack_thresholds(case.thresholds, lay.channels * lay.kernel ** 2, cols=c.cols,
                                in_bits=case.in_bits)
        if table.ndim == 4:               # (tiles, cols, R, L) → entries (tiles·R, cols, L)
            table = table.transpose(0, 2, 1, 3).reshape(-1, c.cols, table.shape[-1])
        entry = threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel, c.cols)
        thresholds = encode_thresholds(table, threshold_width=c.threshold_width,
                                       thresholds_per_channel=c.thresholds_per_channel)
        self.setup = [
            *((Opcode.WRITE_WEIGHTS, p)
              for p in write_frames(0, encode_weights(weights), c.cols * word)),
            *((Opcode.WRITE_THRESHOLDS, p) for p in write_frames(0, thresholds, entry))]
        planes = pack_levels(case.levels, case.in_bits, word_bits=c.simd).tobytes()
        self.writes = [encode_frame(Opcode.WRITE_ACTIVATIONS, p)
                       for p in write_frames(0, planes, word)]
        if case.shortcut is not None:
            shortcut = pack_levels(case.shortcut, case.shortcut_bits, word_bits=c.simd)
            self.writes += [encode_frame(Opcode.WRITE_ACTIVATIONS, p) for p in
                            write_frames(2 * c.activation_depth, shortcut.tobytes(), word)]
        self.configure = encode_frame(Opcode.CONFIGURE_LAYER, self.descriptor.encode())
        self.run_frame = encode_frame(Opcode.RUN_LAYER)

    def load(self) -> None:
        for opcode, payload in self.setup:
            command(self.emu, opcode, payload)

    def run(self) -> bytes:
        """The RUN_LAYER frame alone (its response bytes)."""
        return self.emu.feed(self.run_frame)

    def total(self) -> bytes:
        """The input (and shortcut) planes, CONFIGURE_LAYER, RUN_LAYER."""
        for frame in self.writes:
            self.emu.feed(frame)
        self.emu.feed(self.configure)
        return self.emu.feed(self.run_frame)

    def check(self) -> tuple[bool, tuple[int, int]]:
        """Run once through :func:`command`: the output equals the golden model's and the
        counters the cycle model's. ``(exact, (busy, stall))``."""
        c, d = self.config, self.descriptor
        for frame in self.writes:
            response = FrameParser(payload_limits=None).feed(self.emu.feed(frame))
            if parse_response(response[0]).status != ErrorCode.OK:
                raise EmulatorMissing("WRITE_ACTIVATIONS to a flat slot address refused")
        try:
            command(self.emu, Opcode.CONFIGURE_LAYER, d.encode())
            counters = command(self.emu, Opcode.RUN_LAYER)
        except RuntimeError as err:
            raise EmulatorMissing(str(err)) from None
        busy, stall = int.from_bytes(counters[:4], "little"), int.from_bytes(counters[4:], "little")
        words = OUT_BITS * d.map_words(c.simd)
        chunk = read_chunk_words(c.simd // 8)
        data = b"".join(command(self.emu, Opcode.READ_ACTIVATIONS,
                                encode_read(c.activation_depth + start,
                                            min(chunk, words - start)))
                        for start in range(0, words, chunk))
        o, h, w = d.out_shape
        packed = np.frombuffer(data, dtype=np.uint8).reshape(OUT_BITS, 1, h, w, -1)
        try:
            out = unpack_levels(packed, o, word_bits=c.simd)
        except ValueError:
            return False, (busy, stall)
        exact = bool(torch.equal(out, self.case.golden()))
        return exact and (busy, stall) == pass_cycles(c, d), (busy, stall)


def bench_emulator(config, layer: Layer, cases: list[Case], timing: dict) -> list[dict]:
    """(b): RUN_LAYER alone and the whole sequence per case, after a checked run."""
    emulated = [EmulatedCase(config, case) for case in cases]
    checks = {}
    for e in emulated:
        e.load()
        checks[e.case.label] = e.check()
    fns = {}
    for e in emulated:
        fns[f"run {e.case.label}"] = e.run
        fns[f"total {e.case.label}"] = e.total
    stats = measure(fns, **timing)
    base_run = stats[f"run {cases[0].label}"]["median_s"]
    base_total = stats[f"total {cases[0].label}"]["median_s"]
    rows = []
    for e in emulated:
        label, bits = e.case.label, e.case.in_bits
        run, total = stats[f"run {label}"], stats[f"total {label}"]
        exact, (busy, stall) = checks[label]
        rows.append({"layer": layer.name, "in_bits": bits, "shortcut_bits": e.case.shortcut_bits,
                     "run": run, "total": total,
                     "run_ratio": run["median_s"] / base_run,
                     "run_per_plane": run["median_s"] / base_run / bits,
                     "total_ratio": total["median_s"] / base_total,
                     "total_per_plane": total["median_s"] / base_total / bits,
                     "write_frames": len(e.writes), "busy_cycles": busy,
                     "stall_cycles": stall, "exact": exact})
    return rows


def emulator_runs_contract2(config) -> str | None:
    """``None`` if the emulator runs an extended RUN_LAYER (a tiny 2-bit conv, checked);
    else why not."""
    generator = torch.Generator().manual_seed(1)
    case = make_cases(Layer("probe", 4, 8, 8), generator)[1]
    try:
        e = EmulatedCase(config, case)
        e.load()
        exact, _ = e.check()
    except (EmulatorMissing, RuntimeError, NotImplementedError, KeyError, TypeError,
            ValueError, IndexError) as err:
        return f"{type(err).__name__}: {err}"
    return None if exact else "it runs an extended layer, but the output or counters differ"


# ----------------------------------------------------------------------------- report


def golden_table(rows: list[dict]) -> str:
    return markdown_table(
        ["layer", "path", "in_bits", "median", "spread", "ratio", "per plane", "exact"],
        [[r["layer"], r["path"] + (f" + shortcut {r['shortcut_bits']}-bit"
                                   if r["shortcut_bits"] else ""),
          str(r["in_bits"]), fmt_time(r["median_s"]), spread(r), f"{r['ratio']:.2f}",
          f"{r['per_plane']:.2f}", "yes" if r["exact"] else "NO"] for r in rows])


def emulator_table(rows: list[dict], clock_hz: int) -> str:
    return markdown_table(
        ["layer", "in_bits", "run (RUN_LAYER)", "ratio", "per plane", "total (writes + "
         "configure + run)", "ratio", "per plane", "device busy", "device µs", "exact"],
        [[r["layer"], str(r["in_bits"]) + (f" + shortcut {r['shortcut_bits']}-bit"
                                           if r["shortcut_bits"] else ""),
          f"{fmt_time(r['run']['median_s'])} ±{spread(r['run'])}", f"{r['run_ratio']:.2f}",
          f"{r['run_per_plane']:.2f}",
          f"{fmt_time(r['total']['median_s'])} ±{spread(r['total'])}",
          f"{r['total_ratio']:.2f}", f"{r['total_per_plane']:.2f}", str(r["busy_cycles"]),
          f"{r['busy_cycles'] / clock_hz * 1e6:.1f}", "yes" if r["exact"] else "NO"]
         for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one tiny layer (6×6×8 → 8), 1 sample, no warm-up (smoke test)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per function (default 9, --quick 1)")
    parser.add_argument("--min-sample", type=float, default=None, metavar="S",
                        help="seconds of calls per sample (default 0.2, --quick 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data")
    parser.add_argument("--no-emulator", action="store_true", help="time the golden model only")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    parser.add_argument("--force", action="store_true",
                        help="replace the --json / --markdown files if they exist")
    args = parser.parse_args(argv)
    from bitdet.sw.files import OutputExists, atomic_write, check_new_file
    try:                               # before the bench runs, not after 90 s of it
        for path in (args.json, args.markdown):
            if path:
                check_new_file(path, force=args.force)
    except OutputExists as e:
        parser.error(str(e))
    timing = ({"warmup": 0, "repeats": 1, "min_sample_s": 0.0} if args.quick else
              {"warmup": 1, "repeats": 9, "min_sample_s": 0.2})
    if args.repeats is not None:
        timing["repeats"] = args.repeats
    if args.min_sample is not None:
        timing["min_sample_s"] = args.min_sample
    if timing["repeats"] < 1 or timing["min_sample_s"] < 0:
        parser.error("--repeats must be ≥ 1 and --min-sample ≥ 0")
    torch.set_num_threads(1)
    config = load_config(PRESET)
    layers = QUICK_LAYERS if args.quick else LAYERS
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "nproc": nproc, "torch_threads": torch.get_num_threads(),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "preset": PRESET, "out_bits": OUT_BITS, **timing, "seed": args.seed,
            "layers": [vars(lay) for lay in layers], "loadavg_start": _loadavg()}
    print(f"bitdet n-bit layer bench  {meta['date']}{'  (--quick)' if args.quick else ''}")
    print(f"python {meta['python']}, torch {meta['torch']}, numpy {meta['numpy']}; nproc "
          f"{nproc}, torch threads 1, OPENBLAS_NUM_THREADS {meta['OPENBLAS_NUM_THREADS']}; "
          f"warm-up {timing['warmup']}, {timing['repeats']} samples of >= "
          f"{timing['min_sample_s'] * 1e3:.0f} ms; medians per call; load average "
          f"{meta['loadavg_start']}")
    generator = torch.Generator().manual_seed(args.seed)
    cases = {lay.name: make_cases(lay, generator) for lay in layers}
    start = time.perf_counter()

    golden = [row for lay in layers for row in bench_golden(lay, cases[lay.name], timing)]
    text = ["(a) golden model, fast path: level_conv2d + threshold (1-bit outputs); ratio = "
            "time / in_bits 1's, per plane = ratio / in_bits", "", golden_table(golden)]

    emulator, missing = [], None
    if not args.no_emulator:
        missing = emulator_runs_contract2(config)
    if missing is None and not args.no_emulator:
        emulator = [row for lay in layers
                    for row in bench_emulator(config, lay, cases[lay.name], timing)]
        text += ["", f"(b) emulator, preset {PRESET} ({config.rows}x{config.cols}x"
                 f"{config.simd}), through command frames; device busy: the cycle model at "
                 f"{config.clock_hz / 1e6:g} MHz", "", emulator_table(emulator, config.clock_hz)]
    elif missing is not None:
        text += ["", f"(b) emulator: SKIPPED: Emulator(load_config({PRESET!r})) does not run "
                 f"an extended RUN_LAYER yet ({missing})"]
    meta["elapsed_s"] = time.perf_counter() - start
    meta["loadavg_end"] = _loadavg()
    text += ["", f"total {meta['elapsed_s']:.1f} s; load average {meta['loadavg_end']}"]
    print("\n" + "\n".join(text))
    if args.markdown:
        atomic_write(args.markdown, "\n".join(text) + "\n")
    if args.json:
        atomic_write(args.json, json.dumps({"meta": meta, "golden": golden,
                                            "emulator": emulator,
                                            "emulator_skipped": missing}, indent=2) + "\n")
    noisy = [f"{r['layer']}:{r['path']}:{_bits(r)}" for r in golden
             if r["iqr_s"] > 0.25 * r["median_s"]] + [
        f"{r['layer']}:emulator {key}:{_bits(r)}" for r in emulator for key in ("run", "total")
        if r[key]["iqr_s"] > 0.25 * r[key]["median_s"]]
    if noisy and not args.quick:
        print(f"warning: spread > 25% for {len(noisy)} measurement(s) ({', '.join(noisy)}): "
              "the machine was busy; run again")
    if not all(r["exact"] for r in golden + emulator):
        print("error: a result disagrees (golden 1-bit paths, or the emulator with the golden "
              "model / the cycle model)", file=sys.stderr)
        return 1
    return 0


def _bits(row: dict) -> str:
    return f"{row['in_bits']}" + (f"+s{row['shortcut_bits']}" if row["shortcut_bits"] else "")


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
