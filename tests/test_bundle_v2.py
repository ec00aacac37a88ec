"""Bundle format version 2 (contract v2): graphs of convs, pool passes and channel
repetitions, n-bit levels, residual shortcuts with (O, R, L) tables.

A small graph (:func:`graph_bundle`) goes through save and load, runs equal to
:func:`bitdet.core.golden.run_graph`, and its manifest is edited (cycle, missing source,
bad bits, bad tables, unknown op …) and its bytes flipped: every such file must be
rejected by ``load`` with a :class:`BundleError` naming the node, or load identical. The
version 1 guarantees (the shipped bundle and chains of 1-bit layers are written exactly as
before) are checked here too.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bundle import (
    _delete,
    _edits,
    _flip_outcomes,
    _set,
    central_directory_entries,
    expect_error,
    random_pm1,
    rewrite,
)

from bitdet.core import bundle as bundle_module
from bitdet.core.bundle import (
    FORMAT_VERSION,
    GRAPH_FORMAT_VERSION,
    Bundle,
    BundleError,
    HostLayer,
    load,
)
from bitdet.core.golden import (
    BinaryConvLayer,
    ChannelRepeat,
    GraphNode,
    PoolPass,
    run_graph,
    run_network,
)
from bitdet.sw.demo import build_demo

ASSETS = Path(__file__).resolve().parent.parent / "sw" / "assets"
INPUT = (6, 8, 8)


# --------------------------------------------------------------------------- helpers


def table(gen, o: int, amax: int, bits: int, rows: int | None = None) -> torch.Tensor:
    """Sorted thresholds in [0, amax + 1]: (O, L) or (O, R, L), with constant rows."""
    shape = (o, 2 ** bits - 1) if rows is None else (o, rows, 2 ** bits - 1)
    t = torch.randint(0, amax + 2, shape, generator=gen)
    t[0] = 0
    t[-1] = amax + 1
    return t.sort(dim=-1).values


def graph_nodes(seed: int = 0, *, raw_last: bool = True) -> list[GraphNode]:
    """2-bit input 6×8×8 → c1 (2-bit) → c2 (1-bit, 2-bit shortcut c1) → down (pool) →
    rep (channel repetition) ; c3 (stride 2, 2-bit out, shortcut rep) → c4 (raw, last)."""
    gen = torch.Generator().manual_seed(seed)
    c1 = BinaryConvLayer(random_pm1(gen, 8, 6, 3, 3), table(gen, 8, 3 * 54, 2), padding=1,
                         in_bits=2, pad_level=1)
    c2 = BinaryConvLayer(random_pm1(gen, 8, 8, 3, 3), table(gen, 8, 3 * 72, 1, rows=4),
                         padding=1, in_bits=2, pad_level=0, shortcut_bits=2)
    c3 = BinaryConvLayer(random_pm1(gen, 16, 8, 3, 3), table(gen, 16, 72, 2, rows=2),
                         stride=2, padding=1, pad_value=1, shortcut_bits=1)
    last = (BinaryConvLayer(random_pm1(gen, 5, 16, 1, 1), None, in_bits=2) if raw_last else
            BinaryConvLayer(random_pm1(gen, 5, 16, 1, 1), table(gen, 5, 3 * 16, 2),
                            in_bits=2))
    return [
        GraphNode("c1", c1),
        GraphNode("c2", c2, "c1", shortcut="c1"),
        GraphNode("down", PoolPass(2), "c2"),
        GraphNode("rep", ChannelRepeat(16), "down"),
        GraphNode("c3", c3, "c2", shortcut="rep"),
        GraphNode("c4", last, "c3"),
    ]


def host_layers(seed: int = 0) -> list[HostLayer]:
    rng = np.random.default_rng(seed)
    stem_t = np.sort(rng.integers(-300, 300, (6, 3), dtype=np.int32), axis=1)
    return [
        HostLayer("stem", "conv_threshold", {
            "weight": rng.integers(-128, 128, (6, 3, 3, 3), dtype=np.int8),
            "thresholds": stem_t, "sign": rng.choice([-1, 1], 6).astype(np.int8)},
            stride=2, padding=1, attrs={"zero_point": 128}),
        HostLayer("head", "conv_affine", {
            "weight": rng.integers(-128, 128, (4, 5, 1, 1), dtype=np.int8),
            "bias": rng.integers(-999, 999, 4, dtype=np.int32),
            "scale": rng.random(4, dtype=np.float32)}),
    ]


def graph_bundle(seed: int = 0, *, raw_last: bool = True) -> Bundle:
    return Bundle(binary_layers=[], input_shape=INPUT, host_layers=host_layers(seed),
                  model={"name": "v2 graph", "grid_stride": 4},
                  graph=graph_nodes(seed, raw_last=raw_last), input_bits=2)


def levels(gen, bits: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, 2 ** bits, shape, generator=gen, dtype=torch.int32)


def assert_graphs_equal(a: Bundle, b: Bundle) -> None:
    na, nb = a.nodes(), b.nodes()
    assert [(n.name, n.input, n.shortcut) for n in na] == [(n.name, n.input, n.shortcut)
                                                            for n in nb]
    for x, y in zip(na, nb, strict=True):
        assert type(x.op) is type(y.op), x.name
        if isinstance(x.op, BinaryConvLayer):
            assert torch.equal(x.op.weights, y.op.weights), x.name
            assert (x.op.thresholds is None) == (y.op.thresholds is None), x.name
            if x.op.thresholds is not None:
                assert torch.equal(x.op.thresholds.to(torch.int64), y.op.thresholds), x.name
            for key in ("stride", "padding", "pad_value", "pool", "in_bits", "padding_level",
                        "shortcut_bits", "output_bits", "k", "accumulator_max"):
                assert getattr(x.op, key) == getattr(y.op, key), (x.name, key)
        elif isinstance(x.op, PoolPass):
            assert (x.op.kernel, x.op.stride or x.op.kernel) == (y.op.kernel,
                                                                 y.op.stride or y.op.kernel)
        else:
            assert x.op == y.op
    assert (a.input_shape, a.input_bits, a.layer_names, a.model) == (
        b.input_shape, b.input_bits, b.layer_names, b.model)
    assert [h.name for h in a.host_layers] == [h.name for h in b.host_layers]
    assert a.requirements() == b.requirements()


@pytest.fixture(scope="module")
def graph():
    return graph_bundle()


@pytest.fixture(scope="module")
def graph_file(graph, tmp_path_factory) -> Path:
    return graph.save(tmp_path_factory.mktemp("v2") / "graph.bitdet")


def manifest_of(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("manifest.json"))


# --------------------------------------------------------------------------- round trip


def test_graph_round_trip(graph, graph_file, tmp_path):
    loaded = load(graph_file)
    assert_graphs_equal(graph, loaded)
    assert loaded.graph is not None and loaded.layer_names == ["c1", "c2", "c3", "c4"]
    assert [layer.in_bits for layer in loaded.binary_layers] == [2, 2, 1, 2]
    gen = torch.Generator().manual_seed(1)
    x = levels(gen, 2, 2, *INPUT)
    for method in ("fast", "reference"):
        expected = run_graph(x, graph.graph, input_bits=2, method=method)
        got = loaded.run_binary(x, method=method)
        assert len(got) == len(expected) == 6
        for node, out in zip(loaded.graph, got, strict=True):
            assert out.dtype == expected[node.name].dtype
            assert torch.equal(out, expected[node.name]), (method, node.name)
        assert loaded.run_graph(x, method=method).keys() == expected.keys()
    # a ±1 input is a 1-bit map
    pm1 = random_pm1(gen, 1, *INPUT)
    assert torch.equal(loaded.run_binary(pm1)[-1],
                       run_graph(pm1, graph.graph)["c4"])
    # load + save gives the same bytes, and saving twice too
    again = loaded.save(tmp_path / "again.bitdet")
    assert again.read_bytes() == graph_file.read_bytes()


def test_graph_manifest(graph_file):
    manifest = manifest_of(graph_file)
    assert manifest["version"] == GRAPH_FORMAT_VERSION == 2
    assert "binary_layers" not in manifest and manifest["input_bits"] == 2
    nodes = manifest["nodes"]
    assert [(n["name"], n["op"], n["input"]) for n in nodes] == [
        ("c1", "conv", "input"), ("c2", "conv", "c1"), ("down", "pool", "c2"),
        ("rep", "repeat", "down"), ("c3", "conv", "c2"), ("c4", "conv", "c3")]
    c2 = nodes[1]
    assert (c2["shortcut"], c2["in_bits"], c2["pad_level"], c2["shortcut_bits"]) == (
        "c1", 2, 0, 2)
    assert c2["thresholds_shape"] == [8, 4, 1] and c2["accumulator_max"] == 3 * 72
    assert nodes[0]["pad_level"] == 1 and nodes[4]["pad_level"] == 1      # pad_value +1
    assert nodes[2] == {"name": "down", "op": "pool", "input": "c2", "kernel": 2, "stride": 2}
    assert nodes[3] == {"name": "rep", "op": "repeat", "input": "down", "out_channels": 16}
    assert nodes[5]["output"] == "raw" and nodes[5]["thresholds"] is None
    with zipfile.ZipFile(graph_file) as zf:
        names = zf.namelist()
    assert names[:5] == ["manifest.json", "nodes/0/weights.npy", "nodes/0/thresholds.npy",
                         "nodes/1/weights.npy", "nodes/1/thresholds.npy"]
    assert "nodes/5/thresholds.npy" not in names and "nodes/2/weights.npy" not in names


def test_graph_requirements(graph, graph_file):
    req = graph.requirements()
    assert (req.layers, req.max_input_bits, req.max_shortcut_bits, req.max_output_bits) == (
        4, 2, 2, 2)
    assert req.live_maps == 3           # c2 stays live while down → rep → c3 run
    assert req.max_pool_kernel == 2 and req.raw_output and req.format_version == 2
    assert req.node_maps == (("input", "input", 6, 8, 8, 2),
                             ("c1", "conv", 8, 8, 8, 2), ("c2", "conv", 8, 8, 8, 1),
                             ("down", "pool", 8, 4, 4, 1), ("rep", "repeat", 16, 4, 4, 1),
                             ("c3", "conv", 16, 4, 4, 2), ("c4", "conv", 5, 4, 4, None))
    assert req.layer_shapes[2] == (8, 16, 3, 3, (8, 8), (4, 4))
    assert graph.output_shape() == (5, 4, 4) and graph.output_bits() is None
    stored = manifest_of(graph_file)["requirements"]
    assert stored["live_maps"] == 3 and stored["node_maps"][6] == ["c4", "conv", 5, 4, 4, None]


def test_live_maps_of_chains_and_long_shortcuts():
    _stem, _blocks, demo = build_demo(0)
    assert demo.requirements().live_maps == 2
    gen = torch.Generator().manual_seed(0)
    conv = BinaryConvLayer(random_pm1(gen, 6, 6, 1, 1), table(gen, 6, 6, 1))
    skip = BinaryConvLayer(random_pm1(gen, 6, 6, 1, 1), table(gen, 6, 6, 1, rows=4),
                           in_bits=1, shortcut_bits=2)
    nodes = [GraphNode("a", conv), GraphNode("b", conv, "a"), GraphNode("c", conv, "b"),
             GraphNode("d", skip, "c", shortcut="input")]
    b = Bundle([], (6, 3, 3), graph=nodes, input_bits=2)
    with pytest.raises(BundleError, match=r"node 0 \('a'\): input 'input' has 2-bit levels"):
        b.validate()
    b = Bundle([], (6, 3, 3), graph=nodes)
    assert b.requirements().live_maps == 3      # the input lives until d reads it


def test_forward_head_and_stem_of_a_graph(tmp_path):
    pixels = torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(2))
    for raw_last in (True, False):
        b = load(graph_bundle(3, raw_last=raw_last).save(tmp_path / "g.bitdet"))
        stem = b.stem(pixels)
        assert int(stem.max()) <= 3 and stem.shape[1:] == INPUT
        last = run_graph(stem.to(torch.int32), b.graph, input_bits=2)["c4"]
        # n-bit levels and raw A reach the head as they are (no ±1 mapping)
        expected = b.host_layer("head").run(last.to(torch.float32))
        assert torch.equal(b.forward(pixels), expected)
        assert torch.equal(b.forward(pixels, binary=b.run_binary), expected)


def test_head_of_a_one_bit_last_node_takes_pm1():
    b = graph_bundle(raw_last=True)
    nodes = b.graph[:3]                              # … c2 → down: 1-bit levels, 8 channels
    head = HostLayer("head", "conv_affine", {"weight": np.ones((1, 8, 1, 1), np.int8),
                                             "bias": np.zeros(1, np.int32),
                                             "scale": np.ones(1, np.float32)})
    g = Bundle([], INPUT, host_layers=[head], graph=nodes, input_bits=2)
    assert g.output_bits() == 1
    ones = torch.ones(1, 8, 4, 4, dtype=torch.int32)
    assert torch.equal(g.head(ones), torch.full((1, 1, 4, 4), 8.0))


def test_a_chain_with_n_bit_layers_is_version_2(tmp_path):
    gen = torch.Generator().manual_seed(4)
    layers = [BinaryConvLayer(random_pm1(gen, 7, 6, 3, 3), table(gen, 7, 54 * 3, 2),
                              padding=1, in_bits=2, pad_level=2),
              BinaryConvLayer(random_pm1(gen, 4, 7, 1, 1), table(gen, 4, 7 * 3, 1), in_bits=2)]
    chain = Bundle(binary_layers=layers, input_shape=INPUT, layer_names=["a", "b"],
                   input_bits=2)
    assert chain.uses_v2() and chain.format_version == 2
    loaded = load(chain.save(tmp_path / "chain.bitdet"))
    assert loaded.graph is not None and [n.input for n in loaded.graph] == ["input", "a"]
    assert_graphs_equal(chain, loaded)
    x = levels(gen, 2, 2, *INPUT)
    for p, q in zip(chain.run_binary(x), loaded.run_binary(x), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(chain.run_binary(x)[-1], run_network(x, layers)[-1])


def test_graph_bundle_validation_in_memory(tmp_path):
    b = graph_bundle()
    b.binary_layers = [graph_nodes(1)[0].op, *b.binary_layers[1:]]
    with pytest.raises(BundleError, match=r"binary_layers and layer_names must be its conv"):
        b.validate()
    nodes = graph_nodes()
    nodes[4] = GraphNode("c3", nodes[4].op, "c2", shortcut="down")   # 8 channels, not 16
    bad = Bundle([], INPUT, graph=nodes, input_bits=2)
    message = r"node 4 \('c3'\): shortcut 'down' is 8×4×4 but the conv's output"
    with pytest.raises(BundleError, match=message):
        bad.save(tmp_path / "bad.bitdet")
    assert not (tmp_path / "bad.bitdet").exists()
    with pytest.raises(ValueError, match=r"node 'c3'"):            # run_graph agrees
        run_graph(torch.zeros(1, *INPUT, dtype=torch.int32), nodes, input_bits=2)
    with pytest.raises(BundleError, match=r"input_bits must be an integer in \[1, 4\]"):
        Bundle([], INPUT, graph=graph_nodes(), input_bits=5).validate()
    with pytest.raises(BundleError, match=r"at least one node"):
        Bundle([], INPUT, graph=[]).validate()
    with pytest.raises(BundleError, match=r"chain.*shortcut|shortcut, which needs a graph"):
        Bundle([graph_nodes()[1].op], (8, 8, 8), input_bits=2).validate()


# --------------------------------------------------------------------------- corrupt files


def _replace_table(shape, fill=None):
    """Members editor: c2's thresholds replaced by an array of ``shape``."""
    def make(graph):
        t = graph.graph[1].op.thresholds
        a = np.zeros(shape, np.int32) if fill is None else fill(t.numpy().astype(np.int32))
        return {"nodes/1/thresholds.npy": a}
    return make


