#!/usr/bin/env python
"""Foundation benchmarks: bit-packing throughput and the golden model's convolution speed.

Run from the repository root (bitdet installed, e.g. ``pip install -e .``)::

    python bench/bench_foundation.py            # full run (about a minute on 2 cores)
    python bench/bench_foundation.py --quick    # a few seconds (smoke test)
    python bench/bench_foundation.py --threads 1 --json results.json

Everything is measured in one process and one run, with :func:`time.perf_counter`, warm-up
calls first, then several samples taken round-robin across the functions that are compared
(so drift in clock speed or load hits them alike). The table reports MEDIANS per call, and
every ratio is computed from medians of this same run. bench/README.md explains the columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bitdet.core.golden import binary_conv2d, level_conv2d, popcount_conv2d
from bitdet.core.packing import (
    pack_activations,
    pack_weights,
    packed_width,
    unpack_activations,
)

# ----------------------------------------------------------------------------- timing


def measure(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
            min_sample_s: float) -> dict[str, dict[str, float]]:
    """Time several zero-argument callables side by side; returns per-call statistics.

    Each callable gets ``warmup`` untimed calls, then a calibrated number of calls per
    sample (enough for one sample to last ``min_sample_s``; at least 1), then ``repeats``
    samples, taken round-robin across the callables. Per-call times are sample time divided
    by the calls in the sample. Returns ``{name: {"median_s", "min_s", "iqr_s", "calls",
    "samples"}}``.
    """
    per_sample: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        calls = 1
        while True:                       # calibrate like timeit.Timer.autorange
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            elapsed = time.perf_counter() - start
            if elapsed >= min_sample_s or calls >= 1 << 20:
                break
            calls = max(calls * 2, int(calls * min_sample_s / max(elapsed, 1e-9) * 1.1))
        per_sample[name] = calls
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            calls = per_sample[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - start) / calls)
    stats = {}
    for name, times in samples.items():
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        stats[name] = {"median_s": statistics.median(times), "min_s": min(times),
                       "iqr_s": q[2] - q[0], "calls": per_sample[name], "samples": len(times)}
    return stats


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def spread(stat: dict[str, float]) -> str:
    """Interquartile range as a percentage of the median (noise indicator)."""
    return f"{100 * stat['iqr_s'] / stat['median_s']:.0f}%"


def print_table(headers: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def pm1(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random ±1 float32 tensor."""
    return torch.randint(0, 2, shape, generator=generator).to(torch.float32) * 2 - 1


def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


# ----------------------------------------------------------------------------- (a) packing

ACTIVATION_SHAPES = [(1, 64, 80, 80), (1, 256, 20, 20), (1, 33, 41, 41)]
WEIGHT_SHAPES = [((256, 128, 3, 3), 1), ((256, 128, 3, 3), 16)]     # (O×C×kh×kw, cols)
WORD_BITS = [32, 64]


def bench_packing(timing: dict, generator: torch.Generator) -> list[dict]:
    results = []
    for shape in ACTIVATION_SHAPES:
        x = pm1(shape, generator)
        n, c, h, w = shape
        for word_bits in WORD_BITS:
            packed = pack_activations(x, word_bits=word_bits)
            assert packed.shape == (n, h, w, packed_width(c, word_bits))
            assert torch.equal(unpack_activations(packed, c, word_bits=word_bits), x)
            stats = measure({
                "pack_activations": lambda x=x, wb=word_bits: pack_activations(x, word_bits=wb),
                "unpack_activations": lambda p=packed, c=c, wb=word_bits:
                    unpack_activations(p, c, word_bits=wb),
            }, **timing)
            for op, stat in stats.items():
                results.append({"op": op, "shape": shape_str(shape), "word_bits": word_bits,
                                "cols": None, "bits": x.numel(), "packed_bytes": packed.nbytes,
                                **stat})
    for shape, cols in WEIGHT_SHAPES:
        wt = pm1(shape, generator)
        for word_bits in WORD_BITS:
            packed = pack_weights(wt, word_bits=word_bits, cols=cols)
            stats = measure({"pack_weights": lambda wt=wt, wb=word_bits, cols=cols:
                             pack_weights(wt, word_bits=wb, cols=cols)}, **timing)
            for op, stat in stats.items():
                results.append({"op": op, "shape": shape_str(shape), "word_bits": word_bits,
                                "cols": cols, "bits": wt.numel(), "packed_bytes": packed.nbytes,
                                **stat})
    for r in results:
        r["MB_per_s"] = r["packed_bytes"] / r["median_s"] / 1e6
        r["Gbit_per_s"] = r["bits"] / r["median_s"] / 1e9
    return results


def print_packing(results: list[dict]) -> None:
    headers = ["op", "shape", "word", "cols", "packed B", "median", "spread", "MB/s", "Gbit/s"]
    rows = [[r["op"], r["shape"], str(r["word_bits"]), "-" if r["cols"] is None else str(r["cols"]),
             str(r["packed_bytes"]), fmt_time(r["median_s"]), spread(r),
             f"{r['MB_per_s']:.1f}", f"{r['Gbit_per_s']:.3f}"] for r in results]
    print_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8})


