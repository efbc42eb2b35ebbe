"""MFNet: RGB-thermal urban scene segmentation (Ha et al., IROS 2017), and the dataset base class
shared with MSRS (which is derived from MFNet: same names, same 9 classes).

On-disk layout (docs/data.md, "MFNet"):

    <root>/images/<name>.png   4-channel PNG, mode RGBA = R, G, B, thermal (480 x 640)
    <root>/labels/<name>.png   mode L, class ids 0..8
    <root>/{train,val,test,test_day,test_night}.txt   one name per line, no extension

The 4th channel is thermal, not alpha: the image is never passed through `convert('RGB')`.
Names are digits + `D` (day) or `N` (night); `<name>_flip` copies may appear in train lists only.
Bad data fails at construction, with the offending file named, rather than mid-training: the
construction-time scan reads image headers (`image_size`) and decodes labels; `verify()` decodes
every image too, which finds truncated files whose header is intact. Pixels are read through
`ivt.data.io.open_image`, so a file that cannot be decoded raises `BadImageError("<path>: ...")`
(a ValueError) at construction, in `verify()` or in `__getitem__`, never a PIL traceback.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .io import image_size, open_image, verify_images
from .transforms import IMAGENET, LABEL_PAD, EvalTransform, Normalization, TrainTransform

CLASSES = ("unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail",
           "color_cone", "bump")
PALETTE = ((0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0),
           (64, 64, 128), (192, 128, 128), (192, 64, 0))
NUM_CLASSES = len(CLASSES)
MFNET_SPLITS = ("train", "val", "test", "test_day", "test_night", "train+val")   # the usual ones

_NAME = re.compile(r"^\d+([DN])(_flip)?$")


def parse_name(name: str, source: Union[str, Path]) -> Tuple[bool, bool]:
    """`00001D` -> (is_night=False, is_flip=False); `01234N_flip` -> (True, True)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{source}: name {name!r} is not digits + 'D' (day) or 'N' (night)")
    return m.group(1) == "N", m.group(2) is not None


def check_names(names: Sequence[str], source: Union[str, Path], allow_flip: bool) -> None:
    """Every name parses; flipped copies only where `allow_flip` (training lists)."""
    for name in names:
        _, is_flip = parse_name(name, source)
        if is_flip and not allow_flip:
            raise ValueError(f"{source}: flipped training copy {name!r} must not appear in an "
                             f"evaluation list")


def split_parts(split: str, usual: Sequence[str]) -> List[str]:
    """'train+val' -> ['train', 'val']: a split is one list name or several joined by '+'."""
    if not re.fullmatch(r"[\w.-]+(\+[\w.-]+)*", split):
        raise ValueError(f"split {split!r}: expected a list name such as {', '.join(usual)}, "
                         f"or names joined by '+'")
    return split.split("+")


