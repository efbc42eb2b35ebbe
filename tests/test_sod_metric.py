"""SODMetric against PySODMetrics (the reference implementation docs/data.md names), on random and
structured prediction / ground-truth pairs of many sizes; the maps `evaluate_sod` scores (sigmoid of
the main output resized bilinearly to the GT's size, min-max normalised per image to uint8)."""
import contextlib
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ivt.engine import DistInfo, TrainingDiverged
from ivt.metrics import SODMetric
from ivt.tasks.sod import evaluate_sod, saliency_map

py_sod_metrics = pytest.importorskip("py_sod_metrics")

KEYS = ("S", "wF", "adpE", "meanE", "maxE", "adpF", "meanF", "maxF", "MAE")


class EmptyQuadrantSmeasure(py_sod_metrics.Smeasure):
    """PySODMetrics' S-measure, except that an empty quadrant (foreground centroid on the last
    row or column; its weight is 0) scores 0 instead of 0 / 0 = NaN (see ivt/metrics/sod.py)."""

    def ssim(self, pred, gt):
        return 0.0 if pred.size == 0 else super().ssim(pred, gt)


def reference(pairs):
    """Per-image scores and dataset results of PySODMetrics on uint8 inputs (floats p are fed as
    255 p, which its preparation divides by 255 again)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # its Fmeasure class announces a future removal
        fm, wfm, em, mae = (py_sod_metrics.Fmeasure(), py_sod_metrics.WeightedFmeasure(),
                            py_sod_metrics.Emeasure(), py_sod_metrics.MAE())
        sm = EmptyQuadrantSmeasure()
        for pred, gt in pairs:
            pred = np.asarray(pred)
            pred = pred.astype(np.float64) * 255.0 if pred.dtype != np.uint8 else pred
            gt = np.where(gt, 255, 0).astype(np.uint8) if gt.dtype == np.bool_ else gt
            for m in (fm, wfm, sm, em, mae):
                m.step(pred, gt)
    f, e = fm.get_results()["fm"], em.get_results()["em"]
    results = {"S": sm.get_results()["sm"], "wF": wfm.get_results()["wfm"], "adpE": e["adp"],
               "meanE": e["curve"].mean(), "maxE": e["curve"].max(), "adpF": f["adp"],
               "meanF": f["curve"].mean(), "maxF": f["curve"].max(),
               "MAE": mae.get_results()["mae"]}
    per_image = {"S": sm.sms, "wF": wfm.weighted_fms, "adpE": em.adaptive_ems,
                 "adpF": fm.adaptive_fms, "MAE": mae.maes}
    return results, per_image


def ellipse(h, w, rng):
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(1, h / 2 + 1), rng.uniform(1, w / 2 + 1)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def blur(mask, rng):
    """A plausible saliency map: the mask smoothed, shifted a little, plus noise, in [0, 1]."""
    from scipy.ndimage import gaussian_filter, shift
    m = shift(gaussian_filter(mask.astype(np.float64), rng.uniform(0.5, 3)),
               rng.integers(-3, 4, 2), order=1)
    return np.clip(m + rng.normal(0, 0.1, mask.shape), 0, 1)


def make_pairs():
    """(pred, gt) pairs: uint8 and float predictions, uint8 and bool ground truths."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(24):                                         # random sizes, ellipse objects
        h, w = (int(v) for v in rng.integers(4, 90, 2))
        g = ellipse(h, w, rng)
        gt = np.where(g, 255, 0).astype(np.uint8) if i % 3 else g
        if i % 4 == 0:
            pred = (rng.random((h, w)) * 255).astype(np.uint8)   # noise
        elif i % 4 == 1:
            pred = blur(g, rng)                                 # float64 in [0, 1]
        elif i % 4 == 2:
            pred = (blur(g, rng) * 255).round().astype(np.uint8)
        else:
            pred = blur(~g, rng).astype(np.float32)             # inverted
        pairs.append((pred, gt))
    h, w = 37, 53
    empty, full = np.zeros((h, w), np.uint8), np.full((h, w), 255, np.uint8)
    box = np.zeros((h, w), np.uint8)
    box[10:20, 5:30] = 255
    soft = np.zeros((h, w), np.uint8)                           # anti-aliased GT: > 128 only
    soft[8:25, 12:40] = 129
    soft[15:20, 20:30] = 255
    soft[5:8, 5:50] = 128
    noise = (rng.random((h, w)) * 255).astype(np.uint8)
    for gt in (empty, full, box):
        pairs += [(noise, gt), (np.zeros((h, w), np.uint8), gt),       # constant predictions
                  (np.full((h, w), 255, np.uint8), gt), (np.full((h, w), 0.3), gt)]
    pairs += [(box, box), (255 - box, box), (box, empty), (box, full), (noise, soft),
              (blur(box > 0, rng), soft)]
    bottom = np.zeros((h, w), np.uint8)                         # centroid on the last row
    bottom[-1, 10:20] = 255
    right = np.zeros((h, w), np.uint8)                          # ... and on the last column
    right[5:9, -1] = 255
    pairs += [(noise, bottom), (blur(bottom > 0, rng), right)]
    for shape in ((3, 50), (50, 3), (2, 2), (1, 9)):            # thin images
        g = rng.random(shape) < 0.4
        g.flat[0] = True
        pairs.append(((rng.random(shape) * 255).astype(np.uint8), g))
    return pairs


