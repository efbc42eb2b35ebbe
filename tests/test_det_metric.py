"""DetMetric against pycocotools' COCOeval (the reference implementation) on random scenes built to
hit every rule: misses, duplicates, wrong classes, tiny and huge boxes, boxes exactly on the area
bounds, IoU exactly 0.5, identical ground truths, empty images, classes absent from the ground
truth, crowd (ignored) boxes, more than max_dets detections, equal scores."""
import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ivt.metrics import DetMetric
from ivt.metrics.det import format_det_table

NUM_CLASSES = 5  # class 3 appears only in detections, class 4 nowhere
GT_CLASSES = 3


def random_box(rng, width, height, side=None):
    """xyxy box inside the image; side log-uniform from 2 px to most of the image."""
    if side is None:
        w, h = np.exp(rng.uniform(np.log(2), np.log(0.9 * width), size=2))
        h = min(h, 0.9 * height)
    else:
        w = h = side
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.array([x1, y1, x1 + w, y1 + h])


def jitter(rng, box, scale):
    w, h = box[2] - box[0], box[3] - box[1]
    return box + rng.normal(0, scale, 4) * np.array([w, h, w, h])


def random_scene(seed, num_images=40, max_dets=100, tied_scores=False):
    """List of per-image dicts: xyxy float64 boxes, 0-based labels, crowd flags, scores."""
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(num_images):
        width, height = 640, 512
        kind = i % 10
        gt, gt_lab, crowd = [], [], []
        n_gt = 0 if kind in (0, 1) else int(rng.integers(1, 9))
        for _ in range(n_gt):
            side = [None, None, None, 32.0, 96.0, 4.0][int(rng.integers(0, 6))]
            gt.append(random_box(rng, width, height, side))
            gt_lab.append(int(rng.integers(0, GT_CLASSES)))
            crowd.append(bool(rng.random() < 0.1))
        if kind == 2:  # a detection at IoU 0.6 with both of two ground truths (ties: pycocotools
            # takes the later one), then a lower-scored exact copy of the first ground truth
            gt += [np.array([300.0, 300.0, 310.0, 310.0]), np.array([305.0, 300.0, 315.0, 310.0])]
            gt_lab += [1, 1]
            crowd += [False, False]
        if kind == 6:  # a regular box at IoU 0.82 wins over a crowd box at IoU 1 (below)
            gt += [np.array([404.0, 50.0, 444.0, 90.0]), np.array([400.0, 50.0, 440.0, 90.0])]
            gt_lab += [2, 2]
            crowd += [False, True]
        if kind == 3:  # a detection at IoU exactly 0.5 with a 20x10 box (inter 100 / union 200)
            gt.append(np.array([100.0, 100.0, 120.0, 110.0])), gt_lab.append(0), crowd.append(False)
        det, det_lab, score = [], [], []
        if kind not in (0, 4):  # kind 0: empty image; kind 4: ground truth only
            for box, lab in zip(gt, gt_lab):
                for _ in range(int(rng.choice([0, 1, 1, 2, 3]))):  # misses and duplicates
                    det.append(jitter(rng, box, rng.choice([0.02, 0.1, 0.3])))
                    wrong = rng.random() < 0.15
                    det_lab.append(int(rng.integers(0, NUM_CLASSES - 1)) if wrong else lab)
                    score.append(rng.uniform(0.3, 1.0))
            for _ in range(int(rng.integers(0, 12))):  # background false positives
                det.append(random_box(rng, width, height))
                det_lab.append(int(rng.integers(0, NUM_CLASSES - 1)))
                score.append(rng.uniform(0.0, 0.7))
            if kind == 3:
                det.append(np.array([100.0, 100.0, 110.0, 110.0])), det_lab.append(0)
                score.append(rng.random())
            if kind == 2:
                det += [np.array([302.5, 300.0, 312.5, 310.0]),
                        np.array([300.0, 300.0, 310.0, 310.0])]
                det_lab += [1, 1]
                score += [0.95, 0.9]
            if kind == 6:
                det.append(np.array([400.0, 50.0, 440.0, 90.0])), det_lab.append(2)
                score.append(0.99)
            if kind == 5:  # more than max_dets detections of one class in one image
                for _ in range(max_dets + 30):
                    det.append(random_box(rng, width, height))
                    det_lab.append(0)
                    score.append(rng.uniform(0.0, 0.5))
        det = np.array(det).reshape(-1, 4)
        det[:, [0, 2]] = det[:, [0, 2]].clip(0, width)
        det[:, [1, 3]] = det[:, [1, 3]].clip(0, height)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2])
        scores = np.array(score)
        if tied_scores:
            scores = np.round(scores * 4) / 4
        scenes.append({"id": 3 * i + 7, "det": det, "scores": scores,
                       "det_labels": np.array(det_lab, dtype=np.int64),
                       "gt": np.array(gt).reshape(-1, 4), "gt_labels": np.array(gt_lab, np.int64),
                       "crowd": np.array(crowd, dtype=bool)})
    return scenes


