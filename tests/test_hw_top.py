# amaranth: UnusedElaboratable=no
"""Top level without the UART (amaranth.sim): command frames of core/protocol.py go in as
bytes on ``CommandExecutor.i``, responses come back on ``o`` and are parsed with
:class:`~bitdet.core.protocol.FrameParser` / :func:`~bitdet.core.protocol.parse_response`.

Two binary conv layers are loaded with WRITE_WEIGHTS / WRITE_THRESHOLDS /
WRITE_ACTIVATIONS (the packing helpers' bytes), configured and run; the first layer's
output is read back and compared with ``pack_activations(golden.run_layer(...))``, the
second consumes the first one's map on chip and is compared with ``golden.run_network``.
"""

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
import torch
from amaranth.back import verilog
from amaranth.sim import Simulator

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.packing import pack_activations, pack_thresholds, pack_weights
from bitdet.core.protocol import (
    LAYER_FLAG_POOL,
    LAYER_TABLE_ENTRIES,
    MAGIC,
    MAX_PAYLOAD,
    ErrorCode,
    Frame,
    FrameParser,
    IdentifyReply,
    Opcode,
    decode_counters,
    decode_layer,
    decode_layer_entry,
    encode_frame,
    encode_layer,
    encode_read,
    encode_thresholds,
    encode_weights,
    encode_write,
    parse_response,
)
from bitdet.hw.controller import LayerController
from bitdet.hw.pool import PoolEngine
from bitdet.hw.top import CommandExecutor
from bitdet.hw.window import WindowLayer


class Driver:
    """Host side at the stream level: pushes a frame's bytes into ``i`` (honouring
    ``ready``) while collecting ``o``, until one response frame has come back."""

    def __init__(self, ctx, dut, *, ready_probability=1.0, valid_probability=1.0, seed=0):
        self.ctx, self.dut = ctx, dut
        self.parser = FrameParser(payload_limits=None)
        self.cycles = 0
        self.rng = np.random.default_rng(seed)
        self.ready_probability = ready_probability          # host takes a byte of `o`
        self.valid_probability = valid_probability          # host offers a byte on `i`

    async def transact(self, data: bytes, *, limit: int = 20000):
        ctx, dut = self.ctx, self.dut
        pending = list(data)
        frames = []
        for _ in range(limit):
            offer = bool(pending) and self.rng.random() < self.valid_probability
            ctx.set(dut.i.valid, offer)
            if offer:
                ctx.set(dut.i.payload, pending[0])
            ready = self.rng.random() < self.ready_probability
            ctx.set(dut.o.ready, ready)
            took = offer and ctx.get(dut.i.ready)
            out = ctx.get(dut.o.payload) if ready and ctx.get(dut.o.valid) else None
            await ctx.tick()
            self.cycles += 1
            if took:
                pending.pop(0)
            if out is not None:
                frames += self.parser.feed([out])
                if frames and not pending:
                    ctx.set(dut.i.valid, 0)
                    assert len(frames) == 1, frames
                    assert isinstance(frames[0], Frame), frames[0]
                    return parse_response(frames[0])
        raise AssertionError(f"no response in {limit} cycles")

    async def command(self, opcode, payload=b"", *, expect=ErrorCode.OK, **kwargs):
        response = await self.transact(encode_frame(opcode, payload), **kwargs)
        assert not response.framing, response
        assert response.opcode == opcode, response
        assert response.status == expect, (Opcode(opcode).name, ErrorCode(response.status))
        return response.data


def run_sim(dut, body, **driver_args):
    sim = Simulator(dut)
    sim.add_clock(1e-6)

    async def testbench(ctx):
        await body(Driver(ctx, dut, **driver_args))

    sim.add_testbench(testbench)
    sim.run()


