"""ROI manifests from ground-truth masks: the oracle ROI source (``gt-boxes``) for benchmarks, and the
way to pretrain with lung-field boxes on data whose masks are known.

Each annotated image gets the box(es) around its mask's connected components (one union box by default)
expanded by the same margin rule as ``mwm localize``; images without a valid or with an empty mask get
``status: "no_gt"`` (no ROI), so the manifest always lists every image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from ..data import open_source
from ..errors import DataError
from ..io import atomic_write_text
from .postprocess import expand_boxes, mask_to_boxes


def gt_rois(data: str | Path, expand: float = 0.1, box_mode: Literal["union", "per_component"] = "union",
            prompt: str = "gt-boxes") -> list[dict]:
    """One manifest record per image of ``data`` (an npz with ``masks``/``mask_valid``)."""
    src = open_source(data)
    masks = getattr(src, "masks", None)
    if masks is None:
        raise DataError(f"{data}: has no 'masks'; gt-boxes needs an npz with masks and mask_valid")
    valid = src.mask_valid
    recs = []
    h, w = masks.shape[1:3]
    for i, image_id in enumerate(src.ids):
        boxes: list = []
        status = "no_gt"
        if valid[i] and masks[i].any():
            boxes = expand_boxes(mask_to_boxes(torch.from_numpy(masks[i] > 0), box_mode), expand)
            status = "ok"
        recs.append({"image": image_id, "width": int(w), "height": int(h),
                     "boxes": [[round(float(v), 6) for v in b] for b in boxes], "prompt": prompt, "status": status})
    return recs


def with_fallback(recs: list[dict], fallback: list[dict], where: str = "fallback manifest") -> tuple[list[dict], int]:
    """Fill the records of ``recs`` that have no ROI (``status != "ok"``) from ``fallback`` (same image ids,
    e.g. a ``mwm localize`` manifest), keeping ``recs``' order; returns (records, how many came from fallback).

    The filled record is the fallback's, with ``"source": "fallback"`` added, so a reader can tell gt boxes
    from localized ones. A fallback whose sizes disagree with ``recs`` is an error (a manifest for other data).
    """
    by_id = {r["image"]: r for r in fallback}
    if fallback and not by_id.keys() & {r["image"] for r in recs}:
        raise DataError(f"{where}: none of its {len(by_id)} image ids occur in the data (first: "
                        f"{next(iter(by_id))!r}); was it written by `mwm localize` on the same data?")
    out, n = [], 0
    for r in recs:
        f = by_id.get(r["image"])
        if r["status"] != "ok" and f is not None and f["status"] == "ok" and f["boxes"]:
            if (f["width"], f["height"]) != (r["width"], r["height"]):
                raise DataError(f"{where}: {r['image']} is {f['width']}x{f['height']} there but "
                                f"{r['width']}x{r['height']} in the data; it was written for other data")
            r = {**f, "source": "fallback"}
            n += 1
        out.append(r)
    return out, n


def write_gt_rois(data: str | Path, out: str | Path, expand: float = 0.1,
                  box_mode: Literal["union", "per_component"] = "union", fallback: str | Path | None = None) -> dict:
    """Write the manifest (atomically) and a meta.json beside it; returns counts.

    ``fallback``: a ``rois.jsonl`` (from ``mwm localize``) whose ROIs are used for the images without a
    ground-truth mask — e.g. lung-field boxes where lung masks exist and localized lungs elsewhere.
    """
    from .manifest import read_manifest

    recs = gt_rois(data, expand, box_mode)
    n_gt = sum(r["status"] == "ok" for r in recs)
    n_fb = 0
    if fallback is not None:
        recs, n_fb = with_fallback(recs, read_manifest(fallback), str(fallback))
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
    meta = {"source": "gt-boxes", "data": str(data), "expand": expand, "box_mode": box_mode,
            "fallback": None if fallback is None else str(fallback), "n_images": len(recs),
            "n_with_roi": n_gt + n_fb, "n_gt": n_gt, "n_fallback": n_fb}
    atomic_write_text(out.with_name(out.stem + ".meta.json"), json.dumps(meta, indent=2))
    return meta
