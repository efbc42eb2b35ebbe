"""M3FD loader (ivt/data/m3fd.py) and the paired box transforms, on the real sample pair
(tests/data/m3fd_sample, boxes checked against values read by hand from its XML) and on small
fixtures written into tmp_path in the released layout (Vis/, Ir/, Annotation/*.xml) and in the
COCO-JSON form."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ivt.data import M3FD_CLASSES, M3FDDataset
from ivt.data.box_transforms import DetTrainTransform
from ivt.data.io import BadImageError
from ivt.data.m3fd import DEFAULT_SPLIT_DIR
from ivt.data.synthetic import write_m3fd
from ivt.data.transforms import THERMAL_MEAN, THERMAL_STD

SAMPLE = Path(__file__).parent / "data" / "m3fd_sample"
CAR, LAMP = M3FD_CLASSES.index("Car"), M3FD_CLASSES.index("Lamp")

# Annotation/00471.xml read by hand: (name, xmin, ymin, xmax, ymax), 1-based inclusive corners.
SAMPLE_OBJECTS = [("Car", 1, 380, 350, 578), ("Car", 274, 422, 620, 660),
                  ("Car", 313, 399, 416, 448), ("Car", 689, 456, 765, 519),
                  ("Car", 614, 456, 698, 513), ("Car", 776, 415, 1024, 613),
                  ("Lamp", 608, 432, 617, 447), ("Car", 568, 432, 620, 523)]


def split_dir(tmp_path: Path, **lists) -> Path:
    d = tmp_path / "splits"
    d.mkdir(exist_ok=True)
    for name, ids in lists.items():
        (d / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return d


def denorm_ir(x: torch.Tensor) -> np.ndarray:
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    return ((x[0] * THERMAL_STD + THERMAL_MEAN) * 255).numpy()


def voc_xml(objects, size=None, difficult=()) -> str:
    """A VOC file in M3FD's format: objects = [(name, xmin, ymin, xmax, ymax)], size (W, H)."""
    size_tag = (f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
                if size else "")
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(k in difficult)}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for k, (n, x0, y0, x1, y1) in enumerate(objects))
    return f"<annotation><folder>M3FD_Detection</folder>{size_tag}{objs}</annotation>"


