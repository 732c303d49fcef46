"""DICOM files → 2D float32 images in [0, 1] (pydicom).

One item per image: a single-frame file gives one (id suffix ""), a multi-frame
file one per frame (id suffix ``#f0000``, ``#f0001``, …; key = frame index).

Intensity pipeline for grey-scale images (per frame):

1. stored values → modality values (HU for CT) by pydicom's ``apply_modality_lut``
   (Rescale Slope/Intercept or a Modality LUT; for enhanced multi-frame files the
   per-frame/shared *Pixel Value Transformation* functional group is used);
2. a window: ``options.custom_window()`` (CT presets / explicit center+width) on the
   modality values; else with ``window == "auto"`` the file's own WindowCenter /
   WindowWidth (first value when multi-valued); else min–max of the frame;
3. MONOCHROME1 (bright = low values) is inverted after windowing so that bone is
   always bright, as in MONOCHROME2.

Colour images (SamplesPerPixel 3) come back as (H, W, 3): 8-bit divided by 255,
wider types min–max scaled; no window. PALETTE COLOR is expanded through its LUT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from ..errors import ReadError
from .files import Loader
from .intensity import apply_window, minmax
from .types import ReadOptions

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut
    from pydicom.pixels import pixel_array as _pixel_array
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_color_lut, apply_modality_lut

    _pixel_array = None

PIP_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
NO_PIXELS = "no pixel data (not an image DICOM)"


# -- reading -----------------------------------------------------------------------
def _read(path: Path, header_only: bool) -> Dataset:
    """dcmread, accepting files without the 128-byte preamble / 'DICM' prefix.

    Conformant files are read strictly first; ``force=True`` is only the fallback for
    old preamble-less files, and then the file must at least carry image tags, since a
    forced read of an arbitrary binary file "succeeds" with garbage elements.
    """
    try:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
        except InvalidDicomError:
            ds = pydicom.dcmread(path, stop_before_pixels=header_only, force=True)
            if "Rows" not in ds or "Columns" not in ds:
                looks_dicom = any(k in ds for k in ("SOPClassUID", "SOPInstanceUID", "Modality", "StudyInstanceUID"))
                reason = NO_PIXELS if looks_dicom else "not a DICOM file (no 'DICM' prefix and no image header)"
                raise ReadError(str(path), reason) from None
    except ReadError:
        raise
    except Exception as e:  # truncated or corrupt headers raise many kinds
        raise ReadError(str(path), f"not a readable DICOM file ({type(e).__name__}: {e})") from e
    return ds


def _n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):  # malformed IS value, e.g. '1A'
        return 1


def expand(path: Path, options: ReadOptions) -> list[tuple[str, object]]:
    """List the 2D images in a DICOM file from its header: ``[("", None)]`` or one per frame."""
    path = Path(path)
    ds = _read(path, header_only=True)
    if "Rows" not in ds or "Columns" not in ds:
        # DICOMDIR, RT structure sets, SR, plans …: valid DICOM but no image
        raise ReadError(str(path), NO_PIXELS)
    n = _n_frames(ds)
    if n == 1:
        return [("", None)]
    return [(f"#f{k:04d}", k) for k in range(n)]


def _missing_decoder(e: Exception) -> bool:
    """Whether a decode failure means "no plugin for this compression" rather than bad data.

    pydicom 3: RuntimeError "... all plugins are missing dependencies"; pydicom 2:
    RuntimeError/NotImplementedError "... handlers ... missing required dependencies".
    """
    text = str(e).lower()
    return isinstance(e, ImportError) or any(w in text for w in ("missing", "handler", "plugin"))


def _decode(ds: Dataset, path: Path, frame: int | None) -> np.ndarray:
    """Stored pixel values of one frame: (H, W) or (H, W, 3) (YBR converted to RGB by pydicom)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ReadError(str(path), NO_PIXELS)
    try:
        if frame is not None and _pixel_array is not None:
            return _pixel_array(ds, index=frame)  # pydicom 3 decodes only the requested frame
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError, ImportError, ValueError) as e:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if ts is not None and ts.is_compressed and _missing_decoder(e):
            raise ReadError(str(path), f"pixel data is compressed as '{ts.name}' and no installed decoder "
                                       f"can read it; run `{PIP_HINT}`") from e
        raise ReadError(str(path), f"cannot decode pixel data ({type(e).__name__}: {e})") from e
    if frame is not None and _n_frames(ds) > 1:
        arr = arr[frame]
    return arr


