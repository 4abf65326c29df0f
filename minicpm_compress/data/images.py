"""Images: named sets, user folders, and MiniCPM-V's preprocessing (one implementation for every runner).

Built-in sets, from scikit-image's bundled sample images (offline; never overlapping):
  skimage-calib    ten photographs, micrographs and graphics at their own sizes (at most 1000 pixels on the
                   long side; those over 448² pixels are sliced)
  skimage-heldout  eight others, centre-cropped and resized once to 448 × 448 here, so that no runtime
                   resizes them again: llama.cpp, onnxruntime and torch then see identical pixels
A user set is a folder of .png / .jpg / .jpeg files, read in name order.

Preprocessing follows MiniCPM-V's image processor (and llama.cpp's llava-uhd slicer, which agrees with
it): an image whose area is at most 448² becomes one overview resized to a multiple of 14 at about 448²
area; a larger one becomes a downscaled overview plus a grid of slices (at most `max_slice_nums`) chosen
by aspect ratio. Each piece is normalised with mean = std = 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import AfterValidator

from ..errors import CompressError

CALIB_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
                "logo", "colorwheel", "cell")
HELDOUT_IMAGES = ("camera", "coins", "horse", "page", "moon", "brick", "grass", "text")
HELDOUT_SIDE = 448
CALIB_MAX_SIDE = 1000  # at most 2 × 2 slices: an image block of ≤ 5 × 66 tokens fits a 512-token sample
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _existing_image_source(name: str) -> str:
    if name not in ("skimage-calib", "skimage-heldout") and not Path(name).is_dir():
        raise ValueError(f"'{name}' is not a built-in image set (skimage-calib, skimage-heldout) nor a folder")
    return name


ImageSource = Annotated[str, AfterValidator(_existing_image_source)]  # a recipe field naming images


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:  # float images are in [0, 1], boolean ones are masks
        array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3])


def _square(array: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = Image.fromarray(array[top : top + s, left : left + s])
    return np.asarray(image.resize((side, side), resample=Image.Resampling.BICUBIC))


def _fit(array: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    h, w = array.shape[:2]
    if max(h, w) <= side:
        return array
    size = (round(w * side / max(h, w)), round(h * side / max(h, w)))
    return np.asarray(Image.fromarray(array).resize(size, resample=Image.Resampling.BICUBIC))


def read_images(source: str) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB [h, w, 3]) for each image of a built-in set or a folder."""
    if source in ("skimage-calib", "skimage-heldout"):
        try:
            from skimage import data
        except ImportError:
            raise CompressError("built-in image sets need scikit-image (installed by `make install`)") from None
        if source == "skimage-calib":
            return [(n, _fit(_rgb(getattr(data, n)()), CALIB_MAX_SIDE)) for n in CALIB_IMAGES]
        return [(n, _square(_rgb(getattr(data, n)()), HELDOUT_SIDE)) for n in HELDOUT_IMAGES]
    folder = Path(source)
    if not folder.is_dir():
        raise CompressError(f"{source}: not a built-in image set (skimage-calib, skimage-heldout) nor a folder")
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as im:
                images.append((path.name, np.asarray(im.convert("RGB"))))
        except (UnidentifiedImageError, OSError) as e:
            raise CompressError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    if not images:
        raise CompressError(f"{folder}: no .png/.jpg images")
    return images


# -- MiniCPM-V's slicing -------------------------------------------------------------------------------
def ensure_divide(length: float, patch: int) -> int:
    return max(round(length / patch) * patch, patch)


def best_resize(size: tuple[float, float], resolution: int, patch: int, allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height): `size` scaled to about resolution² area (only down, unless allowed), multiples of `patch`."""
    width, height = size
    if width * height > resolution * resolution or allow_upscale:
        r = width / height
        height = int(resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch), ensure_divide(height, patch)


def sliced_grid(size: tuple[int, int], resolution: int, max_slices: int) -> tuple[int, int] | None:
    """(columns, rows) of slices for an image of `size`, or None when it is small enough for one piece."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (resolution * resolution)), max_slices)
    if multiple <= 1:
        return None
    best, best_error = (1, 1), float("inf")
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices:
            continue
        for m in range(1, n + 1):
            if n % m == 0:
                error = abs(log_ratio - math.log(m / (n // m)))
                if error < best_error:
                    best, best_error = (m, n // m), error
    return best


def refine_size(size: tuple[int, int], grid: tuple[int, int], resolution: int, patch: int) -> tuple[int, int]:
    cols, rows = grid
    w, h = ensure_divide(size[0], cols), ensure_divide(size[1], rows)
    piece = best_resize((w / cols, h / rows), resolution, patch, allow_upscale=True)
    return piece[0] * cols, piece[1] * rows


@dataclass
class ImagePieces:
    """One image as the model sees it: the overview, then the slices row by row (each [3, h, w], normalised)."""

    pieces: list[torch.Tensor]
    grid: tuple[int, int] | None  # (columns, rows) of slices, None without slices


def normalise(array: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5


def preprocess(image: np.ndarray, resolution: int = 448, patch: int = 14, max_slices: int = 9,
               slice_mode: bool = True) -> ImagePieces:
    """MiniCPM-V's preprocessing of one uint8 RGB image (PIL bicubic resizing, as the reference processor)."""
    from PIL import Image

    im = Image.fromarray(image)
    size = im.size
    grid = sliced_grid(size, resolution, max_slices) if slice_mode else None
    if grid is None:
        return ImagePieces([normalise(np.asarray(_resize(im, best_resize(size, resolution, patch, True))))], None)
    pieces = [normalise(np.asarray(_resize(im, best_resize(size, resolution, patch))))]
    refined = np.asarray(_resize(im, refine_size(size, grid, resolution, patch)))
    cols, rows = grid
    ph, pw = refined.shape[0] // rows, refined.shape[1] // cols
    for r in range(rows):
        for c in range(cols):
            pieces.append(normalise(refined[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]))
    return ImagePieces(pieces, grid)


def _resize(im, size: tuple[int, int]):
    from PIL import Image

    return im if im.size == tuple(size) else im.resize(size, resample=Image.Resampling.BICUBIC)
