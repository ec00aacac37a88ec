"""Detection head semantics: target encoding, loss, decoding and NMS on the output grid.

The detectors (:class:`bitdet.sw.models.BinaryDetector`, :class:`~bitdet.sw.models.RealDetector`)
end in a ``(5 + C)``-channel map on an ``S×S`` grid of stride ``stride`` pixels (8 for the
default 64×64 model). Each cell predicts at most one object (YOLO-style, one box per cell,
no anchors but a single size prior):

======== =================================================================================
channel  meaning
======== =================================================================================
0        objectness logit ``o``: ``P(object centred in this cell) = sigmoid(o)``
1, 2     ``tx, ty``: the centre is ``((gx + sigmoid(tx)) · stride, (gy + sigmoid(ty)) · stride)``
3, 4     ``tw, th``: the size is ``(prior · exp(tw), prior · exp(th))`` pixels
5 …      class logits (softmax over the ``C`` classes)
======== =================================================================================

``prior`` is :data:`BOX_PRIOR` (16 px) unless given. Boxes are ``x1 y1 x2 y2`` in pixels
(:mod:`bitdet.sw.data`'s convention). docs/training.md describes the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BOX_PRIOR",
    "MAX_LOG_SIZE",
    "Encoded",
    "LossWeights",
    "box_iou",
    "decode",
    "detection_loss",
    "encode_targets",
    "generalized_box_iou",
    "head_boxes",
    "nms",
    "perfect_head_map",
]

#: Size prior (pixels): ``tw = th = 0`` means a ``BOX_PRIOR × BOX_PRIOR`` box.
BOX_PRIOR = 16.0
#: ``tw`` and ``th`` are clamped to ``±MAX_LOG_SIZE`` when decoding (exp overflow guard).
MAX_LOG_SIZE = 6.0
_OFFSET_EPS = 1e-4


@dataclass
class Encoded:
    """Per-cell training targets for a batch (``N`` images, ``S_h × S_w`` grid).

    Members
    -------
    positive : bool ``N×S_h×S_w`` — the cell is responsible for an object
    boxes : float32 ``N×S_h×S_w×4`` — the responsible object's box (xyxy px; 0 elsewhere)
    offsets : float32 ``N×S_h×S_w×2`` — centre offset inside the cell, in ``[0, 1)``
    log_sizes : float32 ``N×S_h×S_w×2`` — ``log(w / prior), log(h / prior)``
    labels : int64 ``N×S_h×S_w`` — class of the responsible object (−1 elsewhere)
    dropped : int — objects that lost a cell collision (not trained on)
    """

    positive: torch.Tensor
    boxes: torch.Tensor
    offsets: torch.Tensor
    log_sizes: torch.Tensor
    labels: torch.Tensor
    dropped: int = 0


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three loss terms (see :func:`detection_loss`)."""

    objectness: float = 1.0
    box: float = 2.0
    classes: float = 1.0


def encode_targets(targets: list[dict[str, torch.Tensor]], grid: tuple[int, int], stride: int,
                   *, prior: float = BOX_PRIOR) -> Encoded:
    """Assign every box to the grid cell that holds its centre.

    ``targets[i]`` is ``{"boxes": (n, 4) xyxy px, "labels": (n,)}`` (as
    :class:`bitdet.sw.data.DetectionDataset` yields). A centre on a cell border belongs to
    the cell below/right of it; centres on the image's far edge are clamped into the last
    cell. **Collisions**: when several centres fall into one cell, the cell keeps the box with
    the largest area (the first in annotation order on a tie); the others are not trained
    on and are counted in ``Encoded.dropped``.
    """
    gh, gw = grid
    n = len(targets)
    positive = torch.zeros(n, gh, gw, dtype=torch.bool)
    boxes = torch.zeros(n, gh, gw, 4)
    offsets = torch.zeros(n, gh, gw, 2)
    log_sizes = torch.zeros(n, gh, gw, 2)
    labels = torch.full((n, gh, gw), -1, dtype=torch.int64)
    dropped = 0
    for i, target in enumerate(targets):
        b = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).cpu()
        lab = torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1).cpu()
        if len(b) == 0:
            continue
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        # largest first; a stable sort keeps annotation order among equal areas
        order = torch.sort(-area, stable=True).indices
        for k in order.tolist():
            x1, y1, x2, y2 = b[k].tolist()
            cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
            gx = min(max(math.floor(cx), 0), gw - 1)
            gy = min(max(math.floor(cy), 0), gh - 1)
            if positive[i, gy, gx]:
                dropped += 1
                continue
            positive[i, gy, gx] = True
            boxes[i, gy, gx] = b[k]
            offsets[i, gy, gx, 0] = min(max(cx - gx, 0.0), 1.0)
            offsets[i, gy, gx, 1] = min(max(cy - gy, 0.0), 1.0)
            log_sizes[i, gy, gx, 0] = math.log((x2 - x1) / prior)
            log_sizes[i, gy, gx, 1] = math.log((y2 - y1) / prior)
            labels[i, gy, gx] = lab[k]
    return Encoded(positive, boxes, offsets, log_sizes, labels, dropped)


