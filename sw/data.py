"""Detection data: the DigitScenes generator and loaders for COCO, Pascal VOC and YOLO.

Everything returns a :class:`DetectionDataset`: 8-bit grayscale images plus, per image, boxes
(``float32 (n, 4)``, ``x1 y1 x2 y2`` in pixels) and labels (``int64 (n,)``, indices into
``class_names``). docs/data.md describes the generator, the split rule, the formats and the
errors.

Box convention: continuous pixel coordinates with the origin at the top-left corner of the
top-left pixel, so a box that covers pixel columns ``a … b`` (inclusive) has ``x1 = a`` and
``x2 = b + 1``; ``0 <= x1 < x2 <= width``. This is COCO's convention (``bbox = [x, y, w, h]``).

DigitScenes is generated from scikit-learn's bundled UCI handwritten digits
(``sklearn.datasets.load_digits``): nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from tqdm import tqdm

__all__ = [
    "BOX_TOLERANCE",
    "DIGIT_CLASSES",
    "IMAGE_EXTENSIONS",
    "INK_THRESHOLD",
    "SPLITS",
    "SPLIT_FRACTIONS",
    "Annotation",
    "AnnotationError",
    "DetectionDataset",
    "collate_detections",
    "digit_split",
    "draw_detections",
    "image_grid",
    "label_font",
    "load_coco",
    "load_voc",
    "load_yolo",
    "make_digitscenes",
    "render_preview",
    "resize_dataset",
    "write_coco",
]

SPLITS = ("train", "val", "test")
#: Fractions of each digit class's handwriting samples that go to each split.
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
#: DigitScenes class names; label ``k`` is digit ``k`` (COCO category id ``k + 1``).
DIGIT_CLASSES = tuple(str(d) for d in range(10))
#: Upscaled digit intensities below this fraction of full scale are not ink (set to 0).
INK_THRESHOLD = 0.25
#: Loaders accept boxes that stick out of the image by at most this many pixels and clip them.
BOX_TOLERANCE = 1.0
#: Image files the YOLO loader (and the VOC loader without ``<filename>``) looks for.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
_PROGRESS_MIN = 100  # show a progress bar (on a terminal) from this many images on


class AnnotationError(ValueError):
    """A bad annotation or image file; the message starts with the offending file's path."""


