# amaranth: UnusedElaboratable=no
"""Design-space sweep: rows × cols × simd of the accelerator per FPGA family.

For each point a config is derived from a preset (``--base-config``, default the family's
board preset) and the whole board design (:class:`bitdet.hw.board.BoardTop`) is built:

* default, synthesis only: the board build's own yosys script (``synth_ice40 -spram`` /
  ``synth_ecp5``, from Amaranth's build plan with the overrides of
  :func:`bitdet.hw.build.build_bitstream`), cell counts from yosys' ``stat``; no fmax,
  "fits" is an estimate against the device's capacity;
* ``--pnr``: the full :func:`bitdet.hw.build.build_bitstream` (yosys, nextpnr, the
  packer): post-route fmax and whether nextpnr placed it.

Writes ``dse_synth.csv`` / ``dse_pnr.csv`` and a PNG (LUT4 vs peak GOPS per family, and
LUT4 per XNOR bit) into ``--out``. Points that cannot be built get a row with their
``status`` and the error message; the sweep goes on.

    python bench/dse.py [--family ice40|ecp5|both] [--rows 1,2] [--cols 2,4] [--simd 8,16]
                        [--base-config PRESET] [--out DIR] [--quick] [--pnr] [--jobs N]
    python bench/dse.py --replot DIR/dse_synth.csv       # the plot again, from the CSV
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from bitdet.core.config import AcceleratorConfig, ConfigError, load_config
from bitdet.hw import build

FAMILIES = {
    # family: (board, default base preset, default sweep rows, cols, simd)
    "ice40": ("icebreaker", "icebreaker", (1, 2), (2, 4), (8, 16)),
    "ecp5": ("ulx3s", "ulx3s", (4, 8), (4, 8), (32, 64)),
}
QUICK = {"ice40": [(1, 2, 8), (2, 2, 8)], "ecp5": [(2, 4, 32)]}

# Capacity of the boards' devices, for the synthesis-only "fits" estimate (nextpnr's
# "Device utilisation" gives the real figures with --pnr): iCE40UP5K-SG48 (iCEBreaker),
# ECP5 LFE5U-85F (ULX3S). LUT4 on iCE40: logic cells (a LUT4 and a flip-flop each).
CAPACITY = {
    "ice40": {"lut4": 5280, "ff": 5280, "bram": 30, "spram": 4, "dsp": 8},
    "ecp5": {"lut4": 83640, "ff": 83640, "bram": 208, "spram": 0, "dsp": 156},
}

COLUMNS = [
    "family", "board", "base", "rows", "cols", "simd", "xnor_bits", "clock_mhz", "depth",
    "status", "lut4", "ff", "carry", "logic_cells", "bram", "spram", "dsp", "lut4_available",
    "fits", "fmax_mhz", "timing_met", "gops_clock", "gops_fmax", "gops_clock_per_klut",
    "gops_fmax_per_klut", "lut4_per_xnor_bit", "seconds", "message",
]

PLOT_HINT = "matplotlib is not installed: pip install -e '.[bench]' for the plot (CSV written)"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def points(families, rows=None, cols=None, simd=None, quick=False):
    """``[(family, rows, cols, simd)]`` of the sweep (the family's defaults where a list
    is ``None``)."""
    out = []
    for family in families:
        if quick:
            out += [(family, *p) for p in QUICK[family]]
            continue
        _board, _base, d_rows, d_cols, d_simd = FAMILIES[family]
        for r, c, s in itertools.product(rows or d_rows, cols or d_cols, simd or d_simd):
            out.append((family, r, c, s))
    return out


def derive_config(base: AcceleratorConfig, family: str, rows: int, cols: int,
                  simd: int) -> AcceleratorConfig:
    """``base`` with the array size changed, for the family's board; ``acc_width`` is
    derived again (raises :class:`ConfigError` for a combination that cannot be built)."""
    data = base.to_dict()
    data.update(name=f"{base.name}-{rows}x{cols}x{simd}", rows=rows, cols=cols, simd=simd,
                acc_width=None, board=FAMILIES[family][0])
    return AcceleratorConfig.from_dict(data, source=f"{base.name} with {rows}x{cols}x{simd}")


def stat_resources(family: str, stat: dict[str, int]) -> dict:
    """LUT4, FF, carry, BRAM, SPRAM and DSP cells from a yosys ``stat`` of the design.

    On ECP5 ``lut4`` counts a ``CCU2C`` carry cell as two LUT4s (nextpnr's
    ``TRELLIS_COMB`` counts both halves).
    """
    def total(*prefixes):
        return sum(v for k, v in stat.items() if k.startswith(prefixes))

    if family == "ice40":
        return {"lut4": stat.get("SB_LUT4", 0), "ff": total("SB_DFF"),
                "carry": stat.get("SB_CARRY", 0), "bram": total("SB_RAM40"),
                "spram": stat.get("SB_SPRAM256KA", 0), "dsp": stat.get("SB_MAC16", 0)}
    return {"lut4": stat.get("LUT4", 0) + 2 * stat.get("CCU2C", 0),
            "ff": stat.get("TRELLIS_FF", 0), "carry": stat.get("CCU2C", 0),
            "bram": total("DP16KD", "PDPW16KD"), "spram": 0,
            "dsp": total("MULT18X18D", "ALU54B")}


def fits_estimate(family: str, used: dict) -> str:
    over = [f"{k} {used[k]}/{cap}" for k, cap in CAPACITY[family].items()
            if used.get(k) and used[k] > cap]
    return "no (est.: " + ", ".join(over) + ")" if over else "yes (est.)"


def synthesize(config: AcceleratorConfig, board: str, work: Path) -> dict[str, int]:
    """Run the board build's yosys step only (:func:`bitdet.hw.build.synthesize_board`:
    the same plan and synthesis options as ``bitdet hw build``); the cell counts of its
    ``stat``."""
    return build.synthesize_board(config, board, work)


def _classify(error: BaseException) -> str:
    from bitdet.hw.board import PLLError
    if isinstance(error, ConfigError):
        return "config-error"
    if isinstance(error, PLLError):
        return "pll-error"
    if isinstance(error, build.ToolFailure):
        return "no-fit" if "does not fit" in str(error) else "tool-failed"
    if isinstance(error, build.BuildError):
        return "no-tools"
    return "error"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, ValueError) else f"{type(error).__name__}: {text}"


def run_point(family: str, rows: int, cols: int, simd: int, base: AcceleratorConfig,
              out: Path, pnr: bool = False, seed: int = 1) -> dict:
    """Build one point; a CSV row (never raises: failures go into ``status`` /
    ``message``)."""
    board = FAMILIES[family][0]
    row = dict.fromkeys(COLUMNS, "")
    row.update(family=family, board=board, base=base.name, rows=rows, cols=cols, simd=simd,
               xnor_bits=rows * cols * simd, clock_mhz=base.clock_hz / 1e6,
               depth="pnr" if pnr else "synth")
    start = time.monotonic()
    name = f"{family}-{rows}x{cols}x{simd}"
    work = out / "work" / name
    try:
        config = derive_config(base, family, rows, cols, simd)
        row["gops_clock"] = round(config.peak_gops, 3)
        if pnr:
            manifest = build.build_bitstream(config, board, out / "points" / name, seed=seed,
                                             build_dir=work, log=lambda _line: None)
            res = manifest["resources"]
            # yosys' counts, replaced by nextpnr's where the manifest has them
            row.update(stat_resources(family, manifest["yosys_cells"]))
            for key, column in (("lut", "lut4"), ("ff", "ff"), ("bram", "bram"),
                                ("spram", "spram"), ("dsp", "dsp")):
                if key in res:
                    row[column] = res[key]["used"]
            row["lut4_available"] = res.get("lut", {}).get("available", "")
            if "logic_cells" in res:
                row["logic_cells"] = res["logic_cells"]["used"]
                row["lut4_available"] = res["logic_cells"]["available"]
            fmax = min(c["fmax_mhz"] for c in manifest["fmax"].values())
            row.update(fits="yes", fmax_mhz=fmax,
                       timing_met="yes" if manifest["timing_met"] else "no",
                       gops_fmax=round(2 * config.xnor_bits_per_cycle * fmax * 1e6 / 1e9, 3))
        else:
            stat = synthesize(config, board, work)
            (out / "points").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "top.rpt", out / "points" / f"{name}.rpt")
            shutil.rmtree(work)
            row.update(stat_resources(family, stat))
            row["lut4_available"] = CAPACITY[family]["lut4"]
            row["fits"] = fits_estimate(family, row)
        row["status"] = "ok"
    except Exception as e:     # a point that fails is a row, not the end of the sweep
        row["status"] = _classify(e)
        row["message"] = _one_line(e)
        if row["status"] == "no-fit":
            row["fits"] = "no"
            _fill_from_reports(row, family, work)
        elif row["status"] == "tool-failed":
            row["message"] += _last_log_line(work / "build.log")
        if row["status"] == "error":
            frame = traceback.extract_tb(e.__traceback__)[-1]
            row["message"] += f" (at {Path(frame.filename).name}:{frame.lineno})"
    lut = row["lut4"]
    if lut and row["gops_clock"] != "":      # also for a point that did not fit
        row["gops_clock_per_klut"] = round(row["gops_clock"] / (lut / 1000), 4)
        if row["gops_fmax"] != "":
            row["gops_fmax_per_klut"] = round(row["gops_fmax"] / (lut / 1000), 4)
        row["lut4_per_xnor_bit"] = round(lut / row["xnor_bits"], 3)
    row["seconds"] = round(time.monotonic() - start, 1)
    return row


def _fill_from_reports(row: dict, family: str, work: Path) -> None:
    """The cells a failed place-and-route asked for (yosys' ``stat``, nextpnr's
    utilisation), from the build folder ``build_bitstream`` keeps after a failure."""
    try:
        row.update(stat_resources(family, build.parse_yosys_stat(
            (work / "top.rpt").read_text(errors="replace"))))
        util = build.parse_nextpnr_utilisation((work / "top.tim").read_text(errors="replace"))
    except (OSError, ValueError):
        return
    names = build.NEXTPNR_RESOURCES[family]
    columns = {"bram": "bram", "spram": "spram", "dsp": "dsp"}
    columns.update({"lut": "logic_cells"} if family == "ice40" else {"lut": "lut4", "ff": "ff"})
    for key, column in columns.items():
        if names.get(key) in util:
            row[column], available = util[names[key]]
            if column in ("lut4", "logic_cells"):
                row["lut4_available"] = available


def _last_log_line(path: Path) -> str:
    """`` (log ends: …)`` with the last line of a tool's log, when there is one."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return ""
    return f" (log ends: {lines[-1][:120]})" if lines else ""