def random_layer(rng, c_in, c_out, k):
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(c_out, c_in, 3, 3)))
    t = torch.from_numpy(rng.integers(k // 2 - 6, k // 2 + 7, size=(c_out, 1)))
    return w, t


def test_two_layers_over_the_link():
    """IDENTIFY; error cases; load and run two layers (3×3 stride 1, then 3×3 stride 2
    with pad bit 1; channel counts not multiples of simd or cols); the first map is read
    back and the second computed from it on chip."""
    config = load_config("tiny")                    # rows 2, cols 2, simd 8, 2-bit entries
    dut = CommandExecutor(config)
    ctrl = LayerController(config=config)           # host-side descriptor checks
    simd, cols = config.simd, config.cols
    rng = np.random.default_rng(5)
    la = WindowLayer(6, 5, 11, 3, 1, 1, 0)
    lb = WindowLayer(6, 5, 13, 3, 2, 1, 1)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, 11, 6, 5)))
    wa, ta = random_layer(rng, 11, 13, 99)
    wb, tb = random_layer(rng, 13, 7, 117)
    wa_p, wb_p = pack_weights(wa, word_bits=simd, cols=cols), pack_weights(wb, word_bits=simd,
                                                                           cols=cols)
    ta_p, tb_p = pack_thresholds(ta, 99, cols=cols), pack_thresholds(tb, 117, cols=cols)
    wa_entries = wa_p.shape[0] * wa_p.shape[1]
    desc_a = ctrl.descriptor(la, 13, input_base=3, output_base=7, weight_base=0,
                             threshold_base=0)
    desc_b = ctrl.descriptor(lb, 7, input_base=7, output_base=100, weight_base=wa_entries,
                             threshold_base=wa_p.shape[0])
    assert decode_layer(encode_layer(**desc_a)) == {**desc_a, "pool": 0}
    thr = {"threshold_width": config.threshold_width,
           "thresholds_per_channel": config.thresholds_per_channel}
    image = pack_activations(x, word_bits=simd)[0].tobytes()
    outputs = golden.run_network(x, [
        golden.BinaryConvLayer(wa, ta, stride=1, padding=1, pad_value=-1),
        golden.BinaryConvLayer(wb, tb, stride=2, padding=1, pad_value=1)])
    assert 0 < int(outputs[0].sum()) < outputs[0].numel()
    bits_a = golden.run_layer(x, golden.BinaryConvLayer(wa, ta, stride=1, padding=1,
                                                        pad_value=-1))
    assert torch.equal(bits_a, outputs[0])
    expected_a = pack_activations(bits_a.to(torch.float32) * 2 - 1, word_bits=simd)[0]
    expected_b = pack_activations(outputs[1].to(torch.float32) * 2 - 1, word_bits=simd)[0]
    words_a, words_b = la.out_h * la.out_w * 2, lb.out_h * lb.out_w
    measured = {}

    async def body(host):
        reply = await host.command(Opcode.IDENTIFY)
        assert IdentifyReply.unpack(reply) == IdentifyReply.for_config(config)
        # errors that leave the device usable
        await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.WRITE_WEIGHTS, encode_write(config.weight_depth - 1,
                                                              bytes(4)),
                           expect=ErrorCode.BAD_ADDRESS)              # 2 entries, 1 fits
        await host.command(Opcode.WRITE_THRESHOLDS, encode_write(0, bytes(3)),
                           expect=ErrorCode.BAD_ADDRESS)              # not whole entries
        await host.command(Opcode.READ_ACTIVATIONS, encode_read(config.activation_depth - 1, 2),
                           expect=ErrorCode.BAD_ADDRESS)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**{**desc_a, "kernel": 5}),
                           expect=ErrorCode.LAYER_DOES_NOT_FIT)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**{**desc_a, "raw": 1}),
                           expect=ErrorCode.BAD_ARGUMENT)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**{**desc_a, "out_h": 5}),
                           expect=ErrorCode.BAD_ARGUMENT)             # not the conv's size
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(
            **{**desc_a, "in_h": 200, "out_h": 200}), expect=ErrorCode.LAYER_DOES_NOT_FIT)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc_a)[:-1],
                           expect=ErrorCode.BAD_LENGTH)
        await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.RUN_NETWORK, b"\x01", expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.READ_RESULTS, encode_read(0, 1),
                           expect=ErrorCode.UNKNOWN_OPCODE)
        # load both layers
        await host.command(Opcode.WRITE_ACTIVATIONS, encode_write(3, image))
        await host.command(Opcode.WRITE_WEIGHTS, encode_write(0, encode_weights(wa_p)))
        await host.command(Opcode.WRITE_WEIGHTS, encode_write(wa_entries,
                                                              encode_weights(wb_p)))
        await host.command(Opcode.WRITE_THRESHOLDS, encode_write(0, encode_thresholds(ta_p,
                                                                                      **thr)))
        # a garbage and a bad-CRC frame in between: error response, then service as usual
        bad = bytearray(encode_frame(Opcode.WRITE_THRESHOLDS,
                                     encode_write(wa_p.shape[0], encode_thresholds(tb_p,
                                                                                   **thr))))
        bad[-1] ^= 0x5A
        response = await host.transact(bytes([0x00, 0x13, 0x77]) + bytes(bad))
        assert response.framing and response.status == ErrorCode.BAD_CRC
        assert response.opcode == Opcode.WRITE_THRESHOLDS
        await host.command(Opcode.WRITE_THRESHOLDS,
                           encode_write(wa_p.shape[0], encode_thresholds(tb_p, **thr)))
        readback = await host.command(Opcode.READ_ACTIVATIONS,
                                      encode_read(3, la.in_h * la.in_w * 2))
        assert readback == image
        # layer A
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc_a))
        counters = decode_counters(await host.command(Opcode.RUN_LAYER))
        assert decode_counters(await host.command(Opcode.READ_COUNTERS)) == counters
        measured["a"] = (*counters, ctrl.ideal_cycles(la, 13))
        got_a = await host.command(Opcode.READ_ACTIVATIONS, encode_read(7, words_a))
        assert got_a == expected_a.tobytes()
        # layer B on A's output, which stayed on chip
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc_b))
        counters = decode_counters(await host.command(Opcode.RUN_LAYER, b"\x00"))
        measured["b"] = (*counters, ctrl.ideal_cycles(lb, 7))
        got_b = await host.command(Opcode.READ_ACTIVATIONS, encode_read(100, words_b))
        assert got_b == expected_b.tobytes()
        # RESET: counters cleared, bank 0 selected again (layer B wrote into bank 0)
        await host.command(Opcode.RESET)
        assert decode_counters(await host.command(Opcode.READ_COUNTERS)) == (0, 0)
        await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
        assert await host.command(Opcode.READ_ACTIVATIONS, encode_read(100, words_b)) == \
            expected_b.tobytes()
        measured["link_cycles"] = host.cycles

    start = time.perf_counter()
    run_sim(dut, body)
    measured["seconds"] = time.perf_counter() - start
    rows = config.rows
    for name in ("a", "b"):
        busy, stall, ideal = measured[name]
        assert busy - stall == ideal
        assert busy == ideal + 3 * rows + 2 * cols + 13         # K_words 18 ≥ rows + 4
    print("measured (busy, stall, ideal):", measured)


