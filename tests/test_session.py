"""The host session (core/protocol.HostSession, sw/driver/session.Session) and link
recovery: a late or stale reply is never taken for a later command's answer, the
emulator link lets the device's inter-byte timeout run in byte times, and after garbage,
bit flips, truncated frames, timeouts or a reset the next command succeeds. Fuzzed on
the emulator (fast) and on the RTL through bitdet.sim.link.RtlLink (slow)."""

from __future__ import annotations

import numpy as np
import pytest

from bitdet.core.config import AcceleratorConfig
from bitdet.core.protocol import (
    MAGIC,
    MAX_PAYLOAD,
    TIMEOUT_BYTE_TIMES,
    ErrorCode,
    IdentifyReply,
    Opcode,
    encode_frame,
    encode_layer,
    encode_read,
    encode_write,
    read_chunk_words,
    write_chunk_bytes,
)
from bitdet.sw.driver import Device, EmuLink, LinkTimeout, Session
from bitdet.sw.emulator import Emulator

TINY = AcceleratorConfig(name="sessiontest", rows=2, cols=2, simd=8, weight_depth=64,
                         threshold_depth=16, activation_depth=64, max_channels=16,
                         max_kernel=3, max_stride=2, output_bits=1, clock_hz=1_000_000,
                         baud=62_500)


def emu_session(config=TINY, timeout=0.5):
    emulator = Emulator(config)
    link = EmuLink(emulator)
    return emulator, link, Session(link, timeout=timeout)


def bank(emulator, address, words):
    base = emulator.select * emulator.config.activation_depth + address
    return emulator.activations[base:base + words].tobytes()


def test_emulator_idle_models_the_inter_byte_timeout():
    emulator = Emulator(TINY)
    assert emulator.feed(bytes([MAGIC, Opcode.IDENTIFY])) == b""
    assert emulator.idle(TIMEOUT_BYTE_TIMES - 1) == b""          # not yet
    assert emulator.idle(1) != b""                               # now: TIMEOUT
    assert emulator.idle(10 * TIMEOUT_BYTE_TIMES) == b""         # hunting: nothing to drop
    emulator.feed(bytes([MAGIC]))
    emulator.idle(TIMEOUT_BYTE_TIMES - 1)
    emulator.feed(b"\x01")                                       # a byte restarts the count
    assert emulator.idle(TIMEOUT_BYTE_TIMES - 1) == b""


def test_noise_then_command_recovers_at_once():
    """4 noise bytes holding MAGIC put the device into a false frame; the next command
    (eaten by it) is recovered by one resync, not hundreds of timeouts."""
    _emulator, link, session = emu_session()
    link.write(bytes([0x00, MAGIC, 0x05, 0x33]))
    reply = IdentifyReply.unpack(session.command(Opcode.IDENTIFY))
    assert reply == IdentifyReply.for_config(TINY)
    assert session.resyncs <= 1
    assert IdentifyReply.unpack(session.command(Opcode.IDENTIFY)) == reply
    assert session.resyncs <= 1


def test_late_reply_is_never_taken_for_the_next_command():
    """A reply to an earlier READ_ACTIVATIONS (same seq as the last command, as a late
    reply would have) waits in the link: the next read discards it and returns its own
    address's data."""
    _emulator, link, session = emu_session()
    session.write_memory(Opcode.WRITE_ACTIVATIONS, 0, bytes(range(64)), 1)
    # a late answer to a read of address 40, under the seq of the last command
    link.write(encode_frame(Opcode.READ_ACTIVATIONS, encode_read(40, 4), seq=session.seq))
    assert session.read_activations(8, 4, 1) == bytes([8, 9, 10, 11])
    assert session.stale == 1
    assert session.read_activations(20, 2, 1) == bytes([20, 21])


