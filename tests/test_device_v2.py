"""The host driver on a contract-2 build (n-bit maps, shortcuts, map slots; the emulator).

Planner (:func:`bitdet.sw.driver.planner.plan_graph`): every map gets a slot that no pass
writes between its maker and its last reader (a long shortcut keeps its source alive), the
map the host reads survives the run, and a bundle that does not fit (slots, bits, a map
beyond a slot, memories, the layer table) is refused by name before anything is sent.
Device: a chain (the shipped detector) on ``contract2`` gives the detections, maps and
cycles of the contract-1 ``ulx3s`` run; random graphs read back at every node equal
:meth:`bitdet.core.bundle.Bundle.run_graph`; a v2 detector's ``detect`` equals its golden
forward pass; ``bitdet hw info`` prints the slot plan and ``bitdet detect --config
contract2`` runs a v2 bundle.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_bundle import random_pm1
from test_bundle_v2 import graph_bundle, table

from bitdet.core.bundle import Bundle, HostLayer
from bitdet.core.bundle import load as load_bundle
from bitdet.core.config import load_config
from bitdet.core.descriptor import EXTENDED_DESCRIPTOR_SIZE, LayerDescriptor
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, GraphNode, PoolPass
from bitdet.core.protocol import Opcode
from bitdet.sw.cli import main
from bitdet.sw.demo import build_demo_v2
from bitdet.sw.detection import decode
from bitdet.sw.device import BundleDoesNotFit, Device, EmuLink, plan_graph, plan_problems
from bitdet.sw.emulator import Emulator
from bitdet.sw.evaluate import bundle_decode_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "sw" / "assets" / "default.bitdet"
SAMPLE = ROOT / "sw" / "assets" / "sample.png"


def contract2(**fields):
    """The ``contract2`` preset, changed (another build: another config hash)."""
    config = load_config("contract2")
    return dataclasses.replace(config, name="contract2-test", **fields) if fields else config


#: A small contract-2 build: more tiles and channel padding than the preset's.
SMALL = dict(rows=2, cols=4, simd=32, weight_depth=2048, threshold_depth=1024,
             activation_depth=1024, max_channels=128)


class RecordingLink(EmuLink):
    """Remembers every command frame written: ``(opcode, payload)``."""

    def __init__(self, emulator):
        super().__init__(emulator)
        self.commands = []

    def write(self, data):
        from bitdet.core.protocol import FrameParser
        self.commands += [(f.opcode, f.payload)
                          for f in FrameParser(payload_limits=None).feed(bytes(data))]
        super().write(data)


def conv(gen, o, c, *, k=3, stride=1, padding=1, in_bits=1, out_bits=1, shortcut_bits=0,
         pad_level=None, pool=None, raw=False) -> BinaryConvLayer:
    amax = ((1 << in_bits) - 1) * c * k * k
    rows = 1 << shortcut_bits if shortcut_bits else None
    return BinaryConvLayer(random_pm1(gen, o, c, k, k),
                           None if raw else table(gen, o, amax, out_bits, rows=rows),
                           stride=stride, padding=padding, in_bits=in_bits,
                           pad_value=1 if in_bits == 1 and pad_level else -1,
                           pad_level=pad_level, shortcut_bits=shortcut_bits, pool=pool)


def long_shortcut_bundle(seed=0) -> Bundle:
    """input → a → b → c → d (shortcut a): ``a`` stays live over b and c."""
    gen = torch.Generator().manual_seed(seed)
    nodes = [GraphNode("a", conv(gen, 8, 4, out_bits=2)),
             GraphNode("b", conv(gen, 8, 8, in_bits=2), "a"),
             GraphNode("c", conv(gen, 8, 8), "b"),
             GraphNode("d", conv(gen, 8, 8, shortcut_bits=2), "c", shortcut="a")]
    return Bundle(binary_layers=[], input_shape=(4, 6, 6), graph=nodes)


def assert_slots_hold(graph) -> None:
    """No pass writes a map's slot between its maker and its last reader; every
    descriptor names the slots of the maps it reads and writes."""
    passes, maps = graph.passes, graph.maps
    for m in maps.values():
        assert 0 <= m.slot < graph.slots
        for j in range(m.born + 1, min(m.last, len(passes) - 1) + 1):
            assert maps[passes[j].writes].slot != m.slot, (m.name, passes[j].name)
    for entry in passes:
        d = entry.descriptor
        assert d["extended"] and d["input_slot"] == maps[entry.reads[0]].slot
        assert d["output_slot"] == maps[entry.writes].slot
        if len(entry.reads) > 1:
            assert d["shortcut_slot"] == maps[entry.reads[1]].slot
    assert maps[graph.host_map].last == len(passes)


# --------------------------------------------------------------------------- planning


def test_a_long_shortcut_keeps_its_source_alive():
    bundle = long_shortcut_bundle()
    graph = plan_graph(contract2(), bundle)
    assert [p.name for p in graph.passes] == ["a", "b", "c", "d"]
    slots = {name: m.slot for name, m in graph.maps.items()}
    assert slots == {"input": 0, "a": 1, "b": 0, "c": 2, "d": 0}
    assert (graph.maps["a"].born, graph.maps["a"].last) == (0, 3)
    assert graph.slots_used == 3 and graph.host_map == "d" and graph.host_layer is None
    d = graph.passes[3].descriptor
    assert (d["input_slot"], d["shortcut_slot"], d["output_slot"]) == (2, 1, 0)
    assert (d["in_bits"], d["out_bits"], d["shortcut_bits"]) == (1, 1, 2)
    assert_slots_hold(graph)
    # weights and thresholds resident one after the other; 2**shortcut_bits rows per tile
    bases = [(p.descriptor["weight_base"], p.descriptor["threshold_base"])
             for p in graph.passes]
    assert bases == [(0, 0), (9, 1), (18, 2), (27, 3)]
    assert graph.passes[3].threshold_entries == 4
    assert plan_problems(contract2(), bundle) == []
    for entry in graph.passes:                    # every descriptor is one the device takes
        desc = LayerDescriptor(**entry.descriptor)
        assert len(desc.encode(0)) == EXTENDED_DESCRIPTOR_SIZE + 1
        assert desc.refusal(contract2()) is None


def test_shipped_graphs_and_chains_plan_into_valid_slots():
    config = contract2()
    chain = load_bundle(DEFAULT_BUNDLE)
    graph = plan_graph(config, chain)
    assert [p.kind for p in graph.passes] == ["conv", "pool", "conv", "pool", "conv", "conv"]
    assert graph.slots_used == 2                  # a chain ping-pongs between two slots
    assert_slots_hold(graph)
    demo = plan_graph(config, build_demo_v2()[1])
    assert_slots_hold(demo)
    assert demo.slots_used == 4
    assert [p.kind for p in demo.passes].count("repeat") == 2
    raw = plan_graph(config, graph_bundle())
    assert raw.host_layer == "c4" and raw.host_map == "c3"
    assert [p.node for p in raw.passes] == ["c1", "c2", "down", "rep", "c3"]
    assert_slots_hold(raw)
    assert raw.maps["c2"].last == 4               # read by down and, later, by c3


def test_a_map_read_with_more_planes_is_stored_with_them():
    """A 1-bit map read by a conv with in_bits 2 (or as a 3-bit shortcut) is stored with
    the planes its readers read: its maker writes them (out_bits; the thresholds beyond
    its own "never"), a pool pass in between passes them on."""
    gen = torch.Generator().manual_seed(3)
    a = conv(gen, 8, 4)
    b = conv(gen, 8, 8, in_bits=2, pad_level=3)
    c = conv(gen, 8, 8, shortcut_bits=3)
    direct = Bundle(binary_layers=[], input_shape=(4, 8, 8), graph=[
        GraphNode("a", a), GraphNode("b", b, "a"), GraphNode("c", c, "b", shortcut="b")])
    graph = plan_graph(contract2(), direct)
    assert (graph.maps["a"].level_bits, graph.maps["a"].bits) == (1, 2)
    assert graph.passes[0].descriptor["out_bits"] == 2
    assert (graph.maps["b"].level_bits, graph.maps["b"].bits) == (1, 3)
    assert graph.passes[1].descriptor["out_bits"] == 3
    pooled = Bundle(binary_layers=[], input_shape=(4, 8, 8), graph=[
        GraphNode("a", a), GraphNode("p", PoolPass(2), "a"), GraphNode("b", b, "p")])
    graph = plan_graph(contract2(), pooled)
    assert [graph.maps[name].bits for name in ("a", "p")] == [2, 2]
    assert graph.passes[1].descriptor["in_bits"] == graph.passes[1].descriptor["out_bits"] == 2
    message = [str(p) for p in plan_problems(contract2(output_bits=2), direct)]
    assert message == ["layer 'b' writes 3-bit maps (1 bits of its own, stored as the 3 "
                       "planes its readers read), output_bits is 2"]


def test_too_few_slots_is_refused_naming_the_node_before_sending():
    config = contract2(activation_slots=2)
    bundle = long_shortcut_bundle()
    problems = plan_problems(config, bundle)
    assert len(problems) == 1
    assert problems[0].field == "activation_slots" and problems[0].value == 3
    assert str(problems[0]) == ("layer 'c' needs a map slot more than the 2 of "
                                "activation_slots: 3 maps are live at once there ('a', 'b', "
                                "'c')")
    with Device.open("emu", config) as device:
        sent = device.bytes_out
        with pytest.raises(BundleDoesNotFit, match="layer 'c' needs a map slot"):
            device.load(bundle)
        assert device.bytes_out == sent


def test_bits_beyond_the_build_are_refused_by_node():
    config = contract2(max_input_bits=1, output_bits=1, max_shortcut_bits=1)
    messages = [str(p) for p in plan_problems(config, graph_bundle())]
    assert "layer 'c1' reads 2-bit maps, max_input_bits is 1" in messages
    assert "layer 'c1' writes 2-bit maps, output_bits is 1" in messages
    assert "layer 'c2' adds a 2-bit shortcut from 'c1', max_shortcut_bits is 1" in messages
    assert not any("'rep'" in m for m in messages)          # a 1-bit repeat fits
    assert not any("c4" in m for m in messages)             # the host runs the raw c4
    problems = plan_problems(config, graph_bundle())
    assert {p.field for p in problems} == {"in_bits", "out_bits", "shortcut_bits"}


def test_maps_memories_and_the_layer_table_are_checked():
    bundle = graph_bundle()
    messages = [str(p) for p in plan_problems(contract2(activation_depth=100), bundle)]
    assert ("the input map (2 planes of 6×8×8) needs 128 words, a slot's activation_depth "
            "is 100") in messages
    assert "node 'c1''s map (2 planes of 8×8×8) needs 128 words, a slot's activation_depth " \
        "is 100" in messages
    messages = [str(p) for p in plan_problems(contract2(), bundle, weight_depth=20,
                                              threshold_depth=8)]
    assert messages == [
        "resident weights need 36 words per column, the plan may use 20 of weight_depth "
        "4096 (a contract-2 build keeps every layer resident)",
        "resident thresholds need 9 entries per column, the plan may use 8 of "
        "threshold_depth 4096 (a contract-2 build keeps every layer resident)"]
    assert [p.field for p in plan_problems(contract2(), bundle, mode="streamed")] == ["mode"]
    gen = torch.Generator().manual_seed(0)
    nodes = [GraphNode("c0", conv(gen, 4, 4))]
    nodes += [GraphNode(f"c{i}", conv(gen, 4, 4), f"c{i - 1}") for i in range(1, 17)]
    long = Bundle(binary_layers=[], input_shape=(4, 4, 4), graph=nodes)
    assert [str(p) for p in plan_problems(contract2(), long)] == [
        "the network needs 17 device passes (convs, pools, repeats), the layer table holds 16"]
    gen = torch.Generator().manual_seed(0)
    wide = Bundle(binary_layers=[], input_shape=(4, 6, 6), graph=[
        GraphNode("w", conv(gen, 8, 4)), GraphNode("big", conv(gen, 8, 8, k=5, padding=2), "w"),
        GraphNode("down", PoolPass(5, 1), "big")])
    assert [str(p) for p in plan_problems(contract2(), wide)] == WIDE_PROBLEMS


WIDE_PROBLEMS = ["layer 'big': kernel 5 exceeds max_kernel (3)",
                 "node 'down' (pool pass): kernel 5 exceeds the pool engine's largest kernel "
                 "(3)"]


# --------------------------------------------------------------------------- end to end

@functools.lru_cache(maxsize=1)
def _ulx3s_run(trace):
    with Device.open("emu", "ulx3s") as device:
        device.load(load_bundle(DEFAULT_BUNDLE))
        return device.detect(SAMPLE, trace=trace, score_threshold=0.05)


@pytest.mark.parametrize("trace", [False, True])
def test_the_shipped_chain_on_contract2_equals_contract1(trace):
    expected = _ulx3s_run(trace)
    config = contract2()
    link = RecordingLink(Emulator(config))
    with Device(link, config) as device:
        plan = device.load(load_bundle(DEFAULT_BUNDLE))
        configure = [p for op, p in link.commands if op == Opcode.CONFIGURE_LAYER]
        assert [len(p) for p in configure] == [EXTENDED_DESCRIPTOR_SIZE + 1] * len(plan)
        link.commands.clear()
        result = device.detect(SAMPLE, trace=trace, score_threshold=0.05)
    ops = [op for op, _ in link.commands]
    assert ops.count(Opcode.RUN_NETWORK) == (0 if trace else 1)
    assert ops.count(Opcode.RUN_LAYER) == (len(plan) if trace else 0)
    for key in ("boxes", "scores", "labels", "head"):
        assert torch.equal(result[key], expected[key]), key
    assert len(result["maps"]) == len(expected["maps"]) == (4 if trace else 1)
    for mine, theirs in zip(result["maps"], expected["maps"], strict=True):
        assert torch.equal(mine, theirs)
    for key in ("name", "kind"):
        assert [x[key] for x in result["stats"].layers] == \
            [x[key] for x in expected["stats"].layers]
    # the same array: the same cycles, but for the contract-2 controller's preload of the
    # first job's context (a 1-bit layer without shortcut: one threshold read, 1 + 4
    # cycles, docs/hardware.md)
    for mine, theirs in zip(result["stats"].layers, expected["stats"].layers, strict=True):
        extra = 5 if mine["kind"] == "conv" else 0
        assert (mine["busy"], mine["stall"]) == (theirs["busy"] + extra,
                                                 theirs["stall"] + extra), mine["name"]


def test_a_chain_with_a_raw_last_layer_on_contract2_equals_contract1():
    """A format-1 chain whose last layer outputs raw P: on contract 2 the host runs it from
    the map it reads, as on contract 1 (the ``tiny`` preset)."""
    from bitdet.sw.models import BinaryDetector
    torch.manual_seed(3)
    model = BinaryDetector(widths=(8, 16, 16), pools=(True, False), image_size=32,
                           raw_last=True)
    bundle = model.eval().export_bundle()
    assert not bundle.uses_v2() and bundle.binary_layers[-1].thresholds is None
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    with Device.open("emu", "tiny") as one, Device.open("emu", contract2(**SMALL)) as two:
        one.load(bundle)
        assert [p.kind for p in two.load(bundle)] == ["conv", "pool"]
        assert two.graph_plan.host_layer == bundle.layer_names[-1]
        for trace in (False, True):
            a = one.detect(image, trace=trace, score_threshold=0.0)
            b = two.detect(image, trace=trace, score_threshold=0.0)
            for key in ("boxes", "scores", "labels", "head"):
                assert torch.equal(a[key], b[key]), key
            assert len(a["maps"]) == len(b["maps"])
            for x, y in zip(a["maps"], b["maps"], strict=True):
                assert torch.equal(x, y)


def random_graph(seed: int) -> Bundle:
    """A random valid graph: convs (n-bit levels, strides, pools, shortcuts from any
    earlier map of the right shape), pool passes and channel repeats; for an even seed a
    raw 1×1 conv last."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    input_bits = rnd.randint(1, 3)
    channels = rnd.choice([3, 5, 33, 40])
    maps = {"input": (channels, 8, 8, input_bits)}
    nodes = []
    for i in range(rnd.randint(4, 8)):
        name = f"n{i}"
        source = rnd.choice(list(maps))
        c, h, w, bits = maps[source]
        kind = rnd.choices(["conv", "pool", "repeat"], [6, 1, 1])[0]
        if kind == "pool" and min(h, w) >= 2:
            nodes.append(GraphNode(name, PoolPass(2), source))
            maps[name] = (c, h // 2, w // 2, bits)
            continue
        if kind == "repeat" and c <= 40:
            nodes.append(GraphNode(name, ChannelRepeat(2 * c), source))
            maps[name] = (2 * c, h, w, bits)
            continue
        k = rnd.choice([1, 3])
        stride = rnd.choice([1, 2]) if min(h, w) >= 2 else 1
        padding = rnd.randint(0, 1) if k == 3 else 0
        oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
        if min(oh, ow) < 1:
            continue
        shortcuts = [m for m, (sc, sh, sw, _b) in maps.items() if (sh, sw) == (oh, ow)]
        shortcut = rnd.choice(shortcuts) if shortcuts and rnd.random() < 0.6 else None
        o = maps[shortcut][0] if shortcut else rnd.choice([4, 8, 12, 36])
        in_bits = rnd.randint(bits, 3)
        layer = conv(gen, o, c, k=k, stride=stride, padding=padding, in_bits=in_bits,
                     out_bits=rnd.randint(1, 3), pad_level=rnd.randint(0, (1 << in_bits) - 1),
                     shortcut_bits=rnd.randint(maps[shortcut][3], 3) if shortcut else 0,
                     pool=(2, 2) if min(oh, ow) >= 2 and rnd.random() < 0.3 else None)
        nodes.append(GraphNode(name, layer, source, shortcut=shortcut))
        pooled = (oh // 2, ow // 2) if layer.pool else (oh, ow)
        maps[name] = (o, *pooled, layer.output_bits)
    if seed % 2 == 0:                            # a raw last conv, run on the host
        c, _h, _w, bits = maps[nodes[-1].name]
        nodes.append(GraphNode("raw", conv(gen, 6, c, k=1, padding=0, raw=True,
                                           in_bits=max(bits, rnd.randint(1, 3))),
                               nodes[-1].name))
    bundle = Bundle(binary_layers=[], input_shape=(channels, 8, 8), graph=nodes,
                    input_bits=input_bits)
    bundle.validate()
    return bundle


@pytest.mark.parametrize("preset", ["contract2", "small"])
def test_random_graphs_equal_the_golden_model_at_every_node(preset):
    config = contract2(**SMALL) if preset == "small" else contract2()
    raw = 0
    with Device.open("emu", config) as device:
        for seed in range(6):
            bundle = random_graph(seed + (100 if preset == "small" else 0))
            assert plan_problems(config, bundle) == [], seed
            device.load(bundle)
            assert_slots_hold(device.graph_plan)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randint(0, 1 << bundle.input_bits, (1, *bundle.input_shape),
                              generator=gen, dtype=torch.int32)
            expected = bundle.run_graph(x)
            traced = device.run_graph(x, trace=True)
            nodes = device.graph_plan.node_maps()
            assert set(nodes) <= set(traced)
            for name in nodes:
                assert torch.equal(traced[name], expected[name]), (seed, name)
            host = device.graph_plan.host_map
            fast = device.run_graph(x)                 # one RUN_NETWORK, cycles checked
            assert list(fast) == [host]
            assert torch.equal(fast[host], expected.get(host, x))
            if device.graph_plan.host_layer is not None:
                raw += 1
                tail = device.run_host_tail(fast[host])
                assert torch.equal(tail, expected[device.graph_plan.host_layer])
            maps = device.run_binary(x, trace=True)
            assert len(maps) == len(nodes)
    assert raw                                         # a raw last conv ran on the host


def v2_detector(raw_last: bool, seed: int = 0) -> Bundle:
    """A contract-v2 detector: a 2-bit stem, the graph of :func:`graph_bundle` (its last
    conv raw or thresholded) and a head of 5 + 2 channels."""
    rng = np.random.default_rng(seed)
    graph = graph_bundle(seed, raw_last=raw_last)
    stem = HostLayer("stem", "conv_threshold", {
        "weight": rng.integers(-60, 60, (6, 1, 3, 3), dtype=np.int8),
        "thresholds": np.sort(rng.integers(-3000, 3000, (6, 3), dtype=np.int32), axis=1),
        "sign": rng.choice([-1, 1], 6).astype(np.int8)},
        stride=2, padding=1, attrs={"zero_point": 128})
    head = HostLayer("head", "conv_affine", {
        "weight": rng.integers(-128, 128, (7, 5, 1, 1), dtype=np.int8),
        "bias": rng.integers(-999, 999, 7, dtype=np.int32),
        "scale": (rng.random(7, dtype=np.float32) * 0.02).astype(np.float32)})
    return Bundle(binary_layers=[], input_shape=graph.input_shape, host_layers=[stem, head],
                  model={"name": "v2 detector", "input": [1, 16, 16], "grid_stride": 4,
                         "classes": ["a", "b"]}, graph=graph.graph, input_bits=2)


@pytest.mark.parametrize("raw_last", [True, False])
def test_a_v2_detector_detects_like_its_golden_forward_pass(raw_last):
    bundle = v2_detector(raw_last)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    pixels = torch.from_numpy(image[None, None].astype(np.int64))
    head = bundle.forward(pixels)
    found = decode(head, **{**bundle_decode_settings(bundle), "score_threshold": 0.0})[0]
    expected = bundle.run_graph(bundle.stem(pixels).to(torch.int32))
    with Device.open("emu", "contract2") as device:
        device.load(bundle)
        for trace in (False, True):
            result = device.detect(image, trace=trace, score_threshold=0.0)
            assert torch.equal(result["head"], head)
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(result[key], found[key])
            names = [n.name for n in bundle.nodes()] if trace else [bundle.nodes()[-1].name]
            assert len(result["maps"]) == len(names)
            for name, got in zip(names, result["maps"], strict=True):
                assert torch.equal(got, expected[name]), name
        assert len(result["boxes"]) > 0


def test_cli_hw_info_prints_the_slot_plan(tmp_path, capsys):
    path = graph_bundle().save(tmp_path / "graph.bitdet")
    assert main(["hw", "info", "--config", "contract2", "--bundle", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path} fits: 5 device passes in 3 of 6 map slots, every layer resident" in out
    assert "slot 1 → 0, shortcut 1" in out and "bits 2 → 1, shortcut 2" in out
    assert "its raw last layer 'c4' runs on the host from 'c3'" in out
    assert main(["hw", "info", "--json", "--config", "contract2", "--bundle",
                 str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    plan = info["slot_plan"]
    assert info["bundle_fits"] and plan["slots_used"] == 3 and plan["activation_slots"] == 6
    assert [p["kind"] for p in plan["passes"]] == ["conv", "conv", "pool", "repeat", "conv"]
    assert plan["passes"][1]["shortcut_slot"] == 1 and plan["passes"][0]["shortcut_slot"] is None
    small = tmp_path / "two-slots.yaml"
    small.write_text(yaml.safe_dump({**contract2().to_dict(), "name": "two-slots",
                                     "activation_slots": 2}))
    long = long_shortcut_bundle().save(tmp_path / "long.bitdet")
    assert main(["hw", "info", "--config", str(small), "--bundle", str(long)]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit:" in out and "layer 'c' needs a map slot more than the 2" in out


def test_cli_detect_runs_a_v2_bundle_on_contract2(tmp_path, capsys):
    path = v2_detector(True).save(tmp_path / "v2.bitdet")
    image = tmp_path / "noise.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
                    ).save(image)
    status = main(["detect", str(image), "--bundle", str(path), "--backend", "emu",
                   "--config", "contract2", "--out", str(tmp_path / "out"), "--json",
                   "--score-threshold", "0"])
    out = capsys.readouterr().out
    assert status == 0, out
    report = json.loads(out)
    assert report["config"] == "contract2"
    assert [x["name"] for x in report["device"]["layers"]] == ["c1", "c2", "down", "rep", "c3"]
    assert report["device"]["host_layers"] == ["c4"]
    assert report["images"][0]["detections"]


def test_detect_picks_the_contract2_build_for_a_v2_bundle(tmp_path, capsys):
    from bitdet.sw.detect import DEFAULT_BUNDLE, pick_config
    bundle = v2_detector(True)
    assert pick_config(bundle).name == "contract2"
    assert pick_config(load_bundle(DEFAULT_BUNDLE)).name in ("icebreaker", "ulx3s")
    path = bundle.save(tmp_path / "v2.bitdet")
    image = tmp_path / "noise.png"
    from PIL import Image
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
                    ).save(image)
    status = main(["detect", str(image), "--bundle", str(path), "--json",
                   "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(captured.out)["config"] == "contract2"
