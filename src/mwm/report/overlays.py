"""Overlay panels (scan, saliency heatmap, binary mask, boxes) as uint8 RGB arrays, and PNG writing.

Composed with numpy + a matplotlib colormap rather than matplotlib figures: a panel costs
about a millisecond, so a gallery of hundreds of images stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_path

MASKED_GRAY = 0.5  # masked patches are shown flat gray: distinct from black borders and bright anatomy


def gray_rgb(img: np.ndarray) -> np.ndarray:
    """float (H, W) or (H, W, 3) in [0, 1] → uint8 (H, W, 3)."""
    a = np.clip(np.nan_to_num(img), 0, 1)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, -1)
    return (a * 255 + 0.5).astype(np.uint8)


def heatmap(sal: np.ndarray, base: np.ndarray | None = None, alpha: float = 0.55) -> np.ndarray:
    """saliency (H, W) in [0, 1] → uint8 (H, W, 3) jet-coloured, blended over ``base`` (uint8 RGB) if given."""
    from matplotlib import colormaps

    col = colormaps["jet"](np.clip(np.nan_to_num(sal), 0, 1))[..., :3]
    col = (col * 255).astype(np.float32)
    if base is not None:
        col = alpha * col + (1 - alpha) * base.astype(np.float32)
    return col.astype(np.uint8)


def tint(base: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    """Blend ``color`` over ``base`` (uint8 RGB) where mask (H, W) is true."""
    out = base.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.array(color, np.float32)
    return out.astype(np.uint8)


def draw_boxes(base: np.ndarray, boxes: list[list[float]], color=(40, 255, 40), width: int = 1) -> np.ndarray:
    """Draw normalized ``[x0, y0, x1, y1]`` boxes on uint8 RGB (H, W, 3)."""
    im = Image.fromarray(base)
    d = ImageDraw.Draw(im)
    h, w = base.shape[:2]
    for x0, y0, x1, y1 in boxes:
        d.rectangle([x0 * w, y0 * h, max(x0 * w, x1 * w - 1), max(y0 * h, y1 * h - 1)], outline=color, width=width)
    return np.asarray(im)


def upscale(a: np.ndarray, min_side: int = 160) -> np.ndarray:
    """Nearest-neighbour enlarge small panels so they are visible in a browser."""
    k = max(1, int(np.ceil(min_side / max(1, min(a.shape[:2])))))
    return a.repeat(k, 0).repeat(k, 1) if k > 1 else a


def hstack(panels: list[np.ndarray], gap: int = 4) -> np.ndarray:
    h = max(p.shape[0] for p in panels)
    cols = []
    for p in panels:
        if p.shape[0] < h:
            p = np.pad(p, ((0, h - p.shape[0]), (0, 0), (0, 0)))
        cols += [p, np.full((h, gap, 3), 255, np.uint8)]
    return np.concatenate(cols[:-1], axis=1)


def vstack(rows: list[np.ndarray], gap: int = 4) -> np.ndarray:
    """uint8 (H_i, W_i, 3) rows → one image, left-aligned, white gaps."""
    w = max(r.shape[1] for r in rows)
    out = []
    for r in rows:
        if r.shape[1] < w:
            r = np.pad(r, ((0, 0), (0, w - r.shape[1]), (0, 0)), constant_values=255)
        out += [r, np.full((gap, w, 3), 255, np.uint8)]
    return np.concatenate(out[:-1], axis=0)


def save_png(arr: np.ndarray, path: str | Path) -> Path:
    """Write uint8 (H, W[, 3]) as PNG atomically."""
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return Path(path)


def save_map_png(folder: Path, image_id: str, m) -> str:
    """A per-image map (saliency, mask, importance; float (H, W) in [0, 1], NaN → 0) as an 8-bit PNG in ``folder``
    named by :func:`mwm.rois.manifest.safe_file_name`; returns the path a manifest record stores
    (``"<folder name>/<file>"``, relative to the manifest)."""
    import torch

    from ..rois.manifest import safe_file_name

    a = (torch.nan_to_num(torch.as_tensor(m)).clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    name = safe_file_name(image_id) + ".png"
    save_png(a, Path(folder) / name)
    return f"{Path(folder).name}/{name}"