@pytest.mark.parametrize(("preset", "geometry", "out_channels"), [
    ("icebreaker", (5, 7, 21, 3, 2, 1, 1), 10),       # 1×4×16: 2-byte words, 8-byte entries
    ({"rows": 3, "cols": 4, "simd": 16, "weight_depth": 256, "threshold_depth": 16,
      "activation_depth": 128, "max_channels": 48}, (4, 5, 19, 3, 1, 1, 0), 6),
])
def test_one_layer_over_the_link(preset, geometry, out_channels):
    """One layer on other array shapes (multi-byte activation words on the link), with
    random idle cycles on ``i`` and back-pressure on ``o``: load at nonzero bases, run,
    read back, compare with golden.run_layer."""
    config = load_config(preset) if isinstance(preset, str) else AcceleratorConfig(**preset)
    dut = CommandExecutor(config)
    ctrl = LayerController(config=config)
    simd, cols = config.simd, config.cols
    layer = WindowLayer(*geometry)
    rng = np.random.default_rng(out_channels)
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, layer.channels, layer.in_h,
                                                       layer.in_w)))
    k = layer.channels * 9
    w, t = random_layer(rng, layer.channels, out_channels, k)
    w_p = pack_weights(w, word_bits=simd, cols=cols)
    t_p = pack_thresholds(t, k, cols=cols)
    desc = ctrl.descriptor(layer, out_channels, input_base=2, output_base=5, weight_base=9,
                           threshold_base=1)
    bits = golden.run_layer(x, golden.BinaryConvLayer(w, t, stride=layer.stride,
                                                      padding=layer.padding,
                                                      pad_value=1 if layer.pad_bit else -1))
    expected = pack_activations(bits.to(torch.float32) * 2 - 1, word_bits=simd)[0].tobytes()
    out_words = layer.out_h * layer.out_w * -(-out_channels // simd)
    assert len(expected) == out_words * simd // 8

    async def body(host):
        await host.command(Opcode.WRITE_ACTIVATIONS,
                           encode_write(2, pack_activations(x, word_bits=simd)[0].tobytes()))
        await host.command(Opcode.WRITE_WEIGHTS, encode_write(9, encode_weights(w_p)))
        await host.command(Opcode.WRITE_THRESHOLDS, encode_write(1, encode_thresholds(
            t_p, threshold_width=config.threshold_width,
            thresholds_per_channel=config.thresholds_per_channel)))
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc))
        busy, stall = decode_counters(await host.command(Opcode.RUN_LAYER))
        assert busy - stall == ctrl.ideal_cycles(layer, out_channels)
        got = await host.command(Opcode.READ_ACTIVATIONS, encode_read(5, out_words))
        assert got == expected
        print(f"{config.rows}x{config.cols}x{simd} {geometry} O={out_channels}: busy {busy}, "
              f"stall {stall}, ideal {ctrl.ideal_cycles(layer, out_channels)}")

    # the host idles on both streams at random: writes and reads must not lose bytes
    run_sim(dut, body, ready_probability=0.6, valid_probability=0.7, seed=out_channels)


