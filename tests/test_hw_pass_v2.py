# amaranth: UnusedElaboratable=no
"""Contract-2 pass engine (amaranth.sim): pool passes over n-bit levels and channel-repeat
passes on a flat slot memory, compared word for word with the emulator's memory after the
same pass (and the output map with ``pack_levels`` of a numpy reference), the counters with
:func:`bitdet.core.cycles.pass_cycles`."""

import dataclasses

import pytest

pytest.importorskip("amaranth", reason="the hw tests need the `hw` extra (amaranth)")

import numpy as np
from amaranth.hdl import Module
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from bitdet.core.config import load_config
from bitdet.core.cycles import pass_cycles
from bitdet.core.descriptor import LayerDescriptor
from bitdet.core.packing import pack_levels
from bitdet.hw.pass_engine import PassEngine, slot_addr_width
from bitdet.sw.emulator import Emulator


def small_config(**changes):
    """A small contract-2 build: 2×2 array, 16-bit words, 3 slots of 256 words, 4-bit
    levels."""
    base = dict(rows=2, cols=2, simd=16, weight_depth=64, threshold_depth=64,
                activation_depth=256, max_channels=48, activation_slots=3,
                max_input_bits=4, max_shortcut_bits=4, acc_width=None)
    base.update(changes)
    return dataclasses.replace(load_config("contract2"), **base)


