"""Saliency → binary region → connected components → boxes: the postprocessing of MWM stage 1 (§3.2).

Every function is pure and batched. Conventions:

* saliency ``sal``: float ``(B, H, W)``, nominally in [0, 1] (only the order of values matters here);
* masks and boxes: the ROI geometry conventions of :mod:`mwm.rois.boxes` (normalized pixel-edge boxes,
  largest component first).

Binarization is here; components and masks ↔ boxes are ROI geometry, shared with the sources that need no VLM,
and live in :mod:`mwm.rois.boxes` (re-exported here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

# components and masks ↔ boxes live with the ROI contract (mwm.rois.boxes); re-exported here
from ..rois.boxes import (BoxMode, Components, boxes_to_mask, boxes_to_masks, expand_boxes, largest_components,
                          mask_to_boxes)

BinarizeMethod = Literal["kmeans", "otsu", "threshold", "crf"]

#: saliency whose (max - min) is below this is "constant": there is no region to separate from the rest
CONSTANT_RANGE = 1e-6
KMEANS_MAX_ITER = 50
OTSU_BINS = 256


class Binarized(NamedTuple):
    """``mask``: bool ``(B, H, W)``; ``status``: one string per image, unpackable as ``mask, status``.

    Statuses: ``"ok"``; ``"nan_saliency"`` (a NaN or ±inf anywhere in the map); ``"constant_saliency"``
    (max − min < :data:`CONSTANT_RANGE`); ``"empty_mask"`` (``method="threshold"`` only: no value above
    it). Every image that is not ``"ok"`` has an all-False mask.
    """

    mask: Tensor
    status: list[str]


def _check_sal(sal: Tensor) -> Tensor:
    if not isinstance(sal, Tensor) or sal.ndim != 3:
        raise ValueError(f"saliency must be a tensor (B, H, W); got {getattr(sal, 'shape', type(sal))}")
    return sal


def _valid_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x: (B, N) float64 → (finite (B,), nonconstant (B,), x with non-finite rows zeroed)."""
    finite = torch.isfinite(x).all(1)
    x = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    rng = x.amax(1) - x.amin(1) if x.shape[1] else torch.zeros(len(x), dtype=x.dtype, device=x.device)
    return finite, rng >= CONSTANT_RANGE, x


def kmeans_1d(x: Tensor, max_iter: int = KMEANS_MAX_ITER) -> tuple[Tensor, Tensor]:
    """Two-cluster K-Means (Lloyd) on the values of each row, all rows at once.

    x: float ``(B, N)``, finite → ``(fg bool (B, N), centroids float64 (B, 2))``, where ``fg`` marks the
    values nearer the higher centroid (a value exactly at the midpoint goes to the lower cluster) and
    ``centroids[:, 0] <= centroids[:, 1]``.

    Centroids start at each row's min and max and iterate until no assignment changes in any row (or
    ``max_iter``). In 1-D the two clusters are always the values below/above the centroids' midpoint, so
    the update is two masked sums per row; both clusters stay non-empty for a non-constant row (its min is
    always below the midpoint, its max above). Computed in float64 so that it reproduces
    ``sklearn.cluster.KMeans(n_clusters=2)`` up to values that sit on the midpoint.
    """
    x = x.to(torch.float64)
    n = x.shape[1]
    c0, c1 = x.amin(1), x.amax(1)
    total = x.sum(1)
    fg = x > ((c0 + c1) / 2)[:, None]
    for _ in range(max_iter):
        n1 = fg.sum(1)
        s1 = (x * fg).sum(1)
        c1 = s1 / n1.clamp_min(1)
        c0 = (total - s1) / (n - n1).clamp_min(1)
        new = x > ((c0 + c1) / 2)[:, None]
        if torch.equal(new, fg):  # one host sync per iteration; 1-D Lloyd converges in a handful
            break
        fg = new
    return fg, torch.stack([c0, c1], 1)


