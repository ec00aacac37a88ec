"""Link and compute overlap on contract 2 (docs/protocol.md, "Contract 2", *Commands
during a run*; docs/driver.md): the timed emulator holds a RUN's response for its busy
cycles and runs only WRITE_ACTIVATIONS into idle slots meanwhile, the session pairs
replies that come out of command order, and ``detect_many`` / ``run_detect`` pipeline
frames with the same detections and report the pipelined frame rate."""

from __future__ import annotations

import dataclasses
import shutil
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_device import RecordingLink
from test_device_v2 import v2_detector

from bitdet.core.bundle import load as load_bundle
from bitdet.core.config import load_config
from bitdet.core.protocol import (
    ErrorCode,
    FrameParser,
    HostSession,
    Opcode,
    encode_frame,
    encode_response,
    encode_write,
    parse_response,
)
from bitdet.sw.detect import DEFAULT_BUNDLE, SAMPLE_PATH, frame_rates, run_detect
from bitdet.sw.driver.device import Device
from bitdet.sw.driver.errors import BusyError
from bitdet.sw.driver.link import EmuLink
from bitdet.sw.emulator import Emulator


def responses(data: bytes):
    return [parse_response(f) for f in FrameParser(payload_limits=None).feed(data)]


@pytest.fixture()
def loaded():
    """The shipped chain on a timed contract2 emulator: the emulator and the device."""
    config = load_config("contract2")
    emu = Emulator(config, timed=True)
    device = Device(EmuLink(emu), config)
    device.load(load_bundle(DEFAULT_BUNDLE))
    return emu, device


