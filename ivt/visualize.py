"""Drawing predictions on the images they came from, with Pillow only (no plotting library).

    colourise(label, palette)                    class ids -> colour image
    overlay_segmentation(vis, label, ...)        colour overlay + legend (class, pixel share)
    overlay_saliency(vis, saliency)              red tint proportional to the saliency
    draw_boxes(image, boxes, names, scores)      boxes with "class score" tags

Images are numpy arrays: visible (H, W, 3) uint8, grey (H, W) uint8, class ids (H, W) integer,
saliency (H, W) uint8; the drawing functions return a `PIL.Image` in mode RGB.
"""
import colorsys
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data import CLASSES, PALETTE

Colour = Tuple[int, int, int]
IGNORE_COLOUR = (255, 255, 255)     # label 255 (padding / ignore)
SALIENCY_COLOUR = (255, 32, 32)


def distinct_colours(n: int, start: int = 0) -> Tuple[Colour, ...]:
    """`n` fixed, well-spread saturated colours (golden-ratio steps around the hue circle)."""
    return tuple(tuple(round(255 * c) for c in colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0,
                                                                   0.8, 0.9))
                 for k in range(start, start + n))


def palette_for(num_classes: int) -> Tuple[Colour, ...]:
    """MFNet's palette, extended with `distinct_colours` for models with more classes."""
    return tuple(PALETTE[:num_classes]) + distinct_colours(max(num_classes - len(PALETTE), 0),
                                                           start=len(PALETTE))


def font(image_height: int) -> ImageFont.ImageFont:
    """A font about 1/30 of the image height (at least 10 px); Pillow's bitmap font without
    FreeType."""
    try:
        return ImageFont.load_default(size=max(10, image_height // 30))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def colourise(label: np.ndarray, palette: Sequence[Colour] = PALETTE) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 (ids without a colour, e.g. 255 or -1, are white)."""
    lut = np.tile(np.asarray(IGNORE_COLOUR, np.uint8), (256, 1))
    lut[:len(palette)] = np.asarray(palette, np.uint8)
    ids = np.asarray(label, np.int64)
    return lut[np.where((ids < 0) | (ids > 255), 255, ids)]


def grey_to_rgb(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 -> (H, W, 3) uint8."""
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


def share(count: int, total: int) -> str:
    """count / total as a percentage of one decimal; '<0.1%' for a present class that would
    round to 0.0% (and read as absent)."""
    if 0 < count and 1000 * count < total:
        return "<0.1%"
    return f"{100.0 * count / total:.1f}%"


def overlay_segmentation(vis: np.ndarray, label: np.ndarray, class_names: Sequence[str] = CLASSES,
                         palette: Sequence[Colour] = PALETTE, alpha: float = 0.55,
                         background: int = 0) -> Image.Image:
    """Class colours blended over the visible image (class `background` left untinted), with a
    legend to the right: one swatch per other class and its share of the image's pixels.

    vis (H, W, 3) uint8, label (H, W) ids < len(class_names) -> image (max(H, legend), W + legend).
    """
    vis = grey_to_rgb(vis).astype(np.float32)
    tinted = (1 - alpha) * vis + alpha * colourise(label, palette).astype(np.float32)
    blended = np.where((label == background)[..., None], vis, tinted)
    picture = Image.fromarray(blended.round().astype(np.uint8))

    f = font(max(picture.height, 240))
    shown = [k for k in range(len(class_names)) if k != background]
    counts = np.bincount(np.asarray(label, np.int64).ravel(), minlength=len(class_names))
    rows = [(palette[k], f"{class_names[k]} {share(counts[k], label.size)}") for k in shown]
    probe = ImageDraw.Draw(picture)
    text_h = max(probe.textbbox((0, 0), "Ag", font=f)[3], 8)
    text_w = max(probe.textbbox((0, 0), text, font=f)[2] for _, text in rows)
    line, pad = text_h + 4, 4
    width = picture.width + 2 * pad + text_h + pad + text_w
    height = max(picture.height, 2 * pad + line * len(rows))
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + pad
    for i, (colour, text) in enumerate(rows):
        y = pad + i * line
        draw.rectangle([x, y, x + text_h, y + text_h], fill=tuple(colour), outline="black")
        draw.text((x + text_h + pad, y), text, fill="black", font=f)
    return canvas


def overlay_saliency(vis: np.ndarray, saliency: np.ndarray, alpha: float = 0.6,
                     colour: Colour = SALIENCY_COLOUR) -> Image.Image:
    """vis (H, W, 3) uint8, saliency (H, W) uint8 -> (H, W) RGB: each pixel moves towards
    `colour` by alpha * saliency / 255."""
    weight = alpha * (saliency.astype(np.float32) / 255.0)[..., None]
    out = (1 - weight) * grey_to_rgb(vis).astype(np.float32) + weight * np.float32(colour)
    return Image.fromarray(out.round().astype(np.uint8))


def colour_for_name(name: str) -> Colour:
    """A fixed colour per class name (the same in every image and every run)."""
    return distinct_colours(1, start=zlib.crc32(name.encode()) % 997)[0]


def draw_boxes(image: np.ndarray, boxes: np.ndarray, names: Sequence[str],
               scores: Optional[Sequence[float]] = None,
               colours: Optional[Sequence[Colour]] = None) -> Image.Image:
    """Rectangles with a "name 0.87" tag above each (inside when there is no room above).

    image (H, W, 3) or (H, W) uint8; boxes (n, 4) xyxy pixels; names, scores (None: ground
    truth, names only) and colours (default: `colour_for_name`) n each.
    """
    if scores is None:
        scores = [None] * len(names)
    if colours is None:
        colours = [colour_for_name(n) for n in names]
    canvas = Image.fromarray(grey_to_rgb(image))
    draw = ImageDraw.Draw(canvas)
    f = font(canvas.height)
    width = max(1, round(min(canvas.size) / 200))
    for (x0, y0, x1, y1), name, score, colour in zip(np.asarray(boxes, float).reshape(-1, 4),
                                                      names, scores, colours):
        colour = tuple(int(c) for c in colour)
        x0, x1, y0, y1 = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        text = name if score is None else f"{name} {score:.2f}"
        l, t, r, b = draw.textbbox((0, 0), text, font=f)
        ty = y0 - (b - t) - 2 if y0 - (b - t) - 2 >= 0 else y0 + width
        tx = max(0, min(x0, canvas.width - (r - l) - 2))     # keep the tag inside the image
        draw.rectangle([tx, ty, tx + (r - l) + 2, ty + (b - t) + 2], fill=colour)
        brightness = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + 1 - l, ty + 1 - t), text, fill="black" if brightness > 128 else "white",
                  font=f)
    return canvas