V2_EDITS = {
    "cycle": (_set("nodes/0/input", "c2"),
              r"node 'c1': input 'c2' is defined after it \(a cycle or forward reference"),
    "self loop": (_set("nodes/2/input", "down"), r"node 'down': its input is itself \(a cycle\)"),
    "shortcut forward": (_set("nodes/1/shortcut", "c3"),
                         r"node 'c2': shortcut 'c3' is defined after it"),
    "missing source": (_set("nodes/4/input", "c9"), r"node 'c3': input 'c9' is missing"),
    "missing shortcut": (_set("nodes/4/shortcut", "nowhere"),
                         r"node 'c3': shortcut 'nowhere' is missing"),
    "shortcut dropped": (_set("nodes/4/shortcut", None),
                         r"graph: node 'c3': the conv has a 1-bit shortcut but the node "
                         r"names none"),
    "duplicate name": (_set("nodes/3/name", "down"), r"node 'down': the name is used twice"),
    "node named input": (_set("nodes/3/name", "input"), r"node 3 \('input'\): node name must"),
    "unknown op": (_set("nodes/2/op", "add"),
                   r"node 2 \('down'\): unknown op 'add' \(known: conv, pool, repeat\)"),
    "op missing": (_delete("nodes/3/op"), r"node 3 \('rep'\): missing field 'op'"),
    "node not an object": (_set("nodes/2", ["down"]), r"node 2: must be a JSON object"),
    "no nodes": (_set("nodes", []), r"manifest: no graph nodes"),
    "nodes missing": (_delete("nodes"), r"manifest: missing field 'nodes'"),
    "input bits too many": (_set("input_bits", 3),
                            r"node 0 \('c1'\): input 'input' has 3-bit levels but the conv's "
                            r"in_bits is 2"),
    "input bits 1 (requirements)": (_set("input_bits", 1), r"requirements disagree"),
    "input bits string": (_set("input_bits", "2"), r"field 'input_bits' must be int"),
    "in_bits too few": (_edits(_set("nodes/1/in_bits", 1),
                               _set("nodes/1/accumulator_max", 72),
                               _set("nodes/1/pad_value", -1)),
                        r"node 1 \('c2'\): input 'c1' has 2-bit levels but the conv's in_bits "
                        r"is 1"),
    "in_bits 5": (_set("nodes/1/in_bits", 5), r"node 1 \('c2'\): in_bits must be in \[1, 4\]"),
    "in_bits vs accumulator_max": (_set("nodes/1/in_bits", 3),
                                   r"node 1 \('c2'\): accumulator_max is 216 but the layer "
                                   r"gives 504"),
    "pad level out of range": (_set("nodes/0/pad_level", 4), r"node 0 \('c1'\): pad_level"),
    "pad level contradicts pad value": (_set("nodes/4/pad_level", 0),
                                        r"node 4 \('c3'\): pad_level 0 contradicts pad_value"),
    "shortcut bits too few": (_set("nodes/1/shortcut_bits", 1),
                              r"node 1 \('c2'\): thresholds of a layer with a 1-bit shortcut "
                              r"must be \(O = 8, R = 2, 2\*\*n - 1\), not shape \(8, 4, 1\)"),
    "shortcut of a pool": (_set("nodes/2/shortcut", "c1"), r"node 'down': only a conv takes"),
    "shortcut shape": (_set("nodes/4/shortcut", "down"),
                       r"node 4 \('c3'\): shortcut 'down' is 8×4×4 but the conv's output "
                       r"\(before its pool\) is 16×4×4"),
    "shortcut too many bits": (_set("nodes/1/shortcut", "input"),
                               r"node 1 \('c2'\): shortcut 'input' is 6×8×8"),
    "thresholds_shape edited": (_set("nodes/4/thresholds_shape", [16, 2, 7]),
                                r"node 4 \('c3'\): thresholds_shape is \[16, 2, 7\] but the "
                                r"thresholds array has shape \[16, 2, 3\]"),
    "raw not last": (_edits(_set("nodes/1/output", "raw"), _set("nodes/1/thresholds", None),
                            _set("nodes/1/thresholds_shape", None),
                            _set("nodes/1/output_bits", None)),
                     r"node 1 \('c2'\): a raw layer \(thresholds None\) cannot take a shortcut"),
    "raw conv read": (_edits(_set("nodes/0/output", "raw"), _set("nodes/0/thresholds", None),
                             _set("nodes/0/thresholds_shape", None),
                             _set("nodes/0/output_bits", None)),
                      r"node 0 \('c1'\): only the last node may output raw A"),
    "output bits edited": (_set("nodes/4/output_bits", 1),
                           r"node 4 \('c3'\): output_bits is 1 but the layer gives 2"),
    "repeat not a multiple": (_set("nodes/3/out_channels", 12),
                              r"node 3 \('rep'\): out_channels 12 is not a positive multiple"),
    "pool too large": (_set("nodes/2/kernel", 9), r"node 2 \('down'\): pool 9×9 does not fit"),
    "pool stride zero": (_set("nodes/2/stride", 0),
                         r"node 2 \('down'\): pool kernel and stride must be ≥ 1"),
    "conv channels": (_set("nodes/4/input", "c1"),
                      r"node 4 \('c3'\): input 'c1' has 2-bit levels but the conv's in_bits "
                      r"is 1"),
    "live maps edited": (_set("requirements/live_maps", 2), r"requirements disagree"),
    "v2 fields dropped": (_delete("requirements/max_shortcut_bits"), r"requirements disagree"),
    "weights of another node": (_set("nodes/4/weights", "nodes/0/weights.npy"),
                                r"node 4 \('c3'\): weights array has shape"),
}