PAIRS = make_pairs()


def test_matches_pysodmetrics_on_every_key():
    assert len(PAIRS) >= 40 and len({p[1].shape for p in PAIRS}) >= 20
    metric = SODMetric()
    for pred, gt in PAIRS:
        metric.update(pred, gt)
    want, want_per_image = reference(PAIRS)
    got = metric.compute()
    assert list(got) == list(KEYS) and len(metric) == len(PAIRS)
    for key in KEYS:
        assert np.isfinite(got[key]), key
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    for key, values in want_per_image.items():       # each image on its own, much tighter
        np.testing.assert_allclose(metric.scores[key], values, rtol=0, atol=1e-9, err_msg=key)


def test_pysodmetrics_gives_nan_where_a_quadrant_is_empty():
    """The one documented difference: stock PySODMetrics scores 0/0 for the empty quadrant."""
    pred, gt = PAIRS[-6]                                      # `bottom` above
    assert np.argwhere(gt > 128)[:, 0].mean().round() == gt.shape[0] - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = py_sod_metrics.Smeasure()
        stock.step(pred, gt)
    assert np.isnan(stock.sms[0])
    metric = SODMetric()
    metric.update(pred, gt)
    assert np.isfinite(metric.compute()["S"])


def test_perfect_prediction_scores_by_definition():
    gt = np.zeros((30, 40), np.uint8)
    gt[5:20, 10:25] = 255
    metric = SODMetric()
    metric.update(gt.astype(np.float64) / 255, gt > 128)
    r = metric.compute()
    assert r["MAE"] == 0 and r["S"] == pytest.approx(1.0)
    assert r["maxF"] == pytest.approx(1.0) and r["adpF"] == pytest.approx(1.0)
    assert r["wF"] == pytest.approx(1.0)
    # E-measure of B == G: every pixel's alignment is 1, so E = HW / (HW - 1).
    assert r["adpE"] == pytest.approx(1200 / 1199) and r["maxE"] == pytest.approx(1200 / 1199)


def test_merge_equals_one_pass_and_torch_equals_numpy():
    whole, first, second = SODMetric(), SODMetric(), SODMetric()
    for i, (pred, gt) in enumerate(PAIRS):
        whole.update(pred, gt)
        (first if i % 2 else second).update(torch.from_numpy(np.ascontiguousarray(pred)),
                                            torch.from_numpy(np.ascontiguousarray(gt)))
    first.merge(second)
    assert len(first) == len(whole)
    a, b = first.compute(), whole.compute()
    for key in KEYS:
        assert a[key] == pytest.approx(b[key], abs=1e-12), key


def test_object_term_of_a_single_pixel_has_zero_spread():
    """docs/data.md's O(x) = 2 mean / (mean^2 + 1 + std(x, ddof=1) + eps) is undefined for one
    pixel (ddof=1 divides by 0; PySODMetrics returns NaN for the image); its spread is 0, so a
    ground truth with one foreground (or one background) pixel scores a finite S. By hand:
    O([0.7]) = 1.4 / 1.49."""
    from ivt.metrics.sod import _object_score, s_measure
    assert _object_score(np.array([0.7])) == pytest.approx(1.4 / 1.49, abs=1e-12)
    rng = np.random.default_rng(4)
    P = rng.random((6, 7))
    G = np.zeros((6, 7), bool)
    G[2, 3] = True
    assert np.isfinite(s_measure(P, G)) and np.isfinite(s_measure(P, ~G))


