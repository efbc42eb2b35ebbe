"""COCO box AP exactly as pycocotools' `COCOeval(iouType="bbox")` computes it (docs/data.md,
"Detection metric"); the numbers of the paper's Table 3 (mAP, AP50, AP75, APs, APm, APl).

For every class k, image and IoU threshold t in 0.50:0.05:0.95:

1. Detections of class k in the image are sorted by score (stable: ties keep input order) and only
   the first `max_dets` are kept. The limit applies per image AND per class, as in pycocotools.
2. Greedy matching in that order: each detection takes, among the ground truths with IoU >= t that
   are still free, the one with the highest IoU (ties: the later ground truth). Regular ground
   truths are preferred; only when none qualifies may an ignored one be taken. An ignored
   (`iscrowd`) ground truth uses IoU = intersection / detection area and may absorb any number of
   detections.
3. A detection matched to an ignored ground truth counts neither as TP nor as FP. For the area
   ranges, a ground truth outside the range is ignored, and so is an unmatched detection outside it.

Then per class, over all images (sorted by image id; equal scores in different images stay in
that order): detections sorted by score, cumulative TP / FP give recall = TP / #regular-GT and
precision = TP / (TP + FP); precision is made monotone (running max from the right) and read at 101
recall points 0:0.01:1 (0 past the last recall reached); AP = mean over points and thresholds.
Classes with no regular ground truth have no AP and are left out of the mean.

Boxes arrive as xyxy absolute pixels and are converted to COCO's continuous xywh (no +1): IoU and
areas are computed with pycocotools' own arithmetic (`maskApi.c: bbIou`). Areas are box areas
w * h for ground truth and detections alike (the `area` a COCO-JSON written from boxes holds).
Area ranges are pycocotools' closed intervals: small [0, 32^2], medium [32^2, 96^2],
large [96^2, 1e5^2], so a box of exactly 32^2 counts as small and medium.

The limit on detections: pycocotools' default is 100 per image and class. mmdet's `CocoMetric`
(which the paper's DINO / CO-DETR numbers come from) runs COCOeval with maxDets (100, 300, 1000):
its mAP column uses 100 detections, while AP50, AP75 and APs/m/l use 1000.
`DetMetric(max_dets=1000)` gives those columns; `compute(max_dets=100)` on the same metric gives the
100-detection mAP.

All scores are percent (Table 3's unit; pycocotools prints fractions).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence]
ImageId = Union[int, str]

# The exact calls of pycocotools' `Params.setDetParams`, so thresholds compare bit for bit.
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)  # (T,)
RECALL_POINTS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)  # (R,)
AREA_RANGES = {"all": (0.0, 1e5 ** 2), "small": (0.0, 32.0 ** 2),
               "medium": (32.0 ** 2, 96.0 ** 2), "large": (96.0 ** 2, 1e5 ** 2)}
_AREA_BOUNDS = np.array(list(AREA_RANGES.values()))  # (A, 2)
_IOU50, _IOU75 = 0, 5  # positions of 0.50 and 0.75 in IOU_THRESHOLDS


class _ImageRecord(NamedTuple):
    """Matching of one image: D kept detections (all classes), A = 4 area ranges, T = 10 IoUs."""
    labels: np.ndarray      # (D,) int64 class of each detection
    scores: np.ndarray      # (D,) float64
    rank: np.ndarray        # (D,) int64 position in its class's score order within the image
    matched: np.ndarray     # (A, T, D) bool: matched to some ground truth
    ignored: np.ndarray     # (A, T, D) bool: neither TP nor FP
    num_regular: np.ndarray  # (K, A) int64 regular (not ignored) ground truths per class


def _as_array(x: ArrayLike, dtype, what: str, image_id: ImageId) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == object:
        raise TypeError(f"image {image_id!r}: {what} must be numeric, got dtype object")
    return x.astype(dtype, copy=False)


def _boxes_xywh(boxes: np.ndarray, what: str, image_id: ImageId) -> np.ndarray:
    """xyxy (N, 4) -> COCO xywh (N, 4), refusing malformed input."""
    boxes = boxes.reshape(-1, 4) if boxes.size == 0 else boxes
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"image {image_id!r}: {what} must have shape (N, 4) xyxy, "
                         f"got {tuple(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"image {image_id!r}: {what} holds non-finite coordinates")
    wh = boxes[:, 2:] - boxes[:, :2]
    if (wh < 0).any():
        bad = int(np.flatnonzero((wh < 0).any(1))[0])
        raise ValueError(f"image {image_id!r}: {what}[{bad}] = {boxes[bad].tolist()} has x2 < x1 "
                         f"or y2 < y1 (boxes must be xyxy)")
    return np.concatenate([boxes[:, :2], wh], axis=1)


def box_iou_coco(det: np.ndarray, gt: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU of xywh boxes as pycocotools' `bbIou`: det (D, 4), gt (G, 4), crowd (G,) -> (D, G).

    For a crowd ground truth the denominator is the detection's area instead of the union.
    """
    dx, dy, dw, dh = (det[:, None, i] for i in range(4))  # (D, 1) each
    gx, gy, gw, gh = (gt[None, :, i] for i in range(4))   # (1, G) each
    w = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    h = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    det_area, gt_area = dw * dh, gw * gh
    union = np.where(crowd[None, :], det_area, det_area + gt_area - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / union, 0.0)


