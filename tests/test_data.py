"""MFNet / MSRS loaders and the paired transforms, on real sample files (tests/data) and on
fixtures written into tmp_path in the real layouts."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivt.data import MFNetDataset, MSRSDataset, build_seg_dataset
from ivt.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, THERMAL_MEAN, THERMAL_STD,
                                 TrainTransform)

MFNET_SAMPLE = Path(__file__).parent / "data" / "mfnet_sample"


def denorm_vis(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).permute(1, 2, 0).numpy()


def denorm_ir(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W) in [0, 255]; the 3 channels are copies."""
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    return ((x[0] * THERMAL_STD + THERMAL_MEAN) * 255).numpy()


# ---------------------------------------------------------------- MFNet, real files

def test_mfnet_eval_items_are_native_size_rgb_plus_thermal():
    ds = MFNetDataset(MFNET_SAMPLE, split="test", train=False)
    assert len(ds) == 2
    for i, item in enumerate(ds):
        name = ds.samples[i].name
        rgbt = np.array(Image.open(MFNET_SAMPLE / "images" / f"{name}.png"))
        assert rgbt.shape == (480, 640, 4)
        assert item["name"] == name and item["is_night"] == name.endswith("N")
        assert item["vis"].shape == item["ir"].shape == (3, 480, 640)
        assert item["label"].shape == (480, 640) and item["label"].dtype == torch.int64
        assert 0 <= int(item["label"].min()) and int(item["label"].max()) <= 8
        np.testing.assert_allclose(denorm_vis(item["vis"]), rgbt[..., :3], atol=1e-3)
        np.testing.assert_allclose(denorm_ir(item["ir"]), rgbt[..., 3], atol=1e-3)
    assert [MFNetDataset(MFNET_SAMPLE, s, train=False)[0]["is_night"]
            for s in ("test_day", "test_night")] == [False, True]


def test_mfnet_train_plus_val_concatenates_lists():
    ds = MFNetDataset(MFNET_SAMPLE, split="train+val", validate=False)
    assert [s.name for s in ds.samples] == ["00105D", "00704N", "00706N"]


def test_mfnet_train_crops_are_deterministic_per_seed_epoch_index():
    ds = MFNetDataset(MFNET_SAMPLE, split="train", crop=(128, 160), seed=3)
    a = ds[1]
    assert a["vis"].shape == a["ir"].shape == (3, 128, 160) and a["label"].shape == (128, 160)
    b = ds[1]
    assert all(torch.equal(a[k], b[k]) for k in ("vis", "ir", "label"))
    ds.set_epoch(1)
    c = ds[1]
    assert not torch.equal(a["vis"], c["vis"])
    other_seed = MFNetDataset(MFNET_SAMPLE, split="train", crop=(128, 160), seed=4, validate=False)
    assert not torch.equal(a["vis"], other_seed[1]["vis"])


def test_mfnet_padding_coincides_in_images_and_label():
    # Crop larger than the down-scaled image: padding on the bottom/right (left after a flip).
    t = TrainTransform(crop=(400, 500), scale_range=(0.5, 0.6))
    ds = MFNetDataset(MFNET_SAMPLE, split="train", transform=t, validate=False)
    zero_vis = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]).view(3, 1)
    zero_ir = -THERMAL_MEAN / THERMAL_STD
    for epoch in range(3):
        ds.set_epoch(epoch)
        for item in ds:
            pad = item["label"] == 255
            assert 0.2 < pad.float().mean() < 0.7
            ir = item["ir"][:, pad]
            assert torch.all(ir == zero_ir)
            assert torch.allclose(item["vis"][:, pad], zero_vis.expand(3, int(pad.sum())))
            # Real labels have no 255: the padded band is a full-height or full-width block.
            rows, cols = pad.all(dim=1), pad.all(dim=0)
            assert torch.equal(pad, rows[:, None] | cols[None, :])


