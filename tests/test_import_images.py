"""`bitdet import` checks on real images too: DigitScenes scenes generated at the graph
input's size (``bitdet.sw.data.make_digitscenes``, the test split, nothing downloaded) are
run through qonnx and the bundle beside the random inputs, whenever the graph reads integer
pixels (a host stem on 1 or 3 channels); ``--images N`` (default 2, 0: none).

Needs the ``import`` extra (brevitas, qonnx, onnx, onnxoptimizer); CI installs it.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():            # brevitas warns about its own deprecations
    warnings.simplefilter("ignore")
    pytest.importorskip("brevitas", reason="the `import` extra (pip install -e '.[import]') "
                        "is not installed; CI installs it")
    pytest.importorskip("qonnx", reason="the `import` extra is not installed; CI installs it")
    from test_import import bip, block, head, relu
    from test_import_v2 import Residual, export, stem, uint

import bitdet.sw.qonnx_import as imp
from bitdet.core.bundle import load
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes

MODELS = {
    # format 2 (emulator too), a float head: 1-channel integer pixels
    "gray": (lambda: [*stem(1, 5, relu(2)), Residual(5, relu(2)), *block(5, 3, bip(), k=1),
                      head(3, 2)], (1, 9, 9)),
    # format 1, a 3-channel stem: the grayscale scenes repeated
    "rgb": (lambda: [*stem(3, 4, bip()), *block(4, 3, bip(), k=1)], (3, 10, 12)),
    # not pixel-like: no stem, the input quantized straight to 2 bits
    "levels": (lambda: [uint(2), Residual(2, relu(2)), *block(2, 3, bip(), k=1)], (2, 8, 8)),
    # not pixel-like: the stem reads an 8-bit input quantizer's codes
    "input_quant": (lambda: [uint(8), *stem(1, 4, bip()), *block(4, 3, bip(), k=1)],
                    (1, 9, 9)),
    # not pixel-like: a stem on 2 channels
    "two_channels": (lambda: [*stem(2, 4, bip()), *block(4, 3, bip(), k=1)], (2, 8, 8)),
    # not pixel-like: smaller than DigitScenes' 9×9
    "tiny": (lambda: [*stem(1, 4, bip()), *block(4, 3, bip(), k=1)], (1, 8, 8)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qonnx_images")
    return {name: export(build(), folder / f"{name}.onnx", shape, seed=31 + i)
            for i, (name, (build, shape)) in enumerate(MODELS.items())}


def scenes(count, height, width, seed=0):
    """What the check must feed: the test split's scenes, independently generated."""
    return make_digitscenes("test", count=count, image_size=(height, width),
                            seed=seed).images.astype(np.float32)


@pytest.fixture
def fed(monkeypatch):
    """Every input the check runs the bundle and qonnx on (``_bundle_maps``' ``x``)."""
    seen = []
    real = imp._bundle_maps

    def recording(result, bundle, ctx, x):
        seen.append(np.array(x))
        return real(result, bundle, ctx, x)

    monkeypatch.setattr(imp, "_bundle_maps", recording)
    return seen


def _values(text: str, what: str = "check") -> int:
    line = next(line for line in text.splitlines() if line.startswith(what))
    return int(re.search(r", (\d+) values:", line).group(1))


def test_the_scenes_reach_qonnx_and_the_bundle(exported, tmp_path, capsys, fed):
    out = tmp_path / "gray.bitdet"
    assert main(["import", exported["gray"], "--out", str(out), "--inputs", "2",
                 "--images", "3", "--seed", "4"]) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    assert len(fed) == 5
    want = scenes(3, 9, 9, seed=4)
    for x, scene in zip(fed[2:], want, strict=True):
        assert x.shape == (1, 1, 9, 9) and np.array_equal(x[0, 0], scene)
    for x in fed[:2]:                           # the random inputs are not scenes
        assert not any(np.array_equal(x[0, 0], scene) for scene in want)
    assert ("on 2 random inputs and 3 DigitScenes images, " in text
            and "all equal to qonnx execute_onnx" in text), text
    assert "emulator (contract2, one RUN_LAYER per node, every map read back): " in text
    emulator = next(line for line in text.splitlines() if line.startswith("emulator ("))
    assert "on 2 random inputs and 3 DigitScenes images, " in emulator
    head_line = next(line for line in text.splitlines() if line.startswith("head "))
    found = re.search(r"= ([0-9.e-]+) on the random inputs, ([0-9.e-]+) on the DigitScenes "
                      r"images \(bound .* = ([0-9.e-]+)\)$", head_line)
    assert found, head_line
    random_error, image_error, bound = map(float, found.groups())
    assert 0 <= random_error <= bound and 0 < image_error <= bound, head_line
    assert "not run" not in text and load(out).format_version == 2

    # the same import without images: the values of 2 inputs instead of 5
    out.unlink()
    fed.clear()
    assert main(["import", exported["gray"], "--out", str(out), "--inputs", "2",
                 "--images", "0"]) == 0
    text0 = capsys.readouterr().out
    assert len(fed) == 2 and "DigitScenes" not in text0
    assert "on 2 random inputs, " in text0
    assert _values(text) * 2 == _values(text0) * 5
    assert _values(text, "emulator (") * 2 == _values(text0, "emulator (") * 5


