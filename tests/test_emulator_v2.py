"""The emulator under contract 2 (sw/emulator.py): n-bit maps as bit-planes, residual
shortcuts through per-shortcut-level threshold rows, pool and channel-repeat passes over
n-bit maps, map slots with flat WRITE/READ_ACTIVATIONS addresses and 48-byte descriptors,
driven through real command frames (HostSession over EmuLink) and compared bit for bit
with the golden model (core/golden.py) and the cycle model (core/cycles.pass_cycles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitdet.core import golden
from bitdet.core.config import AcceleratorConfig, load_config
from bitdet.core.cycles import pass_cycles
from bitdet.core.descriptor import LayerDescriptor
from bitdet.core.packing import pack_levels, pack_thresholds, pack_weights
from bitdet.core.protocol import (
    DeviceError,
    ErrorCode,
    HostSession,
    Opcode,
    decode_counters,
    encode_read,
    encode_thresholds,
    encode_weights,
    encode_write,
    threshold_entry_bytes,
)
from bitdet.sw.driver.link import EmuLink
from bitdet.sw.emulator import Emulator

#: A small contract-2 build: 2-bit-wide tiles of 8-bit words, so odd channel counts leave
#: channel padding in every word and several tiles per layer.
SMALL = AcceleratorConfig(name="v2small", rows=2, cols=2, simd=8, weight_depth=512,
                          threshold_depth=256, activation_depth=1024, max_channels=32,
                          max_kernel=3, max_stride=2, output_bits=4, clock_hz=1_000_000,
                          baud=62_500, contract=2, max_input_bits=4, max_shortcut_bits=4,
                          activation_slots=4)
#: Contract 2 with narrower limits (2-bit input, 1-bit shortcuts, 3 slots).
NARROW = AcceleratorConfig(name="v2narrow", rows=3, cols=4, simd=16, weight_depth=256,
                           threshold_depth=64, activation_depth=512, max_channels=24,
                           max_kernel=3, max_stride=2, output_bits=2, clock_hz=1_000_000,
                           baud=62_500, contract=2, max_input_bits=2, max_shortcut_bits=1,
                           activation_slots=3)
#: Contract 1 with 2-bit outputs: three thresholds per entry, convolutions use the first.
V1 = AcceleratorConfig(name="v1check", rows=2, cols=2, simd=8, weight_depth=64,
                       threshold_depth=16, activation_depth=64, max_channels=16,
                       max_kernel=3, max_stride=2, output_bits=2, clock_hz=1_000_000,
                       baud=62_500)


@pytest.fixture(scope="module")
def contract2():
    return load_config("contract2")


class Host:
    """An emulator behind a HostSession: the commands as the driver sends them."""

    def __init__(self, config):
        self.config = config
        self.emu = Emulator(config)
        self.session = HostSession(EmuLink(self.emu), timeout=0.5)
        self.wbytes = config.simd // 8

    def command(self, opcode, payload=b""):
        return self.session.command(opcode, payload)

    def status(self, opcode, payload=b""):
        return ErrorCode(self.session.request(opcode, payload).status)

    def flat(self, slot, word):
        return slot * self.config.activation_depth + word

    def write_map(self, slot, base, planes: np.ndarray):
        """Planes of :func:`pack_levels` (plane ``b`` at ``base + b·map_words``)."""
        self.session.write_memory(Opcode.WRITE_ACTIVATIONS, self.flat(slot, base),
                                  np.ascontiguousarray(planes).tobytes(), self.wbytes)

    def read_map(self, slot, base, words):
        return self.session.read_activations(self.flat(slot, base), words, self.wbytes)

    def write_weights(self, address, w):
        c = self.config
        data = encode_weights(pack_weights(w, word_bits=c.simd, cols=c.cols))
        self.session.write_memory(Opcode.WRITE_WEIGHTS, address, data, self.wbytes * c.cols)

    def write_thresholds(self, address, table, k, in_bits):
        """An ``(O, R, L)`` table as ``tiles·R`` entries: entry ``t·R + r`` holds row
        ``r`` of tile ``t``."""
        c = self.config
        packed = pack_thresholds(table, k, cols=c.cols, in_bits=in_bits)  # tiles, cols, R, L
        tiles, cols, rows, levels = packed.shape
        entries = packed.transpose(0, 2, 1, 3).reshape(tiles * rows, cols, levels)
        data = encode_thresholds(entries, threshold_width=c.threshold_width,
                                 thresholds_per_channel=c.thresholds_per_channel)
        entry = threshold_entry_bytes(c.threshold_width, c.thresholds_per_channel, c.cols)
        self.session.write_memory(Opcode.WRITE_THRESHOLDS, address, data, entry)

    def configure(self, descriptor: LayerDescriptor, index=None):
        self.command(Opcode.CONFIGURE_LAYER, descriptor.encode(index))

    def run(self, index=0):
        return decode_counters(self.command(Opcode.RUN_LAYER, bytes([index])))


def planes_of(levels: torch.Tensor, bits: int, simd: int) -> np.ndarray:
    """``bits × H·W·words × simd/8`` planes of an ``1×C×H×W`` level map."""
    packed = pack_levels(levels, bits, word_bits=simd)              # bits, 1, H, W, B
    return packed.reshape(bits, -1, simd // 8)


def random_table(rng, acc: torch.Tensor, rows: int, levels: int, amax: int) -> torch.Tensor:
    """``(O, R, L)`` sorted thresholds, most of them exactly at accumulator values the
    layer produces (ties), some at 0 / ``Amax + 1``; one channel always at the top level
    (``T = 0``) and one never above 0 (``T = Amax + 1``) where there are two channels."""
    out_channels = acc.shape[1]
    table = np.zeros((out_channels, rows, levels), dtype=np.int64)
    for o in range(out_channels):
        seen = acc[0, o].flatten().numpy().astype(np.int64)
        pool = np.concatenate([seen, seen + 1, [0, amax + 1],
                               rng.integers(0, amax + 2, size=4)])
        pool = np.clip(pool, 0, amax + 1)
        table[o] = np.sort(rng.choice(pool, size=(rows, levels)), axis=-1)
    if out_channels >= 2:
        constant = rng.choice(out_channels, size=2, replace=False)
        table[constant[0]] = 0
        table[constant[1]] = amax + 1
    return torch.from_numpy(table)


def random_conv(rng, config) -> LayerDescriptor:
    """A random contract-2 convolution that fits ``config`` (bases and slots included)."""
    c = config
    depth = c.activation_depth
    while True:
        n = int(rng.integers(1, c.max_input_bits + 1))
        m = int(rng.integers(1, c.output_bits + 1))
        s = int(rng.integers(0, c.max_shortcut_bits + 1))
        channels = int(rng.choice(np.arange(1, min(c.max_channels, 2 * c.simd + 3) + 1, 2)))
        out_channels = int(rng.choice(np.arange(1, min(c.max_channels, 4 * c.cols + 3) + 1,
                                                2)))
        k = int(rng.integers(1, c.max_kernel + 1))
        stride = int(rng.integers(1, c.max_stride + 1))
        padding = int(rng.integers(0, min(k - 1, 1) + 1))
        in_h, in_w = (int(v) for v in rng.integers(max(k - 2 * padding, 1), 7, size=2))
        slots = [int(v) for v in rng.permutation(c.activation_slots)[:3]]
        d = LayerDescriptor.conv(
            in_h=in_h, in_w=in_w, channels=channels, out_channels=out_channels, kernel=k,
            stride=stride, padding=padding, in_bits=n, out_bits=m, shortcut_bits=s,
            pad_level=int(rng.integers(0, 1 << n)), input_slot=slots[0],
            output_slot=slots[1], shortcut_slot=slots[2] if s else 0, extended=True)
        tiles = -(-out_channels // c.cols)
        k_words = k * k * -(-channels // c.simd)
        need = {"input_base": n * d.map_words(c.simd, output=False),
                "output_base": m * d.map_words(c.simd),
                "shortcut_base": s * d.map_words(c.simd)}
        if max(need.values()) > depth or tiles * k_words > c.weight_depth \
                or tiles * d.threshold_rows > c.threshold_depth:
            continue
        bases = {name: int(rng.integers(0, depth - size + 1)) if size else 0
                 for name, size in need.items()}
        d = d.replace(**bases,
                      weight_base=int(rng.integers(0, c.weight_depth - tiles * k_words + 1)),
                      threshold_base=int(rng.integers(
                          0, c.threshold_depth - tiles * d.threshold_rows + 1)))
        assert d.problems(c) == [], d.problems(c)
        return d


def run_conv(host, rng, d: LayerDescriptor):
    """Write a random input, weights, shortcut and table for ``d``, run it; the levels
    read back, the golden levels and the counters."""
    c = host.config
    n, m, s = d.in_bits, d.out_bits, d.shortcut_bits
    x = torch.from_numpy(rng.integers(0, 1 << n, size=(1, d.channels, d.in_h, d.in_w)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(d.out_channels, d.channels,
                                                        d.kernel, d.kernel)))
    acc = golden.level_conv2d(x, w, in_bits=n, stride=d.stride, padding=d.padding,
                              pad_level=d.pad_level, method="reference")
    assert acc.shape[2:] == (d.out_h, d.out_w)
    table = random_table(rng, acc, d.threshold_rows, (1 << m) - 1, d.accumulator_max)
    shortcut = torch.from_numpy(rng.integers(0, 1 << s, size=tuple(acc.shape)))
    if s:
        expected = golden.threshold_shortcut(acc, table, shortcut)
        host.write_map(d.shortcut_slot, d.shortcut_base, planes_of(shortcut, s, c.simd))
    else:
        expected = golden.threshold(acc, table[:, 0])
    host.write_map(d.input_slot, d.input_base, planes_of(x, n, c.simd))
    out_words = m * d.map_words(c.simd)
    host.write_map(d.output_slot, d.output_base,                       # stale data: 1s
                   np.full((out_words, host.wbytes), 0xFF, dtype=np.uint8))
    host.write_weights(d.weight_base, w)
    host.write_thresholds(d.threshold_base, table, d.k, n)
    index = int(rng.integers(0, 16))
    host.configure(d, index)
    counters = host.run(index)
    got = host.read_map(d.output_slot, d.output_base, out_words)
    return got, planes_of(expected, m, c.simd).tobytes(), counters


@pytest.mark.parametrize("name", ["SMALL", "NARROW", "contract2"])
def test_random_convolutions_match_golden(name, contract2):
    """n-bit input, m-bit output, s-bit shortcut rows, strides, padding levels, odd channel
    counts, ties: bit for bit the golden model, cycles from pass_cycles."""
    config = {"SMALL": SMALL, "NARROW": NARROW, "contract2": contract2}[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    host = Host(config)
    seen = set()
    for _ in range(24 if name == "contract2" else 40):
        d = random_conv(rng, config)
        got, expected, counters = run_conv(host, rng, d)
        assert got == expected, d
        assert counters == pass_cycles(config, d)
        seen.add((d.in_bits, d.out_bits, bool(d.shortcut_bits), d.stride, d.padding))
    assert host.emu.select == 0                                     # nothing flips
    assert len(seen) > 12


def test_every_width_combination(contract2):
    """Each (in_bits, out_bits, shortcut_bits) once, on a fixed 3×3 / stride-2 / padded
    geometry with channel padding (5 → 3 channels over 64-bit words)."""
    rng = np.random.default_rng(7)
    host = Host(contract2)
    for n in range(1, 5):
        for m in range(1, 5):
            for s in range(5):
                d = LayerDescriptor.conv(
                    in_h=5, in_w=4, channels=5, out_channels=11, kernel=3, stride=2,
                    padding=1, in_bits=n, out_bits=m, shortcut_bits=s,
                    pad_level=(1 << n) - 1 if s % 2 else n // 2, input_slot=s % 6,
                    output_slot=(s + 1) % 6, shortcut_slot=(s + 2) % 6 if s else 0,
                    input_base=100 * n, output_base=40 * m, shortcut_base=7 * s if s else 0,
                    weight_base=3, threshold_base=5 * s, extended=True)
                got, expected, counters = run_conv(host, rng, d)
                assert got == expected, (n, m, s)
                assert counters == pass_cycles(contract2, d)


@pytest.mark.parametrize("config", [SMALL, NARROW], ids=["SMALL", "NARROW"])
def test_pool_and_repeat_passes(config):
    """A pool pass is the max of the window's levels (not a per-plane OR); a repeat pass
    copies channel o mod C, plane by plane (also for O not a multiple of C)."""
    rng = np.random.default_rng(config.simd)
    host = Host(config)
    for trial in range(12):
        bits = int(rng.integers(1, config.max_input_bits + 1))
        channels = int(rng.choice([1, 3, 5, 7, 9, 13]))
        h, w = (int(v) for v in rng.integers(2, 8, size=2))
        x = torch.from_numpy(rng.integers(0, 1 << bits, size=(1, channels, h, w)))
        slots = [int(v) for v in rng.permutation(config.activation_slots)[:2]]
        if trial % 2:
            k = int(rng.integers(1, min(h, w, 3) + 1))
            stride = int(rng.integers(1, k + 1))
            d = LayerDescriptor.pool_pass(in_h=h, in_w=w, channels=channels, kernel=k,
                                          stride=stride, in_bits=bits, out_bits=bits,
                                          input_slot=slots[0], output_slot=slots[1],
                                          input_base=int(rng.integers(0, 50)),
                                          output_base=int(rng.integers(0, 50)))
            expected = golden.binary_maxpool2d(x, k, stride)
        else:
            out_channels = int(rng.integers(1, min(4 * channels, config.max_channels) + 1))
            d = LayerDescriptor.repeat_pass(h=h, w=w, channels=channels,
                                            out_channels=out_channels, bits=bits,
                                            input_slot=slots[0], output_slot=slots[1],
                                            input_base=int(rng.integers(0, 50)),
                                            output_base=int(rng.integers(0, 50)))
            expected = x[:, torch.arange(out_channels) % channels]
            if out_channels % channels == 0:
                assert torch.equal(expected, golden.repeat_channels(x, out_channels))
        assert d.problems(config) == [], d.problems(config)
        host.write_map(d.input_slot, d.input_base, planes_of(x, bits, config.simd))
        out_words = bits * d.map_words(config.simd)
        host.write_map(d.output_slot, d.output_base,
                       np.full((out_words, host.wbytes), 0xFF, dtype=np.uint8))
        host.configure(d, trial)
        assert host.run(trial) == pass_cycles(config, d)
        got = host.read_map(d.output_slot, d.output_base, out_words)
        assert got == planes_of(expected, bits, config.simd).tobytes(), d


def test_run_network_chains_slots():
    """conv (2-bit shortcut) → pool → repeat in one RUN_NETWORK: each pass reads the slot
    the previous one wrote, the counters are the sum of pass_cycles."""
    c = SMALL
    rng = np.random.default_rng(3)
    host = Host(c)
    x = torch.from_numpy(rng.integers(0, 8, size=(1, 5, 6, 6)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(3, 5, 3, 3)))
    conv = LayerDescriptor.conv(in_h=6, in_w=6, channels=5, out_channels=3, kernel=3,
                                padding=1, in_bits=3, out_bits=2, shortcut_bits=2,
                                pad_level=5, input_slot=0, output_slot=1, shortcut_slot=2,
                                input_base=9, output_base=4, shortcut_base=30)
    pool = LayerDescriptor.pool_pass(in_h=6, in_w=6, channels=3, kernel=2, in_bits=2,
                                     out_bits=2, input_slot=1, output_slot=3, input_base=4,
                                     output_base=200)
    repeat = LayerDescriptor.repeat_pass(h=3, w=3, channels=3, out_channels=9, bits=2,
                                         input_slot=3, output_slot=0, input_base=200,
                                         output_base=500)
    acc = golden.level_conv2d(x, w, in_bits=3, padding=1, pad_level=5)
    table = random_table(rng, acc, 4, 3, conv.accumulator_max)
    shortcut = torch.from_numpy(rng.integers(0, 4, size=tuple(acc.shape)))
    host.write_map(0, 9, planes_of(x, 3, c.simd))
    host.write_map(2, 30, planes_of(shortcut, 2, c.simd))
    host.write_weights(0, w)
    host.write_thresholds(0, table, conv.k, 3)
    for index, d in enumerate((conv, pool, repeat)):
        host.configure(d, index)
    counters = decode_counters(host.command(Opcode.RUN_NETWORK, b"\x03"))
    each = [pass_cycles(c, d) for d in (conv, pool, repeat)]
    assert counters == (sum(b for b, _ in each), sum(s for _, s in each))
    levels = golden.threshold_shortcut(acc, table, shortcut)
    expected = golden.repeat_channels(golden.binary_maxpool2d(levels, 2), 9)
    got = host.read_map(0, 500, 2 * repeat.map_words(c.simd))
    assert got == planes_of(expected, 2, c.simd).tobytes()


def test_threshold_memory_keeps_every_threshold():
    c = SMALL
    host = Host(c)
    table = torch.arange(2 * 2 * 15).reshape(2, 2, 15)                 # O = 2, R = 2
    host.write_thresholds(6, table, 20, 2)
    assert host.emu.thresholds[6].tolist() == table[:, 0].tolist()    # entry t·R + r
    assert host.emu.thresholds[7].tolist() == table[:, 1].tolist()


def test_only_the_first_thresholds_count():
    """An m-bit output compares with the first 2**m − 1 thresholds of its entry; the next
    one (here 0, "always") is ignored."""
    c = SMALL
    rng = np.random.default_rng(11)
    host = Host(c)
    x = torch.from_numpy(rng.integers(0, 4, size=(1, 3, 4, 4)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(2, 3, 1, 1)))
    acc = golden.level_conv2d(x, w, in_bits=2)
    for m in (1, 2, 3):
        used = (1 << m) - 1
        table = random_table(rng, acc, 1, used, 9)
        entries = torch.zeros((1, 2, used + 1), dtype=torch.int64)   # the rest "never"
        entries[0, :, :used] = table[:, 0]
        host.command(Opcode.WRITE_THRESHOLDS, encode_write(0, encode_thresholds(
            entries, threshold_width=c.threshold_width,
            thresholds_per_channel=c.thresholds_per_channel)))
        host.write_map(0, 0, planes_of(x, 2, c.simd))
        host.write_weights(0, w)
        d = LayerDescriptor.conv(in_h=4, in_w=4, channels=3, out_channels=2, kernel=1,
                                 in_bits=2, out_bits=m, output_slot=1)
        host.configure(d)
        host.run()
        expected = golden.threshold(acc, table[:, 0])
        assert host.read_map(1, 0, m * 16) == planes_of(expected, m, c.simd).tobytes()
    assert host.emu.select == 0                                     # 3 runs, no flip


def test_descriptor_size_per_contract(contract2):
    base = LayerDescriptor.conv(in_h=4, in_w=4, channels=3, out_channels=2, kernel=3,
                                padding=1, output_base=40)
    d = base.replace(output_slot=1)
    assert len(base.encode()) == 32 and len(d.encode()) == 48
    v2 = Host(contract2)
    for payload in (base.encode(), base.encode(2)):
        assert v2.status(Opcode.CONFIGURE_LAYER, payload) == ErrorCode.BAD_LENGTH
    for payload in (d.encode(), d.encode(2)):
        assert v2.status(Opcode.CONFIGURE_LAYER, payload) == ErrorCode.OK
    assert v2.status(Opcode.CONFIGURE_LAYER, d.replace(input_slot=6).encode(2)) \
        == ErrorCode.LAYER_DOES_NOT_FIT
    v1 = Host(V1)
    for payload in (d.encode(), d.encode(2)):
        assert v1.status(Opcode.CONFIGURE_LAYER, payload) == ErrorCode.BAD_LENGTH
    assert v1.status(Opcode.CONFIGURE_LAYER, base.encode(2)) == ErrorCode.OK


def test_refusals_and_flat_addresses():
    c = NARROW
    host = Host(c)
    d = LayerDescriptor.conv(in_h=4, in_w=4, channels=3, out_channels=2, kernel=3,
                             padding=1, in_bits=2, output_slot=1, extended=True)
    assert host.status(Opcode.CONFIGURE_LAYER, d.encode(1)) == ErrorCode.OK
    for bad in (d.replace(in_bits=3), d.replace(out_bits=3), d.replace(output_slot=3),
                d.replace(input_slot=5), d.replace(shortcut_bits=2, shortcut_slot=2)):
        assert host.status(Opcode.CONFIGURE_LAYER, bad.encode(1)) \
            == ErrorCode.LAYER_DOES_NOT_FIT, bad
    assert host.status(Opcode.RUN_LAYER, b"\x01") == ErrorCode.NOT_CONFIGURED  # cleared
    assert host.status(Opcode.CONFIGURE_LAYER, d.replace(pad_bit=1).encode()) \
        == ErrorCode.BAD_ARGUMENT
    total = c.activation_slots * c.activation_depth
    assert host.status(Opcode.READ_ACTIVATIONS, encode_read(total - 1, 2)) \
        == ErrorCode.BAD_ADDRESS
    assert host.status(Opcode.READ_ACTIVATIONS, encode_read(total - 2, 2)) == ErrorCode.OK
    assert host.status(Opcode.WRITE_ACTIVATIONS, encode_write(total - 1, bytes(range(4)))) \
        == ErrorCode.BAD_ADDRESS
    assert host.emu.activations[total - 1].tobytes() == bytes([0, 1])  # the word inside
    # one flat address space: a read crosses from slot 1 into slot 2
    data = bytes(range(8))
    host.command(Opcode.WRITE_ACTIVATIONS, encode_write(2 * c.activation_depth - 2, data))
    assert host.read_map(1, c.activation_depth - 2, 4) == data
    assert host.read_map(2, 0, 2) == data[4:]
    with pytest.raises(DeviceError):
        host.command(Opcode.READ_ACTIVATIONS, encode_read(total, 1))


def test_contract_1_unchanged():
    """Contract 1 still reads bank select, writes the other, flips, and compares with
    threshold 0 of each entry (the other thresholds of a 2-bit build are ignored)."""
    rng = np.random.default_rng(5)
    host = Host(V1)
    x = torch.from_numpy(rng.integers(0, 2, size=(1, 5, 5, 4)))
    w = torch.from_numpy(rng.choice([-1.0, 1.0], size=(3, 5, 3, 3)))
    k = 45
    p = golden.level_conv2d(x, w, in_bits=1, stride=2, padding=1, pad_level=1)
    t = torch.from_numpy(rng.integers(k // 2 - 3, k // 2 + 4, size=(3, 1)))
    table = torch.cat([t, torch.full((3, 2), k + 1)], dim=1)           # 0 0 0 if used
    host.write_map(0, 3, planes_of(x, 1, V1.simd))
    host.write_weights(2, w)
    host.write_thresholds(1, table[:, None], k, 1)
    d = LayerDescriptor.conv(in_h=5, in_w=4, channels=5, out_channels=3, kernel=3,
                             stride=2, padding=1, pad_bit=1, input_base=3, output_base=20,
                             weight_base=2, threshold_base=1)
    host.configure(d)
    assert host.run() == pass_cycles(V1, d) and host.emu.select == 1
    got = host.read_map(0, 20, d.map_words(V1.simd))                   # bank select = 1
    assert got == planes_of(golden.threshold(p, t), 1, V1.simd).tobytes()
    assert host.emu.activations.shape == (2 * V1.activation_depth, 1)
