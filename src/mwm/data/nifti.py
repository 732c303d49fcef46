"""NIfTI volumes (.nii, .nii.gz; NIfTI-1 and NIfTI-2) → 2D float32 slices in [0, 1] (nibabel).

Orientation
    Every volume is first reoriented with ``nibabel.as_closest_canonical``, so voxel axes
    are RAS+ (axis 0 runs to the patient's Right, 1 Anterior, 2 Superior) whatever the
    stored orientation. ``options.nifti_axis`` picks the slicing axis in that frame:
    0 sagittal, 1 coronal, 2 axial.

Display
    A slice keeps the two remaining axes (u, v), in RAS+ order. It is returned with
    rows = v reversed and columns = u reversed, i.e. ``np.rot90(s)[:, ::-1]`` of the
    slice ``s`` of shape (U, V). That is the radiological convention DICOM viewers use:
    axial → anterior at the top, patient's right on the image's left (as a CT slice
    looks); coronal → superior at the top, patient's right on the left; sagittal →
    superior at the top, anterior on the left. (``np.rot90(s)`` alone would give the
    neurological convention, patient's left on the image's left.)

Items and ids
    3D (X, Y, Z): one image per slice along the axis, id suffix ``#x0003`` / ``#y0003`` /
    ``#z0003`` (letter = axis). 4D (X, Y, Z, T): every time point, ``#t001-z0003``.
    A volume with a singleton spatial axis (2D files, or (X, Y, 1)) is one image per time
    point (suffix "" or ``#t001``), sliced across that singleton axis whatever
    ``nifti_axis`` says, and ``slice_start/stop`` do not apply. Trailing singleton
    dimensions beyond the 4th are dropped; other 5D+ volumes are refused.
    Keys are ``(axis, t, k)``.

Intensity (per volume, per time point for 4D, so slices of one volume share a scale)
    custom window (CT presets / center+width) → linear window of the stored values
    (after scl_slope/scl_inter, i.e. HU for CT); ``auto`` → the 0.5–99.5 percentile
    window of the volume; ``minmax`` → the volume's min–max (both over the finite voxels). NaN/inf voxels
    become 0 in :class:`~mwm.data.source.ImageSource`, which warns once with their count.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import ReadError
from .files import Loader
from .intensity import apply_window, percentile_window
from .types import ReadOptions

AXIS_LETTERS = "xyz"


@dataclass(frozen=True)
class _Volume:
    """A decoded volume. data: float32 (X, Y, Z, T) in RAS+; windows[t]: (center, width) or None (constant → 0)."""

    data: np.ndarray
    windows: tuple[tuple[float, float] | None, ...]


# -- header and geometry -------------------------------------------------------------
def _open(path: Path):
    """nibabel image proxy (reads only the header)."""
    try:
        return nib.load(str(path))
    except Exception as e:  # ImageFileError, EOFError, zlib errors, HeaderDataError …
        raise ReadError(str(path), f"not a readable NIfTI file ({type(e).__name__}: {e})") from e


def _shape4(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Stored shape → (X, Y, Z, T): 2D gets Z = 1, 3D gets T = 1, trailing 5D+ singletons dropped."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4 or len(shape) < 2:
        raise ReadError(str(path), f"a {len(shape)}D NIfTI of shape {shape} is not supported (expected 2D, 3D or 4D)")
    shape = shape + (1,) * (4 - len(shape))
    return shape  # type: ignore[return-value]


def _orientation(affine: np.ndarray | None) -> np.ndarray | None:
    """io_orientation of the affine, or None when it cannot be reoriented (missing or degenerate)."""
    if affine is None:
        return None
    ornt = nib.io_orientation(affine)
    return ornt if np.isfinite(ornt).all() else None


def _canonical_shape(path: Path, img) -> tuple[int, int, int, int]:
    """(X, Y, Z, T) after as_closest_canonical, from the header alone (no voxel data read)."""
    x, y, z, t = _shape4(path, img.shape)
    ornt = _orientation(getattr(img, "affine", None))
    if ornt is None:
        return x, y, z, t
    out = [0, 0, 0]
    for src, n in enumerate((x, y, z)):
        out[int(ornt[src, 0])] = n  # as_reoriented moves stored axis src to RAS axis ornt[src, 0]
    return out[0], out[1], out[2], t


# -- decoded volumes (cached) --------------------------------------------------------
def _decode(path: Path) -> np.ndarray:
    """Whole volume as float32 (X, Y, Z, T) in RAS+ voxel order."""
    img = _open(path)
    shape = _shape4(path, img.shape)
    try:
        data = img.get_fdata(dtype=np.float32).reshape(shape)
    except Exception as e:  # truncated gzip → EOFError, short .nii → OSError/ValueError
        raise ReadError(str(path), f"truncated or corrupt NIfTI data ({type(e).__name__}: {e})") from e
    if _orientation(getattr(img, "affine", None)) is None:  # e.g. CIFTI: no spatial affine
        return data
    # wrap the float array (already scaled by scl_slope/inter) so the reorientation works on it
    # and the compressed file is not decoded a second time
    canon = nib.as_closest_canonical(nib.Nifti1Image(data, img.affine))
    return np.asanyarray(canon.dataobj)


def _window_of(vol: np.ndarray, scaling: tuple) -> tuple[float, float] | None:
    """(center, width) for one 3D volume; None for a constant volume under min–max."""
    if scaling[0] == "window":
        return float(scaling[1]), float(scaling[2])
    if scaling[0] == "auto":
        return percentile_window(vol, 0.5, 99.5)
    finite = vol[np.isfinite(vol)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    return (lo + (hi - lo) / 2.0, hi - lo) if hi > lo else None


@functools.lru_cache(maxsize=2)
def _cached_volume(path: str, mtime_ns: int, size: int, scaling: tuple) -> _Volume:
    """Decoded volume + per-time-point windows; mtime/size in the key so edited files are re-read."""
    data = _decode(Path(path))
    windows = tuple(_window_of(data[..., t], scaling) for t in range(data.shape[3]))
    return _Volume(data, windows)


def _scaling_key(options: ReadOptions) -> tuple:
    """The part of the options the per-volume scaling depends on."""
    custom = options.custom_window()
    if custom is not None:
        return ("window", *custom)
    return ("auto",) if options.window == "auto" else ("minmax",)


def _volume(path: Path, options: ReadOptions) -> _Volume:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ReadError(str(path), f"cannot open ({e.strerror or e})") from e
    return _cached_volume(str(path), st.st_mtime_ns, st.st_size, _scaling_key(options))


# -- items ---------------------------------------------------------------------------
def _slice_axis(shape: tuple[int, int, int, int], options: ReadOptions) -> tuple[int, bool]:
    """(axis to slice, is_2d): a singleton spatial axis makes the volume one 2D image."""
    for a in range(3):
        if shape[a] == 1:
            return a, True
    return options.nifti_axis, False


def _empty_slices(vol: _Volume, axis: int, t: int, fraction: float) -> set[int]:
    """Slices of volume t where fewer than ``fraction`` of pixels differ from the volume's minimum."""
    v = vol.data[..., t]
    finite = np.isfinite(v)
    if not finite.any():
        return set(range(v.shape[axis]))
    fg = finite & (v != v[finite].min())
    others = tuple(a for a in range(3) if a != axis)
    frac = fg.sum(axis=others) / float(np.prod([v.shape[a] for a in others]))
    return {int(k) for k in np.flatnonzero(frac < fraction)}


