"""Head semantics (bitdet.sw.detection) and COCO mAP (bitdet.sw.evaluate)."""

import math

import pytest
import torch

from bitdet.sw.data import make_digitscenes
from bitdet.sw.detection import (
    BOX_PRIOR,
    box_iou,
    decode,
    detection_loss,
    encode_targets,
    generalized_box_iou,
    head_boxes,
    nms,
    perfect_head_map,
)
from bitdet.sw.evaluate import evaluate_predictions

STRIDE, GRID, CLASSES = 8, (8, 8), 10


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


@pytest.fixture(scope="module")
def scenes():
    return make_digitscenes("test", count=12, seed=3)


def _targets(dataset):
    return [_target(a.boxes, a.labels) for a in dataset.annotations]


# ----------------------------------------------------------------------------- encoding


def test_encode_assigns_the_cell_holding_the_centre():
    enc = encode_targets([_target([[10, 20, 30, 28]], [7])], GRID, STRIDE)
    # centre (20, 24): column 2, row 3 (a centre on a border goes to the cell below/right)
    assert enc.positive.sum() == 1 and enc.positive[0, 3, 2]
    assert enc.labels[0, 3, 2] == 7 and (enc.labels[0][~enc.positive[0]] == -1).all()
    assert torch.allclose(enc.offsets[0, 3, 2], torch.tensor([0.5, 0.0]))
    assert torch.allclose(enc.log_sizes[0, 3, 2],
                          torch.tensor([math.log(20 / BOX_PRIOR), math.log(8 / BOX_PRIOR)]))
    assert torch.equal(enc.boxes[0, 3, 2], torch.tensor([10.0, 20, 30, 28]))
    assert enc.dropped == 0


def test_encode_collision_keeps_the_largest_box():
    small, large = [17, 17, 23, 23], [10, 10, 30, 30]     # both centred in cell (2, 2)
    enc = encode_targets([_target([small, large, [0, 0, 4, 4]], [1, 2, 3])], GRID, STRIDE)
    assert enc.dropped == 1
    assert enc.positive.sum() == 2
    assert enc.labels[0, 2, 2] == 2 and torch.equal(enc.boxes[0, 2, 2], torch.tensor(large,
                                                                                    dtype=torch.float32))
    # equal areas: the first in annotation order wins
    enc = encode_targets([_target([[16, 16, 24, 24], [17, 17, 25, 25]], [4, 5])], GRID, STRIDE)
    assert enc.labels[0, 2, 2] == 4 and enc.dropped == 1


def test_encode_empty_image_and_far_edge():
    enc = encode_targets([_target([], []), _target([[56, 56, 64, 64]], [0])], GRID, STRIDE)
    assert not enc.positive[0].any()
    assert enc.positive[1, 7, 7]


# ----------------------------------------------------------------------------- decoding


def test_perfect_head_map_decodes_to_the_ground_truth(scenes):
    targets = _targets(scenes)
    head = perfect_head_map(targets, GRID, STRIDE, CLASSES)
    detections = decode(head, stride=STRIDE, score_threshold=0.5, iou_threshold=0.99)
    for target, det in zip(targets, detections, strict=True):
        assert len(det["boxes"]) == len(target["boxes"])  # DigitScenes: no collisions here
        # match by label and IoU: every ground-truth box is recovered to within 0.01 px
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            err = (det["boxes"] - box).abs().amax(dim=1)
            k = int(err.argmin())
            assert float(err[k]) < 1e-2
            assert int(det["labels"][k]) == int(label)
            assert float(det["scores"][k]) > 0.99


def test_decode_threshold_limit_and_clipping():
    head = torch.full((1, 5 + CLASSES, *GRID), -20.0)
    head[0, 0, 0, 0] = 20.0                # a cell in the corner with a huge box
    head[0, 3:5, 0, 0] = 3.0
    head[0, 5, 0, 0] = 20.0                # … of class 0 for sure
    head[0, 0, 4, 4] = 0.0                 # objectness 0.5, class probability 0.1 each
    (det,) = decode(head, stride=STRIDE, score_threshold=0.2)
    assert len(det["boxes"]) == 1
    assert det["boxes"][0, :2].min() >= 0 and det["boxes"][0, 2:].max() <= 64
    (det,) = decode(head, stride=STRIDE, score_threshold=0.01)
    assert len(det["boxes"]) == 2
    (det,) = decode(head, stride=STRIDE, score_threshold=0.01, max_detections=1)
    assert len(det["boxes"]) == 1 and det["scores"][0] > 0.99


def test_head_boxes_geometry():
    head = torch.zeros(1, 5 + CLASSES, 2, 2)
    boxes = head_boxes(head, STRIDE)
    # tx = ty = 0: the centre of each cell; tw = th = 0: the prior size
    assert torch.allclose(boxes[0, 1, 0], torch.tensor([4 - 8.0, 12 - 8.0, 4 + 8.0, 12 + 8.0]))