def write_mfnet_fixture(root: Path, names, size=(48, 64), make=None):
    """MFNet layout with `make(i) -> (rgbt (H,W,4), label (H,W))`, every name in every list."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        if make is None:
            rgbt = rng.integers(0, 256, (*size, 4), dtype=np.uint8)
            label = rng.integers(0, 9, size, dtype=np.uint8)
        else:
            rgbt, label = make(i)
        Image.fromarray(rgbt).save(root / "images" / f"{name}.png")
        Image.fromarray(label).save(root / "labels" / f"{name}.png")
    for split in ("train", "val", "test"):
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_geometry_is_shared_by_visible_thermal_and_label(tmp_path):
    # Thermal and visible both equal 20 * label, an asymmetric pattern: any crop or flip applied
    # differently to one of the three breaks the equality.
    h, w = 60, 80
    yy, xx = np.mgrid[0:h, 0:w]
    label = ((xx // 13 + 2 * (yy // 17)) % 9).astype(np.uint8)
    label[:, :5] = 3
    rgbt = np.repeat((label * 20)[..., None], 4, axis=2).astype(np.uint8)
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D"], make=lambda i: (rgbt, label))

    exact = MFNetDataset(root, transform=TrainTransform((40, 50), scale_range=(1.0, 1.0),
                                                        jitter=False))
    flipped = 0
    for epoch in range(12):
        exact.set_epoch(epoch)
        item = exact[0]
        lab = item["label"].numpy()
        np.testing.assert_allclose(denorm_ir(item["ir"]), lab * 20.0, atol=1e-3)
        np.testing.assert_allclose(denorm_vis(item["vis"])[..., 1], lab * 20.0, atol=1e-3)
        crops = [label[y:y + 40, x:x + 50] for y in range(21) for x in range(31)]
        flipped += any(np.array_equal(lab, c[:, ::-1]) for c in crops)
        assert any(np.array_equal(lab, c) or np.array_equal(lab, c[:, ::-1]) for c in crops)
    assert 0 < flipped < 12

    scaled = MFNetDataset(root, transform=TrainTransform((40, 50), jitter=False))
    for epoch in range(6):
        scaled.set_epoch(epoch)
        item = scaled[0]
        lab = item["label"].numpy()
        keep = lab != 255
        # Bilinear images vs NEAREST labels differ only along class borders.
        agree = np.abs(denorm_ir(item["ir"])[keep] - lab[keep] * 20.0) < 1.0
        assert agree.mean() > 0.6
        assert set(np.unique(lab)) <= set(range(9)) | {255}


# -------------------------------------------------------- bad data fails early, naming the file

def test_three_channel_image_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D", "00002N"])
    Image.new("RGB", (64, 48)).save(root / "images" / "00002N.png")
    with pytest.raises(ValueError, match="00002N.png.*thermal channel is missing"):
        MFNetDataset(root, "train")
    ds = MFNetDataset(root, "train", validate=False)
    with pytest.raises(ValueError, match="00002N.png"):
        ds[1]


def test_missing_label_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D", "00002N"])
    (root / "labels" / "00001D.png").unlink()
    with pytest.raises(FileNotFoundError, match="label.*labels/00001D.png"):
        MFNetDataset(root, "test", validate=False)


def test_missing_image_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D"])
    (root / "images" / "00001D.png").unlink()
    with pytest.raises(FileNotFoundError, match="images/00001D.png"):
        MFNetDataset(root, "test")


def test_label_value_outside_classes_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D", "00002N"])
    bad = np.zeros((48, 64), np.uint8)
    bad[3, 4] = 12
    Image.fromarray(bad).save(root / "labels" / "00002N.png")
    with pytest.raises(ValueError, match=r"00002N.png.*\[12\]"):
        MFNetDataset(root, "val")


def test_size_mismatch_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D"])
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(root / "labels" / "00001D.png")
    with pytest.raises(ValueError, match="00001D.png.*differs"):
        MFNetDataset(root, "val")


def test_empty_or_missing_split_list_is_rejected(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D"])
    (root / "val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="val.txt is empty"):
        MFNetDataset(root, "val")
    with pytest.raises(FileNotFoundError, match="test_night.txt"):
        MFNetDataset(root, "test_night")
    with pytest.raises(FileNotFoundError, match="trainval.txt"):
        MFNetDataset(root, "trainval")
    with pytest.raises(FileNotFoundError, match=r"dataset folder .*mfnett not found"):
        MFNetDataset(tmp_path / "mfnett", "train")              # a misspelt --data
    with pytest.raises(ValueError, match="split '../x': expected a list name"):
        MFNetDataset(root, "../x")
    (root / "my_day.txt").write_text("00001D\n")
    assert len(MFNetDataset(root, "my_day")) == 1


def test_flipped_copies_only_in_training_lists(tmp_path):
    root = write_mfnet_fixture(tmp_path / "mf", ["00001D", "00001D_flip"])
    assert len(MFNetDataset(root, "train")) == 2
    with pytest.raises(ValueError, match="test.txt.*00001D_flip"):
        MFNetDataset(root, "test")
    (root / "val.txt").write_text("00001X\n")
    with pytest.raises(ValueError, match="val.txt.*00001X"):
        MFNetDataset(root, "val")


# ---------------------------------------------------------------- MSRS, both layouts

def _msrs_pair(rng, size=(40, 56)):
    vis = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, size, dtype=np.uint8)
    label = rng.integers(0, 9, size, dtype=np.uint8)
    return vis, ir, label


def write_msrs_folders(root: Path, names_by_split, ir_as_rgb=False):
    """Layout (a): <root>/{train,test}/{vi,ir,Segmentation_labels}/<name>.png."""
    rng = np.random.default_rng(1)
    for split, names in names_by_split.items():
        for sub in ("vi", "ir", "Segmentation_labels"):
            (root / split / sub).mkdir(parents=True)
        for name in names:
            vis, ir, label = _msrs_pair(rng)
            Image.fromarray(vis).save(root / split / "vi" / f"{name}.png")
            Image.fromarray(np.repeat(ir[..., None], 3, 2) if ir_as_rgb else ir).save(
                root / split / "ir" / f"{name}.png")
            Image.fromarray(label).save(root / split / "Segmentation_labels" / f"{name}.png")
    return root


def write_msrs_lists(root: Path, names_by_split):
    """Layout (b): <root>/{Visible,Infrared,Label}/<name>.png, <root>/split/{train,test}.txt."""
    rng = np.random.default_rng(2)
    for sub in ("Visible", "Infrared", "Label", "split"):
        (root / sub).mkdir(parents=True)
    for split, names in names_by_split.items():
        for name in names:
            vis, ir, label = _msrs_pair(rng)
            Image.fromarray(vis).save(root / "Visible" / f"{name}.png")
            Image.fromarray(ir).save(root / "Infrared" / f"{name}.png")
            Image.fromarray(label).save(root / "Label" / f"{name}.png")
        (root / "split" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


NAMES = {"train": ["00001D", "00002N", "00003D"], "test": ["00004D", "00005N"]}


@pytest.mark.parametrize("layout", ["folders", "folders_rgb_ir", "lists"])
def test_msrs_layouts(tmp_path, layout):
    if layout == "lists":
        root = write_msrs_lists(tmp_path / "msrs", NAMES)
        vis_path, ir_path = root / "Visible" / "00005N.png", root / "Infrared" / "00005N.png"
    else:
        root = write_msrs_folders(tmp_path / "msrs", NAMES, ir_as_rgb=layout == "folders_rgb_ir")
        vis_path, ir_path = root / "test" / "vi" / "00005N.png", root / "test" / "ir" / "00005N.png"
    test = MSRSDataset(root, "test", train=False)
    assert [s.name for s in test.samples] == NAMES["test"]
    item = test[1]
    assert item["name"] == "00005N" and item["is_night"]
    assert item["vis"].shape == item["ir"].shape == (3, 40, 56) and item["label"].shape == (40, 56)
    np.testing.assert_allclose(denorm_vis(item["vis"]), np.array(Image.open(vis_path)), atol=1e-3)
    np.testing.assert_allclose(denorm_ir(item["ir"]), np.array(Image.open(ir_path).convert("L")),
                               atol=1e-3)
    assert [s.name for s in MSRSDataset(root, "test_night", train=False).samples] == ["00005N"]
    train = build_seg_dataset("msrs", root, "train", train=True, crop=(32, 32))
    assert len(train) == 3 and train[0]["vis"].shape == (3, 32, 32)


@pytest.mark.parametrize("layout", ["folders", "lists"])
def test_msrs_held_out_validation_split(tmp_path, layout):
    """MSRS ships train and test only; a validation split of one's own is a folder (a) or a
    list (b), and a missing one is refused with the way to make it."""
    names = {"train_rest": ["00001D", "00003D"], "val": ["00002N"], "test": NAMES["test"]}
    write = write_msrs_lists if layout == "lists" else write_msrs_folders
    root = write(tmp_path / "msrs", names)
    val = build_seg_dataset("msrs", root, "val", train=False)
    assert [s.name for s in val.samples] == ["00002N"] and val[0]["is_night"]
    both = MSRSDataset(root, "train_rest+val", train=False)
    assert [s.name for s in both.samples] == ["00001D", "00003D", "00002N"]
    night = MSRSDataset(root, "val+test_night", train=False)
    assert [s.name for s in night.samples] == ["00002N", "00005N"]
    missing = "split/holdout.txt not found.*list its names" if layout == "lists" else \
        "holdout not found.*move some training pairs into .*holdout/vi"
    with pytest.raises(FileNotFoundError, match=missing):
        MSRSDataset(root, "holdout")
    with pytest.raises(ValueError, match="expected a list name such as train, test"):
        MSRSDataset(root, "val/../train")


def test_msrs_bad_data_names_the_file(tmp_path):
    root = write_msrs_folders(tmp_path / "a", NAMES)
    (root / "test" / "ir" / "00004D.png").unlink()
    with pytest.raises(FileNotFoundError, match="ir/00004D.png"):
        MSRSDataset(root, "test")
    Image.new("L", (56, 40)).save(root / "train" / "vi" / "00002N.png")
    with pytest.raises(ValueError, match="vi/00002N.png.*RGB"):
        MSRSDataset(root, "train")
    # a badly named file is reported in the folder that holds it
    Image.new("L", (56, 40)).save(root / "test" / "Segmentation_labels" / "00004D_vis.png")
    with pytest.raises(ValueError, match=r"test/Segmentation_labels: name '00004D_vis'"):
        MSRSDataset(root, "test")

    root = write_msrs_lists(tmp_path / "b", NAMES)
    Image.new("L", (50, 40)).save(root / "Infrared" / "00001D.png")
    with pytest.raises(ValueError, match="Infrared/00001D.png.*differs"):
        MSRSDataset(root, "train")
    (root / "split" / "test.txt").write_text("")
    with pytest.raises(ValueError, match="test.txt is empty"):
        MSRSDataset(root, "test")
    with pytest.raises(FileNotFoundError, match="neither MSRS layout"):
        MSRSDataset(tmp_path / "nowhere", "test")


def test_flipped_copies_of_validation_images_in_training_are_warned_about(tmp_path):
    """A training list holding `<val name>_flip` trains on a mirror image of a validation image:
    best.pt would be chosen on training data (the run's overlap warning names it)."""
    from ivt.trainer import overlap_warning
    root = tmp_path / "mf"
    shutil.copytree(MFNET_SAMPLE, root)
    for sub in ("images", "labels"):
        for name in ("00706N", "00105D"):
            shutil.copy(root / sub / f"{name}.png", root / sub / f"{name}_flip.png")
    (root / "train.txt").write_text("00105D\n00105D_flip\n00704N\n")
    val = MFNetDataset(root, "val", train=False)
    assert overlap_warning(MFNetDataset(root, "train", train=False), val) is None
    (root / "train.txt").write_text("00105D\n00704N\n00706N_flip\n")
    said = overlap_warning(MFNetDataset(root, "train", train=False), val)
    assert said.startswith("warning: 1 of the 1 validation images") and "00706N.png" in said


def test_mfnet_sample_copy_loads_with_flip_names(tmp_path):
    root = tmp_path / "mf"
    shutil.copytree(MFNET_SAMPLE, root)
    for sub in ("images", "labels"):
        shutil.copy(root / sub / "00105D.png", root / sub / "00105D_flip.png")
    (root / "train.txt").write_text("00105D\n00105D_flip\n")
    ds = build_seg_dataset("mfnet", root, "train", train=True, crop=(64, 64))
    assert ds[1]["name"] == "00105D_flip" and not ds[1]["is_night"]


@pytest.mark.parametrize("scale", [0.73, 1.37])
def test_rescaled_labels_keep_their_class_ids(scale):
    """Labels are resampled by nearest neighbour: a rescaled label holds only the ids it had,
    each in about its share of the image, and 255 only where the crop pads."""
    rng = np.random.default_rng(0)
    label = np.zeros((40, 60), np.uint8)
    label[10:30, 15:45] = 8
    label[20:25, 5:50] = 3
    vis = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    t = TrainTransform(crop=(84, 84), scale_range=(scale, scale), flip_prob=0.0, jitter=False)
    out = t(vis, ir, label, np.random.default_rng(1))["label"].numpy()
    h, w = round(40 * scale), round(60 * scale)
    assert set(np.unique(out[:h, :w])) == {0, 3, 8} and (out[h:] == 255).all()
    for k in (0, 3, 8):
        assert (out[:h, :w] == k).mean() == pytest.approx((label == k).mean(), abs=0.02), k


def test_normalisation_constants_are_the_published_ones():
    """timm's / torchvision's ImageNet statistics in RGB order, mean (0.485, 0.456, 0.406) and
    std (0.229, 0.224, 0.225), and the thermal scaling of docs/training.md (mean 0.5, std 0.25),
    as literals: a red pixel and a black and a white thermal pixel."""
    from ivt.data.transforms import thermal_to_tensor, visible_to_tensor
    red = visible_to_tensor(np.array([[[255, 0, 0]]], np.uint8))[:, 0, 0]
    torch.testing.assert_close(red, torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224,
                                                  -0.406 / 0.225]))
    torch.testing.assert_close(thermal_to_tensor(np.array([[0, 255]], np.uint8))[0],
                               torch.tensor([[-2.0, 2.0]]))