def _point_job(args) -> dict:
    return run_point(*args)


def _summary(row: dict) -> str:
    head = f"{row['family']:5} {row['rows']}x{row['cols']}x{row['simd']:<3} {row['status']:12}"
    if row["status"] != "ok":
        return f"{head} {row['message'][:100]}  ({row['seconds']} s)"
    fmax = f" fmax {row['fmax_mhz']} MHz" if row["fmax_mhz"] != "" else ""
    return (f"{head} LUT4 {row['lut4']} FF {row['ff']} BRAM {row['bram']} DSP {row['dsp']}"
            f"{fmax} fits {row['fits']} ({row['seconds']} s)")


def sweep(point_list, base_configs: dict[str, AcceleratorConfig], out: Path, *,
          pnr: bool = False, jobs: int = 2, seed: int = 1, progress: bool = True) -> list[dict]:
    """Build every point (``jobs`` processes; ``jobs <= 1`` runs here, one by one) and
    return the rows in the order of ``point_list``."""
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(f, r, c, s, base_configs[f], out, pnr, seed) for f, r, c, s in point_list]
    rows: list[dict | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), disable=not progress, unit="point", file=sys.stderr)

    def done(i, row):
        rows[i] = row
        if progress:
            bar.write(_summary(row), file=sys.stderr)
        bar.update()

    if jobs <= 1:
        for i, task in enumerate(tasks):
            done(i, _point_job(task))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_point_job, task): i for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                i = futures[future]
                try:
                    row = future.result()
                except Exception as e:     # the worker process itself died
                    f, r, c, s, base, *_ = tasks[i]
                    row = dict.fromkeys(COLUMNS, "")
                    row.update(family=f, board=FAMILIES[f][0], base=base.name, rows=r,
                               cols=c, simd=s, xnor_bits=r * c * s, status="error",
                               depth="pnr" if pnr else "synth", message=_one_line(e))
                done(i, row)
    bar.close()
    if (out / "work").is_dir() and not any((out / "work").iterdir()):
        (out / "work").rmdir()
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV that :func:`write_csv` wrote, numbers as numbers."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("family", "board", "base", "depth", "status", "fits",
                               "timing_met", "message") and value != "":
                    number = float(value)
                    row[key] = int(number) if number.is_integer() and "." not in value \
                        else number
            rows.append(row)
    return rows