def _suffix(axis: int, t: int, k: int, n_t: int, is_2d: bool) -> str:
    if is_2d:
        return f"#t{t:03d}" if n_t > 1 else ""
    s = f"{AXIS_LETTERS[axis]}{k:04d}"
    return f"#t{t:03d}-{s}" if n_t > 1 else f"#{s}"


def expand(path: Path, options: ReadOptions) -> list[tuple[str, object]]:
    """List the slices of a NIfTI volume; header only unless ``skip_empty_slices`` needs the voxels.

    Returns ``[(id_suffix, (axis, t, k)), …]``.
    """
    path = Path(path)
    vol = _volume(path, options) if options.skip_empty_slices else None
    shape = vol.data.shape if vol is not None else _canonical_shape(path, _open(path))
    axis, is_2d = _slice_axis(shape, options)
    n_t = shape[3]
    ks = [0] if is_2d else list(range(shape[axis]))[slice(options.slice_start, options.slice_stop)]
    items = []
    for t in range(n_t):
        empty = _empty_slices(vol, axis, t, options.empty_fraction) if vol is not None else set()
        items.extend((_suffix(axis, t, k, n_t, is_2d), (axis, t, k)) for k in ks if k not in empty)
    return items


def _display(s: np.ndarray) -> np.ndarray:
    """(U, V) slice in RAS+ order → (V, U) image, both axes reversed (radiological; see module doc)."""
    return np.ascontiguousarray(s[::-1, ::-1].T)


def load(path: Path, key: object, options: ReadOptions) -> np.ndarray:
    """One slice: key ``(axis, t, k)`` from :func:`expand` → float32 C-contiguous (H, W) in [0, 1], NaN where a
    voxel is not finite (the source counts those and sets them to 0)."""
    path = Path(path)
    axis, t, k = (int(v) for v in key)  # type: ignore[union-attr]
    vol = _volume(path, options)
    if not (0 <= t < vol.data.shape[3] and 0 <= k < vol.data.shape[axis]):
        raise ReadError(str(path), f"slice {k} of volume {t} along axis {axis} is outside the shape {vol.data.shape}")
    s = np.take(vol.data[..., t], k, axis=axis)
    window = vol.windows[t]
    if window is not None:
        out = apply_window(s, *window)
    else:  # constant volume; NaN stays NaN so the source counts and replaces it
        out = np.where(np.isfinite(s), np.float32(0.0), np.float32(np.nan)).astype(np.float32)
    return _display(out).astype(np.float32, copy=False)


LOADER = Loader("nifti", expand, load)
