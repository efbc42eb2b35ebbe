"""Paired detection transforms: visible and thermal images and their boxes move together.

The whole image (or a random window of it) is resized to S x S; the aspect ratio may change, as in
RT-DETR, and evaluation maps predictions back with the two scale factors (W0 / S, H0 / S).
Boxes are (n, 4) xyxy in continuous pixel coordinates (`ivt.data.geometry`). Training adds, in this
order (RT-DETR's recipe):

1. photometric jitter of the visible image only (thermal intensities are temperatures);
2. zoom-out (probability `zoom_out_prob`): the image placed at a random position on a zero canvas
   up to `max_zoom_out` times its size, so objects get smaller;
3. random crop (probability `crop_prob`) of the canvas: sides `crop_scale` times the canvas's,
   aspect ratio times up to `crop_aspect`; a crop is redrawn (up to 10 times) until it holds the
   centre of at least one box, else the whole canvas is kept;
4. horizontal flip (probability `flip_prob`).

Steps 2-4 together define one window and a flip, applied by `crop_resize` to both images and by
`window_boxes` to the boxes: a single resampling. Boxes are then clipped to the S x S output;
a box keeping less than `min_visible` of its area, or narrower or lower than `min_size` output
pixels, is dropped.
"""
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .geometry import Window, crop_resize, random_window, window_boxes
from .transforms import (IMAGENET, Normalization, photometric_jitter, thermal_to_tensor,
                         visible_to_tensor)

CROP_TRIES = 10


def clip_boxes(boxes: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(n, 4) xyxy clipped to an image of `size` = (H, W)."""
    out = boxes.copy()
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, size[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, size[0])
    return out


def box_area(boxes: np.ndarray) -> np.ndarray:
    """(n, 4) xyxy -> (n,) area (0 for degenerate boxes)."""
    return (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)


def _targets(boxes: np.ndarray, labels: np.ndarray, ignore: np.ndarray) -> Dict[str, torch.Tensor]:
    return {"boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "ignore": torch.from_numpy(np.ascontiguousarray(ignore, dtype=bool))}


class DetTrainTransform:
    """(vis 'RGB', ir 'L' Pillow images, boxes (n, 4), labels (n,), ignore (n,)) ->
    {'vis', 'ir' (3, S, S) float, 'boxes' (m, 4) float32 in S x S pixels, 'labels' (m,) int64,
    'ignore' (m,) bool}, m <= n."""

    def __init__(self, size: int = 640, flip_prob: float = 0.5, zoom_out_prob: float = 0.5,
                 max_zoom_out: float = 2.0, crop_prob: float = 0.8,
                 crop_scale: Tuple[float, float] = (0.3, 1.0),
                 crop_aspect: Tuple[float, float] = (0.5, 2.0), min_visible: float = 0.25,
                 min_size: float = 1.0, jitter: bool = True, norm: Normalization = IMAGENET):
        self.size = (size, size)
        self.flip_prob = flip_prob
        self.zoom_out_prob = zoom_out_prob
        self.max_zoom_out = max_zoom_out
        self.crop_prob = crop_prob
        self.crop_scale = crop_scale
        self.crop_aspect = crop_aspect
        self.min_visible = min_visible
        self.min_size = min_size
        self.jitter = jitter
        self.norm = norm

    def sample_window(self, rng: np.random.Generator, image_size: Tuple[int, int],
                      boxes: np.ndarray) -> Window:
        """Zoom-out canvas, then a crop of it, as a window in image coordinates."""
        h, w = image_size
        canvas = (0.0, 0.0, float(w), float(h))
        if rng.random() < self.zoom_out_prob:
            z = rng.uniform(1.0, self.max_zoom_out)
            ox, oy = rng.uniform(0.0, (z - 1) * w), rng.uniform(0.0, (z - 1) * h)
            canvas = (-ox, -oy, z * w - ox, z * h - oy)
        if rng.random() >= self.crop_prob:
            return canvas
        cw, ch = canvas[2] - canvas[0], canvas[3] - canvas[1]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        for _ in range(CROP_TRIES):
            x0, y0, x1, y1 = random_window(rng, (ch, cw), self.crop_scale, self.crop_aspect)
            window = (canvas[0] + x0, canvas[1] + y0, canvas[0] + x1, canvas[1] + y1)
            inside = ((centres[:, 0] > window[0]) & (centres[:, 0] < window[2])
                      & (centres[:, 1] > window[1]) & (centres[:, 1] < window[3]))
            if len(boxes) == 0 or inside.any():
                return window
        return canvas

    def __call__(self, vis: Image.Image, ir: Image.Image, boxes: np.ndarray, labels: np.ndarray,
                 ignore: np.ndarray, rng: np.random.Generator) -> Dict[str, torch.Tensor]:
        if self.jitter:
            vis = Image.fromarray(photometric_jitter(np.asarray(vis), rng).round().astype(np.uint8))
        window = self.sample_window(rng, (vis.height, vis.width), boxes)
        flip = rng.random() < self.flip_prob
        vis_a = np.asarray(crop_resize(vis, window, self.size, Image.BILINEAR, flip))
        ir_a = np.asarray(crop_resize(ir, window, self.size, Image.BILINEAR, flip))

        moved = window_boxes(boxes, window, self.size, flip)
        clipped = clip_boxes(moved, self.size)
        full = box_area(moved)
        visible = np.divide(box_area(clipped), full, out=np.zeros_like(full), where=full > 0)
        keep = ((visible >= self.min_visible)
                & (clipped[:, 2] - clipped[:, 0] >= self.min_size)
                & (clipped[:, 3] - clipped[:, 1] >= self.min_size))
        item = _targets(clipped[keep], labels[keep], ignore[keep])
        item["vis"] = visible_to_tensor(vis_a, self.norm)
        item["ir"] = thermal_to_tensor(ir_a, self.norm)
        return item


class DetEvalTransform:
    """Both images resized to S x S (bilinear); boxes scaled by (S / W0, S / H0), none dropped."""

    def __init__(self, size: int = 640, norm: Normalization = IMAGENET):
        self.size = (size, size)
        self.norm = norm

    def __call__(self, vis: Image.Image, ir: Image.Image, boxes: np.ndarray, labels: np.ndarray,
                 ignore: np.ndarray, rng: Optional[np.random.Generator] = None
                 ) -> Dict[str, torch.Tensor]:
        window = (0.0, 0.0, float(vis.width), float(vis.height))
        item = _targets(window_boxes(boxes, window, self.size), labels, ignore)
        item["vis"] = visible_to_tensor(np.asarray(crop_resize(vis, window, self.size,
                                                               Image.BILINEAR)), self.norm)
        item["ir"] = thermal_to_tensor(np.asarray(crop_resize(ir, window, self.size,
                                                              Image.BILINEAR)), self.norm)
        return item
