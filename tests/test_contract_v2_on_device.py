"""A contract-v2 bundle (bundle format 2: a graph, n-bit maps, shortcuts) is refused by
everything that would run it on a contract-1 accelerator (the boards' RTL), before anything is
sent, naming the node and what the accelerator lacks and that a contract-2 build (the
``contract2`` preset, on the emulator) runs it — never run as if it were a chain of 1-bit
layers. tests/test_device_v2.py runs such bundles on contract 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bundle_v2 import graph_bundle

from bitdet.core.bundle import BundleError
from bitdet.core.config import load_config
from bitdet.sim.layer import bundle_case
from bitdet.sw.cli import main
from bitdet.sw.device import BundleDoesNotFit, Device
from bitdet.sw.driver.link import EmuLink
from bitdet.sw.driver.planner import CONTRACT_2_HINT, contract_v2_problems, plan_bundle
from bitdet.sw.emulator import Emulator


@pytest.fixture(scope="module")
def v2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("v2") / "graph.bitdet"
    graph_bundle().save(path)
    return path


def test_the_problems_name_nodes_and_features():
    messages = [p.message for p in contract_v2_problems(graph_bundle())]
    hint = f" ({CONTRACT_2_HINT})"
    assert CONTRACT_2_HINT == ("contract 1; a contract-2 build runs it, e.g. the 'contract2' "
                               "preset on the emulator")
    assert all(m.endswith(hint) for m in messages)
    messages = [m.removesuffix(hint) for m in messages]
    assert "the bundle's input map has 2-bit levels, the accelerator reads 1-bit maps" \
        in messages
    assert "layer 'c1' reads 2-bit maps, the accelerator reads 1-bit maps" in messages
    assert ("layer 'c2' adds a 2-bit shortcut from 'c1', the accelerator has no shortcut "
            "path") in messages
    assert "node 'rep' repeats channels, the accelerator has no channel repetition" \
        in messages


def test_device_load_refuses_before_sending(v2_file):
    from bitdet.core.bundle import load
    bundle = load(v2_file)
    config = load_config("ulx3s")
    sent = []

    class Recording(EmuLink):
        def write(self, data):
            sent.append(bytes(data))
            super().write(data)

    device = Device(Recording(Emulator(config)), config)
    before = len(sent)
    with pytest.raises(BundleDoesNotFit, match="layer 'c1' reads 2-bit maps"):
        device.load(bundle)
    assert len(sent) == before
    with pytest.raises(ValueError, match="repeats channels"):
        plan_bundle(config, bundle)


def test_cli_says_it_does_not_fit(v2_file, capsys, tmp_path):
    assert main(["hw", "info", "--config", "ulx3s", "--bundle", str(v2_file)]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "layer 'c2' adds a 2-bit shortcut" in out
    assert "a contract-2 build runs it, e.g. the 'contract2' preset" in out
    sample = Path(__file__).resolve().parent.parent / "sw" / "assets" / "sample.png"
    status = main(["detect", str(sample), "--bundle", str(v2_file), "--config", "ulx3s",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "2-bit" in err
    assert "'contract2' preset" in err


def test_sim_layer_refuses_a_v2_layer_on_a_contract_1_config(v2_file, capsys):
    """A format-2 bundle's conv is a contract-2 case (tests/test_rtl_v2.py runs such cases
    on the contract-2 RTL); on a contract-1 config it is refused before any simulator
    starts, in one line."""
    from bitdet.sim.layer import simulate_layer
    case = bundle_case(v2_file, 0)
    assert case.contract2 and case.layer.in_bits == 2
    with pytest.raises(ValueError, match="needs a contract-2 build; config 'tiny' is "
                                         "contract 1"):
        simulate_layer(load_config("tiny"), case)
    assert main(["sim", "layer", "--config", "tiny", "--bundle", str(v2_file),
                 "--layer", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a contract-2 build" in err
    with pytest.raises(BundleError, match="--layer must be in 0 … "):
        bundle_case(v2_file, 99)
