"""The ROI manifest: JSON Lines, one object per image (see docs/DESIGN.md, "Contracts").

``{"image": id, "width": int, "height": int, "boxes": [[x0, y0, x1, y1], ...], "prompt": str,
"status": "ok" | reason, optional "saliency" / "mask" file names, ...}``; boxes normalized to [0, 1]
(pixel edges, x1/y1 exclusive). A ``meta.json`` beside it holds the localizer config.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import DataError

REQUIRED_KEYS = ("image", "width", "height", "boxes", "prompt", "status")
_BOX_TOL = 1e-6  # rounding in the writer may put a clipped edge a hair outside [0, 1]


class ManifestError(DataError):
    """A manifest line that does not follow the contract."""


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_record(rec: dict, where: str) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        raise ManifestError(f"{where}: missing key(s) {', '.join(missing)}; every line needs "
                            f"{', '.join(REQUIRED_KEYS)}")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise ManifestError(f"{where}: 'image' must be a non-empty string id, got {rec['image']!r}")
    for k in ("width", "height"):
        v = rec[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ManifestError(f"{where}: '{k}' must be a non-negative integer (pixels), got {v!r}")
    if not isinstance(rec["status"], str) or not rec["status"]:
        raise ManifestError(f"{where}: 'status' must be 'ok' or a failure reason, got {rec['status']!r}")
    if not isinstance(rec["prompt"], str):
        raise ManifestError(f"{where}: 'prompt' must be a string, got {rec['prompt']!r}")
    boxes = rec["boxes"]
    if not isinstance(boxes, list):
        raise ManifestError(f"{where}: 'boxes' must be a list of [x0, y0, x1, y1], got {boxes!r}")
    for b in boxes:
        if not (isinstance(b, list) and len(b) == 4 and all(_num(v) for v in b)):
            raise ManifestError(f"{where}: a box must be [x0, y0, x1, y1] (4 numbers), got {b!r}")
        x0, y0, x1, y1 = b
        if min(b) < -_BOX_TOL or max(b) > 1 + _BOX_TOL or x1 < x0 or y1 < y0:
            raise ManifestError(f"{where}: box {b} is not normalized (need 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1; "
                                "boxes are fractions of the image width/height, not pixels)")


def read_manifest(path: str | Path, validate: bool = True) -> list[dict]:
    """Read a manifest into a list of dicts, in file order.

    ``validate=True`` checks every line against the contract (required keys and their types, normalized
    boxes, unique ids) and raises :class:`ManifestError` naming ``path:line`` and what to fix.
    ``validate=False`` (for resuming a run) only parses, and skips any unparsable line with a warning.
    Either way, a last line without its newline that is not valid JSON — what a killed writer leaves —
    is ignored with a warning; blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest (a rois.jsonl written by `mwm localize`)")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    unterminated = not text.endswith("\n")  # then lines[-1] is the last line, cut short or not
    out: list[dict] = []
    seen: dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if unterminated and no == len(lines):
                warnings.warn(f"{where}: ignoring a truncated last line (an interrupted run?)", stacklevel=2)
                continue
            if not validate:
                warnings.warn(f"{where}: ignoring a line that is not valid JSON ({e.msg})", stacklevel=2)
                continue
            raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno}). If an interrupted run "
                                "left this partial line, delete it or re-run `mwm localize` to rewrite the "
                                "manifest") from None
        if not isinstance(rec, dict):
            if not validate:
                warnings.warn(f"{where}: ignoring a line that is not a JSON object", stacklevel=2)
                continue
            raise ManifestError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
        if validate:
            _check_record(rec, where)
            if rec["image"] in seen:
                raise ManifestError(f"{where}: image {rec['image']!r} already appears on line {seen[rec['image']]}; "
                                    "ids must be unique (merge shard parts with `mwm localize`, not by concatenating)")
            seen[rec["image"]] = no
        out.append(rec)
    return out


__all__ = ["read_manifest", "ManifestError", "REQUIRED_KEYS"]