def sparse_layer(rng, c_in, c_out, k):
    """Random ±1 weights and thresholds above K/2, so that few output bits are 1 and the
    OR of a pool window is not almost always 1."""
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(c_out, c_in, 3, 3)))
    t = torch.from_numpy(rng.integers(k // 2 + 2, k // 2 + 7, size=(c_out, 1)))
    return w, t


def conv_pool_conv(pool_kernel, pool_stride):
    """conv 3×3 (9×7, 5 → 11 channels, sparse bits) → pool → conv 3×3 (pad bit 1, 11 → 6)
    on ``tiny``: descriptors, the load commands and golden.run_network's packed maps."""
    config = load_config("tiny")                    # rows 2, cols 2, simd 8
    ctrl = LayerController(config=config)
    engine = PoolEngine(config=config)
    simd, cols = config.simd, config.cols
    rng = np.random.default_rng(10 * pool_kernel + pool_stride)
    la = WindowLayer(9, 7, 5, 3, 1, 1, 0)           # 9×7, 5 → 11 channels (2 words)
    c_mid = 11
    x = torch.from_numpy(rng.choice([-1.0, 1.0], size=(1, 5, 9, 7)))
    wa, ta = sparse_layer(rng, 5, c_mid, 45)
    pool = engine.descriptor(in_h=9, in_w=7, channels=c_mid, kernel=pool_kernel,
                             stride=pool_stride, input_base=200, output_base=11)
    ph, pw = pool["out_h"], pool["out_w"]
    lb = WindowLayer(ph, pw, c_mid, 3, 1, 1, 1)     # pad bit 1
    wb, tb = random_layer(rng, c_mid, 6, 99)
    wa_p, wb_p = pack_weights(wa, word_bits=simd, cols=cols), pack_weights(wb, word_bits=simd,
                                                                           cols=cols)
    ta_p, tb_p = pack_thresholds(ta, 45, cols=cols), pack_thresholds(tb, 99, cols=cols)
    wa_entries = wa_p.shape[0] * wa_p.shape[1]
    desc_a = ctrl.descriptor(la, c_mid, input_base=0, output_base=200)
    desc_b = ctrl.descriptor(lb, 6, input_base=11, output_base=300, weight_base=wa_entries,
                             threshold_base=ta_p.shape[0])
    thr = {"threshold_width": config.threshold_width,
           "thresholds_per_channel": config.thresholds_per_channel}
    layer_a = golden.BinaryConvLayer(wa, ta, stride=1, padding=1, pad_value=-1)
    conv_bits = golden.run_layer(x, layer_a)
    outputs = golden.run_network(x, [
        golden.BinaryConvLayer(wa, ta, stride=1, padding=1, pad_value=-1,
                               pool=(pool_kernel, pool_stride)),
        golden.BinaryConvLayer(wb, tb, stride=1, padding=1, pad_value=1)])
    assert 0 < int(outputs[0].sum()) < outputs[0].numel()     # the pool is not trivial
    assert not torch.equal(outputs[0], conv_bits[:, :, :ph, :pw])

    def packed(bits):
        return pack_activations(bits.to(torch.float32) * 2 - 1, word_bits=simd)[0].tobytes()

    image = (Opcode.WRITE_ACTIVATIONS, encode_write(0, packed((x > 0).to(torch.int32))))
    parameters = [
        (Opcode.WRITE_WEIGHTS, encode_write(0, encode_weights(wa_p))),
        (Opcode.WRITE_WEIGHTS, encode_write(wa_entries, encode_weights(wb_p))),
        (Opcode.WRITE_THRESHOLDS, encode_write(0, encode_thresholds(ta_p, **thr))),
        (Opcode.WRITE_THRESHOLDS, encode_write(ta_p.shape[0], encode_thresholds(tb_p, **thr))),
    ]
    return SimpleNamespace(
        config=config, c_mid=c_mid, words=-(-c_mid // simd), ph=ph, pw=pw, pool=pool,
        desc_a=desc_a, desc_b=desc_b, image=image, parameters=parameters,
        conv=packed(conv_bits), pooled=packed(outputs[0]), out=packed(outputs[1]))


@pytest.mark.parametrize(("pool_kernel", "pool_stride"), [(3, 2), (2, 2), (2, 1)])
def test_conv_pool_conv_on_chip(pool_kernel, pool_stride):
    """conv → pool → conv with the maps on chip: only the image goes in; the conv map, the
    pooled map and the last output are read back and compared with golden.run_network
    (pool attached to the first layer); the pool's busy count is the closed form; invalid
    pool descriptors get the documented status and leave the device unconfigured."""
    net = conv_pool_conv(pool_kernel, pool_stride)
    config, pool, c_mid, ph, pw, words = (net.config, net.pool, net.c_mid, net.ph, net.pw,
                                          net.words)
    desc_a, desc_b = net.desc_a, net.desc_b
    dut = CommandExecutor(config)
    measured = {}

    async def body(host):
        bad = {                                     # field changes → expected status
            "padding": ({"padding": 1}, ErrorCode.LAYER_DOES_NOT_FIT),
            "kernel": ({"kernel": 4, "stride": 4, "out_h": 2, "out_w": 1},
                       ErrorCode.LAYER_DOES_NOT_FIT),
            "area": ({"in_h": 200, "out_h": (200 - pool_kernel) // pool_stride + 1},
                     ErrorCode.LAYER_DOES_NOT_FIT),
            "base": ({"output_base": config.activation_depth}, ErrorCode.LAYER_DOES_NOT_FIT),
            "raw": ({"raw": 1}, ErrorCode.BAD_ARGUMENT),
            "pad_bit": ({"pad_bit": 1}, ErrorCode.BAD_ARGUMENT),
            "weight_base": ({"weight_base": 1}, ErrorCode.BAD_ARGUMENT),
            "threshold_base": ({"threshold_base": 1}, ErrorCode.BAD_ARGUMENT),
            "out_channels": ({"out_channels": c_mid - 1}, ErrorCode.BAD_ARGUMENT),
            "out_h": ({"out_h": ph + 1}, ErrorCode.BAD_ARGUMENT),
            "out_w": ({"out_w": pw - 1}, ErrorCode.BAD_ARGUMENT),
        }
        for change, expect in bad.values():
            await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**{**pool, **change}),
                               expect=expect)
            await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**pool)[:-1],
                           expect=ErrorCode.BAD_LENGTH)
        # load: the image and both convs' parameters, nothing else crosses the link
        for opcode, payload in [net.image, *net.parameters]:
            await host.command(opcode, payload)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc_a))
        await host.command(Opcode.RUN_LAYER)
        assert await host.command(Opcode.READ_ACTIVATIONS,
                                  encode_read(200, 9 * 7 * words)) == net.conv
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**pool))
        counters = decode_counters(await host.command(Opcode.RUN_LAYER))
        assert decode_counters(await host.command(Opcode.READ_COUNTERS)) == counters
        measured["pool"] = counters
        assert await host.command(Opcode.READ_ACTIVATIONS,
                                  encode_read(11, ph * pw * words)) == net.pooled
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc_b))
        await host.command(Opcode.RUN_LAYER)
        assert await host.command(Opcode.READ_ACTIVATIONS,
                                  encode_read(300, ph * pw)) == net.out

    run_sim(dut, body)
    # docs/hardware.md, Pool engine: out_h·out_w·ceil(C/simd)·kernel² + 4, stall 4
    assert measured["pool"] == (ph * pw * words * pool_kernel ** 2 + 4, 4)
    print(f"pool {pool_kernel}/{pool_stride} on 9×7×{c_mid}: busy, stall = {measured['pool']}")


