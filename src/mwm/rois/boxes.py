"""ROI geometry: masks ↔ boxes, box margins, connected components, and how well a region matches a mask.

The ROI manifest's boxes (:mod:`mwm.rois.manifest`) follow these conventions, shared by every producer
(``mwm localize``, gt-boxes, foreground, reconstruction error) and every consumer (pretraining's join,
``mwm localize-eval``):

* masks: ``torch.bool`` ``(B, H, W)`` (or ``(H, W)`` where said), True = region;
* boxes: ``[x0, y0, x1, y1]`` **normalized** to [0, 1] by the image width/height, with **pixel-edge**
  coordinates, so ``x1``/``y1`` are exclusive: pixel ``(r, c)`` of an ``H × W`` image alone is
  ``[c / W, r / H, (c + 1) / W, (r + 1) / H]``, and the whole image is ``[0, 0, 1, 1]``.
  A box → pixels rasterization takes every pixel whose **centre** lies in the half-open box
  (:func:`boxes_to_mask`), so mask → boxes → mask gives back the box of the mask exactly.

Component order, everywhere (:func:`largest_components`, ``mask_to_boxes(mode="per_component")``):
largest first; equal sizes → the component whose first pixel in raster order (row-major) comes first.

Every function is pure and batched. Moved here from ``mwm.localize.postprocess`` / ``mwm.localize.metrics``
(which re-export them) so that the ROI sources that need no VLM, and pretraining, do not import ``localize``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["BoxMode", "Components", "largest_components", "mask_to_boxes", "expand_boxes", "boxes_to_mask",
           "boxes_to_masks", "region_metrics"]

BoxMode = Literal["union", "per_component"]


# -- connected components -------------------------------------------------------------------------
def _structure(connectivity: int) -> np.ndarray:
    if connectivity == 8:
        return np.ones((3, 3), dtype=bool)
    if connectivity == 4:
        return np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def _ordered_labels(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mask bool (H, W) → (label image int (H, W), labels in our order (n,), their sizes (n,)).

    Order: size descending, then the raster index of the component's first pixel ascending.
    """
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=_structure(connectivity))
    if n == 0:
        return lab, np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = lab.ravel()
    sizes = np.bincount(flat, minlength=n + 1)[1:]
    first = np.full(n + 1, flat.size, dtype=np.int64)
    u, idx = np.unique(flat, return_index=True)
    first[u] = idx
    order = np.lexsort((first[1:], -sizes))  # last key is primary
    return lab, order + 1, sizes[order]


def _slice_box(sl: tuple[slice, slice], h: int, w: int) -> list[float]:
    return [sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h]


@dataclass
class Components:
    """What :func:`largest_components` keeps, per image.

    ``mask``: bool ``(B, H, W)``, the union of the kept components (``kept[j]`` is ``kept.mask[j]``, so a
    ``Components`` indexes like the mask); ``components[j]``: bool ``(k_j, H, W)``, one mask per kept
    component of image j, in component order (largest first); ``boxes[j]``: float ``(k_j, 4)`` their
    normalized boxes in the same order; ``sizes[j]``: int ``(k_j,)`` their pixel counts. ``k_j <= k``
    (fewer when the image has fewer components, 0 for an empty mask).
    """

    mask: Tensor
    components: list[Tensor] = field(default_factory=list)
    boxes: list[Tensor] = field(default_factory=list)
    sizes: list[Tensor] = field(default_factory=list)

    def __getitem__(self, j):
        return self.mask[j]

    def __len__(self) -> int:
        return len(self.mask)


