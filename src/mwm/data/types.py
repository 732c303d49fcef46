"""Plain data types shared by every reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Window presets (center, width) in Hounsfield units, from Radiopaedia's
# "Windowing (CT)" article; the usual starting points for reading chest/head CT.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}

WindowName = Literal["auto", "minmax", "lung", "mediastinum", "brain", "bone"]


class ReadOptions(BaseModel):
    """How raw files become intensity images in [0, 1].

    ``window``:
      * ``auto``: DICOM uses the file's own WindowCenter/WindowWidth when present
        (else min–max), NIfTI uses the 0.5–99.5 percentile range of the volume,
        8-bit images are divided by 255 and 16-bit images are min–max scaled.
      * ``minmax``: every image (DICOM, NIfTI: every volume) min–max scaled.
      * ``lung`` / ``mediastinum`` / ``brain`` / ``bone``: CT presets in HU.
      Giving ``window_center`` and ``window_width`` overrides the preset.
    """

    model_config = ConfigDict(extra="forbid")

    window: WindowName = "auto"
    window_center: float | None = None
    window_width: float | None = Field(default=None, gt=0)
    nifti_axis: int = Field(default=2, ge=0, le=2, description="slice axis in RAS+ order: 0 sagittal, 1 coronal, 2 axial")
    slice_start: int | None = Field(default=None, ge=0)
    slice_stop: int | None = Field(default=None, ge=0)
    skip_empty_slices: bool = False
    empty_fraction: float = Field(default=0.01, ge=0, le=1, description="a slice with fewer foreground pixels than this is empty")
    labels: Literal["none", "folders"] = "none"
    strict: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ReadOptions":
        if (self.window_center is None) != (self.window_width is None):
            raise ValueError("give both window_center and window_width (or neither)")
        if self.slice_start is not None and self.slice_stop is not None and self.slice_stop <= self.slice_start:
            raise ValueError(f"slice_stop ({self.slice_stop}) must be greater than slice_start ({self.slice_start})")
        return self

    def custom_window(self) -> tuple[float, float] | None:
        """(center, width) to apply to HU-like data, or None for the format's default."""
        if self.window_center is not None:
            return float(self.window_center), float(self.window_width)
        return WINDOW_PRESETS.get(self.window)


@dataclass
class Sample:
    """One 2D image as read, before resizing.

    image: float32 ``(H, W)`` or ``(H, W, 3)`` with values in [0, 1].
    mask:  uint8 ``(H, W)`` with 0/1, present only where an annotation exists.
    label: class index, -1 when unlabelled. split: ``train``/``val``/``test`` or "".
    """

    id: str
    image: np.ndarray
    label: int = -1
    split: str = ""
    mask: np.ndarray | None = None
    caption: str | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)
