"""VT5000 / VT1000 / VT821 loader (ivt/data/vt.py) on fixtures written into tmp_path in the exact
released layouts: VT5000/{Train,Test}/{RGB,T,GT} and VT821/{RGB,T,GT}, RGB and T as .jpg, GT as
.png or .jpg. Each stem draws its own shape at its own place, so a mispaired file is visible."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance
from scipy.ndimage import binary_dilation, binary_erosion, median_filter

from ivt.data import VTDataset, list_vt_stems, split_train_val
from ivt.data.io import BadImageError
from ivt.data.synthetic import write_vt, write_vt_set
from ivt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, THERMAL_MEAN, THERMAL_STD
from ivt.data.vt import SODReleaseTransform, SODTrainTransform

H, W = 48, 64


def shape_mask(k: int, h: int = H, w: int = W) -> np.ndarray:
    """An asymmetric 'L' (a flip or rotation changes it) whose position depends on k."""
    m = np.zeros((h, w), bool)
    y0, x0 = 6 + (k * 5) % 14, 4 + (k * 11) % 30
    m[y0:y0 + 24, x0:x0 + 8] = True          # vertical bar
    m[y0 + 16:y0 + 24, x0:x0 + 22] = True    # foot to the right
    return m


def ironbow(gray: np.ndarray) -> np.ndarray:
    """A colour map like the datasets' (every channel rises with heat)."""
    x = gray.astype(np.float64) / 255
    rgb = np.stack([np.clip(2 * x, 0, 1), np.clip(2 * x - 0.7, 0, 1), x], -1)
    return (rgb * 255).astype(np.uint8)


def write_triple(folder: Path, stem: str, k: int, gt_ext: str = ".png",
                 size=(H, W)) -> np.ndarray:
    """RGB (.jpg, a green shape on dark blue), T (.jpg, colour-mapped hot shape), GT (0/255)."""
    m = shape_mask(k, *size)
    rgb = np.zeros(size + (3,), np.uint8)
    rgb[...] = (10, 20, 60)
    rgb[m] = (40, 230, 90)
    t = ironbow(np.where(m, 230, 40).astype(np.uint8))
    for sub in ("RGB", "T", "GT"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(folder / "RGB" / f"{stem}.jpg", quality=95)
    Image.fromarray(t).save(folder / "T" / f"{stem}.jpg", quality=95)
    gt = np.where(m, 255, 0).astype(np.uint8)
    Image.fromarray(gt).save(folder / "GT" / f"{stem}{gt_ext}", **({"quality": 95}
                                                                    if gt_ext == ".jpg" else {}))
    return gt


# Non-sequential names, written in a different order in each folder (pairing must use stems).
STEMS = {"1": 0, "10": 1, "2": 2, "img_0007": 3, "b-3": 4}


def write_vt5000(root: Path, gt_jpg=("10",)) -> dict:
    gts = {}
    items = list(STEMS.items())
    for seed, part in enumerate(("Train", "Test")):
        folder = root / "VT5000" / part
        for j in np.random.default_rng(seed).permutation(len(items)):
            stem, k = items[j]
            gts[part, stem] = write_triple(folder, stem, k, ".jpg" if stem in gt_jpg else ".png")
    (root / "VT5000" / "Train" / "GT" / "Thumbs.db").write_bytes(b"not an image")
    return gts


def denorm_vis_gray(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((x * std + mean) * 255).numpy()
    return rgb.mean(0)


def denorm_ir(x: torch.Tensor) -> np.ndarray:
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])   # gray repeated to 3 channels
    return ((x[0] * THERMAL_STD + THERMAL_MEAN) * 255).numpy()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


# ---------------------------------------------------------------- layout and pairing