def test_random_crop_draws_every_offset():
    """mmseg's RandomCrop: offset = randint(0, H - h + 1), the last offset included: a 12-row
    label whose row r holds r, cropped to 8 rows at scale 1, starts at each of rows 0..4 over 200
    draws (a value missed by chance: (4/5)^200)."""
    t = TrainTransform(crop=(8, 6), scale_range=(1.0, 1.0), flip_prob=0.0, jitter=False)
    label = np.repeat(np.arange(12, dtype=np.uint8)[:, None], 6, 1)
    vis, ir = np.zeros((12, 6, 3), np.uint8), np.zeros((12, 6), np.uint8)
    starts = {int(t(vis, ir, label, np.random.default_rng(s))["label"][0, 0]) for s in range(200)}
    assert starts == {0, 1, 2, 3, 4}


def test_thermal_image_is_scaled_bilinearly():
    """Both images are resized bilinearly (mmseg's RandomResize), only the label by nearest: a
    2 x 2 thermal image of columns 0 and 255 at scale 2 samples x = -0.25, 0.25, 0.75, 1.25
    (half-pixel centres, clamped): 0, 63.75, 191.25, 255, rounded to 0, 64, 191, 255."""
    t = TrainTransform(crop=(4, 4), scale_range=(2.0, 2.0), flip_prob=0.0, jitter=False)
    ir = np.array([[0, 255], [0, 255]], np.uint8)
    item = t(np.zeros((2, 2, 3), np.uint8), ir, np.zeros((2, 2), np.uint8),
             np.random.default_rng(0))
    row = ((item["ir"][0, 0] * THERMAL_STD + THERMAL_MEAN) * 255).round().tolist()
    assert row == [0, 64, 191, 255]


