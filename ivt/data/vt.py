"""VT5000 / VT1000 / VT821: RGB-thermal salient object detection (docs/data.md, "VT5000 ...").

On-disk layout: one folder per set, each holding three sub-folders of files with the same stem

    VT5000/Train/{RGB,T,GT}/   VT5000/Test/{RGB,T,GT}/   VT1000/{RGB,T,GT}/   VT821/{RGB,T,GT}/

RGB `.jpg`; T `.jpg` (3-channel colour-mapped thermal); GT `.png` (some VT821/VT1000 GTs are
`.jpg`), 0/255 masks. `.png`, `.jpg`/`.jpeg` and `.bmp` are accepted in every folder.

* Files are paired by stem across the three folders, never by sorted order: a stem missing from
  any folder is an error that names it and the folder.
* Thermal is converted to grayscale (Pillow's 'L') and repeated to 3 channels, as the authors'
  code does (`ivt.data.transforms.thermal_to_tensor`).
* Evaluation GTs are binarised with `> 128` (JPEG GTs are not exactly 0/255).
* Training items are S x S with paired augmentation, the same geometry for RGB, T and GT and
  photometric changes on RGB only. Two recipes (`augment`):
  `release` (the default), the authors' SOD release step for step (SOD-IV-tuning/data.py,
  `SODReleaseTransform`): flip, a centred crop up to 30 pixels smaller per side, a rotation by
  up to 15 degrees in one item of five, colour enhancement, salt-and-pepper noise on the GT, a
  bilinear resize; its GT is SOFT (the grey values of the rotated and resized GT, in [0, 1]).
  `standard` (`SODTrainTransform`): flip, a random crop with scale and aspect jitter, rotation of
  up to +-10 degrees, photometric jitter; its GT is binary.
  Evaluation items are resized to S x S with the GT kept at its own size: metrics are computed
  at GT size (docs/data.md), so evaluate with batch size 1.
"""
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset

from .geometry import crop_resize, random_window
from .io import image_size, open_image, open_thermal, open_visible, verify_images
from .transforms import (IMAGENET, Normalization, photometric_jitter, thermal_to_tensor,
                         visible_to_tensor)

FOLDERS = ("RGB", "T", "GT")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
GT_THRESHOLD = 128      # foreground = GT > 128 (docs/data.md)
AUGMENTATIONS = ("release", "standard")
# The authors' SOD release, SOD-IV-tuning/data.py:
CROP_BORDER = 30            # randomCrop: window sides drawn from [W - 30, W) and [H - 30, H)
ROTATE_ABOVE = 0.8          # randomRotation rotates when `random.random() > 0.8` (p = 0.2)
ROTATE_ANGLES = (-15, 15)   # ... `np.random.randint(-15, 15)`: integer degrees, 15 excluded
PEPPER_FRACTION = 0.0015    # randomPeper: int(0.0015 * H * W) GT pixels set to 0 or 255