def _outside(area: np.ndarray) -> np.ndarray:
    """(N,) areas -> (A, N) bool: outside each closed area range."""
    return (area[None, :] < _AREA_BOUNDS[:, :1]) | (area[None, :] > _AREA_BOUNDS[:, 1:])


def match_greedy(iou: np.ndarray, gt_ignored: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """pycocotools' `evaluateImg` matching for one image and class, all areas and IoUs at once.

    iou (D, G) with detections in score order; gt_ignored (A, G) ignored per area range;
    crowd (G,). Returns gt_of (A, T, D) int64: the matched ground truth's index, -1 if none.
    """
    num_det, num_gt = iou.shape
    shape = (len(_AREA_BOUNDS), len(IOU_THRESHOLDS))
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]  # (T, 1) as pycocotools clamps
    taken = np.zeros(shape + (num_gt,), dtype=bool)               # (A, T, G)
    gt_of = np.full(shape + (num_det,), -1, dtype=np.int64)       # (A, T, D)
    if num_gt == 0 or num_det == 0:
        return gt_of
    area_idx, thr_idx = np.indices(shape)
    # Only detections overlapping some ground truth by >= 0.5 can match; the rest stay unmatched.
    for d in np.flatnonzero(iou.max(axis=1) >= thresholds[0, 0]):
        cand_gt = np.flatnonzero(iou[d] >= thresholds[0, 0])  # (C,) ascending gt index
        cand_iou = iou[d, cand_gt]                              # (C,)
        free = ~(taken[..., cand_gt] & ~crowd[cand_gt])         # crowds stay free
        ok = free & (cand_iou >= thresholds)                    # (A, T, C)
        regular = ok & ~gt_ignored[:, None, cand_gt]
        # An ignored ground truth is eligible only when no regular one is.
        ok = np.where(regular.any(axis=-1, keepdims=True), regular, ok)
        key = np.where(ok, cand_iou, -1.0)
        best = ok & (key == key.max(axis=-1, keepdims=True))
        # (A, T); among equal IoUs pycocotools keeps the later ground truth
        last_best = best.shape[-1] - 1 - np.argmax(best[..., ::-1], axis=-1)
        hit = ok.any(axis=-1)  # (A, T)
        g = cand_gt[last_best]
        taken[area_idx[hit], thr_idx[hit], g[hit]] = True
        gt_of[..., d] = np.where(hit, g, -1)
    return gt_of


