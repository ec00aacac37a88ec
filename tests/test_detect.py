"""`bitdet detect` (sw/detect.py, sw/cli.py): the shipped sample through the default
bundle on the emulator, folders, JSON, the frame-rate estimates, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bitdet.core.config import load_config
from bitdet.sw.cli import main
from bitdet.sw.data import make_digitscenes
from bitdet.sw.detect import (
    DEFAULT_BUNDLE,
    SAMPLE_PATH,
    SAMPLE_SEED,
    frame_rates,
    make_sample,
    run_detect,
)
from bitdet.sw.device import Device
from bitdet.sw.evaluate import bundle_decode_settings, run_bundle


def read(path):
    with Image.open(path) as image:
        image.load()
        return image.copy()


needs_default = pytest.mark.skipif(not DEFAULT_BUNDLE.exists(),
                                   reason="sw/assets/default.bitdet is not shipped yet")


def test_sample_is_the_documented_scene(tmp_path):
    made = make_sample(tmp_path / "sample.png")
    shipped = np.asarray(read(SAMPLE_PATH))
    assert np.array_equal(np.asarray(read(made)), shipped)
    scene = make_digitscenes("test", count=1, image_size=64, seed=SAMPLE_SEED)
    assert np.array_equal(scene.images[0], shipped)


@needs_default
def test_cli_on_the_sample(tmp_path, capsys):
    status = main(["detect", str(SAMPLE_PATH), "--out", str(tmp_path), "--json"])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    (image,) = report["images"]
    annotated = read(image["annotated"])
    assert annotated.size[0] >= 6 * 64 and annotated.mode == "RGB"
    # the detections are those of the integer reference pipeline
    from bitdet.core.bundle import load
    from bitdet.sw.detection import decode
    bundle = load(DEFAULT_BUNDLE)
    pixels = torch.from_numpy(np.array(read(SAMPLE_PATH))[None, None]).to(torch.int64)
    expected = decode(run_bundle(bundle, pixels),
                      **{**bundle_decode_settings(bundle), "score_threshold": 0.25})[0]
    assert [d["label"] for d in image["detections"]] == expected["labels"].tolist()
    assert len(image["detections"]) >= 1
    for det, box in zip(image["detections"], expected["boxes"].tolist(), strict=True):
        assert det["box"] == pytest.approx(box, abs=0.01)
    device = report["device"]
    config = load_config(report["config"])
    assert device["busy_cycles"] == sum(layer["busy"] for layer in device["layers"])
    assert device["estimated_fps"] == pytest.approx(config.clock_hz / device["busy_cycles"])
    assert device["link_limited_fps"] == pytest.approx(
        config.baud / 10 / (device["bytes_out"] + device["bytes_in"]))
    # the input map alone is at least H·W·words bytes
    assert device["bytes_out"] > 32 * 32 * config.simd // 8 - 1


@needs_default
def test_folder_table_and_any_image_size(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    scene = make_digitscenes("test", count=2, image_size=64, seed=9).images
    Image.fromarray(scene[0]).save(folder / "a.png")
    big = Image.fromarray(np.kron(scene[1], np.ones((2, 3), dtype=np.uint8))).convert("RGB")
    big.save(folder / "b.jpg", quality=95)                     # 128×192 RGB
    out = tmp_path / "out"
    assert main(["detect", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a.png (64×64)" in text and "b.jpg (192×128)" in text
    assert "frames/s" in text and "bconv1" in text
    assert sorted(p.name for p in out.iterdir()) == ["a.detect.png", "b.detect.png"]
    # boxes of the big image stay inside it
    report = run_detect([folder / "b.jpg"], out=None)
    for det in report["images"][0]["detections"]:
        x1, y1, x2, y2 = det["box"]
        assert 0 <= x1 < x2 <= 192 and 0 <= y1 < y2 <= 128


def test_frame_rates():
    config = load_config("icebreaker")
    rates = frame_rates(config, 24_000, 1000)
    assert rates["estimated_fps"] == pytest.approx(1000.0)
    assert rates["link_limited_fps"] == pytest.approx(100.0)
    assert rates["fps"] == pytest.approx(100.0)


@pytest.mark.parametrize("argv, message", [
    (["detect", "missing.png"], "no such image"),
    (["detect", "{sample}", "--backend", "serial"], "needs --port"),
    (["detect", "{sample}", "--config", "tiny"], "does not fit"),
    (["detect", "{sample}", "--bundle", "{bad}"], "bad.bitdet"),
    (["detect", "{bad_png}"], "not a readable image"),
    (["detect", "{sample}", "--backend", "serial", "--port", "/dev/nonexistent-tty"],
     "/dev/nonexistent-tty"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    if "{sample}" in argv and not DEFAULT_BUNDLE.exists() and "--bundle" not in argv:
        pytest.skip("needs the default bundle")
    bad = tmp_path / "bad.bitdet"
    bad.write_bytes(b"not a zip")
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG broken")
    argv = [a.format(sample=SAMPLE_PATH, bad=bad, bad_png=bad_png) for a in argv]
    status = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("bitdet: error:") and message in err


def test_config_mismatch_on_a_shared_device():
    """run_detect with a device opened elsewhere (any backend) uses that device."""
    if not DEFAULT_BUNDLE.exists():
        pytest.skip("needs the default bundle")
    with Device.open("emu", "ulx3s") as device:
        report = run_detect([SAMPLE_PATH], device=device)
    assert report["config"] == "ulx3s" and report["images"][0]["detections"]


def test_report_names_a_raw_last_layer_run_on_the_host(tmp_path, capsys):
    """`bitdet detect` with a --raw-last bundle: the table lists the raw layer on the host."""
    from bitdet.sw.models import BinaryDetector
    torch.manual_seed(1)
    model = BinaryDetector(widths=(4, 8, 8, 8, 8), raw_last=True).eval()
    path = model.export_bundle().save(tmp_path / "raw.bitdet")
    report = run_detect([SAMPLE_PATH], bundle=path, config="icebreaker", out=None)
    assert report["device"]["host_layers"] == ["bconv4"]
    assert [layer["name"] for layer in report["device"]["layers"]][-1] == "bconv3"
    assert main(["detect", str(SAMPLE_PATH), "--bundle", str(path), "--out",
                 str(tmp_path / "o")]) == 0
    assert "bconv4        raw P on the host" in capsys.readouterr().out
    assert main(["hw", "info", "--config", "icebreaker", "--bundle", str(path)]) == 0
    assert "raw last layer 'bconv4' runs on the host" in capsys.readouterr().out
