"""The one layer descriptor: field table, payload, Amaranth layout, shapes and fit."""

from __future__ import annotations

import random

import pytest
from amaranth.hdl import Const
from amaranth.lib import data
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core.config import load_config
from bitdet.core.descriptor import (
    LAYER_DESCRIPTOR_SIZE,
    LayerDescriptor,
    descriptor_fields,
    descriptor_layout,
    output_size,
)
from bitdet.core.protocol import ProtocolError

CONV = LayerDescriptor.conv(in_h=16, in_w=12, channels=20, out_channels=10, kernel=3,
                            stride=2, padding=1, pad_bit=1, input_base=5, output_base=700,
                            weight_base=9, threshold_base=3)


def test_field_table_fills_the_payload():
    assert sum(f.metadata["bits"] for f in descriptor_fields()) == 8 * LAYER_DESCRIPTOR_SIZE
    assert all(f.metadata["doc"] for f in descriptor_fields())


def test_payload_layout_is_the_documented_one():
    # docs/protocol.md: six u16, kernel, stride, padding, flags (bit 0 pad_bit, 1 raw,
    # 2 pool), four u32, all little-endian
    payload = CONV.encode()
    assert payload == bytes.fromhex("1000 0c00 1400 0800 0600 0a00 03 02 01 01"
                                    "05000000 bc020000 09000000 03000000".replace(" ", ""))
    assert LayerDescriptor.decode(payload) == CONV
    assert CONV.encode(index=7) == b"\x07" + payload
    pool = LayerDescriptor.pool_pass(in_h=8, in_w=8, channels=3, kernel=2)
    assert pool.encode()[15] == 0x04 and pool.out_shape == (3, 4, 4)
    with pytest.raises(ProtocolError, match="31 bytes, expected 32"):
        LayerDescriptor.decode(payload[:-1])


def test_amaranth_layout_views_the_payload_bytes():
    layout = descriptor_layout()
    assert isinstance(layout, data.StructLayout) and layout.size == 8 * LAYER_DESCRIPTOR_SIZE
    value = int.from_bytes(CONV.encode(), "little")
    for f in descriptor_fields():
        member = layout[f.name]
        got = (value >> member.offset) & ((1 << f.metadata["bits"]) - 1)
        assert got == getattr(CONV, f.name), f.name
    view = data.View(layout, Const(value, layout.size))
    assert view.kernel.shape().width == 8 and view.pool.shape().width == 1


def test_fields_are_range_checked_and_it_is_a_mapping():
    with pytest.raises(ValueError, match=r"kernel must be an integer in 0 … 255, not 256"):
        CONV.replace(kernel=256)
    with pytest.raises(ValueError, match=r"input_base must be an integer in 0 … 4294967295"):
        CONV.replace(input_base=-1)
    assert CONV["kernel"] == 3 and "reserved" not in dict(CONV)
    base = {f.name for f in descriptor_fields()} - {"reserved"}
    assert dict(CONV) == {k: v for k, v in CONV.as_dict().items() if k in base}
    assert CONV == dict(CONV) and CONV != {**dict(CONV), "kernel": 1}
    assert LayerDescriptor(**dict(CONV)) == CONV


@pytest.mark.parametrize(("size", "kernel", "stride", "padding", "out"), [
    (16, 3, 1, 1, 16), (16, 3, 2, 1, 8), (15, 3, 2, 1, 8), (16, 2, 2, 0, 8), (5, 3, 2, 0, 2),
    (3, 3, 1, 0, 1)])
def test_output_size(size, kernel, stride, padding, out):
    assert output_size(size, kernel, stride, padding) == out


def test_problems_name_the_field_the_limit_and_the_value():
    c = load_config("ulx3s")
    assert CONV.problems(c) == [] and CONV.refusal(c) is None
    wide = CONV.replace(channels=c.max_channels + 1)
    [problem] = [p for p in wide.problems(c) if p.field == "channels"]
    assert (problem.limit, problem.value, problem.code) == (
        f"max_channels = {c.max_channels}", c.max_channels + 1, "LAYER_DOES_NOT_FIT")
    assert str(problem) == f"channels {c.max_channels + 1} exceeds max_channels " \
                           f"({c.max_channels})"
    misfit = CONV.replace(out_h=9)
    assert misfit.refusal(c) == "BAD_ARGUMENT"
    assert any("does not match a 3×3 / 2 window over 16 (padding 1): it is 8" in str(p)
               for p in misfit.problems(c))
    # a map past the end of its bank from its base is the host's finding (no code)
    late = CONV.replace(output_base=c.activation_depth - 1)
    assert late.refusal(c) is None
    [host] = [p for p in late.problems(c) if p.code is None]
    assert host.field == "output_base" and "activation_depth is" in host.message


