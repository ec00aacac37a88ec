"""`bitdet import --head-config`: a Brevitas W1A2 residual detector imported from QONNX with
a head YAML runs as a detector in `bitdet detect` (emulator, the contract-2 build).

What is compared (docs/import.md, "A detection head"):

* **exactly**: the detections `bitdet detect` prints (the bundle's binary graph on the
  contract-2 emulator, the host head, the decoder) equal those implied by the Brevitas
  model's quantized outputs: its last quantized activation map (a forward hook), mapped to
  levels, through the bundle's fixed-point head and bitdet's decoder. The binary part is
  bit exact (the import checks every quantized tensor against qonnx), so nothing may
  differ, not even a rounding digit of the JSON report;
* **within the documented bound**: the Brevitas model's own head output (a float
  ``nn.Conv2d``) against the bundle's int8 fixed-point head, cell by cell and channel by
  channel, ``|Δ| ≤ scale·(K·max|x| + 1)/2`` (:func:`head_error_bound`), and the decoded
  scores and boxes of every cell within the bounds that follow from it.

Plus the head YAML's validation (each error one line, nothing written), the feature bundle
that an import without ``--head-config`` writes (`bitdet detect` refuses it in one line), and
the docs example itself, trained briefly on DigitScenes (run from the code in
docs/import.md).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

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
    from brevitas.quant import Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint
    from test_import import bconv, randomize

from PIL import Image

from bitdet.core.bundle import load
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import MAX_LOG_SIZE, decode, head_boxes
from bitdet.sw.qonnx_import import head_error_bound, load_head_config

DOCS = Path(__file__).resolve().parents[1] / "docs" / "import.md"
CLASSES = 3
#: the random model's head writes class logits, box, objectness: bitdet's head-map channel
#: ``j`` (objectness, tx, ty, tw, th, classes) is the graph output's channel ``PERM[j]``
PERM = [7, 3, 4, 5, 6, 0, 1, 2]
HEAD_YAML = """\
classes: [ant, bee, cat]
stride: 4
grid: [8, 8]
channels:               # the graph writes class logits, box, objectness
  objectness: 7
  box: [3, 4, 5, 6]
  classes: 0
box_prior: 6
score_threshold: 0.05
nms_iou: 0.5
"""


# ------------------------------------------------------------------------- the models


def act2():
    return qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint, bit_width=2)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv, self.bn, self.act = bconv(c, c, 3, padding=1), nn.BatchNorm2d(c), act2()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


class Down(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = bconv(c, 2 * c, 3, stride=2, padding=1)
        self.bn, self.act, self.pool = nn.BatchNorm2d(2 * c), act2(), nn.MaxPool2d(2)

    def forward(self, x):
        s = self.pool(x)
        return self.act(self.bn(self.conv(x)) + torch.cat([s, s], dim=1))


def small_detector(seed=0):
    """32×32 pixels → 4×16×16 (host stem) → Down → Block → 8×8 grid of stride 4, a float
    head of 5 + 3 channels in the order of :data:`PERM`; random weights and BN statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        qnn.QuantConv2d(1, 4, 3, stride=2, padding=1, bias=False,
                        weight_quant=Int8WeightPerTensorFixedPoint),
        nn.BatchNorm2d(4), act2(), Down(4), Block(8), nn.Conv2d(8, 5 + CLASSES, 1))
    model = randomize(model, seed)
    with torch.no_grad():                    # a head with some confident cells
        model[-1].weight.mul_(20)
    return model.eval()


