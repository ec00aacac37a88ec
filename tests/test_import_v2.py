"""`bitdet import`, contract 2: Brevitas networks with n-bit activations, residual adds,
pools and channel repeats → format-2 bundles, equal to qonnx at every quantized tensor on
the golden model AND on the contract-2 emulator (W1A1 chains stay format 1).

Every architecture is built here with random weights and BatchNorm statistics, exported
with ``brevitas.export.export_qonnx`` (the TorchScript exporter, ``dynamo=False``: 10× faster
than the default one, which tests/test_import.py uses) and imported. Needs the ``import``
extra (brevitas, qonnx, onnx, onnxoptimizer); CI installs it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

with warnings.catch_warnings():            # brevitas warns about its own deprecations
    warnings.simplefilter("ignore")
    pytest.importorskip("brevitas", reason="the `import` extra (pip install -e '.[import]') "
                        "is not installed; CI installs it")
    pytest.importorskip("qonnx", reason="the `import` extra is not installed; CI installs it")
    import brevitas.nn as qnn
    from brevitas.export import export_qonnx
    from brevitas.quant import Int8ActPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
    from qonnx.core.onnx_exec import execute_onnx
    from test_import import BinaryWeights, ScaleBias, bconv, bip, block, head, randomize, relu
    from test_import import stem as stem_layers

from bitdet.core.bundle import load
from bitdet.core.golden import ChannelRepeat, PoolPass
from bitdet.sw.cli import main
from bitdet.sw.qonnx_import import QonnxImportError, check_bundle, import_qonnx

# ------------------------------------------------------------------------- Brevitas blocks


def sint(bits):
    """A signed n-bit activation (power-of-two scale): zero is level 2^(n−1)."""
    return qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint, bit_width=bits)


def uint(bits):
    return qnn.QuantIdentity(act_quant=Uint8ActPerTensorFixedPoint, bit_width=bits)


def stem(cin, cout, act, stride=1):
    return stem_layers(cin, cout, stride=stride, act=act)


class Residual(nn.Module):
    """act(bn(conv(x)) + x), a 3×3 (padding 1) or 1×1 binary conv."""

    def __init__(self, channels, act, k=3):
        super().__init__()
        self.conv = bconv(channels, channels, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(channels)
        self.act = act

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class EltwiseResidual(nn.Module):
    """Brevitas' QuantEltwiseAdd (8-bit requantizers on both inputs and on the sum), then
    an n-bit activation: the requantizers are folded into the layer's epilogue."""

    def __init__(self, channels, act):
        super().__init__()
        self.conv = bconv(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.add = qnn.QuantEltwiseAdd()
        self.act = act

    def forward(self, x):
        return self.act(self.add(self.bn(self.conv(x)), x))


class Downsample(nn.Module):
    """A stride-2 block whose shortcut is a max-pool of its input, repeated along the
    channels (Concat of the same map): PoolPass + ChannelRepeat in the bundle."""

    def __init__(self, cin, cout, act):
        super().__init__()
        self.times = cout // cin
        self.conv = bconv(cin, cout, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = nn.MaxPool2d(2)
        self.act = act

    def forward(self, x):
        shortcut = self.pool(x)
        if self.times > 1:
            shortcut = torch.cat([shortcut] * self.times, dim=1)
        return self.act(self.bn(self.conv(x)) + shortcut)


ARCHS = {
    # W1A1 chain, odd channels, −1 padding, 1×1 stride 2: stays format 1
    "w1a1_chain": lambda: [*stem(1, 5, bip()), nn.ConstantPad2d(1, -1.0),
                           *block(5, 7, bip()), *block(7, 3, bip(), k=1, stride=2)],
    # 2-bit activations, 3×3 with zero padding (level 0), 1×1, stride 2, a float head
    "w1a2_chain": lambda: [*stem(1, 6, relu(2)), *block(6, 5, relu(2), padding=1),
                           *block(5, 7, relu(2), k=1), *block(7, 3, bip(), stride=2),
                           head(3, 2)],
    # 4-bit activations, a max-pool over 4-bit levels
    "w1a4_pool": lambda: [*stem(1, 4, relu(4)), *block(4, 5, relu(4), padding=1),
                          nn.MaxPool2d(2), *block(5, 3, relu(4), k=1)],
    # signed 2-bit activations: zero padding is level 2
    "w1a2_signed": lambda: [*stem(1, 5, sint(2)), *block(5, 4, sint(2), padding=1),
                            *block(4, 3, bip(), k=1)],
    # mixed widths 3 → 1 → 2 bits, explicit Mul/Add scale and bias nodes
    "w1a3_mixed": lambda: [*stem(1, 4, uint(3)), bconv(4, 5, 3, padding=1), ScaleBias(5),
                           nn.BatchNorm2d(5), bip(), nn.ConstantPad2d(1, -1.0),
                           *block(5, 6, relu(2)), *block(6, 3, bip(), k=1)],
    # a W1A2 residual stream (two adds), then a binary layer and a head
    "res_w1a2": lambda: [*stem(1, 5, relu(2)), Residual(5, relu(2)), Residual(5, relu(2)),
                         *block(5, 3, bip(), k=1), head(3, 2)],
    # a 1×1 W1A1 residual (the ±1 shortcut)
    "res_w1a1_1x1": lambda: [*stem(1, 6, bip()), Residual(6, bip(), k=1),
                             *block(6, 4, bip(), k=1)],
    # a 4-bit residual: 16 shortcut levels
    "res_w1a4": lambda: [*stem(1, 3, relu(4)), Residual(3, relu(4)), *block(3, 2, relu(4), k=1)],
    # QuantEltwiseAdd: 8-bit requantizers inside the epilogue and on the shortcut
    "res_eltwise": lambda: [*stem(1, 4, relu(2)), EltwiseResidual(4, relu(2)),
                            *block(4, 3, bip(), k=1)],
    # stride-2 block with a pooled, channel-repeated shortcut
    "res_downsample": lambda: [*stem(1, 3, relu(2)), Downsample(3, 6, relu(2)),
                               *block(6, 5, relu(2), k=1)],
    # no stem: the input quantized to 2 bits is the bundle's input and the first shortcut
    "res_no_stem": lambda: [uint(2), Residual(2, relu(2)), *block(2, 5, relu(2), padding=1),
                            nn.MaxPool2d(2), *block(5, 3, bip(), k=1)],
    # Brevitas' default QuantReLU (a float scale: 1/3): the fold is checked, not assumed
    "w1a2_float_scale": lambda: [*stem(1, 4, qnn.QuantReLU(bit_width=2)),
                                 Residual(4, qnn.QuantReLU(bit_width=2)),
                                 *block(4, 3, bip(), k=1)],
}
INPUTS = {"res_no_stem": (2, 8, 8), "res_downsample": (1, 10, 10)}
FORMAT_1 = {"w1a1_chain"}
#: what each bundle must contain: (residual adds, pools, channel repeats, max in_bits)
SHAPE = {"w1a1_chain": (0, 0, 0, 1), "w1a2_chain": (0, 0, 0, 2), "w1a4_pool": (0, 1, 0, 4),
         "w1a2_signed": (0, 0, 0, 2), "w1a3_mixed": (0, 0, 0, 3), "res_w1a2": (2, 0, 0, 2),
         "res_w1a1_1x1": (1, 0, 0, 1), "res_w1a4": (1, 0, 0, 4), "res_eltwise": (1, 0, 0, 2),
         "res_downsample": (1, 1, 1, 2), "res_no_stem": (1, 1, 0, 2),
         "w1a2_float_scale": (1, 0, 0, 2)}


def export(layers, path, shape=(1, 8, 8), seed=0, dynamo=False) -> str:
    torch.manual_seed(seed)
    model = randomize(nn.Sequential(*layers), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(model, torch.zeros(1, *shape), str(path), dynamo=dynamo)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qonnx_v2")
    return {name: export(build(), folder / f"{name}.onnx", INPUTS.get(name, (1, 8, 8)), i + 11)
            for i, (name, build) in enumerate(ARCHS.items())}


def qonnx_equal_everywhere(result, bundle, emulator_maps, seed=3, inputs=2):
    """Independently of check_bundle: qonnx's every quantized tensor against the bundle's
    golden maps and the emulator's maps (levels mapped to values), on random inputs."""
    from bitdet.sw.qonnx_import import _bundle_maps, _random_input
    model = result.model
    name = model.graph.input[0].name
    shape = list(model.get_tensor_shape(name))
    rng = np.random.default_rng(seed)
    compared = 0
    for _ in range(inputs):
        x = _random_input(result, shape, rng)
        ctx = execute_onnx(model, {name: x}, return_full_exec_context=True)
        golden = _bundle_maps(result, bundle, ctx, x)
        emulated = emulator_maps(golden["input"]) if emulator_maps else {}
        for tensor, ref in result.tensors.items():
            want = np.asarray(ctx[tensor])
            key = f"{ref.node}@prepool" if ref.prepool_of else ref.node
            assert np.array_equal(ref.qmap.to_values(golden[key].numpy()), want), tensor
            if ref.node in emulated:
                got = ref.qmap.to_values(emulated[ref.node].numpy())
                assert np.array_equal(got, want), (tensor, "emulator")
                compared += 1
    return compared


def _emulator(bundle):
    from bitdet.sw.driver import Device
    device = Device.open("emu", "contract2")
    device.load(bundle)
    return device


@pytest.mark.parametrize("name", list(ARCHS))
def test_brevitas_v2_models_match_qonnx_and_the_emulator(exported, name, tmp_path, capsys):
    out = tmp_path / "m.bitdet"
    assert main(["import", exported[name], "--out", str(out), "--inputs", "2"]) == 0, \
        capsys.readouterr()
    text = capsys.readouterr().out
    bundle = load(out)
    fmt = 1 if name in FORMAT_1 else 2
    assert bundle.format_version == fmt and f"format {fmt}" in text
    assert "all equal to qonnx execute_onnx" in text
    nodes = bundle.nodes()
    adds, pools, repeats, in_bits = SHAPE[name]
    assert sum(n.shortcut is not None for n in nodes) == adds
    assert sum(isinstance(n.op, PoolPass) for n in nodes) + sum(
        getattr(n.op, "pool", None) is not None for n in nodes) == pools
    assert sum(isinstance(n.op, ChannelRepeat) for n in nodes) == repeats
    assert max(getattr(n.op, "in_bits", 1) for n in nodes) == in_bits
    result = import_qonnx(exported[name])
    if fmt == 1:
        assert "emulator (" not in text and "emulator:" not in text
        qonnx_equal_everywhere(result, bundle, None)
        return
    assert "emulator (contract2, one RUN_LAYER per node, every map read back)" in text
    report = check_bundle(result, bundle, inputs=1, seed=5, emulator="contract2")
    assert report.equal and report.emulator.skipped is None
    assert report.emulator.tensors == len([r for r in result.tensors.values()
                                           if r.node != "input"])
    with _emulator(bundle) as device:
        compared = qonnx_equal_everywhere(
            result, bundle, lambda levels: device.run_graph(levels, trace=True))
    assert compared == 2 * report.emulator.tensors


def test_a_wrong_emulator_map_exits_1_and_writes_nothing(exported, tmp_path, capsys,
                                                          monkeypatch):
    from bitdet.sw.driver import Device
    run_graph = Device.run_graph

    def flipped(self, levels, **kwargs):
        maps = run_graph(self, levels, **kwargs)
        name = next(iter(maps))
        maps[name] = maps[name].clone()
        maps[name][0, 0, 0, 0] ^= 1                  # one bit of one level
        return maps

    monkeypatch.setattr(Device, "run_graph", flipped)
    out = tmp_path / "m.bitdet"
    assert main(["import", exported["res_w1a2"], "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "all equal to qonnx" in captured.out                   # the golden model agrees
    assert "emulator (contract2" in captured.out and "DIFFERENT" in captured.out
    assert "emulator map" in captured.out
    assert captured.err.strip() == ("bitdet: error: the imported bundle's maps on the "
                                    "contract-2 emulator differ from qonnx; nothing written")
    assert list(tmp_path.iterdir()) == []


def test_emulator_off_and_a_contract1_build(exported, tmp_path, capsys):
    out = tmp_path / "m.bitdet"
    assert main(["import", exported["w1a4_pool"], "--out", str(out), "--emulator", "off"]) == 0
    assert "emulator (" not in capsys.readouterr().out and load(out).format_version == 2
    out.unlink()
    assert main(["import", exported["w1a4_pool"], "--out", str(out), "--emulator",
                 "ulx3s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a contract-2 build" in err
    assert list(tmp_path.iterdir()) == []


def test_a_bundle_too_big_for_the_build_is_checked_on_the_golden_model_only(
        exported, tmp_path, capsys, monkeypatch):
    import bitdet.sw.driver.device as device_module
    monkeypatch.setattr(device_module, "plan_problems", lambda *a, **k: ["too big (test)"])
    out = tmp_path / "m.bitdet"
    assert main(["import", exported["res_w1a2"], "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "emulator: not run: the bundle does not fit" in text and "too big (test)" in text
    assert load(out).format_version == 2


def test_hand_built_multithreshold_and_intquant_graph(tmp_path, capsys):
    """x → MultiThreshold (2 bits: the bundle's input map) → 1×1 binary conv → BN → Add(x)
    → IntQuant (3 bits) → 3×3 binary conv (zero padding: level 0) → Mul → MultiThreshold
    (4 bits, 15 thresholds)."""
    import onnx
    from onnx import helper
    from test_import import QDOM, _graph
    rng = np.random.default_rng(5)
    inits = {"one": [1.0], "t_in": np.tile([-0.5, 0.0, 0.5], (3, 1)),
             "w1": rng.standard_normal((3, 3, 1, 1)), "g": rng.standard_normal(3),
             "b": rng.standard_normal(3), "m": rng.standard_normal(3) * 2,
             "v": rng.random(3) + 0.5, "s": [0.5], "z": [0.0], "bw": [3.0],
             "w2": rng.standard_normal((5, 3, 3, 3)), "k": rng.random((1, 5, 1, 1)) + 0.5,
             "t_out": np.sort(rng.standard_normal((5, 15)) * 6, axis=1)}
    nodes = [
        helper.make_node("MultiThreshold", ["x", "t_in"], ["a"], domain=QDOM, name="in_mt",
                         out_dtype="UINT2", data_layout="NCHW"),
        helper.make_node("BipolarQuant", ["w1", "one"], ["w1q"], domain=QDOM, name="w1_q"),
        helper.make_node("Conv", ["a", "w1q"], ["c1"], kernel_shape=[1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["e1"], name="bn1"),
        helper.make_node("Add", ["e1", "a"], ["r1"], name="add1"),
        helper.make_node("IntQuant", ["r1", "s", "z", "bw"], ["q1"], domain=QDOM, name="iq",
                         signed=0, narrow=0, rounding_mode="ROUND"),
        helper.make_node("BipolarQuant", ["w2", "one"], ["w2q"], domain=QDOM, name="w2_q"),
        helper.make_node("Conv", ["q1", "w2q"], ["c2"], kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Mul", ["c2", "k"], ["e2"], name="mul2"),
        helper.make_node("MultiThreshold", ["e2", "t_out"], ["y"], domain=QDOM, name="out_mt",
                         out_dtype="UINT4", data_layout="NCHW")]
    path = tmp_path / "mt.onnx"
    onnx.save(_graph(nodes, inits, in_shape=(1, 3, 6, 6)), path)
    out = tmp_path / "mt.bitdet"
    assert main(["import", str(path), "--out", str(out)]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert "emulator (contract2" in text and text.count("all equal to qonnx") == 2
    bundle = load(out)
    assert bundle.format_version == 2 and bundle.input_bits == 2 and not bundle.host_layers
    conv1, conv2 = bundle.nodes()
    assert (conv1.op.in_bits, conv1.op.shortcut_bits, conv1.op.output_bits) == (2, 2, 3)
    assert conv1.shortcut == "input" and tuple(conv1.op.thresholds.shape) == (3, 4, 7)
    assert (conv2.op.in_bits, conv2.op.padding_level, conv2.op.output_bits) == (3, 0, 4)


# ------------------------------------------------------------------------- refused graphs


class NonMonotone(nn.Module):
    """act(3 / (bn(conv(x)) + x)): not monotone in the accumulator for a shortcut level."""

    def __init__(self, channels):
        super().__init__()
        self.conv = bconv(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = relu(2)

    def forward(self, x):
        return self.act(3.0 / (self.bn(self.conv(x)) + x))


class TwoConvs(nn.Module):
    """act(bn(conv1(x)) + bn(conv2(x))): two real-valued branches."""

    def __init__(self, channels):
        super().__init__()
        self.a, self.b = bconv(channels, channels, 1), bconv(channels, channels, 1)
        self.act = relu(2)

    def forward(self, x):
        return self.act(self.a(x) + self.b(x))


class TwoMaps(nn.Module):
    """Concat of two different maps (not a channel repeat)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = bconv(channels, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = relu(2)

    def forward(self, x):
        return torch.cat([x, self.act(self.bn(self.conv(x)))], dim=1)


class WideShortcut(nn.Module):
    """act2(bn(conv2(x)) + act5(bn(conv1(x)))): a 5-bit map read only as a shortcut."""

    def __init__(self, channels):
        super().__init__()
        self.a, self.b = bconv(channels, channels, 1), bconv(channels, channels, 1)
        self.bn_a, self.bn_b = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels)
        self.act_a, self.act = relu(5), relu(2)

    def forward(self, x):
        return self.act(self.bn_b(self.b(x)) + self.act_a(self.bn_a(self.a(x))))


BAD = {
    # a 5-bit map read by a binary conv
    "5bit_map": ([*stem(1, 4, relu(5)), *block(4, 3, relu(2), k=1)], "(Quant)",
                 "5-bit activations"),
    # a 5-bit residual stream
    "5bit_residual": ([*stem(1, 4, relu(2)), Residual(4, relu(5)), *block(4, 3, bip(), k=1)],
                      "(Quant)", "5-bit activations"),
    "5bit_shortcut": ([*stem(1, 4, relu(2)), WideShortcut(4)], "(Quant)", "5-bit activations"),
    "non_monotone_residual": ([*stem(1, 4, relu(2)), NonMonotone(4)], "(Conv)",
                              "not monotone"),
    "two_conv_branches": ([*stem(1, 4, relu(2)), TwoConvs(4)], "(Add)",
                          "is not a quantized map"),
    "concat_two_maps": ([*stem(1, 4, relu(2)), TwoMaps(4)], "(Concat)", "channel repeat"),
    # QuantEltwiseAdd whose 8-bit sum is the next conv's input (no ≤ 4-bit activation)
    "8bit_sum": ([*stem(1, 4, relu(2)), EltwiseResidual(4, nn.Identity()),
                  *block(4, 3, bip(), k=1)], "(Quant)", "8-bit activations"),
    "avgpool": ([*stem(1, 4, relu(2)), nn.AvgPool2d(2), *block(4, 3, bip(), k=1)],
                "(AveragePool)", "not an accelerator op"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_unsupported_v2_graphs_one_line_nothing_written(kind, tmp_path, capsys):
    layers, where, why = BAD[kind]
    path = export(layers, tmp_path / f"{kind}.onnx")
    before = set(tmp_path.iterdir())
    out = tmp_path / "bad.bitdet"
    assert main(["import", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitdet: error: node "), err
    assert where in err and why in err, err
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(QonnxImportError):
        import_qonnx(path)


def test_a_wrong_layout_input_is_refused(tmp_path, capsys):
    """A 3-D (N×C×L) graph input: bitdet reads NCHW maps."""
    model = nn.Sequential(uint(2), qnn.QuantConv1d(2, 3, 3, bias=False,
                                                   weight_quant=BinaryWeights),
                          nn.BatchNorm1d(3), relu(2)).eval()
    path = tmp_path / "conv1d.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(model, torch.zeros(1, 2, 12), str(path), dynamo=False)
    out = tmp_path / "bad.bitdet"
    assert main(["import", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong layout" in err and not out.exists()


def test_a_missing_initializer_in_a_residual_epilogue(tmp_path, capsys):
    import onnx
    path = export([*stem(1, 4, relu(2)), Residual(4, relu(2))], tmp_path / "res.onnx")
    model = onnx.load(path)
    bn = [n for n in model.graph.node if n.op_type == "BatchNormalization"][-1]
    bn.input[3] = "nope"
    onnx.save(model, path)
    out = tmp_path / "bad.bitdet"
    assert main(["import", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(BatchNormalization)" in err and "'nope'" in err
    assert "missing" in err and not out.exists()


# ------------------------------------------------------------------------- the slow sweep


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name", [n for n in ARCHS if n not in FORMAT_1])
def test_sweep_seeds_and_larger_maps(name, seed, tmp_path):
    """Every v2 architecture with other weights, on 16×16 maps and 4 random inputs."""
    shape = INPUTS.get(name, (1, 8, 8))
    path = export(ARCHS[name](), tmp_path / "m.onnx", (shape[0], 16, 16), seed=100 + seed)
    result = import_qonnx(path)
    bundle = result.bundle
    assert bundle.format_version == 2
    report = check_bundle(result, bundle, inputs=4, seed=seed, emulator="contract2")
    assert report.equal, (report.difference, report.emulator)
    assert report.emulator.skipped is None and report.emulator.tensors >= 1
