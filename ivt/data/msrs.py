"""MSRS: registered visible/infrared pairs derived from MFNet (same names, same 9 classes).

Two layouts are in circulation (docs/data.md, "MSRS"):

    (a) <root>/{train,test}/{vi,ir}/<name>.png, labels in <root>/{train,test}/Segmentation_labels/
    (b) <root>/{Visible,Infrared,Label}/<name>.png with <root>/split/{train,test}.txt

Visible is RGB; infrared is one channel, sometimes stored as RGB (converted to L here). The
dataset logic (validation, `verify()`, transforms, item format, `BadImageError` naming a file
that cannot be decoded) is `RGBTSegmentationDataset`'s, in mfnet.py.

A split names a folder of layout (a) or a list `split/<name>.txt` of layout (b). MSRS ships
'train' and 'test'; 'test_day' / 'test_night' select the test names ending in D / N. A held-out
validation set is one of your own: layout (a) a folder `<root>/val/{vi,ir,Segmentation_labels}`,
layout (b) a list `split/val.txt` (training then on the rest, in a list of its own). Names
joined by '+' concatenate splits, as for MFNet.
"""
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import numpy as np

from .io import open_image, open_thermal
from .mfnet import (RGBTSegmentationDataset, Sample, check_names, header, parse_name,
                    read_split_list, split_parts)
from .transforms import IMAGENET, Normalization

MSRS_SPLITS = ("train", "test", "test_day", "test_night")   # shipped, and test's halves


def _folder_names(root: Path, split: str) -> List[Sample]:
    """Layout (a): names are the stems of the .png files in `vi/`, `ir/` and the labels (a name
    missing from one of them is reported when the files are checked)."""
    base = root / split
    vi, ir, lab = base / "vi", base / "ir", base / "Segmentation_labels"
    for folder in (vi, ir, lab):
        if not folder.is_dir():
            raise FileNotFoundError(f"MSRS folder {folder} not found")
    stems = set()
    for folder in (vi, ir, lab):             # each folder's names checked there, to name it
        found = sorted(p.stem for p in folder.glob("*.png"))
        check_names(found, folder, allow_flip=split.startswith("train"))
        stems.update(found)
    if not stems:
        raise ValueError(f"MSRS folder {vi} holds no .png images")
    names = sorted(stems)
    return [Sample(n, vi / f"{n}.png", ir / f"{n}.png", lab / f"{n}.png") for n in names]


def _list_names(root: Path, split: str) -> List[Sample]:
    """Layout (b): names from `split/<split>.txt`."""
    names = read_split_list(root / "split" / f"{split}.txt", allow_flip=split.startswith("train"))
    return [Sample(n, root / "Visible" / f"{n}.png", root / "Infrared" / f"{n}.png",
                   root / "Label" / f"{n}.png") for n in names]


class MSRSDataset(RGBTSegmentationDataset):
    """MSRS in either layout (detected from the folders present); arguments as `MFNetDataset`."""

    def __init__(self, root: Union[str, Path], split: str = "train", train: bool = True,
                 crop: Tuple[int, int] = (512, 512), seed: int = 0,
                 transform: Optional[Callable] = None, validate: bool = True,
                 norm: Normalization = IMAGENET):
        self.root = Path(root)
        self.split = split
        lists = (self.root / "Visible").is_dir()                    # layout (b), else (a)
        if not lists and not any((self.root / s).is_dir() for s in ("train", "test")):
            raise FileNotFoundError(f"{self.root}: neither MSRS layout found (expected "
                                    f"train/ and test/ with vi, ir, Segmentation_labels, or "
                                    f"Visible, Infrared, Label with split/train.txt and "
                                    f"split/test.txt)")
        samples = []
        for part in split_parts(split, MSRS_SPLITS):
            base = "test" if part in ("test_day", "test_night") else part
            where = self.root / "split" / f"{base}.txt" if lists else self.root / base
            if not where.exists() and base not in MSRS_SPLITS:
                how = (f"list its names in {where} and the remaining training names in a list "
                       f"of their own to train on" if lists else
                       f"move some training pairs into {where}/vi, ir and Segmentation_labels")
                raise FileNotFoundError(f"MSRS split {part!r}: {where} not found. MSRS ships "
                                        f"only 'train' and 'test'; to hold out a validation "
                                        f"set, {how}")
            found = _list_names(self.root, base) if lists else _folder_names(self.root, base)
            if base != part:
                want_night = part == "test_night"
                found = [s for s in found if parse_name(s.name, s.label)[0] == want_night]
            samples += found
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
        vis, ir = open_image(sample.vis), open_thermal(sample.ir)
        _check_visible(vis.mode, sample.vis)
        return np.array(vis, dtype=np.uint8), np.array(ir, dtype=np.uint8)


def _check_visible(mode: str, path: Path) -> None:
    if mode != "RGB":
        raise ValueError(f"{path}: visible image must be RGB, got mode {mode}")
