"""`bitdet import`: QONNX (Brevitas) binary networks → bundles, checked against qonnx.

Needs the ``import`` extra (brevitas, qonnx, onnx, onnxoptimizer); CI installs it.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

with warnings.catch_warnings():            # brevitas warns about its own deprecations
    warnings.simplefilter("ignore")
    brevitas = pytest.importorskip(
        "brevitas", reason="the `import` extra (pip install -e '.[import]') is not installed; "
        "CI installs it")
    pytest.importorskip("qonnx", reason="the `import` extra is not installed; CI installs it")
    import brevitas.nn as qnn
    import qonnx.core.onnx_exec
    import qonnx.util.cleanup  # noqa: F401
    from brevitas.export import export_qonnx
    from brevitas.quant import (
        Int8WeightPerTensorFixedPoint,
        SignedBinaryActPerTensorConst,
        SignedBinaryWeightPerTensorConst,
        Uint8ActPerTensorFixedPoint,
    )
from onnx import TensorProto, helper

from bitdet.core.bundle import load
from bitdet.sw.cli import main
from bitdet.sw.qonnx_import import (
    QonnxImportError,
    check_bundle,
    import_qonnx,
)

# ------------------------------------------------------------------------- Brevitas blocks


def stem(cin, cout, stride=1, act=None):
    """Host stem: int8 (power-of-two scale) weights on integer pixels, BN, activation."""
    return [qnn.QuantConv2d(cin, cout, 3, stride=stride, padding=1, bias=False,
                            weight_quant=Int8WeightPerTensorFixedPoint),
            nn.BatchNorm2d(cout), act or bip()]


def bip():
    return qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst)


def relu(bits):
    return qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=bits)


class BinaryWeights(SignedBinaryWeightPerTensorConst):
    """±1 weights (scale 1, a power of two): qonnx's float32 sums of them are exact, so a
    dot that lands exactly on a BatchNorm threshold breaks the tie as the integer layer
    does. Brevitas' stock scale 0.1 rounds (docs/import.md, the worked example)."""

    scaling_const = 1.0


def bconv(cin, cout, k=3, stride=1, padding=0):
    return qnn.QuantConv2d(cin, cout, k, stride=stride, padding=padding, bias=False,
                           weight_quant=BinaryWeights)


def block(cin, cout, act, k=3, stride=1, padding=0):
    return [bconv(cin, cout, k, stride, padding), nn.BatchNorm2d(cout), act]


