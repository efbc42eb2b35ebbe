"""Reading image files so that a bad one is named, never a traceback.

A truncated PNG or JPEG passes a header check (`Image.open` reads only the header) and fails later,
at the first batch, with `OSError: image file is truncated` or `UnidentifiedImageError`, often
from inside a DataLoader worker. Every loader reads pixels through `open_image`, which decodes
the whole file at once and turns any failure into `BadImageError("<path>: <reason>")`.
`verify_images` decodes a list of files up front (`--verify-images`).

`open_thermal` and `open_visible` are how training, evaluation and `predict.py` all turn a file
into 8-bit pixels, so that one image pair gives the model the same input in each. THERMAL
NORMALISATION RULE for high-bit-depth images (16-bit PNG/TIFF, 32-bit integer or float TIFF): per
image, the 1st..99th percentile range of the values is mapped linearly onto 0..255 and clipped
(the min..max range when those percentiles are equal; 0 for a constant image). PIL's own
conversion would clip every value above 255 to 255, a flat image. The datasets of the paper are
8-bit and read unchanged.
"""
from pathlib import Path
from typing import Iterable, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

PathLike = Union[str, Path]
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")   # PIL modes beyond 8 bits
THERMAL_PERCENTILES = (1.0, 99.0)


class BadImageError(ValueError):
    """An image file that cannot be decoded. The message is `<path>: <reason>`."""


def open_image(path: PathLike) -> Image.Image:
    """Open and fully decode `path` (pixels loaded, file closed);
    `BadImageError` if it cannot be."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise
    except Exception as e:      # truncated, corrupt, not an image, unsupported mode
        raise BadImageError(f"{path}: {type(e).__name__}: {e}") from None


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """High-bit-depth (H, W) -> uint8: the 1st..99th percentile range onto 0..255, clipped
    (min..max when the percentiles are equal; zeros for a constant image). Taken over the finite
    values: NaN or inf pixels (invalid pixels of a float radiometric TIFF) become 0."""
    x = values.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        raise ValueError("no pixel has a finite value")
    lo, hi = np.percentile(x[finite], THERMAL_PERCENTILES)
    if hi <= lo:
        lo, hi = x[finite].min(), x[finite].max()
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    scaled = np.clip((np.where(finite, x, lo) - lo) * (255.0 / (hi - lo)), 0, 255)
    return scaled.round().astype(np.uint8)


def open_thermal(path: PathLike) -> Image.Image:
    """A thermal image as one 8-bit channel (mode 'L'): 8-bit grey as it is, 3 channels
    (colour-mapped or repeated grey) by PIL's 'L' weights, high bit depth by the rule above."""
    im = open_image(path)
    if im.mode in HIGH_DEPTH_MODES:
        return _stretched(im, path)
    return im if im.mode == "L" else im.convert("L")


def open_visible(path: PathLike) -> Image.Image:
    """A visible image as 8-bit RGB: grey repeated to 3 channels, high-bit-depth grey stretched
    by the rule above first."""
    im = open_image(path)
    if im.mode in HIGH_DEPTH_MODES:
        im = _stretched(im, path)
    return im if im.mode == "RGB" else im.convert("RGB")


def _stretched(im: Image.Image, path: PathLike) -> Image.Image:
    """`stretch_to_uint8` of a high-bit-depth image, 'L'; `BadImageError` naming `path` for
    one with no finite pixel."""
    try:
        return Image.fromarray(stretch_to_uint8(np.asarray(im)))
    except ValueError as e:
        raise BadImageError(f"{path}: {e}") from None


def image_size(path: PathLike) -> Tuple[int, int]:
    """(H, W) from the header only (cheap); `BadImageError` if the header cannot be read."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except FileNotFoundError:
        raise
    except Exception as e:
        raise BadImageError(f"{path}: {type(e).__name__}: {e}") from None


def verify_images(paths: Iterable[PathLike], desc: str = "verify images",
                  quiet: bool = False) -> int:
    """Decode every file in `paths` (a progress bar on a terminal, unless `quiet`); raise
    `BadImageError` naming the first file that fails. Returns the number of files checked."""
    paths = list(dict.fromkeys(paths))          # MFNet reads vis and ir from one file
    for p in tqdm(paths, desc=desc, disable=True if quiet else None, leave=False):
        open_image(p)
    return len(paths)