V2_MEMBER_EDITS = {
    "table shape": (_replace_table((8, 2, 1)),
                    r"node 1 \('c2'\): thresholds_shape is \[8, 4, 1\] but the thresholds array "
                    r"has shape \[8, 2, 1\]"),
    "table not sorted": (_replace_table(None, lambda t: np.concatenate(
                             [t, np.maximum(t - 1, 0), t], axis=2)),
                         r"node 1 \('c2'\): thresholds must be sorted along each row"),
    "threshold out of range": (_replace_table(None, lambda t: t + 10_000),
                               r"node 1 \('c2'\): threshold 1\d{4} out of range \[0, "
                               r"accumulator_max \+ 1 = 217\]"),
    "negative threshold": (_replace_table(None, lambda t: t - 10_000),
                           r"node 1 \('c2'\): threshold -\d+ out of range"),
}


@pytest.mark.parametrize("edit", list(V2_EDITS))
def test_edited_v2_manifest(edit, graph_file, tmp_path):
    change, fragment = V2_EDITS[edit]
    path = rewrite(graph_file, tmp_path / "edited.bitdet", manifest=change)
    error = expect_error(path, fragment)
    assert str(error).startswith(str(path)), "the message must name the file"


@pytest.mark.parametrize("edit", list(V2_MEMBER_EDITS))
def test_replaced_v2_table(edit, graph, graph_file, tmp_path):
    make, fragment = V2_MEMBER_EDITS[edit]
    members = make(graph)
    shape = list(members["nodes/1/thresholds.npy"].shape)
    change = None
    if edit != "table shape":
        change = _edits(_set("nodes/1/thresholds_shape", shape),
                        _set("nodes/1/output_bits", (shape[-1] + 1).bit_length() - 1))
    path = rewrite(graph_file, tmp_path / "t.bitdet", manifest=change, members=members)
    expect_error(path, fragment)


