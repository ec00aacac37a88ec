"""cocotb testbench: the top level's byte streams bridged to a host over a TCP socket.

:class:`~bitdet.sim.link.RtlLink` starts the simulator with this module and talks to it
through a localhost socket; the host sees the device's byte streams (``i`` in, ``o``
out) exactly as a board's UART would carry them. Parameters come from the environment:

``BITDET_LINK_HOST``, ``BITDET_LINK_PORT``
    Where the host listens (the testbench connects).
``BITDET_LINK_SEED``, ``BITDET_LINK_IDLE``, ``BITDET_LINK_BACKPRESSURE``
    Seed, probability that the testbench holds a byte it could offer on ``i`` for a
    cycle (idle cycles), probability that it holds ``o.ready`` low for a cycle
    (back-pressure). Both 0 by default.
``BITDET_LINK_PERIOD_NS``
    Clock period (10 ns by default; only the waveform's time axis depends on it).
``BITDET_LINK_TIMEOUT_CYCLES``
    The decoder's inter-byte timeout (how long idle time must run inside a frame).

Socket messages in both directions: one type byte, a u32 LE length, the payload. The
host sends ``D`` (bytes for ``i``) and ``C`` (close); the testbench sends ``D`` (bytes
from ``o``) and, on close, ``Y`` with the number of clock cycles simulated (u64 LE).

The loop runs cycle by cycle while bytes move. While a layer runs (``busy``) it waits
for ``busy`` to fall without Python in every cycle. While nothing moves (no byte to
offer, no byte coming out, not busy, for 64 cycles) it waits for the host without
advancing time, unless the decoder is inside a frame (a :class:`FrameParser` fed with
the bytes the DUT took tells): then it lets the clock run in chunks (4096 cycles,
doubling while the host stays silent, up to 131072), so that the inter-byte timeout
(``BITDET_LINK_TIMEOUT_CYCLES``) expires inside a truncated frame. A host that
disappears (end of file on the socket) ends the simulation.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, First, ReadOnly, RisingEdge, Timer
from cocotb.utils import get_sim_time

from bitdet.core.protocol import COMMAND_PAYLOAD_LIMITS, FrameParser

HEADER = struct.Struct("<cI")
QUIET_CYCLES = 64          # cycles without any activity before the host is waited for
HOST_WAIT_S = 0.01         # wall time to wait for host bytes before time moves on
IDLE_CHUNK = 4096          # cycles the clock runs per wait while nothing happens …
MAX_IDLE_CHUNK = 1 << 17   # … doubling up to this while the host stays silent
BUSY_CHUNK = 8192          # cycles between socket checks while a layer runs


class HostSocket:
    """Message framing over the socket to :class:`~bitdet.sim.link.RtlLink`."""

    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = bytearray()
        self.closed = False          # the host asked to close, or went away

    def poll(self, timeout: float = 0.0) -> bytes:
        """Bytes for ``i`` that arrived within ``timeout`` seconds (maybe none)."""
        data = bytearray()
        while not self.closed:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                break
            timeout = 0.0
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                break
            self.pending += chunk
            while len(self.pending) >= HEADER.size:
                kind, length = HEADER.unpack_from(self.pending)
                if len(self.pending) < HEADER.size + length:
                    break
                body = bytes(self.pending[HEADER.size:HEADER.size + length])
                del self.pending[:HEADER.size + length]
                if kind == b"D":
                    data += body
                elif kind == b"C":
                    self.closed = True
                    break
                else:
                    raise ValueError(f"unknown message {kind!r} from the host")
        return bytes(data)

    def send(self, kind: bytes, payload: bytes) -> None:
        try:
            self.sock.sendall(HEADER.pack(kind, len(payload)) + payload)
        except OSError:
            self.closed = True


@cocotb.test()
async def serve_link(dut):  # noqa: C901
    env = os.environ
    period = int(env.get("BITDET_LINK_PERIOD_NS", "10"))
    rng = random.Random(int(env.get("BITDET_LINK_SEED", "0")))
    idle = float(env.get("BITDET_LINK_IDLE", "0"))
    backpressure = float(env.get("BITDET_LINK_BACKPRESSURE", "0"))
    host = HostSocket(env.get("BITDET_LINK_HOST", "127.0.0.1"), int(env["BITDET_LINK_PORT"]))

    Clock(dut.clk, period, unit="ns").start()
    dut.i__valid.value = 0
    dut.i__payload.value = 0
    dut.o__ready.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    dut.rst.value = 0
    start = get_sim_time(unit="ns")

    timeout_cycles = int(env.get("BITDET_LINK_TIMEOUT_CYCLES", "0"))
    # the host-side model of the decoder's framing, fed with the bytes the DUT took: it
    # says whether the decoder is inside a frame (where its timeout runs)
    framing = FrameParser(payload_limits=COMMAND_PAYLOAD_LIMITS)
    last_byte_ns = start
    inbox = bytearray()
    outbox = bytearray()
    quiet = 0
    waits = 0                  # chunks of idle time since the host last sent something
    step = 0
    while not host.closed:
        if not inbox or step & 255 == 0:
            inbox += host.poll()
            if host.closed:
                break
        step += 1
        offer = bool(inbox) and (idle == 0 or rng.random() >= idle)
        ready = backpressure == 0 or rng.random() >= backpressure
        dut.i__valid.value = int(offer)
        if offer:
            dut.i__payload.value = inbox[0]
        dut.o__ready.value = int(ready)
        await ReadOnly()
        took = offer and dut.i__ready.value == 1
        out_valid = dut.o__valid.value == 1
        byte = int(dut.o__payload.value) if ready and out_valid else None
        busy = dut.busy.value == 1
        await RisingEdge(dut.clk)
        if took:
            framing.feed(inbox[:1])
            del inbox[0]
            last_byte_ns = get_sim_time(unit="ns")
        if byte is not None:
            outbox.append(byte)
        if outbox and (not out_valid or len(outbox) >= 4096):
            host.send(b"D", bytes(outbox))
            outbox.clear()
        if inbox or out_valid or took:
            quiet = 0
            waits = 0
            continue
        if busy:
            # a layer runs: no Python per cycle until it is done (or the host closes)
            dut.i__valid.value = 0
            if dut.busy.value == 1:
                await First(FallingEdge(dut.busy), Timer(BUSY_CHUNK * period, unit="ns"))
            inbox += host.poll()
            quiet = 0
            waits = 0
            continue
        quiet += 1
        if quiet < QUIET_CYCLES:
            continue
        if outbox:
            host.send(b"D", bytes(outbox))
            outbox.clear()
        inbox += host.poll(HOST_WAIT_S)
        if inbox or host.closed:
            quiet = 0
            waits = 0
            continue
        dut.i__valid.value = 0
        dut.o__ready.value = 0
        if not framing.in_frame:
            # the decoder hunts for MAGIC and nothing else in the device depends on
            # time: wait for the host without advancing the clock (and without CPU)
            while not inbox and not host.closed:
                inbox += host.poll(0.25)
            quiet = 0
            waits = 0
            continue
        # inside a frame time counts (the decoder's inter-byte timeout): let the clock
        # run without Python per cycle, in chunks that grow while the host stays silent;
        # o is held so that no response byte goes by unsampled
        chunk = min(IDLE_CHUNK << waits, MAX_IDLE_CHUNK)
        waits += 1
        await Timer(chunk * period - period // 2, unit="ns")
        await RisingEdge(dut.clk)
        if (get_sim_time(unit="ns") - last_byte_ns) // period > timeout_cycles + QUIET_CYCLES:
            framing.expire()                 # the decoder has dropped the frame too
        quiet = QUIET_CYCLES - 1             # look at the streams for one cycle

    if outbox:
        host.send(b"D", bytes(outbox))
    cycles = (get_sim_time(unit="ns") - start) // period
    host.send(b"Y", struct.pack("<Q", int(cycles)))
    host.sock.close()
