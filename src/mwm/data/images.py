"""PNG / JPEG / TIFF / BMP files (8- or 16-bit, gray or RGB) via Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ReadError
from .files import Loader
from .intensity import apply_window, minmax, scale_integer_image
from .types import ReadOptions


def expand(path: Path, options: ReadOptions) -> list[tuple[str, object]]:
    """Header only: Pillow identifies the format without decoding pixels."""
    try:
        with Image.open(path) as im:
            if im.width < 1 or im.height < 1:
                raise ReadError(str(path), f"empty image ({im.width}x{im.height})")
    except UnidentifiedImageError as e:
        raise ReadError(str(path), "not a decodable image (corrupt or wrong extension)") from e
    except OSError as e:
        raise ReadError(str(path), f"cannot open: {e}") from e
    return [("", None)]


def load(path: Path, key: object, options: ReadOptions) -> np.ndarray:
    """Decode to float32 ``(H, W)`` (gray) or ``(H, W, 3)`` (colour) in [0, 1].

    8-bit data is divided by 255; 16-bit / 32-bit data is min–max scaled per image
    (``auto``/``minmax``) or windowed when a window is given (raw values as HU). Non-finite float pixels come out
    as NaN (the source counts them and sets them to 0).
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1"):
                im = im.convert("RGB" if im.mode not in ("LA", "1") else "L")
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:  # Pillow signals truncated data with OSError/SyntaxError
        raise ReadError(str(path), f"corrupt image data: {e}") from e
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    window = options.custom_window()
    if window is not None and arr.dtype != np.uint8:
        return apply_window(arr, *window)
    if options.window == "minmax":
        return minmax(arr)
    return np.ascontiguousarray(scale_integer_image(arr))


LOADER = Loader("image", expand, load)