def test_run_network_from_the_layer_table():
    """conv → pool → conv as table entries 0, 1, 2 (33-byte CONFIGURE_LAYER): one
    RUN_NETWORK gives golden.run_network's output and the summed counters of the three
    RUN_LAYER [i] runs of the same entries; table errors get their statuses, and a refused
    entry stays unconfigured while the others keep running."""
    net = conv_pool_conv(2, 2)
    config = net.config
    dut = CommandExecutor(config)
    entries = [net.desc_a, net.pool, net.desc_b]
    out_words = net.ph * net.pw
    measured = {}

    async def body(host):
        await host.command(Opcode.RUN_NETWORK, b"\x00", expect=ErrorCode.BAD_ARGUMENT)
        await host.command(Opcode.RUN_NETWORK, bytes([LAYER_TABLE_ENTRIES + 1]),
                           expect=ErrorCode.BAD_ARGUMENT)
        await host.command(Opcode.RUN_LAYER, bytes([LAYER_TABLE_ENTRIES]),
                           expect=ErrorCode.BAD_ARGUMENT)
        await host.command(Opcode.CONFIGURE_LAYER, bytes([LAYER_TABLE_ENTRIES])
                           + encode_layer(**net.pool), expect=ErrorCode.BAD_ARGUMENT)
        for opcode, payload in [net.image, *net.parameters]:
            await host.command(opcode, payload)
        for i, desc in enumerate(entries):
            payload = encode_layer(**desc, index=i)
            assert len(payload) == 33 and decode_layer_entry(payload) == (
                i, {**desc, "pool": desc.get("pool", 0)})
            await host.command(Opcode.CONFIGURE_LAYER, payload)
        # entry 3 refused: RUN_NETWORK 4 is NOT_CONFIGURED (nothing runs), 3 runs
        await host.command(Opcode.CONFIGURE_LAYER,
                           encode_layer(**{**net.pool, "padding": 1}, index=3),
                           expect=ErrorCode.LAYER_DOES_NOT_FIT)
        await host.command(Opcode.RUN_NETWORK, b"\x04", expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.RUN_LAYER, b"\x03", expect=ErrorCode.NOT_CONFIGURED)
        assert ctx_select(host) == 0
        network = decode_counters(await host.command(Opcode.RUN_NETWORK, b"\x03"))
        assert decode_counters(await host.command(Opcode.READ_COUNTERS)) == network
        assert ctx_select(host) == 1                      # three flips
        assert await host.command(Opcode.READ_ACTIVATIONS, encode_read(300, out_words)) \
            == net.out
        # the same entries one by one (the image again: the banks have moved on)
        await host.command(Opcode.RESET)
        await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)  # table cleared
        for i, desc in enumerate(entries):
            await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**desc, index=i))
        await host.command(*net.image)
        single = []
        for i, expected in ((0, None), (1, net.pooled), (2, net.out)):
            single.append(decode_counters(await host.command(Opcode.RUN_LAYER, bytes([i]))))
            if expected is not None:
                address, size = (11, net.ph * net.pw * net.words) if i == 1 else (300,
                                                                                   out_words)
                assert await host.command(Opcode.READ_ACTIVATIONS,
                                          encode_read(address, size)) == expected
        measured["network"], measured["single"] = network, single
        # a 32-byte CONFIGURE_LAYER replaces entry 0 only; a refused one empties entry 0
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**{**net.desc_a, "kernel": 5}),
                           expect=ErrorCode.LAYER_DOES_NOT_FIT)
        await host.command(Opcode.RUN_LAYER, expect=ErrorCode.NOT_CONFIGURED)
        await host.command(Opcode.RUN_NETWORK, b"\x01", expect=ErrorCode.NOT_CONFIGURED)
        await host.command(*net.image)
        await host.command(Opcode.CONFIGURE_LAYER, encode_layer(**net.desc_a))
        assert decode_counters(await host.command(Opcode.RUN_NETWORK, b"\x01")) == single[0]
        assert await host.command(Opcode.READ_ACTIVATIONS,
                                  encode_read(200, 9 * 7 * net.words)) == net.conv

    def ctx_select(host):
        return host.ctx.get(dut.select)

    run_sim(dut, body)
    single = measured["single"]
    assert single[1] == (net.ph * net.pw * net.words * 4 + 4, 4)      # the pool's closed form
    assert measured["network"] == (sum(b for b, _ in single), sum(st for _, st in single))
    print("RUN_NETWORK counters", measured["network"], "= sum of", single)


