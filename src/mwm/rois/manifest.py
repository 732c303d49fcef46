"""The ROI manifest: JSON Lines, one object per image (see docs/DESIGN.md, "Contracts").

``{"image": id, "width": int, "height": int, "boxes": [[x0, y0, x1, y1], ...], "prompt": str,
"status": "ok" | reason, optional "saliency" / "mask" file names, ...}``; boxes normalized to [0, 1]
(pixel edges, x1/y1 exclusive). A ``meta.json`` beside it holds the localizer config.

This module is the one place that decides what a record means:

* :func:`read_manifest` rejects what breaks the contract (naming ``file:line``), including NaN/±inf
  coordinates, and drops zero-width / zero-height boxes with a warning (they cover no pixel);
* :func:`usable_boxes` / :func:`has_roi` say whether a record gives an ROI — consumers (pretraining's
  join, benchmarks) call these instead of testing ``status``/``boxes`` themselves;
* :func:`make_record` builds a record, :func:`append_records` / :func:`done_records` / :func:`write_manifest`
  write a manifest the way a resumable, sharded producer needs (whole lines, one fsync'd write per batch; every
  record written so far, across shard parts; the merged file atomically).

It lives in :mod:`mwm.rois`, below both the producers (``mwm.localize``, the label-free sources) and the
consumers (pretraining, benchmarks), so neither imports the other (``mwm.localize.manifest`` re-exports it).
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from pathlib import Path

from ..errors import DataError
from ..io import atomic_write_text

REQUIRED_KEYS = ("image", "width", "height", "boxes", "prompt", "status")
_BOX_TOL = 1e-6  # rounding in the writer may put a clipped edge a hair outside [0, 1]


class ManifestError(DataError):
    """A manifest line that does not follow the contract."""


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _box_area_positive(b) -> bool:
    return b[2] > b[0] and b[3] > b[1]


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
        # NaN fails every comparison, so min()/max() below would let it through: test finiteness first
        if not all(math.isfinite(v) for v in b):
            raise ManifestError(f"{where}: box {b} has a NaN or infinite coordinate; re-run `mwm localize` for "
                                "this image (delete the line, the run resumes) or fix the tool that wrote it")
        x0, y0, x1, y1 = b
        if min(b) < -_BOX_TOL or max(b) > 1 + _BOX_TOL or x1 < x0 or y1 < y0:
            raise ManifestError(f"{where}: box {b} is not normalized (need 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1; "
                                "boxes are fractions of the image width/height, not pixels)")


def usable_boxes(rec: dict) -> list[list[float]]:
    """The boxes of a record that make an ROI: none unless ``status == "ok"``; otherwise its boxes with
    finite coordinates and positive width and height (a zero-area box covers no pixel).

    Use this (or :func:`has_roi`) wherever a manifest is consumed, rather than testing ``status`` and
    ``boxes`` by hand, so that every consumer agrees on "this image has an ROI".
    """
    if rec.get("status") != "ok":
        return []
    out = []
    for b in rec.get("boxes") or []:
        if (isinstance(b, (list, tuple)) and len(b) == 4 and all(_num(v) and math.isfinite(v) for v in b)
                and _box_area_positive(b)):
            out.append([float(v) for v in b])
    return out


def has_roi(rec: dict) -> bool:
    """True when the record gives at least one usable box (:func:`usable_boxes`)."""
    return bool(usable_boxes(rec))


def check_records(recs: list[dict], source: str = "manifest", lines: list[int] | None = None) -> list[dict]:
    """Validate records against the contract (as :func:`read_manifest` does for a file) and drop zero-area
    boxes with one warning; returns the records (boxes lists replaced where a box was dropped).

    ``lines``: the file line of each record, for messages (default: ``record 1, 2, …``).
    """
    seen: dict[str, int] = {}
    dropped: list[tuple[str, list]] = []
    out = []
    for k, rec in enumerate(recs):
        no = lines[k] if lines is not None else k + 1
        where = f"{source}:{no}" if lines is not None else f"{source}: record {no}"
        if not isinstance(rec, dict):
            raise ManifestError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
        _check_record(rec, where)
        if rec["image"] in seen:
            raise ManifestError(f"{where}: image {rec['image']!r} already appears on line {seen[rec['image']]}; "
                                "ids must be unique (merge shard parts with `mwm localize`, not by concatenating)")
        seen[rec["image"]] = no
        keep = [b for b in rec["boxes"] if _box_area_positive(b)]
        if len(keep) != len(rec["boxes"]):
            dropped += [(where, b) for b in rec["boxes"] if not _box_area_positive(b)]
            rec = {**rec, "boxes": keep}
        out.append(rec)
    if dropped:
        warnings.warn(f"{dropped[0][0]}: dropped {len(dropped)} zero-area box(es) (first: {dropped[0][1]}); a box of "
                      "zero width or height covers no pixel, so it is not an ROI", stacklevel=3)
    return out


def _decode(raw: bytes, path: Path, no: int) -> str:
    try:
        return raw.decode("utf-8-sig" if no == 1 else "utf-8")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}:{no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); a "
                            "manifest is JSON Lines in UTF-8 as `mwm localize` writes it — is this the right "
                            "file? Re-save it as UTF-8 or re-run `mwm localize`") from None


def read_manifest(path: str | Path, validate: bool = True) -> list[dict]:
    """Read a manifest into a list of dicts, in file order.

    ``validate=True`` checks every line against the contract (required keys and their types, finite
    normalized boxes, unique ids) and raises :class:`ManifestError` naming ``path:line`` and what to fix;
    zero-area boxes are dropped with a warning (:func:`check_records`).
    ``validate=False`` (for resuming a run) only parses, and skips any unparsable or non-UTF-8 line with a
    warning. Either way, a last line without its newline that cannot be parsed — what a killed writer
    leaves, possibly cut inside a multi-byte character — is ignored with a warning; blank lines are skipped.
    A line that is not UTF-8 (a binary file) is a :class:`ManifestError` naming it when validating.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest (a rois.jsonl written by `mwm localize`)")
    data = path.read_bytes()
    lines = data.split(b"\n")
    unterminated = not data.endswith(b"\n")  # then lines[-1] is the last line, cut short or not
    out: list[dict] = []
    nos: list[int] = []
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{no}"
        truncated_tail = unterminated and no == len(lines)
        try:
            line = _decode(raw, path, no)
            rec = json.loads(line)
        except (ManifestError, json.JSONDecodeError) as e:
            if truncated_tail:
                warnings.warn(f"{where}: ignoring a truncated last line (an interrupted run?)", stacklevel=2)
                continue
            if not validate:
                why = "not valid JSON" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
                warnings.warn(f"{where}: ignoring a line that is {why}", stacklevel=2)
                continue
            if isinstance(e, ManifestError):
                raise
            raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno}). If an interrupted run "
                                "left this partial line, delete it or re-run `mwm localize` to rewrite the "
                                "manifest") from None
        if not isinstance(rec, dict):
            if not validate:
                warnings.warn(f"{where}: ignoring a line that is not a JSON object", stacklevel=2)
                continue
            raise ManifestError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
        out.append(rec)
        nos.append(no)
    return check_records(out, str(path), nos) if validate else out