# ----------------------------------------------------------------------------- (b) golden conv

# (name, input N×C×H×W, weights O×C×kh×kw, stride, padding, also time method="reference")
CONV_LAYERS = [
    ("ref-small", (1, 32, 20, 20), (32, 32, 3, 3), 1, 1, True),
    ("p3-64", (1, 64, 80, 80), (64, 64, 3, 3), 1, 1, False),
    ("p5-256", (1, 256, 20, 20), (256, 256, 3, 3), 1, 1, False),
    ("down-128", (1, 128, 40, 40), (256, 128, 3, 3), 2, 1, False),
    ("odd-33", (1, 33, 41, 41), (64, 33, 3, 3), 1, 1, False),
]
PAD_VALUE = -1       # the default padding bit 0 (−1), as in binary_conv2d


def bench_conv(timing: dict, generator: torch.Generator) -> list[dict]:
    results = []
    for name, xs, ws, stride, padding, with_reference in CONV_LAYERS:
        x, w = pm1(xs, generator), pm1(ws, generator)

        def fast(x=x, w=w, stride=stride, padding=padding):
            return binary_conv2d(x, w, stride=stride, padding=padding, pad_value=PAD_VALUE,
                                 method="fast")

        def float32(x=x, w=w, stride=stride, padding=padding):
            xp = F.pad(x, (padding, padding, padding, padding), value=float(PAD_VALUE))
            return F.conv2d(xp, w, stride=stride)

        def reference(x=x, w=w, stride=stride, padding=padding):
            return binary_conv2d(x, w, stride=stride, padding=padding, pad_value=PAD_VALUE,
                                 method="reference")

        dot = fast()
        exact = bool(torch.equal(dot, float32().round().to(torch.int32)))
        fns = {"fast": fast, "float32": float32}
        if with_reference:
            exact = exact and bool(torch.equal(reference(), dot))
            fns["reference"] = reference
        stats = measure(fns, **timing)
        _, c, kh, kw = ws
        macs = dot.numel() * c * kh * kw
        row = {"layer": name, "x": shape_str(xs), "w": shape_str(ws), "stride": stride,
               "padding": padding, "out": shape_str(dot.shape), "binary_macs": macs,
               "exact": exact}
        for key, stat in stats.items():
            row[key] = stat
        row["fast_over_float32"] = stats["fast"]["median_s"] / stats["float32"]["median_s"]
        if "reference" in stats:
            row["reference_over_fast"] = (stats["reference"]["median_s"]
                                          / stats["fast"]["median_s"])
        row["fast_GMAC_per_s"] = macs / stats["fast"]["median_s"] / 1e9
        results.append(row)
    return results


def print_conv(results: list[dict]) -> None:
    headers = ["layer", "x", "w", "s", "MMAC", "fast", "float32", "fast/f32", "reference",
               "ref/fast", "GMAC/s", "exact"]
    rows = []
    for r in results:
        ref = r.get("reference")
        rows.append([
            r["layer"], r["x"], r["w"], str(r["stride"]), f"{r['binary_macs'] / 1e6:.1f}",
            f"{fmt_time(r['fast']['median_s'])} ±{spread(r['fast'])}",
            f"{fmt_time(r['float32']['median_s'])} ±{spread(r['float32'])}",
            f"{r['fast_over_float32']:.2f}",
            "-" if ref is None else f"{fmt_time(ref['median_s'])} ±{spread(ref)}",
            "-" if ref is None else f"{r['reference_over_fast']:.0f}",
            f"{r['fast_GMAC_per_s']:.2f}", "yes" if r["exact"] else "NO"])
    print_table(headers, rows, right={3, 4, 5, 6, 7, 8, 9, 10})


# ------------------------------------------------------------- n-bit inputs (contract v2)

LEVEL_LAYER = ("p4-64", (1, 64, 40, 40), (64, 64, 3, 3), 1, 1)
LEVEL_BITS = (1, 2, 3, 4)