def test_abort_and_garbage_keep_serving():
    """A truncated WRITE (timeout → ABORT), pure garbage and a bad length: each gets its
    error response (or none, for bytes outside frames), and IDENTIFY still works."""
    config = load_config("tiny")
    dut = CommandExecutor(config, timeout_cycles=64)

    async def body(host):
        ctx = host.ctx
        frame = encode_frame(Opcode.WRITE_ACTIVATIONS, encode_write(0, bytes(range(10))))
        for byte in frame[:9]:                       # header + address + one data byte
            ctx.set(dut.i.valid, 1)
            ctx.set(dut.i.payload, byte)
            await ctx.tick().until(dut.i.ready)
        response = await host.transact(b"", limit=400)
        assert response.framing and response.status == ErrorCode.TIMEOUT
        response = await host.transact(bytes([MAGIC, Opcode.IDENTIFY, 5, 0]))
        assert response.framing and response.status == ErrorCode.BAD_LENGTH
        reply = await host.command(Opcode.IDENTIFY)
        assert IdentifyReply.unpack(reply).config_hash == config.config_hash()

    run_sim(dut, body)


def test_random_commands_get_one_response_each():
    """Random frames of every opcode with random payloads (random addresses, sizes and
    descriptor bytes): each gets exactly one response to its opcode, WRITE_* and
    READ_ACTIVATIONS with the status their bounds call for."""
    config = load_config("tiny")
    dut = CommandExecutor(config)
    rng = np.random.default_rng(1)
    sizes = {Opcode.WRITE_WEIGHTS: (dut.weight_entry_bytes, config.weight_depth),
             Opcode.WRITE_THRESHOLDS: (dut.threshold_entry_bytes, config.threshold_depth),
             Opcode.WRITE_ACTIVATIONS: (dut.activation_word_bytes, config.activation_depth)}

    def address(depth):
        return int(rng.choice([rng.integers(0, depth + 4), rng.integers(0, 2 ** 32)]))

    async def body(host):
        for _ in range(60):
            opcode = Opcode(int(rng.choice([int(op) for op in Opcode])))
            expect = None
            if opcode in sizes:
                entry, depth = sizes[opcode]
                addr, n = address(depth), int(rng.integers(1, 40))
                payload = encode_write(addr, rng.bytes(n))
                fits = n % entry == 0 and addr + n // entry <= depth
                expect = ErrorCode.OK if fits else ErrorCode.BAD_ADDRESS
            elif opcode == Opcode.READ_ACTIVATIONS:
                addr, n = address(config.activation_depth), int(rng.integers(0, 20))
                payload = encode_read(addr, n)
                fits = addr + n <= config.activation_depth
                expect = ErrorCode.OK if fits else ErrorCode.BAD_ADDRESS
            elif opcode == Opcode.CONFIGURE_LAYER:
                payload = rng.bytes(int(rng.choice([32, int(rng.integers(1, 65))])))
            elif opcode == Opcode.READ_RESULTS:
                payload = rng.bytes(6)
            elif opcode == Opcode.RUN_LAYER:
                payload = rng.bytes(int(rng.integers(0, 2)))
            elif opcode == Opcode.RUN_NETWORK:
                payload = rng.bytes(1)
            else:
                payload = b""
            response = await host.transact(encode_frame(opcode, payload))
            assert not response.framing and response.opcode == opcode, response
            if expect is not None:
                assert response.status == expect, (opcode.name, response)
            if opcode == Opcode.READ_ACTIVATIONS and response.ok:
                assert len(response.data) == n * dut.activation_word_bytes

    run_sim(dut, body)