def test_pad_black_pads_only_the_side_that_is_no_multiple():
    from ivt.data.transforms import IMAGENET, pad_black
    vis, ir = pad_black(torch.zeros(1, 3, 32, 40), torch.zeros(1, 3, 32, 40), 16, IMAGENET)
    assert vis.shape == ir.shape == (1, 3, 32, 48)


def test_labels_are_checked_at_the_class_boundary_and_in_both_sides(tmp_path):
    """spec/data.md: a pixel is a class id 0..8 or 255 (ignored); 9 is refused, and so is a
    label one pixel wider than its image."""
    from ivt.data.mfnet import check_label
    path = tmp_path / "label.png"
    label = np.zeros((48, 64), np.uint8)
    label[0, :3] = (8, 255, 9)
    Image.fromarray(label).save(path)
    with pytest.raises(ValueError, match=r"label values \[9\]"):
        check_label(path, (48, 64))
    Image.fromarray(np.zeros((48, 65), np.uint8)).save(path)
    with pytest.raises(ValueError, match="label size"):
        check_label(path, (48, 64))


def test_msrs_test_folders_refuse_flipped_copies(tmp_path):
    """spec/data.md: `_flip` copies must never leak into a test list (layout (a) as (b))."""
    root = write_msrs_folders(tmp_path / "msrs", {"train": ["00001D", "00001D_flip"],
                                                  "test": ["00004D", "00004D_flip"]})
    assert len(MSRSDataset(root, "train", train=False).samples) == 2
    with pytest.raises(ValueError, match="00004D_flip"):
        MSRSDataset(root, "test", train=False)


