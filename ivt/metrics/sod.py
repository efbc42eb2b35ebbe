"""Salient object detection metrics as RGB-T SOD papers report them (docs/data.md, "SOD metrics").

Every image is scored on its own, at its ground truth's size, and the dataset score is the mean
over images. The inputs are prepared as the MATLAB toolboxes and PySODMetrics prepare them:

    G = gt > 128 (uint8) or gt (bool)
    P = pred / 255 (uint8) or pred (float in [0, 1])
    P = (P - min P) / (max P - min P)     if max P > min P

Scores (eps = MATLAB's eps = 2.2e-16):

* MAE   = mean |P - G|.
* S     (Fan et al., ICCV 2017, alpha = 0.5): 1 - mean P if G is empty, mean P if G is full, else
          max(0, 0.5 So + 0.5 Sr); So the object term, Sr the region term (`s_measure`).
* adpF  (beta^2 = 0.3): F-measure of P >= min(2 mean P, 1).
* meanF, maxF: P quantised as uint8(255 P) (truncation) and thresholded at t = 0..255 (>= t); the
          per-image F curves are averaged over the images, then the curve's mean / max.
* adpE, meanE, maxE (Fan et al., IJCAI 2018): the same thresholds, E-measure instead of F.
* wF    (Margolin et al., CVPR 2014, beta^2 = 1): weighted F-measure, 0 when G is empty.

They equal PySODMetrics' `Smeasure`, `WeightedFmeasure`, `Emeasure`, `Fmeasure` and `MAE` (within
float rounding) with one exception: when the foreground centroid falls on the last row or column,
one of the S-measure's four quadrants is empty; its weight is 0 and we give it no score, where
PySODMetrics (and the MATLAB code) compute 0 / 0 and return NaN for the image.

State, for distributed evaluation: the per-image lists `scores[key]` and the summed curves
`curve_sums['F' | 'E']` (float64, (256,), index t = threshold t); `merge` adds another metric's.
"""
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from scipy.ndimage import correlate1d, distance_transform_edt

ArrayLike = Union[np.ndarray, torch.Tensor]

EPS = np.spacing(1)          # MATLAB's eps, as the toolboxes use it
BETA2_F = 0.3                # beta^2 of the (adaptive, mean, max) F-measure
BETA2_WF = 1.0               # beta^2 of the weighted F-measure
NUM_THRESHOLDS = 256         # uint8 thresholds t = 0..255
PER_IMAGE_KEYS = ("S", "wF", "adpE", "adpF", "MAE")
RESULT_KEYS = ("S", "wF", "adpE", "meanE", "maxE", "adpF", "meanF", "maxF", "MAE")


# -- input preparation --------------------------------------------------------------------------
def _to_numpy(x: ArrayLike, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.double()
        x = x.numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be one (H, W) map, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)})")
    return x


def prepare(pred: ArrayLike, gt: ArrayLike) -> Tuple[np.ndarray, np.ndarray]:
    """-> P float64 in [0, 1] (min-max normalised), G bool; both (H, W).

    pred: float in [0, 1] or uint8 0..255 (or bool); gt: uint8 0..255 (binarised at > 128) or bool.
    """
    pred = _to_numpy(pred, "pred")
    gt = _to_numpy(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} != gt shape {gt.shape}: resize the prediction "
                         f"to the ground truth's size before scoring")
    if gt.dtype == np.bool_:
        G = gt
    elif gt.dtype == np.uint8:
        if gt.max() == 1:
            raise ValueError("gt is a uint8 map with values 0/1: pass it as bool, or as 0/255 "
                             "(uint8 ground truths are binarised at > 128)")
        G = gt > 128
    else:
        raise TypeError(f"gt must be bool or uint8 (0/255), got dtype {gt.dtype}")
    if pred.dtype == np.uint8:
        P = pred / 255.0
    elif pred.dtype == np.bool_ or np.issubdtype(pred.dtype, np.floating):
        P = pred.astype(np.float64)
    else:
        raise TypeError(f"pred must be float in [0, 1] or uint8 0..255, got dtype {pred.dtype}")
    lo, hi = P.min(), P.max()
    if not (0.0 <= lo and hi <= 1.0):       # also catches NaN
        raise ValueError(f"float pred must lie in [0, 1], got range [{lo}, {hi}]")
    if hi != lo:
        P = (P - lo) / (hi - lo)
    return P, G


# -- S-measure ----------------------------------------------------------------------------------
def _object_score(x: np.ndarray) -> float:
    """O(x) = 2 mean(x) / (mean(x)^2 + 1 + std(x, ddof=1) + eps); std = 0 for one pixel."""
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0
    return 2.0 * mean / (mean * mean + 1.0 + std + EPS)


