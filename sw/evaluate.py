"""Detection accuracy: COCO mAP (pycocotools) of a float model or of a deployment bundle.

* :func:`evaluate_predictions` — mAP@0.5 and mAP@[.5:.95] of per-image predictions against a
  :class:`bitdet.sw.data.DetectionDataset` (COCOeval, bbox, all areas, 100 detections).
* :func:`predict_model` — run a float model (``BinaryDetector`` in eval mode, or the
  ``RealDetector`` teacher) and decode its head map.
* :func:`predict_bundle` — run a bundle the way the driver does: the host stem in fixed
  point on integer pixels (:meth:`HostLayer.run`), the binary layers with the golden model
  (:meth:`Bundle.run_binary`), the host head, then the same decoding.

Category ids are ``label + 1`` and image ids ``index + 1``, as :func:`bitdet.sw.data.write_coco`.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

import numpy as np
import torch

from bitdet.core.bundle import Bundle

from .data import DetectionDataset
from .detection import BOX_PRIOR, decode

__all__ = [
    "bundle_decode_settings",
    "coco_ground_truth",
    "decode_settings",
    "evaluate_predictions",
    "predict_bundle",
    "predict_model",
    "run_bundle",
]

#: Decoding defaults used for evaluation (a low threshold: COCOeval ranks by score).
EVAL_SCORE_THRESHOLD = 0.01
EVAL_IOU_THRESHOLD = 0.5


def decode_settings(stride: int, prior: float = BOX_PRIOR,
                    score_threshold: float = EVAL_SCORE_THRESHOLD,
                    iou_threshold: float = EVAL_IOU_THRESHOLD,
                    max_detections: int = 100) -> dict:
    """Keyword arguments for :func:`bitdet.sw.detection.decode`."""
    return {"stride": int(stride), "prior": float(prior), "score_threshold": score_threshold,
            "iou_threshold": iou_threshold, "max_detections": max_detections}


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mAP needs pycocotools: pip install pycocotools") from exc
    return COCO, COCOeval


def coco_ground_truth(dataset: DetectionDataset):
    """An in-memory ``pycocotools.coco.COCO`` holding ``dataset``'s boxes."""
    COCO, _ = _pycocotools()
    images, annotations = [], []
    for i, (img, ann) in enumerate(zip(dataset.images, dataset.annotations, strict=True)):
        h, w = img.shape
        images.append({"id": i + 1, "width": int(w), "height": int(h),
                       "file_name": dataset.file_names[i]})
        for box, label in zip(ann.boxes.tolist(), ann.labels.tolist(), strict=True):
            bw, bh = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(label) + 1, "bbox": [box[0], box[1], bw, bh],
                                "area": bw * bh, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": k + 1, "name": name}
                                   for k, name in enumerate(dataset.class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def evaluate_predictions(predictions: list[dict], dataset: DetectionDataset) -> dict[str, float]:
    """COCO bbox mAP of ``predictions[i]`` (``boxes`` xyxy px, ``scores``, ``labels``) for
    image ``i`` of ``dataset``.

    Returns ``{"mAP50": AP at IoU 0.5, "mAP": AP averaged over IoU 0.50:0.95, "images": n,
    "detections": total}``. No detections at all give 0.0; a data set without objects gives
    −1.0 (COCOeval's "undefined").
    """
    if len(predictions) != len(dataset):
        raise ValueError(f"{len(predictions)} predictions for {len(dataset)} images")
    _, COCOeval = _pycocotools()
    gt = coco_ground_truth(dataset)
    results = []
    for i, pred in enumerate(predictions):
        boxes = np.asarray(torch.as_tensor(pred["boxes"]).cpu(), dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(torch.as_tensor(pred["scores"]).cpu(), dtype=np.float64).reshape(-1)
        labels = np.asarray(torch.as_tensor(pred["labels"]).cpu(), dtype=np.int64).reshape(-1)
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(),
                                     strict=True):
            results.append({"image_id": i + 1, "category_id": label + 1, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    summary = {"images": len(dataset), "detections": len(results)}
    if not gt.dataset["annotations"]:
        return {"mAP50": -1.0, "mAP": -1.0, **summary}
    if not results:
        return {"mAP50": 0.0, "mAP": 0.0, **summary}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"mAP50": float(evaluator.stats[1]), "mAP": float(evaluator.stats[0]), **summary}


def _batches(dataset: DetectionDataset, batch_size: int) -> Iterator[torch.Tensor]:
    """Float pixel batches ``B×1×H×W`` with values 0..255 (the models' input)."""
    images = np.asarray(dataset.images)
    for start in range(0, len(dataset), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        yield chunk.to(torch.float32)[:, None]


@torch.no_grad()
def predict_model(model: torch.nn.Module, dataset: DetectionDataset, *, batch_size: int = 64,
                  device: str | torch.device = "cpu", prior: float = BOX_PRIOR,
                  **decode_kwargs) -> list[dict[str, torch.Tensor]]:
    """Detections of a float model (set to eval mode) on every image of ``dataset``."""
    model.eval()
    settings = decode_settings(model.stride, prior)
    settings.update(decode_kwargs)
    out = []
    for pixels in _batches(dataset, batch_size):
        head = model(pixels.to(device)).cpu()
        out += decode(head, image_size=tuple(pixels.shape[2:]), **settings)
    return out


def bundle_decode_settings(bundle: Bundle) -> dict:
    """Decoding settings of a bundle (:meth:`~bitdet.core.bundle.Bundle.decode_settings`:
    ``grid_stride``, ``decode.prior``), with the evaluation defaults for the rest."""
    return decode_settings(**bundle.decode_settings())


def run_bundle(bundle: Bundle, pixels: torch.Tensor) -> torch.Tensor:
    """Head map of a bundle on integer pixels ``N×C×H×W`` (0..255), as the driver computes
    it (:meth:`~bitdet.core.bundle.Bundle.forward`: fixed-point host stem, golden-model
    binary layers, fixed-point host head)."""
    return bundle.forward(pixels)


def predict_bundle(bundle: Bundle, dataset: DetectionDataset, *, batch_size: int = 64,
                   **decode_kwargs) -> list[dict[str, torch.Tensor]]:
    """Detections of a bundle on every image of ``dataset`` (see :func:`run_bundle`)."""
    settings = bundle_decode_settings(bundle)
    settings.update(decode_kwargs)
    expected = bundle.model.get("input")
    out = []
    for pixels in _batches(dataset, batch_size):
        if expected is not None and list(pixels.shape[1:]) != list(expected):
            raise ValueError(f"the bundle takes {'×'.join(map(str, expected))} images, the data "
                             f"set has {'×'.join(map(str, pixels.shape[1:]))}")
        head = run_bundle(bundle, pixels)
        out += decode(head, image_size=tuple(pixels.shape[2:]), **settings)
    return out
