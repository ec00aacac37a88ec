"""The residual multi-bit detector (W1A2, contract v2): trained briefly, exported to a
version-2 graph bundle, saved and reloaded, the bundle's forward pass equals the float
model's eval-mode head map exactly and decodes to identical detections.

:func:`bitdet.sw.train.tiny_residual_detector` (seeded, a few seconds) is the model a test
of the emulator or the driver can run too.
"""

import pytest
import torch

from bitdet.core.bundle import load
from bitdet.core.golden import BinaryConvLayer, ChannelRepeat, PoolPass
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import decode
from bitdet.sw.evaluate import bundle_decode_settings, decode_settings
from bitdet.sw.models import LevelStem, ResidualBinaryDetector
from bitdet.sw.train import TrainingError, tiny_residual_detector, train_residual_detector


@pytest.fixture(scope="module")
def trained():
    """The tiny trained model and its bundle (seed 0)."""
    return tiny_residual_detector(0)


@pytest.fixture(scope="module")
def pixels():
    data = make_digitscenes("test", count=12, seed=3)
    return torch.from_numpy(data.images).to(torch.float32)[:, None]


def _randomize(model: ResidualBinaryDetector, seed: int) -> None:
    """BN statistics, biases, gains and steps far from their init (γ < 0 and γ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [model.stem, *model.blocks]:
            bn, o = module.bn, module.bn.num_features
            bn.running_mean.copy_(torch.randn(o, generator=gen) * 2)
            bn.running_var.copy_(torch.rand(o, generator=gen) * 10 + 0.1)
            bn.weight.copy_(torch.randn(o, generator=gen))
            bn.weight[::5] = 0.0
            bn.bias.copy_(torch.randn(o, generator=gen) * 0.5)
            module.sign_bias.copy_(torch.randn(o, generator=gen) * 0.3)
        for block in model.blocks:
            block.shortcut_gain.copy_(torch.randn(block.out_channels, generator=gen))
        for quant in {id(q): q for q in [model.stem.act, *(b.quant for b in model.blocks)]
                      }.values():
            if quant.bits > 1:
                quant.step.fill_(float(torch.rand((), generator=gen)) * 0.8 + 0.2)
                if isinstance(quant.zero, torch.nn.Parameter):
                    quant.zero.fill_(float(torch.randn((), generator=gen)) * 0.3)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=gen))


def _assert_exact(model: ResidualBinaryDetector, bundle, pixels: torch.Tensor) -> None:
    """Every map and the head map of the bundle equal the eval-mode float model's."""
    model.eval()
    with torch.no_grad():
        values = model.intermediates(pixels)
        stem = model.stem.forward_levels(pixels)
    assert torch.equal(bundle.stem(pixels), stem.to(torch.int64)), "stem levels differ"
    assert torch.equal(model.stem.act.recover(values[0]), stem)
    maps = bundle.run_graph(stem)
    for i, block in enumerate(model.blocks):
        got = maps[f"res{i + 1}"]
        assert torch.equal(block.quant.recover(values[i + 1]), got), f"block {i + 1} differs"
    head = bundle.forward(pixels.to(torch.int64))
    assert torch.equal(head, values[-1]), f"head maps differ by up to " \
        f"{float((head - values[-1]).abs().max())}"


def _detections(head: torch.Tensor, settings: dict, size) -> list[dict]:
    return decode(head, image_size=size, **settings)


# -- the trained model ---------------------------------------------------------------------

def test_reloaded_bundle_equals_the_trained_float_model(trained, pixels, tmp_path):
    model, bundle = trained
    path = bundle.save(tmp_path / "residual.bitdet")
    loaded = load(path)
    assert loaded.format_version == 2
    _assert_exact(model, bundle, pixels)
    _assert_exact(model, loaded, pixels)
    with torch.no_grad():
        reference = model.eval()(pixels)
    settings = bundle_decode_settings(loaded)
    assert settings == decode_settings(model.stride)
    size = tuple(pixels.shape[2:])
    want = _detections(reference, settings, size)
    got = _detections(loaded.forward(pixels.to(torch.int64)), settings, size)
    assert len(got) == len(want) == len(pixels)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(g[key], w[key]), f"image {i}: {key} differ"
    assert sum(len(w["scores"]) for w in want) >= len(pixels)    # not a vacuous comparison
    assert loaded.model["training"] == {"method": "residual", "epoch": 6, "seed": 0}