def test_check_bundle_reports_the_images(exported):
    result = imp.import_qonnx(exported["gray"])
    report = imp.check_bundle(result, result.bundle, inputs=1, seed=2)
    assert report.equal and report.images == 0 and report.head_error_images is None
    report = imp.check_bundle(result, result.bundle, inputs=1, seed=2, images=2)
    assert report.equal and report.images == 2 and report.images_skipped is None
    assert report.head_error is not None and report.head_error_images is not None
    assert report.head_error_images <= report.head_bound
    assert report.inputs_text() == "1 random input and 2 DigitScenes images"


def test_a_three_channel_stem_gets_the_scenes_repeated(exported, tmp_path, capsys, fed):
    out = tmp_path / "rgb.bitdet"
    assert main(["import", exported["rgb"], "--out", str(out), "--inputs", "1"]) == 0
    text = capsys.readouterr().out
    assert "on 1 random input and 2 DigitScenes images, " in text
    assert len(fed) == 3
    for x, scene in zip(fed[1:], scenes(2, 10, 12), strict=True):
        assert x.shape == (1, 3, 10, 12)
        assert all(np.array_equal(x[0, c], scene) for c in range(3))


def test_a_difference_on_an_image_only_exits_1_and_writes_nothing(exported, tmp_path, capsys,
                                                                  monkeypatch):
    """A bundle that agrees with qonnx on random pixels but not on one DigitScenes scene:
    refused exactly as a random-input difference is; without images it would be written."""
    scene = scenes(2, 9, 9)[1]
    real = imp._bundle_maps

    def wrong_on_the_scene(result, bundle, ctx, x):
        maps = real(result, bundle, ctx, x)
        if np.array_equal(np.asarray(x)[0, 0], scene):
            name = bundle.nodes()[0].name
            maps[name] = maps[name].clone()
            maps[name][0, 0, 0, 0] ^= 1                 # one bit of one level
        return maps

    monkeypatch.setattr(imp, "_bundle_maps", wrong_on_the_scene)
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "gray.bitdet"
    assert main(["import", exported["gray"], "--out", str(out), "--emulator", "off"]) == 1
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith("check:"))
    assert line.startswith("check: ") and "on 3 random inputs and 2 DigitScenes images: " \
        "DIFFERENT: " in line
    assert "differs on DigitScenes image 1 at (0, 0, 0, 0)" in line
    assert captured.err.strip() == ("bitdet: error: the imported bundle differs from qonnx; "
                                    "nothing written")
    assert list(folder.iterdir()) == []
    assert main(["import", exported["gray"], "--out", str(out), "--emulator", "off",
                 "--images", "0"]) == 0
    assert "all equal to qonnx" in capsys.readouterr().out and out.exists()


@pytest.mark.parametrize(("name", "why"), [
    ("levels", "the graph input is quantized straight to a 2-bit level map (no host stem "
               "on integer pixels 0…255)"),
    ("input_quant", "the host stem reads the codes of an input Quant (8 bits), not integer "
                    "pixels 0…255"),
    ("two_channels", "the graph input has 2 channels, not an image's 1 or 3"),
    ("tiny", "the graph input is 8×8, smaller than DigitScenes' 9×9 minimum"),
])
def test_a_graph_that_does_not_read_pixels_says_so_in_one_line(exported, name, why, tmp_path,
                                                               capsys, fed):
    out = tmp_path / f"{name}.bitdet"
    assert main(["import", exported[name], "--out", str(out), "--inputs", "2"]) == 0
    text = capsys.readouterr().out
    notes = [line for line in text.splitlines() if "DigitScenes" in line]
    assert notes == [f"DigitScenes images: not run: {why}; checked on random inputs only"]
    assert "on 2 random inputs, " in text and "all equal to qonnx" in text
    assert len(fed) == 2
    out.unlink()
    assert main(["import", exported[name], "--out", str(out), "--images", "0"]) == 0
    assert "DigitScenes" not in capsys.readouterr().out       # none asked for: no note


def test_images_must_be_a_count(exported, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["import", exported["gray"], "--out", str(tmp_path / "m.bitdet"),
              "--images", "-1"])
    assert "--images" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_scene_inputs_fill_the_batch():
    """A graph with a batch of 2 takes the scenes two at a time; an odd count is topped up
    with the first scene."""
    batches = imp.scene_inputs([2, 3, 8, 9], 3, seed=1)
    want = scenes(3, 8, 9, seed=1)
    assert [index for _x, index in batches] == [[0, 1], [2, 0]]
    for x, index in batches:
        assert x.dtype == np.float32 and x.shape == (2, 3, 8, 9)
        for row, k in zip(x, index, strict=True):
            assert all(np.array_equal(row[c], want[k]) for c in range(3))
