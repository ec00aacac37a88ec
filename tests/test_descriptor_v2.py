# amaranth: UnusedElaboratable=no
"""Contract 2: the extended layer descriptor, the config fields and the cycle model of
n-bit passes, shortcuts and repeat passes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitdet.core.config import CONTRACT_1_VALUES, AcceleratorConfig, ConfigError, load_config
from bitdet.core.cycles import layer_cycles, pass_cycles, pool_cycles, repeat_cycles
from bitdet.core.descriptor import (
    EXTENDED_DESCRIPTOR_SIZE,
    EXTENSION_SIZE,
    LAYER_DESCRIPTOR_SIZE,
    LayerDescriptor,
    descriptor_fields,
    descriptor_layout,
    extension_fields,
)
from bitdet.core.protocol import ProtocolError, decode_layer_entry, encode_layer

V2 = load_config("contract2")
CONV = LayerDescriptor.conv(in_h=9, in_w=7, channels=21, out_channels=13, kernel=3, stride=2,
                            padding=1, in_bits=3, out_bits=2, shortcut_bits=2, pad_level=5,
                            input_slot=1, output_slot=4, shortcut_slot=2, shortcut_base=40,
                            input_base=3, output_base=8, weight_base=11, threshold_base=6)


def test_extension_table_fills_its_bytes_and_leaves_the_base_alone():
    assert sum(f.metadata["bits"] for f in extension_fields()) == 8 * EXTENSION_SIZE
    assert EXTENDED_DESCRIPTOR_SIZE == LAYER_DESCRIPTOR_SIZE + EXTENSION_SIZE
    assert all(f.metadata["doc"] for f in extension_fields())
    base = [f.name for f in descriptor_fields()]
    assert not {f.name for f in extension_fields()} & set(base)
    assert descriptor_layout().size == 8 * LAYER_DESCRIPTOR_SIZE   # what the RTL reads


def test_a_default_extension_is_a_base_descriptor():
    plain = LayerDescriptor.conv(in_h=4, in_w=4, channels=3, out_channels=5, kernel=3)
    assert not plain.extended and len(plain.encode()) == LAYER_DESCRIPTOR_SIZE
    assert "in_bits" not in dict(plain)
    forced = plain.replace(extended=True)
    assert forced.extended and len(forced.encode(index=3)) == EXTENDED_DESCRIPTOR_SIZE + 1
    assert forced != plain                             # the payload size differs
    assert LayerDescriptor.decode(forced.encode()) == forced


def test_extended_round_trip_and_payload_layout():
    payload = CONV.encode()
    assert CONV.extended and len(payload) == EXTENDED_DESCRIPTOR_SIZE
    assert payload[:LAYER_DESCRIPTOR_SIZE] == CONV.replace(
        **{f.name: f.default for f in extension_fields()}).encode()[:LAYER_DESCRIPTOR_SIZE]
    ext = int.from_bytes(payload[LAYER_DESCRIPTOR_SIZE:], "little")
    # in_bits, out_bits, shortcut_bits (3 bits each), pad_level (4), repeat, three slots (4)
    assert ext & 0b111 == 3 and ext >> 3 & 0b111 == 2 and ext >> 6 & 0b111 == 2
    assert ext >> 9 & 0xF == 5 and ext >> 13 & 1 == 0
    assert (ext >> 14 & 0xF, ext >> 18 & 0xF, ext >> 22 & 0xF) == (1, 4, 2)
    assert ext >> 96 == 40                                  # shortcut_base, the last field
    assert LayerDescriptor.decode(payload) == CONV
    index, again = decode_layer_entry(encode_layer(**CONV, index=7))
    assert index == 7 and again == CONV
    with pytest.raises(ProtocolError, match=r"40 bytes, expected 32 \(or 48 extended\)"):
        LayerDescriptor.decode(bytes(40))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_extended_descriptors_round_trip(data):
    values = {f.name: data.draw(st.integers(0, (1 << f.metadata["bits"]) - 1))
              for f in (*descriptor_fields(), *extension_fields())}
    d = LayerDescriptor(**values, extended=True)
    assert LayerDescriptor.decode(d.encode()) == d


def _codes(d, config=V2):
    """The device's code per field (its earliest stage; host-only problems: None)."""
    out = {}
    for p in sorted(d.problems(config), key=lambda p: p.stage or 9):
        out.setdefault(p.field, p.code)
    return out


def test_the_contract2_descriptor_fits_the_preset():
    assert CONV.problems(V2) == [] and CONV.refusal(V2) is None
    assert CONV.threshold_rows == 4 and CONV.accumulator_max == 7 * 21 * 9


