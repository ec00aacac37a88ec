# amaranth: UnusedElaboratable=no
"""Tier 2: the whole top level (``CommandExecutor``'s Verilog) under cocotb, over the byte
protocol, through :class:`bitdet.sim.link.RtlLink`, compared with the golden model.

One Verilator build of the tiny config serves every fast test (cached by its Verilog
text); one simulation serves all layers of a test module where state does not matter.
"""

import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch

pytest.importorskip("cocotb_tools", reason="install the sim extra: pip install -e .[sim]")

from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.config import load_config
from bitdet.core.packing import pack_activations
from bitdet.core.protocol import (
    MAGIC,
    MAX_PAYLOAD,
    ErrorCode,
    Frame,
    FrameParser,
    IdentifyReply,
    Opcode,
    decode_counters,
    encode_frame,
    encode_read,
    encode_write,
    parse_response,
)
from bitdet.hw.top import CommandExecutor
from bitdet.sim.layer import (
    LinkHost,
    compare_maps,
    expected_map,
    load_case,
    random_case,
    run_case,
)
from bitdet.sim.link import RtlLink, RtlLinkError, RtlLinkTimeout

CONFIG = load_config("tiny")          # rows 2, cols 2, simd 8

# (cin, cout, (h, w), kernel, stride, pad_bit): 3×3 stride 1 and 2, 1×1, channel counts
# that are not multiples of simd (8) or cols (2)
LAYERS = [
    (11, 13, (6, 5), 3, 1, 0),
    (13, 7, (7, 6), 3, 2, 1),
    (9, 5, (4, 5), 1, 1, 0),
    (8, 4, (5, 5), 3, 1, 1),
    (3, 3, (3, 7), 3, 2, 0),
]


def _case(spec, seed):
    cin, cout, hw, kernel, stride, pad_bit = spec
    return random_case(cin=cin, cout=cout, hw=hw, kernel=kernel, stride=stride,
                       pad_bit=pad_bit, seed=seed)


@pytest.fixture(scope="module")
def link():
    """One simulation with random idle cycles on ``i`` and back-pressure on ``o``."""
    with RtlLink(CONFIG, seed=7, idle=0.3, backpressure=0.3) as link:
        yield link


@pytest.mark.parametrize("index", range(len(LAYERS)))
def test_layer_matches_golden(link, index):
    result = run_case(link, CONFIG, _case(LAYERS[index], seed=index),
                      input_base=index, output_base=2 * index, weight_base=3 * index,
                      threshold_base=index)
    assert result["match"], result
    assert result["cycles"] - result["stall_cycles"] == result["ideal_cycles"], result


@pytest.mark.parametrize("pool", [(2, 2), (3, 2)])
def test_layer_with_pool_pass(link, pool):
    """A conv layer, then a pool pass over its output on chip (OR of the bits in each
    window), compared with golden.run_layer (conv, threshold, binary_maxpool2d); the
    pass's counters follow the pool engine's closed form."""
    from bitdet.hw.pool import pool_busy_cycles
    case = random_case(cin=10, cout=11, hw=(7, 6), kernel=3, stride=1, seed=30 + pool[0],
                       pool=pool)
    result = run_case(link, CONFIG, case, input_base=2, output_base=9)
    assert result["match"], result
    conv_h, conv_w = 7, 6
    out_h, out_w = (conv_h - pool[0]) // pool[1] + 1, (conv_w - pool[0]) // pool[1] + 1
    expected = pool_busy_cycles(CONFIG, {"channels": 11, "out_h": out_h, "out_w": out_w,
                                         "kernel": pool[0]})
    assert (result["pool_cycles"], result["pool_stall_cycles"]) == expected


