"""Raw pixel values → intensities in [0, 1] (windowing and scaling).

Non-finite raw values (NaN, ±inf) come out as NaN: the reader (:class:`~mwm.data.source.ImageSource`) counts
them, warns once per source and sets them to 0, so no NaN reaches training.
"""

from __future__ import annotations

import numpy as np


def apply_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window: ``clip((x - (center - width/2)) / width, 0, 1)``.

    The plain linear form (DICOM PS3.3 C.11.2.1.3 "LINEAR_EXACT"); the ±0.5
    offsets of the default DICOM formula move results by less than one grey level.
    x: any shape, raw values (HU for CT). Returns float32 of the same shape; non-finite raw values (NaN, ±inf)
    come out as NaN, so that :class:`~mwm.data.source.ImageSource` can count them before replacing them.
    """
    lo = center - width / 2.0
    x = x.astype(np.float32)
    out = np.clip((x - lo) / float(width), 0.0, 1.0)
    return np.where(np.isfinite(x), out, np.float32(np.nan)).astype(np.float32, copy=False)


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the range of the finite values; a constant array becomes all zeros.

    Non-finite values (NaN, ±inf) come out as NaN (see :func:`apply_window`).
    """
    x = x.astype(np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        x = np.where(finite, x, np.float32(np.nan))
    lo, hi = (np.nanmin(x), np.nanmax(x)) if finite.any() else (0.0, 0.0)
    if not np.isfinite(hi - lo) or hi - lo <= 0:
        return np.where(finite, np.float32(0.0), np.float32(np.nan)).astype(np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def percentile_window(x: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> tuple[float, float]:
    """(center, width) spanning the ``lo_pct``–``hi_pct`` percentiles of the finite values."""
    v = x[np.isfinite(x)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    width = float(hi - lo) if hi > lo else 1.0
    return float(lo + width / 2.0), width


def scale_integer_image(x: np.ndarray) -> np.ndarray:
    """8-bit → ``x / 255``; wider integer or float images → min–max (their range usage varies; NaN/inf → NaN)."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == bool:
        return x.astype(np.float32)
    return minmax(x)


def to_gray(x: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) → (H, W) by ITU-R BT.601 luma; (H, W) passes through."""
    if x.ndim == 2:
        return x
    if x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[-1] == 1:
        return x[..., 0]
    return (x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114).astype(np.float32)