@pytest.mark.parametrize(("change", "field", "code"), [
    ({"in_bits": 0}, "in_bits", "BAD_ARGUMENT"),
    ({"out_bits": 5}, "out_bits", "BAD_ARGUMENT"),
    ({"shortcut_bits": 7}, "shortcut_bits", "BAD_ARGUMENT"),
    ({"ext_reserved": 1}, "ext_reserved", "BAD_ARGUMENT"),
    ({"pad_bit": 1}, "pad_bit", "BAD_ARGUMENT"),
    ({"pad_level": 8}, "pad_level", "BAD_ARGUMENT"),
    ({"output_slot": 1}, "output_slot", "BAD_ARGUMENT"),       # = input_slot
    ({"output_slot": 2}, "output_slot", "BAD_ARGUMENT"),       # = shortcut_slot
    ({"shortcut_bits": 0}, "shortcut_slot", "BAD_ARGUMENT"),   # slot/base left set
    ({"output_slot": 6}, "output_slot", "LAYER_DOES_NOT_FIT"),
    ({"shortcut_slot": 9}, "shortcut_slot", "LAYER_DOES_NOT_FIT"),
    ({"shortcut_base": 4096}, "shortcut_base", "LAYER_DOES_NOT_FIT"),
])
def test_extension_problems_name_the_field_with_the_device_code(change, field, code):
    assert _codes(CONV.replace(**change)).get(field) == code


def test_bits_beyond_the_build_do_not_fit():
    small = AcceleratorConfig(contract=2, max_input_bits=2, max_shortcut_bits=1,
                              activation_slots=3, output_bits=2)
    d = CONV.replace(output_slot=0, input_slot=1, shortcut_slot=2)
    found = {p.field: p for p in d.problems(small)}
    assert found["in_bits"].code == "LAYER_DOES_NOT_FIT"
    assert found["in_bits"].limit == "max_input_bits = 2" and found["in_bits"].value == 3
    assert found["shortcut_bits"].limit == "max_shortcut_bits = 1"
    assert "out_bits" not in found                           # 2 ≤ output_bits 2
    wider = {p.field: p for p in d.replace(out_bits=3).problems(small)}
    assert wider["out_bits"].limit == "output_bits = 2"
    assert d.replace(out_bits=3).refusal(small) == "LAYER_DOES_NOT_FIT"
    assert d.replace(out_bits=3, pad_level=8).refusal(small) == "BAD_ARGUMENT"   # stage 1


def test_pool_and_repeat_passes_keep_their_levels():
    pool = LayerDescriptor.pool_pass(in_h=8, in_w=8, channels=5, kernel=2, in_bits=3,
                                     out_bits=3, input_slot=0, output_slot=1)
    assert pool.extended and pool.kind == "pool" and pool.problems(V2) == []
    assert _codes(pool.replace(out_bits=1))["out_bits"] == "BAD_ARGUMENT"
    assert _codes(pool.replace(shortcut_bits=1, shortcut_slot=2))["shortcut_bits"] \
        == "BAD_ARGUMENT"
    assert _codes(pool.replace(repeat=1))["repeat"] == "BAD_ARGUMENT"
    rep = LayerDescriptor.repeat_pass(h=4, w=6, channels=5, out_channels=12, bits=2,
                                      input_slot=3, output_slot=0)
    assert rep.kind == "repeat" and rep.out_shape == (12, 4, 6) and rep.problems(V2) == []
    assert _codes(rep.replace(kernel=3))["kernel"] == "BAD_ARGUMENT"
    assert _codes(rep.replace(weight_base=1))["weight_base"] == "BAD_ARGUMENT"
    assert _codes(rep.replace(out_channels=600))["out_channels"] == "LAYER_DOES_NOT_FIT"


