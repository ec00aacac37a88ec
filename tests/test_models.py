"""Model zoo: the eval-mode float model and its exported bundle agree bit for bit."""

import pytest
import torch

from bitdet.core.bundle import load
from bitdet.core.config import load_config
from bitdet.core.golden import run_layer
from bitdet.sw.data import make_digitscenes
from bitdet.sw.models import (
    BinaryBlock,
    BinaryConv2d,
    BinaryDetector,
    LSQQuantizer,
    binarize,
)


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


def _train_steps(model, pixels, steps: int = 2) -> None:
    """A few Adam steps on a dummy loss (train mode), so BN and weights move."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(pixels).pow(2).mean().backward()
        optimizer.step()


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


# ------------------------------------------------------------------ trainer options (models)

SMALL = {"widths": (4, 8, 8), "pools": (True, False), "image_size": 32}


def _randomize_all_bns(model: torch.nn.Module, seed: int) -> None:
    """Random running statistics (γ < 0 and γ = 0 included) on every BN of the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]:
            o = bn.num_features
            bn.running_mean.copy_(torch.randn(o, generator=gen) * 0.5)
            bn.running_var.copy_(torch.rand(o, generator=gen) * 2 + 0.1)
            bn.weight.copy_(torch.randn(o, generator=gen))
            bn.weight[::5] = 0.0
            bn.bias.copy_(torch.randn(o, generator=gen) * 0.3)


def test_default_model_has_no_new_parameters_or_buffers():
    names = set(BinaryDetector().state_dict())
    assert not any(k.startswith("shared.") or ".meta." in k or "quant" in k or "progress" in k
                   for k in names)
    assert BinaryDetector().blocks[0].conv.weight.shape == (32, 16, 3, 3)


def test_lsq_quantizer_levels_and_step_gradient():
    q = LSQQuantizer(3)                       # signed: levels −3 … 3
    assert (q.q_min, q.q_max) == (-3, 3)
    with torch.no_grad():
        q.step.fill_(0.5)
    x = torch.tensor([-4.0, -0.6, 0.1, 0.74, 1.3, 9.0], requires_grad=True)
    levels, s = q(x)
    assert levels.tolist() == [-3.0, -1.0, 0.0, 1.0, 3.0, 3.0]
    (levels * s).sum().backward()
    # LSQ: ∂x̂/∂s = −x/s + round(x/s) inside, Q_n / Q_p when clipped; scaled by g
    inside = torch.tensor([-0.6, 0.1, 0.74, 1.3])
    expected = (-3.0 + 3.0 + (-inside / 0.5 + torch.round(inside / 0.5)).sum()) \
        / (6 * 3) ** 0.5
    assert torch.allclose(q.step.grad, expected)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]     # STE inside the range
    unsigned = LSQQuantizer(2, signed=False)
    assert (unsigned.q_min, unsigned.q_max) == (0, 3)
    with pytest.raises(ValueError, match="2 to 8 bits"):
        LSQQuantizer(1)


@pytest.mark.parametrize("options", [{"host_bits": 4}, {"host_bits": 8, "ifq": True},
                                     {"ifq": True}, {"dup": 2}, {"dup_input": 2},
                                     {"binarizer": "quantnet", "dup": 2}])