def _ssim(p: np.ndarray, g: np.ndarray) -> float:
    """The region term's SSIM-like score of one quadrant, variances with N - 1."""
    n = p.size
    x, y = p.mean(), g.mean()
    dx, dy = p - x, g - y
    sigma_x = (dx * dx).sum() / (n - 1 + EPS)
    sigma_y = (dy * dy).sum() / (n - 1 + EPS)
    sigma_xy = (dx * dy).sum() / (n - 1 + EPS)
    alpha = 4.0 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x + sigma_y)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _region_score(P: np.ndarray, G: np.ndarray) -> float:
    """Split at the rounded foreground centroid (+1: MATLAB's 1-based `1:X` includes X) into four
    quadrants, weighted by area. np.round (halves to even) as in PySODMetrics; MATLAB's round
    takes halves away from zero, so the toolboxes can split one pixel further on."""
    h, w = G.shape
    n_fg = np.count_nonzero(G)
    rows = np.count_nonzero(G, axis=1)
    cols = np.count_nonzero(G, axis=0)
    cy = int(np.round(np.dot(np.arange(h), rows) / n_fg)) + 1
    cx = int(np.round(np.dot(np.arange(w), cols) / n_fg)) + 1
    area = h * w
    score = 0.0
    for ys, xs in ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                   (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))):
        p = P[ys, xs]
        if p.size:                      # an empty quadrant has weight 0
            score += _ssim(p, G[ys, xs].astype(np.float64)) * (p.size / area)
    return score


def s_measure(P: np.ndarray, G: np.ndarray) -> float:
    """Structure measure, alpha = 0.5: max(0, 0.5 So + 0.5 Sr)."""
    mu = G.mean()
    if mu == 0:
        return float(1.0 - P.mean())
    if mu == 1:
        return float(P.mean())
    so = mu * _object_score(P[G]) + (1.0 - mu) * _object_score(1.0 - P[~G])
    return float(max(0.0, 0.5 * so + 0.5 * _region_score(P, G)))


# -- E- and F-measure ---------------------------------------------------------------------------
def _enhanced_alignment(tp, fp, n_fg: int, n: int):
    """E-measure from counts (scalars or arrays over thresholds): tp = |B & G|, fp = |B & ~G|.

    Binary B and G take two values each, so the alignment matrix xi = 2ab / (a^2 + b^2 + eps)
    (a = B - mean B, b = G - mean G) takes four, one per (B, G) pair; E = sum((xi + 1)^2 / 4) /
    (HW - 1 + eps). Empty G: |~B|; full G: |B| (in place of the sum).
    """
    pred_fg = tp + fp
    pred_bg = n - pred_fg
    if n_fg == 0:
        total = pred_bg
    elif n_fg == n:
        total = pred_fg
    else:
        fn = n_fg - tp
        tn = pred_bg - fn
        mb, mg = pred_fg / n, n_fg / n
        total = 0.0
        for count, a, b in ((tp, 1 - mb, 1 - mg), (fp, 1 - mb, -mg),
                            (fn, -mb, 1 - mg), (tn, -mb, -mg)):
            xi = 2.0 * a * b / (a * a + b * b + EPS)
            total = total + (xi + 1.0) ** 2 / 4.0 * count
    return total / (n - 1 + EPS)


def _f_measure(tp, pred_fg, n_fg: int, beta2: float):
    """F = (1 + beta^2) P R / (beta^2 P + R), 0 where P R = 0 (arrays over thresholds)."""
    precision = tp / np.maximum(pred_fg, 1)
    recall = tp / max(n_fg, 1)
    num = (1.0 + beta2) * precision * recall
    return num / np.where(num == 0, 1.0, beta2 * precision + recall)


def adaptive_scores(P: np.ndarray, G: np.ndarray) -> Tuple[float, float]:
    """(adpE, adpF) of the binary map P >= min(2 mean P, 1)."""
    B = P >= min(2.0 * P.mean(), 1.0)
    tp = np.count_nonzero(B & G)
    fp = np.count_nonzero(B) - tp
    n_fg = np.count_nonzero(G)
    adp_e = _enhanced_alignment(tp, fp, n_fg, G.size)
    adp_f = 0.0 if tp == 0 else float(_f_measure(tp, tp + fp, n_fg, BETA2_F))
    return float(adp_e), adp_f


