"""Reading scans: one entry point, :func:`open_source`, for every supported format.

>>> src = open_source("scans/")            # PNG/JPG/TIFF/BMP, DICOM, NIfTI, recursively
>>> sample = src.read(0)                    # Sample(id="patient1/slice003.dcm", image=float32 (H, W) in [0, 1], ...)
>>> x = to_tensor(sample.image, size=224, channels=3)   # (3, 224, 224)
"""

from __future__ import annotations

from pathlib import Path

import importlib

from ..errors import DataError, ReadError
from .source import ImageSource, Skipped, pick_split
from .types import WINDOW_PRESETS, ReadOptions, Sample

# torch-backed parts load on first use, so `mwm --help` stays fast.
_LAZY = {"ArrayDataset": "arrays", "decode": "arrays", "Fit": "transforms", "mask_to_tensor": "transforms",
         "to_tensor": "transforms"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["open_source", "pick_split", "ImageSource", "ReadOptions", "Sample", "Skipped", "ArrayDataset", "decode", "to_tensor",
           "mask_to_tensor", "Fit", "WINDOW_PRESETS", "DataError", "ReadError"]


def open_source(path: str | Path, options: ReadOptions | None = None, **option_kwargs) -> ImageSource:
    """Open a dataset: a folder (recursive; ``labels="folders"`` for ImageFolder trees), an ``.npz``
    (ours or MedMNIST), a ``.csv`` (``path,label[,split]``), or a single image / DICOM / NIfTI file."""
    options = options or ReadOptions(**option_kwargs)
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        from .files import folder_source

        return folder_source(path, options)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from .npz import NpzSource

        return NpzSource(path, options)
    if suffix == ".csv":
        from .files import csv_source

        return csv_source(path, options)
    from .files import file_source

    return file_source(path, options)
