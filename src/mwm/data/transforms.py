"""Images (any size) → float tensors of one size and channel count; ROI boxes follow the same geometry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

ResizePolicy = Literal["pad", "stretch", "crop"]


@dataclass(frozen=True)
class Fit:
    """Where an ``(h, w)`` image lands inside a ``size × size`` output.

    ``pad``: the long side fits, the short side is centred with black borders
    (as our shared npz files were made); ``stretch``: both sides scaled
    independently; ``crop``: the short side fits and the long side is centre-cropped.
    A point (x, y) in input pixels maps to ``(x * sx + ox, y * sy + oy)``.
    """

    sx: float
    sy: float
    ox: float
    oy: float
    out_w: int
    out_h: int  # size of the resized image before padding/cropping

    @staticmethod
    def of(h: int, w: int, size: int, policy: ResizePolicy) -> "Fit":
        if policy == "stretch":
            return Fit(size / w, size / h, 0.0, 0.0, size, size)
        s = size / max(h, w) if policy == "pad" else size / min(h, w)
        out_w, out_h = max(1, round(w * s)), max(1, round(h * s))
        return Fit(out_w / w, out_h / h, (size - out_w) / 2.0, (size - out_h) / 2.0, out_w, out_h)

    def box(self, box: list[float], h: int, w: int, size: int) -> list[float]:
        """A box ``[x0, y0, x1, y1]`` normalized to the input → normalized to the output, clipped."""
        x0, y0, x1, y1 = box
        xs = [(x0 * w) * self.sx + self.ox, (x1 * w) * self.sx + self.ox]
        ys = [(y0 * h) * self.sy + self.oy, (y1 * h) * self.sy + self.oy]
        return [min(max(v / size, 0.0), 1.0) for v in (xs[0], ys[0], xs[1], ys[1])]

    def unbox(self, box: list[float], h: int, w: int, size: int) -> list[float]:
        """The inverse of :meth:`box`: normalized to the output → normalized to the input, clipped."""
        x0, y0, x1, y1 = box
        xs = [(x0 * size - self.ox) / self.sx / w, (x1 * size - self.ox) / self.sx / w]
        ys = [(y0 * size - self.oy) / self.sy / h, (y1 * size - self.oy) / self.sy / h]
        return [min(max(v, 0.0), 1.0) for v in (xs[0], ys[0], xs[1], ys[1])]


def _place(t: torch.Tensor, fit: Fit, size: int, mode: str) -> torch.Tensor:
    """t: (C, h, w) → (C, size, size) resized by ``fit`` then padded/cropped around the centre."""
    kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    r = F.interpolate(t[None], size=(fit.out_h, fit.out_w), mode=mode, **kw)[0]
    out = t.new_zeros((t.shape[0], size, size))
    oy, ox = int(round(fit.oy)), int(round(fit.ox))
    # Source and destination windows; negative offsets mean the resized image is cropped.
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    hh, ww = min(fit.out_h - sy0, size - dy0), min(fit.out_w - sx0, size - dx0)
    out[:, dy0:dy0 + hh, dx0:dx0 + ww] = r[:, sy0:sy0 + hh, sx0:sx0 + ww]
    return out


def to_tensor(image: np.ndarray, size: int, channels: int = 1, policy: ResizePolicy = "pad") -> torch.Tensor:
    """image: float (H, W) or (H, W, 3) in [0, 1] → float32 ``(channels, size, size)``.

    Colour → gray by BT.601 luma when ``channels == 1``; gray is repeated for ``channels == 3``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 3 and channels == 1:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    elif t.shape[0] == 1 and channels == 3:
        t = t.expand(3, -1, -1)
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        return t.contiguous().clone()
    return _place(t, Fit.of(h, w, size, policy), size, "bilinear").clamp_(0, 1)


def mask_to_tensor(mask: np.ndarray, size: int, policy: ResizePolicy = "pad") -> torch.Tensor:
    """mask: (H, W) 0/1 → uint8 ``(size, size)`` with the same geometry as :func:`to_tensor`, nearest-neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
    h, w = t.shape[-2:]
    if (h, w) == (size, size):
        return t[0].to(torch.uint8)
    return (_place(t, Fit.of(h, w, size, policy), size, "nearest")[0] > 0.5).to(torch.uint8)
