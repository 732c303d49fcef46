"""Moved to :mod:`mwm.rois.perturb` (degraded oracle ROIs need no VLM); re-exported for code written before
the move."""

from ..rois.perturb import PerturbConfig, achieved, perturb_boxes, random_place, target_box  # noqa: F401

__all__ = ["PerturbConfig", "achieved", "perturb_boxes", "random_place", "target_box"]