# --------------------------------------------------------------------------------------------
# Data set container
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Annotation:
    """Objects of one image: ``boxes`` float32 ``(n, 4)`` xyxy pixels, ``labels`` int64 ``(n,)``."""

    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(
                f"{len(self.boxes)} boxes but {len(self.labels)} labels in one annotation"
            )

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(repr=False, eq=False)
class DetectionDataset(torch.utils.data.Dataset):
    """Grayscale images with boxes and labels; usable as a ``torch.utils.data.Dataset``.

    ``images`` is a ``uint8 N×H×W`` array when all images have one size (always for
    DigitScenes; loaders stack when they can), otherwise a list of ``uint8 H×W`` arrays.
    ``annotations[i]`` holds image ``i``'s boxes and labels; labels index ``class_names``.
    ``file_names[i]`` is the image's file name (relative to its image folder), used by
    :func:`write_coco`. ``meta`` holds provenance (for DigitScenes: split, seed, parameters
    and ``source_indices``, the load_digits sample index of every box).

    ``dataset[i]`` is ``(image, target)``: ``image`` a float32 tensor ``1×H×W`` in ``[0, 1]``,
    ``target = {"boxes": float32 (n, 4), "labels": int64 (n,)}`` tensors. Batch with
    :func:`collate_detections`.
    """

    images: np.ndarray | list[np.ndarray]
    annotations: list[Annotation]
    class_names: list[str]
    file_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = [str(c) for c in self.class_names]
        if not self.file_names:
            self.file_names = [f"{i:06d}.png" for i in range(len(self.annotations))]
        self.validate()

    def validate(self) -> None:
        """Check shapes, dtypes, label range and that every box lies inside its image."""
        n = len(self.images)
        if len(self.annotations) != n or len(self.file_names) != n:
            raise ValueError(
                f"{n} images, {len(self.annotations)} annotations, {len(self.file_names)} "
                "file names: these must be equal"
            )
        if isinstance(self.images, np.ndarray) and self.images.ndim != 3:
            raise ValueError(f"images must be N×H×W, got shape {self.images.shape}")
        for i, (img, ann) in enumerate(zip(self.images, self.annotations, strict=True)):
            if img.dtype != np.uint8 or img.ndim != 2:
                raise ValueError(f"image {i}: expected uint8 H×W, got {img.dtype} {img.shape}")
            if len(ann) == 0:
                continue
            h, w = img.shape
            b = ann.boxes
            if not np.all(np.isfinite(b)):
                raise ValueError(f"image {i}: non-finite box")
            if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
                raise ValueError(f"image {i}: degenerate box (x2 <= x1 or y2 <= y1)")
            if b[:, :2].min() < 0 or np.any(b[:, 2] > w) or np.any(b[:, 3] > h):
                raise ValueError(f"image {i}: box outside the {w}×{h} image")
            if ann.labels.min() < 0 or ann.labels.max() >= len(self.class_names):
                raise ValueError(f"image {i}: label outside 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        img = np.asarray(self.images[index], dtype=np.float32) / 255.0
        ann = self.annotations[index]
        target = {
            "boxes": torch.tensor(ann.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(ann.labels, dtype=torch.int64).reshape(-1),
        }
        return torch.from_numpy(img).unsqueeze(0), target

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int] | None:
        """``(H, W)`` when all images have one size, else ``None``."""
        if isinstance(self.images, np.ndarray):
            return tuple(self.images.shape[1:3])  # type: ignore[return-value]
        sizes = {img.shape for img in self.images}
        return next(iter(sizes)) if len(sizes) == 1 else None  # type: ignore[return-value]

    def __repr__(self) -> str:
        size = self.image_size
        size_s = f"{size[0]}×{size[1]}" if size else "mixed sizes"
        n_obj = sum(len(a) for a in self.annotations)
        return (
            f"DetectionDataset({len(self)} images, {size_s}, {n_obj} objects, "
            f"{self.num_classes} classes)"
        )


def _stack_images(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    if images and len({img.shape for img in images}) == 1:
        return np.stack(images)
    return images


def collate_detections(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """DataLoader ``collate_fn``: stack the images (``B×1×H×W``), keep targets as a list."""
    images = torch.stack([img for img, _ in batch])
    return images, [t for _, t in batch]


def resize_dataset(dataset: DetectionDataset, size: int | tuple[int, int]) -> DetectionDataset:
    """Resize every image to ``size`` (``(H, W)`` or a square side) with bilinear
    interpolation, scaling the boxes with it."""
    h_out, w_out = (size, size) if isinstance(size, int) else size
    images, anns = [], []
    for img, ann in zip(dataset.images, dataset.annotations, strict=True):
        h, w = img.shape
        pil = Image.fromarray(np.ascontiguousarray(img))
        images.append(np.asarray(pil.resize((w_out, h_out), Image.Resampling.BILINEAR)))
        scale = np.array([w_out / w, h_out / h, w_out / w, h_out / h], dtype=np.float64)
        boxes = np.clip(ann.boxes * scale, 0, [w_out, h_out, w_out, h_out])
        anns.append(Annotation(boxes, ann.labels.copy()))
    stacked = np.stack(images) if images else np.zeros((0, h_out, w_out), np.uint8)
    return DetectionDataset(
        stacked, anns, list(dataset.class_names), list(dataset.file_names), dict(dataset.meta)
    )


# --------------------------------------------------------------------------------------------
# DigitScenes
# --------------------------------------------------------------------------------------------


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """load_digits images (``1797×8×8`` float64, 0…16) and targets, read-only."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DigitScenes needs scikit-learn's bundled digits: pip install scikit-learn"
        ) from exc
    bunch = load_digits()
    images = np.array(bunch.images, dtype=np.float64)
    target = np.array(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    target.flags.writeable = False
    return images, target


@functools.cache
def _split_table() -> dict[str, np.ndarray]:
    _, target = _digits()
    # The order inside each class comes from a hash of the sample index, so the split
    # depends on nothing else (no RNG, no numpy version, no scene seed).
    key = [
        hashlib.blake2b(f"digitscenes-split:{i}".encode(), digest_size=8).digest()
        for i in range(len(target))
    ]
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in range(10):
        idx = sorted(np.flatnonzero(target == c).tolist(), key=lambda i: key[i])
        n_train = round(SPLIT_FRACTIONS["train"] * len(idx))
        n_val = round(SPLIT_FRACTIONS["val"] * len(idx))
        parts["train"] += idx[:n_train]
        parts["val"] += idx[n_train : n_train + n_val]
        parts["test"] += idx[n_train + n_val :]
    table = {}
    for s, idx in parts.items():
        arr = np.array(sorted(idx), dtype=np.int64)
        arr.flags.writeable = False
        table[s] = arr
    return table


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def digit_split(split: str) -> np.ndarray:
    """Sorted ``load_digits`` sample indices that DigitScenes may draw for ``split``.

    Per class, samples are ordered by a hash of their index and the first 70 % go to
    ``train``, the next 15 % to ``val`` and the rest to ``test``: the three sets are
    disjoint, cover all 1797 samples and never change.
    """
    _check_split(split)
    return _split_table()[split]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    if len(boxes) == 0:
        return np.zeros(0)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def _background(
    rng: np.random.Generator, h: int, w: int, clutter: bool
) -> np.ndarray:
    """Low-contrast background: a flat level plus (with ``clutter``) blobs, lines and arcs."""
    img = np.full((h, w), rng.uniform(0, 60), dtype=np.float64)
    if not clutter:
        return img
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(2, 7))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(2.0, max(h, w) / 4)
        amp = rng.uniform(-25, 40)
        img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    layer = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 5))):
        fill = int(rng.integers(15, 50))
        width = int(rng.integers(1, 3))
        if rng.random() < 0.5:  # straight line
            p = rng.uniform(0, [w, h, w, h])
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=fill, width=width)
        else:  # arc: a stroke-like distractor
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            r = rng.uniform(3, max(h, w) / 3)
            start = rng.uniform(0, 360)
            draw.arc(
                [cx - r, cy - r, cx + r, cy + r], start, start + rng.uniform(60, 270),
                fill=fill, width=width,
            )
    img += np.asarray(layer, dtype=np.float64)
    return img


def _digit_patch(sample: np.ndarray, side: int) -> np.ndarray:
    """Upscale one 8×8 digit (0…16) to ``side``×``side`` with PIL bilinear; return the ink
    alpha (0…1, values below INK_THRESHOLD zeroed) cropped to its tight bounding box."""
    small = Image.fromarray(np.round(sample * (255 / 16)).astype(np.uint8))
    big = small.resize((side, side), Image.Resampling.BILINEAR)
    alpha = np.asarray(big, dtype=np.float64) / 255.0
    alpha = np.where(alpha < INK_THRESHOLD, 0.0, alpha)
    rows = np.flatnonzero(alpha.any(axis=1))
    cols = np.flatnonzero(alpha.any(axis=0))
    return alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def make_digitscenes(
    split: str,
    *,
    count: int,
    image_size: int | tuple[int, int] = 64,
    seed: int = 0,
    max_digits: int = 4,
    min_digits: int = 1,
    scale: tuple[int, int] = (12, 28),
    max_iou: float = 0.3,
    clutter: bool = True,
    noise_std: float = 8.0,
    max_tries: int = 50,
) -> DetectionDataset:
    """Generate ``count`` DigitScenes images of ``split`` (``"train"``, ``"val"``, ``"test"``).

    Each image has ``min_digits … max_digits`` handwritten digits from the split's samples
    (:func:`digit_split`), each upscaled to a random ``scale[0] … scale[1]`` px square (PIL
    bilinear), bright ink placed at a random position where its tight ink box has IoU
    ``<= max_iou`` with every box already placed (a digit that finds no place in
    ``max_tries`` draws is left out; the first always fits). The background is a dark flat
    level, with ``clutter`` low-contrast blobs, lines and arcs; Gaussian noise of a random
    standard deviation ``0 … noise_std`` is added last. ``image_size`` is ``(H, W)`` or a
    square side. The result depends only on the arguments (for a given numpy and Pillow).
    """
    _check_split(split)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8×8, got {h}×{w}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not 1 <= scale[0] <= scale[1]:
        raise ValueError(f"need 1 <= scale[0] <= scale[1], got {scale}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    hi = min(scale[1], h, w)
    lo = min(scale[0], hi)

    samples, target = _digits()
    pool = digit_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    images = np.empty((count, h, w), dtype=np.uint8)
    annotations: list[Annotation] = []
    sources: list[np.ndarray] = []
    for i in range(count):
        img = _background(rng, h, w, clutter)
        boxes: list[np.ndarray] = []
        idxs: list[int] = []
        for _ in range(int(rng.integers(min_digits, max_digits + 1))):
            idx = int(rng.choice(pool))
            alpha = _digit_patch(samples[idx], int(rng.integers(lo, hi + 1)))
            bh, bw = alpha.shape
            ink = rng.uniform(170, 255)
            for _try in range(max_tries):
                x = int(rng.integers(0, w - bw + 1))
                y = int(rng.integers(0, h - bh + 1))
                box = np.array([x, y, x + bw, y + bh], dtype=np.float64)
                if not boxes or _iou(box, np.array(boxes)).max() <= max_iou:
                    break
            else:
                continue
            region = img[y : y + bh, x : x + bw]
            region *= 1 - alpha
            region += ink * alpha
            boxes.append(box)
            idxs.append(idx)
        if noise_std > 0:
            img += rng.normal(0.0, rng.uniform(0, noise_std), size=img.shape)
        images[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
        idx_arr = np.array(idxs, dtype=np.int64)
        annotations.append(Annotation(np.array(boxes).reshape(-1, 4), target[idx_arr]))
        sources.append(idx_arr)
    meta = {
        "name": "DigitScenes",
        "split": split,
        "seed": seed,
        "params": {
            "image_size": [h, w], "min_digits": min_digits, "max_digits": max_digits,
            "scale": list(scale), "max_iou": max_iou, "clutter": clutter,
            "noise_std": noise_std,
        },
        "source_indices": sources,
    }
    file_names = [f"{split}_{i:06d}.png" for i in range(count)]
    return DetectionDataset(images, annotations, list(DIGIT_CLASSES), file_names, meta)


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------


def _progress(items: Iterable, total: int, desc: str, progress: bool | None) -> Iterable:
    disable = (total < _PROGRESS_MIN or None) if progress is None else not progress
    return tqdm(items, total=total, desc=desc, unit="img", disable=disable, leave=False)


def write_coco(
    dataset: DetectionDataset, out_dir: str | Path, *, progress: bool | None = None
) -> Path:
    """Write ``out_dir/images/<file_name>`` PNGs and ``out_dir/annotations.json`` (COCO).

    Category ids are ``label + 1`` with the class names as names; ``bbox`` is ``[x, y, w, h]``.
    Returns the JSON path. ``progress``: ``None`` shows a bar for 100+ images on a terminal.
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    items = zip(dataset.images, dataset.annotations, dataset.file_names, strict=True)
    for i, (img, ann, name) in enumerate(
        _progress(items, len(dataset), "write_coco", progress)
    ):
        path = image_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(img)).save(path)
        h, w = img.shape
        images.append({"id": i + 1, "file_name": name, "width": int(w), "height": int(h)})
        for box, label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True):
            bw, bh = box[2] - box[0], box[3] - box[1]
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                "bbox": [box[0], box[1], bw, bh], "area": bw * bh, "iscrowd": 0,
            })
    info = {k: v for k, v in dataset.meta.items() if k != "source_indices"}
    doc = {
        "info": json.loads(json.dumps(info, default=str)),
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "object"}
            for k, name in enumerate(dataset.class_names)
        ],
    }
    json_path = out_dir / "annotations.json"
    json_path.write_text(json.dumps(doc, indent=1))
    return json_path