def test_vt5000_pairs_by_stem_in_natural_order(tmp_path):
    gts = write_vt5000(tmp_path)
    for part in ("Train", "Test"):
        root = tmp_path / "VT5000" / part
        assert list_vt_stems(root) == ["1", "2", "10", "b-3", "img_0007"]
        ds = VTDataset(root, train=False, size=32)
        assert ds.stems == list_vt_stems(root) and len(ds) == 5
        for i, stem in enumerate(ds.stems):
            vis, ir, gt = ds.read_images(i)
            assert vis.shape == (H, W, 3) and ir.shape == gt.shape == (H, W)
            assert vis.dtype == ir.dtype == gt.dtype == np.uint8
            m = shape_mask(STEMS[stem])
            # every image of the triple shows this stem's shape
            assert iou(gt > 128, m) == 1.0
            assert iou(vis[..., 1] > 128, m) > 0.97 and iou(ir > 128, m) > 0.97
            item = ds[i]
            assert item["name"] == stem
            np.testing.assert_array_equal(item["gt"].numpy(),
                                          np.where(gts[part, stem] > 128, 255, 0))


def test_missing_t_file_is_named_with_its_folder(tmp_path):
    write_vt5000(tmp_path)
    vt821 = tmp_path / "VT821"
    for stem, k in STEMS.items():
        write_triple(vt821, stem, k)
    (vt821 / "T" / "img_0007.jpg").unlink()
    with pytest.raises(ValueError, match=r"VT821/T: no file for stem\(s\) img_0007"):
        list_vt_stems(vt821)
    with pytest.raises(ValueError, match="img_0007"):
        VTDataset(vt821, train=False)
    # stems missing from several folders: all named, each with its folder
    train = tmp_path / "VT5000" / "Train"
    (train / "RGB" / "2.jpg").unlink()
    (train / "GT" / "b-3.png").unlink()
    with pytest.raises(ValueError) as e:
        VTDataset(train, train=True)
    assert "Train/RGB: no file for stem(s) 2" in str(e.value)
    assert "Train/GT: no file for stem(s) b-3" in str(e.value)
    # a stem list that avoids the missing files works; one naming a missing stem does not
    assert VTDataset(train, train=False, stems=["1", "10"]).stems == ["1", "10"]
    with pytest.raises(ValueError, match=r"RGB: no file for stem\(s\) 2"):
        VTDataset(train, train=False, stems=["1", "2"])


