"""Semantic segmentation metrics as RGB-T papers report them (docs/data.md, "MFNet").

One confusion matrix is accumulated over the whole test set at native resolution (never a mean of
per-image scores). From it, per class c:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)        Acc_c = TP_c / (TP_c + FN_c)

mIoU and mAcc are the NaN-ignoring means over ALL classes, the unlabeled class 0 included; a class
whose score is undefined (0 / 0, e.g. absent from both ground truth and prediction) is NaN and left
out of the mean. This is mmseg's convention, which the paper's numbers use. Pixels whose ground
truth is `ignore_index` (255, crop padding only) are skipped.

`mIoU_nan0` is the other mean found in RGB-T papers (RTFNet's test script: `nan_to_num` before
the mean): undefined IoUs count as 0 and the sum is divided by the number of classes. The two agree
whenever every class occurs in the ground truth or the prediction; they differ on subsets where a
class is absent from both, as MFNet's day and night test sets are for some classes.
"""
from typing import Dict, List, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise TypeError(f"{what} must hold integer class ids, got dtype {x.dtype}")
    return x


def _percent(values: np.ndarray) -> List[float]:
    return [float(v) * 100.0 for v in values]


def _nanmean_percent(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) * 100.0 if defined.size else float("nan")


def _nan0_mean_percent(values: np.ndarray) -> float:
    """Mean over all entries with NaN counted as 0; NaN when every entry is (no pixels at all)."""
    if np.isnan(values).all():
        return float("nan")
    return float(np.nan_to_num(values, nan=0.0).mean()) * 100.0


class SegMetric:
    """Dataset-level confusion matrix and the scores derived from it.

    `confusion[g, p]` (int64, (num_classes, num_classes)) counts pixels with ground truth g
    predicted as p. Distributed evaluation sums `confusion` across processes (all-reduce, or
    `merge`) before `compute()`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add a batch: `pred`, `gt` integer class ids of one shape, e.g. (B, H, W) or (H, W)."""
        pred = _to_numpy(pred, "pred")
        gt = _to_numpy(gt, "gt")
        if pred.shape != gt.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != gt shape {tuple(gt.shape)}")
        n = self.num_classes
        valid = gt != self.ignore_index
        g = gt[valid].astype(np.int64)  # (P,) labelled pixels only
        p = pred[valid].astype(np.int64)
        bad_gt = (g < 0) | (g >= n)
        if bad_gt.any():
            raise ValueError(f"gt values {np.unique(g[bad_gt]).tolist()} are outside [0, {n}) "
                             f"and are not ignore_index {self.ignore_index}")
        bad_pred = (p < 0) | (p >= n)
        if bad_pred.any():
            raise ValueError(f"pred values {np.unique(p[bad_pred]).tolist()} are outside [0, {n})")
        self.confusion += np.bincount(g * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: "SegMetric") -> None:
        """Add another metric's counts (e.g. gathered from another process)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class metric into "
                             f"{self.num_classes}-class metric")
        self.confusion += other.confusion

    def compute(self) -> Dict[str, object]:
        """Percent: mIoU, mIoU_nan0, mAcc, aAcc (floats); per-class IoU, Acc (lists, NaN where
        undefined). mIoU skips undefined classes (mmseg), mIoU_nan0 counts them as 0 (RTFNet)."""
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        gt_total = cm.sum(axis=1)    # TP + FN
        pred_total = cm.sum(axis=0)  # TP + FP
        union = gt_total + pred_total - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt_total > 0, tp / gt_total, np.nan)
        total = cm.sum()
        return {
            "mIoU": _nanmean_percent(iou),
            "mIoU_nan0": _nan0_mean_percent(iou),
            "mAcc": _nanmean_percent(acc),
            "aAcc": float(tp.sum() / total) * 100.0 if total > 0 else float("nan"),
            "IoU": _percent(iou),
            "Acc": _percent(acc),
        }
