"""`bitdet demo --bits N --residual`: a random contract-v2 network, float = folded =
bundle = emulator at every node, exit status 1 on a difference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bitdet.sw import demo
from bitdet.sw.cli import main


@pytest.mark.parametrize(("bits", "residual"), [(1, True), (2, True), (3, False),
                                                (4, True)])
def test_every_node_agrees(bits, residual, tmp_path):
    lines = []
    assert demo.run_demo_v2(tmp_path / "d.bitdet", bits=bits, residual=residual,
                            images=2, echo=lines.append)
    text = "\n".join(lines)
    assert "(format 2," in text and text.endswith("all nodes bit-exact")
    nodes = [line.split()[0] for line in lines if line.endswith("identical")]
    assert {"b0", "b1", "b2", "b1.pool", "b1.repeat"} <= set(nodes)
    assert ("b2.res" in nodes) == residual
    assert "DIFFER" not in text


def test_a_wrong_threshold_is_reported(tmp_path, monkeypatch):
    build = demo.build_demo_v2

    def tampered(seed=0, *, bits=2, residual=True):
        net, bundle = build(seed, bits=bits, residual=residual)
        graph = list(bundle.graph)
        for i, node in enumerate(graph):
            if node.name == "b1":
                layer = node.op
                shifted = layer.thresholds.clone()
                shifted[..., 0] = torch.clamp(shifted[..., 0] + 7, max=layer.accumulator_max)
                shifted = shifted.sort(dim=-1).values
                graph[i] = dataclasses.replace(node, op=dataclasses.replace(
                    layer, thresholds=shifted))
        return net, dataclasses.replace(bundle, graph=graph, binary_layers=[],
                                        layer_names=None)

    monkeypatch.setattr(demo, "build_demo_v2", tampered)
    lines = []
    assert not demo.run_demo_v2(tmp_path / "d.bitdet", images=2, echo=lines.append)
    assert lines[-1].startswith("MISMATCH between the float, the folded network")
    assert any(line.startswith("b1 ") and "DIFFER" in line for line in lines)


def test_a_wrong_emulator_map_is_reported(tmp_path, monkeypatch):
    from bitdet.sw.driver import Device
    run_graph = Device.run_graph

    def flipped(self, levels, **kwargs):
        maps = run_graph(self, levels, **kwargs)
        maps["b0"] = maps["b0"].clone()
        maps["b0"][0, 0, 0, 0] ^= 1                   # one bit of one level
        return maps

    monkeypatch.setattr(Device, "run_graph", flipped)
    lines = []
    assert not demo.run_demo_v2(tmp_path / "d.bitdet", images=2, echo=lines.append)
    assert any(line.startswith("b0 ") and line.endswith("2 DIFFER") for line in lines)
    assert not any(line.startswith("b1 ") and "DIFFER" in line for line in lines)


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.bitdet"
    assert main(["demo", "--bits", "2", "--residual", "--out", str(out), "--images", "1"]) == 0
    assert "all nodes bit-exact" in capsys.readouterr().out
    assert main(["demo", "--bits", "2", "--out", str(out)]) == 2        # no --force
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--bits", "5", "--out", str(out)])
    assert exit_.value.code == 2
    assert "expected 1, 2, 3 or 4, not '5'" in capsys.readouterr().err


def test_bundle_info_lists_the_graph(tmp_path, capsys):
    import json
    out = tmp_path / "d.bitdet"
    assert main(["demo", "--bits", "3", "--residual", "--out", str(out), "--images", "1"]) == 0
    capsys.readouterr()
    assert main(["bundle", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "graph (format 2), input 3×16×16 of 3-bit levels" in text
    assert "repeat b1.repeat    9×8×8 → 27×8×8  channel c ← c mod 9, 3-bit" in text
    assert "3-bit shortcut 'b1.repeat'  (reads 'b0')" in text and "pad 1(-1)" not in text
    assert "input/shortcut bits 3/3, 4 maps live at once" in text
    assert main(["bundle", "info", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == 2 and report["input_bits"] == 3
    assert {"name": "b1.pool", "op": "PoolPass", "input": "b0.res", "shortcut": None} \
        in report["nodes"]
