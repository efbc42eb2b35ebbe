"""Corrupt, truncated and non-image files: named by `BadImageError`, never a PIL traceback.

Three kinds of bad file, written over one file of a tiny MFNet or MSRS folder:
* truncated: a valid PNG cut in half. Its header is intact, so the construction-time header scan
  passes (unless it is a label, which that scan decodes); `verify()` and `__getitem__` name it.
* not an image: text in a `.png` file; zero bytes. The header scan itself names the file.
Then `ivt.data.io` on its own: `open_image`, `image_size`, `verify_images`.
"""
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ivt.data import MFNetDataset, MSRSDataset
from ivt.data.io import BadImageError, image_size, open_image, verify_images

NAMES = ("00001D", "00002N")
H, W = 24, 40


def write_png(path, mode, seed, label=False):
    """A noise image (incompressible, so half of the file holds half of the pixel data), or a
    label of random class ids 0..8."""
    rng = np.random.default_rng(seed)
    shape = {"RGBA": (H, W, 4), "RGB": (H, W, 3), "L": (H, W)}[mode]
    pixels = rng.integers(0, 9 if label else 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)


def make_mfnet(root):
    """Two samples; returns the files of the second one, by role."""
    for i, name in enumerate(NAMES):
        write_png(root / "images" / f"{name}.png", "RGBA", i)
        write_png(root / "labels" / f"{name}.png", "L", 10 + i, label=True)
    (root / "test.txt").write_text("\n".join(NAMES) + "\n")
    name = f"{NAMES[1]}.png"
    return {"vis": root / "images" / name, "label": root / "labels" / name}


def make_msrs(root):
    """Layout (b), two test samples; returns the files of the second one, by role."""
    for i, name in enumerate(NAMES):
        write_png(root / "Visible" / f"{name}.png", "RGB", i)
        write_png(root / "Infrared" / f"{name}.png", "L", 20 + i)
        write_png(root / "Label" / f"{name}.png", "L", 10 + i, label=True)
    (root / "split").mkdir()
    (root / "split" / "test.txt").write_text("\n".join(NAMES) + "\n")
    name = f"{NAMES[1]}.png"
    return {"vis": root / "Visible" / name, "ir": root / "Infrared" / name,
            "label": root / "Label" / name}


def corrupt(path, kind):
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_an_image":
        path.write_text("this is not a PNG file\n")
    else:
        path.write_bytes(b"")


DATASETS = {"mfnet": (make_mfnet, MFNetDataset), "msrs": (make_msrs, MSRSDataset)}
CASES = [("mfnet", "vis"), ("mfnet", "label"), ("msrs", "vis"), ("msrs", "ir"), ("msrs", "label")]
KINDS = ["truncated", "not_an_image", "zero_bytes"]


def build(kind_of_set, root, validate=True):
    return DATASETS[kind_of_set][1](root, split="test", train=False, validate=validate)


def test_good_folders_verify(tmp_path):
    for name, (make, _) in DATASETS.items():
        make(tmp_path / name)
        ds = build(name, tmp_path / name)
        assert ds.verify(quiet=True) == (4 if name == "mfnet" else 6)   # MFNet: vis = ir file
        assert ds[1]["vis"].shape == (3, H, W)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dataset,role", CASES)
def test_bad_file_is_named(tmp_path, dataset, role, kind):
    bad = DATASETS[dataset][0](tmp_path)[role]
    corrupt(bad, kind)
    header_ok = kind == "truncated" and role != "label"      # the scan decodes labels
    if header_ok:
        ds = build(dataset, tmp_path)                            # the header scan passes
    else:
        with pytest.raises(BadImageError, match=str(bad)):
            build(dataset, tmp_path)
        ds = build(dataset, tmp_path, validate=False)
    with pytest.raises(BadImageError, match=str(bad)):
        ds.verify(quiet=True)
    assert ds[0]["label"].shape == (H, W)                        # the good sample still loads
    with pytest.raises(BadImageError, match=str(bad)) as info:
        ds[1]
    assert isinstance(info.value, ValueError)                    # the scripts' `error:` path


def test_bad_file_in_a_dataloader_worker_keeps_the_type_and_the_name(tmp_path):
    bad = make_mfnet(tmp_path)["vis"]
    corrupt(bad, "truncated")
    loader = DataLoader(build("mfnet", tmp_path), batch_size=1, num_workers=1)
    with pytest.raises(BadImageError, match=str(bad)):
        list(loader)


# -- ivt.data.io ------------------------------------------------------------------------------
@pytest.fixture
def png(tmp_path):
    path = tmp_path / "a.png"
    write_png(path, "RGBA", 0)
    return path


def test_open_image_decodes_and_closes(png):
    im = open_image(png)
    assert im.mode == "RGBA" and (im.height, im.width) == (H, W)
    with Image.open(png) as ref:
        assert np.array_equal(np.asarray(im), np.asarray(ref))
    png.unlink()                                   # the pixels do not depend on the file any more
    assert np.asarray(im).shape == (H, W, 4)


def test_image_size_is_h_w_from_the_header(png):
    assert image_size(png) == (H, W)
    corrupt(png, "truncated")
    assert image_size(png) == (H, W)               # a header check cannot see truncation
    with pytest.raises(BadImageError, match=rf"{png}: .*(truncated|broken|damaged)"):
        open_image(png)


@pytest.mark.parametrize("kind", ["not_an_image", "zero_bytes"])
def test_non_images_are_bad_images(png, kind):
    corrupt(png, kind)
    for read in (open_image, image_size):
        with pytest.raises(BadImageError, match=rf"^{png}: \w+"):
            read(png)


def test_missing_file_is_file_not_found(tmp_path):
    for read in (open_image, image_size):
        with pytest.raises(FileNotFoundError):
            read(tmp_path / "missing.png")


def test_verify_images_counts_distinct_files_and_names_the_first_bad(tmp_path):
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(good):
        write_png(p, "RGB", i)
    assert verify_images(good + good[:1], quiet=True) == 3
    corrupt(good[1], "truncated")
    corrupt(good[2], "zero_bytes")
    with pytest.raises(BadImageError, match=str(good[1])):
        verify_images(good, quiet=True)
    assert issubclass(BadImageError, ValueError)