def test_high_bit_depth_thermal_rule_on_32_bit_integers_and_equal_percentiles(tmp_path):
    """The 1st..99th percentile range onto 0..255 also for a 32-bit integer TIFF (mode I): of
    0, 1000, 2000, 3000, numpy's linear percentiles are 30 and 2970, so (v - 30) * 255 / 2940
    rounds to 0, 84, 171, 255; where both percentiles are equal, min..max is used instead."""
    from ivt.data.io import open_thermal
    path = tmp_path / "t.tif"
    Image.fromarray(np.array([[0, 1000], [2000, 3000]], np.int32)).save(path)
    assert Image.open(path).mode == "I"
    assert np.asarray(open_thermal(path)).tolist() == [[0, 84], [171, 255]]
    flat = np.full((100, 100), 1000, np.uint16)
    flat[3, 4] = 5000
    Image.fromarray(flat).save(tmp_path / "flat.png")
    out = np.asarray(open_thermal(tmp_path / "flat.png"))
    assert out[3, 4] == 255 and int(out.sum()) == 255


class ScriptedRng:
    """random() returns the scripted values in turn; uniform(a, b) returns a."""

    def __init__(self, randoms):
        self.randoms = iter(randoms)

    def random(self):
        return next(self.randoms)

    def uniform(self, a, b):
        return a


