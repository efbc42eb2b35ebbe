"""High-bit-depth thermal images read by the one documented rule (ivt/data/io.py): 16-bit PNG,
16-bit and float TIFF by `open_thermal`, and in every loader, as `predict.py` reads them: a
dataset whose thermal files are 16-bit PNGs gives the model exactly what the same dataset gives
with those files stretched to 8 bits by the rule written out here in float64. PIL's own
conversion would clip them flat.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivt.data import M3FDDataset, MSRSDataset, VTDataset
from ivt.data.io import open_thermal, open_visible

H, W = 24, 40


def stretch_reference(x: np.ndarray) -> np.ndarray:
    """The documented rule: 1st..99th percentile onto 0..255, clipped."""
    x = x.astype(np.float64)
    lo, hi = np.percentile(x, [1, 99])
    return np.clip(np.round((x - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def test_open_thermal_rule(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 65536, size=(20, 30)).astype(np.uint16)
    Image.fromarray(x).save(tmp_path / "a.png")
    Image.fromarray(x).save(tmp_path / "a.tif")
    Image.fromarray(x.astype(np.float32) / 7).save(tmp_path / "f.tif")
    for name, ref in (("a.png", x), ("a.tif", x), ("f.tif", x.astype(np.float32) / 7)):
        np.testing.assert_array_equal(np.asarray(open_thermal(tmp_path / name)),
                                      stretch_reference(ref), err_msg=name)
        grey = np.asarray(open_visible(tmp_path / name))
        assert grey.shape == (20, 30, 3)
        np.testing.assert_array_equal(grey, np.repeat(stretch_reference(ref)[..., None], 3, 2))
    Image.fromarray(np.full((8, 8), 1234, np.uint16)).save(tmp_path / "flat.png")
    np.testing.assert_array_equal(np.asarray(open_thermal(tmp_path / "flat.png")), 0)
    colour = rng.integers(0, 256, size=(10, 12, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "c.png")
    np.testing.assert_array_equal(np.asarray(open_thermal(tmp_path / "c.png")),
                                  np.asarray(Image.fromarray(colour).convert("L")))


def test_invalid_pixels_of_a_float_thermal_image(tmp_path):
    """A float radiometric TIFF marks invalid pixels NaN (or inf): the rule is taken over the
    valid pixels and the invalid ones read as 0 (one NaN made the whole image 0 before); an
    image with no valid pixel is a bad image, named."""
    from ivt.data.io import BadImageError
    rng = np.random.default_rng(4)
    x = (20 + 20 * rng.random((20, 30))).astype(np.float32)
    bad = x.copy()
    bad[3, 4], bad[10, 0] = np.nan, np.inf
    Image.fromarray(bad).save(tmp_path / "nan.tif")
    valid = np.isfinite(bad)
    lo, hi = np.percentile(bad[valid].astype(np.float64), [1, 99])
    expected = np.clip(np.round((bad.astype(np.float64) - lo) / (hi - lo) * 255), 0, 255)
    expected[~valid] = 0
    got = np.asarray(open_thermal(tmp_path / "nan.tif"))
    np.testing.assert_array_equal(got, expected.astype(np.uint8))
    assert got[valid].max() == 255
    Image.fromarray(np.full((4, 4), np.nan, np.float32)).save(tmp_path / "void.tif")
    with pytest.raises(BadImageError, match="void.tif: no pixel has a finite value"):
        open_thermal(tmp_path / "void.tif")


# -- one sample per loader, its thermal file given ------------------------------------------------
def write_vt(root: Path, ir: np.ndarray) -> VTDataset:
    rng = np.random.default_rng(1)
    for sub in ("RGB", "T", "GT"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "RGB" / "1.png")
    Image.fromarray(ir).save(root / "T" / "1.png")
    Image.fromarray((rng.random((H, W)) > 0.5).astype(np.uint8) * 255).save(root / "GT" / "1.png")
    return VTDataset(root, train=False, size=32)


def write_msrs(root: Path, ir: np.ndarray) -> MSRSDataset:
    """Layout (b)."""
    rng = np.random.default_rng(2)
    for sub in ("Visible", "Infrared", "Label", "split"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
        root / "Visible" / "00001D.png")
    Image.fromarray(ir).save(root / "Infrared" / "00001D.png")
    Image.fromarray(rng.integers(0, 9, (H, W), dtype=np.uint8)).save(root / "Label" / "00001D.png")
    (root / "split" / "test.txt").write_text("00001D\n")
    return MSRSDataset(root, split="test", train=False)


def write_m3fd(root: Path, ir: np.ndarray) -> M3FDDataset:
    rng = np.random.default_rng(3)
    for sub in ("Vis", "Ir", "Annotation", "splits"):
        (root / sub).mkdir(parents=True)
    vis = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(vis).save(root / "Vis" / "00001.png")
    Image.fromarray(ir).save(root / "Ir" / "00001.png")
    (root / "Annotation" / "00001.xml").write_text(
        f"<annotation><size><width>{W}</width><height>{H}</height></size><object><name>People"
        "</name><difficult>0</difficult><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>20</xmax>"
        "<ymax>18</ymax></bndbox></object></annotation>")
    (root / "splits" / "test.txt").write_text("00001\n")
    return M3FDDataset(root, split="test", split_dir=root / "splits", train=False, size=32)


@pytest.mark.parametrize("write", [write_vt, write_msrs, write_m3fd], ids=["vt", "msrs", "m3fd"])
def test_loaders_read_16_bit_thermal_by_the_rule(tmp_path, write):
    raw = np.random.default_rng(4).normal(20000, 3000, (H, W)).clip(0, 65535).astype(np.uint16)
    high = write(tmp_path / "high", raw)[0]["ir"]
    eight = write(tmp_path / "eight", stretch_reference(raw))[0]["ir"]
    assert high.std() > 0.1                    # not the flat image PIL's clipping gives
    np.testing.assert_array_equal(high.numpy(), eight.numpy())
