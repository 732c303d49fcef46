"""ROI manifests without a localizer: the oracle ROI source (``gt-boxes``) for benchmarks, the way to pretrain
with lung-field boxes on data whose masks are known, degraded oracle boxes (``perturb``) and classical
``foreground`` boxes (lung fields / body / brain, :mod:`mwm.rois.foreground`) for data with neither masks nor
prompts; and the writer (fallback, manifest, ``meta.json``) that ``reconstruction-error`` boxes (where a briefly
pretrained model reconstructs worst, :mod:`mwm.localize.recon_error`) go through too. That source needs a MIM
model, so it lives above pretraining and hands its records in (:func:`mwm.localize.gt_rois.write_gt_rois` is the
by-name entry point for all three sources).

Each annotated image gets the box(es) around its mask's connected components (one union box by default)
expanded by the same margin rule as ``mwm localize``; images without a valid or with an empty mask get
``status: "no_gt"`` (no ROI), so the manifest always lists every image. With ``perturb``
(:mod:`mwm.rois.perturb`) the gt box of each annotated image is replaced by one with the target occlusion
precision/recall, or moved to a random place; each such record carries ``perturb: {precision, recall}`` (the
values it achieves against its mask) and ``meta.json`` their means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from ..data import open_source
from ..errors import DataError
from ..io import atomic_write_text
from .boxes import expand_boxes, mask_to_boxes
from .manifest import read_manifest, write_manifest
from .perturb import PerturbConfig, achieved, perturb_boxes

__all__ = ["ROI_SOURCES", "gt_rois", "perturb_summary", "with_fallback", "select", "write_gt_rois"]

ROI_SOURCES = ("gt-boxes", "foreground", "reconstruction-error")


def _round(boxes: list) -> list:
    return [[round(float(v), 6) for v in b] for b in boxes]


def gt_rois(data: str | Path, expand: float = 0.1, box_mode: Literal["union", "per_component"] = "union",
            prompt: str = "gt-boxes", perturb: PerturbConfig | dict | None = None, seed: int = 0,
            indices: list[int] | None = None) -> list[dict]:
    """One manifest record per image of ``data`` (an npz with ``masks``/``mask_valid``; or of its images
    ``indices``); ``perturb``: degrade the boxes (see :mod:`mwm.rois.perturb`; draws seeded by ``seed`` and the
    image id)."""
    src = open_source(data)
    masks = getattr(src, "masks", None)
    if masks is None:
        raise DataError(f"{data}: has no 'masks'; gt-boxes needs an npz with masks and mask_valid")
    pc = PerturbConfig.model_validate(perturb) if isinstance(perturb, dict) else perturb
    if pc is not None and pc.has_targets and box_mode != "union":
        raise DataError(f"{data}: perturb with precision/recall makes one box per image; use box_mode union")
    valid = src.mask_valid
    recs = []
    h, w = masks.shape[1:3]
    for i in range(len(src.ids)) if indices is None else indices:
        image_id = src.ids[i]
        boxes: list = []
        status = "no_gt"
        if valid[i] and masks[i].any():
            boxes = expand_boxes(mask_to_boxes(torch.from_numpy(masks[i] > 0), box_mode), expand)
            status = "ok"
        recs.append({"image": image_id, "width": int(w), "height": int(h),
                     "boxes": _round(boxes), "prompt": prompt, "status": status})
    if pc is not None:
        idx = [i for i, r in enumerate(recs) if r["status"] == "ok"]
        moved = perturb_boxes(masks[idx], [recs[i]["image"] for i in idx], [recs[i]["boxes"] for i in idx], pc, seed)
        prec, rec = achieved(masks[idx], moved)
        for i, b, p, r in zip(idx, moved, prec, rec):
            recs[i].update(boxes=_round(b), perturb={"precision": round(float(p), 4), "recall": round(float(r), 4)})
    return recs


def perturb_summary(recs: list[dict], pc: PerturbConfig, seed: int) -> dict:
    """meta.json's ``perturb``: the settings and the achieved means over the perturbed records."""
    got = [r["perturb"] for r in recs if "perturb" in r and r.get("source") != "fallback"]
    mean = (lambda k: round(float(np.mean([g[k] for g in got])), 4) if got else None)
    return {**pc.model_dump(), "seed": seed, "n": len(got), "achieved_precision": mean("precision"),
            "achieved_recall": mean("recall")}


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


