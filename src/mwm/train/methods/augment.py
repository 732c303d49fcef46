"""Two views per image for the contrastive methods (:mod:`.contrastive`), drawn on the batch on the device.

The recipe is SimCLR's / MoCo v2's / BYOL's (lightly's ``SimCLRTransform``, ``MoCoV2Transform``, ``BYOLTransform``)
made fit for grayscale medical scans:

* **random resized crop** of area ``crop_scale`` (0.2, 1) and aspect ``crop_ratio`` (3/4, 4/3) — MoCo v2's
  0.2 rather than SimCLR's 0.08: an 8 % crop of a scan is mostly background or misses the finding;
* **horizontal flip** (p 0.5; no vertical flip: anatomy has an up and a down);
* **small rotation** (± ``rotate`` = 10°: patient positioning varies; corners filled with black, the background
  of a scan) — the crop window is rotated about its centre;
* **brightness and contrast** jitter (strength 0.4, p 0.8: window/level and scanner differences), contrast
  blended towards each image's mean intensity as torchvision's ``adjust_contrast``;
* **Gaussian blur** with σ ∈ [0.1, 2] px at 224 px (scaled with the input side), kernel ±3σ, applied with a
  probability per view (``blur_prob``: SimCLR / MoCo v2 0.5 and 0.5; BYOL's asymmetric 1.0 and 0.1).

Left out on purpose: saturation and hue jitter and random grayscale. On single-channel data (a scan decoded to
three equal channels) they are no-ops at best, and a hue shift of a non-gray image would invent colours a scan
never has; BYOL's solarization is left out too (it inverts the bright end of the intensity scale, which carries
the tissue contrast in CT and MRI). Every operation acts on all channels alike, so a gray image (three equal
channels) gives gray views (tested).

All draws come from one ``torch.rand`` call on the method's generator (seeded by (seed, rank), checkpointed with
the run), so a resumed run draws the same views; no per-sample Python loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...data.paired import check_area_fraction, check_range, crop_flip_theta

__all__ = ["ViewAugmentConfig", "augment_views", "draw_view"]

_REFERENCE_SIDE = 224  # the blur sigmas are SimCLR's, in pixels of a 224-px image


class ViewAugmentConfig(BaseModel):
    """The augmentation of each contrastive view (see the module doc for the choices)."""

    model_config = ConfigDict(extra="forbid")

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = Field(default=0.5, ge=0, le=1, description="probability of a horizontal flip")
    rotate: float = Field(default=10.0, ge=0, le=180, description="max rotation in degrees (uniform ±)")
    brightness: float = Field(default=0.4, ge=0, lt=1, description="brightness factor in [1 - b, 1 + b]")
    contrast: float = Field(default=0.4, ge=0, lt=1, description="contrast factor in [1 - c, 1 + c]")
    jitter_prob: float = Field(default=0.8, ge=0, le=1, description="probability of the brightness/contrast jitter")
    blur_prob: tuple[float, float] = Field(default=(0.5, 0.5), description="Gaussian blur probability of view 1, 2")
    blur_sigma: tuple[float, float] = Field(default=(0.1, 2.0), description="blur sigma range, pixels at 224 px")

    @field_validator("crop_scale", "crop_ratio", "blur_sigma")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_range(v)

    @field_validator("crop_scale")
    @classmethod
    def _area(cls, v: tuple[float, float]) -> tuple[float, float]:
        return check_area_fraction(v)

    @field_validator("blur_prob")
    @classmethod
    def _probs(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= p <= 1 for p in v):
            raise ValueError(f"blur probabilities lie in [0, 1], got {v}")
        return v


def _geometry(x: torch.Tensor, cfg: ViewAugmentConfig, u: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Crop + flip (:func:`mwm.data.paired.crop_flip_theta`) and a rotation of the crop window about its centre."""
    theta = crop_flip_theta(x.shape[0], cfg.crop_scale, cfg.crop_ratio, cfg.hflip, g).to(x.dtype)
    angle = math.radians(cfg.rotate) * (2 * u[:, 0] - 1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([rot @ theta[:, :, :2], theta[:, :, 2:]], 2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _jitter(x: torch.Tensor, cfg: ViewAugmentConfig, u: torch.Tensor) -> torch.Tensor:
    """Brightness (a gain), then contrast (blend with the image's mean), with probability ``jitter_prob``."""
    on = (u[:, 0] < cfg.jitter_prob).to(x.dtype)
    b = 1 + on * cfg.brightness * (2 * u[:, 1] - 1)
    c = 1 + on * cfg.contrast * (2 * u[:, 2] - 1)
    x = (x * b.view(-1, 1, 1, 1)).clamp(0, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # all channels: equal channels stay equal
    return ((x - mean) * c.view(-1, 1, 1, 1) + mean).clamp(0, 1)


def _blur(x: torch.Tensor, cfg: ViewAugmentConfig, prob: float, u: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (grouped convolution), kept where ``u[:, 0] < prob``."""
    if prob <= 0:
        return x
    b, c, h, w = x.shape
    scale = min(h, w) / _REFERENCE_SIDE
    lo, hi = cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale
    sigma = lo + (hi - lo) * u[:, 1]
    radius = max(1, min(math.ceil(3 * hi), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B·C, K): one kernel per image, all its channels
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c).view(b, c, h, w)
    keep = (u[:, 0] < prob).view(-1, 1, 1, 1)
    return torch.where(keep, y, x)


def draw_view(x: torch.Tensor, cfg: ViewAugmentConfig, blur_prob: float, generator: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch ``x`` (B, C, H, W) in [0, 1] → (B, C, H, W) in [0, 1].

    Draws (in this order, from ``generator``): one (B, 6) uniform block (rotation, jitter gate, brightness,
    contrast, blur gate, blur sigma), then the crop + flip (:func:`mwm.data.paired.crop_flip_theta`)."""
    x = x.float()
    u = torch.rand(x.shape[0], 6, generator=generator, device=x.device, dtype=x.dtype)
    v = _geometry(x, cfg, u[:, :1], generator)
    v = _jitter(v, cfg, u[:, 1:4])
    return _blur(v, cfg, blur_prob, u[:, 4:6])


def augment_views(x: torch.Tensor, cfg: ViewAugmentConfig, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of the batch ``x`` in [0, 1] (first view with ``blur_prob[0]``)."""
    return draw_view(x, cfg, cfg.blur_prob[0], generator), draw_view(x, cfg, cfg.blur_prob[1], generator)