def otsu_thresholds(x: Tensor, nbins: int = OTSU_BINS) -> Tensor:
    """Otsu's threshold of each row from a ``nbins``-bin histogram over the row's [min, max].

    x: float ``(B, N)``, finite, non-constant rows → float64 ``(B,)``; foreground is ``x > threshold``.
    The same computation as ``skimage.filters.threshold_otsu(row, nbins)`` (histogram like
    ``np.histogram(range=(min, max))``, threshold = the centre of the bin that maximizes the
    between-class variance, first one on ties), batched with one ``bincount`` over offset bin indices.
    """
    x = x.to(torch.float64)
    b = x.shape[0]
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    span = (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    idx = ((x - lo) * (nbins / span)).floor().long().clamp_(0, nbins - 1)
    # np.histogram corrects the floor against the exact linspace edges; do the same
    edges = lo + span * torch.linspace(0, 1, nbins + 1, dtype=torch.float64, device=x.device)[None]  # (B, nbins+1)
    idx = idx - (x < torch.gather(edges, 1, idx)).long()
    idx = idx + ((x >= torch.gather(edges, 1, idx + 1)) & (idx != nbins - 1)).long()
    offs = torch.arange(b, device=x.device)[:, None] * nbins
    counts = torch.bincount((idx + offs).reshape(-1), minlength=b * nbins).reshape(b, nbins).to(torch.float64)
    centers = (edges[:, :-1] + edges[:, 1:]) / 2
    w1 = counts.cumsum(1)
    w2 = counts.flip(1).cumsum(1).flip(1)
    m1 = (counts * centers).cumsum(1) / w1.clamp_min(1e-300)
    m2 = (counts * centers).flip(1).cumsum(1).flip(1) / w2.clamp_min(1e-300)
    var12 = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    best = var12.argmax(1)  # first maximum, as np.argmax
    return centers.gather(1, best[:, None])[:, 0]


def binarize(sal: Tensor, method: BinarizeMethod = "kmeans", threshold: float = 0.5,
             image: Tensor | None = None) -> Binarized:
    """Saliency ``(B, H, W)`` → :class:`Binarized` (bool mask ``(B, H, W)``, status per image). Never raises on data.

    * ``kmeans`` (MWM's choice): 2-cluster K-Means on each image's saliency values; the region is the
      cluster with the higher centroid (:func:`kmeans_1d`).
    * ``otsu``: Otsu's threshold per image from a 256-bin histogram (:func:`otsu_thresholds`).
    * ``threshold``: ``sal > threshold``.
    * ``crf``: MedCLIP-SAMv2's dense CRF on the saliency and the ``image`` (:func:`crf_binarize`; needs the
      optional ``pydensecrf2`` package, ``pip install 'mwm[crf]'``).

    Images with a NaN/±inf value or constant saliency get an all-False mask and a status saying so,
    whatever the method (a constant map has no region; thresholding it would give all or nothing).
    """
    _check_sal(sal)
    if method == "crf":
        return crf_binarize(sal, image)
    if method not in ("kmeans", "otsu", "threshold"):
        raise ValueError(f"unknown binarize method {method!r}; use kmeans, otsu, threshold or crf")
    b, h, w = sal.shape
    x = sal.detach().reshape(b, h * w).to(torch.float64)
    finite, varied, x = _valid_rows(x)
    ok = finite & varied
    if method == "kmeans":
        fg, _ = kmeans_1d(x)
    elif method == "otsu":
        fg = x > otsu_thresholds(torch.where(varied[:, None], x, torch.arange(
            x.shape[1], dtype=x.dtype, device=x.device)[None]))[:, None]  # constant rows: any non-constant stand-in
    else:
        fg = x > float(threshold)
    fg = fg & ok[:, None]
    nonempty = fg.any(1)
    status = []
    for f, v, ne in zip(finite.tolist(), varied.tolist(), nonempty.tolist()):
        status.append("nan_saliency" if not f else "constant_saliency" if not v else "ok" if ne else "empty_mask")
    return Binarized(fg.reshape(b, h, w), status)


# -- dense CRF (MedCLIP-SAMv2's postprocessing) ------------------------------------------------------
@dataclass(frozen=True)
class CRFParams:
    """MedCLIP-SAMv2's CRF settings (``postprocessing/postprocess_saliency_maps.py``, its argparse defaults).

    Unary energies from the saliency ``a`` in [0, 1]: background ``-log(1 - a + eps) / (tau · sigmoid(1 - a))``,
    foreground ``-log(a + eps) / (tau · sigmoid(a))``; pairwise: a Gaussian kernel (``gaussian_sxy`` px,
    weight ``gaussian_compat``) and a bilateral kernel on position and the image's 8-bit intensities
    (``bilateral_sxy`` px, ``bilateral_srgb`` grey levels, weight ``bilateral_compat``); ``iterations`` rounds
    of mean-field inference; the label with the higher marginal wins. Distances are in pixels of the map the
    CRF runs on (the VLM's input size in `mwm localize`; the reference runs at the image's own size).
    """

    gaussian_sxy: float = 5
    gaussian_compat: float = 3
    bilateral_sxy: float = 5
    bilateral_srgb: float = 3
    bilateral_compat: float = 5
    tau: float = 1.05
    eps: float = 1e-8
    iterations: int = 1


#: the reference's parameters
CRF_REFERENCE = CRFParams()

CRF_INSTALL_HINT = ("--binarize crf needs the dense CRF package pydensecrf2: pip install 'mwm[crf]' "
                    "(or pip install pydensecrf2; it compiles a small C++ extension). Or use --binarize kmeans, otsu or threshold")


def require_crf():
    """The ``pydensecrf.densecrf`` module, or an :class:`~mwm.errors.MWMError` saying how to install it."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        from ..errors import MWMError

        raise MWMError(f"{CRF_INSTALL_HINT} ({e})") from None
    return dcrf


def crf_unary(sal: Tensor, params: CRFParams = CRF_REFERENCE) -> Tensor:
    """Saliency ``(B, H, W)`` in [0, 1] → float32 unary energies ``(B, 2, H·W)``: [background, foreground]."""
    a = sal.detach().to(torch.float64).clamp(0, 1).flatten(1)
    bg = -torch.log(1 - a + params.eps) / (params.tau * torch.sigmoid(1 - a))
    fg = -torch.log(a + params.eps) / (params.tau * torch.sigmoid(a))
    return torch.stack([bg, fg], 1).to(torch.float32)


def _image_u8(image: Tensor, shape: tuple[int, int, int]) -> np.ndarray:
    """image: ``(B, C, H, W)`` (C = 1 or 3) or ``(B, H, W)``, float in [0, 1] or uint8 → uint8 ``(B, H, W, 3)``."""
    if not isinstance(image, Tensor):
        raise ValueError("binarize='crf' needs the images: pass image=(B, 3, H, W) in [0, 1]")
    x = image.detach()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] not in (1, 3) or (x.shape[0], *x.shape[2:]) != tuple(shape):
        raise ValueError(f"image must be (B, 1|3, H, W) matching the saliency {tuple(shape)}; got {tuple(image.shape)}")
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    return np.ascontiguousarray(x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).cpu().numpy())


def crf_binarize(sal: Tensor, image: Tensor | None, params: CRFParams = CRF_REFERENCE) -> Binarized:
    """MedCLIP-SAMv2's CRF binarization: a 2-label dense CRF whose unaries come from the saliency and whose
    bilateral term follows the image's edges (:class:`CRFParams`), → :class:`Binarized` with the statuses of
    :func:`binarize`.

    sal: ``(B, H, W)`` in [0, 1]; image: ``(B, 3, H, W)`` / ``(B, 1, H, W)`` / ``(B, H, W)`` at the same size,
    float in [0, 1] or uint8. The unaries are computed for the batch at once; inference runs per image (one C++
    call each: pydensecrf has no batched CRF).
    """
    _check_sal(sal)
    dcrf = require_crf()
    b, h, w = sal.shape
    rgb = _image_u8(image, (b, h, w))
    x = sal.detach().reshape(b, h * w).to(torch.float64)
    finite, varied, x = _valid_rows(x)
    ok = (finite & varied).tolist()
    unary = crf_unary(x.reshape(b, h, w), params).cpu().numpy()
    out = np.zeros((b, h, w), dtype=bool)
    for j in range(b):
        if not ok[j]:
            continue
        d = dcrf.DenseCRF2D(w, h, 2)
        d.setUnaryEnergy(np.ascontiguousarray(unary[j]))
        d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
        d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=rgb[j],
                               compat=params.bilateral_compat)
        q = np.asarray(d.inference(params.iterations)).reshape(2, h, w)
        out[j] = q[1] > q[0]  # the reference's argmax: a tie goes to background
    status = ["nan_saliency" if not f else "constant_saliency" if not v else "ok" if m.any() else "empty_mask"
              for f, v, m in zip(finite.tolist(), varied.tolist(), out)]
    return Binarized(torch.from_numpy(out).to(sal.device), status)


__all__ = ["Binarized", "BoxMode", "Components", "binarize", "kmeans_1d", "otsu_thresholds", "largest_components",
           "crf_binarize", "crf_unary", "CRFParams", "CRF_REFERENCE", "require_crf",
           "mask_to_boxes", "expand_boxes", "boxes_to_mask", "boxes_to_masks", "CONSTANT_RANGE"]