def read_split_list(path: Path, allow_flip: bool) -> List[str]:
    """Names listed in a split file, one per line; missing or empty files are errors."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"dataset folder {path.parent} not found")
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"split list {path} is empty")
    check_names(names, path, allow_flip)
    return names


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"missing {what} file {path}")


def check_label(path: Path, size: Tuple[int, int], num_classes: int = NUM_CLASSES) -> None:
    """A label is single-channel, of image size (H, W), with values < num_classes or 255."""
    im = open_image(path)
    if im.mode not in ("L", "P"):
        raise ValueError(f"{path}: label must be single-channel (mode L), got mode {im.mode}")
    label_size = (im.height, im.width)
    if label_size != size:
        raise ValueError(f"{path}: label size (H, W) = {label_size} differs from image "
                         f"size {size}")
    counts = np.bincount(np.asarray(im).ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v >= num_classes and v != LABEL_PAD]
    if bad:
        raise ValueError(f"{path}: label values {bad} outside the classes 0..{num_classes - 1} "
                         f"(or {LABEL_PAD} = ignore)")


def read_label(path: Path) -> np.ndarray:
    """(H, W) uint8 class ids; `BadImageError` naming the file if it cannot be decoded."""
    return np.array(open_image(path), dtype=np.uint8)


def header(path: Path) -> Tuple[Tuple[int, int], str]:
    """(H, W) and PIL mode from the header only; `BadImageError` if it cannot be read."""
    size = image_size(path)
    with Image.open(path) as im:
        return size, im.mode


@dataclass(frozen=True)
class Sample:
    name: str
    vis: Path
    ir: Path      # the same file as `vis` for MFNet's 4-channel images
    label: Path


class RGBTSegmentationDataset(Dataset):
    """Base class: samples -> dict(vis (3,H,W), ir (3,H,W), label (H,W) int64, name, is_night).

    Subclasses list the `Sample`s and implement `check_pair` (header-level checks of the image
    files, returning (H, W)) and `read_pair` (pixels: vis (H,W,3) uint8, ir (H,W) uint8, read
    with `open_image`). Unreadable files raise `BadImageError` naming the file.
    Random augmentation draws from `np.random.default_rng([seed, epoch, index])`: call
    `set_epoch` before each epoch; a resumed run replays the same crops and flips.
    """

    classes = CLASSES
    palette = PALETTE
    num_classes = NUM_CLASSES

    def __init__(self, samples: List[Sample], train: bool, crop: Tuple[int, int], seed: int,
                 transform: Optional[Callable], validate: bool, norm: Normalization = IMAGENET):
        self.samples = samples
        self.train = train
        self.seed = seed
        self.epoch = 0
        if transform is None:
            transform = TrainTransform(crop, norm=norm) if train else EvalTransform(norm)
        self.transform = transform
        for s in samples:
            require_file(s.vis, "visible image")
            require_file(s.ir, "infrared image")
            require_file(s.label, "label")
        if validate:
            self.validate()

    def check_pair(self, sample: Sample) -> Tuple[int, int]:
        raise NotImplementedError

    def read_pair(self, sample: Sample) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def validate(self) -> None:
        """Scan every sample: image channels and sizes (headers), label size and values."""
        for s in self.samples:
            check_label(s.label, self.check_pair(s), self.num_classes)

    def verify(self, quiet: bool = False) -> int:
        """Decode every image and label file (`--verify-images`): `BadImageError` names the first
        that fails, e.g. a truncated PNG whose header passed `validate`. Returns the file count."""
        files = [p for s in self.samples for p in (s.vis, s.ir, s.label)]
        return verify_images(files, desc=f"verify {type(self).__name__} images", quiet=quiet)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def image_paths(self) -> List[Path]:
        """The visible image of every item, in order."""
        return [s.vis for s in self.samples]

    @property
    def source_paths(self) -> List[Path]:
        """The image every item shows, in order: a flipped copy `<name>_flip` shows `<name>`."""
        return [s.vis.with_name(s.vis.name.replace("_flip.", ".", 1)) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        vis, ir = self.read_pair(s)
        label = read_label(s.label)
        if label.shape != vis.shape[:2]:
            raise ValueError(f"{s.label}: label size {label.shape} differs from image size "
                             f"{vis.shape[:2]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        item = self.transform(vis, ir, label, rng)
        item["name"] = s.name
        item["is_night"] = parse_name(s.name, s.label)[0]
        return item


class MFNetDataset(RGBTSegmentationDataset):
    """MFNet in its released layout.

    Args:
        root: folder holding `images/`, `labels/` and the split lists.
        split: the name of a list file `<root>/<split>.txt` ('train', 'val', 'test', 'test_day',
            'test_night', or one of your own), or names joined by '+' ('train+val': the paper's
            1176 training images). Flipped copies are allowed only in lists named 'train*'.
        train: random scale/crop/flip/jitter (`TrainTransform`) instead of native-size eval.
        crop: training crop (H, W).
        seed: base seed of the per-sample augmentation stream.
        transform: overrides the transform chosen by `train`.
        validate: scan all files at construction (a few seconds for the full dataset).
        norm: the backbone's input normalisation (`ivt.models.normalization_for(name)`).
    """

    def __init__(self, root: Union[str, Path], split: str = "train", train: bool = True,
                 crop: Tuple[int, int] = (512, 512), seed: int = 0,
                 transform: Optional[Callable] = None, validate: bool = True,
                 norm: Normalization = IMAGENET):
        self.root = Path(root)
        self.split = split
        names = []
        for part in split_parts(split, MFNET_SPLITS):
            names += read_split_list(self.root / f"{part}.txt", allow_flip=part.startswith("train"))
        samples = [Sample(n, self.root / "images" / f"{n}.png", self.root / "images" / f"{n}.png",
                          self.root / "labels" / f"{n}.png") for n in names]
        super().__init__(samples, train, crop, seed, transform, validate, norm)

    def check_pair(self, sample: Sample) -> Tuple[int, int]:
        size, mode = header(sample.vis)
        _check_four_channels(mode, sample.vis)
        return size

    def read_pair(self, sample: Sample) -> Tuple[np.ndarray, np.ndarray]:
        im = open_image(sample.vis)
        _check_four_channels(im.mode, sample.vis)
        rgbt = np.array(im, dtype=np.uint8)  # (H, W, 4)
        return rgbt[..., :3], rgbt[..., 3]


def _check_four_channels(mode: str, path: Path) -> None:
    channels = Image.getmodebands(mode)
    if channels != 4:
        raise ValueError(f"{path}: image has mode {mode} ({channels} channels); MFNet images "
                         f"are 4-channel (R, G, B, thermal): the thermal channel is missing")