def test_planes_count_in_the_memory_spans():
    d = CONV.replace(input_base=0, output_base=0, shortcut_base=0)
    plane = d.map_words(V2.simd)                          # 13 channels → 1 word · 5×4 px
    assert plane == 5 * 4
    top = V2.activation_depth - 2 * plane              # the shortcut's 2 planes just fit
    assert "shortcut_base" not in _codes(d.replace(shortcut_base=top))
    found = {p.field: p for p in d.replace(shortcut_base=top + 1).problems(V2)}
    assert found["shortcut_base"].code is None and "shortcut map" in found["shortcut_base"].message
    in_plane = d.map_words(V2.simd, output=False)
    found = {p.field: p for p in d.replace(input_base=V2.activation_depth - 3 * in_plane + 1)
             .problems(V2)}
    assert "input_base" in found
    rows = d.threshold_rows * -(-d.out_channels // V2.cols)
    assert "threshold_base" not in _codes(d.replace(threshold_base=V2.threshold_depth - rows))
    assert "threshold_base" in _codes(d.replace(threshold_base=V2.threshold_depth - rows + 1))


def test_the_accumulator_must_hold_a():
    config = AcceleratorConfig(contract=2, max_input_bits=4, acc_width=None, max_channels=64,
                               output_bits=2)
    assert config.acc_width == (15 * config.max_k).bit_length()
    with pytest.raises(ConfigError, match="cannot hold the accumulator"):
        AcceleratorConfig(contract=2, max_input_bits=4, acc_width=10, max_channels=64)


@pytest.mark.parametrize(("fields", "message"), [
    ({"max_input_bits": 2}, "max_input_bits 2 needs contract 2"),
    ({"max_shortcut_bits": 1}, "max_shortcut_bits 1 needs contract 2"),
    ({"activation_slots": 3}, "activation_slots 3 needs contract 2"),
    ({"contract": 3}, "contract must be at most 2"),
    ({"contract": 2, "activation_slots": 1}, "activation_slots must be at least 2"),
    ({"contract": 2, "max_input_bits": 5}, "max_input_bits must be at most 4"),
    ({"contract": 2, "max_shortcut_bits": -1}, "max_shortcut_bits must be at least 0"),
    ({"contract": 2, "activation_slots": 17}, "activation_slots must be at most 16"),
])
def test_contract_fields_are_validated_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        AcceleratorConfig(**fields)


def test_contract_1_configs_keep_their_hash():
    """The shipped bitstreams identify with the hash their manifests record."""
    for preset in ("icebreaker", "ulx3s", "tiny"):
        config = load_config(preset)
        old = {k: v for k, v in config.to_dict().items() if k not in CONTRACT_1_VALUES}
        import hashlib
        digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        assert config.config_hash() == digest
    assert V2.config_hash() != AcceleratorConfig.from_dict(
        {**V2.to_dict(), "activation_slots": 5}).config_hash()
    assert V2.memory_bits()["activations"] == 6 * V2.activation_depth * V2.simd


def test_contract_2_has_rtl_but_no_board_build():
    pytest.importorskip("amaranth")
    from bitdet.hw.build import plan_board_build
    from bitdet.hw.top import CommandExecutor
    assert CommandExecutor(V2).config is V2          # the contract-2 executor builds
    with pytest.raises(ConfigError, match="board builds implement contract 1"):
        plan_board_build(V2, "ulx3s")


# -- cycle model ---------------------------------------------------------------------------

def test_contract_2_cycles_reduce_to_contract_1():
    config = load_config("ulx3s")
    for d in (CONV.replace(in_bits=1, out_bits=1, shortcut_bits=0, shortcut_slot=0,
                           shortcut_base=0, pad_level=0),):
        plain = {k: v for k, v in d.items() if k in dict(
            LayerDescriptor.conv(in_h=1, in_w=1, channels=1, out_channels=1, kernel=1))}
        assert layer_cycles(config, d) == layer_cycles(config, plain)


@pytest.mark.parametrize("in_bits", [1, 2, 3, 4])
@pytest.mark.parametrize(("out_bits", "shortcut_bits"), [(1, 0), (2, 0), (1, 2), (4, 4)])
def test_n_bit_conv_cycles(in_bits, out_bits, shortcut_bits):
    config = load_config("contract2")
    rows, cols = config.rows, config.cols
    d = CONV.replace(in_bits=in_bits, out_bits=out_bits, shortcut_bits=shortcut_bits,
                     shortcut_slot=2 if shortcut_bits else 0,
                     shortcut_base=40 if shortcut_bits else 0, pad_level=0)
    k_words = in_bits * 9 * 1                         # 21 channels: one 64-bit word per tap
    groups, tiles = -(-5 * 4 // rows), -(-13 // cols)
    writes = rows * out_bits
    load = max(2 ** shortcut_bits, rows * shortcut_bits)   # the job context's reads
    job = max(k_words, cols, writes, load + 2)
    group = max(tiles * job, rows + 4)
    busy = (k_words + (groups - 1) * group + (tiles - 1) * job + 2 * rows + 2 * cols + 13
            + writes + load + 4)
    assert layer_cycles(config, d) == (busy, busy - groups * tiles * k_words)
    assert pass_cycles(config, d) == layer_cycles(config, d)


def test_pool_and_repeat_cycles_count_planes():
    config = load_config("contract2")
    pool = LayerDescriptor.pool_pass(in_h=8, in_w=8, channels=70, kernel=2, in_bits=3,
                                     out_bits=3, output_slot=1)
    assert pool_cycles(config, pool) == (3 * 4 * 4 * 2 * 4 + 4, 4)
    assert pass_cycles(config, pool) == pool_cycles(config, pool)
    rep = LayerDescriptor.repeat_pass(h=3, w=5, channels=70, out_channels=140, bits=2,
                                      output_slot=1)
    assert repeat_cycles(config, rep) == (2 * 15 * (2 + 3) + 4, 4)
    assert pass_cycles(config, rep) == repeat_cycles(config, rep)
    with pytest.raises(ValueError, match="in_bits must be an integer"):
        layer_cycles(config, dict(CONV, in_bits=0))