def _device_decision(c, d: dict) -> str | None:
    """CONFIGURE_LAYER's decision as docs/protocol.md states it, written independently of
    LayerDescriptor (the emulator's rule before the descriptor existed)."""
    pool, depth, pk = d["pool"], c.activation_depth, max(3, c.max_kernel)
    zero = any(d[n] == 0 for n in ("in_h", "in_w", "channels", "out_h", "out_w",
                                   "out_channels", "kernel", "stride"))
    if pool:
        bad_flags = (d["pad_bit"] or d["raw"] or d["weight_base"] or d["threshold_base"]
                     or d["out_channels"] != d["channels"])
        too_big = d["kernel"] > pk or d["stride"] > pk or d["padding"] != 0
    else:
        bad_flags = d["raw"]
        too_big = (d["kernel"] > c.max_kernel or d["stride"] > c.max_stride
                   or d["padding"] > c.max_kernel - 1 or d["out_channels"] > c.max_channels
                   or d["weight_base"] >= c.weight_depth
                   or d["threshold_base"] >= c.threshold_depth)
    too_big = too_big or (d["channels"] > c.max_channels
                          or max(d["in_h"], d["in_w"], d["out_h"], d["out_w"]) > depth
                          or d["input_base"] >= depth or d["output_base"] >= depth
                          or d["in_h"] * d["in_w"] > depth or d["out_h"] * d["out_w"] > depth)
    geometry = True
    pad = 0 if pool else d["padding"]
    for size, out in ((d["in_h"], d["out_h"]), (d["in_w"], d["out_w"])):
        span, reach = size + 2 * pad, out * d["stride"]
        geometry &= reach - d["stride"] + d["kernel"] <= span < reach + d["kernel"]
    if zero or bad_flags:
        return "BAD_ARGUMENT"
    if too_big:
        return "LAYER_DOES_NOT_FIT"
    return None if geometry else "BAD_ARGUMENT"


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), preset=st.sampled_from(["tiny", "icebreaker", "ulx3s"]))
def test_refusal_is_the_device_decision(seed, preset):
    c = load_config(preset)
    rng = random.Random(seed)
    pool = rng.random() < 0.4
    k, s = rng.choice([0, 1, 2, 3, 4, 5, 8]), rng.choice([0, 1, 2, 3])
    p = 0 if pool and rng.random() < 0.8 else rng.choice([0, 1, 2, 7])
    ih, iw = rng.choice([0, 1, 3, 16, 64, 300, 2049]), rng.choice([1, 3, 16, 64, 300])
    ch = rng.choice([0, 1, 16, 64, 65, 300, 513])
    oc = ch if pool and rng.random() < 0.8 else rng.choice([0, 1, 16, 64, 65, 300, 513])

    def out(x):
        return max(0, min(output_size(x, k, s, 0 if pool else p) + rng.choice([0, 0, 1, -1]),
                          65535)) if s else 1

    def base(limit):
        return rng.choice([0, 5, limit - 1, limit, 10**6])

    d = dict(in_h=ih, in_w=iw, channels=ch, out_h=out(ih), out_w=out(iw), out_channels=oc,
             kernel=k, stride=s, padding=p, pad_bit=rng.choice([0, 0, 1]) if not pool
             else int(rng.random() < 0.05), raw=int(rng.random() < 0.05), pool=int(pool),
             input_base=base(c.activation_depth), output_base=base(c.activation_depth),
             weight_base=0 if pool and rng.random() < 0.9 else base(c.weight_depth),
             threshold_base=0 if pool and rng.random() < 0.9 else base(c.threshold_depth))
    assert LayerDescriptor(**d).refusal(c) == _device_decision(c, d)
