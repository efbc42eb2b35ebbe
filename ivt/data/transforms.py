"""Paired transforms for infrared-visible segmentation.

Geometric augmentations must hit the visible image, the thermal image and the label identically,
or the pixels of the three stop corresponding. Photometric jitter only makes sense for the visible
image (thermal intensities are temperatures). Inputs are numpy arrays:

    vis   uint8 (H, W, 3)  visible RGB
    ir    uint8 (H, W) or (H, W, 3)  thermal; 3 channels are reduced to one (PIL's 'L' weights)
    label uint8 (H, W)     class ids, 255 = ignore

Randomness comes only from the `numpy.random.Generator` passed to the call; datasets build it
from (seed, epoch, index), so an epoch replays exactly after a resume.

Outputs are tensors: `vis` (3, H, W) float normalised with the mean/std the frozen backbone was
pre-trained with (a `Normalization`: ImageNet's for Swin, OpenAI CLIP's for EVA02; the backbone
says which, `ivt.models.normalization_for`); `ir` (3, H, W) float (thermal normalisation: the
single channel is scaled to [0, 1], normalised with mean 0.5 and std 0.25, then repeated to 3
channels so the RGB patch embedding accepts it: no pre-trained model has seen thermal images, so
this only centres them, for every backbone); `label` (H, W) int64.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)     # OpenAI CLIP; EVA02's MIM pre-training
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
THERMAL_MEAN = 0.5
THERMAL_STD = 0.25


@dataclass(frozen=True)
class Normalization:
    """Input scaling of one backbone: visible (x/255 - mean)/std per RGB channel (the statistics
    its checkpoint was pre-trained with), thermal (x/255 - thermal_mean)/thermal_std."""
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    thermal_mean: float = THERMAL_MEAN
    thermal_std: float = THERMAL_STD

    def as_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std),
                "thermal_mean": self.thermal_mean, "thermal_std": self.thermal_std}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(tuple(d["mean"]), tuple(d["std"]), d["thermal_mean"], d["thermal_std"])


IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)   # Swin (ImageNet-22K)
CLIP = Normalization(CLIP_MEAN, CLIP_STD)               # EVA02 (MIM on Merged-38M)
IMAGE_PAD = 0     # pad value for visible and thermal images
LABEL_PAD = 255   # pad value for labels: ignored by the loss and the metric (docs/data.md)


def thermal_to_gray(ir: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W) uint8, 3 channels reduced like PIL's convert('L')."""
    if ir.ndim == 2:
        return ir
    if ir.ndim == 3 and ir.shape[2] == 3:
        return np.asarray(Image.fromarray(ir).convert("L"))
    raise ValueError(f"thermal image must be (H, W) or (H, W, 3), got shape {ir.shape}")


def pad_black(vis: torch.Tensor, ir: Optional[torch.Tensor], multiple: int,
              norm: Normalization) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Normalised vis (B, 3, H, W) and ir (B, 1 or 3, H, W) padded at the bottom and right to
    sides that are multiples of `multiple`, with what a black pixel normalises to: the same
    tensors as `pad_to(img, size, IMAGE_PAD)` before normalising."""
    H, W = vis.shape[2:]
    size = (-(-H // multiple) * multiple, -(-W // multiple) * multiple)
    if size == (H, W):
        return vis, ir
    pixel = np.full((1, 1, 3), IMAGE_PAD, np.uint8)

    def pad(x: torch.Tensor, black: torch.Tensor) -> torch.Tensor:            # black: (C', 1, 1)
        out = x.new_empty(*x.shape[:2], *size)
        out[:] = black[:x.shape[1]].to(x)
        out[:, :, :H, :W] = x
        return out

    return (pad(vis, visible_to_tensor(pixel, norm)),
            None if ir is None else pad(ir, thermal_to_tensor(pixel[..., 0], norm)))


def resize(img: np.ndarray, size: Tuple[int, int], resample: int) -> np.ndarray:
    """Resize a uint8 (H, W) or (H, W, 3) array to `size` = (H', W') with a PIL resample filter."""
    h, w = size
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def pad_to(img: np.ndarray, min_size: Tuple[int, int], value: int) -> np.ndarray:
    """Pad bottom and right so that the array is at least `min_size` = (H, W)."""
    ph = max(min_size[0] - img.shape[0], 0)
    pw = max(min_size[1] - img.shape[1], 0)
    if ph == 0 and pw == 0:
        return img
    widths = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, widths, mode="constant", constant_values=value)


def photometric_jitter(vis: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation and hue jitter, each applied with probability 0.5.

    (H, W, 3) uint8 -> (H, W, 3) float32 in [0, 255]. Hue is a rotation of the chroma plane in
    YIQ space, a cheap stand-in for an HSV hue shift.
    """
    img = vis.astype(np.float32)
    if rng.random() < 0.5:  # brightness
        img = img + rng.uniform(-32.0, 32.0)
    if rng.random() < 0.5:  # contrast around the mean intensity
        mean = img.mean()
        img = (img - mean) * rng.uniform(0.5, 1.5) + mean
    if rng.random() < 0.5:  # saturation: blend with the grey image
        gray = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        img = gray[..., None] + (img - gray[..., None]) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.5:  # hue: rotate (I, Q) by up to +-18 degrees
        theta = rng.uniform(-np.pi / 10, np.pi / 10)
        rgb_to_yiq = np.array([[0.299, 0.587, 0.114],
                               [0.596, -0.274, -0.322],
                               [0.211, -0.523, 0.312]], dtype=np.float32)
        c, s = np.cos(theta), np.sin(theta)
        rotate = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)
        m = np.linalg.inv(rgb_to_yiq) @ rotate @ rgb_to_yiq
        img = img @ m.T.astype(np.float32)
    return np.clip(img, 0.0, 255.0)


