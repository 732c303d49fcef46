"""Moved to :mod:`mwm.rois.foreground` (classical foreground ROIs need no VLM); re-exported for code written
before the move."""

from ..rois.foreground import (  # noqa: F401
    FOREGROUND_KINDS,
    ForegroundResult,
    foreground_boxes,
    foreground_masks,
    foreground_records,
)

__all__ = ["FOREGROUND_KINDS", "ForegroundResult", "foreground_boxes", "foreground_masks", "foreground_records"]