def write_pair(root: Path, stem: str, objects, size=(64, 48), xml_size="same", difficult=(),
               ir_level=None) -> None:
    """Vis/Ir PNGs of `size` = (W, H) with each object's pixels painted (IR: 100 + 30 * k inside
    object k, 20 elsewhere; Vis: bright), and the XML."""
    for sub in ("Vis", "Ir", "Annotation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    w, h = size
    ir = np.full((h, w), 20, np.uint8)
    vis = np.full((h, w, 3), 30, np.uint8)
    for k, (_, x0, y0, x1, y1) in enumerate(objects):
        x0, y0, x1, y1 = (max(int(v), 0) for v in (x0, y0, x1, y1))
        ir[y0 - 1:y1, x0 - 1:x1] = 100 + 30 * k if ir_level is None else ir_level
        vis[y0 - 1:y1, x0 - 1:x1] = 220
    Image.fromarray(vis).save(root / "Vis" / f"{stem}.png")
    Image.fromarray(np.repeat(ir[..., None], 3, 2)).save(root / "Ir" / f"{stem}.png")
    xml_wh = size if xml_size == "same" else xml_size
    (root / "Annotation" / f"{stem}.xml").write_text(voc_xml(objects, xml_wh, difficult))


# ---------------------------------------------------------------- the real sample

def test_real_sample_boxes_match_the_xml_read_by_hand(tmp_path):
    ds = M3FDDataset(SAMPLE, split="one", split_dir=split_dir(tmp_path, one=["00471"]),
                     train=False, size=640)
    boxes, labels, ignore = ds.gt(0)
    # VOC 1-based inclusive corners -> 0-based continuous: (xmin - 1, ymin - 1, xmax, ymax)
    expected = np.array([[x0 - 1, y0 - 1, x1, y1] for _, x0, y0, x1, y1 in SAMPLE_OBJECTS])
    np.testing.assert_array_equal(boxes, expected)
    assert boxes[0].tolist() == [0, 379, 350, 578] and boxes[5].tolist() == [775, 414, 1024, 613]
    assert labels.tolist() == [CAR] * 6 + [LAMP, CAR] and labels.dtype == np.int64
    assert not ignore.any() and ds.warnings == []

    item = ds[0]
    assert item["orig_size"] == (768, 1024) and item["image_id"] == 471 and item["name"] == "00471"
    assert item["vis"].shape == item["ir"].shape == (3, 640, 640)
    # the whole image is resized to 640 x 640: x scales by 640/1024, y by 640/768
    np.testing.assert_allclose(item["boxes"][0].numpy(), [0.0, 379 * 640 / 768, 350 * 0.625,
                                                          578 * 640 / 768], rtol=1e-6)
    np.testing.assert_allclose(item["boxes"][6].numpy(), [607 * 0.625, 431 * 640 / 768,
                                                          617 * 0.625, 447 * 640 / 768], rtol=1e-6)
    assert item["labels"].tolist() == labels.tolist() and item["ignore"].dtype == torch.bool

    vis, ir = ds.read_images(0)
    assert vis.shape == (768, 1024, 3) and ir.shape == (768, 1024) and ir.dtype == np.uint8
    np.testing.assert_array_equal(ir, np.asarray(Image.open(SAMPLE / "Ir" / "00471.png"))[..., 0])


def test_repository_split_is_the_public_scene_aware_split():
    lists = {s: (DEFAULT_SPLIT_DIR / f"{s}.txt").read_text().split()
             for s in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [2727, 633, 840]
    everything = lists["train"] + lists["val"] + lists["test"]
    assert sorted(everything) == [f"{i:05d}" for i in range(4200)]
    assert (DEFAULT_SPLIT_DIR / "README.md").is_file()
    assert "00471" in lists["train"]
    # the default split names the files it lacks (the sample holds one image of 2727)
    with pytest.raises(FileNotFoundError, match=r"8178 file\(s\) of split 'train'.*Vis/00000"):
        M3FDDataset(SAMPLE)


def test_train_items_are_deterministic_and_collate(tmp_path):
    ds = M3FDDataset(SAMPLE, split="one", split_dir=split_dir(tmp_path, one=["00471"]),
                     train=True, size=96, seed=5)
    a, b = ds[0], ds[0]
    assert all(torch.equal(a[k], b[k]) for k in ("vis", "ir", "boxes", "labels", "ignore"))
    ds.set_epoch(1)
    c = ds[0]
    assert not torch.equal(a["vis"], c["vis"])
    batch = M3FDDataset.collate_fn([a, c])
    assert batch["vis"].shape == batch["ir"].shape == (2, 3, 96, 96)
    assert [t["name"] for t in batch["targets"]] == ["00471", "00471"]
    t = batch["targets"][1]
    assert set(t) == {"boxes", "labels", "ignore", "image_id", "orig_size", "name"}
    assert torch.equal(t["boxes"], c["boxes"]) and t["orig_size"] == (768, 1024)
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
    assert ((t["boxes"] >= 0) & (t["boxes"] <= 96)).all()


# ---------------------------------------------------------------- annotation problems

BAD = [("Car", 5, 5, 20, 20),            # 0 fine
       ("People", 30, 10, 25, 30),       # 1 degenerate: xmax < xmin
       ("Bus", 40, 20, 70, 40),          # 2 past the 64 x 48 image's right border: clipped
       ("Bicycle", 10, 25, 20, 40),      # 3 unknown class
       ("truck", 45, 5, 55, 15),         # 4 fine: class names are matched case-insensitively
       ("Lamp", 22, 30, 22, 45),         # 5 fine: a one-pixel-wide box (xmin == xmax)
       ("Car", 66, 10, 80, 20)]          # 6 wholly right of the image: no area inside it


def test_bad_boxes_are_reported_with_file_and_index_then_skipped(tmp_path, capsys):
    root = tmp_path / "m3fd"
    write_pair(root, "00007", BAD, difficult=(4,), ir_level=200)
    write_pair(root, "00008", [("Motorcycle", 1, 1, 64, 48)])
    d = split_dir(tmp_path, train=["00007", "00008"])
    ds = M3FDDataset(root, "train", split_dir=d, train=False, size=32)
    xml = root / "Annotation" / "00007.xml"
    assert len(ds.warnings) == 4                  # the full-image box of 00008 is no clip
    assert ds.warnings[0].startswith(f"{xml}: object 2 (Bus") and "clipped" in ds.warnings[0]
    assert ds.warnings[1].startswith(f"{xml}: object 1 (People") and "degenerate" in ds.warnings[1]
    assert ds.warnings[2].startswith(f"{xml}: object 3 (Bicycle")
    assert "unknown class" in ds.warnings[2]
    assert ds.warnings[3].startswith(f"{xml}: object 6 (Car") and "outside" in ds.warnings[3]
    printed = capsys.readouterr().err
    assert "1 box(es) clipped to the image, 3 invalid box(es) skipped" in printed
    assert "object 3 (Bicycle" in printed

    boxes, labels, ignore = ds.gt(0)
    # VOC (40, 20, 70, 40) is (39, 19, 70, 40), clamped to x <= 64 as DETR's data loading does
    np.testing.assert_array_equal(boxes, [[4, 4, 20, 20], [39, 19, 64, 40], [44, 4, 55, 15],
                                          [21, 29, 22, 45]])
    assert [M3FD_CLASSES[i] for i in labels] == ["Car", "Bus", "Truck", "Lamp"]
    assert ignore.tolist() == [False, False, True, False]  # <difficult>1</difficult> -> ignore
    assert ds.gt(1)[0].tolist() == [[0, 0, 64, 48]]      # the full-image box is inside
    assert ds[0]["ignore"].tolist() == [False, False, True, False]
    # the item's boxes are the clipped ones at the 32 x 32 input: x / 2, y / 1.5
    np.testing.assert_allclose(ds[0]["boxes"][1].numpy(), [19.5, 19 / 1.5, 32, 40 / 1.5],
                               rtol=1e-6)

    with pytest.raises(ValueError) as e:
        M3FDDataset(root, "train", split_dir=d, bad_boxes="error")
    msg = str(e.value)
    assert "3 invalid box(es)" in msg
    assert all(f"{xml}: object {k}" in msg for k in (1, 3, 6))
    assert "object 0" not in msg and "object 2" not in msg        # a clipped box is valid
    with pytest.raises(ValueError, match="bad_boxes"):
        M3FDDataset(root, "train", split_dir=d, bad_boxes="clip")


def test_image_size_is_read_from_the_file(tmp_path):
    root = tmp_path / "m3fd"
    # a small image whose XML claims M3FD's usual 1024 x 768: the box fits the claim, not the file
    write_pair(root, "00001", [("Car", 5, 5, 20, 20), ("Car", 10, 10, 100, 40)], size=(64, 48),
               xml_size=(1024, 768))
    write_pair(root, "00002", [("Car", 5, 5, 20, 20)], size=(40, 30), xml_size=None)
    d = split_dir(tmp_path, test=["00001", "00002"])
    ds = M3FDDataset(root, "test", split_dir=d, train=False, size=32)
    assert [r.size for r in ds.records] == [(48, 64), (30, 40)]
    assert "<size> says 1024x768" in ds.warnings[0] and "is 64x48" in ds.warnings[0]
    assert "object 1" in ds.warnings[1] and "clipped to the 64x48 image" in ds.warnings[1]
    assert ds.gt(0)[0].tolist() == [[4, 4, 20, 20], [9, 9, 64, 40]]
    assert ds[1]["orig_size"] == (30, 40)
    # without validation the XML is trusted, and reading the pixels refuses the disagreement
    fast = M3FDDataset(root, "test", split_dir=d, train=False, validate=False)
    assert fast.records[0].size == (768, 1024) and len(fast.gt(0)[0]) == 2
    with pytest.raises(ValueError, match="validate=True"):
        fast[0]


def test_infrared_and_visible_sizes_must_agree(tmp_path):
    root = tmp_path / "m3fd"
    write_pair(root, "00001", [("Car", 5, 5, 20, 20)])
    Image.new("RGB", (60, 48)).save(root / "Ir" / "00001.png")
    with pytest.raises(ValueError, match=r"Ir/00001.png \(H, W\) = \(48, 60\)"):
        M3FDDataset(root, "a", split_dir=split_dir(tmp_path, a=["00001"]))


def test_split_lists_join_and_fail_clearly(tmp_path):
    root = tmp_path / "m3fd"
    for i in range(4):
        write_pair(root, f"{i:05d}", [("Car", 5, 5, 20, 20)])
    d = split_dir(tmp_path, train=["00000", "00001"], val=["00002"], test=["00003"], empty=[],
                  dup=["00000", "00000"], bad=["00000", "00009"])
    assert M3FDDataset(root, "train+val", split_dir=d, train=False).names == ["00000", "00001",
                                                                              "00002"]
    assert [r.image_id for r in M3FDDataset(root, "test", split_dir=d).records] == [3]
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        M3FDDataset(root, "nope", split_dir=d)
    with pytest.raises(ValueError, match="empty"):
        M3FDDataset(root, "empty", split_dir=d)
    with pytest.raises(ValueError, match="more than once: 00000"):
        M3FDDataset(root, "dup", split_dir=d)
    with pytest.raises(FileNotFoundError, match=r"Vis/00009.\*, Ir/00009.\*, Annotation/00009.xml"):
        M3FDDataset(root, "bad", split_dir=d)
    with pytest.raises(ValueError, match="split"):
        M3FDDataset(root, "../train", split_dir=d)


def test_verify_names_a_truncated_image(tmp_path):
    root = tmp_path / "m3fd"
    write_pair(root, "00001", [("Car", 5, 5, 20, 20)])
    data = (root / "Ir" / "00001.png").read_bytes()
    (root / "Ir" / "00001.png").write_bytes(data[:len(data) // 2])
    d = split_dir(tmp_path, a=["00001"])
    ds = M3FDDataset(root, "a", split_dir=d)              # the header is intact
    with pytest.raises(BadImageError, match=r"Ir/00001.png"):
        ds.verify()
    with pytest.raises(BadImageError, match=r"Ir/00001.png"):
        M3FDDataset(root, "a", split_dir=d, verify=True)


# ---------------------------------------------------------------- boxes move with the pixels

RECTS = [("Car", 9, 7, 38, 22), ("People", 50, 12, 57, 40), ("Bus", 70, 30, 120, 60),
         ("Lamp", 20, 50, 28, 90), ("Truck", 95, 70, 126, 94)]


def test_augmented_boxes_land_on_their_rectangles(tmp_path):
    root = tmp_path / "m3fd"
    write_pair(root, "00001", RECTS, size=(128, 96), ir_level=200)     # hot 200 on 20
    ds = M3FDDataset(root, "a", split_dir=split_dir(tmp_path, a=["00001"]), train=True, size=80)
    original = dict(zip(ds.gt(0)[1].tolist(), ds.gt(0)[0]))
    kept = []
    for epoch in range(30):
        ds.set_epoch(epoch)
        kept.append(len(ds[0]["boxes"]))
    assert min(kept) < len(RECTS) and max(kept) == len(RECTS)     # crops drop boxes sometimes

    # Keep every box still in view, so that every hot pixel has its box.
    ds.transform = DetTrainTransform(80, min_visible=1e-6, min_size=1e-6)
    flips = 0
    for epoch in range(30):
        ds.set_epoch(epoch)
        item = ds[0]
        hot = denorm_ir(item["ir"]) > 110
        boxes, labels = item["boxes"].numpy(), item["labels"].tolist()
        yc, xc = np.mgrid[0:80, 0:80] + 0.5                            # pixel centres
        near_a_box = np.zeros_like(hot)
        for x0, y0, x1, y1 in boxes:
            # pixels at least 1 px inside the box are hot; hot pixels are within 1 px of a box
            inside = (xc >= x0 + 1) & (xc <= x1 - 1) & (yc >= y0 + 1) & (yc <= y1 - 1)
            assert hot[inside].all(), epoch
            near_a_box |= (xc > x0 - 1) & (xc < x1 + 1) & (yc > y0 - 1) & (yc < y1 + 1)
        assert not (hot & ~near_a_box).any(), epoch
        # one window for all boxes: unclipped boxes share the scale and keep their layout
        whole = [(b, original[lab]) for b, lab in zip(boxes, labels)
                 if b[0] > 0 and b[1] > 0 and b[2] < 80 and b[3] < 80]
        if len(whole) >= 2:
            (b0, o0), (b1, o1) = whole[0], whole[1]
            sx, sy = (b0[2] - b0[0]) / (o0[2] - o0[0]), (b0[3] - b0[1]) / (o0[3] - o0[1])
            for b, o in whole:
                np.testing.assert_allclose([b[2] - b[0], b[3] - b[1]],
                                           [sx * (o[2] - o[0]), sy * (o[3] - o[1])], rtol=1e-4)
            flipped = (b1[0] - b0[0]) * (o1[0] - o0[0]) < 0
            flips += flipped
            gap = b1[2] - b0[2] if flipped else b1[0] - b0[0]
            np.testing.assert_allclose(abs(gap), sx * abs(o1[0] - o0[0]), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(b1[1] - b0[1], sy * (o1[1] - o0[1]), rtol=1e-4, atol=1e-4)
    assert flips > 0


def test_flip_and_zoom_out_by_hand():
    vis = Image.new("RGB", (100, 50))
    ir = Image.new("L", (100, 50))
    boxes = np.array([[10, 5, 30, 25]], np.float32)
    one = (np.array([1]), np.array([False]))
    flip = DetTrainTransform(size=20, flip_prob=1.0, zoom_out_prob=0.0, crop_prob=0.0,
                             jitter=False)
    out = flip(vis, ir, boxes, *one, np.random.default_rng(0))
    # x: 20 - x * 20/100 for (30, 10); y: y * 20/50
    np.testing.assert_allclose(out["boxes"].numpy(), [[14, 2, 18, 10]], atol=1e-5)
    zoom = DetTrainTransform(size=20, flip_prob=0.0, zoom_out_prob=1.0, max_zoom_out=2.0,
                             crop_prob=0.0, jitter=False)
    out = zoom(vis, ir, boxes, *one, np.random.default_rng(0))
    w = out["boxes"][0, 2] - out["boxes"][0, 0]
    assert 2.0 <= w <= 4.0 + 1e-5      # 20 px of 100 -> 4 px of 20, up to 2x smaller


def test_zoom_out_canvas_contains_the_image():
    """Zoom-out (RT-DETR's RandomZoomOut, torchvision v2: left ~ U(0, canvas_w - w), top ~
    U(0, canvas_h - h)) puts the whole image on a z times larger canvas: on a wide image the
    window must contain the image, one z for both sides, and the left margin spread uniformly
    over [0, (z - 1) w]."""
    t = DetTrainTransform(size=32, zoom_out_prob=1.0, max_zoom_out=3.0, crop_prob=0.0, jitter=False)
    h, w = 20, 100
    rng = np.random.default_rng(0)
    left, top = [], []
    for _ in range(2000):
        x0, y0, x1, y1 = t.sample_window(rng, (h, w), np.zeros((0, 4)))
        z = (x1 - x0) / w
        assert 1.0 <= z <= 3.0 and (y1 - y0) / h == pytest.approx(z, abs=1e-9)
        assert x0 <= 0 and y0 <= 0 and x1 >= w and y1 >= h, (x0, y0, x1, y1)
        left.append(-x0 / ((z - 1) * w))
        top.append(-y0 / ((z - 1) * h))
    for frac in (np.array(left), np.array(top)):
        assert frac.max() > 0.95 and abs(frac.mean() - 0.5) < 0.05, (frac.max(), frac.mean())


# ---------------------------------------------------------------- other layouts

def test_coco_json_form_gives_the_same_targets(tmp_path):
    root = tmp_path / "coco"
    for sub in ("vi", "ir"):
        (root / "train" / sub).mkdir(parents=True)
        shutil.copy(SAMPLE / ("Vis" if sub == "vi" else "Ir") / "00471.png",
                    root / "train" / sub / "00471.png")
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(reversed(M3FD_CLASSES))]  # other order
    cat_id = {c["name"]: c["id"] for c in cats}
    anns = [{"id": k, "image_id": 471, "category_id": cat_id[n], "iscrowd": 0,
             "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1]}    # the README's conversion
            for k, (n, x0, y0, x1, y1) in enumerate(SAMPLE_OBJECTS)]
    anns[2]["iscrowd"] = 1
    anns.append({"id": 99, "image_id": 471, "category_id": 77, "iscrowd": 0, "bbox": [1, 1, 5, 5]})
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(
        {"images": [{"id": 471, "file_name": "00471.png", "width": 1024, "height": 768}],
         "annotations": anns, "categories": cats}))
    coco = M3FDDataset.from_coco(root, "train", train=False, size=64)
    voc = M3FDDataset(SAMPLE, "one", split_dir=split_dir(tmp_path, one=["00471"]), train=False,
                      size=64)
    (cb, cl, ci), (vb, vl, _) = coco.gt(0), voc.gt(0)
    np.testing.assert_array_equal(cb, vb)
    np.testing.assert_array_equal(cl, vl)
    assert ci.tolist() == [False, False, True] + [False] * 5
    assert len(coco.warnings) == 1 and "object 8 (category id 77" in coco.warnings[0]
    assert coco[0]["image_id"] == 471 and torch.equal(coco[0]["boxes"], voc[0]["boxes"])
    with pytest.raises(FileNotFoundError, match="contains 'test'"):
        M3FDDataset.from_coco(root, "test")
    ann = root / "annotations" / "instances_train.json"
    for images, says in (([{"id": "FLIR_471", "file_name": "00471.png"}],
                          r"image id 'FLIR_471' \(00471.png\) is not an integer"),
                         ([{"id": 471}], "image entry 0 has no 'id' or no 'file_name'")):
        ann.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
        with pytest.raises(ValueError, match=f"instances_train.json: {says}"):
            M3FDDataset.from_coco(root, "train")


def test_coco_boxes_past_the_borders_are_clipped(tmp_path):
    """COCO's (x, y, w, h) may start left of or above the image: clamped to [0, W] x [0, H] as
    DETR's `ConvertCocoPolysToMask` does; a box with no area inside is invalid."""
    root = tmp_path / "coco"
    for sub in ("vi", "ir"):
        (root / "train" / sub).mkdir(parents=True)
        Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(root / "train" / sub / "a.png")
    anns = [{"id": k, "image_id": 1, "category_id": 2, "bbox": bbox}
            for k, bbox in enumerate([[-3, 2, 10, 5],          # (-3, 2, 7, 7)
                                      [30, 25, 20, 10],        # (30, 25, 50, 35)
                                      [-12, 0, 10, 5]])]       # (-12, 0, -2, 5): left of it
    (root / "annotations").mkdir()
    (root / "annotations" / "train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
         "annotations": anns, "categories": [{"id": 2, "name": "Car"}]}))
    ds = M3FDDataset.from_coco(root, "train", train=False, size=32)
    assert ds.gt(0)[0].tolist() == [[0, 2, 7, 7], [30, 25, 40, 30]]
    assert ["clipped" in w for w in ds.warnings] == [True, True, False]
    assert "object 2" in ds.warnings[2] and "no area inside" in ds.warnings[2]


def test_synthetic_m3fd_loads_with_day_and_night_lists(tmp_path):
    splits = write_m3fd(tmp_path, n=10, size=(48, 64), seed=1, night_fraction=0.5)
    assert sorted(splits["test_day"] + splits["test_night"]) == splits["test"]
    ds = M3FDDataset(tmp_path, "train+val", split_dir=tmp_path, train=True, size=32)
    assert len(ds) == 8 and ds.warnings == [] and ds.verify() == 16
    assert sum(len(ds.gt(i)[0]) for i in range(len(ds))) >= 8
    item = ds[0]
    assert item["vis"].shape == (3, 32, 32) and item["orig_size"] == (48, 64)
    night = write_m3fd(tmp_path / "night", n=5, size=(48, 64), seed=2, night_fraction=1.0)
    assert night["test_night"] == night["test"] and night["test_day"] == []


def test_train_transform_keeps_each_boxs_label_and_ignore_flag_and_drops_cut_boxes(monkeypatch):
    """The crop window (0, 0, 50, 100) of a 100 x 100 image at S = 100 doubles x: box 0 becomes
    (80, 10, 120, 20), clipped to (80, 10, 100, 20), half of it visible: kept; box 1 (90, 30, 170,
    40) keeps 1/8 < min_visible 0.25: dropped; box 2 (20, 50, 40, 60), ignored, stays ignored.
    Then a box 0.4 px wide (< min_size 1) is dropped. Black inputs normalise with CLIP's
    statistics (published, written out) and the thermal ones to -0.5 / 0.25."""
    from ivt.data.transforms import CLIP
    t = DetTrainTransform(size=100, flip_prob=0.0, jitter=False, norm=CLIP)
    vis, ir = Image.new("RGB", (100, 100)), Image.new("L", (100, 100))
    monkeypatch.setattr(t, "sample_window", lambda rng, size, boxes: (0.0, 0.0, 50.0, 100.0))
    item = t(vis, ir, np.array([[40, 10, 60, 20], [45, 30, 85, 40], [10, 50, 20, 60]], np.float32),
             np.array([0, 1, 2]), np.array([False, False, True]), np.random.default_rng(0))
    assert item["boxes"].tolist() == [[80, 10, 100, 20], [20, 50, 40, 60]]
    assert item["labels"].tolist() == [0, 2] and item["ignore"].tolist() == [False, True]
    clip_black = (-0.48145466 / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711)
    torch.testing.assert_close(item["vis"][:, 7, 9], torch.tensor(clip_black))
    assert torch.equal(item["ir"], torch.full((3, 100, 100), -2.0))
    monkeypatch.setattr(t, "sample_window", lambda rng, size, boxes: (0.0, 0.0, 100.0, 100.0))
    item = t(vis, ir, np.array([[99.6, 10, 100, 20], [10, 10, 20, 20]], np.float32),
             np.array([3, 4]), np.array([False, False]), np.random.default_rng(0))
    assert item["boxes"].tolist() == [[10, 10, 20, 20]] and item["labels"].tolist() == [4]


def test_a_crop_that_never_holds_a_box_centre_keeps_the_whole_canvas():
    """Step 3 of the training transform: after the tries, none of whose windows holds the
    centre (0, 0) strictly inside (x0 >= 0), the whole image is kept."""
    t = DetTrainTransform(size=100, zoom_out_prob=0.0, crop_prob=1.0)
    window = t.sample_window(np.random.default_rng(0), (100, 100), np.zeros((1, 4), np.float32))
    assert window == (0.0, 0.0, 100.0, 100.0)


def test_the_datasets_transforms_get_the_backbones_normalisation(tmp_path):
    from ivt.data.transforms import CLIP
    root = tmp_path / "m3fd"
    write_pair(root, "00001", [("Car", 5, 5, 20, 20)])
    d = split_dir(tmp_path, train=["00001"])
    for train in (True, False):
        assert M3FDDataset(root, "train", split_dir=d, train=train, size=32,
                           norm=CLIP).transform.norm == CLIP


def test_zoom_out_canvas_is_uniformly_up_to_twice_the_image():
    """The zoom-out factor is uniform on [1, max_zoom_out = 2]: a 100-pixel-wide image's canvas
    is 100..200 wide, mean 150 (standard error over 300 draws 100 / sqrt(12 * 300) = 1.7)."""
    t = DetTrainTransform(size=100, zoom_out_prob=1.0, crop_prob=0.0)
    widths = [x1 - x0 for x0, _, x1, _ in
              (t.sample_window(np.random.default_rng(s), (100, 100), np.zeros((0, 4)))
               for s in range(300))]
    assert min(widths) >= 100 and max(widths) > 190 and abs(np.mean(widths) - 150) < 8


def test_a_crop_window_holds_a_box_only_if_its_centre_is_inside_in_x_and_in_y(monkeypatch):
    """The box centred at (10, 20) is outside the window (60, 0, 100, 40) (x < 60) though inside
    its y range: that window is refused and the next one, (0, 0, 50, 50), holding it, taken."""
    import ivt.data.box_transforms as bt
    windows = iter([(60.0, 0.0, 100.0, 40.0), (0.0, 0.0, 50.0, 50.0)])
    monkeypatch.setattr(bt, "random_window", lambda *args: next(windows))
    t = DetTrainTransform(size=100, zoom_out_prob=0.0, crop_prob=1.0)
    window = t.sample_window(np.random.default_rng(0), (100, 100),
                             np.array([[5, 15, 15, 25]], np.float32))
    assert window == (0.0, 0.0, 50.0, 50.0)
