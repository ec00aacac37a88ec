"""Every seed training method on the residual detector family (`--arch residual`): a
seconds-long smoke training of each (plain, LWS-Det, IDa-Det, BiDet, RBCN, KR, and the
model options AQD `host_bits`, QuantNet, DupNet, IFQ-Net), exported to a format-2 bundle
that the contract-2 emulator runs with head maps and detections equal to the float
model's; the constraints and refusals that keep them foldable; KR's parts. One thread.
"""

import math

import pytest
import torch

from bitdet.core.bundle import load
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import decode
from bitdet.sw.distill import (
    ResidualBiDetDetector,
    ResidualIDaDetector,
    ResidualLWSDetector,
    ResidualRBCNDetector,
    _SparseRecode,
    kr_aggregate,
    kr_losses,
)
from bitdet.sw.evaluate import bundle_decode_settings, run_bundle
from bitdet.sw.models import (
    BinaryConv2d,
    LSQQuantizer,
    ResidualBinaryDetector,
    ResidualRealDetector,
)
from bitdet.sw.train import (
    METHODS,
    TrainingError,
    export_checkpoint,
    load_checkpoint,
    residual_methods,
    run_bundle_fixed_point,
    train,
)

#: tiny residual runs: one epoch of 64 images; widths 8,16,16,16,16 so that DupNet's
#: dup 2 / dup_input 2 fit (every block width divisible by 2, 16 = 2 × 8)
TINY = {"epochs": 1, "batch_size": 16, "train_count": 64, "val_count": 0, "seed": 3,
        "widths": [8, 16, 16, 16, 16], "progress": False, "threads": 1, "arch": "residual"}