def _read_image(path: Path, ann_file: Path | str, what: str = "") -> np.ndarray:
    if not path.is_file():
        raise AnnotationError(f"{ann_file}: missing image file {path}{what}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise AnnotationError(f"{ann_file}: cannot read image file {path}: {exc}") from exc


def _check_box(
    box: Sequence[float], width: int, height: int, where: str
) -> list[float]:
    """Validate an xyxy box against a ``width``×``height`` image; return it clipped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise AnnotationError(f"{where}: non-finite box {list(box)}")
    if x2 <= x1 or y2 <= y1:
        raise AnnotationError(
            f"{where}: degenerate box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}): "
            "need x2 > x1 and y2 > y1"
        )
    tol = BOX_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise AnnotationError(
            f"{where}: box (x1, y1, x2, y2) = ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the "
            f"{width}×{height} image"
        )
    c = [min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if c[2] <= c[0] or c[3] <= c[1]:
        raise AnnotationError(f"{where}: box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the image")
    return c


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AnnotationError(f"{where}: expected a number, got {value!r}")
    return float(value)


def load_coco(  # noqa: C901
    json_path: str | Path,
    image_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> DetectionDataset:
    """Load a COCO detection JSON; images are read from ``image_dir`` (default: the JSON's
    folder's ``images/`` if it exists, else the JSON's folder) and converted to grayscale.

    Labels are the categories' positions in id order; ``class_names`` their names. Crowd
    annotations (``iscrowd: 1``) are skipped; images without annotations are kept.
    """
    json_path = Path(json_path)
    if image_dir is None:
        image_dir = json_path.parent / "images"
        if not image_dir.is_dir():
            image_dir = json_path.parent
    image_dir = Path(image_dir)
    if json_path.is_dir():
        raise AnnotationError(f"{json_path}: is a folder, not a COCO annotation file (give "
                              "the .json file)")
    try:
        doc = json.loads(json_path.read_text())
    except FileNotFoundError as exc:
        raise AnnotationError(f"{json_path}: annotation file not found") from exc
    except OSError as exc:
        raise AnnotationError(f"{json_path}: cannot read the annotation file: "
                              f"{exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{json_path}: malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise AnnotationError(f"{json_path}: malformed COCO file: top level is not an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise AnnotationError(f"{json_path}: malformed COCO file: no '{key}' list")

    cat_ids: list[int] = []
    cat_names: dict[int, str] = {}
    for k, cat in enumerate(doc["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise AnnotationError(f"{json_path}: malformed category #{k}: {cat!r}")
        if cat["id"] in cat_names:
            raise AnnotationError(f"{json_path}: duplicate category id {cat['id']}")
        cat_ids.append(cat["id"])
        cat_names[cat["id"]] = str(cat["name"])
    cat_ids.sort()
    label_of = {cid: k for k, cid in enumerate(cat_ids)}

    entries: dict[int, dict] = {}
    for k, im in enumerate(doc["images"]):
        if not (
            isinstance(im, dict) and isinstance(im.get("id"), int)
            and isinstance(im.get("file_name"), str)
        ):
            raise AnnotationError(f"{json_path}: malformed image entry #{k}: {im!r}")
        if im["id"] in entries:
            raise AnnotationError(f"{json_path}: duplicate image id {im['id']}")
        entries[im["id"]] = im
    boxes: dict[int, list[list[float]]] = {iid: [] for iid in entries}
    labels: dict[int, list[int]] = {iid: [] for iid in entries}
    pending = []
    for k, a in enumerate(doc["annotations"]):
        where = f"{json_path}: annotation #{k}"
        if not isinstance(a, dict):
            raise AnnotationError(f"{where}: malformed entry {a!r}")
        where = f"{json_path}: annotation id {a.get('id', '?')} (#{k})"
        if a.get("image_id") not in entries:
            raise AnnotationError(f"{where}: unknown image id {a.get('image_id')!r}")
        if a.get("category_id") not in label_of:
            raise AnnotationError(
                f"{where}: unknown category id {a.get('category_id')!r} "
                f"(known: {cat_ids})"
            )
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise AnnotationError(f"{where}: malformed bbox {bbox!r}: need [x, y, w, h]")
        x, y, bw, bh = (_number(v, where) for v in bbox)
        if a.get("iscrowd", 0):
            continue
        pending.append((a["image_id"], [x, y, x + bw, y + bh], label_of[a["category_id"]], where))

    images: list[np.ndarray] = []
    sizes: dict[int, tuple[int, int]] = {}
    for iid, im in _progress(entries.items(), len(entries), "load_coco", progress):
        img = _read_image(image_dir / im["file_name"], json_path, f" (image id {iid})")
        h, w = img.shape
        if ("width" in im and im["width"] != w) or ("height" in im and im["height"] != h):
            raise AnnotationError(
                f"{json_path}: image id {iid} ({im['file_name']}) is declared "
                f"{im.get('width')}×{im.get('height')} but the file is {w}×{h}"
            )
        sizes[iid] = (w, h)
        images.append(img)
    for iid, box, label, where in pending:
        boxes[iid].append(_check_box(box, *sizes[iid], where))
        labels[iid].append(label)
    anns = [Annotation(np.array(boxes[iid]).reshape(-1, 4), labels[iid]) for iid in entries]
    return DetectionDataset(
        _stack_images(images) if images else np.zeros((0, 1, 1), np.uint8),
        anns,
        [cat_names[c] for c in cat_ids],
        [im["file_name"] for im in entries.values()],
        {"name": json_path.name, "format": "coco", "info": doc.get("info", {})},
    )


# --------------------------------------------------------------------------------------------
# Pascal VOC
# --------------------------------------------------------------------------------------------


def _find_image(image_dir: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        for cand in (image_dir / (stem + ext), image_dir / (stem + ext.upper())):
            if cand.is_file():
                return cand
    return image_dir / (stem + IMAGE_EXTENSIONS[0])


def _xml_text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(f"{where}: missing <{tag}>")
    return child.text.strip()


def _xml_float(node: ET.Element, tag: str, where: str) -> float:
    text = _xml_text(node, tag, where)
    try:
        return float(text)
    except ValueError:
        raise AnnotationError(f"{where}: <{tag}> is not a number: {text!r}") from None


def _parse_voc(
    xml_path: Path, image_dir: Path, class_index: dict[str, int] | None
) -> tuple[np.ndarray, str, list[list[float]], list[str]]:
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"{xml_path}: malformed XML: {exc}") from exc
    if root.tag != "annotation":
        raise AnnotationError(f"{xml_path}: malformed VOC file: root is <{root.tag}>")
    fn = root.find("filename")
    if fn is not None and fn.text and fn.text.strip():
        image_path = image_dir / fn.text.strip()
    else:
        image_path = _find_image(image_dir, xml_path.stem)
    img = _read_image(image_path, xml_path)
    h, w = img.shape
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        sw = _xml_float(size, "width", f"{xml_path}: <size>")
        sh = _xml_float(size, "height", f"{xml_path}: <size>")
        if (sw, sh) != (0, 0) and (sw, sh) != (w, h):
            raise AnnotationError(
                f"{xml_path}: <size> says {sw:g}×{sh:g} but {image_path.name} is {w}×{h}"
            )
    boxes, names = [], []
    for k, obj in enumerate(root.iter("object")):
        where = f"{xml_path}: object #{k}"
        name = _xml_text(obj, "name", where)
        where = f"{xml_path}: object #{k} ('{name}')"
        if class_index is not None and name not in class_index:
            raise AnnotationError(f"{where}: unknown class name {name!r}")
        bnd = obj.find("bndbox")
        if bnd is None:
            raise AnnotationError(f"{where}: missing <bndbox>")
        xmin, ymin, xmax, ymax = (
            _xml_float(bnd, t, where) for t in ("xmin", "ymin", "xmax", "ymax")
        )
        # VOC pixel indices are 1-based and inclusive: pixels xmin..xmax -> [xmin-1, xmax).
        boxes.append(_check_box([xmin - 1, ymin - 1, xmax, ymax], w, h, where))
        names.append(name)
    return img, image_path.name, boxes, names


def load_voc(
    annotation_dir: str | Path,
    image_dir: str | Path,
    class_names: Sequence[str] | None = None,
    *,
    progress: bool | None = None,
) -> DetectionDataset:
    """Load Pascal VOC: one ``.xml`` per image in ``annotation_dir`` (sorted by name).

    The image is ``image_dir/<filename>`` (or ``<xml stem>.<ext>`` without ``<filename>``).
    Boxes are VOC's 1-based inclusive ``xmin … xmax`` converted to ``[xmin − 1, xmax)``.
    ``class_names`` fixes the label order (an unknown ``<name>`` is an error, naming the
    file and object); without it the classes are the sorted set of names found, and the
    dataset's ``meta["class_source"]`` says so (``"found in the annotation files"``;
    ``"given"`` otherwise), so that a misspelt name shows up as a class of its own there
    rather than silently.
    """
    annotation_dir, image_dir = Path(annotation_dir), Path(image_dir)
    source = "found in the annotation files" if class_names is None else "given"
    if not annotation_dir.is_dir():
        raise AnnotationError(f"{annotation_dir}: no such annotation folder")
    xml_paths = sorted(annotation_dir.glob("*.xml"))
    if not xml_paths:
        raise AnnotationError(f"{annotation_dir}: no .xml annotation files")
    class_index = None if class_names is None else {c: k for k, c in enumerate(class_names)}
    parsed = [
        _parse_voc(p, image_dir, class_index)
        for p in _progress(xml_paths, len(xml_paths), "load_voc", progress)
    ]
    if class_names is None:
        class_names = sorted({n for *_, names in parsed for n in names})
        class_index = {c: k for k, c in enumerate(class_names)}
    assert class_index is not None
    anns = [
        Annotation(np.array(b).reshape(-1, 4), [class_index[n] for n in names])
        for _, _, b, names in parsed
    ]
    return DetectionDataset(
        _stack_images([p[0] for p in parsed]), anns, list(class_names),
        [p[1] for p in parsed], {"name": annotation_dir.name, "format": "voc",
                                 "class_source": source},
    )


# --------------------------------------------------------------------------------------------
# YOLO
# --------------------------------------------------------------------------------------------


def _read_classes(classes: Sequence[str] | str | Path) -> list[str]:
    if not isinstance(classes, str | Path):
        return [str(c) for c in classes]
    path = Path(classes)
    if not path.is_file():
        raise AnnotationError(f"{path}: classes file not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise AnnotationError(f"{path}: malformed YAML: {exc}") from exc
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, dict):
            if sorted(names) != list(range(len(names))):
                raise AnnotationError(f"{path}: 'names' keys must be 0..{len(names) - 1}")
            return [str(names[k]) for k in range(len(names))]
        if not isinstance(names, list):
            raise AnnotationError(f"{path}: no 'names' list or mapping")
        return [str(n) for n in names]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _parse_yolo(txt_path: Path, w: int, h: int, n_classes: int):
    boxes, labels = [], []
    try:
        lines = txt_path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise AnnotationError(f"{txt_path}: not a text file: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{txt_path}:{lineno}"
        if len(tokens) != 5:
            raise AnnotationError(
                f"{where}: malformed line {line.strip()!r}: need 'class cx cy w h'"
            )
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise AnnotationError(
                f"{where}: malformed line {line.strip()!r}: not numbers"
            ) from None
        cls, cx, cy, bw, bh = values
        if not all(math.isfinite(v) for v in values):
            raise AnnotationError(f"{where}: malformed line {line.strip()!r}: non-finite value")
        if not cls.is_integer() or not 0 <= cls < n_classes:
            raise AnnotationError(
                f"{where}: unknown class id {tokens[0]} (classes are 0..{n_classes - 1})"
            )
        box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        boxes.append(_check_box(box, w, h, where))
        labels.append(int(cls))
    return boxes, labels


def load_yolo(
    label_dir: str | Path,
    image_dir: str | Path,
    classes: Sequence[str] | str | Path,
    *,
    progress: bool | None = None,
) -> DetectionDataset:
    """Load YOLO txt labels: ``label_dir/<stem>.txt`` for each image ``image_dir/<stem>.<ext>``.

    Each line is ``class cx cy w h``, coordinates normalised to the image size. An image
    without a txt file has no objects; a txt file without an image is an error, and so are
    a ``label_dir`` that does not exist or holds no label file at all (a mistyped folder
    would otherwise give every image zero boxes) and two images of one stem (``a.png``
    beside ``a.jpg``: one label file cannot say which it labels). ``classes``
    is a list of names, a text file with one name per line, or a YOLO ``data.yaml``
    (``names`` list or mapping). A ``classes.txt`` in ``label_dir`` is not a label file.
    """
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    class_names = _read_classes(classes)
    if not image_dir.is_dir():
        raise AnnotationError(f"{image_dir}: no such image folder")
    if not label_dir.is_dir():
        raise AnnotationError(f"{label_dir}: no such label folder (every image would have "
                              "zero boxes)")
    image_paths: dict[str, Path] = {}
    for p in sorted(image_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in image_paths:
                raise AnnotationError(
                    f"{p}: same stem as {image_paths[p.stem].name}; the label file "
                    f"{p.stem}.txt cannot say which image it labels (rename or remove one)")
            image_paths[p.stem] = p
    classes_path = Path(classes).resolve() if isinstance(classes, str | Path) else None
    txt_paths = {
        p.stem: p for p in sorted(label_dir.glob("*.txt"))
        if p.name != "classes.txt" and p.resolve() != classes_path
    }
    if not txt_paths and image_paths:
        raise AnnotationError(f"{label_dir}: no label files (<stem>.txt) for the "
                              f"{len(image_paths)} images of {image_dir}; a wrong folder? "
                              "(an image without objects may have an empty .txt)")
    for stem, txt in txt_paths.items():
        if stem not in image_paths:
            raise AnnotationError(
                f"{txt}: missing image file {image_dir / stem}.* "
                f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
            )
    if not image_paths:
        raise AnnotationError(f"{image_dir}: no image files")
    images, anns, names = [], [], []
    for stem, path in _progress(image_paths.items(), len(image_paths), "load_yolo", progress):
        txt = txt_paths.get(stem)
        img = _read_image(path, txt if txt is not None else path)
        boxes, labels = ([], []) if txt is None else _parse_yolo(txt, img.shape[1],
                                                                  img.shape[0], len(class_names))
        images.append(img)
        anns.append(Annotation(np.array(boxes).reshape(-1, 4), labels))
        names.append(path.name)
    return DetectionDataset(
        _stack_images(images), anns, class_names, names,
        {"name": label_dir.name, "format": "yolo"},
    )


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)


def _to_pil_rgb(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # C×H×W -> H×W×C
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if arr.ndim not in (2, 3):
        raise ValueError(f"cannot draw an image of shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def draw_detections(
    image: Any,
    boxes: Any,
    labels: Any,
    scores: Any = None,
    *,
    class_names: Sequence[str] | None = None,
    scale: int = 1,
) -> Image.Image:
    """Draw boxes (xyxy pixels) with their class name (and score) on an RGB copy of ``image``.

    ``image``: uint8 or ``[0, 1]`` float array/tensor (``H×W``, ``H×W×C`` or ``C×H×W``) or a
    PIL image. ``labels`` index ``class_names`` (default: the label numbers). ``scale``
    enlarges the image (nearest neighbour) first so small images stay readable. Tags read
    "name: score" in a font of :func:`label_font`'s size (at least 12 px).
    """
    pil = _to_pil_rgb(image)
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    boxes = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(torch.as_tensor(labels).detach().cpu(), dtype=np.int64).reshape(-1)
    if scores is not None:
        scores = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float64).reshape(-1)
    draw = ImageDraw.Draw(pil)
    font = label_font(pil.size)
    for k, (box, label) in enumerate(zip(boxes, labels, strict=True)):
        color = _PALETTE[int(label) % len(_PALETTE)]
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=color, width=1)
        text = class_names[label] if class_names is not None else str(int(label))
        if scores is not None:
            text += f": {scores[k]:.2f}"      # "1: 0.50", never "1 0.50" read as "10.50"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th + 2], fill=color)
        draw.text((x1 + 1 - tb[0], ty + 1 - tb[1]), text, fill=(0, 0, 0), font=font)
    return pil


def label_font(size: tuple[int, int]) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font of the box tags on an image of ``size`` (width, height): Pillow's default
    font at 1/32 of the shorter side, 12 to 32 px (16 px on a 512-px image), readable at
    1:1; Pillow's 8-px bitmap font only where Pillow has no FreeType."""
    pixels = max(12, min(32, round(min(size) / 32)))
    try:
        return ImageFont.load_default(size=pixels)
    except (TypeError, ImportError, OSError):     # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def image_grid(images: Sequence[Image.Image], cols: int, pad: int = 2) -> Image.Image:
    """Tile PIL images (all one size) into a grid with ``pad`` px white gaps."""
    if not images:
        raise ValueError("no images to tile")
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), "white")
    for k, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((k % cols) * (w + pad), (k // cols) * (h + pad)))
    return grid


def render_preview(
    dataset: DetectionDataset, n: int = 8, cols: int = 4, scale: int = 2
) -> Image.Image:
    """The first ``n`` images of ``dataset`` with their boxes drawn, as one grid image."""
    tiles = [
        draw_detections(
            dataset.images[i], dataset.annotations[i].boxes, dataset.annotations[i].labels,
            class_names=dataset.class_names, scale=scale,
        )
        for i in range(min(n, len(dataset)))
    ]
    return image_grid(tiles, cols=min(cols, len(tiles)))
