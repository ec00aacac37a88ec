"""`bitdet detect` (sw/detect.py, sw/cli.py): the shipped sample through the default
bundle on the emulator, folders, JSON, the frame-rate estimates, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
from bitdet.sw.driver.device import Device
from bitdet.sw.driver.errors import DriverError
from bitdet.sw.evaluate import bundle_decode_settings, run_bundle


def read(path):
    with Image.open(path) as image:
        image.load()
        return image.copy()


def test_the_default_bundle_is_shipped():
    """The tests below need the shipped detector; a missing one fails here (not a skip)."""
    assert DEFAULT_BUNDLE.is_file(), f"{DEFAULT_BUNDLE} is missing (it is shipped)"


def test_sample_is_the_documented_scene(tmp_path):
    made = make_sample(tmp_path / "sample.png")
    shipped = np.asarray(read(SAMPLE_PATH))
    assert np.array_equal(np.asarray(read(made)), shipped)
    scene = make_digitscenes("test", count=1, image_size=64, seed=SAMPLE_SEED)
    assert np.array_equal(scene.images[0], shipped)


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
    config = dataclasses.replace(load_config("icebreaker"), clock_hz=24_000_000,
                                 baud=1_000_000)
    rates = frame_rates(config, 24_000, 1000)
    assert rates["estimated_fps"] == pytest.approx(1000.0)
    assert rates["link_limited_fps"] == pytest.approx(100.0)
    # link and device take turns: 1 ms of compute + 10 ms of link per frame
    assert rates["fps"] == pytest.approx(1 / (0.001 + 0.010))


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
    """run_detect with a device opened elsewhere (any backend) uses that device; a config
    that differs from the device's is an error naming both, one that equals it is fine."""
    with Device.open("emu", "ulx3s") as device:
        report = run_detect([SAMPLE_PATH], device=device)
        assert report["config"] == "ulx3s" and report["images"][0]["detections"]
        with pytest.raises(DriverError, match=r"config 'icebreaker' .* given, but the device "
                                              r"was opened with 'ulx3s'"):
            run_detect([SAMPLE_PATH], device=device, config="icebreaker")
        assert run_detect([SAMPLE_PATH], device=device, config="ulx3s")["config"] == "ulx3s"


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


# -- nothing lost, nothing silent ----------------------------------------------------------------

def _one_line(status, err, fragment):
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("bitdet: error:"), err
    assert fragment in err, err


def test_detect_refuses_to_replace_annotated_pngs(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["detect", str(SAMPLE_PATH), "--out", str(out)]) == 0
    target = out / "sample.detect.png"
    target.write_bytes(b"mine")
    capsys.readouterr()
    status = main(["detect", str(SAMPLE_PATH), "--out", str(out)])
    _one_line(status, capsys.readouterr().err, f"{target}: already exists (pass --force")
    assert target.read_bytes() == b"mine"
    assert main(["detect", str(SAMPLE_PATH), "--out", str(out), "--force"]) == 0
    assert read(target).mode == "RGB"
    assert sorted(p.name for p in out.iterdir()) == ["sample.detect.png"]   # no temp files


def test_detect_gives_inputs_of_one_stem_unique_outputs(tmp_path, capsys):
    for name in ("d1/scene.png", "d2/scene.png", "d1/scene.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.open(SAMPLE_PATH).convert("RGB").save(tmp_path / name)
    files = [tmp_path / n for n in ("d1/scene.png", "d2/scene.png", "d1/scene.jpg")]
    out = tmp_path / "out"
    assert main(["detect", *map(str, files), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    annotated = [image["annotated"] for image in report["images"]]
    assert len(set(annotated)) == 3 and all(Path(a).is_file() for a in annotated)
    assert [image["file"] for image in report["images"]] == list(map(str, files))
    assert sorted(p.name for p in out.iterdir()) == [
        "d1-scene.png.detect.png", "d2-scene.png.detect.png", "scene.jpg.detect.png"]


@pytest.mark.parametrize("value", ["nan", "-1", "1.5", "inf", "x"])
def test_score_threshold_must_be_in_the_unit_interval(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["detect", str(SAMPLE_PATH), "--score-threshold", value])
    assert exc.value.code == 2
    assert "expected a number in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"score threshold must"):
        run_detect([SAMPLE_PATH], out=None, score_threshold=float(value)
                   if value != "x" else value)


def test_a_transparent_image_is_black_not_its_hidden_pixels(tmp_path):
    """RGBA: alpha is composited over black (DigitScenes' background), so a fully
    transparent copy of the sample has no detections, an opaque one the sample's."""
    gray = np.asarray(read(SAMPLE_PATH))
    rgba = np.stack([gray, gray, gray, np.zeros_like(gray)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    report = run_detect([tmp_path / "clear.png", tmp_path / "opaque.png"], out=None)
    clear, opaque = report["images"]
    assert clear["detections"] == []
    assert opaque["detections"] == run_detect([SAMPLE_PATH], out=None)["images"][0][
        "detections"]


def _png_header_only(path, width, height):
    """A PNG whose header claims width × height (no pixel data: never decoded)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [9000, 15000])      # below / above PIL's own bomb error
def test_a_huge_image_is_a_one_line_error(side, tmp_path, capsys):
    huge = tmp_path / "huge.png"
    _png_header_only(huge, side, side)
    status = main(["detect", str(huge), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    _one_line(status, err, "huge.png: image ")
    assert "over the limit of 67108864 pixels" in err


def test_annotated_labels_are_readable(tmp_path):
    """Tags in a font of at least 12 px on the 512-px annotated image, "label: score"."""
    from PIL import ImageDraw

    from bitdet.sw.data import draw_detections, label_font
    font = label_font((512, 512))
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "1: 0.50", font=font)
    assert box[3] - box[1] >= 11 and getattr(font, "size", 0) >= 16
    image = draw_detections(np.zeros((64, 64), np.uint8), [[8, 20, 40, 50]], [1], [0.5],
                            scale=8)
    tag = np.asarray(image)[20 * 8 - 30:20 * 8, 8 * 8:8 * 8 + 80]
    assert (tag != 0).any(axis=-1).sum() > 500       # a tag of a readable size was drawn