def test_the_run_response_comes_after_its_busy_cycles(loaded):
    emu, device = loaded
    c = emu.config
    busy = sum(pass_busy(device))
    wait = emu.run_byte_times(busy)
    assert wait == -(-busy * c.baud // (10 * c.clock_hz)) > 1
    assert emu.feed(encode_frame(Opcode.RUN_NETWORK, bytes([len(device.plan)]), seq=7)) \
        == b""
    assert emu.running
    assert emu.idle(wait - 1) == b""
    [reply] = responses(emu.idle(1))
    assert (reply.opcode, reply.status, reply.seq) == (Opcode.RUN_NETWORK, ErrorCode.OK, 7)
    assert struct.unpack("<II", reply.data)[0] == busy == emu.last_busy
    assert not emu.running
    # fed bytes count as byte times too
    emu.feed(encode_frame(Opcode.RUN_NETWORK, bytes([len(device.plan)]), seq=8))
    frame = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(5 * c.activation_depth,
                                                                b"\x00" * (c.simd // 8)))
    assert len(frame) < wait
    assert [r.opcode for r in responses(emu.feed(frame))] == [Opcode.WRITE_ACTIVATIONS]
    assert responses(emu.idle(wait - len(frame) - 1)) == []
    assert [r.seq for r in responses(emu.idle(1))] == [8]


def test_the_timed_emulator_answers_busy_during_a_run(loaded):
    emu, device = loaded
    emu.run_byte_times = lambda busy: 10 ** 6        # a long run (contract2: ~60 byte times)
    depth, word = emu.config.activation_depth, emu.config.simd // 8
    n = len(device.plan)
    busy_slots = {s for p in device.plan for s in (p.descriptor["input_slot"],
                                                   p.descriptor["output_slot"])}
    assert busy_slots == {0, 1}
    assert emu.feed(encode_frame(Opcode.RUN_NETWORK, bytes([n]), seq=7)) == b""
    start = emu.clock
    assert emu.running and emu.busy_slots() == frozenset(busy_slots)
    wait = 10 ** 6
    before = emu.activations.copy()
    fed = 0

    def send(opcode, payload, seq):
        nonlocal fed
        frame = encode_frame(opcode, payload, seq=seq)
        fed += len(frame)
        return responses(emu.feed(frame))

    # a write into a busy slot, one across into a busy slot, other commands: BUSY
    for seq, (opcode, payload) in enumerate([
            (Opcode.WRITE_ACTIVATIONS, encode_write(0, b"\xff" * word)),
            (Opcode.WRITE_ACTIVATIONS, encode_write(2 * depth - 1, b"\xff" * 2 * word)),
            (Opcode.READ_ACTIVATIONS, struct.pack("<IH", 5 * depth, 1)),
            (Opcode.READ_COUNTERS, b""), (Opcode.IDENTIFY, b""), (Opcode.RESET, b""),
            (Opcode.CONFIGURE_LAYER, encode_layer_payload(device)),
            (Opcode.RUN_LAYER, b"\x00")], start=10):
        [reply] = send(opcode, payload, seq)
        assert (reply.opcode, reply.status, reply.seq) == (opcode, ErrorCode.BUSY, seq)
    assert np.array_equal(emu.activations, before)              # nothing written
    # a write into an idle slot runs during the run
    [reply] = send(Opcode.WRITE_ACTIVATIONS, encode_write(5 * depth, b"\xa5" * 3 * word), 20)
    assert (reply.status, reply.seq) == (ErrorCode.OK, 20)
    assert (emu.activations[5 * depth:5 * depth + 3] == 0xA5).all()
    assert emu.running and emu.clock - start == fed < wait
    # the RUN's response comes after exactly `wait` byte times
    assert emu.idle(wait - fed - 1) == b""
    [reply] = responses(emu.idle(1))
    assert (reply.opcode, reply.status, reply.seq) == (Opcode.RUN_NETWORK, ErrorCode.OK, 7)
    assert struct.unpack("<II", reply.data) == (emu.last_busy, emu.last_stall)
    assert not emu.running
    [reply] = send(Opcode.READ_COUNTERS, b"", 21)                # idle again
    assert reply.status == ErrorCode.OK


def pass_busy(device):
    from bitdet.core.cycles import pass_cycles
    return [pass_cycles(device.config, p.descriptor)[0] for p in device.plan]


def encode_layer_payload(device):
    from bitdet.core.protocol import encode_layer
    return encode_layer(**device.plan[0].descriptor, index=0)


def test_untimed_and_contract_1_emulators_answer_at_once():
    config = load_config("contract2")
    emu = Emulator(config)                               # feed-level users: no clock
    assert not emu.timed
    assert Emulator(load_config("ulx3s"), timed=True).timed is False
    with Device.open("emu", "ulx3s") as device:
        assert not device.link.emulator.timed
        device.load(load_bundle(DEFAULT_BUNDLE))
        assert device.overlap_slots is None
        data = device.session.command(Opcode.RUN_NETWORK, bytes([len(device.plan)]))
        assert len(data) == 8


class Scripted:
    """A link whose answers the test scripts: ``replies[opcode]`` builds the bytes a
    written frame of that opcode is answered with (given the frame)."""

    frame_timeout = 0.01

    def __init__(self, replies):
        self.replies, self.rx, self.sent = replies, bytearray(), []

    def write(self, data):
        for frame in FrameParser(payload_limits=None).feed(bytes(data)):
            self.sent.append(frame)
            self.rx += self.replies[frame.opcode](frame, self)

    def read(self, n, timeout):
        if len(self.rx) < n:
            raise TimeoutError("quiet")
        out = bytes(self.rx[:n])
        del self.rx[:n]
        return out

    def close(self):
        pass


def test_the_session_pairs_out_of_order_replies():
    run_seq = []

    def run(frame, link):
        run_seq.append(frame.seq)
        return b""                                         # answered later

    def write(frame, link):                               # the RUN's answer comes first
        late = encode_response(Opcode.RUN_NETWORK, ErrorCode.OK, b"\x01" * 8,
                               seq=run_seq[0]) if len(link.sent) == 3 else b""
        stale = encode_response(Opcode.RUN_NETWORK, ErrorCode.OK, b"", seq=200)
        return late + stale + encode_response(frame.opcode, ErrorCode.OK, seq=frame.seq)

    link = Scripted({Opcode.RUN_NETWORK: run, Opcode.WRITE_ACTIVATIONS: write})
    session = HostSession(link, timeout=0.05)
    seq = session.send(Opcode.RUN_NETWORK, b"\x03")
    assert session.outstanding == {seq: Opcode.RUN_NETWORK}
    session.command(Opcode.WRITE_ACTIVATIONS, encode_write(0, b"\x00" * 8))
    session.command(Opcode.WRITE_ACTIVATIONS, encode_write(1, b"\x00" * 8))
    assert session.stale == 2                           # seq 200 twice; the RUN's kept
    assert session.await_reply(seq) == b"\x01" * 8
    assert session.outstanding == {}
    with pytest.raises(ValueError, match="not outstanding"):
        session.await_reply(seq)
    # an outstanding seq is never reused while the seq counter wraps
    seq = session.send(Opcode.RUN_NETWORK, b"\x03")
    session._seq = seq - 1
    session.command(Opcode.WRITE_ACTIVATIONS, encode_write(0, b"\x00" * 8))
    assert link.sent[-1].seq == seq % 255 + 1


def test_a_reply_that_never_comes_times_out_and_busy_is_raised():
    link = Scripted({Opcode.RUN_NETWORK: lambda f, link: b"",
                     Opcode.RESET: lambda f, link: encode_response(
                         f.opcode, ErrorCode.BUSY, seq=f.seq)})
    session = HostSession(link, timeout=0.01)
    seq = session.send(Opcode.RUN_NETWORK, b"\x01")
    response = session.request(Opcode.RESET)
    assert response.status == ErrorCode.BUSY
    with pytest.raises(TimeoutError, match="RUN_NETWORK"):
        session.await_reply(seq)


def detections(result):
    return [result[key] for key in ("boxes", "scores", "labels", "head")]


@pytest.mark.parametrize("which", ["chain", "graph"])
def test_pipelined_detect_equals_sequential(which):
    config = load_config("contract2")
    bundle = load_bundle(DEFAULT_BUNDLE) if which == "chain" else v2_detector(True)
    rng = np.random.default_rng(3)
    size = 64 if which == "chain" else 16
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(4)]
    with Device.open("emu", config) as device:
        device.load(bundle)
        expected = [device.detect(image, score_threshold=0.0) for image in images]
    link = RecordingLink(Emulator(config, timed=True))
    with Device(link, config) as device:
        device.load(bundle)
        slots = device.overlap_slots
        assert slots == (2, 3) if which == "chain" else (3, 4)
        link.commands.clear()
        total0 = device.bytes_out + device.bytes_in
        results = list(device.detect_many(images, score_threshold=0.0, pipeline=True))
        total = device.bytes_out + device.bytes_in - total0
        assert device.session.stale == 0
    assert len(results) == len(images)
    for mine, theirs in zip(results, expected, strict=True):
        for a, b in zip(detections(mine), detections(theirs), strict=True):
            assert torch.equal(a, b)
    ops = [op for op, _ in link.commands]
    runs = [i for i, op in enumerate(ops) if op == Opcode.RUN_NETWORK]
    assert len(runs) == len(images)
    for k, i in enumerate(runs):                     # next input while the run computes
        after = ops[i + 1:runs[k + 1] if k + 1 < len(runs) else None]
        reads = after.index(Opcode.READ_ACTIVATIONS)
        if k + 1 < len(runs):
            assert set(after[:reads]) == {Opcode.WRITE_ACTIVATIONS}
        else:
            assert reads == 0
    inputs = [int.from_bytes(p[:4], "little") // config.activation_depth
              for op, p in link.commands if op == Opcode.WRITE_ACTIVATIONS]
    assert set(inputs) == set(slots)
    configure = [p for op, p in link.commands if op == Opcode.CONFIGURE_LAYER]
    assert len(configure) == len(images)             # the input-reading pass, per frame
    stats = [r["stats"] for r in results]
    assert [s.overlap for s in stats] == [False] + [True] * (len(images) - 1)
    assert sum(s.bytes_out + s.bytes_in for s in stats) == total
    assert len({(s.bytes_out, s.bytes_in, s.input_bytes) for s in stats}) == 1
    assert all(s.busy_cycles == expected[0]["stats"].busy_cycles for s in stats)


def test_the_shipped_chain_on_contract2_does_not_pay(tmp_path):
    """0.2 ms of compute per frame: the input's re-CONFIGURE (64 bytes, 0.21 ms at 3 MBd)
    costs more than the overlap hides, so run_detect stays sequential unless told."""
    for k in range(2):
        shutil.copy(SAMPLE_PATH, tmp_path / f"s{k}.png")
    with Device.open("emu", "contract2") as device:
        device.load(load_bundle(DEFAULT_BUNDLE))
        assert device.overlap_slots == (2, 3) and device.overlap_gain() < 0
    auto = run_detect([tmp_path], config="contract2", progress=False)["device"]
    forced = run_detect([tmp_path], config="contract2", progress=False,
                        pipeline=True)["device"]
    assert not auto["overlap"] and forced["overlap"]
    assert forced["fps"] < auto["fps"]


def test_run_detect_reports_the_pipelined_rate(tmp_path):
    for k in range(3):
        shutil.copy(SAMPLE_PATH, tmp_path / f"s{k}.png")
    # the slowest clock contract2's 3 MBd allows: compute 0.25 ms, the overlap pays
    config = dataclasses.replace(load_config("contract2"), name="contract2-48MHz",
                                 clock_hz=48_000_000)
    with Device.open("emu", config) as device:
        device.load(load_bundle(DEFAULT_BUNDLE))
        gain = device.overlap_gain()
    assert gain == pytest.approx(11888 / 48e6 - 64 * 10 / 3e6)
    one = run_detect([SAMPLE_PATH], config=config, progress=False)["device"]
    many = run_detect([tmp_path], config=config, progress=False)
    dev = many["device"]
    assert not one["overlap"] and dev["overlap"]
    assert all(image["detections"] == many["images"][0]["detections"]
               for image in many["images"])
    rate = config.baud / 10
    total = dev["bytes_out"] + dev["bytes_in"]
    compute = dev["busy_cycles"] / config.clock_hz
    period = max(compute, dev["input_bytes"] / rate) + (total - dev["input_bytes"]) / rate
    assert dev["fps"] == pytest.approx(1 / period)
    seq_total = one["bytes_out"] + one["bytes_in"]
    assert one["fps"] == pytest.approx(1 / (compute + seq_total / rate))
    assert one["input_bytes"] == dev["input_bytes"]
    # the pipelined frame adds the input pass's CONFIGURE (56 out, 8 in)
    assert total - seq_total == 64
    assert 1 / dev["fps"] == pytest.approx(1 / one["fps"] - gain)
    assert frame_rates(config, 100, 50)["overlap"] is False


def test_frame_rates_formula():
    config = SimpleNamespace(clock_hz=1000, baud=10_000)
    # 1000 bytes/s; compute 0.5 s; 300 bytes of input (0.3 s) overlap, 200 (0.2 s) not
    rates = frame_rates(config, 500, 500, 300)
    assert rates["fps"] == pytest.approx(1 / (0.5 + 0.2)) and rates["overlap"]
    assert frame_rates(config, 500, 500)["fps"] == pytest.approx(1 / (0.5 + 0.5))
    assert frame_rates(config, 100, 500, 300)["fps"] == pytest.approx(1 / (0.3 + 0.2))


def test_a_busy_answer_reaches_the_driver(loaded):
    emu, device = loaded
    emu.run_byte_times = lambda busy: 10 ** 5        # < the session's 2 s at 3 MBd
    seq = device.session.send(Opcode.RUN_NETWORK, bytes([len(device.plan)]))
    with pytest.raises(BusyError):
        device.read_activations(0, 1)
    device.session.await_reply(seq)
    assert not emu.running