def natural_key(stem: str) -> List[Union[int, str]]:
    """Sort key that puts '2' before '10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


def _folder_files(folder: Path) -> Dict[str, Path]:
    """{stem: path} of the images in `folder`; two files with one stem are an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"SOD folder {folder} not found (expected RGB/, T/ and GT/ "
                                f"side by side)")
    files: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.stem in files:
            raise ValueError(f"{folder}: stem {p.stem!r} appears twice ({files[p.stem].name} and "
                             f"{p.name}); keep one file per stem")
        files[p.stem] = p
    if not files:
        raise ValueError(f"SOD folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _pair_files(root: Path, stems: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Path]]:
    """{folder: {stem: path}} for RGB, T and GT; every stem (all present anywhere, or the given
    `stems`) must exist in all three folders, else a ValueError lists each missing one."""
    files = {f: _folder_files(root / f) for f in FOLDERS}
    wanted = set().union(*files.values()) if stems is None else set(stems)
    missing = []
    for f in FOLDERS:
        absent = sorted(wanted - set(files[f]), key=natural_key)
        if absent:
            missing.append(f"  {root / f}: no file for stem(s) {', '.join(absent)}")
    if missing:
        raise ValueError(f"{root}: RGB/T/GT files do not pair up by stem:\n" + "\n".join(missing))
    return files


def list_vt_stems(root: Union[str, Path]) -> List[str]:
    """The stems of a VT-layout folder (`root/{RGB,T,GT}`), in natural order; a stem missing
    from any of the three folders is a ValueError naming it."""
    files = _pair_files(Path(root))
    return sorted(files["GT"], key=natural_key)


def split_train_val(stems: Sequence[str], val: Union[float, int] = 0.1,
                    seed: int = 0) -> Tuple[List[str], List[str]]:
    """Seeded random split of `stems` into (train, val), both in natural order. `val` is a
    fraction in (0, 1) (rounded, at least 1 image) or a number of images."""
    stems = sorted(stems, key=natural_key)
    if len(set(stems)) != len(stems):
        raise ValueError("split_train_val: stems contain duplicates")
    if isinstance(val, float):
        if not 0.0 < val < 1.0:
            raise ValueError(f"validation fraction {val} must be in (0, 1)")
        n_val = max(1, round(val * len(stems)))
    elif isinstance(val, int) and not isinstance(val, bool):
        n_val = val
    else:
        raise TypeError(f"val must be a float fraction or an int count, got {val!r}")
    if not 0 < n_val < len(stems):
        raise ValueError(f"cannot hold out {n_val} of {len(stems)} images for validation")
    chosen = set(np.random.default_rng(seed).permutation(len(stems))[:n_val].tolist())
    train = [s for i, s in enumerate(stems) if i not in chosen]
    held = [s for i, s in enumerate(stems) if i in chosen]
    return train, held


def binarize_gt(gt: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W) uint8 in {0, 255}: foreground = GT > 128."""
    return np.where(gt > GT_THRESHOLD, 255, 0).astype(np.uint8)


class SODTrainTransform:
    """Paired augmentation of (RGB, T, GT) Pillow images to S x S tensors.

    Geometry, identical for the three images: horizontal flip (probability `flip_prob`); rotation
    by an angle uniform in +-`rotate_deg` about the centre of a random window (sides `crop_scale`
    times the image's, aspect ratio jittered by up to `aspect`), the window then resized to S x S.
    RGB and T are resampled bilinearly, GT with NEAREST (then binarised). Areas rotated in from
    outside the image are 0 in all three. Photometric jitter touches RGB only.
    """

    def __init__(self, size: int = 384, flip_prob: float = 0.5, rotate_deg: float = 10.0,
                 crop_scale: Tuple[float, float] = (0.75, 1.0),
                 aspect: Tuple[float, float] = (0.9, 1.1), jitter: bool = True,
                 norm: Normalization = IMAGENET):
        self.size = (size, size)
        self.flip_prob = flip_prob
        self.rotate_deg = rotate_deg
        self.crop_scale = crop_scale
        self.aspect = aspect
        self.jitter = jitter
        self.norm = norm

    def __call__(self, vis: Image.Image, ir: Image.Image, gt: Image.Image,
                 rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        """vis 'RGB', ir 'L', gt 'L' (same size) -> vis, ir (3, S, S) float, mask (1, S, S) 0/1."""
        if self.jitter:
            vis = Image.fromarray(photometric_jitter(np.asarray(vis), rng).round().astype(np.uint8))
        flip = rng.random() < self.flip_prob
        window = random_window(rng, (gt.height, gt.width), self.crop_scale, self.aspect)
        angle = rng.uniform(-self.rotate_deg, self.rotate_deg)
        centre = ((window[0] + window[2]) / 2, (window[1] + window[3]) / 2)
        out = []
        for img, resample in ((vis, Image.BILINEAR), (ir, Image.BILINEAR), (gt, Image.NEAREST)):
            if angle != 0.0:
                img = img.rotate(angle, resample=resample, center=centre)
            out.append(np.asarray(crop_resize(img, window, self.size, resample, flip)))
        vis_a, ir_a, gt_a = out
        mask = torch.from_numpy((gt_a > GT_THRESHOLD).astype(np.float32))[None]
        return {"vis": visible_to_tensor(vis_a, self.norm),
                "ir": thermal_to_tensor(ir_a, self.norm), "mask": mask}


def _crop_side(rng: np.random.Generator, n: int) -> int:
    """A centred-crop side for an image side of n pixels: uniform in [n - 30, n), at least 1."""
    return int(rng.integers(max(n - CROP_BORDER, 1), max(n, 2)))


class SODReleaseTransform:
    """The authors' SOD training augmentation (SOD-IV-tuning/data.py, `SalObjDataset.__getitem__`)
    step for step, with every draw from `rng`, in this order (the release's Python `random` and
    `np.random` draws, same ranges):

    1. flip: `rng.integers(0, 2) == 1` mirrors RGB, T and GT left-right (`cv_random_flip`).
    2. crop: w = `rng.integers(W - 30, W)`, h = `rng.integers(H - 30, H)` (at least 1 pixel, for
       images up to 30 pixels wide or high); RGB, T and GT are cropped to the centred window
       ((W - w) >> 1, (H - h) >> 1, (W + w) >> 1, (H + h) >> 1) (`randomCrop`).
    3. rotation: if `rng.random() > 0.8` (probability 0.2), angle = `rng.integers(-15, 15)`
       degrees (counter-clockwise, 15 excluded), and RGB, T and GT are rotated by it about their
       centre with bicubic resampling, the corners filled with 0 (`randomRotation`).
    4. colour, RGB only: brightness `rng.integers(5, 16) / 10`, contrast `rng.integers(5, 16) / 10`,
       colour `rng.integers(0, 21) / 10`, sharpness `rng.integers(0, 31) / 10` (Python's
       inclusive `random.randint(5, 15)` etc.), applied in that order with PIL's ImageEnhance
       (`colorEnhance`).
    5. salt and pepper, GT only: n = int(0.0015 * h * w); rows = `rng.integers(0, h, n)`, then
       cols = `rng.integers(0, w, n)`, then values = 255 * `rng.integers(0, 2, n)`; pixel
       (rows[i], cols[i]) is set to values[i] for i = 0 .. n-1 in turn (`randomPeper`).
    6. resize: RGB, T and GT to S x S, bilinear (PIL's, what torchvision's `Resize` runs on PIL
       images).

    The GT is read as grey values ('L') and not binarised: `mask` = GT / 255 (the release's
    `ToTensor`) is a soft target in [0, 1], fractional along the edges the rotation and the
    resize blend. RGB and T are normalised as everywhere else (`visible_to_tensor`,
    `thermal_to_tensor`; the release fed thermal unnormalised).
    """

    def __init__(self, size: int = 384, norm: Normalization = IMAGENET):
        self.size = (size, size)
        self.norm = norm

    def __call__(self, vis: Image.Image, ir: Image.Image, gt: Image.Image,
                 rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        """vis 'RGB', ir 'L', gt 'L' (same size) -> vis, ir (3, S, S) float, mask (1, S, S)
        float in [0, 1]."""
        images = [vis, ir, gt]
        if rng.integers(0, 2) == 1:
            images = [img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for img in images]
        W, H = gt.size
        w, h = _crop_side(rng, W), _crop_side(rng, H)
        window = ((W - w) >> 1, (H - h) >> 1, (W + w) >> 1, (H + h) >> 1)
        images = [img.crop(window) for img in images]
        if rng.random() > ROTATE_ABOVE:
            angle = int(rng.integers(*ROTATE_ANGLES))
            images = [img.rotate(angle, resample=Image.BICUBIC) for img in images]
        vis, ir, gt = images
        for enhance, (lo, hi) in ((ImageEnhance.Brightness, (5, 15)),
                                  (ImageEnhance.Contrast, (5, 15)),
                                  (ImageEnhance.Color, (0, 20)),
                                  (ImageEnhance.Sharpness, (0, 30))):
            vis = enhance(vis).enhance(int(rng.integers(lo, hi + 1)) / 10.0)
        g = np.array(gt)                                                 # (h, w) uint8
        n = int(PEPPER_FRACTION * g.shape[0] * g.shape[1])
        rows, cols = rng.integers(0, g.shape[0], n), rng.integers(0, g.shape[1], n)
        values = 255 * rng.integers(0, 2, n)
        for r, c, v in zip(rows, cols, values):                          # a later draw wins
            g[r, c] = v
        s = (self.size[1], self.size[0])
        vis_a, ir_a, gt_a = (np.asarray(img.resize(s, Image.BILINEAR))
                             for img in (vis, ir, Image.fromarray(g)))
        mask = torch.from_numpy(gt_a.astype(np.float32) / 255.0)[None]
        return {"vis": visible_to_tensor(vis_a, self.norm),
                "ir": thermal_to_tensor(ir_a, self.norm), "mask": mask}


class SODEvalTransform:
    """RGB and T resized to S x S (bilinear); GT at its own size, binarised to 0/255 uint8."""

    def __init__(self, size: int = 384, norm: Normalization = IMAGENET):
        self.size = size
        self.norm = norm

    def __call__(self, vis: Image.Image, ir: Image.Image, gt: Image.Image,
                 rng: Optional[np.random.Generator] = None) -> Dict[str, torch.Tensor]:
        s = (self.size, self.size)
        vis_a = np.asarray(vis.resize(s, Image.BILINEAR))
        ir_a = np.asarray(ir.resize(s, Image.BILINEAR))
        return {"vis": visible_to_tensor(vis_a, self.norm),
                "ir": thermal_to_tensor(ir_a, self.norm),
                "gt": torch.from_numpy(binarize_gt(np.asarray(gt)))}


class VTDataset(Dataset):
    """One VT-layout folder (VT5000/Train, VT5000/Test, VT1000 or VT821).

    Args:
        root: the folder holding `RGB/`, `T/` and `GT/`.
        train: augmented S x S items {'vis', 'ir', 'mask' (1, S, S) float, 'name'}; otherwise
            {'vis', 'ir' resized to S x S, 'gt' (H, W) uint8 0/255 at GT size, 'name'}.
        size: S, the network input side (the paper: 384).
        seed: base seed; augmentation draws from `np.random.default_rng([seed, epoch, index])`,
            so call `set_epoch` every epoch (a resumed run replays the same augmentation).
        norm: the backbone's input normalisation (`ivt.models.normalization_for(name)`).
        stems: use only these stems (e.g. a validation list from `split_train_val`); each must
            exist in all three folders.
        validate: header check at construction: RGB, T and GT of each stem have one size.
        verify: decode every file at construction (`ivt.data.io.verify_images`).
        augment: the training augmentation: 'release' (`SODReleaseTransform`, the authors' SOD
            release; soft masks in [0, 1]) or 'standard' (`SODTrainTransform`; masks 0/1).
    """

    def __init__(self, root: Union[str, Path], train: bool, size: int = 384, seed: int = 0,
                 norm: Normalization = IMAGENET, stems: Optional[Sequence[str]] = None,
                 validate: bool = True, verify: bool = False, augment: str = "release"):
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment={augment!r}: expected one of {', '.join(AUGMENTATIONS)}")
        self.root = Path(root)
        self.train = train
        self.seed = seed
        self.epoch = 0
        if stems is not None:
            stems = list(stems)
            if not stems:
                raise ValueError(f"{self.root}: empty stem list")
            if len(set(stems)) != len(stems):
                raise ValueError(f"{self.root}: stem list contains duplicates")
        files = _pair_files(self.root, stems)
        self.stems: List[str] = stems if stems is not None else sorted(files["GT"], key=natural_key)
        self.files = [tuple(files[f][s] for f in FOLDERS) for s in self.stems]  # (rgb, t, gt)
        if not train:
            self.transform = SODEvalTransform(size, norm)
        elif augment == "release":
            self.transform = SODReleaseTransform(size, norm)
        else:
            self.transform = SODTrainTransform(size, norm=norm)
        if validate:
            self.validate()
        if verify:
            self.verify()

    def verify(self) -> int:
        """Decode every RGB, T and GT file (`BadImageError` names the first that fails);
        returns the number of files."""
        return verify_images([p for triple in self.files for p in triple],
                             desc=f"verify {self.root}")

    def validate(self) -> None:
        """Header check of every triple: RGB, T and GT have the same size."""
        for rgb, t, gt in self.files:
            sizes = {p: image_size(p) for p in (rgb, t, gt)}
            if len(set(sizes.values())) > 1:
                listing = ", ".join(f"{p} (H, W) = {hw}" for p, hw in sizes.items())
                raise ValueError(f"RGB, T and GT sizes differ: {listing}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def image_paths(self) -> List[Path]:
        """The visible image of every item, in order."""
        return [rgb for rgb, _, _ in self.files]

    def __len__(self) -> int:
        return len(self.stems)

    def _open(self, index: int) -> Tuple[Image.Image, Image.Image, Image.Image]:
        """RGB 'RGB', thermal 'L', GT 'L' (not yet binarised), checked to share one size."""
        rgb, t, gt = self.files[index]
        vis, ir, mask = open_visible(rgb), open_thermal(t), open_image(gt).convert("L")
        if not vis.size == ir.size == mask.size:
            raise ValueError(f"RGB, T and GT sizes differ: {rgb} {vis.size}, {t} {ir.size}, "
                             f"{gt} {mask.size} (W, H)")
        levels = [v for v, count in enumerate(mask.histogram()) if count]
        if len(levels) <= 2 and 0 < levels[-1] <= GT_THRESHOLD:
            # a two-level mask whose marked level is not foreground (> 128): a 0/1 mask, read as
            # empty (a JPEG's noise on an empty mask has more levels)
            raise ValueError(f"{gt}: a ground-truth mask of values {levels}, none above the "
                             f"foreground threshold {GT_THRESHOLD}: masks are 0/255 (a 0/1 "
                             f"mask: multiply it by 255)")
        return vis, ir, mask

    def read_images(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Original-size arrays for visualisation: vis (H, W, 3), ir gray (H, W), gt (H, W) 0/255,
        all uint8."""
        vis, ir, gt = self._open(index)
        return np.asarray(vis), np.asarray(ir), binarize_gt(np.asarray(gt))

    def __getitem__(self, index: int) -> dict:
        vis, ir, gt = self._open(index)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        item = self.transform(vis, ir, gt, rng)
        item["name"] = self.stems[index]
        return item