class DetMetric:
    """COCO box AP (percent) over a dataset, one `update` per image.

    Args:
        num_classes: K; labels are 0-based in [0, K).
        max_dets: at most this many detections per image and class (pycocotools' maxDets; 100 is
            COCO's default, 1000 what mmdet uses for AP50/AP75/APs/m/l).
        class_names: K names for `AP_per_class` (default "0".."K-1").

    State is one record per image (after matching), so distributed evaluation gathers metrics
    (e.g. `torch.distributed.all_gather_object`) and `merge`s them before `compute()`.
    """

    def __init__(self, num_classes: int, max_dets: int = 100,
                 class_names: Optional[Sequence[str]] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if max_dets < 1:
            raise ValueError(f"max_dets must be >= 1, got {max_dets}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
        self.num_classes = num_classes
        self.max_dets = int(max_dets)
        self.class_names = [str(c) for c in (class_names or range(num_classes))]
        self.records: Dict[ImageId, _ImageRecord] = {}

    def __len__(self) -> int:
        return len(self.records)

    def reset(self) -> None:
        self.records.clear()

    def _check_image_id(self, image_id) -> ImageId:
        if isinstance(image_id, (np.integer, torch.Tensor)):
            image_id = int(image_id)
        if not isinstance(image_id, (int, str)):
            raise TypeError(f"image_id must be an int or a str, got {type(image_id).__name__}")
        if image_id in self.records:
            raise ValueError(f"image {image_id!r} was already added to this DetMetric")
        if self.records and type(next(iter(self.records))) is not type(image_id):
            raise TypeError(f"image {image_id!r}: all image ids must share one type (int or str)")
        return image_id

    def _check_labels(self, labels: np.ndarray, n: int, what: str, image_id: ImageId) -> None:
        if labels.shape != (n,):
            raise ValueError(f"image {image_id!r}: {what} has shape {tuple(labels.shape)}, "
                             f"expected ({n},)")
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(f"image {image_id!r}: {what} {np.unique(labels[bad]).tolist()} "
                             f"outside [0, {self.num_classes})")

    def update(self, image_id: ImageId, pred_boxes: ArrayLike, pred_scores: ArrayLike,
               pred_labels: ArrayLike, gt_boxes: ArrayLike, gt_labels: ArrayLike,
               gt_ignore: Optional[ArrayLike] = None) -> None:
        """Add one image.

        pred_boxes (N, 4) xyxy pixels, pred_scores (N,), pred_labels (N,) 0-based;
        gt_boxes (M, 4) xyxy pixels, gt_labels (M,); gt_ignore (M,) bool marks `iscrowd` /
        difficult boxes (COCO crowd semantics, see the module docstring). Numpy or torch.
        """
        image_id = self._check_image_id(image_id)
        det = _boxes_xywh(_as_array(pred_boxes, np.float64, "pred_boxes", image_id),
                          "pred_boxes", image_id)
        gt = _boxes_xywh(_as_array(gt_boxes, np.float64, "gt_boxes", image_id),
                         "gt_boxes", image_id)
        scores = _as_array(pred_scores, np.float64, "pred_scores", image_id).reshape(-1)
        if scores.shape != (len(det),) or not np.isfinite(scores).all():
            raise ValueError(f"image {image_id!r}: pred_scores must be {len(det)} finite numbers")
        det_labels = _as_array(pred_labels, np.int64, "pred_labels", image_id).reshape(-1)
        gt_labels = _as_array(gt_labels, np.int64, "gt_labels", image_id).reshape(-1)
        self._check_labels(det_labels, len(det), "pred_labels", image_id)
        self._check_labels(gt_labels, len(gt), "gt_labels", image_id)
        crowd = (np.zeros(len(gt), dtype=bool) if gt_ignore is None
                 else _as_array(gt_ignore, bool, "gt_ignore", image_id).reshape(-1))
        if crowd.shape != (len(gt),):
            raise ValueError(f"image {image_id!r}: gt_ignore has {crowd.size} entries for "
                             f"{len(gt)} boxes")

        gt_ignored_all = crowd[None, :] | _outside(gt[:, 2] * gt[:, 3])  # (A, M)
        num_regular = np.zeros((self.num_classes, len(_AREA_BOUNDS)), dtype=np.int64)
        parts = []
        for k in np.union1d(det_labels, gt_labels):
            g_sel = np.flatnonzero(gt_labels == k)
            d_sel = np.flatnonzero(det_labels == k)
            d_sel = d_sel[np.argsort(-scores[d_sel], kind="mergesort")][:self.max_dets]
            gt_ignored = gt_ignored_all[:, g_sel]
            num_regular[k] = (~gt_ignored).sum(axis=1)
            iou = box_iou_coco(det[d_sel], gt[g_sel], crowd[g_sel])
            gt_of = match_greedy(iou, gt_ignored, crowd[g_sel])
            matched = gt_of >= 0
            # Matched to an ignored ground truth, or unmatched and outside the area range.
            # A last False column answers gt_of == -1 (unmatched).
            padded = np.concatenate([gt_ignored, np.zeros((len(gt_ignored), 1), bool)], axis=1)
            ignored = np.where(matched, padded[np.arange(len(padded))[:, None, None], gt_of],
                               _outside(det[d_sel, 2] * det[d_sel, 3])[:, None, :])
            parts.append((np.full(len(d_sel), k), scores[d_sel], np.arange(len(d_sel)),
                          matched, ignored))
        if parts:
            labels, kept_scores, rank, matched, ignored = (
                np.concatenate(p, axis=-1) for p in zip(*parts))
        else:
            labels, kept_scores, rank = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
            matched = ignored = np.zeros((len(_AREA_BOUNDS), len(IOU_THRESHOLDS), 0), dtype=bool)
        self.records[image_id] = _ImageRecord(labels.astype(np.int64), kept_scores, rank,
                                              matched, ignored, num_regular)

    def merge(self, other: "DetMetric") -> None:
        """Add another metric's images (e.g. gathered from another process)."""
        if (other.num_classes, other.max_dets) != (self.num_classes, self.max_dets):
            raise ValueError(f"cannot merge DetMetric(num_classes={other.num_classes}, "
                             f"max_dets={other.max_dets}) into DetMetric(num_classes="
                             f"{self.num_classes}, max_dets={self.max_dets})")
        shared = self.records.keys() & other.records.keys()
        if shared:
            raise ValueError(f"images {sorted(shared)[:5]} are in both metrics")
        for image_id, record in other.records.items():
            self._check_image_id(image_id)
            self.records[image_id] = record

    def precision(self, max_dets: Optional[int] = None) -> np.ndarray:
        """pycocotools' `eval['precision'][..., m]` as fractions: (T, R, K, A), -1 without GT."""
        limit = self.max_dets if max_dets is None else int(max_dets)
        if not 1 <= limit <= self.max_dets:
            raise ValueError(f"max_dets must be in [1, {self.max_dets}] (the limit this metric "
                             f"matched with), got {max_dets}")
        num_areas, num_thr = len(_AREA_BOUNDS), len(IOU_THRESHOLDS)
        out = -np.ones((num_thr, len(RECALL_POINTS), self.num_classes, num_areas))
        if not self.records:
            return out
        records = [self.records[i] for i in sorted(self.records)]
        labels = np.concatenate([r.labels for r in records])      # (N,)
        scores = np.concatenate([r.scores for r in records])
        keep = np.concatenate([r.rank for r in records]) < limit
        matched = np.concatenate([r.matched for r in records], axis=-1)  # (A, T, N)
        ignored = np.concatenate([r.ignored for r in records], axis=-1)
        num_regular = sum(r.num_regular for r in records)          # (K, A)
        for k in range(self.num_classes):
            sel = np.flatnonzero(keep & (labels == k))
            sel = sel[np.argsort(-scores[sel], kind="mergesort")]
            tp = np.cumsum(matched[..., sel] & ~ignored[..., sel], axis=-1, dtype=np.float64)
            fp = np.cumsum(~matched[..., sel] & ~ignored[..., sel], axis=-1, dtype=np.float64)
            for a in range(num_areas):
                if num_regular[k, a] == 0:
                    continue  # no ground truth: AP undefined (-1), left out of the means
                recall = tp[a] / num_regular[k, a]                       # (T, n)
                prec = tp[a] / (fp[a] + tp[a] + np.spacing(1))
                prec = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]  # monotone
                for t in range(num_thr):
                    idx = np.searchsorted(recall[t], RECALL_POINTS, side="left")
                    reached = idx < len(sel)
                    out[t, reached, k, a] = prec[t, idx[reached]]
                    out[t, ~reached, k, a] = 0.0
        return out

    def compute(self, max_dets: Optional[int] = None) -> Dict[str, object]:
        """Percent: mAP (IoU 0.50:0.95), mAP50, mAP75, mAP_s, mAP_m, mAP_l (area ranges, IoU
        0.50:0.95), AP_per_class {name: AP, NaN without ground truth}; plus `max_dets`,
        `num_images` and `convention` (a sentence saying how they were computed).

        `max_dets` (<= the constructor's) reads the same matching at a smaller limit, as
        pycocotools does for each entry of its maxDets list.
        """
        limit = self.max_dets if max_dets is None else int(max_dets)
        prec = self.precision(limit)  # (T, R, K, A)

        def mean_ap(p: np.ndarray) -> float:
            defined = p[p > -1]
            return float(defined.mean()) * 100.0 if defined.size else float("nan")

        areas = list(AREA_RANGES)
        return {
            "mAP": mean_ap(prec[..., 0]),
            "mAP50": mean_ap(prec[_IOU50, ..., 0]),
            "mAP75": mean_ap(prec[_IOU75, ..., 0]),
            "mAP_s": mean_ap(prec[..., areas.index("small")]),
            "mAP_m": mean_ap(prec[..., areas.index("medium")]),
            "mAP_l": mean_ap(prec[..., areas.index("large")]),
            "AP_per_class": {name: mean_ap(prec[:, :, k, 0])
                             for k, name in enumerate(self.class_names)},
            "max_dets": limit,
            "num_images": len(self.records),
            "convention": (f"COCO box AP as pycocotools COCOeval: IoU 0.50:0.05:0.95, 101 recall "
                           f"points, at most {limit} detections per image and class"),
        }


def format_det_table(result: Dict[str, object]) -> str:
    """Table 3's columns (mAP, AP50, AP75, APs, APm, APl) and per-class AP, percent, with the
    convention (detections per image) in the header."""
    cols = [("mAP", "mAP"), ("AP50", "mAP50"), ("AP75", "mAP75"),
            ("APs", "mAP_s"), ("APm", "mAP_m"), ("APl", "mAP_l")]
    lines: List[str] = [f"{result['convention']} ({result['num_images']} images), percent",
                        "  ".join(f"{name:>6}" for name, _ in cols),
                        "  ".join(f"{result[key]:6.1f}" for _, key in cols),
                        "per-class AP (IoU 0.50:0.95, all areas):"]
    per_class = result["AP_per_class"]
    width = max([len(n) for n in per_class] + [5])
    lines += [f"  {name:<{width}}  " + ("n/a (no ground truth)" if np.isnan(ap) else f"{ap:6.1f}")
              for name, ap in per_class.items()]
    return "\n".join(lines)
