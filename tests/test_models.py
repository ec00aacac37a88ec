"""Model zoo: the eval-mode float model and its exported bundle agree bit for bit."""

import pytest
import torch

from bitdet.hw.config import load_config
from bitdet.sw.bundle import load
from bitdet.sw.data import make_digitscenes
from bitdet.sw.models import BinaryBlock, BinaryDetector, binarize


def _randomize_statistics(model: BinaryDetector, seed: int) -> None:
    """BN statistics and biases far from their init, with γ < 0 and γ = 0 channels."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [model.stem, *model.blocks]:
            bn, o = module.bn, module.bn.num_features
            bn.running_mean.copy_(torch.randn(o, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(o, generator=gen) * 2 + 0.1)
            bn.weight.copy_(torch.randn(o, generator=gen))
            bn.weight[::7] = 0.0
            bn.bias.copy_(torch.randn(o, generator=gen) * 0.3)
            module.sign_bias.copy_(torch.randn(o, generator=gen) * 0.2)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=gen))


def _bundle_path(bundle, pixels):
    """Run a bundle the way the driver will: host stem, device layers, host head."""
    stem = bundle.host_layers[0].run(pixels.to(torch.int64))
    outputs = bundle.run_binary(stem.to(torch.float32) * 2 - 1)
    head = bundle.host_layers[1].run(outputs[-1].to(torch.float32) * 2 - 1)
    return [stem, *outputs, head]


def _assert_identical(model, bundle, pixels):
    model.eval()
    with torch.no_grad():
        reference = model.intermediates(pixels)
    exported = _bundle_path(bundle, pixels)
    assert len(reference) == len(exported)
    for i, (ref, got) in enumerate(zip(reference[:-1], exported[:-1], strict=True)):
        bits = (ref > 0).to(torch.int32)
        assert torch.equal(bits, got), f"layer {i}: {int((bits != got).sum())} bits differ"
    assert torch.equal(reference[-1], exported[-1]), "head outputs differ"


@pytest.fixture(scope="module")
def pixels():
    data = make_digitscenes("test", count=3, seed=1)
    return torch.from_numpy(data.images).to(torch.float32)[:, None]


@pytest.mark.parametrize("seed", [0, 1])
def test_exported_bundle_reproduces_the_float_model(seed, pixels, tmp_path):
    torch.manual_seed(seed)
    model = BinaryDetector()
    _randomize_statistics(model, seed)
    model.eval()
    bundle = model.export_bundle()
    _assert_identical(model, bundle, pixels)
    _assert_identical(model, load(bundle.save(tmp_path / "m.bitdet")), pixels)


def test_still_exact_after_training_steps(pixels):
    torch.manual_seed(2)
    model = BinaryDetector()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(pixels).pow(2).mean()
        loss.backward()
        optimizer.step()
    model.eval()
    _assert_identical(model, model.export_bundle(), pixels)


def test_every_parameter_gets_a_gradient(pixels):
    torch.manual_seed(3)
    model = BinaryDetector()
    model.train()
    model(pixels).pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


def test_default_detector_fits_the_icebreaker_preset():
    bundle = BinaryDetector().eval().export_bundle()
    assert load_config("icebreaker").fit_problems(bundle.requirements()) == []
    assert bundle.input_shape == (16, 32, 32)
    assert bundle.output_shape() == (128, 8, 8)


def test_binarize_sign_of_zero_and_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    y = binarize(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.0, 0.0]     # ApproxSign: 2 − 2|x|


def test_binary_block_rejects_bad_pad_value():
    with pytest.raises(ValueError, match="pad_value must be -1 or \\+1"):
        BinaryBlock(4, 4, pad_value=0)


def test_detector_rejects_mismatched_pools():
    with pytest.raises(ValueError, match="pools needs one entry per binary block"):
        BinaryDetector(widths=(8, 16, 32), pools=(True,))