def select(data: str | Path, split: str | None = None, limit: int | None = None) -> list[int] | None:
    """The image indices of ``split`` (None or ``all``: every image), the first ``limit`` of them; None = all."""
    if split in (None, "", "all") and limit is None:
        return None
    src = open_source(data)
    if split not in (None, "", "all"):
        present = sorted({str(s) for s in src.splits if s})
        if split not in present:
            raise DataError(f"{data}: no images in split '{split}'; the splits present are "
                            f"{', '.join(present) if present else 'none (leave --split out)'}")
    idx = src.indices(None if split in (None, "", "all") else split)
    return idx[:limit] if limit is not None else idx


def write_gt_rois(data: str | Path, out: str | Path, expand: float = 0.1,
                  box_mode: Literal["union", "per_component"] = "union", fallback: str | Path | None = None, *,
                  source: Literal["gt-boxes", "foreground", "reconstruction-error"] = "gt-boxes",
                  perturb: PerturbConfig | dict | None = None, seed: int = 0,
                  kind: Literal["lungs", "body", "brain"] = "lungs", split: str | None = None,
                  limit: int | None = None,
                  records: Callable[[list[int] | None], tuple[list[dict], dict]] | None = None) -> dict:
    """Write the manifest (atomically) and a meta.json beside it; returns the meta (counts, settings).

    source: ``gt-boxes`` (boxes around the masks, optionally ``perturb``-ed with ``seed``), ``foreground``
    (classical ``kind`` boxes for every image, :func:`mwm.rois.foreground.foreground_records`; no masks needed)
    or another source, whose ``records(indices)`` the caller gives: the records of those images (None: all) and
    the meta entries to add (``reconstruction-error``: :func:`mwm.localize.gt_rois.write_gt_rois` scores the
    images with a pretraining run).
    fallback: a ``rois.jsonl`` (from ``mwm localize``) whose ROIs are used for the images without an ROI —
    e.g. lung-field boxes where lung masks exist and localized lungs elsewhere.
    split, limit: only the images of this split (``all``: every one), the first ``limit`` of them.
    """
    if source not in ROI_SOURCES:
        raise DataError(f"unknown ROI source {source!r}; use one of {', '.join(ROI_SOURCES)}")
    pc = PerturbConfig.model_validate(perturb) if isinstance(perturb, dict) else perturb
    if pc is not None and source != "gt-boxes":
        raise DataError(f"perturb degrades ground-truth boxes; it needs source gt-boxes, not {source}")
    indices = select(data, split, limit)
    extra: dict = {}
    if source == "foreground":
        from .foreground import FOREGROUND_KINDS, foreground_records

        if kind not in FOREGROUND_KINDS:
            raise DataError(f"unknown foreground kind {kind!r}; use one of {', '.join(FOREGROUND_KINDS)}")
        recs = foreground_records(data, kind, box_mode, expand, indices=indices)
        extra = {"kind": kind}
    elif source != "gt-boxes":
        if records is None:
            raise DataError(f"ROI source {source} scores the images with a model: write it with "
                            f"mwm.localize.gt_rois.write_gt_rois (or `mwm data gt-rois --source {source}`)")
        recs, extra = records(indices)
    else:
        recs = gt_rois(data, expand, box_mode, perturb=pc, seed=seed, indices=indices)
    n_gt = sum(r["status"] == "ok" for r in recs)
    n_fb = 0
    if fallback is not None:
        recs, n_fb = with_fallback(recs, read_manifest(fallback), str(fallback))
    out = Path(out)
    write_manifest(out, recs)
    meta = {"source": source, "data": str(data), "split": split, "limit": limit, "expand": expand,
            "box_mode": box_mode, "fallback": None if fallback is None else str(fallback), "n_images": len(recs),
            "n_with_roi": n_gt + n_fb, "n_gt": n_gt, "n_fallback": n_fb, **extra}
    if source != "gt-boxes":
        meta["n_" + source.split("-")[0]] = meta.pop("n_gt")  # n_foreground / n_reconstruction
    if pc is not None:
        meta["perturb"] = perturb_summary(recs, pc, seed)
    atomic_write_text(out.with_name(out.stem + ".meta.json"), json.dumps(meta, indent=2))
    return meta