def head_boxes(head_map: torch.Tensor, stride: int, *, prior: float = BOX_PRIOR,
               clamp: bool = True) -> torch.Tensor:
    """Decode every cell's box: ``N×(5+C)×S_h×S_w`` → ``N×S_h×S_w×4`` xyxy pixels.

    ``clamp`` limits ``tw, th`` to ``±MAX_LOG_SIZE`` (always on when decoding detections;
    the loss keeps the gradient by clamping too).
    """
    _n, _c, gh, gw = head_map.shape
    gy, gx = torch.meshgrid(torch.arange(gh, device=head_map.device, dtype=head_map.dtype),
                            torch.arange(gw, device=head_map.device, dtype=head_map.dtype),
                            indexing="ij")
    cx = (gx + torch.sigmoid(head_map[:, 1])) * stride
    cy = (gy + torch.sigmoid(head_map[:, 2])) * stride
    tw, th = head_map[:, 3], head_map[:, 4]
    if clamp:
        tw, th = tw.clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE), th.clamp(-MAX_LOG_SIZE, MAX_LOG_SIZE)
    w, h = prior * torch.exp(tw), prior * torch.exp(th)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: ``(n, 4), (m, 4)`` → ``(n, m)`` (0 for empty unions)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(dim=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise GIoU of matching xyxy boxes ``(..., 4)`` (Rezatofighi et al. 2019)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = (area_a + area_b - inter).clamp(min=1e-7)
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2]))
    hull_area = hull.clamp(min=0).prod(dim=-1).clamp(min=1e-7)
    iou = inter / union
    return iou - (hull_area - union) / hull_area