def bench_levels(timing: dict, generator: torch.Generator) -> list[dict]:
    """The golden model's accumulator ``A`` over n-bit level maps (``level_conv2d``,
    method='fast') for n = 1…4 beside the 1-bit popcount (``popcount_conv2d``) of the same
    layer; each checked equal to the reference path on a crop (and, for n = 1, to the
    popcount)."""
    name, xs, ws, stride, padding = LEVEL_LAYER
    w = pm1(ws, generator)
    fns, levels = {}, {}
    x1 = pm1(xs, generator)
    fns["popcount 1-bit"] = lambda: popcount_conv2d(x1, w, stride=stride, padding=padding,
                                                    pad_value=PAD_VALUE, method="fast")
    for bits in LEVEL_BITS:
        a = torch.randint(0, 1 << bits, xs, generator=generator, dtype=torch.int32)
        if bits == 1:
            a = ((x1 + 1) // 2).to(torch.int32)
        levels[bits] = a
        fns[f"levels {bits}-bit"] = (lambda a=a, bits=bits: level_conv2d(
            a, w, in_bits=bits, stride=stride, padding=padding, pad_level=0, method="fast"))
    stats = measure(fns, **timing)
    base = stats["popcount 1-bit"]["median_s"]
    exact_1bit = bool(torch.equal(fns["levels 1-bit"](), fns["popcount 1-bit"]()))
    results = []
    for bits in LEVEL_BITS:
        crop = levels[bits][:, :, :12, :12]
        exact = bool(torch.equal(
            level_conv2d(crop, w, in_bits=bits, stride=stride, padding=padding,
                         method="fast"),
            level_conv2d(crop, w, in_bits=bits, stride=stride, padding=padding,
                         method="reference")))
        stat = stats[f"levels {bits}-bit"]
        results.append({"layer": name, "x": shape_str(xs), "w": shape_str(ws),
                        "in_bits": bits, "fast": stat, "popcount_1bit": stats["popcount 1-bit"],
                        "over_1bit": stat["median_s"] / base,
                        "over_1bit_per_plane": stat["median_s"] / base / bits,
                        "exact": exact and (exact_1bit if bits == 1 else True)})
    return results


def print_levels(results: list[dict]) -> None:
    headers = ["layer", "x", "w", "bits", "level_conv2d", "1-bit popcount", "ratio",
               "per plane", "exact"]
    rows = [[r["layer"], r["x"], r["w"], str(r["in_bits"]),
             f"{fmt_time(r['fast']['median_s'])} ±{spread(r['fast'])}",
             f"{fmt_time(r['popcount_1bit']['median_s'])}",
             f"{r['over_1bit']:.2f}", f"{r['over_1bit_per_plane']:.2f}",
             "yes" if r["exact"] else "NO"] for r in results]
    print_table(headers, rows, right={3, 4, 5, 6, 7})


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and short samples: finishes in a few seconds")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per function (default 15, --quick 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ±1 tensors")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)

    default_threads = torch.get_num_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be ≥ 1")
        torch.set_num_threads(args.threads)
    if args.quick:
        timing = {"warmup": 2, "repeats": args.repeats or 5, "min_sample_s": 0.002}
    else:
        timing = {"warmup": 3, "repeats": args.repeats or 15, "min_sample_s": 0.05}
    if timing["repeats"] < 1:
        parser.error("--repeats must be ≥ 1")

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "machine": f"{platform.system()} {platform.machine()} {_cpu_name()}",
        "nproc": nproc,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_default_threads": default_threads,
        **timing,
        "seed": args.seed,
        "loadavg_start": _loadavg(),
    }
    print(f"bitdet foundation bench  {meta['date']}{'  (--quick)' if args.quick else ''}")
    print(f"{meta['machine']}; nproc {nproc}, os.cpu_count {meta['cpu_count']}; torch threads "
          f"{meta['torch_threads']} (default {default_threads})")
    print(f"python {meta['python']}, torch {meta['torch']}, numpy {meta['numpy']}; "
          f"warm-up {timing['warmup']}, {timing['repeats']} samples of >= "
          f"{timing['min_sample_s'] * 1e3:.0f} ms; medians per call; load average "
          f"{meta['loadavg_start']}")
    generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    print("\n(a) packing — MB/s of packed bytes, Gbit/s of binary values (C·H·W or O·C·kh·kw)")
    packing = bench_packing(timing, generator)
    print_packing(packing)
    print("\n(b) binary conv: golden binary_conv2d(method='fast') vs F.pad(-1) + float32 "
          "F.conv2d on the same ±1 tensors, and vs method='reference'")
    conv = bench_conv(timing, generator)
    print_conv(conv)
    print("\n(c) n-bit inputs (contract v2): golden level_conv2d(method='fast') for 1…4-bit "
          "levels vs the 1-bit popcount_conv2d of the same layer, side by side")
    levels = bench_levels(timing, generator)
    print_levels(levels)
    meta["elapsed_s"] = time.perf_counter() - start
    meta["loadavg_end"] = _loadavg()
    print(f"\ntotal {meta['elapsed_s']:.1f} s; load average {meta['loadavg_end']}")
    noisy = [r["op"] for r in packing if r["iqr_s"] > 0.25 * r["median_s"]] + [
        f"{r['layer']}:{key}" for r in conv for key in ("fast", "float32", "reference")
        if key in r and r[key]["iqr_s"] > 0.25 * r[key]["median_s"]]
    if noisy and not args.quick:
        print(f"warning: spread > 25% for {len(noisy)} measurement(s) "
              f"({', '.join(sorted(set(noisy)))}): the machine was busy; run again")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "packing": packing, "conv": conv, "levels": levels}, f,
                      indent=2)
            f.write("\n")
    if not all(r["exact"] for r in conv + levels):
        print("error: the golden model disagrees with float32 or the reference", file=sys.stderr)
        return 1
    return 0


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
