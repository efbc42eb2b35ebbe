"""Windowed resampling shared by the paired SOD and detection augmentations.

Coordinates are continuous pixel coordinates, as Pillow uses them: pixel (i, j) covers
[j, j + 1) x [i, i + 1), so an image of width W spans x in [0, W]. A *window* (x0, y0, x1, y1) is a
rectangle in these coordinates; it may extend past the image (zoom-out), where the output is 0.
`crop_resize` maps the window onto an output of `size` = (H', W') pixels:

    u = (x - x0) * W' / (x1 - x0),   v = (y - y0) * H' / (y1 - y0),   u -> W' - u if flipped

and `window_boxes` applies the same map to boxes, so a box drawn on the image lands exactly where
the transformed box says. One resampling per image, antialiased by Pillow when it shrinks.
"""
import math
from typing import Tuple

import numpy as np
from PIL import Image

Window = Tuple[float, float, float, float]


def crop_resize(img: Image.Image, window: Window, size: Tuple[int, int], resample: int,
                flip: bool = False) -> Image.Image:
    """The part of `img` inside `window`, resized to `size` = (H', W'); outside the image is 0."""
    x0, y0, x1, y1 = window
    ix0, iy0 = math.floor(x0), math.floor(y0)
    ix1, iy1 = math.ceil(x1), math.ceil(y1)
    patch = img.crop((ix0, iy0, ix1, iy1))          # zero-padded where it leaves the image
    out = patch.resize((size[1], size[0]), resample=resample,
                       box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def window_boxes(boxes: np.ndarray, window: Window, size: Tuple[int, int],
                 flip: bool = False) -> np.ndarray:
    """(n, 4) xyxy boxes in image coordinates -> the same boxes in the `crop_resize` output
    (not clipped)."""
    x0, y0, x1, y1 = window
    sx, sy = size[1] / (x1 - x0), size[0] / (y1 - y0)
    out = np.empty_like(boxes, dtype=np.float32)
    out[:, [0, 2]] = (boxes[:, [0, 2]] - x0) * sx
    out[:, [1, 3]] = (boxes[:, [1, 3]] - y0) * sy
    if flip:
        out[:, [0, 2]] = size[1] - out[:, [2, 0]]
    return out


def random_window(rng: np.random.Generator, image_size: Tuple[int, int],
                  scale: Tuple[float, float], aspect: Tuple[float, float]) -> Window:
    """A window inside an image of `image_size` = (H, W): each side `s` times the image's (s drawn
    from `scale`), the aspect ratio then multiplied by r (log-uniform in `aspect`), clipped to the
    image, at a uniform position."""
    h, w = image_size
    s = rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    ww = min(w * s * math.sqrt(r), w)
    wh = min(h * s / math.sqrt(r), h)
    x0 = rng.uniform(0.0, w - ww)
    y0 = rng.uniform(0.0, h - wh)
    return (x0, y0, x0 + ww, y0 + wh)