def test_v2_version_checks(graph_file, tmp_path):
    path = rewrite(graph_file, tmp_path / "v1.bitdet", manifest=_set("version", 1))
    expect_error(path, r"missing field 'binary_layers'")
    path = rewrite(graph_file, tmp_path / "v3.bitdet", manifest=_set("version", 3))
    expect_error(path, r"version 3 is not supported \(this bitdet reads versions 1 and 2\); "
                       r"upgrade bitdet")


def test_a_graph_of_one_bit_convs_is_version_2(tmp_path):
    """A bundle given as a graph is written as version 2 even when every conv is a 1-bit
    v1 layer, and loads back as a graph running like the chain."""
    _stem, _blocks, demo = build_demo(0)
    g = Bundle([], demo.input_shape, graph=demo.nodes())
    assert g.format_version == 2
    loaded = load(g.save(tmp_path / "g.bitdet"))
    x = random_pm1(torch.Generator().manual_seed(0), 1, *demo.input_shape)
    for p, q in zip(demo.run_binary(x), loaded.run_binary(x), strict=True):
        assert torch.equal(p, q)




def test_every_flipped_byte_of_the_v2_zip_directory(graph_file, graph, tmp_path):
    data = graph_file.read_bytes()
    start = min(central_directory_entries(data).values())
    problems = _flip_outcomes(data, range(start, len(data)), (0xFF,),
                              tmp_path / "f.bitdet", graph, assert_graphs_equal)
    assert not problems, "\n".join(problems[:20])