def test_verilog_tiny():
    text = verilog.convert(CommandExecutor(load_config("tiny")), name="bitdet_top")
    assert "module bitdet_top" in text
    for port in ("i__valid", "i__payload", "i__ready", "o__valid", "o__payload", "o__ready"):
        assert port in text, port


def test_verilog_icebreaker():
    start = time.perf_counter()
    text = verilog.convert(CommandExecutor(load_config("icebreaker")), name="bitdet_top")
    assert "module bitdet_top" in text
    assert time.perf_counter() - start < 60


def test_payload_encoders():
    """Host-side payload helpers: layouts of docs/protocol.md, and their range checks."""
    assert encode_write(0x01020304, b"\xaa") == bytes([4, 3, 2, 1, 0xAA])
    assert encode_read(16, 3) == bytes([16, 0, 0, 0, 3, 0])
    with pytest.raises(ValueError):
        encode_write(-1, b"\x00")
    with pytest.raises(ValueError):
        encode_write(0, b"")
    # two columns, 3 thresholds of 5 bits → 2 bytes per column; unused thresholds all ones
    packed = np.array([[[3, 17], [0, 31]]])
    data = encode_thresholds(packed, threshold_width=5, thresholds_per_channel=3)
    fields = [int.from_bytes(data[i:i + 2], "little") for i in (0, 2)]
    assert fields == [3 | 17 << 5 | 31 << 10, 0 | 31 << 5 | 31 << 10]
    with pytest.raises(ValueError):
        encode_thresholds(np.array([[[32]]]), threshold_width=5, thresholds_per_channel=1)
    desc = {"in_h": 7, "in_w": 300, "channels": 5, "out_h": 4, "out_w": 150,
            "out_channels": 9, "kernel": 3, "stride": 2, "padding": 1, "pad_bit": 1,
            "input_base": 1, "output_base": 70000, "weight_base": 3, "threshold_base": 2,
            "raw": 0}
    payload = encode_layer(**desc)
    assert len(payload) == 32 and payload[15] == 1 and payload[20:24] == (70000).to_bytes(4,
                                                                                           "little")
    assert decode_layer(payload) == {**desc, "pool": 0}
    with pytest.raises(ValueError):
        encode_layer(**{**desc, "pad_bit": 2})
    pool = {**desc, "pad_bit": 0, "pool": 1}
    payload = encode_layer(**pool)
    assert payload[15] == LAYER_FLAG_POOL == 0x04
    assert decode_layer(payload) == pool
    assert decode_layer(encode_layer(**{**pool, "pool": True}))["pool"] == 1