def test_vt821_jpg_gt_is_binarised_above_128(tmp_path):
    vt821 = tmp_path / "VT821"
    write_triple(vt821, "5", 0, gt_ext=".jpg")
    write_triple(vt821, "6", 1)
    levels = np.array([0, 100, 128, 129, 200, 255], np.uint8)
    gt = np.repeat(np.repeat(levels[None], H, 0), W // len(levels) + 1, 1)[:, :W]
    Image.fromarray(gt).save(vt821 / "GT" / "6.png")
    ds = VTDataset(vt821, train=False, size=32)
    assert ds.stems == ["5", "6"]
    expected = np.where(gt > 128, 255, 0)
    np.testing.assert_array_equal(ds.read_images(1)[2], expected)
    np.testing.assert_array_equal(ds[1]["gt"].numpy(), expected)
    jpg = np.asarray(Image.open(vt821 / "GT" / "5.jpg").convert("L"))
    assert set(np.unique(jpg)) - {0, 255}                 # JPEG GT: not exactly 0/255 on disk
    assert set(np.unique(ds[0]["gt"].numpy())) == {0, 255}
    np.testing.assert_array_equal(ds[0]["gt"].numpy(), np.where(jpg > 128, 255, 0))
    # training masks are 0/1 as well with --augment standard
    train = VTDataset(vt821, train=True, size=32, augment="standard")
    assert set(np.unique(train[1]["mask"].numpy())) <= {0.0, 1.0}


def test_duplicate_stem_and_size_mismatch_are_errors(tmp_path):
    vt = tmp_path / "VT1000"
    write_triple(vt, "1", 0)
    write_triple(vt, "2", 1)
    Image.new("RGB", (W, H)).save(vt / "RGB" / "1.png")
    with pytest.raises(ValueError, match=r"stem '1' appears twice \(1.jpg and 1.png\)"):
        VTDataset(vt, train=False)
    (vt / "RGB" / "1.png").unlink()
    Image.new("L", (W + 2, H)).save(vt / "GT" / "2.png")
    with pytest.raises(ValueError, match=r"GT/2.png \(H, W\) = \(48, 66\)"):
        VTDataset(vt, train=False)
    ds = VTDataset(vt, train=False, validate=False)        # header checks skipped ...
    with pytest.raises(ValueError, match="sizes differ"):  # ... but reading still refuses
        ds[1]


def test_verify_names_a_truncated_file(tmp_path):
    vt = tmp_path / "VT821"
    write_triple(vt, "1", 0)
    data = (vt / "T" / "1.jpg").read_bytes()
    (vt / "T" / "1.jpg").write_bytes(data[: len(data) // 2])
    ds = VTDataset(vt, train=False)                        # headers still read
    with pytest.raises(BadImageError, match=r"VT821/T/1.jpg"):
        ds.verify()
    with pytest.raises(BadImageError, match=r"VT821/T/1.jpg"):
        VTDataset(vt, train=False, verify=True)


def test_thermal_is_pil_grayscale_repeated(tmp_path):
    vt = tmp_path / "VT821"
    write_triple(vt, "1", 0)
    rgb = np.asarray(Image.open(vt / "T" / "1.jpg")).astype(np.float64)
    ds = VTDataset(vt, train=False, size=32)
    _, ir, _ = ds.read_images(0)
    # ITU-R 601-2 luma, as Pillow's convert('L') defines it
    ref = rgb[..., 0] * 299 / 1000 + rgb[..., 1] * 587 / 1000 + rgb[..., 2] * 114 / 1000
    assert np.abs(ir - ref).max() <= 1.0
    item = ds[0]
    assert item["ir"].shape == item["vis"].shape == (3, 32, 32)
    denorm_ir(item["ir"])


# ---------------------------------------------------------------- items and augmentation

def test_eval_items_are_resized_inputs_and_gt_at_its_own_size(tmp_path):
    vt = tmp_path / "VT821"
    write_triple(vt, "a", 0, size=(40, 72))
    write_triple(vt, "b", 1)
    ds = VTDataset(vt, train=False, size=24)
    for i, (h, w) in enumerate([(40, 72), (H, W)]):
        item = ds[i]
        assert set(item) == {"vis", "ir", "gt", "name"}
        assert item["vis"].shape == item["ir"].shape == (3, 24, 24)
        assert item["vis"].dtype == torch.float32
        assert item["gt"].shape == (h, w) and item["gt"].dtype == torch.uint8
    ref = np.asarray(Image.open(vt / "RGB" / "a.jpg").resize((24, 24), Image.BILINEAR))
    np.testing.assert_allclose(denorm_vis_gray(ds[0]["vis"]), ref.mean(-1), atol=1e-3)


@pytest.mark.parametrize("augment", ["release", "standard"])
def test_augmentation_keeps_rgb_t_and_gt_aligned(tmp_path, augment):
    vt = tmp_path / "VT5000" / "Train"
    for stem, k in STEMS.items():
        write_triple(vt, stem, k)
    ds = VTDataset(vt, train=True, size=40, seed=1, augment=augment)
    masks = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            item = ds[i]
            assert set(item) == {"vis", "ir", "mask", "name"}
            assert item["vis"].shape == item["ir"].shape == (3, 40, 40)
            assert item["mask"].shape == (1, 40, 40) and item["mask"].dtype == torch.float32
            mask = item["mask"][0].numpy()
            if augment == "release":              # without the GT's salt-and-pepper specks
                mask = median_filter(mask, size=3)
            mask = mask > 0.5
            ir = denorm_ir(item["ir"]) > 135                # shape 230, background 40, fill 0
            vis = denorm_vis_gray(item["vis"])              # jitter moves the levels:
            inside, outside = binary_erosion(mask), ~binary_dilation(mask)
            vis = vis > (np.median(vis[inside]) + np.median(vis[outside])) / 2
            assert mask.sum() > 50
            for other in (ir, vis):   # equal up to a one-pixel band along the boundary
                assert not (binary_erosion(mask) & ~other).any(), (epoch, i)
                assert not (binary_erosion(other) & ~mask).any(), (epoch, i)
            masks.append(mask)
    assert len({m.tobytes() for m in masks}) == len(masks)  # geometry differs every time

    ds.set_epoch(2)
    a, b = ds[3], ds[3]
    assert all(torch.equal(a[k], b[k]) for k in ("vis", "ir", "mask"))
    ds.set_epoch(3)
    assert not torch.equal(a["mask"], ds[3]["mask"])


def test_flip_only_transform_matches_a_mirrored_resize(tmp_path):
    vt = tmp_path / "VT821"
    gt = write_triple(vt, "1", 2)
    ds = VTDataset(vt, train=True, size=32)
    ds.transform = SODTrainTransform(32, flip_prob=1.0, rotate_deg=0.0, crop_scale=(1.0, 1.0),
                                     aspect=(1.0, 1.0), jitter=False)
    ref = np.asarray(Image.fromarray(gt).resize((32, 32), Image.NEAREST))[:, ::-1] > 128
    np.testing.assert_array_equal(ds[0]["mask"][0].numpy() > 0.5, ref)
    # and the L's foot now points left: its lowest rows extend left of the bar
    cols = np.nonzero(ref[ref.any(1).nonzero()[0].max()])[0]
    bar = np.nonzero(ref[ref.any(1).nonzero()[0].min()])[0]
    assert cols.min() < bar.min() and cols.max() == bar.max()


def release_reference(vis, ir, gt, rng, size, log):
    """The authors' SOD augmentation (SOD-IV-tuning/data.py) written out step by step with PIL
    and numpy, the release's Python `random` / `np.random` draws taken from `rng` in the order
    `SODReleaseTransform` documents; `log` records each draw. -> vis (S, S, 3), ir (S, S) uint8,
    mask (S, S) float32."""
    if rng.integers(0, 2) == 1:                          # cv_random_flip: randint(0, 1) == 1
        vis, ir, gt = (im.transpose(Image.FLIP_LEFT_RIGHT) for im in (vis, ir, gt))
        log["flip"] += 1
    width, height = vis.size                             # randomCrop, border 30
    cw = rng.integers(width - 30, width)
    ch = rng.integers(height - 30, height)
    log["crop"].append((int(cw), int(ch)))
    region = ((width - cw) // 2, (height - ch) // 2, (width + cw) // 2, (height + ch) // 2)
    vis, ir, gt = (im.crop(region) for im in (vis, ir, gt))
    if rng.random() > 0.8:                               # randomRotation
        angle = rng.integers(-15, 15)
        log["angle"].append(int(angle))
        vis, ir, gt = (im.rotate(int(angle), Image.BICUBIC) for im in (vis, ir, gt))
    factors = [rng.integers(5, 16) / 10.0, rng.integers(5, 16) / 10.0,      # colorEnhance
               rng.integers(0, 21) / 10.0, rng.integers(0, 31) / 10.0]
    log["factors"].append(factors)
    vis = ImageEnhance.Brightness(vis).enhance(factors[0])
    vis = ImageEnhance.Contrast(vis).enhance(factors[1])
    vis = ImageEnhance.Color(vis).enhance(factors[2])
    vis = ImageEnhance.Sharpness(vis).enhance(factors[3])
    g = np.array(gt)                                     # randomPeper
    count = int(0.0015 * g.shape[0] * g.shape[1])
    xs = rng.integers(0, g.shape[0], count)
    ys = rng.integers(0, g.shape[1], count)
    salt = rng.integers(0, 2, count)
    for i in range(count):
        g[xs[i], ys[i]] = 255 if salt[i] == 1 else 0
    log["pepper"].append(count)
    vis, ir, gt = (im.resize((size, size), Image.BILINEAR) for im in (vis, ir, Image.fromarray(g)))
    return np.asarray(vis), np.asarray(ir), np.asarray(gt, np.float32) / 255.0


def test_release_augmentation_equals_a_step_by_step_reference(tmp_path):
    """`--augment release` (the default) against `release_reference`: RGB, T and the soft GT
    equal for 60 seeds that take every branch (flip, rotation, salt-and-pepper), on a 150 x 200
    image (crop windows 120-149 high, 170-199 wide)."""
    vt = tmp_path / "VT821"
    write_triple(vt, "1", 3, size=(50, 67))
    for sub in ("RGB", "T", "GT"):                       # the triple, 3x larger: 150 x 200
        path = next((vt / sub).iterdir())
        a = np.asarray(Image.open(path))
        a = np.repeat(np.repeat(a, 3, axis=0), 3, axis=1)[:, :200]
        Image.fromarray(a).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))
    gt = a
    ds = VTDataset(vt, train=True, size=64, seed=5)
    assert isinstance(ds.transform, SODReleaseTransform)
    vis_img, ir_img, gt_img = ds._open(0)
    assert ir_img.mode == "L" and gt_img.mode == "L"
    log = {"flip": 0, "crop": [], "angle": [], "factors": [], "pepper": []}
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    for epoch in range(60):
        ds.set_epoch(epoch)
        item = ds[0]
        vis, ir, mask = release_reference(vis_img, ir_img, gt_img,
                                          np.random.default_rng([5, epoch, 0]), 64, log)
        want_vis = ((vis / 255.0 - mean) / std).transpose(2, 0, 1)
        np.testing.assert_allclose(item["vis"].numpy(), want_vis, rtol=0, atol=1e-5)
        want_ir = (ir / 255.0 - THERMAL_MEAN) / THERMAL_STD
        for c in range(3):
            np.testing.assert_allclose(item["ir"][c].numpy(), want_ir, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(item["mask"][0].numpy(), mask)
        m = item["mask"][0].numpy()
        assert 0.0 <= m.min() and m.max() <= 1.0
        assert ((m > 0.02) & (m < 0.98)).sum() > 20          # soft along the edges ...
        inner = m > 0.5                                      # ... and the object in place
        assert 0.5 * inner.sum() < (gt > 128).mean() * 64 * 64 < 2 * inner.sum()
    assert 0 < log["flip"] < 60 and 0 < len(log["angle"]) < 60
    assert all(170 <= w < 200 and 120 <= h < 150 for w, h in log["crop"])
    assert all(n == int(0.0015 * h * w) and n >= 30 for n, (w, h) in zip(log["pepper"],
                                                                         log["crop"]))


def test_release_augmentation_statistics():
    """Over 2000 items: flip in half, rotation in a fifth, integer angles over [-15, 14],
    crop sides over [W - 30, W), the enhancement factors on their grids; measured by watching
    the PIL calls the transform makes."""
    calls = {"crop": [], "rotate": [], "flip": 0, "enhance": []}
    crop, rotate, transpose = Image.Image.crop, Image.Image.rotate, Image.Image.transpose
    enhance = ImageEnhance._Enhance.enhance

    def spy_crop(im, box=None):
        calls["crop"].append(box)
        return crop(im, box)

    def spy_rotate(im, angle, *args, **kwargs):
        calls["rotate"].append((angle, kwargs.get("resample", args[0] if args else None)))
        return rotate(im, angle, *args, **kwargs)

    def spy_transpose(im, method):
        calls["flip"] += method == Image.Transpose.FLIP_LEFT_RIGHT
        return transpose(im, method)

    def spy_enhance(self, factor):
        calls["enhance"].append((type(self).__name__, factor))
        return enhance(self, factor)

    transform = SODReleaseTransform(size=8)
    W, H = 44, 36
    vis, ir, gt = Image.new("RGB", (W, H), (90, 40, 20)), Image.new("L", (W, H), 100), \
        Image.new("L", (W, H), 0)
    n = 2000
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "crop", spy_crop)
        mp.setattr(Image.Image, "rotate", spy_rotate)
        mp.setattr(Image.Image, "transpose", spy_transpose)
        mp.setattr(ImageEnhance._Enhance, "enhance", spy_enhance)
        rng = np.random.default_rng(0)
        for _ in range(n):
            transform(vis, ir, gt, rng)
    assert len(calls["crop"]) == 3 * n                  # RGB, T, GT: one window each
    boxes = calls["crop"][::3]
    assert all(calls["crop"][3 * i:3 * i + 3] == [b] * 3 for i, b in enumerate(boxes))
    widths = {x1 - x0 for x0, _, x1, _ in boxes}
    heights = {y1 - y0 for _, y0, _, y1 in boxes}
    assert widths == set(range(W - 30, W)) and heights == set(range(H - 30, H))
    for x0, y0, x1, y1 in boxes:                        # centred
        assert x0 == (W - (x1 - x0)) // 2 and y0 == (H - (y1 - y0)) // 2
    assert calls["flip"] % 3 == 0 and abs(calls["flip"] / 3 / n - 0.5) < 0.04
    rotations = calls["rotate"][::3]
    assert len(calls["rotate"]) == 3 * len(rotations)
    assert abs(len(rotations) / n - 0.2) < 0.03
    assert {a for a, _ in rotations} == set(range(-15, 15))
    assert {r for _, r in calls["rotate"]} == {Image.BICUBIC}
    kinds = [k for k, _ in calls["enhance"]]
    assert kinds == ["Brightness", "Contrast", "Color", "Sharpness"] * n
    grids = {"Brightness": range(5, 16), "Contrast": range(5, 16), "Color": range(0, 21),
             "Sharpness": range(0, 31)}
    for kind, grid in grids.items():
        seen = {round(f * 10) for k, f in calls["enhance"] if k == kind}
        assert seen == set(grid), kind
        assert all(f * 10 == round(f * 10) for k, f in calls["enhance"] if k == kind)


def test_standard_augmentation_keeps_binary_masks(tmp_path):
    vt = tmp_path / "VT821"
    write_triple(vt, "1", 0)
    write_triple(vt, "2", 1)
    standard = VTDataset(vt, train=True, size=40, augment="standard")
    assert isinstance(standard.transform, SODTrainTransform)
    release = VTDataset(vt, train=True, size=40)
    for epoch in range(3):
        for ds in (standard, release):
            ds.set_epoch(epoch)
        for i in range(2):
            assert set(np.unique(standard[i]["mask"].numpy())) == {0.0, 1.0}
            soft = release[i]["mask"].numpy()
            assert ((soft > 0) & (soft < 1)).any()
    with pytest.raises(ValueError, match="augment='flip'"):
        VTDataset(vt, train=True, augment="flip")


# ---------------------------------------------------------------- validation split

def test_split_train_val_is_seeded_sorted_and_disjoint():
    stems = [str(i) for i in range(1, 41)]
    train, val = split_train_val(stems[::-1], 0.1, seed=3)
    assert len(val) == 4 and len(train) == 36
    assert sorted(train + val, key=int) == stems
    assert train == sorted(train, key=int) and val == sorted(val, key=int)
    assert split_train_val(stems, 0.1, seed=3) == (train, val)
    assert split_train_val(stems, 4, seed=3) == (train, val)
    assert split_train_val(stems, 4, seed=4)[1] != val
    for bad in (0.0, 1.0, 0, 40):
        with pytest.raises(ValueError):
            split_train_val(stems, bad)
    with pytest.raises(ValueError, match="duplicates"):
        split_train_val(["1", "1", "2"], 1)


# ---------------------------------------------------------------- synthetic generator

def test_synthetic_vt_layout_loads(tmp_path):
    folders = write_vt(tmp_path, n_train=4, n_test=2, n_vt1000=2, n_vt821=2, size=(48, 64))
    for folder, stems in folders.items():
        ds = VTDataset(tmp_path / folder, train=folder == "VT5000/Train", size=32, verify=True)
        assert ds.stems == stems
        assert ds[0]["vis"].shape == (3, 32, 32)
    night = write_vt_set(tmp_path / "night", 3, size=(48, 64), night_fraction=1.0, first_index=101)
    day = write_vt_set(tmp_path / "day", 3, size=(48, 64), night_fraction=0.0, first_index=201)
    assert night == {"day": [], "night": ["00101", "00102", "00103"]}
    assert day == {"day": ["00201", "00202", "00203"], "night": []}
    dark = VTDataset(tmp_path / "night", train=False).read_images(0)[0].mean()
    bright = VTDataset(tmp_path / "day", train=False).read_images(0)[0].mean()
    assert dark < 0.3 * bright


def test_a_zero_one_mask_is_refused_not_read_as_empty(tmp_path):
    """The VT masks are 0/255 (foreground > 128): a 0/1 mask (common in re-distributed mask
    sets) would be scored as empty and train towards an all-black map; it is refused, naming the
    file. A JPEG mask of an empty image, whose noise has several low levels, is not."""
    vt = tmp_path / "VT1000"
    write_triple(vt, "1", 0)
    write_triple(vt, "2", 1)
    Image.fromarray(shape_mask(1).astype(np.uint8)).save(vt / "GT" / "2.png")
    ds = VTDataset(vt, train=False, size=32)
    ds[0]
    for read in (lambda: ds[1], lambda: ds.read_images(1),
                 lambda: VTDataset(vt, train=True, size=32)[1]):
        with pytest.raises(ValueError, match=r"GT/2.png: a ground-truth mask of values \[0, 1\]"):
            read()
    noise = np.zeros((H, W), np.uint8)
    noise[::7, ::5] = [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1][:len(range(0, W, 5))]
    Image.fromarray(noise).save(vt / "GT" / "2.png")
    assert ds[1]["gt"].max() == 0


# CLIP's published statistics (OpenAI CLIP, EVA02's pre-training), written out: a black pixel
# normalises to -mean / std per channel; a black thermal pixel to -0.5 / 0.25 = -2
CLIP_BLACK = (-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711)


def test_every_transform_normalises_with_the_backbones_statistics(tmp_path):
    """`norm` (CLIP's for EVA02) reaches the evaluation and both training transforms: on black
    images, which the release's brightness, contrast, colour and sharpness changes and its
    rotation (filled with 0) keep black, every visible pixel is CLIP's -mean / std."""
    from ivt.data.transforms import CLIP
    vt = tmp_path / "VT"
    for sub in ("RGB", "T", "GT"):
        (vt / sub).mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(vt / "RGB" / "a.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(vt / "T" / "a.png")
    Image.fromarray(shape_mask(0) * np.uint8(255)).save(vt / "GT" / "a.png")
    want = torch.tensor(CLIP_BLACK, dtype=torch.float32)[:, None, None].expand(3, 24, 24)
    for train, augment in ((False, "release"), (True, "release")):
        item = VTDataset(vt, train=train, size=24, norm=CLIP, augment=augment)[0]
        torch.testing.assert_close(item["vis"], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(item["ir"], torch.full((3, 24, 24), -2.0))
    # the standard augmentation's jitter brightens black: its transform holds CLIP's statistics
    assert VTDataset(vt, train=True, size=24, norm=CLIP, augment="standard").transform.norm == CLIP


def test_a_validation_fraction_rounds_to_the_nearest_count():
    train, val = split_train_val([str(i) for i in range(19)], 0.1)    # 1.9 images
    assert len(val) == 2 and len(train) == 17


def test_standard_rotation_is_uniform_in_both_directions(monkeypatch):
    """`--augment standard` rotates by an angle uniform in [-10, 10] degrees: over 200 draws
    both signs occur up to near the bound, none beyond it."""
    angles = []
    rotate = Image.Image.rotate

    def recorded(self, angle, *args, **kwargs):
        angles.append(angle)
        return rotate(self, angle, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "rotate", recorded)
    t = SODTrainTransform(size=8, flip_prob=0.0, jitter=False)
    vis, ir, gt = Image.new("RGB", (8, 8)), Image.new("L", (8, 8)), Image.new("L", (8, 8))
    for seed in range(200):
        t(vis, ir, gt, np.random.default_rng(seed))
    assert len(angles) == 600 and max(map(abs, angles)) <= 10
    assert min(angles) < -8 and max(angles) > 8