class Residual(nn.Module):
    """act(bn(conv(x)) + x): a residual Add of the input's quantized map."""

    def __init__(self, channels, act, pad=None):
        super().__init__()
        self.pad = pad
        self.conv = bconv(channels, channels, 3, padding=0 if pad is not None else 1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = act

    def forward(self, x):
        y = self.conv(self.pad(x) if self.pad is not None else x)
        return self.act(self.bn(y) + x)


class ScaleBias(nn.Module):
    """Explicit per-channel Mul and Add nodes (a weight scale and a bias)."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("scale", torch.rand(1, channels, 1, 1) + 0.25)
        self.register_buffer("bias", torch.randn(1, channels, 1, 1))

    def forward(self, x):
        return x * self.scale + self.bias


def head(cin, cout):
    return nn.Conv2d(cin, cout, 1)


ARCHS = {
    # W1A1 chain, 3×3 and 1×1, odd channels, float head: format 1
    "w1a1_chain": lambda: [*stem(1, 8), *block(8, 7, bip()), *block(7, 5, bip(), k=1),
                           head(5, 3)],
    # max-pool and stride 2, no head (a feature bundle): format 1
    "w1a1_pool_stride": lambda: [*stem(2, 6), *block(6, 9, bip()), nn.MaxPool2d(2),
                                 *block(9, 5, bip(), stride=2)],
    # explicit padding with −1, Mul/Add scale and bias nodes: format 1
    "w1a1_pad_scale": lambda: [*stem(1, 5, stride=2), nn.ConstantPad2d(1, -1.0),
                               bconv(5, 7), ScaleBias(7), nn.BatchNorm2d(7), bip(),
                               *block(7, 3, bip(), k=1), head(3, 2)],
    # 2-bit activations (zero padding is level 0), a float head: format 2
    "w1a2": lambda: [*stem(1, 6, act=relu(2)), *block(6, 5, relu(2), padding=1),
                     *block(5, 4, bip(), k=1), head(4, 3)],
    # 4-bit activations with a max-pool: format 2
    "w1a4_pool": lambda: [*stem(1, 4, act=relu(4)), *block(4, 6, relu(4)), nn.MaxPool2d(2),
                          *block(6, 3, relu(4), k=1)],
    # W1A1 residual (padding −1 keeps the map binary): format 2
    "w1a1_residual": lambda: [*stem(1, 6), Residual(6, bip(), nn.ConstantPad2d(1, -1.0)),
                              *block(6, 4, bip(), k=1), head(4, 2)],
    # W1A2 residual, then a pool and a stride-2 layer: format 2
    "w1a2_residual": lambda: [*stem(1, 5, act=relu(2)), Residual(5, relu(2)),
                              nn.MaxPool2d(2), *block(5, 3, bip(), stride=2)],
    # no host stem: the input quantized to ±1 is the bundle's input: format 1
    "w1a1_no_stem": lambda: [bip(), *block(3, 6, bip()), *block(6, 4, bip(), k=1)],
    # an 8-bit input quantizer: the stem reads its integer codes: format 1
    "w1a1_quant_input": lambda: [qnn.QuantIdentity(act_quant=Uint8ActPerTensorFixedPoint,
                                                   bit_width=8),
                                 *stem(1, 5), *block(5, 4, bip(), k=1), head(4, 2)],
}
INPUTS = {"w1a1_pool_stride": (2, 12, 12), "w1a1_no_stem": (3, 9, 9)}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 4 + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=gen))   # some negative
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 0.05)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def export(layers, path, shape=(1, 10, 10), seed=0, **kwargs) -> str:
    """Brevitas' export_qonnx (the default torch.onnx exporter; ``dynamo=False``: the
    TorchScript one, 10× faster)."""
    torch.manual_seed(seed)
    model = randomize(nn.Sequential(*layers), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(model, torch.zeros(1, *shape), str(path), **kwargs)
    return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qonnx")
    return {name: export(build(), folder / f"{name}.onnx", INPUTS.get(name, (1, 10, 10)), i)
            for i, (name, build) in enumerate(ARCHS.items())}


FORMATS = {"w1a1_chain": 1, "w1a1_pool_stride": 1, "w1a1_pad_scale": 1, "w1a2": 2,
           "w1a4_pool": 2, "w1a1_residual": 2, "w1a2_residual": 2, "w1a1_no_stem": 1,
           "w1a1_quant_input": 1}


@pytest.mark.parametrize("name", list(ARCHS))
def test_brevitas_models_import_bit_exact(exported, name, tmp_path, capsys):
    out = tmp_path / "m.bitdet"
    assert main(["import", exported[name], "--out", str(out), "--inputs", "2"]) == 0
    text = capsys.readouterr().out
    assert "all equal to qonnx" in text and f"format {FORMATS[name]}" in text
    bundle = load(out)
    assert bundle.format_version == FORMATS[name]
    assert "grid_stride" not in bundle.model and bundle.model["task"] == "features"
    result = import_qonnx(exported[name])
    report = check_bundle(result, bundle, inputs=2, seed=7)
    assert report.equal, report.difference
    assert report.tensors >= 2


def test_w1a1_bundle_runs_on_the_emulator(exported, tmp_path):
    from bitdet.sw.device import Device
    out = tmp_path / "chain.bitdet"
    assert main(["import", exported["w1a1_pool_stride"], "--out", str(out)]) == 0
    bundle = load(out)
    assert bundle.format_version == 1
    pixels = torch.randint(0, 256, (1, 2, 12, 12))
    stem = bundle.stem(pixels)
    golden = bundle.run_binary(stem.to(torch.float32) * 2 - 1)
    with Device.open("emu", "ulx3s") as device:
        device.load(bundle)
        maps = device.run_binary(stem, trace=True)
    assert len(maps) == len(golden)
    for got, want in zip(maps, golden, strict=True):
        assert torch.equal(got.to(torch.int32), want.to(torch.int32))


def test_existing_output_and_force(exported, tmp_path, capsys):
    out = tmp_path / "m.bitdet"
    out.write_bytes(b"old")
    assert main(["import", exported["w1a1_no_stem"], "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"old"
    assert main(["import", exported["w1a1_no_stem"], "--out", str(out), "--force"]) == 0
    assert load(out).format_version == 1


def test_a_difference_exits_1_and_writes_nothing(exported, tmp_path, capsys, monkeypatch):
    import bitdet.sw.qonnx_import as imp
    real = imp.check_bundle

    def broken(result, bundle, **kw):
        layer = bundle.binary_layers[0]
        object.__setattr__(layer, "thresholds", layer.thresholds + 3)   # a wrong fold
        return real(result, bundle, **kw)

    monkeypatch.setattr(imp, "check_bundle", broken)
    out = tmp_path / "m.bitdet"
    assert main(["import", exported["w1a1_chain"], "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "DIFFERENT" in captured.out and "differs" in captured.out
    assert "nothing written" in captured.err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- hand-built graphs


def _graph(nodes, inits, in_shape=(1, 2, 6, 6), out_shape=None, out="y"):
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
        initializer=[helper.make_tensor(k, TensorProto.FLOAT, list(np.shape(v)),
                                        np.asarray(v, np.float32).reshape(-1).tolist())
                     for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid(QDOM, 1)])
    model.ir_version = 8
    return model


QDOM = "qonnx.custom_op.general"


def hand_model(epilogue="bn", act="multithreshold", layout="NCHW", extra=None):
    """x → BipolarQuant → binary Conv(3×3) → epilogue → activation quantizer (→ extra)."""
    rng = np.random.default_rng(3)
    inits = {"one": [1.0], "w": rng.standard_normal((4, 2, 3, 3)),
             "g": rng.standard_normal(4), "b": rng.standard_normal(4),
             "m": rng.standard_normal(4) * 2, "v": rng.random(4) + 0.5,
             "t": np.sort(rng.standard_normal((4, 3)) * 2, axis=1), "c": [3.0]}
    nodes = [helper.make_node("BipolarQuant", ["x", "one"], ["xq"], domain=QDOM, name="in_q"),
             helper.make_node("BipolarQuant", ["w", "one"], ["wq"], domain=QDOM, name="w_q"),
             helper.make_node("Conv", ["xq", "wq"], ["c0"], kernel_shape=[3, 3], name="conv")]
    if epilogue == "bn":
        nodes.append(helper.make_node("BatchNormalization", ["c0", "g", "b", "m", "v"], ["e"],
                                      name="bn"))
    elif epilogue == "missing":
        nodes.append(helper.make_node("BatchNormalization", ["c0", "g", "b", "nope", "v"],
                                      ["e"], name="bn"))
    else:                      # 3 / x, levels at −1, 0.5, 1: not monotone in the accumulator
        nodes.append(helper.make_node("Div", ["c", "c0"], ["e"], name="div"))
        inits["t"] = np.tile([-1.0, 0.5, 1.0], (4, 1))
    if act == "multithreshold":
        nodes.append(helper.make_node("MultiThreshold", ["e", "t"], ["q"], domain=QDOM,
                                      name="mt", out_dtype="UINT2", data_layout=layout))
    else:
        nodes.append(helper.make_node("BipolarQuant", ["e", "one"], ["q"], domain=QDOM,
                                      name="act"))
    out = "q"
    if extra == "resize":
        inits["scales"] = [1.0, 1.0, 2.0, 2.0]
        nodes.append(helper.make_node("Resize", ["q", "", "scales"], ["r"], name="up",
                                      mode="nearest"))
        out = "r"
    return _graph(nodes, inits, out=out)


def test_hand_built_multithreshold_graph(tmp_path, capsys):
    import onnx
    path = tmp_path / "mt.onnx"
    onnx.save(hand_model(), path)
    out = tmp_path / "mt.bitdet"
    assert main(["import", str(path), "--out", str(out)]) == 0
    bundle = load(out)
    assert bundle.format_version == 1 and bundle.binary_layers[0].output_bits == 2
    assert bundle.host_layers == []


def _brevitas_bad(kind, tmp_path):
    if kind == "5bit":
        layers = [*stem(1, 4, act=relu(2)), *block(4, 3, relu(5), k=1)]
    elif kind == "float_stem":
        layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), bip(), *block(4, 3, bip(), k=1)]
    elif kind == "zero_pad_binary":
        layers = [*stem(1, 4), *block(4, 3, bip(), padding=1)]
    elif kind == "sigmoid":
        layers = [*stem(1, 4), *block(4, 3, bip(), k=1), nn.Sigmoid()]
    else:                      # a depthwise (grouped) binary conv
        layers = [*stem(1, 4), qnn.QuantConv2d(4, 4, 3, groups=4, bias=False,
                                               weight_quant=BinaryWeights),
                  nn.BatchNorm2d(4), bip()]
    return export(layers, tmp_path / f"{kind}.onnx", dynamo=False)


BAD = {
    "resize": ("'up' (Resize)", "not an accelerator op"),
    "non_monotone": ("'conv' (Conv)", "not monotone"),
    "missing_initializer": ("'bn' (BatchNormalization)", "missing"),
    "nhwc": ("'mt' (MultiThreshold)", "wrong layout"),
    "5bit": ("(Quant)", "5-bit activations"),
    "float_stem": ("(Conv)", "fixed point"),
    "zero_pad_binary": ("(Conv)", "zero padding is not a level"),
    "sigmoid": ("(Sigmoid)", "not an accelerator op"),
    "grouped": ("(Conv)", "grouped"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_unsupported_graphs_one_line_nothing_written(kind, tmp_path, capsys):
    import onnx
    hand = {"resize": {"extra": "resize"}, "non_monotone": {"epilogue": "div"},
            "missing_initializer": {"epilogue": "missing"}, "nhwc": {"layout": "NHWC"}}
    if kind in hand:
        path = tmp_path / f"{kind}.onnx"
        onnx.save(hand_model(**hand[kind]), path)
    else:
        path = _brevitas_bad(kind, tmp_path)
    before = set(tmp_path.iterdir())
    out = tmp_path / "bad.bitdet"
    assert main(["import", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    where, why = BAD[kind]
    assert err.count("\n") == 1 and err.startswith("bitdet: error: node "), err
    assert where in err and why in err, err
    assert set(tmp_path.iterdir()) == before
    with pytest.raises(QonnxImportError):
        import_qonnx(path)
