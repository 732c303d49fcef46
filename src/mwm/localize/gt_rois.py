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


def write_gt_rois(data: str | Path, out: str | Path, expand: float = 0.1,
                  box_mode: Literal["union", "per_component"] = "union") -> dict:
    """Write the manifest (atomically) and a meta.json beside it; returns counts."""
    recs = gt_rois(data, expand, box_mode)
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in recs))
    meta = {"source": "gt-boxes", "data": str(data), "expand": expand, "box_mode": box_mode,
            "n_images": len(recs), "n_with_roi": sum(r["status"] == "ok" for r in recs)}
    atomic_write_text(out.with_name(out.stem + ".meta.json"), json.dumps(meta, indent=2))
    return meta
