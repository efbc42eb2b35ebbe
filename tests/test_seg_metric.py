"""SegMetric against an independent float64 reference and hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from ivt.metrics import SegMetric


def reference_scores(preds, gts, num_classes, ignore_index=255):
    """Per-class loops over TP/FP/FN, pooled over all images (docs/data.md: one confusion
    matrix)."""
    iou, acc = [], []
    tp_all = n_all = 0.0
    for c in range(num_classes):
        tp = fp = fn = 0.0
        for p, g in zip(preds, gts):
            keep = g != ignore_index
            p, g = p[keep], g[keep]
            tp += float(np.sum((p == c) & (g == c)))
            fp += float(np.sum((p == c) & (g != c)))
            fn += float(np.sum((p != c) & (g == c)))
        iou.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
        acc.append(tp / (tp + fn) if tp + fn > 0 else math.nan)
        tp_all += tp
    for g in gts:
        n_all += float(np.sum(g != ignore_index))
    defined_iou = [v for v in iou if not math.isnan(v)]
    defined_acc = [v for v in acc if not math.isnan(v)]
    return {"mIoU": 100 * sum(defined_iou) / len(defined_iou),
            "mIoU_nan0": 100 * sum(defined_iou) / num_classes,
            "mAcc": 100 * sum(defined_acc) / len(defined_acc),
            "aAcc": 100 * tp_all / n_all,
            "IoU": [100 * v for v in iou], "Acc": [100 * v for v in acc]}


def assert_scores_close(got, want):
    for key in ("mIoU", "mIoU_nan0", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(got[key], want[key], atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("num_classes,shape", [(2, (7, 5)), (9, (3, 13, 17)), (5, (2, 1, 31)),
                                               (12, (1, 1, 3))])   # classes absent: means differ
def test_matches_reference_on_random_batches(num_classes, shape):
    rng = np.random.default_rng(num_classes)
    metric = SegMetric(num_classes)
    preds, gts = [], []
    for _ in range(4):
        # Skewed class frequencies so some classes are rare; ~10% ignored pixels.
        gt = rng.choice(num_classes, size=shape,
                        p=np.linspace(2, 1, num_classes) / np.linspace(2, 1, num_classes).sum())
        gt = np.where(rng.random(shape) < 0.1, 255, gt).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.6, gt % num_classes,
                        rng.integers(0, num_classes, shape))
        metric.update(torch.from_numpy(pred.astype(np.int64)), gt)
        preds.append(pred.reshape(-1))
        gts.append(gt.reshape(-1))
    assert_scores_close(metric.compute(), reference_scores(preds, gts, num_classes))


def test_hand_computed_case():
    gt = np.array([[0, 0, 1],
                   [1, 2, 255]])
    pred = np.array([[0, 1, 1],
                     [1, 1, 0]])
    m = SegMetric(3)
    m.update(pred, gt)
    # class 0: TP 1, FP 0, FN 1 -> IoU 1/2, Acc 1/2
    # class 1: TP 2, FP 2 (a 0 and a 2 called 1), FN 0 -> IoU 2/4, Acc 1
    # class 2: TP 0, FN 1 -> IoU 0, Acc 0; the ignored pixel (pred 0) is not counted.
    out = m.compute()
    assert out["IoU"] == pytest.approx([50.0, 50.0, 0.0])
    assert out["Acc"] == pytest.approx([50.0, 100.0, 0.0])
    assert out["mIoU"] == pytest.approx(100 / 3)
    assert out["mAcc"] == pytest.approx(50.0)
    assert out["aAcc"] == pytest.approx(60.0)
    np.testing.assert_array_equal(m.confusion, [[1, 1, 0], [0, 2, 0], [0, 1, 0]])


def test_absent_class_is_nan_and_left_out_of_the_mean():
    m = SegMetric(4)
    m.update(np.array([0, 0, 1, 3]), np.array([0, 0, 1, 1]))
    out = m.compute()
    assert math.isnan(out["IoU"][2]) and math.isnan(out["Acc"][2])   # in neither gt nor pred
    assert out["IoU"][3] == 0.0 and math.isnan(out["Acc"][3])        # predicted, never in gt
    assert out["mIoU"] == pytest.approx((100 + 50 + 0) / 3)
    assert out["mAcc"] == pytest.approx((100 + 50) / 2)


def test_miou_nan0_counts_absent_classes_as_zero():
    """Day and night subsets of 4 classes, hand computed. mmseg's mIoU leaves a class absent from
    both ground truth and prediction out of the mean; RTFNet's mIoU_nan0 counts it as 0. On the
    whole set every class occurs and the two agree."""
    night_pred, night_gt = np.array([0, 0, 0, 1, 0]), np.array([0, 0, 1, 1, 3])
    day_pred, day_gt = np.array([2, 2, 0, 1]), np.array([2, 0, 0, 1])
    night, day, both = SegMetric(4), SegMetric(4), SegMetric(4)
    night.update(night_pred, night_gt)
    day.update(day_pred, day_gt)
    both.update(np.concatenate([night_pred, day_pred]), np.concatenate([night_gt, day_gt]))
    # night: class 0 TP 2 FP 2 FN 0 -> 1/2; class 1 TP 1 FN 1 -> 1/2; class 2 absent -> NaN;
    # class 3 FN 1 -> 0
    out = night.compute()
    assert math.isnan(out["IoU"][2])
    assert out["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 0) / 3)
    assert out["mIoU_nan0"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 0 + 0) / 4)
    # day: class 0 TP 1 FN 1 -> 1/2; class 1 -> 1; class 2 TP 1 FP 1 -> 1/2; class 3 absent
    out = day.compute()
    assert math.isnan(out["IoU"][3])
    assert out["mIoU"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2) / 3)
    assert out["mIoU_nan0"] == pytest.approx(100 * (1 / 2 + 1 + 1 / 2 + 0) / 4)
    # all: class 0 TP 3 FP 2 FN 1 -> 1/2; class 1 TP 2 FN 1 -> 2/3; class 2 -> 1/2; class 3 -> 0
    out = both.compute()
    assert out["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2 + 0) / 4)
    assert out["mIoU_nan0"] == pytest.approx(out["mIoU"])
    assert math.isnan(SegMetric(3).compute()["mIoU_nan0"])      # no pixels at all


def test_unlabeled_class_zero_counts():
    m = SegMetric(2)
    m.update(np.zeros((4, 4), np.int64), np.zeros((4, 4), np.uint8))
    assert m.compute()["IoU"] == [100.0, pytest.approx(math.nan, nan_ok=True)]
    assert m.compute()["mIoU"] == 100.0


def test_accumulates_over_updates_merge_and_reset():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 9, (4, 8, 8))
    pred = rng.integers(0, 9, (4, 8, 8))
    whole = SegMetric(9)
    whole.update(pred, gt)
    a, b = SegMetric(9), SegMetric(9)
    a.update(pred[:1], gt[:1])
    a.update(pred[1:2], gt[1:2])
    b.update(torch.from_numpy(pred[2:]), torch.from_numpy(gt[2:]))
    a.merge(b)
    np.testing.assert_array_equal(a.confusion, whole.confusion)
    assert a.confusion.dtype == np.int64 and a.confusion.sum() == gt.size
    a.reset()
    assert a.confusion.sum() == 0


def test_validation_errors():
    m = SegMetric(9)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        m.update(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match="12"):
        m.update(np.zeros((2, 2), np.int64), np.array([[0, 12], [255, 1]]))
    with pytest.raises(ValueError, match="-1"):
        m.update(np.zeros(2, np.int64), np.array([-1, 0]))
    with pytest.raises(ValueError, match="pred"):
        m.update(np.array([0, 9]), np.array([0, 1]))
    with pytest.raises(TypeError):
        m.update(np.zeros(2), np.zeros(2, np.int64))
    with pytest.raises(ValueError):
        m.merge(SegMetric(3))
    m.update(np.array([9, 0]), np.array([255, 0]))   # predictions on ignored pixels are not checked
    assert m.confusion.sum() == 1


def test_class_id_equal_to_num_classes_is_named_as_out_of_range():
    """Class ids are 0..num_classes-1: a ground truth holding exactly `num_classes` (the
    off-by-one a 1-based label map or a wrong --dataset gives) is refused with the documented
    message naming the value, before it can reach the confusion matrix."""
    m = SegMetric(9)
    with pytest.raises(ValueError, match=r"gt values \[9\] are outside \[0, 9\)"):
        m.update(np.zeros((2, 2), np.int64), np.array([[0, 9], [8, 1]]))
    with pytest.raises(ValueError, match=r"pred values \[9\] are outside \[0, 9\)"):
        m.update(np.array([[0, 9], [8, 1]]), np.zeros((2, 2), np.int64))
    assert m.confusion.sum() == 0                      # nothing was counted


def test_scores_without_any_labelled_pixel_are_undefined():
    """A metric that saw no labelled pixel (no update, or only ignore_index) has no score: every
    mean and every per-class value is NaN (0 / 0), never 0, which would read as a real result."""
    empty, ignored = SegMetric(3), SegMetric(3)
    ignored.update(np.array([1, 2]), np.array([255, 255]))
    for m in (empty, ignored):
        out = m.compute()
        for key in ("mIoU", "mIoU_nan0", "mAcc", "aAcc"):
            assert math.isnan(out[key]), key
        assert all(math.isnan(v) for v in out["IoU"] + out["Acc"])