def test_options_export_bit_exactly_after_training_steps(options, pixels, tmp_path):
    torch.manual_seed(8)
    model = BinaryDetector(**options)
    _train_steps(model, pixels)
    missing = [name for name, p in model.named_parameters()
               if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    _randomize_statistics(model, 3)
    model.eval()
    _assert_identical(model, load(model.export_bundle().save(tmp_path / "m.bitdet")), pixels)


def test_host_bits_use_n_bit_weights_with_the_learned_step():
    model = BinaryDetector(host_bits=3).eval()
    bundle = model.export_bundle()
    for layer in bundle.host_layers:
        assert int(abs(layer.arrays["weight"].astype(int)).max()) <= 3
    head = bundle.host_layers[1]
    assert (head.arrays["scale"] == float(model.head.quant.step.detach())).all()


def test_ifq_scales_are_powers_of_two():
    model = BinaryDetector(ifq=True).eval()
    scale = torch.from_numpy(model.export_bundle().host_layers[1].arrays["scale"]).double()
    assert torch.equal(torch.log2(scale), torch.round(torch.log2(scale)))
    assert not torch.equal(scale, torch.from_numpy(
        BinaryDetector().export_bundle().host_layers[1].arrays["scale"]).double())


def test_dup_stores_fewer_filters_and_exports_them_tiled():
    torch.manual_seed(1)
    model = BinaryDetector(dup=2, dup_input=2)
    plain = BinaryDetector()
    count = sum(b.conv.weight.numel() for b in model.blocks)
    # every block stores half the filters; the first has twice the input channels
    assert count == sum(b.conv.weight.numel() for b in plain.blocks) // 2 \
        + plain.blocks[0].conv.weight.numel() // 2
    _randomize_statistics(model, 4)
    bundle = model.eval().export_bundle()
    assert bundle.input_shape == (32, 32, 32)
    stem = bundle.host_layers[0].arrays
    assert (stem["weight"][:16] == stem["weight"][16:]).all()
    for layer in bundle.binary_layers:
        w = layer.weights.flatten(1)
        half = w.shape[0] // 2
        same, negated = (w[:half] == w[half:]).all(1), (w[:half] == -w[half:]).all(1)
        assert bool((same | negated).all())          # a copy, or a copy flipped by the BN sign
        assert not torch.equal(layer.thresholds[:half], layer.thresholds[half:])
    with pytest.raises(ValueError, match="divisor"):
        BinaryConv2d(4, 6, 3, dup=4)


def test_quantnet_is_continuous_in_training_and_signs_in_eval():
    torch.manual_seed(2)
    conv = BinaryConv2d(3, 4, 3, padding=1, binarizer="quantnet")
    w_train = conv.binary_weight()
    assert not bool(torch.isin(w_train, torch.tensor([-1.0, 1.0])).all())   # no sign, no STE
    # fully differentiable: the latent weights' gradient is that of tanh(β·m), which is not
    # the clipped straight-through estimator's (identity for |W| ≤ 1)
    w_train.sum().backward()
    assert conv.meta.net[2].weight.grad.abs().sum() > 0      # the meta-quantizer learns
    expected = torch.autograd.grad(
        torch.tanh(conv.beta() * conv.meta(conv.weight)).sum(), conv.weight)[0]
    assert torch.allclose(conv.weight.grad, expected)
    assert not torch.allclose(conv.weight.grad, torch.ones_like(conv.weight))
    conv.eval()
    assert torch.equal(conv.binary_weight(), torch.where(conv.meta(conv.weight) >= 0, 1.0, -1.0))
    x = torch.where(torch.rand(2, 3, 5, 5) < 0.5, -1.0, 1.0)
    assert torch.equal(conv.dot(x), torch.round(conv.dot(x)))
    # annealing: β grows with progress and the discretization error shrinks
    conv.train()
    before = conv.discretization_error()
    conv.progress.fill_(1.0)
    after = conv.discretization_error()
    assert conv.beta() == pytest.approx(20.0) and 0 < after < before
    after.backward()
    assert conv.meta.net[2].weight.grad.abs().sum() > 0


def test_multilevel_bn_keeps_one_set_of_statistics_per_level():
    torch.manual_seed(3)
    model = BinaryDetector(levels=2, **SMALL)
    pixels = torch.rand(4, 1, 32, 32) * 255
    model.train()
    maps = model(pixels)
    assert [tuple(m.shape[2:]) for m in maps] == [(8, 8), (4, 4)]
    assert model.level_strides == [4, 8]
    bns = model.shared.bns
    assert not torch.allclose(bns[0].running_mean, bns[1].running_mean)
    sum(m.pow(2).mean() for m in maps).backward()
    for level in range(2):
        assert bns[level].weight.grad.abs().sum() > 0
        assert model.shared.sign_biases[level].grad.abs().sum() > 0
    assert model.shared.conv.weight.grad.abs().sum() > 0
    # a level's map depends on its own BN only
    model.eval()
    with torch.no_grad():
        before = model(pixels)
        bns[1].running_mean.add_(1.0)
        after = model(pixels)
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    with pytest.raises(ValueError, match="cannot be exported"):
        model.export_bundle()


def test_multilevel_head_folds_per_level_bit_exactly():
    torch.manual_seed(4)
    model = BinaryDetector(levels=2, **SMALL)
    _randomize_all_bns(model, 5)
    with torch.no_grad():
        for b in model.shared.sign_biases:
            b.copy_(torch.randn(b.shape) * 0.2)
    model.eval()
    pixels = torch.rand(3, 1, 32, 32) * 255
    layers = model.export_level_layers()
    assert torch.equal(layers[0].weights.abs(), layers[1].weights.abs())   # shared weights
    assert not torch.equal(layers[0].thresholds, layers[1].thresholds)     # own BN each
    with torch.no_grad():
        feat = model.intermediates(pixels)[-1]
        for level, layer in enumerate(layers):
            if level:
                feat = torch.nn.functional.max_pool2d(feat, 2, 2)
            bits = (model.shared(feat, level) > 0).to(torch.int32)
            assert torch.equal(bits, run_layer(feat, layer))


@pytest.mark.parametrize("options", [{"raw_last": True}, {"raw_last": True, "ifq": True}])
def test_raw_last_exports_bit_exactly_after_training_steps(options, pixels, tmp_path):
    """A raw last block: the bundle's last layer outputs P (no thresholds) and the host
    head, with the BatchNorm folded in, reproduces the float head map exactly."""
    from bitdet.sw.evaluate import run_bundle
    torch.manual_seed(9)
    model = BinaryDetector(**options)
    _train_steps(model, pixels)
    assert model.blocks[-1].bn.weight.grad is not None
    assert bool(model.blocks[-1].bn.num_batches_tracked == 2)
    _randomize_statistics(model, 4)
    model.eval()
    bundle = load(model.export_bundle().save(tmp_path / "raw.bitdet"))
    assert bundle.binary_layers[-1].thresholds is None and bundle.requirements().raw_output
    with torch.no_grad():
        reference = model.intermediates(pixels)
        x = reference[-3]
        p = model.blocks[-1](x)
    stem = bundle.host_layers[0].run(pixels.to(torch.int64))
    outputs = bundle.run_binary(stem.to(torch.float32) * 2 - 1)
    for i, (ref, got) in enumerate(zip(reference[:-2], [stem, *outputs[:-1]], strict=True)):
        assert torch.equal((ref > 0).to(torch.int32), got), f"layer {i} differs"
    assert torch.equal(p.to(torch.int64), outputs[-1].to(torch.int64))
    assert int(p.min()) >= 0 and int(p.max()) <= bundle.binary_layers[-1].k
    assert torch.equal(reference[-1], run_bundle(bundle, pixels)), "head outputs differ"


def test_raw_last_refuses_what_it_cannot_fold():
    with pytest.raises(ValueError, match="raw_last"):
        BinaryDetector(raw_last=True, host_bits=4)
    with pytest.raises(ValueError, match="raw_last"):
        BinaryDetector(raw_last=True, levels=2)
    with pytest.raises(ValueError, match="raw_last"):
        BinaryDetector(raw_last=True, pools=(True, True, False, True))