def visible_to_tensor(vis: np.ndarray, norm: Normalization = IMAGENET) -> torch.Tensor:
    """(H, W, 3) in [0, 255] -> (3, H, W) float32, normalised with `norm.mean`, `norm.std`."""
    x = torch.from_numpy(np.ascontiguousarray(vis, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(norm.mean).view(3, 1, 1)
    std = torch.tensor(norm.std).view(3, 1, 1)
    return (x - mean) / std


def thermal_to_tensor(ir: np.ndarray, norm: Normalization = IMAGENET) -> torch.Tensor:
    """(H, W) uint8 -> (3, H, W) float32: (x / 255 - 0.5) / 0.25 (`norm.thermal_*`), repeated."""
    x = torch.from_numpy(np.ascontiguousarray(ir, dtype=np.float32) / 255.0)
    x = (x - norm.thermal_mean) / norm.thermal_std
    return x.unsqueeze(0).repeat(3, 1, 1)


def label_to_tensor(label: np.ndarray) -> torch.Tensor:
    """(H, W) uint8 -> (H, W) int64."""
    return torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))


class TrainTransform:
    """Random scale, random crop (with padding), horizontal flip; jitter on the visible image only.

    Args:
        crop: output (H, W). Images smaller than this after scaling are padded bottom/right with
            0 (images) and 255 (label).
        scale_range: the image is resized by a factor drawn uniformly from this range,
            bilinear for images and NEAREST for the label (Pillow's default for mode L is not).
        flip_prob: probability of a horizontal flip.
        jitter: apply `photometric_jitter` to the visible image.
        norm: input normalisation of the backbone (`Normalization`).
    """

    def __init__(self, crop: Tuple[int, int] = (512, 512),
                 scale_range: Tuple[float, float] = (0.5, 2.0),
                 flip_prob: float = 0.5, jitter: bool = True, norm: Normalization = IMAGENET):
        self.norm = norm
        self.crop = tuple(crop)
        self.scale_range = tuple(scale_range)
        self.flip_prob = flip_prob
        self.jitter = jitter

    def __call__(self, vis: np.ndarray, ir: np.ndarray, label: np.ndarray,
                 rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        ir = thermal_to_gray(ir)
        h, w = label.shape
        scale = rng.uniform(*self.scale_range)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            vis = resize(vis, size, Image.BILINEAR)
            ir = resize(ir, size, Image.BILINEAR)
            label = resize(label, size, Image.NEAREST)

        # Cropping before padding equals padding first (padding is bottom/right) and keeps the
        # jitter off the padded pixels.
        ch, cw = self.crop
        y0 = int(rng.integers(0, max(label.shape[0] - ch, 0) + 1))
        x0 = int(rng.integers(0, max(label.shape[1] - cw, 0) + 1))
        vis = vis[y0:y0 + ch, x0:x0 + cw]
        ir = ir[y0:y0 + ch, x0:x0 + cw]
        label = label[y0:y0 + ch, x0:x0 + cw]
        if self.jitter:
            vis = photometric_jitter(vis, rng)
        vis = pad_to(vis, self.crop, IMAGE_PAD)
        ir = pad_to(ir, self.crop, IMAGE_PAD)
        label = pad_to(label, self.crop, LABEL_PAD)

        if rng.random() < self.flip_prob:
            vis, ir, label = vis[:, ::-1], ir[:, ::-1], label[:, ::-1]
        return {"vis": visible_to_tensor(vis, self.norm), "ir": thermal_to_tensor(ir, self.norm),
                "label": label_to_tensor(label)}


class EvalTransform:
    """No augmentation: native size, normalisation only (metrics are computed at native size)."""

    def __init__(self, norm: Normalization = IMAGENET):
        self.norm = norm

    def __call__(self, vis: np.ndarray, ir: np.ndarray, label: np.ndarray,
                 rng: Optional[np.random.Generator] = None) -> Dict[str, torch.Tensor]:
        return {"vis": visible_to_tensor(vis, self.norm),
                "ir": thermal_to_tensor(thermal_to_gray(ir), self.norm),
                "label": label_to_tensor(label)}
