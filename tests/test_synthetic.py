"""The synthetic scene generator: determinism, real layouts readable by the loaders, and the
properties the demo relies on (dark night visible images, cold decoys, warm objects)."""
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivt.data import MFNetDataset
from ivt.data.synthetic import (M3FD_NAME, THERMAL_SIGNATURE, render_scene, thermal_signature_table,
                                write_m3fd, write_mfnet, write_vt)

M3FD_SAMPLE = Path(__file__).parent / "data" / "m3fd_sample"


def tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("writer,kwargs", [(write_mfnet, dict(n_train=6, n_val=2, n_test=4)),
                                           (write_vt, dict(n_train=3, n_test=2, n_vt1000=1,
                                                           n_vt821=1)),
                                           (write_m3fd, dict(n=5))])
def test_writers_are_deterministic(tmp_path, writer, kwargs):
    writer(tmp_path / "a", seed=7, **kwargs)
    writer(tmp_path / "b", seed=7, **kwargs)
    writer(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (tree_bytes(tmp_path / k) for k in "abc")
    assert a == b
    assert a != c   # (MFNet names carry the seeded day/night draw, so even names may differ)


def test_mfnet_layout_reads_with_the_mfnet_loader(tmp_path):
    splits = write_mfnet(tmp_path, n_train=8, n_val=2, n_test=6, size=(48, 64), seed=1)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 6]
    assert sum(n.endswith("N") for n in splits["train"]) == 4
    assert splits["test_night"] == [n for n in splits["test"] if n.endswith("N")]
    assert all(len(n) == 6 and n[:5].isdigit() for n in splits["train"])
    rgbt = Image.open(tmp_path / "images" / f"{splits['train'][0]}.png")
    assert rgbt.mode == "RGBA" and rgbt.size == (64, 48)

    train = MFNetDataset(tmp_path, "train+val", crop=(32, 32))   # validates every file
    assert len(train) == 10 and train[0]["vis"].shape == (3, 32, 32)
    night = MFNetDataset(tmp_path, "test_night", train=False)
    item = night[0]
    assert item["is_night"] and item["label"].shape == (48, 64)
    assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 3, 7}


def test_night_visible_is_dark_and_decoys_are_cold_background():
    day_means, night_means, decoy_ir, object_ir, decoy_pixels = [], [], [], [], 0
    for i in range(40):
        night = i % 2 == 1
        s = render_scene(np.random.default_rng([0, i]), (96, 128), night)
        (night_means if night else day_means).append(s["vis"].astype(float).mean())
        decoy = s["decoy"]
        assert np.all(s["label"][decoy] == 0) and np.all(s["instances"][decoy] == 0)
        decoy_pixels += decoy.sum()
        decoy_ir.append(s["ir"][decoy])
        object_ir.append(s["ir"][s["label"] > 0])
        if night:
            assert decoy.any()
            # Lit decoys stand out in the visible image; real objects barely do.
            assert s["vis"][decoy].mean() > 2 * s["vis"][~decoy].mean()
    assert np.mean(night_means) < 0.3 * np.mean(day_means)
    assert decoy_pixels > 500
    decoy_ir, object_ir = np.concatenate(decoy_ir), np.concatenate(object_ir)
    coldest_object = min(THERMAL_SIGNATURE[k] for k in ("car", "person", "bike", "color_cone"))
    assert np.median(decoy_ir) < 100 < coldest_object - 10 < np.median(object_ir)
    # only blurred edges next to warm objects
    assert np.mean(decoy_ir >= coldest_object - 10) < 0.03


def test_objects_are_labelled_with_mfnet_ids():
    s = render_scene(np.random.default_rng(3), night=False, n_objects=(6, 6))
    assert len(s["objects"]) == 6
    ids = set(np.unique(s["label"]).tolist())
    assert ids <= {0, 1, 2, 3, 7} and len(ids) > 1
    for k, obj in enumerate(s["objects"]):
        if obj["pixels"]:
            x0, y0, x1, y1 = obj["bbox"]
            ys, xs = np.nonzero(s["instances"] == k + 1)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_vt_layout(tmp_path):
    folders = write_vt(tmp_path, n_train=4, n_test=2, n_vt1000=2, n_vt821=2, size=(48, 64))
    assert set(folders) == {"VT5000/Train", "VT5000/Test", "VT1000", "VT821"}
    for folder, stems in folders.items():
        for stem in stems:
            rgb = Image.open(tmp_path / folder / "RGB" / f"{stem}.jpg")
            t = Image.open(tmp_path / folder / "T" / f"{stem}.jpg")
            gt = np.array(Image.open(tmp_path / folder / "GT" / f"{stem}.png"))
            assert rgb.mode == t.mode == "RGB" and rgb.size == t.size == (64, 48)
            assert gt.shape == (48, 64) and set(np.unique(gt)) <= {0, 255} and gt.max() == 255


def test_m3fd_layout_matches_the_real_annotation_format(tmp_path):
    splits = write_m3fd(tmp_path, n=10, size=(48, 64), seed=2)
    stems = sorted(splits["train"] + splits["val"] + splits["test"])
    assert stems == [f"{i:05d}" for i in range(10)] and len(splits["test"]) == 2
    real = ET.parse(M3FD_SAMPLE / "Annotation" / "00471.xml").getroot()
    real_object_tags = [c.tag for c in real.find("object")]
    n_boxes = 0
    for stem in stems:
        ir = np.array(Image.open(tmp_path / "Ir" / f"{stem}.png"))
        assert ir.shape == (48, 64, 3) and (ir == ir[..., :1]).all()
        assert Image.open(tmp_path / "Vis" / f"{stem}.png").size == (64, 48)
        ann = ET.parse(tmp_path / "Annotation" / f"{stem}.xml").getroot()
        assert [c.tag for c in ann] [:3] == [c.tag for c in real][:3]
        assert (int(ann.find("size/width").text), int(ann.find("size/height").text)) == (64, 48)
        for obj in ann.iter("object"):
            assert [c.tag for c in obj] == real_object_tags
            assert obj.find("name").text in M3FD_NAME.values()
            x0, y0, x1, y1 = (int(obj.find(f"bndbox/{k}").text)
                              for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 1 <= x0 <= x1 <= 64 and 1 <= y0 <= y1 <= 48
            n_boxes += 1
    assert n_boxes >= 10


def test_thermal_signature_table_documents_every_material():
    rows = thermal_signature_table()
    assert {r["material"] for r in rows} == set(THERMAL_SIGNATURE)
    person = next(r for r in rows if r["material"] == "person")
    assert person["mfnet_label"] == 2 and person["thermal"] == max(
        r["thermal"] for r in rows if r["mfnet_label"] > 0)
