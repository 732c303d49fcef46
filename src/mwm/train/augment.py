"""Paired augmentation: every geometric transform of an image is applied to its ROI boxes (and its saliency map,
when the masking strategy uses one) in the same call (the contract in docs/DESIGN.md), so the masker always sees
where the ROI is *after* cropping and flipping.

The crop is sampled as torchvision's ``RandomResizedCrop.get_params`` (ten tries at a random area fraction and
log-uniform aspect ratio, then a centre crop) but on integer pixel edges, from an explicit ``torch.Generator``.
Because the crop window starts and ends on pixel edges and the resize uses ``align_corners=False``, pixel edge
``X`` of the input lands exactly on output edge ``(X − left) / w · out_w``: the box transform below is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["crop_params", "paired_random_resized_crop", "paired_crop_with_map", "transform_boxes"]


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, height, width)`` in pixels of an ``h × w`` image covering a fraction in
    ``scale`` of its area with aspect ratio (w/h) in ``ratio`` (log-uniform); centre crop after 10 failed tries."""
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_r[0], log_r[1], generator))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (), generator=generator))
            return top, left, ch, cw
    # fallback (torchvision): the whole image, trimmed to the nearest allowed aspect ratio
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def transform_boxes(boxes: torch.Tensor, h: int, w: int, crop: tuple[int, int, int, int],
                    flip: bool) -> torch.Tensor:
    """boxes (M, 4) normalized ``[x0, y0, x1, y1]`` of an ``h × w`` image → normalized to the crop
    ``(top, left, ch, cw)`` (then mirrored when ``flip``), clipped to [0, 1]; boxes left with no area are dropped.
    Returns (M', 4) float32, M' ≤ M."""
    top, left, ch, cw = crop
    b = boxes.to(torch.float32).reshape(-1, 4)
    scale = b.new_tensor([w, h, w, h])
    shift = b.new_tensor([left, top, left, top])
    size = b.new_tensor([cw, ch, cw, ch])
    b = ((b * scale - shift) / size).clamp(0, 1)
    if flip:
        b = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], dim=1)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    return b[keep]


def paired_random_resized_crop(img: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator | None = None,
                               scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               hflip: float = 0.5, size: int | tuple[int, int] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop + horizontal flip of an image and its boxes, from one generator.

    img: float (C, H, W); boxes: (M, 4) normalized ``[x0, y0, x1, y1]`` (M may be 0); ``size``: output side
    (default: the input's H × W). Returns ``(img (C, size, size), boxes (M', 4))``: boxes clipped to the crop,
    mirrored with the image, and dropped when nothing of them is left. Bilinear resize with antialiasing (the
    crop usually shrinks by < 2×, but a large input cropped to a small size must not alias).
    """
    if img.ndim != 3:
        raise ValueError(f"img must be (C, H, W), got {tuple(img.shape)}")
    H, W = img.shape[-2:]
    out_h, out_w = (H, W) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    top, left, ch, cw = crop_params(H, W, scale, ratio, generator)
    flip = hflip > 0 and float(torch.rand((), generator=generator)) < hflip
    x = img[:, top:top + ch, left:left + cw]
    if (ch, cw) != (out_h, out_w):
        x = F.interpolate(x[None].float(), size=(out_h, out_w), mode="bilinear", align_corners=False,
                          antialias=True)[0].to(img.dtype)
    if flip:
        x = x.flip(-1)
    return x.contiguous(), transform_boxes(boxes, H, W, (top, left, ch, cw), flip)


def paired_crop_with_map(img: torch.Tensor, boxes: torch.Tensor, smap: torch.Tensor,
                         generator: torch.Generator | None = None, scale: tuple[float, float] = (0.5, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paired_random_resized_crop` of an image, its boxes **and** a per-pixel map (saliency) of the same size.

    The map rides through the one geometric transform as an extra channel, so it gets exactly the image's crop,
    resize and flip (one draw from ``generator``; the image's result equals what the map-less call gives). Any
    intensity transform added later must touch ``img`` only. img: float (C, H, W); smap: float (H, W).
    Returns ``(img (C, H, W), boxes (M', 4), smap (H, W))``.
    """
    if smap.shape != img.shape[-2:]:
        raise ValueError(f"the map {tuple(smap.shape)} must have the image's size {tuple(img.shape[-2:])}")
    both, boxes = paired_random_resized_crop(torch.cat([img, smap[None].to(img.dtype)]), boxes, generator, scale,
                                             ratio, hflip)
    return both[:-1], boxes, both[-1]