def threshold_curves(P: np.ndarray, G: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(E, F) curves, (256,) each, index t: the scores of uint8(255 P) >= t.

    One histogram per class of G, cumulated from the top, gives the counts at all thresholds.
    """
    q = (P * 255).astype(np.uint8)
    hist = np.bincount(q.ravel().astype(np.intp) + NUM_THRESHOLDS * G.ravel(),
                       minlength=2 * NUM_THRESHOLDS).reshape(2, NUM_THRESHOLDS)  # [bg, fg]
    at_least = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]                         # >= t
    fp, tp = at_least[0], at_least[1]
    n_fg = int(hist[1].sum())
    return (_enhanced_alignment(tp, fp, n_fg, G.size),
            _f_measure(tp, tp + fp, n_fg, BETA2_F))


# -- weighted F-measure -------------------------------------------------------------------------
def _matlab_gaussian_1d(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """fspecial('gaussian', [7 7], 5) is separable: outer(k, k) with this normalised k (none of
    its taps is below the eps * max cut-off)."""
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


_GAUSS7 = _matlab_gaussian_1d()


def weighted_f_measure(P: np.ndarray, G: np.ndarray) -> float:
    """Margolin et al. 2014 (beta^2 = 1); 0 when G is empty.

    With the error map E = |P - G| (1 - P on G, P off G), their MATLAB code computes
        Et  = E, with each background pixel taking E of its nearest foreground pixel
        EA  = Et smoothed by fspecial('gaussian', 7, 5) (zero padding)
        Ew  = min(E, EA) on G;  E * (2 - exp(ln(0.5) / 5 * dist to G)) off G
        R   = 1 - mean(Ew on G),  P_w = TP_w / (TP_w + FP_w),  TP_w = |G| - sum(Ew on G),
        FP_w = sum(Ew off G),  wF = 2 R P_w / (R + P_w).
    EA is needed on G only, so it is computed on G's bounding box plus the kernel's 3-pixel reach,
    which gives the full-image values inside the box.
    """
    if not G.any():
        return 0.0
    h, w = G.shape
    n_fg = np.count_nonzero(G)
    # Nearest foreground pixel (iy, ix) of every pixel; a foreground pixel is its own.
    iy, ix = distance_transform_edt(~G, return_distances=False, return_indices=True)

    # Pixel dependency, on the foreground: min(E, EA).
    rows, cols = np.flatnonzero(G.any(axis=1)), np.flatnonzero(G.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    r = len(_GAUSS7) // 2
    cy0, cy1, cx0, cx1 = max(y0 - r, 0), min(y1 + r, h), max(x0 - r, 0), min(x1 + r, w)
    crop = (slice(cy0, cy1), slice(cx0, cx1))
    Et = 1.0 - P.ravel()[iy[crop] * w + ix[crop]]          # E = 1 - P at the nearest fg pixel
    EA = correlate1d(correlate1d(Et, _GAUSS7, axis=0, mode="constant"), _GAUSS7, axis=1,
                     mode="constant")[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
    box = (slice(y0, y1), slice(x0, x1))
    ew_fg = np.sum(np.minimum(EA, 1.0 - P[box]), where=G[box])

    # Pixel importance, on the background: E = P weighted by 2 - exp(ln(0.5) / 5 * dist).
    dy = iy - np.arange(h, dtype=iy.dtype)[:, None]
    dx = ix - np.arange(w, dtype=ix.dtype)
    dy *= dy
    dx *= dx
    dy += dx
    weight = np.sqrt(dy, dtype=np.float64)                 # Euclidean distance to G
    weight *= np.log(0.5) / 5.0
    np.exp(weight, out=weight)
    np.subtract(2.0, weight, out=weight)
    weight *= P                                            # Ew off G
    fp_w = np.sum(weight, where=~G)

    tp_w = n_fg - ew_fg
    recall = 1.0 - ew_fg / n_fg
    precision = tp_w / (tp_w + fp_w + EPS)
    return float((1 + BETA2_WF) * recall * precision / (recall + BETA2_WF * precision + EPS))


# -- the accumulator ----------------------------------------------------------------------------
class SODMetric:
    """Per-image SOD scores over a test set; `compute()` -> the nine numbers of the paper's Table 1.

    `update(pred, gt)` scores one image: pred (H, W) float in [0, 1] or uint8 0..255, gt (H, W)
    uint8 0/255 or bool, numpy or torch. `len(metric)` is the number of images scored.
    """

    def __init__(self):
        self.scores: Dict[str, List[float]] = {k: [] for k in PER_IMAGE_KEYS}
        self.curve_sums: Dict[str, np.ndarray] = {k: np.zeros(NUM_THRESHOLDS) for k in "EF"}

    def __len__(self) -> int:
        return len(self.scores["MAE"])

    def reset(self) -> None:
        self.__init__()

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        P, G = prepare(pred, gt)
        adp_e, adp_f = adaptive_scores(P, G)
        e_curve, f_curve = threshold_curves(P, G)
        self.scores["S"].append(s_measure(P, G))
        self.scores["wF"].append(weighted_f_measure(P, G))
        self.scores["adpE"].append(adp_e)
        self.scores["adpF"].append(adp_f)
        self.scores["MAE"].append(float(np.abs(P - G).mean()))
        self.curve_sums["E"] += e_curve
        self.curve_sums["F"] += f_curve

    def merge(self, other: "SODMetric") -> None:
        """Add another metric's images (e.g. gathered from another process)."""
        for k in PER_IMAGE_KEYS:
            self.scores[k].extend(other.scores[k])
        for k in self.curve_sums:
            self.curve_sums[k] += other.curve_sums[k]

    def compute(self) -> Dict[str, float]:
        """{'S', 'wF', 'adpE', 'meanE', 'maxE', 'adpF', 'meanF', 'maxF', 'MAE'} as floats."""
        n = len(self)
        if n == 0:
            raise ValueError("SODMetric.compute() called before any update()")
        out = {k: float(np.mean(np.asarray(v, dtype=np.float64))) for k, v in self.scores.items()}
        for k in "EF":
            curve = self.curve_sums[k] / n          # the dataset's curve over thresholds
            out[f"mean{k}"] = float(curve.mean())
            out[f"max{k}"] = float(curve.max())
        return {k: out[k] for k in RESULT_KEYS}
