"""Tests for bitdet.sw.data: DigitScenes, COCO/VOC/YOLO loaders, drawing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bitdet.sw.data import (
    DIGIT_CLASSES,
    SPLITS,
    Annotation,
    AnnotationError,
    DetectionDataset,
    collate_detections,
    digit_split,
    draw_detections,
    load_coco,
    load_voc,
    load_yolo,
    make_digitscenes,
    render_preview,
    resize_dataset,
    write_coco,
)


def _pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    b = boxes.astype(np.float64)
    x1 = np.maximum(b[:, None, 0], b[None, :, 0])
    y1 = np.maximum(b[:, None, 1], b[None, :, 1])
    x2 = np.minimum(b[:, None, 2], b[None, :, 2])
    y2 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area[:, None] + area[None, :] - inter)


def _check_valid(ds: DetectionDataset, max_digits: int, max_iou: float = 0.3) -> None:
    _, h, w = ds.images.shape
    assert ds.images.dtype == np.uint8
    for ann in ds.annotations:
        assert ann.boxes.dtype == np.float32 and ann.boxes.shape == (len(ann), 4)
        assert ann.labels.dtype == np.int64
        assert 1 <= len(ann) <= max_digits
        b = ann.boxes
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        assert b.min() >= 0 and np.all(b[:, [0, 2]] <= w) and np.all(b[:, [1, 3]] <= h)
        assert np.array_equal(b, np.round(b))  # integer pixel edges
        assert set(ann.labels.tolist()) <= set(range(10))
        iou = _pairwise_iou(b)
        np.fill_diagonal(iou, 0)
        assert iou.max() <= max_iou + 1e-9


# --------------------------------------------------------------------------------------------
# DigitScenes
# --------------------------------------------------------------------------------------------


def test_splits_are_disjoint_and_cover_all_samples():
    parts = {s: digit_split(s) for s in SPLITS}
    sets = {s: set(p.tolist()) for s, p in parts.items()}
    assert sets["train"].isdisjoint(sets["val"])
    assert sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert set().union(*sets.values()) == set(range(1797))
    assert len(sets["train"]) == pytest.approx(0.70 * 1797, abs=10)
    assert len(sets["val"]) == pytest.approx(0.15 * 1797, abs=10)
    from sklearn.datasets import load_digits

    target = load_digits().target
    for s in SPLITS:  # stratified: every class in every split
        assert set(target[parts[s]].tolist()) == set(range(10))
    assert np.array_equal(digit_split("test"), parts["test"])  # stable
    with pytest.raises(ValueError, match="split"):
        digit_split("training")


def test_scenes_draw_only_from_their_split():
    from sklearn.datasets import load_digits

    target = load_digits().target
    used = {}
    for s in SPLITS:
        ds = make_digitscenes(s, count=40, seed=3)
        src = ds.meta["source_indices"]
        for ann, idx in zip(ds.annotations, src, strict=True):
            assert np.array_equal(ann.labels, target[idx])
        used[s] = set(np.concatenate(src).tolist())
        assert used[s] <= set(digit_split(s).tolist())
    assert used["train"].isdisjoint(used["val"] | used["test"])
    assert used["val"].isdisjoint(used["test"])


def test_deterministic_by_seed():
    a = make_digitscenes("train", count=10, seed=7)
    b = make_digitscenes("train", count=10, seed=7)
    assert np.array_equal(a.images, b.images)
    for x, y in zip(a.annotations, b.annotations, strict=True):
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.labels, y.labels)
    c = make_digitscenes("train", count=10, seed=8)
    assert not np.array_equal(a.images, c.images)
    d = make_digitscenes("val", count=10, seed=7)
    assert not np.array_equal(a.images, d.images)
    # a longer run starts with the same images
    e = make_digitscenes("train", count=12, seed=7)
    assert np.array_equal(e.images[:10], a.images)


def test_scenes_valid_default():
    ds = make_digitscenes("train", count=60, seed=0)
    assert ds.images.shape == (60, 64, 64)
    assert ds.class_names == list(DIGIT_CLASSES)
    _check_valid(ds, max_digits=4)
    counts = [len(a) for a in ds.annotations]
    assert max(counts) >= 3  # several digits per image
    sides = np.concatenate([np.maximum(a.boxes[:, 2] - a.boxes[:, 0],
                                       a.boxes[:, 3] - a.boxes[:, 1]) for a in ds.annotations])
    assert sides.max() <= 28 and sides.min() >= 4
    assert ds.images.std() > 10  # not blank


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(16, 80),
    w=st.integers(16, 80),
    seed=st.integers(0, 2**31 - 1),
    max_digits=st.integers(1, 6),
)
def test_scenes_valid_any_size(h, w, seed, max_digits):
    ds = make_digitscenes("val", count=3, image_size=(h, w), seed=seed, max_digits=max_digits)
    assert ds.images.shape == (3, h, w)
    _check_valid(ds, max_digits=max_digits)


def test_boxes_tight_around_ink():
    # Flat background, no noise: ink is exactly the pixels that differ from the background.
    ds = make_digitscenes("test", count=20, seed=1, max_digits=1, clutter=False, noise_std=0)
    for img, ann in zip(ds.images, ds.annotations, strict=True):
        bg = np.bincount(img.ravel()).argmax()
        ink = np.abs(img.astype(int) - int(bg)) > 10
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        tight = [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]
        assert ann.boxes[0].tolist() == tight
    # Several digits: no ink outside the boxes, and ink on every box edge.
    ds = make_digitscenes("test", count=20, seed=2, clutter=False, noise_std=0)
    for img, ann in zip(ds.images, ds.annotations, strict=True):
        bg = np.bincount(img.ravel()).argmax()
        ink = np.abs(img.astype(int) - int(bg)) > 10
        inside = np.zeros_like(ink)
        for x1, y1, x2, y2 in ann.boxes.astype(int):
            inside[y1:y2, x1:x2] = True
            assert ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()
            assert ink[y1:y2, x1].any() and ink[y1:y2, x2 - 1].any()
            assert img[y1:y2, x1:x2].max() > bg + 100  # bright ink inside
        assert not (ink & ~inside).any()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_digitscenes("dev", count=1)
    with pytest.raises(ValueError, match="image_size"):
        make_digitscenes("train", count=1, image_size=4)
    with pytest.raises(ValueError, match="min_digits"):
        make_digitscenes("train", count=1, max_digits=0)
    assert len(make_digitscenes("train", count=0)) == 0


def test_getitem_and_dataloader():
    ds = make_digitscenes("train", count=6, seed=0)
    img, target = ds[2]
    assert img.shape == (1, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert torch.equal(img[0], torch.from_numpy(ds.images[2].astype(np.float32) / 255))
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].shape == (len(ds.annotations[2]), 4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_detections)
    images, targets = next(iter(loader))
    assert images.shape == (4, 1, 64, 64) and len(targets) == 4


def test_resize_dataset():
    ds = make_digitscenes("train", count=3, seed=0)
    small = resize_dataset(ds, (32, 48))
    assert small.images.shape == (3, 32, 48)
    np.testing.assert_allclose(small.annotations[0].boxes,
                               ds.annotations[0].boxes * [0.75, 0.5, 0.75, 0.5], rtol=1e-6)


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def test_coco_round_trip(tmp_path):
    ds = make_digitscenes("val", count=12, seed=5)
    json_path = write_coco(ds, tmp_path / "coco", progress=False)
    assert json_path == tmp_path / "coco" / "annotations.json"
    doc = json.loads(json_path.read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(1, 11))
    assert [c["name"] for c in doc["categories"]] == [str(d) for d in range(10)]
    a0 = doc["annotations"][0]
    b0 = ds.annotations[0].boxes[0]
    assert a0["bbox"] == pytest.approx([b0[0], b0[1], b0[2] - b0[0], b0[3] - b0[1]])
    assert a0["category_id"] == ds.annotations[0].labels[0] + 1
    assert len(doc["annotations"]) == sum(len(a) for a in ds.annotations)

    back = load_coco(json_path)
    assert back.class_names == ds.class_names
    assert back.file_names == ds.file_names
    assert np.array_equal(back.images, ds.images)
    for x, y in zip(ds.annotations, back.annotations, strict=True):
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.labels, y.labels)
    again = load_coco(json_path, tmp_path / "coco" / "images")
    assert np.array_equal(again.images, ds.images)


def _coco_fixture(tmp_path: Path) -> Path:
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(img_dir / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": 0}
        ],
        "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_loader_foreign_ids(tmp_path):
    ds = load_coco(_coco_fixture(tmp_path))
    assert ds.class_names == ["cat", "dog"]
    assert ds.annotations[0].boxes.tolist() == [[2, 3, 12, 8]]
    assert ds.annotations[0].labels.tolist() == [0]


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_image", "missing image file"),
        ("outside", "outside"),
        ("degenerate", "degenerate"),
        ("unknown_class", "unknown category id"),
        ("malformed_json", "malformed JSON"),
        ("malformed_bbox", "malformed bbox"),
        ("wrong_size", "declared"),
    ],
)
def test_coco_errors(tmp_path, case, match):
    path = _coco_fixture(tmp_path)

    def bbox(value):
        return lambda d: d["annotations"][0].__setitem__("bbox", value)

    edits = {
        "missing_image": lambda d: d["images"][0].__setitem__("file_name", "gone.png"),
        "outside": bbox([25, 3, 10, 5]),
        "degenerate": bbox([2, 3, 0, 5]),
        "unknown_class": lambda d: d["annotations"][0].__setitem__("category_id", 4),
        "malformed_bbox": bbox([2, 3, 10]),
        "wrong_size": lambda d: d["images"][0].__setitem__("width", 31),
    }
    if case == "malformed_json":
        path.write_text(path.read_text()[:-5])
    else:
        _edit_json(path, edits[case])
    with pytest.raises(AnnotationError, match=match) as exc:
        load_coco(path)
    assert path.name in str(exc.value)
    if case == "missing_image":
        assert "gone.png" in str(exc.value)


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def _voc_xml(filename: str | None, objects, size=(40, 30)) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    fn = f"<filename>{filename}</filename>" if filename else ""
    return (
        f"<annotation><folder>x</folder>{fn}<size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>1</depth></size>{objs}</annotation>"
    )


def _voc_fixture(tmp_path: Path) -> tuple[Path, Path]:
    ann_dir, img_dir = tmp_path / "Annotations", tmp_path / "JPEGImages"
    ann_dir.mkdir()
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("000001", "000002"):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(
            img_dir / f"{stem}.png"
        )
    (ann_dir / "000001.xml").write_text(
        _voc_xml("000001.png", [("person", (1, 1, 40, 30)), ("car", (5, 6, 15, 20))])
    )
    (ann_dir / "000002.xml").write_text(_voc_xml(None, [("car", (10, 10, 12, 11))]))
    return ann_dir, img_dir


def test_voc_loader(tmp_path):
    ann_dir, img_dir = _voc_fixture(tmp_path)
    ds = load_voc(ann_dir, img_dir)
    assert ds.class_names == ["car", "person"]
    assert ds.images.shape == (2, 30, 40)  # converted to grayscale
    assert ds.file_names == ["000001.png", "000002.png"]
    assert ds.annotations[0].boxes.tolist() == [[0, 0, 40, 30], [4, 5, 15, 20]]
    assert ds.annotations[0].labels.tolist() == [1, 0]
    assert ds.annotations[1].boxes.tolist() == [[9, 9, 12, 11]]
    ds2 = load_voc(ann_dir, img_dir, class_names=["person", "car", "bus"])
    assert ds2.annotations[0].labels.tolist() == [0, 1]
    assert ds2.num_classes == 3


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing_image", "missing image file"),
        ("outside", "outside"),
        ("degenerate", "degenerate"),
        ("unknown_class", "unknown class name"),
        ("malformed_xml", "malformed XML"),
        ("missing_field", "missing <ymax>"),
        ("not_a_number", "not a number"),
    ],
)
def test_voc_errors(tmp_path, case, match):
    ann_dir, img_dir = _voc_fixture(tmp_path)
    bad = ann_dir / "000002.xml"
    texts = {
        "missing_image": _voc_xml("nope.png", [("car", (1, 1, 5, 5))]),
        "outside": _voc_xml(None, [("car", (1, 1, 45, 5))]),
        "degenerate": _voc_xml(None, [("car", (8, 1, 7, 5))]),
        "unknown_class": _voc_xml(None, [("truck", (1, 1, 5, 5))]),
        "malformed_xml": _voc_xml(None, [("car", (1, 1, 5, 5))])[:-8],
        "missing_field": _voc_xml(None, [("car", (1, 1, 5, 5))]).replace(
            "<ymax>5</ymax>", ""
        ),
        "not_a_number": _voc_xml(None, [("car", (1, 1, "five", 5))]),
    }
    bad.write_text(texts[case])
    with pytest.raises(AnnotationError, match=match) as exc:
        load_voc(ann_dir, img_dir, class_names=["car", "person"])
    assert bad.name in str(exc.value)


# --------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------


def _yolo_fixture(tmp_path: Path) -> tuple[Path, Path]:
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    for stem in ("a", "b", "c"):
        Image.fromarray(np.full((50, 100), 9, np.uint8)).save(img_dir / f"{stem}.png")
    (lab_dir / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n\n2 0.1 0.1 0.2 0.2\n")
    (lab_dir / "b.txt").write_text("1 0.25 0.75 0.5 0.5\n")
    (lab_dir / "classes.txt").write_text("zero\none\ntwo\n")
    return lab_dir, img_dir


def test_yolo_loader(tmp_path):
    lab_dir, img_dir = _yolo_fixture(tmp_path)
    ds = load_yolo(lab_dir, img_dir, lab_dir / "classes.txt")
    assert ds.class_names == ["zero", "one", "two"]
    assert ds.file_names == ["a.png", "b.png", "c.png"]
    np.testing.assert_allclose(ds.annotations[0].boxes, [[40, 15, 60, 35], [0, 0, 20, 10]])
    assert ds.annotations[0].labels.tolist() == [0, 2]
    np.testing.assert_allclose(ds.annotations[1].boxes, [[0, 25, 50, 50]])
    assert len(ds.annotations[2]) == 0  # image without a label file: no objects
    img, target = ds[2]
    assert img.shape == (1, 50, 100) and target["boxes"].shape == (0, 4)
    (tmp_path / "data.yaml").write_text("names:\n  0: zero\n  1: one\n  2: two\n")
    ds2 = load_yolo(lab_dir, img_dir, tmp_path / "data.yaml")
    assert ds2.class_names == ds.class_names
    ds3 = load_yolo(lab_dir, img_dir, ["z", "o", "t"])
    assert ds3.class_names == ["z", "o", "t"]


@pytest.mark.parametrize(
    ("case", "line", "match"),
    [
        ("missing_image", "0 0.5 0.5 0.1 0.1", "missing image file"),
        ("outside", "0 0.95 0.5 0.2 0.2", "outside"),
        ("degenerate", "0 0.5 0.5 0 0.2", "degenerate"),
        ("unknown_class", "3 0.5 0.5 0.1 0.1", "unknown class id"),
        ("negative_class", "-1 0.5 0.5 0.1 0.1", "unknown class id"),
        ("malformed_tokens", "0 0.5 0.5 0.1", "malformed line"),
        ("malformed_number", "0 0.5 x 0.1 0.1", "malformed line"),
    ],
)
def test_yolo_errors(tmp_path, case, line, match):
    lab_dir, img_dir = _yolo_fixture(tmp_path)
    bad = lab_dir / ("zz.txt" if case == "missing_image" else "c.txt")
    bad.write_text(f"1 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(AnnotationError, match=match) as exc:
        load_yolo(lab_dir, img_dir, ["zero", "one", "two"])
    assert bad.name in str(exc.value)
    if case != "missing_image":
        assert f"{bad.name}:2" in str(exc.value)  # line number


# --------------------------------------------------------------------------------------------
# Dataset checks and drawing
# --------------------------------------------------------------------------------------------


def test_dataset_validation():
    img = np.zeros((1, 10, 10), np.uint8)
    with pytest.raises(ValueError, match="outside"):
        DetectionDataset(img, [Annotation([[0, 0, 11, 5]], [0])], ["a"])
    with pytest.raises(ValueError, match="degenerate"):
        DetectionDataset(img, [Annotation([[3, 0, 3, 5]], [0])], ["a"])
    with pytest.raises(ValueError, match="label"):
        DetectionDataset(img, [Annotation([[0, 0, 5, 5]], [1])], ["a"])
    with pytest.raises(ValueError, match="labels"):
        Annotation([[0, 0, 5, 5]], [0, 1])
    mixed = DetectionDataset(
        [np.zeros((4, 5), np.uint8), np.zeros((6, 5), np.uint8)],
        [Annotation(np.zeros((0, 4)), []), Annotation([[0, 0, 5, 6]], [0])], ["a"],
    )
    assert mixed.image_size is None and "mixed" in repr(mixed)


def test_draw_detections():
    ds = make_digitscenes("train", count=2, seed=0)
    ann = ds.annotations[0]
    pil = draw_detections(ds.images[0], ann.boxes, ann.labels, scale=2)
    assert pil.mode == "RGB" and pil.size == (128, 128)
    arr = np.asarray(pil)
    x1, _, x2, y2 = (ann.boxes[-1] * 2).astype(int)
    edge = arr[y2 - 1, x1:x2]  # bottom edge of the last box is drawn in colour
    assert (edge.max(axis=1) - edge.min(axis=1)).max() > 50
    img_t, target = ds[1]
    pil2 = draw_detections(img_t, target["boxes"], target["labels"],
                           scores=torch.rand(len(target["labels"])),
                           class_names=ds.class_names)
    assert pil2.size == (64, 64)
    grid = render_preview(ds, n=2, cols=2, scale=1)
    assert grid.size == (64 * 2 + 2, 64)


# --------------------------------------------------------------------------------------------
# Loaders never drop labels silently
# --------------------------------------------------------------------------------------------


def test_yolo_missing_or_mistyped_label_folder_is_an_error(tmp_path):
    lab_dir, img_dir = _yolo_fixture(tmp_path)
    with pytest.raises(AnnotationError, match=r"lables: no such label folder"):
        load_yolo(tmp_path / "lables", img_dir, ["zero", "one", "two"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AnnotationError, match=r"empty: no label files .* for the 3 images"):
        load_yolo(empty, img_dir, lab_dir / "classes.txt")
    with pytest.raises(AnnotationError, match=r"imgs: no such image folder"):
        load_yolo(lab_dir, tmp_path / "imgs", lab_dir / "classes.txt")


def test_yolo_two_images_of_one_stem_is_an_error(tmp_path):
    lab_dir, img_dir = _yolo_fixture(tmp_path)
    Image.fromarray(np.full((50, 100), 9, np.uint8)).save(img_dir / "a.jpg")
    with pytest.raises(AnnotationError, match=r"a\.(png|jpg): same stem as a\.(png|jpg)"):
        load_yolo(lab_dir, img_dir, lab_dir / "classes.txt")


def test_voc_class_names_unknown_is_an_error_and_found_is_reported(tmp_path):
    ann_dir, img_dir = _voc_fixture(tmp_path)
    (ann_dir / "000002.xml").write_text(_voc_xml(None, [("cra", (1, 1, 5, 5))]))
    with pytest.raises(AnnotationError, match=r"000002\.xml: object #0 \('cra'\): unknown "
                                              r"class name 'cra'"):
        load_voc(ann_dir, img_dir, class_names=["car", "person"])
    found = load_voc(ann_dir, img_dir)
    assert found.class_names == ["car", "cra", "person"]
    assert found.meta["class_source"] == "found in the annotation files"
    assert load_voc(ann_dir, img_dir, ["car", "cra", "person"]).meta["class_source"] == "given"
    with pytest.raises(AnnotationError, match=r"nope: no such annotation folder"):
        load_voc(tmp_path / "nope", img_dir)


def test_coco_annotation_path_that_is_a_folder(tmp_path):
    with pytest.raises(AnnotationError, match=r"is a folder, not a COCO annotation file"):
        load_coco(tmp_path)