def test_sampled_flipped_bytes_of_a_v2_bundle(graph_file, graph, tmp_path):
    data = graph_file.read_bytes()
    end = min(central_directory_entries(data).values())
    positions = np.random.default_rng(11).choice(end, size=150, replace=False).tolist()
    problems = _flip_outcomes(data, positions, (0xFF, 0x01), tmp_path / "f.bitdet", graph,
                              assert_graphs_equal)
    assert not problems, "\n".join(problems[:20])


# --------------------------------------------------------------------------- version 1 kept


def test_default_bundle_load_save_is_byte_identical(tmp_path, monkeypatch):
    """The shipped bundle is version 1 and saving it again gives its very bytes (the
    writer's ``bitdet_version`` pinned to the one it records)."""
    path = ASSETS / "default.bitdet"
    record = json.loads((ASSETS / "default.json").read_text())
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["bundle_sha256"]
    manifest = manifest_of(path)
    assert manifest["version"] == FORMAT_VERSION == 1
    monkeypatch.setattr(bundle_module, "_bitdet_version", lambda: manifest["bitdet_version"])
    bundle = load(path)
    assert not bundle.uses_v2() and bundle.format_version == 1 and bundle.graph is None
    assert bundle.save(tmp_path / "again.bitdet").read_bytes() == data


def test_one_bit_chain_with_explicit_pad_level_is_written_as_version_1(tmp_path):
    """Folding with contract v2 (explicit ``pad_level``, 1-bit input) gives the same v1
    bytes as before."""
    _stem, _blocks, demo = build_demo(0)
    explicit = [BinaryConvLayer(layer.weights, layer.thresholds, stride=layer.stride,
                                padding=layer.padding, pad_value=layer.pad_value,
                                pool=layer.pool, pad_level=(layer.pad_value + 1) // 2)
                for layer in demo.binary_layers]
    again = Bundle(explicit, demo.input_shape, demo.host_layers, demo.layer_names, demo.model)
    a = demo.save(tmp_path / "a.bitdet")
    b = again.save(tmp_path / "b.bitdet")
    assert a.read_bytes() == b.read_bytes()
    manifest = manifest_of(a)
    assert manifest["version"] == 1 and "nodes" not in manifest
    assert not set(manifest["requirements"]) & {"max_input_bits", "max_shortcut_bits",
                                                "live_maps", "node_maps"}