def words_of(packed: np.ndarray, simd: int) -> list[int]:
    """Packed uint8 bytes (bytes innermost) → little-endian ``simd``-bit words."""
    flat = np.ascontiguousarray(packed).reshape(-1, simd // 8)
    return [int.from_bytes(row.tobytes(), "little") for row in flat]


def level_map(rng, channels, h, w, bits, kind="random"):
    """int64 levels ``1×C×H×W``: uniform, ``ties`` (two neighbouring levels), ``max`` (all
    the top level) or ``sparse`` (mostly 0)."""
    top = (1 << bits) - 1
    shape = (1, channels, h, w)
    if kind == "max":
        return np.full(shape, top, dtype=np.int64)
    if kind == "ties":
        low = int(rng.integers(0, top)) if top else 0
        return rng.integers(low, low + 2, size=shape).clip(0, top).astype(np.int64)
    if kind == "sparse":
        return np.where(rng.random(shape) < 0.15, rng.integers(0, top + 1, size=shape), 0)
    return rng.integers(0, top + 1, size=shape).astype(np.int64)


def random_memory(rng, config) -> list[int]:
    """Every word of the flat slot memory random (so that untouched words are seen)."""
    size = config.activation_slots * config.activation_depth
    return [int(v) for v in rng.integers(0, 1 << config.simd, size=size, dtype=np.uint64)]


def place(memory, config, slot, base, words):
    start = slot * config.activation_depth + base
    memory[start:start + len(words)] = words


def run_engine(config, desc, image, *, embedded=False):
    """Simulate one pass on ``image`` (the flat memory's words); returns (memory after it,
    busy, stall, cycles from start to done)."""
    engine = PassEngine(config=config, embedded=embedded)
    size = config.activation_slots * config.activation_depth
    m = Module()
    m.submodules.engine = engine
    m.submodules.mem = mem = Memory(shape=config.simd, depth=size, init=image)
    rd, wr = mem.read_port(), mem.write_port()
    assert len(engine.act_read.addr) == slot_addr_width(config)
    m.d.comb += [rd.addr.eq(engine.act_read.addr), rd.en.eq(engine.act_read.en),
                 engine.act_read.data.eq(rd.data),
                 wr.addr.eq(engine.act_write.addr), wr.en.eq(engine.act_write.en),
                 wr.data.eq(engine.act_write.data)]
    result = {}
    payload = int.from_bytes(desc.encode(), "little")

    async def testbench(ctx):
        ctx.set(engine.layer.as_value(), payload)
        ctx.set(engine.start, 1)
        await ctx.tick()
        ctx.set(engine.start, 0)
        if not embedded:
            ctx.set(engine.layer.as_value(), 0)        # latched at start
        cycles, busy, stall = 1, 0, 0
        while not ctx.get(engine.done):
            assert ctx.get(engine.busy)
            busy += 1
            stall += ctx.get(engine.stall)
            await ctx.tick()
            cycles += 1
            assert cycles < 200_000
        assert not ctx.get(engine.busy)
        if embedded:
            assert ctx.get(engine.busy_cycles) == ctx.get(engine.stall_cycles) == 0
            result["busy"], result["stall"] = busy, stall
        else:
            assert (ctx.get(engine.busy_cycles), ctx.get(engine.stall_cycles)) == (busy, stall)
            result["busy"] = ctx.get(engine.busy_cycles)
            result["stall"] = ctx.get(engine.stall_cycles)
        result["cycles"] = cycles
        result["memory"] = [ctx.get(mem.data[i]) for i in range(size)]

    sim = Simulator(m)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return result["memory"], result["busy"], result["stall"], result["cycles"]


def emulate(config, desc, image) -> list[int]:
    """The emulator's slot memory after the same pass."""
    emu = Emulator(config)
    nbytes = config.simd // 8
    emu.activations[:] = np.frombuffer(
        b"".join(v.to_bytes(nbytes, "little") for v in image), dtype=np.uint8
    ).reshape(-1, nbytes)
    emu._run(desc)
    return [int.from_bytes(row.tobytes(), "little") for row in emu.activations]


def check_pass(config, desc, image, expected_words, *, embedded=False):
    """Run the engine, compare with the emulator, the reference output map and the cycle
    model; nothing but the output map may change."""
    memory, busy, stall, cycles = run_engine(config, desc, image, embedded=embedded)
    assert memory == emulate(config, desc, image)
    start = desc.output_slot * config.activation_depth + desc.output_base
    assert memory[start:start + len(expected_words)] == expected_words
    assert len(expected_words) == desc.out_bits * desc.map_words(config.simd)
    outside = list(range(start)) + list(range(start + len(expected_words), len(image)))
    assert [memory[i] for i in outside] == [image[i] for i in outside]
    assert (busy, stall) == pass_cycles(config, desc)
    assert cycles == busy + 1                          # start cycle … done cycle


def reference_pool(levels, kernel, stride):
    _, c, h, w = levels.shape
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    out = np.zeros((1, c, oh, ow), dtype=np.int64)
    for y in range(oh):
        for x in range(ow):
            window = levels[:, :, y * stride:y * stride + kernel, x * stride:x * stride + kernel]
            out[:, :, y, x] = window.max(axis=(2, 3))
    return out


def pool_case(config, rng, *, bits, h, w, channels, kernel, stride, kind="random",
              input_slot=1, output_slot=2, input_base=3, output_base=5, embedded=False):
    simd = config.simd
    desc = LayerDescriptor.pool_pass(in_h=h, in_w=w, channels=channels, kernel=kernel,
                                     stride=stride, input_base=input_base,
                                     output_base=output_base, in_bits=bits, out_bits=bits,
                                     input_slot=input_slot, output_slot=output_slot)
    assert desc.problems(config) == [], desc.problems(config)
    levels = level_map(rng, channels, h, w, bits, kind)
    image = random_memory(rng, config)
    place(image, config, input_slot, input_base, words_of(pack_levels(levels, bits,
                                                                      word_bits=simd), simd))
    pooled = reference_pool(levels, kernel, stride)
    if kind == "random" and bits > 1:
        # the max of levels is not the OR of the planes: make sure the case shows it
        planes_or = np.zeros_like(pooled)
        for b in range(bits):
            planes_or |= reference_pool((levels >> b) & 1, kernel, stride) << b
        assert (planes_or != pooled).any() or kernel == 1
    expected = words_of(pack_levels(pooled, bits, word_bits=simd), simd)
    check_pass(config, desc, image, expected, embedded=embedded)


def repeat_case(config, rng, *, bits, h, w, channels, out_channels, input_slot=0,
                output_slot=2, input_base=7, output_base=2, embedded=False):
    simd = config.simd
    desc = LayerDescriptor.repeat_pass(h=h, w=w, channels=channels, out_channels=out_channels,
                                       bits=bits, input_slot=input_slot,
                                       output_slot=output_slot, input_base=input_base,
                                       output_base=output_base)
    assert desc.problems(config) == [], desc.problems(config)
    levels = level_map(rng, channels, h, w, bits)
    image = random_memory(rng, config)
    place(image, config, input_slot, input_base, words_of(pack_levels(levels, bits,
                                                                      word_bits=simd), simd))
    copied = levels[:, np.arange(out_channels) % channels]
    expected = words_of(pack_levels(copied, bits, word_bits=simd), simd)
    check_pass(config, desc, image, expected, embedded=embedded)


POOL_CASES = [
    # bits, (h, w, channels, kernel, stride), kind
    (1, (5, 7, 13, 2, 2), "sparse"),
    (2, (5, 6, 3, 2, 2), "random"),
    (3, (6, 5, 17, 3, 1), "random"),       # two words per pixel, overlapping windows
    (4, (5, 5, 5, 3, 2), "random"),
    (4, (4, 7, 9, 1, 1), "random"),        # kernel 1: a copy
    (2, (7, 7, 19, 3, 3), "ties"),
    (3, (4, 4, 7, 2, 1), "max"),           # every level the top one
    (4, (6, 6, 11, 2, 3), "sparse"),       # stride beyond the kernel
]


@pytest.mark.parametrize(("bits", "shape", "kind"), POOL_CASES)
def test_pool_pass_matches_emulator(bits, shape, kind):
    h, w, channels, kernel, stride = shape
    rng = np.random.default_rng(hash(shape) % 2**32 + bits)
    pool_case(small_config(), rng, bits=bits, h=h, w=w, channels=channels, kernel=kernel,
              stride=stride, kind=kind)


def test_pool_pass_random():
    """Random shapes, levels, slots and bases on one build."""
    config = small_config()
    rng = np.random.default_rng(33)
    ran = 0
    for _ in range(6):
        bits = int(rng.integers(1, 5))
        kernel = int(rng.integers(1, 4))
        stride = int(rng.integers(1, 4))
        h, w = (int(v) for v in rng.integers(kernel, 7, size=2))
        channels = int(rng.integers(1, 36))
        words = -(-channels // config.simd)
        in_span = bits * h * w * words
        oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        out_span = bits * oh * ow * words
        if in_span > config.activation_depth:
            continue
        slot_in, slot_out = (int(v) for v in rng.permutation(3)[:2])
        pool_case(config, rng, bits=bits, h=h, w=w, channels=channels, kernel=kernel,
                  stride=stride, kind=str(rng.choice(["random", "ties", "sparse"])),
                  input_slot=slot_in, output_slot=slot_out,
                  input_base=int(rng.integers(0, config.activation_depth - in_span + 1)),
                  output_base=int(rng.integers(0, config.activation_depth - out_span + 1)))
        ran += 1
    assert ran >= 4


REPEAT_CASES = [
    # bits, (h, w, channels, out_channels)
    (1, (3, 2, 3, 6)),         # a multiple of C inside one word
    (2, (2, 2, 3, 5)),         # docs/protocol.md's example: 0, 1, 2, 0, 1
    (3, (2, 3, 5, 37)),        # C < simd, O over three words, not a multiple
    (4, (2, 2, 17, 34)),       # C across a word boundary, O a multiple
    (2, (3, 2, 17, 45)),       # … O not a multiple, ending mid-word
    (1, (2, 2, 33, 48)),       # three input words, the wrap inside a word
    (4, (1, 3, 1, 19)),        # one channel everywhere
    (2, (2, 2, 16, 48)),       # C = simd
    (3, (2, 1, 7, 7)),         # O = C: a copy
]


@pytest.mark.parametrize(("bits", "shape"), REPEAT_CASES)
def test_repeat_pass_matches_emulator(bits, shape):
    h, w, channels, out_channels = shape
    rng = np.random.default_rng(hash(shape) % 2**32 + bits)
    repeat_case(small_config(), rng, bits=bits, h=h, w=w, channels=channels,
                out_channels=out_channels)


def test_embedded_engine_uses_the_held_descriptor():
    """embedded: the executor holds ``layer`` and counts ``busy`` / ``stall`` itself."""
    config = small_config()
    rng = np.random.default_rng(5)
    pool_case(config, rng, bits=3, h=5, w=4, channels=18, kernel=2, stride=1,
              embedded=True)
    repeat_case(config, rng, bits=2, h=2, w=3, channels=5, out_channels=23, embedded=True)


def test_one_bit_build():
    """A ``max_input_bits = 1`` build (no plane logic): the OR pool and 1-bit repeats."""
    config = small_config(max_input_bits=1, max_shortcut_bits=0, activation_slots=4)
    rng = np.random.default_rng(7)
    pool_case(config, rng, bits=1, h=6, w=7, channels=21, kernel=3, stride=2,
              kind="sparse", input_slot=3, output_slot=0)
    repeat_case(config, rng, bits=1, h=3, w=3, channels=11, out_channels=30,
                input_slot=2, output_slot=3)


def test_odd_word_and_depth():
    """simd 24 (a non-power-of-two word: ``ceil(C / simd)`` by compares) and a depth of 100
    words (slot offsets that are not a bit field)."""
    config = small_config(simd=24, cols=2, activation_depth=100, max_channels=72)
    rng = np.random.default_rng(11)
    pool_case(config, rng, bits=2, h=5, w=4, channels=29, kernel=2, stride=2,
              input_slot=2, output_slot=1, input_base=9, output_base=31)
    repeat_case(config, rng, bits=3, h=2, w=2, channels=25, out_channels=70,
                input_slot=1, output_slot=0, input_base=3, output_base=11)
    repeat_case(config, rng, bits=2, h=2, w=3, channels=7, out_channels=50,
                input_slot=0, output_slot=2, input_base=50, output_base=0)


def test_constructor_rejects_non_config():
    with pytest.raises(TypeError, match="AcceleratorConfig"):
        PassEngine(config={"simd": 16})