#: (run id, method, model options, student class, the method's history terms)
RUNS = [
    ("plain", "plain", {}, ResidualBinaryDetector, ()),
    ("lws", "lws", {}, ResidualLWSDetector, ("ang", "amp", "w", "lim")),
    ("ida", "ida", {}, ResidualIDaDetector, ("p", "r")),
    ("bidet", "bidet", {}, ResidualBiDetDetector, ("reg", "prior")),
    ("rbcn", "rbcn", {}, ResidualRBCNDetector, ("kernel", "disc", "gen")),
    ("kr", "kr", {}, ResidualBinaryDetector, ("ka",)),
    ("aqd", "plain", {"host_bits": 4}, ResidualBinaryDetector, ()),
    ("quantnet", "plain", {"binarizer": "quantnet"}, ResidualBinaryDetector, ("quant",)),
    ("dupnet", "plain", {"dup": 2, "dup_input": 2}, ResidualBinaryDetector, ()),
    ("ifq", "plain", {"ifq": True}, ResidualBinaryDetector, ()),
    ("w1a1-bidet", "bidet", {"act_bits": 1}, ResidualBiDetDetector, ("reg", "prior")),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("residual_methods")


@pytest.fixture(scope="module")
def teacher(root):
    """The residual fp counterpart (one epoch) of the teacher methods."""
    return train("fp", out_dir=root / "fp", **TINY).checkpoint


@pytest.fixture(scope="module")
def pixels():
    data = make_digitscenes("test", count=3, seed=1)
    return torch.from_numpy(data.images).to(torch.float32)[:, None]


def _run(root, teacher, name):
    """The run ``name`` of :data:`RUNS`, trained once per module and exported:
    ``(TrainResult, bundle path)``."""
    if name not in _CACHE:
        _name, method, options, _cls, _terms = next(r for r in RUNS if r[0] == name)
        extra = {"teacher": teacher} if METHODS[method].needs_teacher else {}
        result = train(method, out_dir=root / name, model_options=options, **TINY, **extra)
        _CACHE[name] = result, export_checkpoint(result.checkpoint, root / f"{name}.bitdet")
    return _CACHE[name]


_CACHE: dict = {}


@pytest.mark.parametrize("name, method, options, cls, terms", RUNS, ids=[r[0] for r in RUNS])
def test_method_trains_exports_and_runs_exactly_on_the_emulator(
        name, method, options, cls, terms, root, teacher, pixels):
    from bitdet.sw.driver import Device
    result, path = _run(root, teacher, name)
    entry = result.history[-1]
    for term in terms:                               # the method's losses ran, finite
        assert math.isfinite(entry[f"train_{term}"]), term
    model, ckpt = load_checkpoint(result.checkpoint)
    assert type(model) is cls and ckpt["config"]["arch"] == "residual"
    for key, value in options.items():
        assert ckpt["config"]["model"][key] == value, key
    bundle = load(path)
    assert bundle.format_version == 2 and bundle.model["training"]["method"] == method
    with torch.no_grad():
        reference = model(pixels)
    assert torch.equal(run_bundle(bundle, pixels.to(torch.int64)), reference)
    settings = {**bundle_decode_settings(bundle), "score_threshold": 0.0}
    size = tuple(pixels.shape[2:])
    found = 0
    with Device.open("emu", "contract2") as device:
        device.load(bundle)
        for i in range(len(pixels)):
            got = device.detect(pixels[i, 0].to(torch.uint8).numpy(), score_threshold=0.0)
            assert torch.equal(got["head"], reference[i:i + 1]), f"image {i}: head differs"
            want = decode(reference[i:i + 1], image_size=size, **settings)[0]
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(got[key], want[key]), f"image {i}: {key} differ"
            found += len(want["scores"])
    assert found > 0                                 # not a vacuous comparison


def test_every_method_has_a_residual_student():
    assert residual_methods() == list(METHODS)


def test_model_options_shape_the_residual_model(root, teacher):
    """AQD's n-bit host weights, QuantNet's meta-quantizer, DupNet's tiled filters and
    repeated stem map, IFQ-Net's power-of-two scales are really there (not defaults)."""
    def model(name):
        return load_checkpoint(_run(root, teacher, name)[0].checkpoint)[0]
    aqd = model("aqd")
    with torch.no_grad():
        for layer in (aqd.stem, aqd.head):
            w_int, *_ = layer._quantized()
            assert float(w_int.abs().max()) <= 7        # 4-bit signed LSQ levels
    quantnet = model("quantnet")
    convs = [m for m in quantnet.modules() if isinstance(m, BinaryConv2d)]
    assert convs and all(c.binarizer == "quantnet" and float(c.progress) > 0 for c in convs)
    dupnet = model("dupnet")
    assert dupnet.blocks[0].conv.weight.shape[0] == 8 and dupnet.blocks[0].in_channels == 16
    bundle = load(_run(root, teacher, "dupnet")[1])
    assert bundle.input_shape[0] == 16
    stem = bundle.host_layer("stem").arrays["weight"]
    assert (stem[:8] == stem[8:]).all()
    ifq = load(_run(root, teacher, "ifq")[1])
    scale = torch.from_numpy(ifq.host_layer("head").arrays["scale"]).double()
    assert torch.equal(torch.exp2(torch.round(torch.log2(scale))), scale)


def test_ifq_integer_path_of_a_residual_bundle(root, teacher, pixels):
    bundle = load(_run(root, teacher, "ifq")[1])
    acc, frac = run_bundle_fixed_point(bundle, pixels.to(torch.int64))
    assert acc.dtype == torch.int64
    head = torch.ldexp(acc.double(), -frac.reshape(1, -1, 1, 1)).float()
    assert torch.equal(head, run_bundle(bundle, pixels.to(torch.int64)))
    with pytest.raises(ValueError, match="not powers of two"):
        run_bundle_fixed_point(load(_run(root, teacher, "plain")[1]), pixels.to(torch.int64))


def test_aqd_learned_interval_quantizer_drives_the_device_activations():
    """The residual blocks' activation quantizer is AQD's learned-interval (LSQ) quantizer
    in unsigned mode plus a zero point, and its learned step folds into the device
    layer's thresholds."""
    torch.manual_seed(0)
    model = ResidualBinaryDetector(widths=(8, 8, 16, 16, 16), host_bits=4)
    quant = model.blocks[0].quant
    lsq = LSQQuantizer(2, signed=False)
    pre = torch.randn(2, 8, 4, 4) * 2
    with torch.no_grad():
        lsq.step.fill_(float(quant.scale()))
    q, s = lsq(pre)
    assert torch.equal(quant(pre), q * s + quant.zero)              # training mode
    quant.eval()
    assert torch.equal(quant.levels(pre), q.to(torch.int32))
    model.eval()
    before = model.blocks[0].to_device().thresholds.clone()
    with torch.no_grad():
        quant.step.mul_(1.5)
    assert not torch.equal(model.blocks[0].to_device().thresholds, before)


def test_kr_sparse_recoding_and_aggregation():
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    grad = torch.randn(4, 3, 3, 3)
    _SparseRecode.apply(w, 0.1).backward(grad)
    kept = w.grad != 0
    assert int(kept.sum()) == math.ceil(0.1 * w.numel())
    assert float(w.grad.abs()[kept].min()) >= float(grad.abs()[~kept].max())
    assert torch.equal(w.grad[kept], grad[kept])
    assert kr_aggregate(w).shape == (4, 3)
    assert torch.allclose(kr_aggregate(w * 10), kr_aggregate(w))    # scale-free


def test_kr_loss_moves_the_latent_weights_towards_the_teacher():
    torch.manual_seed(0)
    kwargs = {"widths": (8, 8, 16, 16, 16)}
    student, teacher = ResidualBinaryDetector(**kwargs), ResidualRealDetector(**kwargs)
    pixels = torch.rand(2, 1, 64, 64) * 255
    _head, terms = kr_losses(student, teacher, pixels, [], {"ka": 1.0, "rho": 0.25})
    terms["ka"].backward()
    for block, t_block in zip(student.blocks, teacher.blocks, strict=True):
        g = block.conv.weight.grad
        assert 0 < int((g != 0).sum()) <= math.ceil(0.25 * g.numel())
        assert t_block.conv.weight.grad is None
    with torch.no_grad():
        before = terms["ka"].item()
        for block in student.blocks:
            block.conv.weight -= 0.01 * block.conv.weight.grad
        after = kr_losses(student, teacher, pixels, [], {"ka": 1.0, "rho": 0.25})[1]["ka"]
    assert after.item() < before


@pytest.mark.parametrize("method, options, message", [
    ("plain", {"levels": 2}, "levels are for arch 'chain'"),
    ("plain", {"raw_last": True}, "raw_last are for arch 'chain'"),
    ("plain", {"dup": 3}, "dup 3 must divide every residual block's width"),
    ("plain", {"dup_input": 4}, "dup_input 4: the first block's width 16"),
    ("bidet", {"binarizer": "quantnet"}, "available for method(s) plain, not 'bidet'"),
    ("plain", {"host_bits": 9}, "host_bits must be an integer from 2 to 8"),
])
def test_refusals_on_the_residual_family(method, options, message, tmp_path):
    with pytest.raises(TrainingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(method, out_dir=tmp_path / "x", model_options=options, **TINY)


def test_kr_option_checks(teacher, tmp_path):
    with pytest.raises(TrainingError, match="rho"):
        train("kr", out_dir=tmp_path / "x", teacher=teacher, options={"rho": 0.0}, **TINY)