# ----------------------------------------------------------------------------- NMS, IoU


def test_box_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 0.0, 1.0]]))
    giou = generalized_box_iou(a.expand(3, 4), b)
    assert torch.allclose(giou, torch.tensor([1 / 3, 0 - (900 - 200) / 900, 1.0]))


def test_nms_hand_examples():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    # class-agnostic: 3 (0.95) suppresses 0 (IoU 0.82) and 1 (IoU 0.75); 2 is apart
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [3, 2]
    # class-aware: a box of another class is never suppressed
    labels = torch.tensor([0, 1, 0, 0])
    assert nms(boxes, scores, labels, 0.5).tolist() == [3, 1, 2]
    # suppression needs IoU strictly above the threshold
    two = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]])      # IoU 1/3
    assert nms(two, torch.tensor([0.5, 0.6]), iou_threshold=1 / 3 + 1e-6).tolist() == [1, 0]
    assert nms(two, torch.tensor([0.5, 0.6]), iou_threshold=0.3).tolist() == [1]
    # a suppressed box does not suppress others (chain: 0 kills 1, 1 would kill 2)
    chain = torch.tensor([[0.0, 0, 10, 10], [6, 0, 16, 10], [12, 0, 22, 10]])
    assert nms(chain, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.2).tolist() == [0, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0)).tolist() == []


# ----------------------------------------------------------------------------- loss


def test_loss_prefers_the_perfect_map_and_reaches_every_channel(scenes):
    targets = _targets(scenes)
    enc = encode_targets(targets, GRID, STRIDE)
    perfect = perfect_head_map(targets, GRID, STRIDE, CLASSES)
    good, parts = detection_loss(perfect, enc, STRIDE)
    assert parts["box"] < 1e-3 and parts["obj"] < 1e-3 and parts["cls"] < 1e-3
    head = torch.zeros_like(perfect, requires_grad=True)
    bad, _ = detection_loss(head, enc, STRIDE)
    assert float(bad.detach()) > float(good) + 1
    bad.backward()
    assert all(head.grad[:, c].abs().sum() > 0 for c in range(5 + CLASSES))


def test_loss_without_objects_is_finite():
    enc = encode_targets([_target([], [])], GRID, STRIDE)
    head = torch.randn(1, 5 + CLASSES, *GRID, requires_grad=True)
    loss, parts = detection_loss(head, enc, STRIDE)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and parts["box"] == 0 and parts["cls"] == 0


# ----------------------------------------------------------------------------- mAP


def test_map_is_one_for_perfect_predictions_and_lower_when_shifted(scenes):
    perfect = [{"boxes": torch.from_numpy(a.boxes), "scores": torch.ones(len(a)),
                "labels": torch.from_numpy(a.labels)} for a in scenes.annotations]
    scores = evaluate_predictions(perfect, scenes)
    assert scores["mAP50"] == pytest.approx(1.0) and scores["mAP"] == pytest.approx(1.0)
    shifted = [{**p, "boxes": p["boxes"] + torch.tensor([3.0, 0, 3, 0])} for p in perfect]
    moved = evaluate_predictions(shifted, scenes)
    # a 3-px shift drops a few of the smallest digits below IoU 0.5, most stay above it
    assert moved["mAP"] < 0.9 and moved["mAP"] < moved["mAP50"] < 1.0
    nudged = [{**p, "boxes": p["boxes"] + torch.tensor([1.0, 0, 1, 0])} for p in perfect]
    nudged_scores = evaluate_predictions(nudged, scenes)     # every IoU stays above 0.5
    assert nudged_scores["mAP50"] == pytest.approx(1.0) and nudged_scores["mAP"] < 1.0
    far = [{**p, "boxes": p["boxes"] + torch.tensor([100.0, 0, 100, 0])} for p in perfect]
    assert evaluate_predictions(far, scenes)["mAP50"] == 0.0
    wrong = [{**p, "labels": (p["labels"] + 1) % CLASSES} for p in perfect]
    assert evaluate_predictions(wrong, scenes)["mAP50"] == 0.0
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
              "labels": torch.zeros(0, dtype=torch.int64)} for _ in perfect]
    assert evaluate_predictions(empty, scenes)["mAP50"] == 0.0
    with pytest.raises(ValueError, match="predictions for"):
        evaluate_predictions(perfect[:2], scenes)


def test_decoded_perfect_map_scores_map_one(scenes):
    head = perfect_head_map(_targets(scenes), GRID, STRIDE, CLASSES)
    scores = evaluate_predictions(decode(head, stride=STRIDE), scenes)
    assert scores["mAP50"] == pytest.approx(1.0)
    assert scores["mAP"] > 0.99
