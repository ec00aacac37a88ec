"""`bitdet detect` takes a bundle's own decoding limits (``model["decode"]``: score threshold,
NMS IoU threshold, detection limit; docs/driver.md, docs/import.md), an explicit argument or
flag wins over them, and a bundle without a detection head is refused in one line before
any work (no device opened, no frame run, no ``--out`` folder made).

The bundles are the shipped detector with edited model metadata (``core/bundle.py`` API),
run on the emulator on the shipped 64×64 sample (the model's input size: the boxes are the
head's own)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitdet.core.bundle import BundleError, load
from bitdet.sw.cli import main
from bitdet.sw.detect import DEFAULT_BUNDLE, SAMPLE_PATH, run_detect
from bitdet.sw.detection import decode
from bitdet.sw.driver.device import Device
from bitdet.sw.evaluate import run_bundle

DEFAULTS = {"score_threshold": 0.25, "iou_threshold": 0.5, "max_detections": 100}


@pytest.fixture(scope="module")
def shipped():
    return load(DEFAULT_BUNDLE)


@pytest.fixture(scope="module")
def head(shipped):
    """The shipped detector's fixed-point head map on the sample (the reference)."""
    with Image.open(SAMPLE_PATH) as image:
        pixels = torch.from_numpy(np.array(image)[None, None]).to(torch.int64)
    return run_bundle(shipped, pixels)


def with_model(bundle, path=None, **changes):
    """A copy of ``bundle`` whose model metadata has ``changes`` (None deletes a key);
    saved to ``path`` when given."""
    model = {key: value for key, value in {**bundle.model, **changes}.items()
             if value is not None}
    edited = dataclasses.replace(bundle, model=model)
    if path is not None:
        edited.save(path)
        assert load(path).model == model
    return edited


def with_decode(bundle, path=None, **limits):
    return with_model(bundle, path, decode={**bundle.model["decode"], **limits})


def expected(bundle, head, **limits):
    """Labels and boxes the decoder gives on the reference head map with ``limits``."""
    found = decode(head, image_size=(64, 64), stride=bundle.model["grid_stride"],
                   prior=bundle.model["decode"]["prior"], **limits)[0]
    return found["labels"].tolist(), found["boxes"].tolist(), found["scores"].tolist()


def check(detections, want):
    labels, boxes, scores = want
    assert [d["label"] for d in detections] == labels
    assert [d["score"] for d in detections] == pytest.approx(scores, abs=1e-4)
    for det, box in zip(detections, boxes, strict=True):
        assert det["box"] == pytest.approx(box, abs=0.01)


