"""Random contract-v2 networks: the float model, the folded golden graph, the reloaded
bundle and the emulator agree bit for bit at every map (issue "Contract v2 in software")."""

from __future__ import annotations

import pytest
import torch

from bitdet.core.bundle import load as load_bundle
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, PoolPass
from bitdet.sw.random_v2 import random_v2_network

SEEDS = range(48)      # all in the fast tier: the emulator runs one network in ~0.2 s


def _levels(draw, seed, images=2):
    generator = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, 1 << draw["input_bits"], (images, *draw["input_shape"]),
                         generator=generator, dtype=torch.int32)


def _float_levels(net, levels):
    with torch.no_grad():
        values = net.intermediates(net.input_grid.dequantize(levels))
    grids = net.grids()
    return {name: grids[name].recover(value) for name, value in values.items()}


def test_the_sample_covers_every_corner_case():
    seen = {"in_bits": set(), "out_bits": set(), "shortcut_bits": set(), "stride2": 0,
            "pool": 0, "repeat": 0, "odd_channels": 0, "pad_level>0": 0, "negative_gamma": 0,
            "constant_channel": 0}
    for seed in SEEDS:
        net, bundle, _draw = random_v2_network(seed)
        for node in bundle.nodes():
            op = node.op
            if isinstance(op, BinaryConvLayer):
                seen["in_bits"].add(op.in_bits)
                seen["out_bits"].add(op.output_bits)
                seen["shortcut_bits"].add(op.shortcut_bits)
                seen["stride2"] += op.stride == 2
                seen["odd_channels"] += op.weights.shape[0] % 2
                seen["pad_level>0"] += op.padding_level > 0
            seen["pool"] += isinstance(op, PoolPass)
            seen["repeat"] += isinstance(op, ChannelRepeat)
        for block in net.blocks:
            seen["negative_gamma"] += int((block.bn.weight < 0).sum())
            seen["constant_channel"] += int((block.bn.weight == 0).sum())
    assert seen["in_bits"] == seen["out_bits"] == {1, 2, 3, 4}
    assert seen["shortcut_bits"] == {0, 1, 2, 3, 4}
    assert all(seen[key] > 0 for key in seen if not isinstance(seen[key], set)), seen


@pytest.mark.parametrize("seed", SEEDS)
def test_float_golden_and_bundle_agree(seed, tmp_path):
    net, bundle, draw = random_v2_network(seed)
    levels = _levels(draw, seed)
    expected = _float_levels(net, levels)
    fast = bundle.run_graph(levels)
    reference = bundle.run_graph(levels, method="reference")
    bundle.save(tmp_path / "net.bitdet")
    loaded = load_bundle(tmp_path / "net.bitdet")
    assert loaded.format_version == 2
    reloaded = loaded.run_graph(levels)
    for name, want in expected.items():
        assert torch.equal(fast[name], want), name
    for name in fast:
        assert torch.equal(reference[name], fast[name]), name
        assert torch.equal(reloaded[name], fast[name]), name


def _emulator_agrees(seed):
    from bitdet.sw.driver import Device, RunStats
    _net, bundle, draw = random_v2_network(seed)
    levels = _levels(draw, seed)
    golden = bundle.run_graph(levels)
    with Device.open("emu", "contract2") as device:
        device.load(bundle)
        for i in range(levels.shape[0]):
            traced = device.run_graph(levels[i:i + 1], trace=True)
            assert set(traced) == {node.name for node in bundle.nodes()}
            for name, got in traced.items():
                assert torch.equal(got, golden[name][i:i + 1]), (seed, i, name)
            stats = RunStats()
            last = device.run_graph(levels[i:i + 1], stats=stats)  # RUN_NETWORK: cycles checked
            (name, got), = last.items()
            assert torch.equal(got, golden[name][i:i + 1])
            assert stats.busy_cycles > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_the_emulator_agrees_at_every_map(seed):
    """Every node's map read back after its pass (RUN_LAYER), and the last map after one
    RUN_NETWORK whose cycle sums the driver checks against the cycle model."""
    _emulator_agrees(seed)