def xywh(box):
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def coco_eval(scenes, max_dets):
    """COCOeval on the COCO-JSON dicts a user would write from these boxes (area = box area)."""
    images, annotations, results = [], [], []
    for s in scenes:
        images.append({"id": s["id"], "width": 640, "height": 512})
        for box, lab, crowd in zip(s["gt"], s["gt_labels"], s["crowd"]):
            b = xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": s["id"],
                                "category_id": int(lab) + 1, "bbox": b, "area": b[2] * b[3],
                                "iscrowd": int(crowd)})
        for box, lab, score in zip(s["det"], s["det_labels"], s["scores"]):
            results.append({"image_id": s["id"], "category_id": int(lab) + 1,
                            "bbox": xywh(box), "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k + 1, "name": f"c{k}"} for k in range(NUM_CLASSES)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"]  # (T, R, K, A, M) fractions, -1 where undefined


def coco_mean(precision, iou=None, area=0, m=-1, k=slice(None)):
    """pycocotools' `summarize` mean of defined entries (iou index 0 = 0.50, 5 = 0.75)."""
    p = precision if iou is None else precision[[iou]]
    p = p[:, :, k, area, m]
    return float(np.mean(p[p > -1])) * 100 if (p > -1).any() else math.nan


def run_metric(scenes, max_dets):
    metric = DetMetric(NUM_CLASSES, max_dets, [f"c{k}" for k in range(NUM_CLASSES)])
    for s in scenes:
        metric.update(s["id"], s["det"], s["scores"], s["det_labels"], s["gt"], s["gt_labels"],
                      s["crowd"])
    return metric


def assert_matches_coco(result, precision, m=-1):
    want = {"mAP": coco_mean(precision, m=m), "mAP50": coco_mean(precision, iou=0, m=m),
            "mAP75": coco_mean(precision, iou=5, m=m), "mAP_s": coco_mean(precision, area=1, m=m),
            "mAP_m": coco_mean(precision, area=2, m=m), "mAP_l": coco_mean(precision, area=3, m=m)}
    for key, value in want.items():  # acceptance asks 1e-3; the two agree to rounding
        assert result[key] == pytest.approx(value, abs=1e-9), key
    for k in range(NUM_CLASSES):
        got, ref = result["AP_per_class"][f"c{k}"], coco_mean(precision, k=k, m=m)
        assert (math.isnan(got) and math.isnan(ref)) or got == pytest.approx(ref, abs=1e-9), k


@pytest.mark.parametrize("seed,tied", [(0, False), (1, True), (2, False), (3, True)])
def test_matches_pycocotools(seed, tied):
    scenes = random_scene(seed, tied_scores=tied)
    result = run_metric(scenes, 100).compute()
    assert_matches_coco(result, coco_eval(scenes, 100))
    assert math.isnan(result["AP_per_class"]["c4"])  # class absent from ground truth
    assert 0 < result["mAP"] < result["mAP50"] <= 100


def test_max_dets_limits_match_pycocotools_list():
    """max_dets=20 vs COCOeval maxDets [1, 10, 20]; compute(max_dets=10) reads its second entry,
    the way mmdet's mAP (100) and AP50 (1000) come from one COCOeval run."""
    scenes = random_scene(4, max_dets=20, tied_scores=True)
    metric = run_metric(scenes, 20)
    precision = coco_eval(scenes, 20)
    assert_matches_coco(metric.compute(), precision, m=2)
    assert_matches_coco(metric.compute(max_dets=10), precision, m=1)
    assert_matches_coco(metric.compute(max_dets=1), precision, m=0)
    assert metric.compute()["mAP50"] != metric.compute(max_dets=1)["mAP50"]
    with pytest.raises(ValueError, match="max_dets"):
        metric.compute(max_dets=21)


def test_merge_equals_single_pass_and_tensors_equal_numpy():
    scenes = random_scene(5, num_images=20, tied_scores=True)
    whole = run_metric(scenes, 100).compute()
    first = run_metric(scenes[1::2], 100)
    second = DetMetric(NUM_CLASSES, 100, [f"c{k}" for k in range(NUM_CLASSES)])
    for s in scenes[0::2]:
        second.update(torch.tensor(s["id"]), torch.from_numpy(s["det"]),
                      torch.from_numpy(s["scores"]), torch.from_numpy(s["det_labels"]),
                      torch.from_numpy(s["gt"]), torch.from_numpy(s["gt_labels"]),
                      torch.from_numpy(s["crowd"]))
    first.merge(second)
    merged = first.compute()
    assert merged.keys() == whole.keys()
    for key, value in whole.items():
        if key == "AP_per_class":
            np.testing.assert_array_equal(list(merged[key].values()), list(value.values()))
        else:
            assert merged[key] == value, key
    with pytest.raises(ValueError, match="both metrics"):
        first.merge(second)
    # images matched under another detection limit (or class count) cannot be read at this one
    for other in (DetMetric(NUM_CLASSES, 1000), DetMetric(NUM_CLASSES + 1, 100)):
        other.update(10 ** 6, [[0, 0, 5, 5]], [0.5], [0], [[0, 0, 5, 5]], [0])
        with pytest.raises(ValueError, match="cannot merge"):
            first.merge(other)


def test_hand_computed_scene():
    """One image, two ground truths of class 0; detections: a perfect box (0.9), a duplicate of it
    (0.8, a false positive) and a box at IoU 0.5 with the second one (0.7, TP at IoU 0.50 only).
    At 0.50: precision after each detection 1, 1/2, 2/3 -> monotone 1, 2/3, 2/3 at recall
    1/2, 1/2, 1; 101-point AP = (51 * 1 + 50 * 2/3) / 101. At 0.55 .. 0.95: recall 1/2 at
    precision 1, so AP = 51 / 101."""
    metric = DetMetric(1)
    gt = np.array([[0.0, 0.0, 50.0, 50.0], [100.0, 100.0, 120.0, 110.0]])
    det = np.array([[0.0, 0.0, 50.0, 50.0], [0.0, 0.0, 50.0, 50.0], [100.0, 100.0, 110.0, 110.0]])
    metric.update(0, det, [0.9, 0.8, 0.7], [0, 0, 0], gt, [0, 0])
    result = metric.compute()
    ap50 = (51 * 1 + 50 * 2 / 3) / 101
    assert result["mAP50"] == pytest.approx(100 * ap50)
    assert result["mAP75"] == pytest.approx(100 * 51 / 101)
    assert result["mAP"] == pytest.approx(100 * (ap50 + 9 * 51 / 101) / 10)


def test_no_detections_gives_zero_and_no_ground_truth_gives_nan():
    metric = DetMetric(2, class_names=["People", "Car"])
    metric.update(1, np.zeros((0, 4)), np.zeros(0), np.zeros(0), [[0, 0, 10, 10]], [1])
    result = metric.compute()
    assert result["mAP"] == 0.0 and result["AP_per_class"]["Car"] == 0.0
    assert math.isnan(result["AP_per_class"]["People"]) and math.isnan(result["mAP_l"])
    table = format_det_table(result)
    assert "at most 100 detections per image and class" in table and "People" in table


def test_bad_input_is_refused():
    metric = DetMetric(2)
    with pytest.raises(ValueError, match="x2 < x1"):
        metric.update(0, [[10, 0, 5, 5]], [0.5], [0], np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="outside"):
        metric.update(0, [[0, 0, 5, 5]], [0.5], [2], np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="finite"):      # a NaN score has no rank
        metric.update(0, [[0, 0, 5, 5], [1, 1, 6, 6]], [0.5, np.nan], [1, 1], [[0, 0, 5, 5]], [1])
    metric.update(0, [[0, 0, 5, 5]], [0.5], [1], np.zeros((0, 4)), [])
    with pytest.raises(ValueError, match="already added"):
        metric.update(0, [[0, 0, 5, 5]], [0.5], [1], np.zeros((0, 4)), [])