def detect_json(capsys, bundle_path, *flags):
    """`bitdet detect --json` of the sample, its annotated PNG into a temporary folder
    (never beside a shipped bundle)."""
    capsys.readouterr()
    with tempfile.TemporaryDirectory() as out:
        assert main(["detect", str(SAMPLE_PATH), "--bundle", str(bundle_path), "--json",
                     "--out", str(Path(out) / "annotated"), *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_shipped_detector_keeps_the_defaults(shipped, head, tmp_path, capsys):
    assert "score_threshold" not in shipped.model["decode"]      # nothing of its own
    assert Device.DECODE_DEFAULTS == DEFAULTS
    report = run_detect([SAMPLE_PATH], out=None, progress=False)
    assert report["decode"] == DEFAULTS
    check(report["images"][0]["detections"], expected(shipped, head, **DEFAULTS))
    assert len(report["images"][0]["detections"]) >= 2
    # the CLI without flags is the CLI with today's defaults spelled out
    plain = detect_json(capsys, DEFAULT_BUNDLE)
    spelled = detect_json(capsys, DEFAULT_BUNDLE, "--score-threshold", "0.25",
                          "--iou-threshold", "0.5", "--max-detections", "100")
    assert plain["images"][0]["detections"] == spelled["images"][0]["detections"]
    assert plain["images"][0]["detections"] == report["images"][0]["detections"]
    assert plain["decode"] == spelled["decode"] == DEFAULTS


def test_a_bundle_score_threshold_drops_what_the_default_keeps(shipped, head, tmp_path,
                                                               capsys):
    scores = sorted(d["score"] for d in run_detect([SAMPLE_PATH], out=None, progress=False)
                    ["images"][0]["detections"])
    assert len(scores) >= 2 and scores[0] < scores[-1]
    cut = round((scores[0] + scores[-1]) / 2, 4)            # keeps the best, drops the worst
    path = tmp_path / "strict.bitdet"
    with_decode(shipped, path, score_threshold=cut)
    report = detect_json(capsys, path)
    found = report["images"][0]["detections"]
    assert report["decode"] == {**DEFAULTS, "score_threshold": cut}
    assert 1 <= len(found) < len(scores) and all(d["score"] >= cut for d in found)
    check(found, expected(shipped, head, **{**DEFAULTS, "score_threshold": cut}))
    assert main(["detect", str(SAMPLE_PATH), "--bundle", str(path), "--out",
                 str(tmp_path / "table")]) == 0                        # the table says so
    assert f"score ≥ {cut:g}, NMS IoU 0.5, at most 100 detections" in capsys.readouterr().out
    # an explicit flag wins over the bundle's value
    loose = detect_json(capsys, path, "--score-threshold", "0.25")
    assert loose["decode"] == DEFAULTS
    assert sorted(d["score"] for d in loose["images"][0]["detections"]) == scores


def test_a_bundle_iou_threshold_and_limit_are_used_and_overridden(shipped, head, tmp_path,
                                                                  capsys):
    """Score threshold 0: every cell is a candidate; IoU 1 suppresses nothing and the limit
    cuts the list, IoU 0 suppresses every overlapping box of a class."""
    limits = {"score_threshold": 0.0, "iou_threshold": 1.0, "max_detections": 7}
    path = tmp_path / "many.bitdet"
    with_decode(shipped, path, **limits)
    report = detect_json(capsys, path)
    assert report["decode"] == limits
    assert len(report["images"][0]["detections"]) == 7
    check(report["images"][0]["detections"], expected(shipped, head, **limits))
    flags = detect_json(capsys, path, "--iou-threshold", "0", "--max-detections", "64")
    assert flags["decode"] == {"score_threshold": 0.0, "iou_threshold": 0.0,
                               "max_detections": 64}
    want = expected(shipped, head, **flags["decode"])
    check(flags["images"][0]["detections"], want)
    everything = expected(shipped, head, score_threshold=0.0, iou_threshold=1.0,
                          max_detections=64)
    assert 7 < len(want[0]) < len(everything[0])      # NMS at IoU 0 dropped some, not all


def test_the_driver_takes_the_bundle_limits_unless_given(shipped, head):
    limits = {"score_threshold": 0.0, "iou_threshold": 1.0, "max_detections": 5}
    bundle = with_decode(shipped, **limits)
    assert Device.decode_settings_for(bundle) == {"stride": 8, "prior": 16.0, **limits}
    assert Device.decode_settings_for(bundle, max_detections=3)["max_detections"] == 3
    assert Device.decode_settings_for(shipped)["score_threshold"] == 0.25
    with Device.open("emu", "icebreaker") as device:
        device.load(bundle)
        own = device.detect(SAMPLE_PATH)
        assert len(own["boxes"]) == 5
        given = device.detect(SAMPLE_PATH, score_threshold=0.25, iou_threshold=0.5,
                              max_detections=100)
        assert given["labels"].tolist() == expected(shipped, head, **DEFAULTS)[0]
        many = list(device.detect_many([SAMPLE_PATH, SAMPLE_PATH], max_detections=2))
        assert [len(r["boxes"]) for r in many] == [2, 2]
        assert torch.equal(many[0]["boxes"], own["boxes"][:2])


@pytest.mark.parametrize("key, value, message", [
    ("score_threshold", 1.5, "model.decode.score_threshold must be a number in [0, 1]"),
    ("iou_threshold", "half", "model.decode.iou_threshold must be a number in [0, 1]"),
    ("max_detections", 0, "model.decode.max_detections must be an integer >= 1"),
    ("max_detections", True, "model.decode.max_detections must be an integer >= 1"),
])
def test_a_bad_bundle_limit_is_named(shipped, key, value, message):
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Device.decode_settings_for(with_decode(shipped, **{key: value}))
    # an explicit argument replaces the bad value, so it is not read
    assert Device.decode_settings_for(with_decode(shipped, **{key: value}),
                                      **{key: DEFAULTS[key]})[key] == DEFAULTS[key]


@pytest.mark.parametrize("kwargs", [{"iou_threshold": -0.1}, {"iou_threshold": float("nan")},
                                    {"max_detections": 0}, {"max_detections": 2.5}])
def test_bad_arguments_are_value_errors(shipped, kwargs):
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be"):
        Device.decode_settings_for(shipped, **kwargs)


@pytest.mark.parametrize("flag, value", [("--iou-threshold", "1.5"),
                                         ("--max-detections", "0")])
def test_bad_flags_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["detect", str(SAMPLE_PATH), flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_a_feature_bundle_fails_in_one_line_before_any_work(shipped, tmp_path, capsys,
                                                            monkeypatch):
    path = tmp_path / "features.bitdet"
    features = with_model(shipped, path, task="features", grid_stride=None)
    opened = []
    monkeypatch.setattr(Device, "open", classmethod(lambda cls, *a, **k: opened.append(a)))
    out = tmp_path / "annotated"
    assert main(["detect", str(SAMPLE_PATH), "--bundle", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitdet: error: ") and err.count("\n") == 1
    assert "'features' bundle has no detection head" in err
    assert not out.exists() and opened == []
    monkeypatch.undo()
    # the driver refuses it before the frame runs: nothing crosses the link
    with Device.open("emu", "icebreaker") as device:
        device.load(features)
        sent = (device.bytes_out, device.bytes_in)
        with pytest.raises(BundleError, match="no detection head"):
            device.detect(SAMPLE_PATH)
        with pytest.raises(BundleError, match="no detection head"):
            next(device.detect_many([SAMPLE_PATH]))
        assert (device.bytes_out, device.bytes_in) == sent