def test_device_level_late_reply_and_timeout_recovery():
    device = Device.open("emu", "tiny")
    device.write_activations(0, bytes(range(100)))
    device.link.write(encode_frame(Opcode.READ_ACTIVATIONS, encode_read(50, 3),
                                   seq=device.session.seq))
    assert device.read_activations(10, 3) == bytes([10, 11, 12])
    # a truncated frame left in the device: the next command still succeeds
    device.link.write(encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(0, bytes(30)))[:12])
    assert device.read_activations(90, 2) == bytes([90, 91])


def test_run_layer_is_not_repeated_after_a_lost_answer():
    """A RUN_* whose answer does not come raises LinkTimeout (it may have run); the next
    command resynchronises and succeeds."""
    _emulator, link, session = emu_session()
    link.write(bytes([MAGIC, Opcode.WRITE_WEIGHTS, 0x40, 0x00]))   # a false frame of 64
    with pytest.raises(LinkTimeout, match="RUN_LAYER"):
        session.command(Opcode.RUN_LAYER)
    assert session.command(Opcode.READ_COUNTERS) == bytes(8)


def test_damaged_frames_are_resent_under_a_new_seq():
    """A link that flips a bit of the first copy of each frame: the device answers
    BAD_CRC with the frame's seq, the session resends and the command succeeds."""
    emulator = Emulator(TINY)

    class FlakyLink(EmuLink):
        def __init__(self):
            super().__init__(emulator)
            self.count = 0

        def write(self, data):
            self.count += 1
            data = bytearray(data)
            if self.count % 2:
                data[-3] ^= 0x10
            super().write(bytes(data))

    link = FlakyLink()
    session = Session(link, timeout=0.5)
    session.write_memory(Opcode.WRITE_ACTIVATIONS, 3, b"\x01\x02\x03", 1)
    assert bank(emulator, 3, 3) == b"\x01\x02\x03"
    assert link.count == 2 and session.seq == 2


def test_chunking_follows_max_payload():
    assert write_chunk_bytes(1) == MAX_PAYLOAD - 4
    assert write_chunk_bytes(64) == (MAX_PAYLOAD - 4) // 64 * 64
    assert read_chunk_words(8) == (MAX_PAYLOAD - 1) // 8
    config = AcceleratorConfig(name="big", activation_depth=8192, simd=8, cols=2, rows=2,
                               max_channels=16)
    emulator, _link, session = emu_session(config)
    data = np.random.default_rng(0).integers(0, 256, size=6000, dtype=np.uint8).tobytes()
    frames = emulator.frames
    session.write_memory(Opcode.WRITE_ACTIVATIONS, 100, data, 1)
    assert emulator.frames - frames == 2                              # 4085 + 1915 bytes
    assert session.read_activations(100, 6000, 1) == data
    assert emulator.frames - frames == 4


# -- fuzz --------------------------------------------------------------------------------------

