"""Reliability suite (slow tier): random corruptions of what users hand to bitdet.

Each part is bounded in time and prints its counts (``pytest -m slow -s`` shows them):

* the shipped bundle under random bit flips, multi-bit flips and truncations: each
  corrupted file is rejected with a ``BundleError`` or loads a bundle identical to the
  original (a harmless flip, e.g. in a zip timestamp) — nothing else;
* the presets' YAML under random edits (characters deleted, inserted or replaced, lines
  duplicated, dropped or swapped, numbers replaced, non-UTF-8 bytes): each loads a valid
  config or raises ``ConfigError`` — nothing else;
* COCO JSON, VOC XML and YOLO label files under random edits and truncations: each loads
  a data set whose boxes lie inside their images with known labels, or raises
  ``AnnotationError`` — nothing else.

The link fuzz of the driver is in tests/test_session.py (emulator: fast tier; RTL: slow).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitdet.core.bundle import Bundle, BundleError
from bitdet.core.bundle import load as load_bundle
from bitdet.core.config import PRESETS_DIR, AcceleratorConfig, ConfigError, load_config
from bitdet.sw.data import (
    AnnotationError,
    DetectionDataset,
    load_coco,
    load_voc,
    load_yolo,
    make_digitscenes,
    write_coco,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "sw" / "assets" / "default.bitdet"
BUDGET_S = 120.0


def _saved_bytes(bundle: Bundle, path: Path) -> bytes:
    """The bytes ``bundle`` saves to (Bundle.save writes the same bytes for the same
    content, so equal bytes mean an identical bundle)."""
    bundle.save(path)
    return path.read_bytes()


def _mutations(data: bytes, rng: np.random.Generator):
    """``(kind, corrupted bytes)``: single-bit flips, 2–8 bit flips, truncations."""
    n = len(data)
    while True:
        kind = rng.choice(["flip1", "flipN", "truncate"], p=[0.5, 0.3, 0.2])
        corrupted = bytearray(data)
        if kind == "truncate":
            yield kind, bytes(corrupted[:int(rng.integers(0, n))])
            continue
        for _ in range(1 if kind == "flip1" else int(rng.integers(2, 9))):
            corrupted[int(rng.integers(0, n))] ^= 1 << int(rng.integers(0, 8))
        yield kind, bytes(corrupted)


@pytest.mark.slow
def test_corrupted_bundles_are_rejected_or_identical(tmp_path):
    data = DEFAULT.read_bytes()
    reference = _saved_bytes(load_bundle(DEFAULT), tmp_path / "reference.bitdet")
    rng = np.random.default_rng(20261207)
    counts = {"rejected": 0, "identical": 0}
    escapes = []
    start = time.monotonic()
    path = tmp_path / "corrupt.bitdet"
    for i, (kind, corrupted) in enumerate(_mutations(data, rng)):
        if i >= 3000 or time.monotonic() - start > BUDGET_S:
            break
        path.write_bytes(corrupted)
        try:
            loaded = load_bundle(path)
        except BundleError:
            counts["rejected"] += 1
            continue
        except Exception as e:           # collected, reported below
            escapes.append(f"{kind} #{i}: {type(e).__name__}: {e}")
            continue
        if _saved_bytes(loaded, tmp_path / "again.bitdet") == reference:
            counts["identical"] += 1
        else:
            escapes.append(f"{kind} #{i}: loaded a different bundle")
    total = sum(counts.values()) + len(escapes)
    print(f"\nbundle corruptions: {total} tried in {time.monotonic() - start:.1f} s, "
          f"{counts['rejected']} rejected, {counts['identical']} loaded identical, "
          f"{len(escapes)} escaped")
    assert total >= 600, f"only {total} corruptions in {BUDGET_S} s"
    assert not escapes, "\n".join(escapes[:20])


def _text_mutation(text: bytes, rng: np.random.Generator) -> bytes:
    """One random edit of a text file's bytes."""
    data = bytearray(text)
    lines = bytes(data).split(b"\n")
    kind = rng.integers(0, 8)
    pos = int(rng.integers(0, max(1, len(data))))
    junk = bytes([int(rng.choice(list(b":-{}[],#'\"\t 0123456789.eE-\xff\xc3")))])
    if kind == 0 and data:
        del data[pos]
    elif kind == 1:
        data[pos:pos] = junk
    elif kind == 2 and data:
        data[pos:pos + 1] = junk
    elif kind == 3:
        i = int(rng.integers(0, len(lines)))
        lines.insert(i, lines[i])
        return b"\n".join(lines)
    elif kind == 4 and len(lines) > 1:
        del lines[int(rng.integers(0, len(lines)))]
        return b"\n".join(lines)
    elif kind == 5 and len(lines) > 1:
        i, j = rng.integers(0, len(lines), size=2)
        lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines)
    elif kind == 6:
        digits = [k for k, b in enumerate(data) if chr(b).isdigit()]
        if digits:
            k = int(rng.choice(digits))
            value = rng.choice([b"0", b"-1", b"1e12", b"999999999999", b"2.5", b"nan"])
            data[k:k + 1] = bytes(value)
    else:
        return bytes(data[:pos])
    return bytes(data)


