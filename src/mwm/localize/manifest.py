"""Moved to :mod:`mwm.rois.manifest`: the ROI manifest sits between localization and pretraining, so both
import it from there. This module re-exports it for code written before the move."""

from ..rois.manifest import (  # noqa: F401
    REQUIRED_KEYS,
    ManifestError,
    append_records,
    check_records,
    done_records,
    has_roi,
    make_record,
    manifest_lines,
    manifest_paths,
    read_manifest,
    usable_boxes,
    write_manifest,
)

__all__ = ["REQUIRED_KEYS", "ManifestError", "append_records", "check_records", "done_records", "has_roi",
           "make_record", "manifest_lines", "manifest_paths", "read_manifest", "usable_boxes",
           "write_manifest"]