def test_writes_far_out_of_range_touch_nothing():
    """WRITE_* addresses whose low bits would wrap the executor's narrow entry counter
    (it counts in max(depths, MAX_PAYLOAD).bit_length() + 1 bits and flags higher
    addresses) write nothing: word 0 keeps its value."""
    config = load_config("tiny")
    dut = CommandExecutor(config)
    word = dut.activation_word_bytes
    bits = max(config.weight_depth, config.threshold_depth, config.activation_depth,
               MAX_PAYLOAD).bit_length() + 1
    first = bytes(range(1, word + 1))

    async def body(host):
        await host.command(Opcode.WRITE_ACTIVATIONS, encode_write(0, first))
        for addr in ((1 << bits) - 1, (1 << (bits - 1)) - 1, (1 << 32) - 1,
                     (1 << 32) - 2, (1 << bits) + (1 << (bits - 1)) - 1):
            for opcode in (Opcode.WRITE_ACTIVATIONS, Opcode.WRITE_WEIGHTS):
                entry = word if opcode == Opcode.WRITE_ACTIVATIONS else dut.weight_entry_bytes
                await host.command(opcode, encode_write(addr, bytes(3 * entry)),
                                   expect=ErrorCode.BAD_ADDRESS)
        assert await host.command(Opcode.READ_ACTIVATIONS, encode_read(0, 1)) == first

    run_sim(dut, body)