def _fuzz(name: str, count: int, attempt) -> dict:
    """Run ``attempt(i)`` (returns an outcome name or raises) ``count`` times within the
    time budget; the counts, with the escapes listed under ``"escaped"``."""
    counts: dict = {"escaped": []}
    start = time.monotonic()
    for i in range(count):
        if time.monotonic() - start > BUDGET_S:
            break
        try:
            outcome = attempt(i)
        except Exception as e:           # collected, reported by the caller
            counts["escaped"].append(f"#{i}: {type(e).__name__}: {e}")
            continue
        counts[outcome] = counts.get(outcome, 0) + 1
    tried = sum(v for k, v in counts.items() if k != "escaped") + len(counts["escaped"])
    print(f"\n{name}: {tried} tried in {time.monotonic() - start:.1f} s, "
          + ", ".join(f"{v} {k}" for k, v in counts.items() if k != "escaped")
          + f", {len(counts['escaped'])} escaped")
    counts["tried"] = tried
    return counts


@pytest.mark.slow
def test_mutated_yaml_configs_load_or_name_the_problem(tmp_path):
    presets = [p.read_bytes() for p in sorted(PRESETS_DIR.glob("*.yaml"))]
    rng = np.random.default_rng(7)
    path = tmp_path / "mutated.yaml"

    def attempt(i):
        text = presets[i % len(presets)]
        for _ in range(int(rng.integers(1, 4))):
            text = _text_mutation(text, rng)
        path.write_bytes(text)
        try:
            config = load_config(path)
        except ConfigError as e:
            assert "\n" not in str(e), f"a multi-line error: {e!r}"
            return "refused"
        assert AcceleratorConfig(**config.to_dict()) == config
        return "loaded"

    counts = _fuzz("YAML mutations", 1500, attempt)
    assert counts["tried"] >= 600 and counts.get("refused", 0) > 0
    assert not counts["escaped"], "\n".join(counts["escaped"][:20])


def _check_dataset(dataset: DetectionDataset) -> str:
    for image, target in zip(dataset.images, dataset.annotations, strict=True):
        h, w = np.asarray(image).shape[:2]
        boxes = np.asarray(target.boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(target.labels).reshape(-1)
        assert len(boxes) == len(labels)
        assert np.isfinite(boxes).all()
        assert (boxes[:, 0] < boxes[:, 2]).all() and (boxes[:, 1] < boxes[:, 3]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert ((labels >= 0) & (labels < len(dataset.class_names))).all()
    return "loaded"


@pytest.mark.slow
def test_mutated_annotation_files_load_or_name_the_file(tmp_path):
    rng = np.random.default_rng(11)
    scenes = make_digitscenes("test", count=3, image_size=48, seed=1)
    coco_json = write_coco(scenes, tmp_path / "coco", progress=False)
    coco_text = coco_json.read_bytes()
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    yolo = tmp_path / "yolo"
    (yolo / "labels").mkdir(parents=True)
    (yolo / "images").mkdir()
    for k, (image, target) in enumerate(zip(scenes.images, scenes.annotations, strict=True)):
        Image.fromarray(np.asarray(image)).save(voc / "JPEGImages" / f"{k}.png")
        Image.fromarray(np.asarray(image)).save(yolo / "images" / f"{k}.png")
        h, w = np.asarray(image).shape[:2]
        objects, rows = "", []
        for box, label in zip(target.boxes.tolist(), target.labels.tolist(), strict=True):
            x1, y1, x2, y2 = box
            objects += (f"<object><name>{scenes.class_names[label]}</name><bndbox>"
                        f"<xmin>{x1 + 1:.0f}</xmin><ymin>{y1 + 1:.0f}</ymin><xmax>{x2:.0f}"
                        f"</xmax><ymax>{y2:.0f}</ymax></bndbox></object>")
            rows.append(f"{label} {(x1 + x2) / 2 / w:.4f} {(y1 + y2) / 2 / h:.4f} "
                        f"{(x2 - x1) / w:.4f} {(y2 - y1) / h:.4f}")
        (voc / "Annotations" / f"{k}.xml").write_text(
            f"<annotation><filename>{k}.png</filename><size><width>{w}</width><height>{h}"
            f"</height><depth>1</depth></size>{objects}</annotation>")
        (yolo / "labels" / f"{k}.txt").write_text("\n".join(rows) + "\n")
    voc_text = (voc / "Annotations" / "1.xml").read_bytes()
    yolo_text = (yolo / "labels" / "1.txt").read_bytes()
    names = list(scenes.class_names)
    # the unmutated files load
    for loaded in (load_coco(coco_json, progress=False),
                   load_voc(voc / "Annotations", voc / "JPEGImages", names, progress=False),
                   load_yolo(yolo / "labels", yolo / "images", names, progress=False)):
        assert len(loaded.images) == 3 and _check_dataset(loaded) == "loaded"

    def attempt(i):
        fmt = ("coco", "voc", "yolo")[i % 3]
        source = {"coco": coco_text, "voc": voc_text, "yolo": yolo_text}[fmt]
        text = source
        for _ in range(int(rng.integers(1, 4))):
            text = _text_mutation(text, rng)
        try:
            if fmt == "coco":
                coco_json.write_bytes(text)
                return _check_dataset(load_coco(coco_json, progress=False))
            if fmt == "voc":
                (voc / "Annotations" / "1.xml").write_bytes(text)
                return _check_dataset(load_voc(voc / "Annotations", voc / "JPEGImages",
                                               names, progress=False))
            (yolo / "labels" / "1.txt").write_bytes(text)
            return _check_dataset(load_yolo(yolo / "labels", yolo / "images", names,
                                            progress=False))
        except AnnotationError as e:
            assert "\n" not in str(e), f"a multi-line error: {e!r}"
            return "refused"

    counts = _fuzz("annotation mutations", 1500, attempt)
    assert counts["tried"] >= 600 and counts.get("refused", 0) > 0
    assert not counts["escaped"], "\n".join(counts["escaped"][:20])