def test_half_precision_tensors_score_as_their_float64_values():
    """Predictions straight from an autocast model (torch bfloat16 / float16, which numpy cannot
    hold) are scored as the same values in float64: every per-image score equals that of the
    float64 numpy copy."""
    rng = np.random.default_rng(3)
    gt = ellipse(23, 31, rng)
    values = torch.from_numpy(blur(gt, rng))
    for dtype in (torch.bfloat16, torch.float16):
        pred = values.to(dtype)
        half, exact = SODMetric(), SODMetric()
        half.update(pred, torch.from_numpy(gt))
        exact.update(pred.double().numpy(), gt)
        for key in half.scores:
            assert half.scores[key] == exact.scores[key], (dtype, key)


def test_input_errors():
    metric = SODMetric()
    gt = np.zeros((4, 5), np.uint8)
    with pytest.raises(ValueError, match=r"pred shape \(4, 6\) != gt shape \(4, 5\)"):
        metric.update(np.zeros((4, 6)), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(np.full((4, 5), 1.5), gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update(np.full((4, 5), np.nan), gt)
    with pytest.raises(ValueError, match="one \\(H, W\\) map"):
        metric.update(np.zeros((1, 4, 5)), gt)
    with pytest.raises(TypeError, match="gt must be bool or uint8"):
        metric.update(np.zeros((4, 5)), gt.astype(np.int64))
    with pytest.raises(TypeError, match="pred must be float"):
        metric.update(np.zeros((4, 5), np.int32), gt)
    with pytest.raises(ValueError, match="0/1"):
        metric.update(np.zeros((4, 5)), (gt + 1).clip(0, 1))
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    assert len(metric) == 0


def test_speed_640x480():
    """Issue 8's budget: 2,500 images of 640x480 in well under a minute (24 ms per image is one
    minute on the machines CI ran on). CPU speed differs from machine to machine and from day
    to day, so the assertion is relative, to PySODMetrics computing the same scores on the same
    images in the same process (CPU time, best of three interleaved rounds of 10 images, so that
    other work on a shared machine does not count): ours took 0.29-0.35 of its time (27-39 against
    89-121 ms on a machine where the old absolute check failed at 29 ms), and must stay under
    0.6."""
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(10):
        g = ellipse(480, 640, rng)
        pairs.append((blur(g, rng).astype(np.float32), np.where(g, 255, 0).astype(np.uint8)))

    def ours():
        metric = SODMetric()
        for pred, gt in pairs:
            metric.update(pred, gt)

    best = {ours: float("inf"), reference: float("inf")}
    for _ in range(3):
        for fn in best:
            t0 = time.process_time()
            fn() if fn is ours else fn(pairs)
            best[fn] = min(best[fn], (time.process_time() - t0) / len(pairs))
    ms = {fn.__name__: f"{t * 1e3:.1f} ms" for fn, t in best.items()}
    assert best[ours] < 0.6 * best[reference], f"per 640x480 image: {ms}"


# -- the maps evaluate_sod scores ------------------------------------------------------------------
def min_max_255(p: np.ndarray) -> np.ndarray:
    """docs/data.md's per-image min-max onto 0..255 (the CPNet/SOD release's test script:
    res = (res - res.min()) / (res.max() - res.min() + 1e-8) * 255), in float64, rounded."""
    p = p.astype(np.float64)
    return np.round((p - p.min()) / (p.max() - p.min()) * 255).astype(np.uint8)


def bilinear_half_pixel(x: np.ndarray, out_hw) -> np.ndarray:
    """Bilinear resize with half-pixel centres (PyTorch's align_corners=False, OpenCV's
    INTER_LINEAR) in float64: output pixel j samples the input at (j + 0.5) * n_in / n_out - 0.5,
    clamped at 0; the neighbour past the last pixel is the last pixel."""
    def axis(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0
    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[0], out_hw[0]), axis(x.shape[1], out_hw[1])
    x = x.astype(np.float64)
    top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
    bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


def test_saliency_map_is_min_max_normalised_per_image():
    """The saved / scored map is (p - min) / (max - min) * 255 (docs/data.md), so its minimum is 0
    and its maximum 255 even when the probabilities do not reach 0; a constant map is kept as it
    is (round(255 p), no division by zero)."""
    p = np.random.default_rng(0).uniform(0.2, 0.9, size=(7, 9))
    got = saliency_map(p)
    assert got.dtype == np.uint8 and got.shape == p.shape
    assert got.min() == 0 and got.max() == 255
    np.testing.assert_array_equal(got, min_max_255(p))
    # by hand: min 0.25 -> 0, max 0.75 -> 255, the middle 0.5 -> 127.5 -> 128
    np.testing.assert_array_equal(saliency_map(np.array([[0.25, 0.5], [0.75, 0.5]])),
                                  np.array([[0, 128], [255, 128]], np.uint8))
    np.testing.assert_array_equal(saliency_map(np.full((2, 3), 0.5)),
                                  np.full((2, 3), 128, np.uint8))


def test_evaluate_sod_scores_the_bilinear_resize_to_the_gt_size():
    """evaluate_sod's per-image map (docs/data.md, its docstring): the model's (1, 1, S, S)
    probabilities resized BILINEARLY (half-pixel centres) to the ground truth's (H, W), then
    min-max normalised to uint8. A stub model returns known probabilities; the GTs are larger and
    smaller than S and not square. The metric scores that map: its per-image MAE is that of the
    reference map against the GT."""
    S, gt_sizes = 8, [(13, 11), (5, 6)]
    probs = torch.rand(len(gt_sizes), 1, 1, S, S, generator=torch.Generator().manual_seed(0))
    gts = []
    for h, w in gt_sizes:
        gt = np.zeros((h, w), np.uint8)
        gt[h // 4:3 * h // 4, w // 3:] = 255
        gts.append(gt)

    class Items(Dataset):
        def __len__(self):
            return len(gt_sizes)

        def __getitem__(self, i):
            vis = torch.full((3, S, S), float(i))            # tells the stub which image it sees
            return {"vis": vis, "ir": torch.zeros(3, S, S), "gt": torch.from_numpy(gts[i])}

    class Stub(nn.Module):
        def predict(self, vis, ir):
            assert vis.shape == ir.shape == (1, 3, S, S)
            return probs[int(vis[0, 0, 0, 0])]

    seen = {}
    metric = evaluate_sod(Stub(), Items(), DistInfo(0, 1, 0, torch.device("cpu")),
                          contextlib.nullcontext, on_prediction=lambda i, m: seen.__setitem__(i, m))
    assert sorted(seen) == [0, 1] and len(metric) == 2
    for i, gt in enumerate(gts):
        want = min_max_255(bilinear_half_pixel(probs[i, 0, 0].numpy(), gt.shape))
        got = seen[i]
        assert got.shape == gt.shape and got.dtype == np.uint8, i
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, i     # float32 rounding
        mae = np.abs(want / 255.0 - (gt > 128)).mean()
        assert metric.scores["MAE"][i] == pytest.approx(mae, abs=1 / 255), i


def test_evaluate_sod_refuses_a_map_with_nan():
    """A diverged model's NaN probabilities would be saved and scored as a black map (plausible
    numbers, a best.pt chosen on them): the image is named instead, as a divergence (the
    trainer stops on it keeping its last finite checkpoint; evaluate.py exits with status 1)."""
    class Items(Dataset):
        image_paths = ["VT821/RGB/7.jpg"]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"vis": torch.zeros(3, 4, 4), "ir": torch.zeros(3, 4, 4),
                    "gt": torch.zeros(5, 6, dtype=torch.uint8)}

    class Diverged(nn.Module):
        def predict(self, vis, ir):
            return torch.full((1, 1, 4, 4), float("nan"))

    with pytest.raises(TrainingDiverged, match="VT821/RGB/7.jpg: NaN or inf in the model's saliency map"):
        evaluate_sod(Diverged(), Items(), DistInfo(0, 1, 0, torch.device("cpu")),
                     contextlib.nullcontext)
