"""Segmentation evaluation split by day and night, and the poly learning-rate schedule.

A stub model returns predetermined logits per image, so the day, night and whole-set confusion
matrices that `evaluate_seg` accumulates are known by hand; day and night get different
predictions, so swapping the two subsets fails. A second test runs the real MFNet loader on the
sample data (day and night told apart by the names' D / N suffix).
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ivt.data import MFNetDataset
from ivt.engine import DistInfo, TrainingDiverged, poly_lr
from ivt.tasks.seg import evaluate_seg

SAMPLE = Path(__file__).resolve().parent / "data" / "mfnet_sample"
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def no_autocast():
    return torch.autocast("cpu", enabled=False)


class StubSegmentor(nn.Module):
    """Returns the logits of a predetermined prediction for each image it is shown.

    `predictions`: list of (vis (3, H, W), pred (H, W) class ids); an image is recognised by its
    visible tensor. Logits are one-hot (B, K, H, W), so argmax gives back `pred`.
    """

    def __init__(self, predictions, num_classes):
        super().__init__()
        self.predictions, self.num_classes = predictions, num_classes
        self.calls = 0

    def logits_at_input_size(self, vis, ir):
        self.calls += 1
        for image, pred in self.predictions:
            if vis.shape == (1,) + tuple(image.shape) and torch.equal(vis[0], image):
                one_hot = torch.nn.functional.one_hot(torch.as_tensor(pred), self.num_classes)
                return one_hot.permute(2, 0, 1)[None].float()
        raise AssertionError("image not in the stub's table")


class TinySegSet(Dataset):
    """Items in the dataset format (vis, ir, label, name, is_night) from fixed label maps."""

    num_classes = 3

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, label = self.items[i]
        label = torch.as_tensor(label, dtype=torch.int64)
        vis = torch.full((3,) + tuple(label.shape), float(i))     # identifies the image
        return {"vis": vis, "ir": vis.clone(), "label": label, "name": name,
                "is_night": name.endswith("N")}


# Labels and predictions (3 classes, 255 = ignore), with the confusion matrices by hand:
#   00001D  label [[0, 1, 2], [1, 1, 2]]     pred = label         -> (0,0) 1, (1,1) 3, (2,2) 2
#   00002N  label [[0, 0, 0], [2, 2, 2]]     pred all 1           -> (0,1) 3, (2,1) 3
#   00003D  label [[255, 0, 0], [1, 1, 1]]   pred [[2, 0, 1], [1, 1, 1]]
#                                                                 -> (0,0) 1, (0,1) 1, (1,1) 3
LABELS = [("00001D", [[0, 1, 2], [1, 1, 2]]),
          ("00002N", [[0, 0, 0], [2, 2, 2]]),
          ("00003D", [[255, 0, 0], [1, 1, 1]])]
PREDS = [[[0, 1, 2], [1, 1, 2]],
         [[1, 1, 1], [1, 1, 1]],
         [[2, 0, 1], [1, 1, 1]]]
DAY = [[2, 1, 0],
       [0, 6, 0],
       [0, 0, 2]]
NIGHT = [[0, 3, 0],
         [0, 0, 0],
         [0, 3, 0]]


def test_day_and_night_confusion_matrices():
    dataset = TinySegSet(LABELS)
    model = StubSegmentor([(dataset[i]["vis"], PREDS[i]) for i in range(len(dataset))], 3)
    seen = []
    metrics = evaluate_seg(model, dataset, SINGLE, no_autocast,
                           on_prediction=lambda i, pred, label: seen.append(i))
    assert model.calls == 3 and seen == [0, 1, 2]
    np.testing.assert_array_equal(metrics["day"].confusion, DAY)
    np.testing.assert_array_equal(metrics["night"].confusion, NIGHT)
    np.testing.assert_array_equal(metrics["all"].confusion, np.add(DAY, NIGHT))
    # day: IoU 0 = 2 / (3 + 2 - 2) = 2/3, IoU 1 = 6 / (6 + 7 - 6) = 6/7, IoU 2 = 1
    day = metrics["day"].compute()
    assert day["IoU"] == pytest.approx([100 * 2 / 3, 100 * 6 / 7, 100.0])
    assert day["mIoU"] == pytest.approx(100 * (2 / 3 + 6 / 7 + 1) / 3)
    # night: nothing right; class 1 predicted only (IoU 0), classes 0 and 2 missed (IoU 0)
    night = metrics["night"].compute()
    assert night["IoU"] == [0.0, 0.0, 0.0] and night["mIoU"] == 0.0
    assert night["aAcc"] == 0.0 and day["aAcc"] == pytest.approx(100 * 10 / 11)


def test_mfnet_sample_day_and_night_come_from_the_names():
    """The real loader on the sample (test list: 01201N, 01503D): a perfect prediction for the
    day image and 'everything is class 1' for the night image."""
    dataset = MFNetDataset(SAMPLE, split="test", train=False)
    names = [s.name for s in dataset.samples]
    assert sorted(names) == ["01201N", "01503D"]
    table, want = [], {"day": np.zeros((9, 9), np.int64), "night": np.zeros((9, 9), np.int64)}
    for i, name in enumerate(names):
        item = dataset[i]
        label = item["label"].numpy()
        pred = label.copy() if name.endswith("D") else np.ones_like(label)
        pred[label == 255] = 0
        table.append((item["vis"], pred))
        keep = label != 255
        np.add.at(want["night" if name.endswith("N") else "day"], (label[keep], pred[keep]), 1)
    metrics = evaluate_seg(StubSegmentor(table, 9), dataset, SINGLE, no_autocast)
    for subset in ("day", "night"):
        np.testing.assert_array_equal(metrics[subset].confusion, want[subset], err_msg=subset)
    assert metrics["day"].compute()["aAcc"] == 100.0
    assert metrics["night"].compute()["aAcc"] < 100.0


def test_evaluate_seg_refuses_scores_with_nan():
    """A diverged model's NaN class scores would be scored (argmax picks some class: a plausible
    mIoU, a best.pt chosen on it): the image is named instead, as a divergence."""
    dataset = TinySegSet(LABELS)
    dataset.image_paths = [f"images/{name}.png" for name, _ in LABELS]

    class Diverged(nn.Module):
        def logits_at_input_size(self, vis, ir):
            logits = torch.zeros(1, 3, *vis.shape[2:])
            logits[0, 1, 1, 2] = float("nan") if vis[0, 0, 0, 0] == 1 else 0.0   # image 1 only
            return logits

    with pytest.raises(TrainingDiverged, match="images/00002N.png: NaN or inf in the model's "
                                               "class scores"):
        evaluate_seg(Diverged(), dataset, SINGLE, no_autocast)


@pytest.mark.parametrize("base,it,total,power,want", [
    (1e-3, 0, 160_000, 1.0, 1e-3),                       # starts at the base rate
    (1e-3, 40_000, 160_000, 1.0, 7.5e-4),                # linear when power = 1
    (1e-3, 160_000, 160_000, 1.0, 0.0),                  # reaches 0 at the end
    (1.0, 3, 4, 2.0, 0.0625),                            # (1 - 3/4)^2
    (2.0, 1, 2, 0.5, math.sqrt(2.0)),                    # 2 * (1/2)^0.5
    (0.01, 250, 1000, 0.9, 0.01 * 0.75 ** 0.9),          # mmseg's usual power 0.9
])
def test_poly_lr(base, it, total, power, want):
    assert poly_lr(base, it, total, power) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_poly_lr_default_power_is_linear():
    assert poly_lr(1e-3, 80_000, 160_000) == pytest.approx(5e-4, rel=1e-12)
    values = [poly_lr(1.0, i, 10, 0.9) for i in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))        # strictly decreasing to 0


def test_vit_segmentor_pads_inputs_that_are_not_patch_multiples():
    """DINOv2 with its release's patch, 14: an image of 30x44 (as MFNet's 480x640) is padded
    with black pixels to 42x56, as `pad_to(img, size, IMAGE_PAD)` before normalising, and the
    logits cropped back; `evaluate_seg` (training's validation, evaluate.py) runs on it."""
    from ivt.data.transforms import IMAGE_PAD, pad_to, thermal_to_tensor, visible_to_tensor
    from ivt.models.segmentor import build_segmentor
    torch.manual_seed(0)
    model = build_segmentor("dinov2_b", 3, img_size=56, head_dim=16, patch_size=14).eval()
    assert model.backbone.input_multiple == 14
    rng = np.random.default_rng(0)
    vis8 = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    ir8 = rng.integers(0, 256, (30, 44), dtype=np.uint8)
    norm = model.norm
    vis, ir = visible_to_tensor(vis8, norm)[None], thermal_to_tensor(ir8, norm)[None]
    with torch.no_grad():
        got = model.logits_at_input_size(vis, ir)
        padded = (visible_to_tensor(pad_to(vis8, (42, 56), IMAGE_PAD), norm)[None],
                  thermal_to_tensor(pad_to(ir8, (42, 56), IMAGE_PAD), norm)[None])
        want = torch.nn.functional.interpolate(model(*padded), size=(42, 56), mode="bilinear",
                                               align_corners=False)[:, :, :30, :44]
    assert got.shape == (1, 3, 30, 44)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    class OneImage(Dataset):
        num_classes = 3

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"vis": vis[0], "ir": ir[0], "label": torch.zeros(30, 44, dtype=torch.int64),
                    "name": "00001D", "is_night": False}

    metrics = evaluate_seg(model, OneImage(), SINGLE, no_autocast)["all"]
    pred = want.argmax(1)[0].numpy()
    np.testing.assert_array_equal(metrics.confusion[0], np.bincount(pred.ravel(), minlength=3))