def export(model, path, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_qonnx(model, torch.zeros(1, 1, size, size), str(path), dynamo=False)
    return str(path)


def last_levels_and_head(model, pixels: torch.Tensor):
    """The Brevitas model on integer pixels: its last quantized map as levels (the input of
    its head, value = level · scale) and its float head output."""
    seen = {}
    act = model[-2].act
    hook = act.register_forward_hook(lambda _m, _i, out: seen.setdefault("map", out))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = model(pixels.float())
        scale = float(act.act_quant.scale())
    hook.remove()
    values = seen["map"].value if hasattr(seen["map"], "value") else seen["map"]
    levels = torch.round(values / scale)
    assert torch.equal(levels * scale, values) and levels.min() >= 0 and levels.max() <= 3
    return levels.to(torch.int32), head


# ------------------------------------------------------------------------- comparisons


def scenes(tmp_path, size, count=3):
    data = make_digitscenes("test", count=count, image_size=size, seed=7)
    files = []
    for i, image in enumerate(data.images):
        files.append(tmp_path / f"scene{i}.png")
        Image.fromarray(image).save(files[-1])
    return files, torch.from_numpy(np.asarray(data.images)).to(torch.int64)[:, None]


def detect_json(files, bundle_path, tmp_path, capsys, *extra):
    capsys.readouterr()
    assert main(["detect", *map(str, files), "--bundle", str(bundle_path), "--out",
                 str(tmp_path / "annotated"), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def implied_detections(bundle, levels, score_threshold):
    """What the Brevitas model's quantized outputs imply: the bundle's host head on its last
    map, bitdet's decoder with the bundle's stride and prior and `bitdet detect`'s score
    threshold, NMS IoU 0.5 and 100 detections at most; as `bitdet detect` reports them."""
    head = bundle.head(levels)
    found = decode(head, stride=bundle.model["grid_stride"],
                   prior=bundle.model["decode"]["prior"], score_threshold=score_threshold,
                   iou_threshold=0.5, max_detections=100)
    names = bundle.model["classes"]
    return head, [[{"label": int(label), "class": names[label], "score": round(float(s), 4),
                    "box": [round(float(v), 2) for v in box]}
                   for box, s, label in zip(f["boxes"], f["scores"], f["labels"].tolist(),
                                            strict=True)] for f in found]


def assert_float_head_within_bound(bundle, fixed, float_head):
    """The float head (bitdet's channel order) against the fixed-point one: every value
    within :func:`head_error_bound` (plus float32 rounding), and the decoded per-cell scores
    and boxes within the bounds that implies (sigmoid is 1/4-Lipschitz; a max softmax moves
    by at most a factor e^{±2E} under logit errors ≤ E; the size by a factor e^{±E})."""
    bits = bundle.output_bits()
    bound = torch.from_numpy(head_error_bound(bundle.host_layer("head"),
                                              1 if bits == 1 else 2 ** bits - 1)).float()
    slack = 1e-5 * (1 + float_head.abs().amax())
    diff = (fixed - float_head).abs()
    assert (diff <= bound.reshape(1, -1, 1, 1) + slack).all(), float((diff - bound.reshape(
        1, -1, 1, 1)).max())
    assert diff.amax() > 0                          # the head is fixed point, not the float one
    e = bound + slack
    e_cls = float(e[5:].max())
    stride, prior = bundle.model["grid_stride"], bundle.model["decode"]["prior"]

    def score(h):
        return torch.sigmoid(h[:, 0]) * torch.softmax(h[:, 5:], dim=1).amax(dim=1)

    assert ((score(fixed) - score(float_head)).abs()
            <= float(e[0]) / 4 + math.expm1(2 * e_cls) + 1e-6).all()
    size = prior * torch.exp(torch.maximum(fixed[:, 3:5], float_head[:, 3:5])
                             .clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE)).permute(0, 2, 3, 1)
    centre = stride * e[1:3] / 4
    grow = size * torch.expm1(e[3:5]) / 2
    box_bound = torch.cat([centre + grow, centre + grow], dim=-1) + 1e-4
    box_diff = (head_boxes(fixed, stride, prior=prior)
                - head_boxes(float_head, stride, prior=prior)).abs()
    assert (box_diff <= box_bound).all()
    top2 = float_head[:, 5:].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * e_cls    # labels agree where the margin is clear
    assert torch.equal(fixed[:, 5:].argmax(1)[clear], float_head[:, 5:].argmax(1)[clear])


# ------------------------------------------------------------------------- random model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("head")
    model = small_detector()
    (folder / "head.yaml").write_text(HEAD_YAML)
    return model, export(model, folder / "small.onnx", 32), folder / "head.yaml"


def test_random_detector_head_mapping_detects_like_brevitas(small, tmp_path, capsys):
    model, onnx, yaml_path = small
    out = tmp_path / "small.bitdet"
    assert main(["import", onnx, "--out", str(out), "--head-config", str(yaml_path)]) == 0
    text = capsys.readouterr().out
    assert "all equal to qonnx execute_onnx" in text and "emulator (contract2" in text
    assert ("detection head: 3 classes (ant, bee, cat), grid 8×8 stride 4, box prior 6 px, "
            f"graph channels {PERM} → bitdet's order; score ≥ 0.05, NMS IoU 0.5, at most 100 "
            "detections") in text
    bundle = load(out)
    assert bundle.format_version == 2 and bundle.model["input"] == [1, 32, 32]
    assert bundle.model["task"] == "detection" and bundle.model["grid_stride"] == 4
    assert bundle.model["classes"] == ["ant", "bee", "cat"]
    assert bundle.model["decode"] == {"prior": 6.0, "score_threshold": 0.05,
                                      "iou_threshold": 0.5, "max_detections": 100}
    assert bundle.decode_settings() == {"stride": 4, "prior": 6.0}

    files, pixels = scenes(tmp_path, 32)
    report = detect_json(files, out, tmp_path, capsys, "--score-threshold", "0.05")
    assert report["config"] == "contract2" and report["backend"] == "emu"
    levels, float_head = last_levels_and_head(model, pixels)
    fixed, expected = implied_detections(bundle, levels, 0.05)
    got = [image["detections"] for image in report["images"]]
    assert got == expected
    assert sum(map(len, got)) >= 3 and len({d["label"] for g in got for d in g}) >= 2
    # the graph's channel order: bitdet's head map is the float head permuted by PERM
    assert_float_head_within_bound(bundle, fixed, float_head[:, PERM])


def test_without_permutation_the_head_map_is_the_graph_order(small, tmp_path, capsys):
    """The same graph read in the graph's order (no ``channels``): a different head map,
    the graph's channels as they are (so ``channels`` really permutes)."""
    model, onnx, _ = small
    plain = tmp_path / "plain.yaml"
    plain.write_text("num_classes: 3\nnms_iou: 0.3\nmax_detections: 7\n")
    out = tmp_path / "plain.bitdet"
    assert main(["import", onnx, "--out", str(out), "--head-config", str(plain),
                 "--emulator", "off"]) == 0
    assert "graph channels" not in capsys.readouterr().out
    bundle = load(out)
    assert bundle.model["grid_stride"] == 4 and "classes" not in bundle.model
    assert bundle.model["num_classes"] == 3 and bundle.model["decode"] == {
        "prior": 16.0, "score_threshold": 0.25, "iou_threshold": 0.3, "max_detections": 7}
    assert bundle.model["head_config"]["graph_channels"] == list(range(8))
    levels, float_head = last_levels_and_head(model, torch.randint(0, 256, (2, 1, 32, 32)))
    fixed = bundle.head(levels)
    assert_float_head_within_bound(bundle, fixed, float_head)
    assert not torch.allclose(fixed, float_head[:, PERM], atol=0.5)


# ------------------------------------------------------------------------- validation


def _graph_errors():
    return [
        ("num_classes: 4\n", "key 'classes': 4 classes need 5 + 4 = 9 head channels "
         "(objectness, 4 box, classes), but the graph output"),
        ("classes: 3\nchannels: {objectness: 8, box: [3, 4, 5, 6], classes: 0}\n",
         "key 'channels.objectness': channel 8 is out of range (the graph output has 8 "
         "channels, 0…7)"),
        ("classes: 3\nstride: 8\n", "key 'stride': 8 × the 8×8 grid is 64×64, but the input "
         "is 32×32"),
        ("classes: 3\ngrid: [4, 4]\n", "key 'grid': [4, 4] but the graph output is a 8×8 grid"),
    ]


def _file_errors():
    return [
        ("classes: 3\nklasses: 3\n", "key 'klasses': unknown key (known: classes, "),
        ("classes: 3\nstride: eight\n", "key 'stride': must be an integer >= 1"),
        ("classes: 3\nstride: true\n", "key 'stride': must be an integer >= 1"),
        ("classes: [a, a, b]\n", "key 'classes': repeats a name ('a')"),
        ("classes: [a, b]\nnum_classes: 3\n", "key 'num_classes': 3 but classes lists 2 names"),
        ("classes: {a: 1}\n", "key 'classes': must be a non-empty list of class names"),
        ("stride: 4\n", "key 'classes': missing"),
        ("classes: 3\nscore_threshold: 1.5\n", "key 'score_threshold': must be a number in "
         "[0, 1], not 1.5"),
        ("classes: 3\nnms_iou: high\n", "key 'nms_iou': must be a number in [0, 1]"),
        ("classes: 3\nbox_prior: 0\n", "key 'box_prior': must be a positive number"),
        ("classes: 3\nmax_detections: 0\n", "key 'max_detections': must be an integer >= 1"),
        ("classes: 3\nbox_encoding: yolov5\n", "key 'box_encoding': 'yolov5' is not decoded"),
        ("classes: 3\nchannels: {objectness: 0, box: [1, 2, 3], classes: 5}\n",
         "key 'channels.box': must be 4 channel indices"),
        ("classes: 3\nchannels: {objectness: 0, box: [1, 2, 3, 4]}\n",
         "key 'channels.classes': missing"),
        ("classes: 3\nchannels: {objectness: 0, box: [0, 1, 2, 3], classes: 4}\n",
         "key 'channels': channel 0 is used twice"),
        ("classes: 3\nchannels: {objectness: 0, box: [1, 2, 3, 4], classes: [5, 6]}\n",
         "key 'channels.classes': lists 2 channels for 3 classes"),
        ("classes: 3\nchannels: {obj: 0}\n", "key 'channels.obj': unknown key"),
        ("classes: [a, b\n", "not valid YAML at line 2"),
        ("- a\n- b\n", "a head config is a mapping of keys"),
        ("", "a head config is a mapping of keys"),
    ]


@pytest.mark.parametrize("text, message", _file_errors() + _graph_errors())
def test_head_config_errors_one_line_nothing_written(small, tmp_path, capsys, text, message):
    _model, onnx, _ = small
    config = tmp_path / "head.yaml"
    config.write_text(text)
    out = tmp_path / "m.bitdet"
    assert main(["import", onnx, "--out", str(out), "--head-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bitdet: error: head.yaml: "), err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.yaml"]
    if (text, message) in _file_errors():      # refused before the graph is read
        with pytest.raises(ValueError, match=re.escape(message)):
            load_head_config(config)


def test_head_config_missing_file_and_a_graph_without_head(small, tmp_path, capsys):
    _model, onnx, _ = small
    out = tmp_path / "m.bitdet"
    assert main(["import", onnx, "--out", str(out), "--head-config",
                 str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml: no such head config file" in err
    torch.manual_seed(1)
    features = randomize(nn.Sequential(*small_detector()[:-1]), 1).eval()  # no head
    path = export(features, tmp_path / "features.onnx", 32)
    config = tmp_path / "head.yaml"
    config.write_text("classes: 3\n")
    assert main(["import", path, "--out", str(out), "--head-config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "head.yaml: the graph has no host head" in err
    assert not out.exists()


# ------------------------------------------------------------------------- feature bundle


def test_a_feature_bundle_is_refused_by_detect_in_one_line(small, tmp_path, capsys):
    model, onnx, _ = small
    out = tmp_path / "features.bitdet"
    assert main(["import", onnx, "--out", str(out), "--emulator", "off"]) == 0
    capsys.readouterr()
    bundle = load(out)
    assert bundle.model["task"] == "features" and "grid_stride" not in bundle.model
    assert bundle.model["input"] == [1, 32, 32]
    assert bundle.model["input_kind"] == {"kind": "integer pixels", "range": [0, 255]}
    files, pixels = scenes(tmp_path, 32, count=1)
    assert main(["detect", str(files[0]), "--bundle", str(out), "--out",
                 str(tmp_path / "annotated")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'features' bundle has no detection head" in err
    assert "bitdet import --head-config H.yaml" in err
    # the driver still runs it: the graph's maps on the contract-2 emulator
    from bitdet.sw.driver import Device
    levels, _ = last_levels_and_head(model, pixels)
    with Device.open("emu", "contract2") as device:
        device.load(bundle)
        maps = device.run_graph(bundle.stem(pixels).to(torch.int32))
    assert torch.equal(maps[bundle.nodes()[-1].name].to(torch.int32), levels)


# ------------------------------------------------------------------------- the docs example


def docs_blocks():
    """The docs example's Python code and head YAML (docs/import.md, the blocks after the
    ``<!-- head-example -->`` marker)."""
    text = DOCS.read_text()
    tail = text[text.index("<!-- head-example -->"):]
    code = re.search(r"```python\n(.*?)```", tail, re.S).group(1)
    head = re.search(r"```yaml\n(.*?)```", tail, re.S).group(1)
    return code, head


def run_docs_example(folder: Path, steps: int, monkeypatch) -> dict:
    code, _ = docs_blocks()
    assert "for step in range(300):" in code
    monkeypatch.chdir(folder)
    namespace: dict = {}
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code.replace("range(300)", f"range({steps})"), str(DOCS), "exec"),
             namespace)
    return namespace


def _loss(namespace, count=64):
    from bitdet.sw.detection import detection_loss, encode_targets
    data = make_digitscenes("val", count=count, seed=3)
    pixels = torch.from_numpy(np.asarray(data.images)).float()[:, None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = namespace["model"].eval()(pixels)
    targets = encode_targets([data[i][1] for i in range(count)], grid=(8, 8), stride=8)
    return float(detection_loss(head, targets, stride=8)[0])


def _docs_example(tmp_path, capsys, monkeypatch, steps):
    untrained = run_docs_example(tmp_path, 0, monkeypatch)
    namespace = run_docs_example(tmp_path, steps, monkeypatch)
    assert _loss(namespace) < 0.5 * _loss(untrained)           # it learned something
    _, head = docs_blocks()
    (tmp_path / "head.yaml").write_text(head)
    assert main(["import", "digits.onnx", "--out", "digits.bitdet", "--head-config",
                 "head.yaml"]) == 0
    text = capsys.readouterr().out
    assert "emulator (contract2" in text and "wrote digits.bitdet" in text
    assert ("detection head: 10 classes (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), grid 8×8 stride 8, "
            "box prior 16 px; score ≥ 0.25, NMS IoU 0.5") in text
    bundle = load(tmp_path / "digits.bitdet")
    files, pixels = scenes(tmp_path, 64, count=4)
    threshold = 0.1
    report = detect_json(files, "digits.bitdet", tmp_path, capsys, "--score-threshold",
                         str(threshold))
    model = namespace["model"].eval()
    levels, float_head = last_levels_and_head(model, pixels)
    fixed, expected = implied_detections(bundle, levels, threshold)
    got = [image["detections"] for image in report["images"]]
    assert got == expected and sum(map(len, got)) >= 1
    assert_float_head_within_bound(bundle, fixed, float_head)


def test_docs_example_trained_briefly(tmp_path, capsys, monkeypatch):
    """The docs example with 60 training steps instead of 300 (a few seconds)."""
    _docs_example(tmp_path, capsys, monkeypatch, steps=60)


@pytest.mark.slow
def test_docs_example_as_written(tmp_path, capsys, monkeypatch):
    """The docs example verbatim: 300 steps (about 20 s on one core)."""
    _docs_example(tmp_path, capsys, monkeypatch, steps=300)