def _injection(rng, session, valid_frame):
    """Bytes behind the session's back: garbage, a bit-flipped or truncated copy of a
    valid frame, or a complete stale command (its reply arrives late)."""
    kind = rng.integers(0, 5)
    if kind == 0:
        junk = bytearray(rng.integers(0, 256, size=int(rng.integers(1, 13)), dtype=np.uint8))
        if rng.random() < 0.6:
            junk[int(rng.integers(0, len(junk)))] = MAGIC
        return bytes(junk)
    if kind == 1:
        frame = bytearray(valid_frame)
        for _ in range(int(rng.integers(1, 4))):
            bit = int(rng.integers(8, 8 * len(frame)))
            frame[bit // 8] ^= 1 << (bit % 8)
        return bytes(frame)
    if kind == 2:
        return valid_frame[:int(rng.integers(1, len(valid_frame)))]
    if kind == 3:                                   # a late reply under the current seq
        return encode_frame(Opcode.READ_ACTIVATIONS,
                            encode_read(int(rng.integers(0, 40)), int(rng.integers(1, 8))),
                            seq=session.seq)
    return b""


def run_fuzz(session, link, rng, rounds, *, config, state=None):
    """Random valid (repeatable) commands through ``session``, each after an injection;
    ``state(address, words)`` gives the device's bank contents (emulator only)."""
    depth = config.activation_depth
    wbytes = config.simd // 8
    identify = IdentifyReply.for_config(config)
    reference = bytearray(depth * wbytes)
    session.write_memory(Opcode.WRITE_ACTIVATIONS, 0, bytes(reference), wbytes)
    checked = 0
    for _ in range(rounds):
        op = rng.integers(0, 5)
        if op == 0:
            count = int(rng.integers(1, 9))
            address = int(rng.integers(0, depth - count + 1))
            data = rng.integers(0, 256, size=count * wbytes, dtype=np.uint8).tobytes()
            frame = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(address, data))
        elif op == 1:
            count = int(rng.integers(1, 12))
            address = int(rng.integers(0, depth - count + 1))
            frame = encode_frame(Opcode.READ_ACTIVATIONS, encode_read(address, count))
        elif op == 2:
            frame = encode_frame(Opcode.IDENTIFY)
        elif op == 3:
            frame = encode_frame(Opcode.READ_COUNTERS)
        else:
            desc = dict(in_h=4, in_w=4, channels=3, out_h=4, out_w=4, out_channels=2,
                        kernel=3, stride=1, padding=1, input_base=int(rng.integers(0, 20)))
            frame = encode_frame(Opcode.CONFIGURE_LAYER,
                                 encode_layer(**desc, index=int(rng.integers(0, 16))))
        link.write(_injection(rng, session, frame))
        opcode, payload = frame[1], frame[5:-2]
        answer = session.command(opcode, payload)
        if op == 0:
            reference[address * wbytes:(address + count) * wbytes] = data
            assert answer == b""
        elif op == 1:
            expected = bytes(reference[address * wbytes:(address + count) * wbytes])
            if state is not None:
                assert answer == state(address, count)          # the device's memory, now
            checked += answer == expected
        elif op == 2:
            assert IdentifyReply.unpack(answer) == identify
        elif op == 3:
            assert len(answer) == 8
        else:
            assert answer == b""
    return checked


@pytest.mark.parametrize("seed", range(3))
def test_fuzz_emulator_every_valid_command_answered(seed):
    emulator, link, session = emu_session()
    rng = np.random.default_rng(seed)
    run_fuzz(session, link, rng, 150, config=TINY,
             state=lambda address, words: bank(emulator, address, words))
    assert session.stale > 0 and session.resyncs > 0
    # and the session is still in step: a clean command answers at once
    resyncs = session.resyncs
    assert IdentifyReply.unpack(session.command(Opcode.IDENTIFY)).config_hash \
        == TINY.config_hash()
    assert session.resyncs == resyncs


@pytest.mark.slow
def test_fuzz_rtl_every_valid_command_answered():
    """The same fuzz through the same session over the generated RTL (Verilator), with a
    short inter-byte timeout so that false frames expire quickly."""
    pytest.importorskip("cocotb")
    from bitdet.core.config import load_config
    from bitdet.sim.link import RtlLink
    from bitdet.sim.runner import SimulatorUnavailable
    config = load_config("tiny")
    try:
        link = RtlLink(config, "verilator", timeout_cycles=4000)
    except SimulatorUnavailable as e:
        pytest.skip(str(e))
    try:
        session = Session(link, timeout=20.0)
        rng = np.random.default_rng(7)
        checked = run_fuzz(session, link, rng, 24, config=config)
        assert checked > 0
        assert IdentifyReply.unpack(session.command(Opcode.IDENTIFY)).config_hash \
            == config.config_hash()
    finally:
        link.close()


def test_error_codes_after_retries_are_typed():
    """A frame damaged on every try ends in the device's BAD_CRC, typed."""
    from bitdet.sw.driver import BadCrcError
    emulator = Emulator(TINY)

    class BrokenLink(EmuLink):
        def write(self, data):
            data = bytearray(data)
            data[-1] ^= 1
            super().write(bytes(data))

    session = Session(BrokenLink(emulator), timeout=0.5)
    with pytest.raises(BadCrcError) as info:
        session.command(Opcode.IDENTIFY)
    assert info.value.code == ErrorCode.BAD_CRC and session.seq == 3
