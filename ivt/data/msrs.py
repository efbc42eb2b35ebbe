"""MSRS: registered visible/infrared pairs derived from MFNet (same names, same 9 classes).

Two layouts are in circulation (data.md, "MSRS"):

    (a) <root>/{train,test}/{vi,ir}/<name>.png, labels in <root>/{train,test}/Segmentation_labels/
    (b) <root>/{Visible,Infrared,Label}/<name>.png with <root>/split/{train,test}.txt

Visible is RGB; infrared is one channel, sometimes stored as RGB (converted to L here). The
dataset logic (validation, `verify()`, transforms, item format, `BadImageError` naming a file
that cannot be decoded) is `RGBTSegmentationDataset`'s, in mfnet.py.
'test_day' / 'test_night' select the test names ending in D / N.
"""
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from .io import open_image
from .mfnet import (RGBTSegmentationDataset, Sample, check_names, header, parse_name,
                    read_split_list)
from .transforms import IMAGENET, Normalization

MSRS_SPLITS = ("train", "test", "test_day", "test_night")


def _folder_names(root: Path, split: str) -> List[Sample]:
    """Layout (a): names are the stems in `vi/`; every stem must exist in `ir/` and the labels."""
    base = root / split
    vi, ir, lab = base / "vi", base / "ir", base / "Segmentation_labels"
    for folder in (vi, ir, lab):
        if not folder.is_dir():
            raise FileNotFoundError(f"MSRS folder {folder} not found")
    stems = set()
    for folder in (vi, ir, lab):
        stems |= {p.stem for p in folder.glob("*.png")}
    if not stems:
        raise ValueError(f"MSRS folder {vi} holds no .png images")
    names = sorted(stems)
    check_names(names, vi, allow_flip=split == "train")
    return [Sample(n, vi / f"{n}.png", ir / f"{n}.png", lab / f"{n}.png") for n in names]


def _list_names(root: Path, split: str) -> List[Sample]:
    """Layout (b): names from `split/<split>.txt`."""
    names = read_split_list(root / "split" / f"{split}.txt", allow_flip=split == "train")
    return [Sample(n, root / "Visible" / f"{n}.png", root / "Infrared" / f"{n}.png",
                   root / "Label" / f"{n}.png") for n in names]


class MSRSDataset(RGBTSegmentationDataset):
    """MSRS in either layout (detected from the folders present); arguments as `MFNetDataset`."""

    def __init__(self, root: Union[str, Path], split: str = "train", train: bool = True,
                 crop: Tuple[int, int] = (512, 512), seed: int = 0,
                 transform: Optional[Callable] = None, validate: bool = True,
                 norm: Normalization = IMAGENET):
        if split not in MSRS_SPLITS:
            raise ValueError(f"unknown MSRS split {split!r}; expected one of {MSRS_SPLITS}")
        self.root = Path(root)
        self.split = split
        base_split = "train" if split == "train" else "test"
        if (self.root / "Visible").is_dir():
            samples = _list_names(self.root, base_split)
        elif (self.root / base_split).is_dir():
            samples = _folder_names(self.root, base_split)
        else:
            raise FileNotFoundError(f"{self.root}: neither MSRS layout found (expected "
                                    f"{base_split}/vi, {base_split}/ir, "
                                    f"{base_split}/Segmentation_labels or Visible, Infrared, "
                                    f"Label with split/{base_split}.txt)")
        if split in ("test_day", "test_night"):
            want_night = split == "test_night"
            samples = [s for s in samples if parse_name(s.name, s.label)[0] == want_night]
        super().__init__(samples, train, crop, seed, transform, validate, norm)

    def check_pair(self, sample: Sample) -> Tuple[int, int]:
        vis_size, vis_mode = header(sample.vis)
        ir_size, _ = header(sample.ir)
        _check_visible(vis_mode, sample.vis)
        if ir_size != vis_size:
            raise ValueError(f"{sample.ir}: infrared size (H, W) = {ir_size} differs from "
                             f"visible size {vis_size}")
        return vis_size

    def read_pair(self, sample: Sample) -> Tuple[np.ndarray, np.ndarray]:
        vis, ir = open_image(sample.vis), open_image(sample.ir)
        _check_visible(vis.mode, sample.vis)
        ir_l = ir if ir.mode == "L" else ir.convert("L")
        return np.array(vis, dtype=np.uint8), np.array(ir_l, dtype=np.uint8)


def _check_visible(mode: str, path: Path) -> None:
    if mode != "RGB":
        raise ValueError(f"{path}: visible image must be RGB, got mode {mode}")
