"""How well ROI boxes cover annotated regions: MWM's occlusion precision / recall, plus Dice and IoU.

Per image, ``R_p`` is the union of the manifest's boxes rasterized at the ground-truth mask's resolution
(pixel centres inside a box, :func:`~mwm.localize.postprocess.boxes_to_masks`) and ``R_gt`` the mask:

* occlusion precision ``|R_p ∩ R_gt| / |R_p|`` — how much of what we would mask is the target;
* occlusion recall ``|R_p ∩ R_gt| / |R_gt|`` — how much of the target we would mask;
* Dice ``2|R_p ∩ R_gt| / (|R_p| + |R_gt|)`` and IoU ``|R_p ∩ R_gt| / |R_p ∪ R_gt|``.

Images without a valid ground truth are left out and counted (``n_no_gt``). Images whose valid mask is
empty have no lesion: recall (and so Dice/IoU) is undefined there, so they are left out of the four means
too and counted (``n_empty_gt``); an ROI predicted on one is a **false positive** (``false_positive`` per
image: its boxes cover at least one mask pixel; ``n_false_positive`` and ``false_positive_rate`` =
n_false_positive / n_empty_gt in the summary). An empty prediction on a non-empty mask scores 0 on all
four. Ground-truth images absent from the manifest are counted as ``n_missing``. A manifest box with a
NaN/inf coordinate is an error naming its line (never scored as an empty box). The random-box baseline moves each box,
same width and height, to a uniformly random position inside the image (seeded).
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..rois.boxes import boxes_to_masks, region_metrics  # region_metrics: re-exported (moved there)

METRICS = ("precision", "recall", "dice", "iou")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# extensions an image id may carry; ids are matched with these removed (``case1.dcm`` ↔ ``case1.png``)
ID_SUFFIXES = (".nii.gz", ".nii", ".dcm", ".dicom", ".ima", ".npy", ".npz") + MASK_SUFFIXES


def strip_ext(image_id: str) -> str:
    """``"a/b.png"`` → ``"a/b"``; ids without a known image extension (``"12"``, ``"ct.nii.gz#z0042"``) unchanged."""
    low = image_id.lower()
    for s in ID_SUFFIXES:
        if low.endswith(s):
            return image_id[: -len(s)]
    return image_id


def random_boxes_like(boxes_per_image: list[list[list[float]]], seed: int = 0) -> list[list[list[float]]]:
    """Each box moved, same width and height (so same area and aspect), to a uniformly random position
    inside [0, 1]²: ``x0 ~ U(0, 1 - w)``, ``y0 ~ U(0, 1 - h)``. One generator over all boxes in order,
    seeded, so the baseline is reproducible for a given manifest."""
    flat = [b for bs in boxes_per_image for b in bs]
    rng = np.random.default_rng(seed)
    if not flat:
        return [[] for _ in boxes_per_image]
    a = np.clip(np.asarray(flat, dtype=np.float64), 0.0, 1.0)
    wh = np.clip(a[:, 2:] - a[:, :2], 0.0, 1.0)
    xy = rng.uniform(size=wh.shape) * (1.0 - wh)
    moved = np.concatenate([xy, xy + wh], 1).tolist()
    out, k = [], 0
    for bs in boxes_per_image:
        out.append(moved[k: k + len(bs)])
        k += len(bs)
    return out


# -- ground truth --------------------------------------------------------------------------------
@dataclass
class GroundTruth:
    """Annotated masks by image id. ``masks``: an array ``(N, H, W)`` (npz) or a list of ``(H_i, W_i)``
    arrays (folder); nonzero = foreground. ``valid``: bool ``(N,)``, False where an image has no annotation."""

    ids: list[str]
    masks: np.ndarray | list[np.ndarray]
    valid: np.ndarray
    source: str = ""
    keys: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if not self.keys:
            for i, image_id in enumerate(self.ids):
                k = strip_ext(image_id)
                if k in self.keys:
                    raise DataError(f"{self.source}: ground-truth ids {self.ids[self.keys[k]]!r} and {image_id!r} "
                                    "are the same image id once the extension is removed; rename one")
                self.keys[k] = i

    def shape(self, i: int) -> tuple[int, int]:
        return tuple(self.masks[i].shape[:2])


def _read_mask_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("RGBA", "LA", "PA"):  # alpha is not annotation
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            a = np.asarray(im)
    except Exception as e:
        raise DataError(f"cannot read mask {path}: {e}") from e
    return (a != 0).any(-1) if a.ndim == 3 else a != 0


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Masks from our npz (``masks`` where ``mask_valid``; ids as :func:`mwm.data.open_source` gives them)
    or from a folder of mask images (PNG/JPG/TIFF/BMP, searched recursively) whose paths relative to the
    folder, without extension, are the image ids without extension."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such ground-truth file or folder (an npz with masks, or a folder of masks)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in MASK_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: no mask images ({', '.join(MASK_SUFFIXES)}) in this folder")
        ids = [p.relative_to(path).as_posix() for p in files]
        masks = [_read_mask_image(p) for p in files]
        return GroundTruth(ids, masks, np.ones(len(ids), bool), str(path))
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: ground truth must be an .npz with 'masks' + 'mask_valid', or a folder of mask images")
    from ..data import open_source

    src = open_source(path)
    masks = getattr(src, "masks", None)
    if masks is None:
        raise DataError(f"{path}: has no 'masks' array, so there is nothing to evaluate against; "
                        "use an npz with masks + mask_valid (e.g. from `mwm data phantoms`) or a folder of masks")
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.ndim != 3:
        raise DataError(f"{path}: 'masks' must be (N, H, W); got {masks.shape}")
    return GroundTruth(src.ids, masks, np.asarray(src.mask_valid, bool), str(path))


# -- evaluation ----------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """``summary``: counts and means (JSON-ready; a mean is None when no image counts); ``rows``: one dict per
    manifest image (the per-image CSV)."""

    summary: dict
    rows: list[dict]


def _mean(v: list[float]) -> float | None:
    return float(np.mean(v)) if v else None


def evaluate_manifest(manifest: str | Path | list[dict], gt: str | Path | GroundTruth, *,
                      random_baseline: bool = False, seed: int = 0, batch_size: int = 256,
                      warn_missing: bool = True) -> EvalResult:
    """Score a manifest's boxes against ground-truth masks; see the module docstring for the definitions.

    manifest: a ``rois.jsonl`` path or its records (:func:`~mwm.localize.manifest.read_manifest`);
    gt: an npz / mask folder path or a :class:`GroundTruth`. Images are matched by id without extension.
    Masks are compared in stacks of ``batch_size`` images of the same size (one batched rasterization and
    one reduction per stack). ``random_baseline`` adds ``random_*`` means for boxes of the same sizes at
    random positions (``seed``). ``warn_missing``: warn about annotated images the manifest lacks (always
    counted in ``n_missing``); off where the manifest covers one split by design.
    """
    from ..rois.manifest import check_records, read_manifest

    # records given directly go through the same contract as a file: NaN boxes are an error, not a 0 score
    recs = read_manifest(manifest) if isinstance(manifest, (str, Path)) else check_records(list(manifest), "manifest")
    if not recs:
        raise DataError(f"{manifest}: the manifest has no records to evaluate")
    g = gt if isinstance(gt, GroundTruth) else load_ground_truth(gt)

    rows: list[dict] = []
    gt_index: list[int | None] = []
    seen_keys: dict[str, str] = {}
    for r in recs:
        key = strip_ext(r["image"])
        if key in seen_keys:
            raise DataError(f"manifest ids {seen_keys[key]!r} and {r['image']!r} are the same image once the "
                            "extension is removed; cannot tell which to score")
        seen_keys[key] = r["image"]
        i = g.keys.get(key)
        gt_index.append(i)
        rows.append({"image": r["image"], "status": r.get("status", ""), "n_boxes": len(r["boxes"])})
    pred_boxes = [[list(map(float, b)) for b in r["boxes"]] for r in recs]
    rand_boxes = random_boxes_like(pred_boxes, seed) if random_baseline else None

    # which images count, and why not
    aspect_mismatch = 0
    groups: dict[tuple[int, int], list[int]] = {}
    for j, (r, i) in enumerate(zip(recs, gt_index)):
        row = rows[j]
        if i is None or not g.valid[i]:
            row["gt"] = "no_gt"
            continue
        m = g.masks[i]
        # an empty valid mask: no lesion; rasterized too, to tell a false positive from a true negative
        row["gt"] = "ok" if np.any(m) else "empty_gt"
        h, w = m.shape[:2]
        rw, rh = r.get("width") or 0, r.get("height") or 0
        if row["gt"] == "ok" and rw > 0 and rh > 0 and abs((w / h) / (rw / rh) - 1) > 0.01:
            aspect_mismatch += 1
        groups.setdefault((h, w), []).append(j)

    for (h, w), js in groups.items():
        for s in range(0, len(js), batch_size):
            chunk = js[s: s + batch_size]
            gts = torch.from_numpy(np.stack([np.asarray(g.masks[gt_index[j]]) != 0 for j in chunk]))
            sets = [("", pred_boxes)] + ([("random_", rand_boxes)] if rand_boxes is not None else [])
            for prefix, bxs in sets:
                res = region_metrics(boxes_to_masks([bxs[j] for j in chunk], h, w), gts)
                cols = {k: v.tolist() for k, v in res.items()}
                for n, j in enumerate(chunk):
                    row = rows[j]
                    if row["gt"] == "empty_gt":
                        if not prefix:
                            row.update(gt_area=0, pred_area=cols["pred_area"][n], intersection=0,
                                       false_positive=cols["pred_area"][n] > 0)
                        continue
                    if not prefix:
                        row.update(gt_area=cols["gt_area"][n], pred_area=cols["pred_area"][n],
                                   intersection=cols["intersection"][n])
                    else:
                        row["random_pred_area"] = cols["pred_area"][n]
                        row["random_intersection"] = cols["intersection"][n]
                    for k in METRICS:
                        row[prefix + k] = cols[k][n]

    scored = [row for row in rows if row["gt"] == "ok"]
    matched = {i for i in gt_index if i is not None}
    missing = [g.ids[i] for i in range(len(g.ids)) if g.valid[i] and i not in matched]
    summary: dict = {"n": len(scored)}
    summary.update({k: _mean([row[k] for row in scored]) for k in METRICS})
    n_empty = sum(row["gt"] == "empty_gt" for row in rows)
    n_fp = sum(bool(row.get("false_positive")) for row in rows)
    summary.update(n_manifest=len(recs), n_no_gt=sum(row["gt"] == "no_gt" for row in rows),
                   n_empty_gt=n_empty, n_false_positive=n_fp,
                   false_positive_rate=n_fp / n_empty if n_empty else None, n_missing=len(missing),
                   n_failed=sum(row["status"] != "ok" for row in rows), n_aspect_mismatch=aspect_mismatch)
    if random_baseline:
        summary.update({f"random_{k}": _mean([row[f"random_{k}"] for row in scored]) for k in METRICS})
        summary["random_seed"] = seed
    if missing and warn_missing:
        warnings.warn(f"{len(missing)} annotated image(s) of {g.source} are not in the manifest "
                      f"(e.g. {', '.join(missing[:3])}); they are not scored", stacklevel=2)
    if aspect_mismatch:
        warnings.warn(f"{aspect_mismatch} image(s) have a ground-truth mask whose aspect ratio differs from the "
                      "manifest's width/height; boxes are fractions of the image the manifest describes, so check "
                      "that the masks belong to the same (unpadded, uncropped) images", stacklevel=2)
    if not scored:
        warnings.warn("no manifest image has a non-empty ground-truth mask; the means are undefined"
                      + (f" ({n_fp} of {n_empty} lesion-free images got an ROI)" if n_empty else ""), stacklevel=2)
    return EvalResult(summary, rows)


CSV_COLUMNS = ["image", "status", "gt", "n_boxes", "gt_area", "pred_area", "intersection", *METRICS, "false_positive"]
RANDOM_COLUMNS = ["random_pred_area", "random_intersection", *(f"random_{k}" for k in METRICS)]


def write_per_image_csv(rows: list[dict], path: str | Path) -> Path:
    """One line per manifest image; metric cells are empty for images that are not scored."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = CSV_COLUMNS + (RANDOM_COLUMNS if any("random_precision" in r for r in rows) else [])

    def cell(v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.6f}" if isinstance(v, float) else v

    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(cols)
        for r in rows:
            wr.writerow([cell(r.get(c)) for c in cols])
    return path


__all__ = ["region_metrics", "random_boxes_like", "GroundTruth", "load_ground_truth", "evaluate_manifest",
           "EvalResult", "write_per_image_csv", "strip_ext", "METRICS"]
