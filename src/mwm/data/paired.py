"""Paired geometric augmentation for the transfer tasks, batched on the device: one random resized crop and
horizontal flip per sample, **drawn once** and applied to the image, its mask and its boxes (the contract in
docs/DESIGN.md: every geometric transform of an image is applied to its annotations in the same call).

The crop is an affine resampling (``affine_grid`` + ``grid_sample``, one call for the batch): per sample an area
fraction in ``scale``, an aspect ratio log-uniform in ``ratio`` (both clipped so the crop stays inside the image), a
centre anywhere the crop fits, and a flip with probability ``hflip``. The five numbers per sample come from one
``torch.rand(B, 5)`` on the generator's device (a CPU generator: no device sync; a CUDA generator: no transfer).
Images are resampled bilinearly with border padding, masks nearest (they stay binary), boxes exactly through the
same affine map.

Pretraining's crop (:mod:`mwm.train.augment`) is a different draw (per sample, on integer pixel edges, ten
torchvision-style tries) and stays as it is: its random stream is part of every pretraining run's identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["crop_flip_theta", "warp", "warp_boxes", "paired_crop_flip", "hflip_instances"]


def check_range(v: tuple[float, float]) -> tuple[float, float]:
    """A (low, high) option such as a crop scale or aspect ratio: 0 < low <= high."""
    if not 0 < v[0] <= v[1]:
        raise ValueError(f"need 0 < low <= high, got {v}")
    return v


def check_area_fraction(v: tuple[float, float]) -> tuple[float, float]:
    """A crop scale: a fraction of the image area, at most 1."""
    if v[1] > 1:
        raise ValueError(f"crop_scale is a fraction of the image area, at most 1; got {v}")
    return v


class AugmentConfig(BaseModel):
    """Paired geometric augmentation (image and ROI boxes in the same call, pretraining: :mod:`mwm.train.augment`; transfer: this module).

    SparK and MAE pretrain with RandomResizedCrop(scale=(0.2 or 0.67, 1)) + horizontal flip on ImageNet; medical
    scans are framed consistently and a crop that loses most of the ROI also loses the point of guided masking,
    so the default scale is (0.5, 1)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(default=0.5, ge=0, le=1, description="probability of a horizontal flip")

    @field_validator("crop_scale", "crop_ratio")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_range(v)

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_fraction(v)


def crop_flip_theta(n: int, scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    hflip: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random crop + flip affine maps (n, 2, 3), float32 on the generator's device (CPU without one).

    Row 0 maps an output x in [-1, 1] to the input's: ``x_in = sx · x_out + cx`` with ``|sx|`` the crop's width
    fraction (negative when flipped); row 1 the same for y (never flipped).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, 5, generator=generator, device=device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    aspect = torch.exp(log_r)
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    sx = torch.where(u[:, 4] < hflip, -w, w)
    zero = torch.zeros_like(w)
    return torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear", padding_mode: str = "border") -> torch.Tensor:
    """Resample ``x`` (B, C, H, W) through ``theta`` (B, 2, 3) at its own size (``align_corners=False``)."""
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def warp_boxes(boxes: torch.Tensor, theta: torch.Tensor, valid: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes (B, M, 4) normalized ``[x0, y0, x1, y1]`` in [0, 1] through the crop + flip ``theta`` (B, 2, 3).

    Returns the boxes in the output's normalized coordinates, clipped to [0, 1] (x0 < x1 after a flip), and
    ``valid`` (B, M): given (or all true) and still of positive area inside the crop.
    """
    t = theta.to(device=boxes.device, dtype=torch.float32)
    b = boxes.to(torch.float32)
    sx, cx = t[:, 0, 0, None], t[:, 0, 2, None]
    sy, cy = t[:, 1, 1, None], t[:, 1, 2, None]

    def inv(v: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [0, 1] input → [0, 1] output
        return ((2 * v - 1 - c) / s + 1) / 2

    xa, xb = inv(b[..., 0], sx, cx), inv(b[..., 2], sx, cx)
    ya, yb = inv(b[..., 1], sy, cy), inv(b[..., 3], sy, cy)
    out = torch.stack([torch.minimum(xa, xb), torch.minimum(ya, yb), torch.maximum(xa, xb), torch.maximum(ya, yb)],
                      -1).clamp(0, 1)
    keep = (out[..., 2] > out[..., 0]) & (out[..., 3] > out[..., 1])
    return out, keep if valid is None else keep & valid.to(keep.device)


def paired_crop_flip(x: torch.Tensor, mask: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, scale: tuple[float, float] = (0.5, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, box_valid=None):
    """One random resized crop + flip per sample (:func:`crop_flip_theta`), applied to everything given.

    Args:
        x: float images (B, C, H, W).
        mask: (B, 1, H, W) or None; resampled nearest with zero padding (binary stays binary), in x's dtype.
        boxes: (B, M, 4) normalized xyxy or None (with ``box_valid`` (B, M)).
    Returns:
        ``(x, mask, boxes, box_valid)``; the parts not given are None.
    """
    theta = crop_flip_theta(x.shape[0], scale, ratio, hflip, generator)
    x = warp(x, theta)
    if mask is not None:
        mask = warp(mask.to(x.dtype), theta, mode="nearest", padding_mode="zeros")
    if boxes is not None:
        boxes, box_valid = warp_boxes(boxes, theta, box_valid)
    return x, mask, boxes, box_valid


def hflip_instances(img: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Flip one image (C, H, W) and its instances left–right together: pixel boxes ``[x0, y0, x1, y1)`` (K, 4)
    with exclusive x1 (``x → W − x`` swaps the sides), masks (K, H, W), labels unchanged (detection's
    per-image flip)."""
    w = img.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = w - target["boxes"][:, 2], w - target["boxes"][:, 0]
    return img.flip(-1), {"boxes": boxes, "labels": target["labels"], "masks": target["masks"].flip(-1)}