def test_emulator_detections_equal_the_float_models(trained, pixels, tmp_path):
    """The trained W1A2 bundle on a contract-2 device (the emulator, through command
    frames): every node's map, the head map and the detections equal the float model's."""
    from bitdet.sw.driver import Device
    model, bundle = trained
    loaded = load(bundle.save(tmp_path / "residual.bitdet"))
    settings = bundle_decode_settings(loaded)
    size = tuple(pixels.shape[2:])
    with torch.no_grad():
        reference = model.eval()(pixels)
    want = _detections(reference, settings, size)
    found = 0
    with Device.open("emu", "contract2") as device:
        device.load(loaded)
        for i in range(len(pixels)):
            image = pixels[i, 0].to(torch.uint8).numpy()
            got = device.detect(image, score_threshold=0.05, trace=i == 0)
            w = _detections(reference[i:i + 1], {**settings, "score_threshold": 0.05},
                            size)[0]
            assert torch.equal(got["head"], reference[i:i + 1]), f"image {i}: head differs"
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(got[key], w[key]), f"image {i}: {key} differ"
            found += len(w["scores"])
    assert found >= len(pixels) and sum(len(w["scores"]) for w in want) > 0


def test_exported_graph_has_two_bit_maps_and_shortcuts(trained):
    _model, bundle = trained
    assert bundle.uses_v2() and bundle.input_bits == 2
    nodes = bundle.nodes()
    convs = [n for n in nodes if isinstance(n.op, BinaryConvLayer)]
    assert [n.name for n in convs] == ["res1", "res2", "res3", "res4"]
    for node in convs:
        layer = node.op
        assert (layer.in_bits, layer.shortcut_bits, layer.output_bits) == (2, 2, 2), node.name
        assert node.shortcut is not None and layer.thresholds.shape[1:] == (4, 3)
    ops = {n.name: n.op for n in nodes}
    assert isinstance(ops["res2.pool"], PoolPass) and isinstance(ops["res3.pool"], PoolPass)
    assert ops["res2.repeat"] == ChannelRepeat(32)              # 16 → 32 channels
    assert [n.shortcut for n in convs] == ["input", "res2.repeat", "res3.pool", "res3"]
    requirements = bundle.requirements()
    assert (requirements.max_input_bits, requirements.max_shortcut_bits) == (2, 2)
    assert bundle.output_shape() == (32, 8, 8) and bundle.output_bits() == 2
    assert bundle.host_layer("stem").arrays["thresholds"].shape == (16, 3)   # 2-bit stem


# -- exactness beyond the trained weights --------------------------------------------------

@pytest.mark.parametrize("bits", [(2, 2), (1, 1), (3, 2), (2, 1)])
def test_export_is_exact_for_random_statistics(bits, pixels, tmp_path):
    stem_bits, act_bits = bits
    torch.manual_seed(sum(bits))
    model = ResidualBinaryDetector(widths=(8, 8, 16, 16), strides=(2, 1, 2),
                                   stem_bits=stem_bits, act_bits=act_bits)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):                   # training steps move BN statistics and weights
        optimizer.zero_grad()
        model(pixels[:4]).pow(2).mean().backward()
        optimizer.step()
    _randomize(model, sum(bits))
    model.eval()
    bundle = model.export_bundle()
    assert bundle.input_bits == stem_bits and bundle.output_bits() == act_bits
    _assert_exact(model, bundle, pixels[:4])
    _assert_exact(model, load(bundle.save(tmp_path / "m.bitdet")), pixels[:4])


def test_every_parameter_gets_a_gradient(pixels):
    torch.manual_seed(1)
    model = ResidualBinaryDetector()
    model.train()
    model(pixels[:4]).pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_level_stem_of_one_bit_is_the_sign_stem(pixels):
    torch.manual_seed(2)
    stem = LevelStem(1, 8, bits=1).eval()
    with torch.no_grad():
        assert set(stem(pixels[:2]).unique().tolist()) <= {-1.0, 1.0}
    layer = stem.export()
    assert layer.arrays["thresholds"].shape == (8, 1)
    assert torch.equal(layer.run(pixels[:2].to(torch.int64)),
                       stem.forward_levels(pixels[:2]).to(torch.int64))


# -- training and refusals -----------------------------------------------------------------

def test_training_is_seeded_and_lowers_the_loss():
    runs = [train_residual_detector(epochs=3, train_count=64, batch_size=16, lr=4e-3, seed=5,
                                    threads=1, model_options={"widths": (8, 8, 16),
                                                              "strides": (2, 2)})
            for _ in range(2)]
    (a, history), (b, _) = runs
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.stride == 8 and not a.training


def test_refusals():
    with pytest.raises(ValueError, match="strides needs one entry per residual block"):
        ResidualBinaryDetector(widths=(8, 16), strides=(1, 2))
    with pytest.raises(ValueError, match="stride 2 but its input is 15×15"):
        ResidualBinaryDetector(widths=(8, 8, 8), strides=(2, 2), image_size=60)
    with pytest.raises(ValueError, match="multiple of in_channels"):
        ResidualBinaryDetector(widths=(8, 12), strides=(1,))
    with pytest.raises(TrainingError, match="epochs must be positive"):
        train_residual_detector(epochs=0)
    with pytest.raises(TrainingError, match="bad residual detector options"):
        train_residual_detector(epochs=1, train_count=4, model_options={"depth": 3})