def _annotate(ax, xs, ys, labels) -> None:
    """Label points; labels of points close together (log scale) are stacked."""
    import math
    placed = []
    # top to bottom, so that a stack of labels is in the order of its points
    for y, x, label in sorted(zip(ys, xs, labels, strict=True), reverse=True):
        near = sum(abs(math.log10(x / px)) < 0.1 and abs(math.log10(y / py)) < 0.06
                   for px, py in placed)
        placed.append((x, y))
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 2 - 9 * near),
                    textcoords="offset points")


def plot(rows: list[dict], path: Path, title: str = "") -> bool:
    """LUT4 vs peak GOPS per family (labelled rows×cols×simd) and LUT4 per XNOR bit;
    ``False`` (and a hint on stderr) without matplotlib."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(PLOT_HINT, file=sys.stderr)
        return False
    ok = [r for r in rows if r["status"] == "ok" and r["lut4"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    markers = {"ice40": ("o", "tab:blue"), "ecp5": ("s", "tab:orange")}
    for family, (marker, color) in markers.items():
        pts = [r for r in ok if r["family"] == family]
        if not pts:
            continue
        gops = [r["gops_fmax"] if r["gops_fmax"] != "" else r["gops_clock"] for r in pts]
        basis = "fmax" if all(r["gops_fmax"] != "" for r in pts) else \
            f"{pts[0]['clock_mhz']:g} MHz"
        ax1.scatter([r["lut4"] for r in pts], gops, marker=marker, color=color,
                    label=f"{family} ({pts[0]['board']}, GOPS at {basis})")
        ax2.scatter([r["xnor_bits"] for r in pts], [r["lut4_per_xnor_bit"] for r in pts],
                    marker=marker, color=color, label=family)
        ax1.axvline(CAPACITY[family]["lut4"], color=color, linestyle="--", alpha=0.5,
                    label=f"{pts[0]['board']} capacity ({CAPACITY[family]['lut4']} LUT4)")
        labels = [f"{r['rows']}×{r['cols']}×{r['simd']}" for r in pts]
        _annotate(ax1, [r["lut4"] for r in pts], gops, labels)
        _annotate(ax2, [r["xnor_bits"] for r in pts], [r["lut4_per_xnor_bit"] for r in pts],
                  labels)
    ax1.set(xscale="log", yscale="log", xlabel="LUT4 (whole design)",
            ylabel="peak binary GOPS (2·rows·cols·simd·f)", title="area vs peak throughput")
    ax2.set(xscale="log", yscale="log", xlabel="XNOR bits per cycle (rows·cols·simd)",
            ylabel="LUT4 per XNOR bit", title="LUT4 per XNOR bit")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = axis.get_view_interval()
            subs = (1, 2, 5) if hi / lo > 10 else (1, 1.5, 2, 3, 4, 5, 7)
            axis.set_major_locator(matplotlib.ticker.LogLocator(subs=subs))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["ice40", "ecp5", "both"], default="both")
    parser.add_argument("--rows", type=_ints, help="e.g. 1,2 (default: per family)")
    parser.add_argument("--cols", type=_ints, help="e.g. 2,4 (default: per family)")
    parser.add_argument("--simd", type=_ints, help="e.g. 8,16 (default: per family)")
    parser.add_argument("--base-config", metavar="PRESET",
                        help="preset or YAML file the points derive from (default: the "
                             "family's board preset, icebreaker / ulx3s)")
    parser.add_argument("--out", type=Path, help="output folder (default: build/dse/TIME)")
    parser.add_argument("--quick", action="store_true", help="2 small points per family")
    parser.add_argument("--pnr", action="store_true",
                        help="place and route too (nextpnr: fmax, fits); much slower")
    parser.add_argument("--jobs", type=int, default=2, help="parallel builds (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="nextpnr seed (--pnr)")
    parser.add_argument("--replot", type=Path, metavar="CSV",
                        help="only draw the plot of a sweep's CSV (next to it, .png)")
    args = parser.parse_args(argv)
    if args.replot:
        png = args.replot.with_suffix(".png")
        rows = read_csv(args.replot)
        bases = {r["family"]: r["base"] for r in rows}
        title = (f"bitdet DSE ({', '.join(sorted({r['depth'] for r in rows}))}) from "
                 f"{args.replot.name}; "
                 + ", ".join(f"{f}: {b} preset" for f, b in bases.items()))
        if not plot(rows, png, title):
            return 1
        print(f"wrote {png}", file=sys.stderr)
        return 0

    families = ["ice40", "ecp5"] if args.family == "both" else [args.family]
    try:
        bases = {f: load_config(args.base_config or FAMILIES[f][1]) for f in families}
        build.fpga_environment()
    except (ConfigError, build.BuildError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or Path("build") / "dse" / stamp.strftime("%Y%m%d-%H%M%S")
    point_list = points(families, args.rows, args.cols, args.simd, args.quick)
    depth = "pnr" if args.pnr else "synth"
    revision = build.git_revision()
    print(f"bitdet design-space sweep  {stamp.isoformat(timespec='seconds')}  git {revision}  "
          f"{len(point_list)} points, {depth}, {args.jobs} jobs -> {out}", file=sys.stderr)
    start = time.monotonic()
    rows = sweep(point_list, bases, out, pnr=args.pnr, jobs=args.jobs, seed=args.seed)
    elapsed = time.monotonic() - start
    csv_path = out / f"dse_{depth}.csv"
    write_csv(rows, csv_path)
    title = (f"bitdet DSE ({depth}), git {revision}, {stamp:%Y-%m-%d}; "
             + ", ".join(f"{f}: {b.name} preset" for f, b in bases.items()))
    png = out / f"dse_{depth}.png"
    plotted = plot(rows, png, title)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok}/{len(rows)} points ok in {elapsed:.0f} s; wrote {csv_path}"
          + (f" and {png}" if plotted else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
