"""Reading image files so that a bad one is named, never a traceback.

A truncated PNG or JPEG passes a header check (`Image.open` reads only the header) and fails later,
at the first batch, with `OSError: image file is truncated` or `UnidentifiedImageError`, often
from inside a DataLoader worker. Every loader reads pixels through `open_image`, which decodes
the whole file at once and turns any failure into `BadImageError("<path>: <reason>")`.
`verify_images` decodes a list of files up front (`--verify-images`).
"""
from pathlib import Path
from typing import Iterable, Tuple, Union

from PIL import Image
from tqdm import tqdm

PathLike = Union[str, Path]


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