def _functional_group(ds: Dataset, frame: int | None, seq: str) -> Dataset | None:
    """Item of functional-group sequence ``seq`` for ``frame`` (per-frame first, then shared)."""
    for groups, idx in (("PerFrameFunctionalGroupsSequence", frame or 0), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and idx < len(items) and items[idx].get(seq):
            return items[idx].get(seq)[0]
    return None


def _modality_values(arr: np.ndarray, ds: Dataset, frame: int | None) -> np.ndarray:
    """Stored values → modality values (HU for CT), float32 (H, W)."""
    if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:
        # enhanced multi-frame CT/MR keep the rescale in a functional group;
        # hand it to pydicom's own routine through a minimal dataset
        pvt = _functional_group(ds, frame, "PixelValueTransformationSequence")
        if pvt is not None and "RescaleSlope" in pvt:
            sub = Dataset()
            sub.RescaleSlope, sub.RescaleIntercept = pvt.RescaleSlope, pvt.get("RescaleIntercept", 0)
            return np.asarray(apply_modality_lut(arr, sub), dtype=np.float32)
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def _first(value) -> float | None:
    """First number of a possibly multi-valued DS element (WindowCenter '40\\400')."""
    if value is None or value == "":
        return None
    try:
        v = value[0] if isinstance(value, (list, tuple, MultiValue)) else value
        return float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _file_window(ds: Dataset, frame: int | None) -> tuple[float, float] | None:
    """(center, width) stored in the file, or None (top level, else the Frame VOI LUT group)."""
    src: Dataset | None = ds if "WindowCenter" in ds else _functional_group(ds, frame, "FrameVOILUTSequence")
    if src is None:
        return None
    c, w = _first(src.get("WindowCenter")), _first(src.get("WindowWidth"))
    if c is None or w is None or not np.isfinite(c) or not np.isfinite(w) or w <= 0:
        return None
    return c, w


def _scale_color(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) integer/float colour → [0, 1]: 8-bit / 255, anything else min–max."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return minmax(arr)


def _grey(arr: np.ndarray, ds: Dataset, frame: int | None, options: ReadOptions) -> np.ndarray:
    """Stored grey values (H, W) → windowed intensities in [0, 1]."""
    values = _modality_values(arr, ds, frame)
    custom = options.custom_window()
    file_window = _file_window(ds, frame) if options.window == "auto" else None
    if custom is not None:
        out = apply_window(values, *custom)
    elif file_window is not None:
        out = apply_window(values, *file_window)
    else:
        out = minmax(values)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: minimum value is white
    return out


def load(path: Path, key: object, options: ReadOptions) -> np.ndarray:
    """Decode one frame (``key`` = frame index, None for single-frame files).

    Returns float32 C-contiguous ``(H, W)`` for grey-scale or ``(H, W, 3)`` for colour, in [0, 1]; NaN where
    the stored value is not finite (Float Pixel Data).
    """
    path = Path(path)
    ds = _read(path, header_only=False)
    frame = None if key is None else int(key)
    n = _n_frames(ds)
    if frame is not None and not 0 <= frame < n:
        raise ReadError(str(path), f"frame {frame} requested but the file has {n} frame(s)")
    arr = _decode(ds, path, frame)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        out = _scale_color(apply_color_lut(arr, ds))
    elif samples >= 3 and arr.ndim == 3:
        out = _scale_color(arr[..., :3])
    elif arr.ndim == 2:
        out = _grey(arr, ds, frame, options)
    else:
        raise ReadError(str(path), f"pixel data of shape {arr.shape} is not one 2D image")
    # NaN (from non-finite float pixel data) stays: the source counts and replaces it
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)


LOADER = Loader("dicom", expand, load)