# -- determinism ---------------------------------------------------------------------------------
def image_seed(seed: int, key: str | int) -> int:
    """A stable 63-bit seed for one image (independent of Python's hash randomisation). Every ROI source that
    draws (M2IB's noise, perturbed gt boxes, reconstruction-error masks) seeds its draws for an image from this,
    so a record depends only on ``(seed, image id)``, not on batching, order or the subset of images."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(key).encode())) % (2**63 - 1)


# -- writing -------------------------------------------------------------------------------------
def make_record(image_id: str, w: int, h: int, prompt: str, boxes: list, status: str,
                note: str | None = None) -> dict:
    """A manifest record (the required keys, boxes rounded to 6 decimals; ``note`` when given)."""
    rec = {"image": image_id, "width": int(w), "height": int(h),
           "boxes": [[round(float(v), 6) for v in b] for b in boxes], "prompt": prompt, "status": status}
    if note:
        rec["note"] = note
    return rec


def manifest_lines(records: list[dict]) -> str:
    """Records → JSON Lines text (compact separators, one record per line, newline-terminated)."""
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def write_manifest(path: str | Path, records: list[dict]) -> Path:
    """Write a whole manifest atomically (a kill leaves the previous file or the new one, never half)."""
    path = Path(path)
    atomic_write_text(path, manifest_lines(records))
    return path


def manifest_paths(out: Path, shard: tuple[int, int]) -> tuple[Path, Path]:
    """(this run's part file, the merged manifest) in a producer's output folder: ``rois.jsonl`` unsharded,
    ``rois.part-i-of-n.jsonl`` for shard ``i`` of ``n``."""
    i, n = shard
    merged = out / "rois.jsonl"
    return (merged if n == 1 else out / f"rois.part-{i}-of-{n}.jsonl"), merged


def done_records(out: Path) -> dict[str, dict]:
    """Every record already written (merged manifest and all shard parts), by image id."""
    recs: dict[str, dict] = {}
    for p in [out / "rois.jsonl", *sorted(out.glob("rois.part-*-of-*.jsonl"))]:
        if p.is_file():
            for r in read_manifest(p, validate=False):
                recs[r["image"]] = r
    return recs


def append_records(path: Path, records: list[dict]) -> None:
    """Append whole JSON lines with one write + fsync (a kill leaves at most one partial last line)."""
    if not records:
        return
    data = manifest_lines(records)
    with open(path, "a", encoding="utf-8") as f:
        # a previous kill may have left a partial line: start ours on a fresh line
        if f.tell() > 0:
            with open(path, "rb") as g:
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    data = "\n" + data
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def safe_file_name(image_id: str) -> str:
    """A file name (no extension) for an image's saliency / mask / gallery files: the id with characters
    other than letters, digits, ``-_.`` replaced by ``_`` (its last 80, no leading dot), then ``-`` and 10
    hex digits of the id's SHA-1 — so ``a/b.png``, ``a_b.png`` and ``a b.png`` get different files, and an
    image keeps its name across runs and machines (``a_b.png`` → ``a_b.png-d3cddaada7``)."""
    import hashlib

    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)[-80:].lstrip(".") or "image"
    return f"{base}-{hashlib.sha1(image_id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


__all__ = ["safe_file_name", "read_manifest", "check_records", "usable_boxes", "has_roi", "ManifestError", "REQUIRED_KEYS",
           "image_seed", "make_record", "manifest_lines", "write_manifest", "manifest_paths", "done_records",
           "append_records"]