def test_photometric_jitter_saturation_and_contrast_by_hand():
    """Saturation alone blends with the ITU-R BT.601 grey (0.299, 0.587, 0.114) at factor 0.5:
    pure red (grey 76.245) becomes (165.6225, 38.1225, 38.1225). Contrast alone scales about the
    mean intensity: 100 and 200 (mean 150) at 0.5 become 125 and 175."""
    from ivt.data.transforms import photometric_jitter
    red = np.array([[[255, 0, 0]]], np.uint8)
    out = photometric_jitter(red, ScriptedRng([0.9, 0.9, 0.1, 0.9]))
    np.testing.assert_allclose(out[0, 0], [165.6225, 38.1225, 38.1225], rtol=1e-5)
    grey = np.array([[[100] * 3, [200] * 3]], np.uint8)
    out = photometric_jitter(grey, ScriptedRng([0.9, 0.1, 0.9, 0.9]))
    np.testing.assert_allclose(out[0, :, 0], [125, 175], rtol=1e-6)


def test_segmentation_scales_by_mmsegs_ratio_range():
    assert TrainTransform().scale_range == (0.5, 2.0)          # mmseg's ratio_range


def test_random_window_aspect_and_uniform_position():
    """Sides s * sqrt(r) and s / sqrt(r) of the image's; x0 uniform on [0, W - w]: at s = 0.5
    and r = 1, over 500 draws, the largest x0 is near 50 and the mean near 25 (standard error
    50 / sqrt(12 * 500) = 0.65)."""
    from ivt.data.geometry import random_window
    x0, y0, x1, y1 = random_window(np.random.default_rng(0), (100, 100), (0.5, 0.5), (2.0, 2.0))
    assert (x1 - x0, y1 - y0) == pytest.approx((50 * 2 ** 0.5, 50 / 2 ** 0.5))
    starts = [random_window(np.random.default_rng(s), (100, 100), (0.5, 0.5), (1.0, 1.0))[0]
              for s in range(500)]
    assert max(starts) > 45 and abs(np.mean(starts) - 25) < 3