def detection_loss(head_map: torch.Tensor, encoded: Encoded, stride: int, *,
                   prior: float = BOX_PRIOR, weights: LossWeights = LossWeights(),
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a head map against :func:`encode_targets` output.

    * objectness: binary cross-entropy with logits on every cell (target 1 on responsible
      cells, 0 elsewhere), summed;
    * box: ``1 − GIoU`` between the decoded box and the target box, summed over responsible
      cells (the gradient reaches ``tx, ty`` through the sigmoid and ``tw, th`` through exp);
    * classes: softmax cross-entropy on responsible cells, summed.

    Each sum is divided by the number of responsible cells in the batch (at least 1), then
    weighted by ``weights``. Returns ``(loss, {"loss", "obj", "box", "cls"} as floats)``.
    """
    device = head_map.device
    positive = encoded.positive.to(device)
    num_pos = max(int(positive.sum()), 1)
    obj = F.binary_cross_entropy_with_logits(head_map[:, 0], positive.to(head_map.dtype),
                                             reduction="sum") / num_pos
    if positive.any():
        pred = head_boxes(head_map, stride, prior=prior)[positive]
        box = (1 - generalized_box_iou(pred, encoded.boxes.to(device)[positive])).sum() / num_pos
        logits = head_map[:, 5:].permute(0, 2, 3, 1)[positive]
        cls = F.cross_entropy(logits, encoded.labels.to(device)[positive],
                              reduction="sum") / num_pos
    else:
        box = cls = head_map.sum() * 0.0
    loss = weights.objectness * obj + weights.box * box + weights.classes * cls
    return loss, {"loss": float(loss.detach()), "obj": float(obj.detach()),
                  "box": float(box.detach()), "cls": float(cls.detach())}


def nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor | None = None,
        iou_threshold: float = 0.5) -> torch.Tensor:
    """Greedy non-maximum suppression, class-aware when ``labels`` is given.

    A box is dropped when a higher-scoring kept box of the same class overlaps it with IoU
    ``> iou_threshold``. Returns the kept indices, highest score first (ties in input
    order).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(-scores, stable=True).indices
    b = boxes[order]
    overlap = box_iou(b, b) > iou_threshold
    if labels is not None:
        lab = labels[order]
        overlap &= lab[:, None] == lab[None, :]
    overlap = overlap.cpu()
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= ~overlap[i, i + 1:]
    return order[keep.to(boxes.device)]


def decode(head_map: torch.Tensor, *, stride: int, score_threshold: float = 0.05,
           iou_threshold: float = 0.5, max_detections: int = 100, prior: float = BOX_PRIOR,
           image_size: tuple[int, int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Head map → per-image detections ``{"boxes" (k, 4) xyxy px, "scores" (k,), "labels" (k,)}``.

    The score of a cell is ``sigmoid(objectness) · max softmax(class logits)`` and its label
    the arg-max class. Cells scoring ``>= score_threshold`` go through class-aware
    :func:`nms`; at most ``max_detections`` remain, highest score first. Boxes are clipped to
    ``image_size`` (``(H, W)``; default: the grid times the stride).
    """
    head_map = head_map.detach().float()
    n, channels, gh, gw = head_map.shape
    if channels < 6:
        raise ValueError(f"a head map needs 5 + classes channels, got {channels}")
    height, width = image_size if image_size is not None else (gh * stride, gw * stride)
    boxes = head_boxes(head_map, stride, prior=prior).reshape(n, -1, 4)
    probs = torch.softmax(head_map[:, 5:], dim=1).amax(dim=1).reshape(n, -1)
    labels = head_map[:, 5:].argmax(dim=1).reshape(n, -1)
    scores = torch.sigmoid(head_map[:, 0]).reshape(n, -1) * probs
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype,
                          device=boxes.device)
    out = []
    for i in range(n):
        sel = scores[i] >= score_threshold
        b = torch.minimum(boxes[i][sel].clamp(min=0), limits)
        s, lab = scores[i][sel], labels[i][sel]
        keep = nms(b, s, lab, iou_threshold)[:max_detections]
        out.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
    return out


def perfect_head_map(targets: list[dict[str, torch.Tensor]], grid: tuple[int, int],
                     stride: int, num_classes: int, *, prior: float = BOX_PRIOR,
                     confidence: float = 20.0) -> torch.Tensor:
    """The head map a perfect detector would output for ``targets`` (tests, sanity checks).

    Responsible cells get objectness ``+confidence``, the others ``−confidence``; offsets
    are ``logit`` of the encoded offsets (clamped away from 0 and 1 by 1e-4), sizes the
    encoded log sizes, class logits ``+confidence`` for the class and 0 for the others.
    """
    enc = encode_targets(targets, grid, stride, prior=prior)
    n, (gh, gw) = len(targets), grid
    out = torch.zeros(n, 5 + num_classes, gh, gw)
    out[:, 0] = torch.where(enc.positive, confidence, -confidence)
    off = enc.offsets.clamp(_OFFSET_EPS, 1 - _OFFSET_EPS)
    out[:, 1:3] = torch.logit(off).permute(0, 3, 1, 2)
    out[:, 3:5] = enc.log_sizes.permute(0, 3, 1, 2)
    cls = F.one_hot(enc.labels.clamp(min=0), num_classes).permute(0, 3, 1, 2).float()
    out[:, 5:] = cls * confidence * enc.positive[:, None]
    return out