def largest_components(mask: Tensor, k: int | None = 1, connectivity: int = 8) -> Components:
    """Keep the ``k`` largest connected components of each image (``k=None``: all, in order).

    mask: bool ``(B, H, W)`` (or ``(H, W)``, treated as B = 1) → :class:`Components` on ``mask``'s device.
    Ties in size: the component whose first pixel in raster order comes first wins.

    Labelling runs per image with ``scipy.ndimage.label`` on the CPU: neither torch nor scipy has batched
    connected-component labelling, and one C call per image is fast next to the saliency it follows.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 (or None for all components), got {k}")
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be (B, H, W) or (H, W); got {tuple(mask.shape)}")
    from scipy import ndimage

    dev = mask.device
    m = mask.detach().to("cpu", torch.bool).numpy()
    b, h, w = m.shape
    out = np.zeros_like(m)
    comps, boxes, sizes = [], [], []
    for j in range(b):
        lab, order, sz = _ordered_labels(m[j], connectivity)
        order, sz = order[:k], sz[:k]
        cm = lab[None] == order[:, None, None]  # (k_j, H, W)
        out[j] = cm.any(0) if len(order) else False
        slices = ndimage.find_objects(lab)
        bx = [_slice_box(slices[lbl - 1], h, w) for lbl in order]
        comps.append(torch.from_numpy(cm).to(dev))
        boxes.append(torch.tensor(bx, dtype=torch.float32, device=dev).reshape(-1, 4))
        sizes.append(torch.from_numpy(sz.astype(np.int64)).to(dev))
    return Components(torch.from_numpy(out).to(dev), comps, boxes, sizes)


# -- masks ↔ boxes --------------------------------------------------------------------------------
def mask_to_boxes(mask: Tensor, mode: BoxMode = "union", connectivity: int = 8) -> list:
    """Normalized boxes ``[x0, y0, x1, y1]`` (pixel edges, x1/y1 exclusive) of a mask.

    mask: bool ``(H, W)`` → ``list[box]``; bool ``(B, H, W)`` → ``list[list[box]]`` (one list per image).
    ``union``: one box around every True pixel (none for an empty mask). ``per_component``: one box per
    connected component (``connectivity`` 4 or 8), largest first, ties by first pixel in raster order —
    the order of :func:`largest_components`.
    """
    single = mask.ndim == 2
    if single:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"mask must be (H, W) or (B, H, W); got {tuple(mask.shape)}")
    if mode not in ("union", "per_component"):
        raise ValueError(f"unknown box mode {mode!r}; use union or per_component")
    b, h, w = mask.shape
    mask = mask.detach().bool()
    if mode == "union":
        rows, cols = mask.any(2), mask.any(1)  # (B, H), (B, W)
        has = rows.any(1)
        r0 = rows.int().argmax(1)  # first True (argmax returns the first maximum)
        r1 = h - rows.flip(1).int().argmax(1)  # one past the last True
        c0 = cols.int().argmax(1)
        c1 = w - cols.flip(1).int().argmax(1)
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        vals = (torch.stack([c0, r0, c1, r1], 1).cpu().double() / scale).tolist()
        out = [[v] if hb else [] for v, hb in zip(vals, has.tolist())]
    else:
        from scipy import ndimage

        m = mask.cpu().numpy()
        out = []
        for j in range(b):
            lab, order, _ = _ordered_labels(m[j], connectivity)
            slices = ndimage.find_objects(lab)
            out.append([_slice_box(slices[lbl - 1], h, w) for lbl in order])
    return out[0] if single else out


def _expand_one(t: Tensor, ratio: float) -> Tensor:
    wh = (t[..., 2:] - t[..., :2]) * ratio
    return torch.cat([t[..., :2] - wh, t[..., 2:] + wh], -1).clamp(0.0, 1.0)


def expand_boxes(boxes, ratio: float):
    """Grow each box by ``ratio`` × its own width (left and right) and height (top and bottom), clipped to [0, 1].

    A box of width ``w`` becomes ``x0 - ratio·w … x1 + ratio·w`` before clipping, so ``ratio=0.1`` makes it
    20 % wider and taller in total (each side moves by 10 % of that box's size); ``ratio=0`` is the identity.
    The margin is relative to each box, so small boxes get a small margin; clipping means a box at an
    image border grows inward only on the other sides.

    boxes: a tensor ``(..., 4)``, one box ``[x0, y0, x1, y1]``, a list of boxes, or a list of such lists
    (one per image, ragged) → the same structure (lists stay lists of floats).
    """
    if ratio < 0:
        raise ValueError(f"expansion ratio must be >= 0, got {ratio}")
    if isinstance(boxes, Tensor):
        if boxes.shape[-1:] != (4,):
            raise ValueError(f"boxes must end in a dimension of 4; got {tuple(boxes.shape)}")
        return _expand_one(boxes, ratio)
    if isinstance(boxes, (list, tuple)) and boxes and isinstance(boxes[0], (int, float)):
        if len(boxes) != 4:
            raise ValueError(f"a box is [x0, y0, x1, y1]; got {boxes}")
        return _expand_one(torch.tensor(boxes, dtype=torch.float64), ratio).tolist()
    if isinstance(boxes, (list, tuple)) and boxes and all(
            isinstance(b, (list, tuple)) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b) for b in boxes):
        return _expand_one(torch.tensor(boxes, dtype=torch.float64), ratio).tolist()
    return [expand_boxes(b, ratio) for b in boxes]


def _as_box_tensor(boxes, device=None) -> Tensor:
    t = boxes.to(torch.float64) if isinstance(boxes, Tensor) else torch.tensor(
        [list(map(float, b)) for b in boxes], dtype=torch.float64)
    t = t.reshape(-1, 4)
    return t.to(device) if device is not None else t


def _inside(lo: Tensor, hi: Tensor, n: int) -> Tensor:
    """lo, hi: (..., K) normalized → (..., K, n) float: pixel centre (i + 0.5) / n in [lo, hi)."""
    centres = (torch.arange(n, dtype=torch.float64, device=lo.device) + 0.5) / n
    return ((centres >= lo[..., None]) & (centres < hi[..., None])).to(torch.float32)


def boxes_to_mask(boxes, height: int, width: int, device=None) -> Tensor:
    """Rasterize normalized boxes: bool ``(H, W)``, True where a pixel's centre lies in some box.

    boxes: ``(K, 4)`` tensor or a list of ``[x0, y0, x1, y1]`` (K may be 0 → all False). A box's pixels are
    rows ``r`` with ``y0 <= (r + 0.5) / H < y1`` and columns likewise, so ``[c/W, r/H, (c+1)/W, (r+1)/H]`` is
    exactly pixel ``(r, c)`` and masks → :func:`mask_to_boxes` → masks is lossless for rectangles.
    """
    t = _as_box_tensor(boxes, device)
    if len(t) == 0:
        return torch.zeros(height, width, dtype=torch.bool, device=t.device)
    rows = _inside(t[:, 1], t[:, 3], height)  # (K, H)
    cols = _inside(t[:, 0], t[:, 2], width)  # (K, W)
    return (rows.T @ cols) > 0  # (H, K) @ (K, W): count of boxes covering each pixel


def boxes_to_masks(boxes: Sequence | Tensor, height: int, width: int, device=None) -> Tensor:
    """Batched :func:`boxes_to_mask`: one (possibly empty, ragged) list of boxes per image → bool ``(B, H, W)``.

    boxes: ``list[list[box]]`` / ``list[Tensor (K_i, 4)]``, or a tensor ``(B, K, 4)``. Ragged lists are
    padded with empty boxes ``[0, 0, 0, 0]`` (which contain no pixel centre) and rasterized in one batched
    matmul.
    """
    if isinstance(boxes, Tensor):
        t = boxes.to(torch.float64).reshape(boxes.shape[0], -1, 4)
        t = t.to(device) if device is not None else t
    else:
        per = [_as_box_tensor(b, device) for b in boxes]
        kmax = max((len(p) for p in per), default=0)
        dev = per[0].device if per else (device or "cpu")
        t = torch.zeros(len(per), kmax, 4, dtype=torch.float64, device=dev)
        for i, p in enumerate(per):
            t[i, : len(p)] = p
    b = t.shape[0]
    if t.shape[1] == 0:
        return torch.zeros(b, height, width, dtype=torch.bool, device=t.device)
    rows = _inside(t[..., 1], t[..., 3], height)  # (B, K, H)
    cols = _inside(t[..., 0], t[..., 2], width)  # (B, K, W)
    return torch.bmm(rows.transpose(1, 2), cols) > 0



# -- per-image metrics, vectorized ----------------------------------------------------------------
def region_metrics(pred: Tensor, gt: Tensor) -> dict[str, Tensor]:
    """pred, gt: bool ``(B, H, W)`` → float64 ``(B,)`` each of precision, recall, dice, iou, plus int64
    ``(B,)`` ``pred_area``, ``gt_area``, ``intersection``. An empty prediction scores 0 (not NaN) on all
    four; an empty ground truth gives recall NaN (callers exclude those images)."""
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred and gt must both be (B, H, W); got {tuple(pred.shape)} and {tuple(gt.shape)}")
    p, g = pred.bool().flatten(1), gt.bool().flatten(1)
    inter = (p & g).sum(1)
    pa, ga = p.sum(1), g.sum(1)
    union = pa + ga - inter
    i, pf, gf, uf = inter.double(), pa.double(), ga.double(), union.double()
    nan = torch.full_like(i, float("nan"))
    zero = torch.zeros_like(i)
    return {
        "precision": torch.where(pa > 0, i / pf.clamp_min(1), zero),
        "recall": torch.where(ga > 0, i / gf.clamp_min(1), nan),
        "dice": torch.where(pa + ga > 0, 2 * i / (pf + gf).clamp_min(1), nan),
        "iou": torch.where(union > 0, i / uf.clamp_min(1), nan),
        "pred_area": pa, "gt_area": ga, "intersection": inter,
    }