def test_two_layers_resident_on_chip(link):
    """The second layer reads the first one's output map where the first wrote it (the
    ping-pong banks flip on RUN_LAYER); only the first input and both outputs cross."""
    a = _case((11, 10, (6, 6), 3, 1, 0), seed=21)
    b_spec = random_case(cin=10, cout=7, hw=(6, 6), kernel=3, stride=2, pad_bit=1, seed=22)
    host = LinkHost(link)
    simd = CONFIG.simd
    load_case(host, CONFIG, a, input_base=5, output_base=40, weight_base=0,
              threshold_base=0)
    busy_a, stall_a = decode_counters(host.command(Opcode.RUN_LAYER))
    words_a = 6 * 6 * 2
    got_a = host.read_activations(40, words_a, simd // 8)
    weights_a = -(-10 // CONFIG.cols) * 9 * -(-11 // simd)   # tiles · K_words of layer a
    load_case(host, CONFIG, b_spec, input_base=40, output_base=3, weight_base=weights_a,
              threshold_base=5, load_input=False)
    busy_b, _ = decode_counters(host.command(Opcode.RUN_LAYER))
    got_b = host.read_activations(3, 3 * 3, simd // 8)
    outputs = golden.run_network(a.x, [a.layer, b_spec.layer])
    expected_a = pack_activations(outputs[0].to(torch.float32) * 2 - 1, word_bits=simd)[0]
    expected_b = pack_activations(outputs[1].to(torch.float32) * 2 - 1, word_bits=simd)[0]
    assert 0 < int(outputs[1].sum()) < outputs[1].numel()
    assert compare_maps(got_a, expected_a)["match"]
    assert compare_maps(got_b, expected_b)["match"]
    # the second layer did not run on b_spec's own (never loaded) random input
    assert not np.array_equal(expected_b, expected_map(b_spec, simd))
    assert busy_a > stall_a and busy_b > 0


def _frames(data: bytes):
    return FrameParser(payload_limits=None).feed(data)


def _drain(link, quiet: float = 0.3) -> bytes:
    """Everything the device sends until it has been silent for ``quiet`` seconds."""
    out = bytearray()
    while True:
        try:
            out += link.read(1, quiet)
        except RtlLinkTimeout:
            return bytes(out)


def _identify_ok(host):
    reply = IdentifyReply.unpack(host.command(Opcode.IDENTIFY))
    assert reply == IdentifyReply.for_config(CONFIG)


def test_decoder_errors_resync_and_serve(link):
    """Bad CRC, unknown opcode, bad length, garbage outside frames and a truncated frame:
    each gets its error response (garbage: none), and the next command is served."""
    host = LinkHost(link, timeout=30)
    bad = bytearray(encode_frame(Opcode.WRITE_THRESHOLDS, encode_write(0, bytes(8))))
    bad[-1] ^= 0x5A
    cases = [
        (bytes(bad), ErrorCode.BAD_CRC, Opcode.WRITE_THRESHOLDS),
        (encode_frame(0x7E, b"\x01\x02"), ErrorCode.UNKNOWN_OPCODE, 0x7E),
        (bytes([MAGIC, Opcode.IDENTIFY, 5, 0]), ErrorCode.BAD_LENGTH, Opcode.IDENTIFY),
        (bytes([MAGIC, Opcode.READ_ACTIVATIONS, 0x00, 0x20]), ErrorCode.BAD_LENGTH,
         Opcode.READ_ACTIVATIONS),                              # length 8192 > MAX_PAYLOAD
    ]
    for frame, code, opcode in cases:
        response = host.transact(bytes([0x00, 0x13, 0x77]) + frame)
        assert response.framing, response               # an error frame (opcode 0xFF)
        assert (response.status, response.opcode) == (code, opcode), response
        _identify_ok(host)
    link.write(bytes(range(0x20, 0x80)))                       # no MAGIC: dropped silently
    assert _drain(link, 0.2) == b""
    _identify_ok(host)
    # truncated, then the host's recovery: MAX_PAYLOAD + 6 zero bytes complete the frame
    frame = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(0, bytes(4)))
    response = host.transact(frame[:9] + bytes(MAX_PAYLOAD + 6))
    assert response.framing and response.status == ErrorCode.BAD_CRC, response
    assert response.opcode == Opcode.WRITE_ACTIVATIONS
    assert _drain(link, 0.2) == b""                            # one response, no more
    _identify_ok(host)


@pytest.mark.slow
def test_truncated_frame_times_out(link):
    """A frame that breaks off is dropped with TIMEOUT after the decoder's inter-byte
    timeout (1024 byte times: 512 000 cycles on the tiny config), then service resumes."""
    host = LinkHost(link, timeout=120)
    frame = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(0, bytes(4)))
    before = link.in_waiting
    response = host.transact(frame[:9])
    assert before == 0
    assert response.framing and response.status == ErrorCode.TIMEOUT, response
    assert response.opcode == Opcode.WRITE_ACTIVATIONS
    _identify_ok(host)


def test_decoder_fuzz_never_hangs(link):
    """Random byte bursts (MAGIC made frequent): whatever comes back is well-formed frames;
    after the documented recovery (MAX_PAYLOAD + 6 zero bytes) IDENTIFY is served."""
    rng = np.random.default_rng(3)
    host = LinkHost(link, timeout=30)
    for burst in range(6):
        junk = rng.integers(0, 256, size=int(rng.integers(2, 60)), dtype=np.uint8)
        junk[rng.random(junk.size) < 0.15] = MAGIC
        if burst % 2:                                 # plausible headers of real opcodes
            junk[:2] = [MAGIC, int(rng.choice([int(op) for op in Opcode]))]
        link.write(junk.tobytes() + bytes(MAX_PAYLOAD + 6))
        frames = _frames(_drain(link, 0.5))
        assert all(isinstance(f, Frame) for f in frames), frames
        for frame in frames:
            response = parse_response(frame)
            assert response.framing or response.opcode in set(Opcode), response
        host.command(Opcode.RESET)
        _identify_ok(host)


# -- RTL cycle counts == amaranth.sim cycle counts ------------------------------------------
def _amaranth_run(frames):
    """Send each frame to ``CommandExecutor`` in amaranth.sim, collect one response each."""
    dut = CommandExecutor(CONFIG)
    responses = []

    async def testbench(ctx):
        parser = FrameParser(payload_limits=None)
        for frame in frames:
            pending = list(frame)
            got = []
            for _ in range(200000):
                ctx.set(dut.i.valid, bool(pending))
                if pending:
                    ctx.set(dut.i.payload, pending[0])
                ctx.set(dut.o.ready, 1)
                took = pending and ctx.get(dut.i.ready)
                out = ctx.get(dut.o.payload) if ctx.get(dut.o.valid) else None
                await ctx.tick()
                if took:
                    pending.pop(0)
                if out is not None:
                    got += parser.feed([out])
                    if got:
                        break
            assert len(got) == 1 and isinstance(got[0], Frame), got
            responses.append(parse_response(got[0]))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return responses


class _Recorder:
    """A link stand-in that records the frames a host sends and replays the responses."""

    def __init__(self, replies=None):
        self.frames, self.replies = [], list(replies or [])
        self._out = bytearray()

    def write(self, data):
        self.frames.append(bytes(data))
        if self.replies:
            self._out += self.replies.pop(0)
        else:           # a plausible OK so that the host carries on while recording
            op = data[1]
            payload = bytes(8) if op == Opcode.RUN_LAYER else b""
            if op == Opcode.READ_ACTIVATIONS:            # as many bytes as asked for
                payload = bytes(int.from_bytes(data[9:11], "little") * CONFIG.simd // 8)
            from bitdet.core.protocol import encode_response
            self._out += encode_response(op, ErrorCode.OK, payload, seq=data[4])

    def read(self, n, timeout):
        data = bytes(self._out[:n])
        del self._out[:n]
        return data


@pytest.mark.parametrize(("spec", "pool"), [((5, 3, (4, 4), 3, 1, 0), None),
                                            ((6, 5, (5, 4), 3, 2, 1), None),
                                            ((9, 4, (3, 3), 1, 1, 0), None),
                                            ((4, 3, (4, 5), 3, 1, 0), (2, 2))])
def test_cycle_counts_equal_amaranth_sim(link, spec, pool):
    """The same command frames through amaranth.sim of CommandExecutor and through the
    RTL: identical busy / stall counts (conv and pool passes) and identical responses."""
    cin, cout, hw, kernel, stride, pad_bit = spec
    case = random_case(cin=cin, cout=cout, hw=hw, kernel=kernel, stride=stride,
                       pad_bit=pad_bit, seed=cin + cout, pool=pool)
    recorder = _Recorder()
    run_case(recorder, CONFIG, case)                 # the frames a host sends for the case
    frames = recorder.frames
    runs = [i for i, frame in enumerate(frames) if frame[1] == Opcode.RUN_LAYER]
    assert len(runs) == (2 if pool else 1) and frames[-1][1] == Opcode.READ_ACTIVATIONS
    expected = _amaranth_run(frames)
    host = LinkHost(link)
    got = [host.transact(frame) for frame in frames]
    assert got == expected
    for i in runs:
        busy, stall = decode_counters(got[i].data)
        assert busy > stall and (busy, stall) == decode_counters(expected[i].data)


# -- robustness of the link itself ------------------------------------------------------------
def _group_gone(pgid: int, wait: float = 10.0) -> bool:
    """The process group has no member left (orphans reparented to init are reaped
    asynchronously, so give them a moment)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_link_close_reports_cycles_and_leaves_no_process():
    link = RtlLink(CONFIG)
    host = LinkHost(link)
    _identify_ok(host)
    process = link._process
    cycles = link.close()
    assert cycles > 10
    assert process.poll() is not None
    assert _group_gone(process.pid)                 # the simulator's whole group is gone
    assert link.close() == cycles                   # idempotent
    with pytest.raises(RtlLinkError, match="closed"):
        link.write(b"\x00")


def test_link_simulator_crash_is_a_clear_error():
    link = RtlLink(CONFIG)
    try:
        os.killpg(link._process.pid, signal.SIGKILL)        # the simulator dies
        link.write(encode_frame(Opcode.IDENTIFY))
        with pytest.raises(RtlLinkError, match="simulation ended"):
            link.read(4, timeout=30)
    finally:
        with pytest.raises(RtlLinkError):
            link.close()                             # no cycle count from a dead simulator
    assert _group_gone(link._process.pid)


def test_link_read_timeout_keeps_bytes(link):
    host = LinkHost(link)
    _identify_ok(host)
    link.write(encode_frame(Opcode.READ_ACTIVATIONS, encode_read(0, 2)))
    with pytest.raises(RtlLinkTimeout, match="of 100 bytes"):
        link.read(100, timeout=0.5)
    data = link.read(5 + 3 + 2, timeout=5)           # the response is still all there
    frames = _frames(data)
    assert len(frames) == 1 and parse_response(frames[0]).ok


@pytest.mark.skipif(shutil.which("iverilog") is None,
                    reason="Icarus not installed (apt-get install iverilog)")
def test_icarus_layer_and_errors():
    """The same link under Icarus: a layer (3×3 stride 2) and a bad-CRC frame."""
    with RtlLink(CONFIG, "icarus", seed=1, idle=0.2, backpressure=0.2) as link:
        host = LinkHost(link, timeout=60)
        _identify_ok(host)
        for i, spec in enumerate(LAYERS[1:2]):
            result = run_case(link, CONFIG, _case(spec, seed=100 + i))
            assert result["match"], result
            assert result["cycles"] - result["stall_cycles"] == result["ideal_cycles"]
        bad = bytearray(encode_frame(Opcode.IDENTIFY))
        bad[-2] ^= 1
        response = host.transact(bytes(bad))
        assert response.framing and response.status == ErrorCode.BAD_CRC
        _identify_ok(host)


@pytest.mark.slow
def test_sweep_20_shapes_three_configs():
    """20 random layers over the tiny, iCEBreaker and a 3×4×16 config (three Verilator
    builds): every map equals the golden model and busy − stall = ideal."""
    from bitdet.sim.sweep import SWEEP_CONFIGS, V2_CONFIGS, sweep
    rows = sweep([n for n in SWEEP_CONFIGS if n not in V2_CONFIGS], 20, seed=1,
                 log=lambda line: None)
    assert len(rows) == 20
    bad = [row for row in rows if not row["match"]
           or row["cycles"] - row["stall_cycles"] != row["ideal_cycles"]]
    assert not bad, bad


def test_compare_maps_locates_first_mismatch():
    """The comparison behind ``match`` / ``first_mismatch``: pixel row-major, channel =
    bit of the pixel's little-endian words (padding channels included)."""
    expected = np.zeros((3, 4, 2), dtype=np.uint8)            # 3×4 pixels, 16 channels
    got = expected.copy()
    got[1, 2, 1] ^= 0b100                                      # channel 8 + 2 = 10
    got[2, 0, 0] ^= 0b1
    result = compare_maps(got.tobytes(), expected)
    assert result == {"match": False, "mismatches": 2,
                      "first_mismatch": {"y": 1, "x": 2, "channel": 10}}
    assert compare_maps(expected.tobytes(), expected) == {"match": True, "mismatches": 0}
    assert compare_maps(b"\x00", expected)["match"] is False
