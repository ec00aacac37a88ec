# amaranth: UnusedElaboratable=no
"""The emulator (sw/emulator.py): golden-model results through the command protocol, the
device's error codes, and — the heart — a differential test: the same byte sequences
(random valid sessions plus garbage and corrupt frames) into :class:`Emulator` and into
:class:`bitdet.hw.top.CommandExecutor` in amaranth.sim give identical response bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.packing import pack_activations, pack_thresholds, pack_weights
from bitdet.core.protocol import (
    LAYER_TABLE_ENTRIES,
    MAGIC,
    ErrorCode,
    Frame,
    FrameParser,
    IdentifyReply,
    Opcode,
    decode_counters,
    encode_frame,
    encode_layer,
    encode_read,
    encode_thresholds,
    encode_weights,
    encode_write,
    parse_response,
)
from bitdet.sw.emulator import Emulator

_encode_frame = encode_frame

TINY = AcceleratorConfig(name="difftest", rows=2, cols=2, simd=8, weight_depth=64,
                         threshold_depth=16, activation_depth=64, max_channels=16,
                         max_kernel=3, max_stride=2, output_bits=1, clock_hz=1_000_000,
                         baud=62_500)


def command(emu, opcode, payload=b"", expect=ErrorCode.OK):
    frames = FrameParser(payload_limits=None).feed(emu.feed(encode_frame(opcode, payload)))
    assert len(frames) == 1 and isinstance(frames[0], Frame), frames
    response = parse_response(frames[0])
    assert not response.framing and response.opcode == opcode, response
    assert response.status == expect, (Opcode(opcode).name, ErrorCode(response.status))
    return response.data


def packed(bits, simd):
    return pack_activations(bits.to(torch.float32) * 2 - 1, word_bits=simd)[0].tobytes()


def conv_descriptor(in_h, in_w, c_in, c_out, k, stride, padding, pad_bit, **bases):
    out_h = (in_h + 2 * padding - k) // stride + 1
    out_w = (in_w + 2 * padding - k) // stride + 1
    return dict(in_h=in_h, in_w=in_w, channels=c_in, out_h=out_h, out_w=out_w,
                out_channels=c_out, kernel=k, stride=stride, padding=padding, pad_bit=pad_bit,
                input_base=bases.get("input_base", 0), output_base=bases.get("output_base", 0),
                weight_base=bases.get("weight_base", 0),
                threshold_base=bases.get("threshold_base", 0))


@pytest.mark.parametrize("preset", ["tiny", "icebreaker"])
@pytest.mark.parametrize("geometry", [(7, 6, 5, 11, 3, 1, 1, 0), (8, 9, 19, 6, 3, 2, 1, 1),
                                      (5, 5, 3, 4, 1, 1, 0, 0), (6, 7, 9, 5, 2, 2, 0, 0)])
def test_conv_then_pool_matches_golden(preset, geometry):
    """conv (+ OR-pool pass) run through the protocol equals golden.run_network, and the
    counters come from the cycle model."""
    config = load_config(preset)
    simd, cols = config.simd, config.cols
    in_h, in_w, c_in, c_out, k, stride, padding, pad_bit = geometry
    rng = np.random.default_rng(sum(geometry))
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, c_in, in_h, in_w)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(c_out, c_in, k, k)))
    kk = c_in * k * k
    t = torch.from_numpy(rng.integers(kk // 2 - 2, kk // 2 + 4, size=(c_out, 1)))
    layer = golden.BinaryConvLayer(w, t, stride=stride, padding=padding,
                                   pad_value=1 if pad_bit else -1)
    conv = golden.run_layer(x, layer)
    emu = Emulator(config)
    command(emu, Opcode.RESET)
    command(emu, Opcode.WRITE_ACTIVATIONS, encode_write(3, packed((x > 0).int(), simd)))
    command(emu, Opcode.WRITE_WEIGHTS,
            encode_write(5, encode_weights(pack_weights(w, word_bits=simd, cols=cols))))
    command(emu, Opcode.WRITE_THRESHOLDS, encode_write(2, encode_thresholds(
        pack_thresholds(t, kk, cols=cols), threshold_width=config.threshold_width,
        thresholds_per_channel=config.thresholds_per_channel)))
    desc = conv_descriptor(in_h, in_w, c_in, c_out, k, stride, padding, pad_bit,
                           input_base=3, output_base=40, weight_base=5, threshold_base=2)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**desc))
    counters = decode_counters(command(emu, Opcode.RUN_LAYER))
    from bitdet.core.cycles import layer_cycles
    assert counters == layer_cycles(config, dict(desc, raw=0))
    assert decode_counters(command(emu, Opcode.READ_COUNTERS)) == counters
    oh, ow = conv.shape[2:]
    out_words = -(-c_out // simd)
    assert command(emu, Opcode.READ_ACTIVATIONS, encode_read(40, oh * ow * out_words)) \
        == packed(conv, simd)
    if min(oh, ow) >= 2:
        pool = dict(in_h=oh, in_w=ow, channels=c_out, out_h=(oh - 2) // 2 + 1,
                    out_w=(ow - 2) // 2 + 1, out_channels=c_out, kernel=2, stride=2, padding=0,
                    pad_bit=0, input_base=40, output_base=1, weight_base=0, threshold_base=0,
                    pool=True)
        command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**pool, index=3))
        command(emu, Opcode.RUN_LAYER, b"\x03")
        expected = golden.binary_maxpool2d(conv, 2, 2)
        n = pool["out_h"] * pool["out_w"] * out_words
        assert command(emu, Opcode.READ_ACTIVATIONS, encode_read(1, n)) == packed(expected,
                                                                                  simd)


def test_identify_errors_and_table():
    emu = Emulator(TINY)
    assert IdentifyReply.unpack(command(emu, Opcode.IDENTIFY)) == IdentifyReply.for_config(TINY)
    good = conv_descriptor(4, 4, 3, 2, 3, 1, 1, 0, output_base=20)
    command(emu, Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
    command(emu, Opcode.RUN_NETWORK, b"\x00", expect=ErrorCode.BAD_ARGUMENT)
    command(emu, Opcode.RUN_LAYER, bytes([LAYER_TABLE_ENTRIES]), expect=ErrorCode.BAD_ARGUMENT)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**good)[:20], expect=ErrorCode.BAD_LENGTH)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**{**good, "kernel": 5}),
            expect=ErrorCode.LAYER_DOES_NOT_FIT)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**{**good, "out_h": 3}),
            expect=ErrorCode.BAD_ARGUMENT)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**{**good, "raw": 1}),
            expect=ErrorCode.BAD_ARGUMENT)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**good, index=1))
    command(emu, Opcode.RUN_NETWORK, b"\x02", expect=ErrorCode.NOT_CONFIGURED)
    command(emu, Opcode.CONFIGURE_LAYER, encode_layer(**good))
    two = decode_counters(command(emu, Opcode.RUN_NETWORK, b"\x02"))
    one = decode_counters(command(emu, Opcode.RUN_LAYER, b"\x01"))
    assert two == (2 * one[0], 2 * one[1]) and emu.select == 1
    command(emu, Opcode.READ_ACTIVATIONS, encode_read(60, 5), expect=ErrorCode.BAD_ADDRESS)
    command(emu, Opcode.READ_RESULTS, encode_read(0, 1), expect=ErrorCode.UNKNOWN_OPCODE)
    command(emu, Opcode.WRITE_WEIGHTS, encode_write(63, bytes(4)), expect=ErrorCode.BAD_ADDRESS)
    assert emu.weights[63].tobytes() == bytes(2)                      # first entry written
    command(emu, Opcode.RESET)
    command(emu, Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
    # framing: bad CRC keeps what the payload wrote (provisional writes)
    frame = bytearray(encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(7, b"\x5a\xa5")))
    frame[-1] ^= 1
    parsed = FrameParser(payload_limits=None).feed(emu.feed(bytes(frame)))
    assert parse_response(parsed[0]).status == ErrorCode.BAD_CRC
    assert emu.activations[7:9, 0].tolist() == [0x5A, 0xA5]
    assert emu.feed(b"\x00\x11" + bytes([MAGIC, 0x10])) == b""        # partial: waits
    parsed = FrameParser(payload_limits=None).feed(emu.expire())
    assert parse_response(parsed[0]).status == ErrorCode.TIMEOUT


# -- differential test against the RTL (amaranth.sim) --------------------------------------

def random_session(rng, config, steps):  # noqa: C901
    """A list of byte chunks: commands (mostly valid, some refused), garbage and corrupt
    frames. After each chunk the host waits until the device is idle (so a partial frame
    ends in TIMEOUT)."""
    c = config
    wbytes = c.simd // 8
    tbytes = c.cols * -(-c.thresholds_per_channel * c.threshold_width // 8)
    depth = c.activation_depth

    def encode_frame(opcode, payload=b""):                   # every frame its own seq
        return _encode_frame(opcode, payload, seq=int(rng.integers(0, 256)))

    chunks = [encode_frame(Opcode.IDENTIFY)]

    def layer():
        if rng.random() < 0.25:                                   # a pool pass
            in_h, in_w = (int(v) for v in rng.integers(2, 7, size=2))
            ch = int(rng.integers(1, c.max_channels + 1))
            k = int(rng.integers(1, 4))
            s = int(rng.integers(1, 4))
            k = min(k, in_h, in_w)
            words = -(-ch // c.simd)
            s = min(s, max(k, 1))
            oh, ow = (in_h - k) // s + 1, (in_w - k) // s + 1
            ib = int(rng.integers(0, depth - in_h * in_w * words + 1))
            ob = int(rng.integers(0, depth - oh * ow * words + 1))
            return dict(in_h=in_h, in_w=in_w, channels=ch, out_h=oh, out_w=ow,
                        out_channels=ch, kernel=k, stride=s, padding=0,
                        pad_bit=0, input_base=ib, output_base=ob, weight_base=0,
                        threshold_base=0, pool=True)
        while True:
            in_h, in_w = (int(v) for v in rng.integers(1, 7, size=2))
            c_in = int(rng.integers(1, c.max_channels + 1))
            c_out = int(rng.integers(1, c.max_channels + 1))
            k = int(rng.integers(1, c.max_kernel + 1))
            s = int(rng.integers(1, c.max_stride + 1))
            p = int(rng.integers(0, k))
            d = conv_descriptor(in_h, in_w, c_in, c_out, k, s, p, int(rng.integers(0, 2)))
            if d["out_h"] < 1 or d["out_w"] < 1:
                continue
            words, out_words = -(-c_in // c.simd), -(-c_out // c.simd)
            kw = k * k * words * -(-c_out // c.cols)
            tiles = -(-c_out // c.cols)
            need_in, need_out = in_h * in_w * words, d["out_h"] * d["out_w"] * out_words
            if need_in > depth or need_out > depth or kw > c.weight_depth \
                    or tiles > c.threshold_depth:
                continue
            d.update(input_base=int(rng.integers(0, depth - need_in + 1)),
                     output_base=int(rng.integers(0, depth - need_out + 1)),
                     weight_base=int(rng.integers(0, c.weight_depth - kw + 1)),
                     threshold_base=int(rng.integers(0, c.threshold_depth - tiles + 1)))
            return d

    def write(opcode, entry, depth_):
        count = int(rng.integers(1, 9))
        address = int(rng.integers(0, depth_ - count + 1))
        if rng.random() < 0.1:
            address = int(rng.integers(depth_ - 2, depth_ + 3))      # runs off the end
        data = rng.integers(0, 256, size=count * entry, dtype=np.uint8).tobytes()
        if rng.random() < 0.1 and len(data) > 1:
            data = data[:-1]                                          # incomplete entry
        return encode_frame(opcode, encode_write(address, data))

    for _ in range(steps):
        r = rng.random()
        if r < 0.12:
            chunks.append(write(Opcode.WRITE_WEIGHTS, wbytes * c.cols, c.weight_depth))
        elif r < 0.2:
            chunks.append(write(Opcode.WRITE_THRESHOLDS, tbytes, c.threshold_depth))
        elif r < 0.35:
            chunks.append(write(Opcode.WRITE_ACTIVATIONS, wbytes, depth))
        elif r < 0.5:
            d = layer()
            index = int(rng.integers(0, 3)) if rng.random() < 0.5 else None
            payload = encode_layer(**d, index=index)
            if rng.random() < 0.15:                                    # a refused one
                payload = bytearray(payload)
                payload[int(rng.integers(0, len(payload)))] = int(rng.integers(0, 256))
                payload = bytes(payload)
            chunks.append(encode_frame(Opcode.CONFIGURE_LAYER, payload))
            if rng.random() < 0.7:                                     # run it
                chunks.append(encode_frame(Opcode.RUN_LAYER, b"" if index is None
                                           else bytes([index])))
        elif r < 0.62:
            chunks.append(encode_frame(Opcode.RUN_LAYER, b"" if rng.random() < 0.5 else
                                       bytes([int(rng.integers(0, 4))])))
        elif r < 0.66:
            chunks.append(encode_frame(Opcode.RUN_NETWORK, bytes([int(rng.integers(0, 4))])))
        elif r < 0.76:
            count = int(rng.integers(0, 12))
            chunks.append(encode_frame(Opcode.READ_ACTIVATIONS, encode_read(
                int(rng.integers(0, depth + 2)) if rng.random() < 0.2
                else int(rng.integers(0, depth - count + 1)), count)))
        elif r < 0.8:
            chunks.append(encode_frame(Opcode.READ_COUNTERS))
        elif r < 0.83:
            chunks.append(encode_frame(Opcode.RESET))
        elif r < 0.88:                                                 # corrupt a frame
            frame = bytearray(write(Opcode.WRITE_ACTIVATIONS, wbytes, depth))
            frame[int(rng.integers(1, len(frame)))] ^= 1 << int(rng.integers(0, 8))
            chunks.append(bytes(frame))
        elif r < 0.92:                                                 # truncated frame
            frame = write(Opcode.WRITE_WEIGHTS, wbytes * c.cols, c.weight_depth)
            chunks.append(frame[:int(rng.integers(1, len(frame)))])
        elif r < 0.96:                                                 # garbage
            chunks.append(rng.integers(0, 256, size=int(rng.integers(1, 12)),
                                       dtype=np.uint8).tobytes())
        else:                                                          # bad length / opcode
            chunks.append(encode_frame(int(rng.choice([0x00, 0x13, 0x40, 0x7F])), b"\x01\x02")
                          if rng.random() < 0.5 else
                          encode_frame(Opcode.IDENTIFY, b"\x01"))
    return chunks


def emulator_responses(config, chunks):
    emu = Emulator(config)
    out = []
    for chunk in chunks:
        out.append(emu.feed(chunk) + emu.expire())
    return out


def rtl_responses(config, chunks, *, timeout=48, seed=0):
    """Response bytes of CommandExecutor to each chunk (the host waits until the device
    has been idle for longer than its inter-byte timeout after each chunk)."""
    pytest.importorskip("amaranth")
    from amaranth.sim import Simulator

    from bitdet.hw.top import CommandExecutor
    dut = CommandExecutor(config, timeout_cycles=timeout)
    results = []
    rng = np.random.default_rng(seed)

    async def testbench(ctx):
        for chunk in chunks:
            pending = list(chunk)
            got = bytearray()
            idle = 0
            while pending or idle < timeout + 40:
                offer = bool(pending) and rng.random() < 0.9
                ctx.set(dut.i.valid, offer)
                if offer:
                    ctx.set(dut.i.payload, pending[0])
                ready = rng.random() < 0.8
                ctx.set(dut.o.ready, ready)
                took = offer and ctx.get(dut.i.ready)
                valid = ctx.get(dut.o.valid)
                byte = ctx.get(dut.o.payload) if ready and valid else None
                busy = ctx.get(dut.busy)
                await ctx.tick()
                if took:
                    pending.pop(0)
                if byte is not None:
                    got.append(byte)
                idle = 0 if (pending or valid or busy) else idle + 1
            ctx.set(dut.i.valid, 0)
            results.append(bytes(got))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return results


def check_session(config, seed, steps):
    rng = np.random.default_rng(seed)
    chunks = random_session(rng, config, steps)
    emu = emulator_responses(config, chunks)
    rtl = rtl_responses(config, chunks, seed=seed)
    for i, (chunk, a, b) in enumerate(zip(chunks, emu, rtl, strict=True)):
        assert a == b, f"chunk {i} {chunk.hex()}: emulator {a.hex()} != RTL {b.hex()}"
    # the session did something: layers ran and data came back
    statuses = [(r.opcode, r.status) for chunk in emu
                for r in map(parse_response, FrameParser(payload_limits=None).feed(chunk))]
    assert (Opcode.RUN_LAYER, ErrorCode.OK) in statuses
    assert (Opcode.READ_ACTIVATIONS, ErrorCode.OK) in statuses


def test_differential_small_session():
    pytest.importorskip("amaranth")
    check_session(TINY, seed=1, steps=30)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 8))
def test_differential_sessions(seed):
    pytest.importorskip("amaranth")
    check_session(TINY, seed=seed, steps=80)


@pytest.mark.slow
def test_differential_tiny_preset():
    pytest.importorskip("amaranth")
    check_session(load_config("tiny"), seed=11, steps=60)
