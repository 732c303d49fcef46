"""Reconstruction-error ROIs: "mask what the model finds hard to predict", with no text and no labels.

A finished (or checkpointed) ``mwm pretrain`` run holds the whole masked-image model, decoder included
(``RUN/checkpoints/last.pt``). For each image we draw ``masks`` random keep-masks at ``ratio`` on the run's mask
grid (seeded by ``seed`` and the image id, so a record does not depend on batching, order or subsets), run the
images × masks as one batch, and score every masked patch by the run's own loss term — the MSE between prediction
and the per-patch normalized target (:mod:`mwm.mim.loss`). A patch's error is its mean over the masks in which it
was masked (a patch no mask hid gets the image's mean). The ``patch`` map (one value per mask cell) or the
``pixel`` map (the squared error of each pixel, same averaging; finer than the mask grid) is upsampled bilinearly
to the image, binarized, and the ``components`` largest high-error components become boxes (``union`` or
``per_component``), expanded by ``expand``. Binarization defaults to ``quantile`` 0.9 (the hardest 10 % of each
image): Otsu / 2-means (as ``mwm localize``) mostly split "tissue" from "air", because empty air is trivially
predictable. Defaults (``patch``, ``quantile`` 0.9) were chosen on the phantoms' val split, where they gave Dice
0.21 against 0.10 for a random box of the same size; the ``pixel`` map was noisier (Dice ≈ 0.10, no better than
random).

It is a static, label-free cousin of AnatoMask / HPM (which mask the patches a *learned* predictor says are hard,
during training); here the hard region is found once, before guided pretraining, by a briefly pretrained model.
What it finds is what is hard to inpaint from context: lesions with texture or edges, but also any structure the
run has not learned (bright bone, text overlays, borders); :mod:`mwm.localize.metrics` says how well that matches
a target.

>>> recs = recon_error_records("br35h.npz", "runs/pre/", masks=8, ratio=0.6, split="test")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, MWMError

__all__ = ["ReconRun", "load_run", "draw_keep", "patch_errors", "pixel_errors", "error_maps", "maps_to_boxes",
           "recon_error_records", "run_sha256", "LEVELS"]

LEVELS = ("patch", "pixel")
Level = Literal["patch", "pixel"]


@dataclass
class ReconRun:
    """A pretraining run loaded for scoring: ``model`` (eval mode), the input ``size``, ``resize`` policy and
    ``read`` options it was trained with, the input ``mean``/``std`` (1, 3, 1, 1), its mask ``grid``, its
    ``method`` (spark / mae) and the SHA-256 of the checkpoint the weights came from."""

    path: Path
    model: torch.nn.Module
    size: int
    resize: str
    read: dict
    mean: torch.Tensor
    std: torch.Tensor
    grid: tuple[int, int]
    method: str
    sha256: str
    norm_pix: bool
    eps: float


def _checkpoint(run: Path) -> Path:
    ckpt = run / "checkpoints" / "last.pt"
    if not ckpt.is_file():
        raise MWMError(f"{run}: no checkpoints/last.pt; reconstruction-error needs a `mwm pretrain` run folder "
                       "(it holds the decoder as well as the encoder; encoder.pth alone cannot reconstruct)")
    return ckpt


def run_sha256(run: str | Path) -> str:
    """The content hash of a run's weights (its ``checkpoints/last.pt``): what a bench ROI part depends on."""
    from ..io import file_sha256

    return file_sha256(_checkpoint(Path(run)))


def _input_stats(model, run: Path, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's input normalization: its encoder card's (``encoder.json``) when finished and the card says,
    else the timm arch's (as pretraining)."""
    from ..engine.card import CARD_NAME, EncoderCard

    if (run / CARD_NAME).is_file():
        card = EncoderCard.load(run)
        if "normalize" in card.model_fields_set:  # null: raw [0, 1] inputs → zeros / ones
            mean, std = card.input_stats()
            return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    if not cfg.get("normalize", True):
        return torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    pc = getattr(getattr(model.encoder, "model", None), "pretrained_cfg", None) or {}
    return (torch.tensor(pc.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1),
            torch.tensor(pc.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1))


def _read_checkpoint(path: Path) -> dict:
    """The run's ``checkpoints/last.pt`` as ``mwm pretrain`` writes it (``format`` ``mwm.pretrain/…``, with its
    ``config`` and ``model`` / ``ema`` weights). Read here, not through :mod:`mwm.train`: localization and
    pretraining sit side by side and talk through files."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise MWMError(f"{path}: not a readable mwm checkpoint ({type(e).__name__}: {e}); reconstruction-error "
                       "needs the checkpoints/last.pt of a `mwm pretrain` run") from e
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("mwm.pretrain/") \
            or "config" not in ckpt or "model" not in ckpt:
        raise MWMError(f"{path}: not an mwm pretraining checkpoint; reconstruction-error needs the "
                       "checkpoints/last.pt of a `mwm pretrain` run")
    return ckpt


def load_run(run: str | Path, device: str | torch.device = "cpu") -> ReconRun:
    """Build the run's MIM model from its checkpoint (EMA weights when the run kept them, as its export does)."""
    from ..mim import create_mim_model

    run = Path(run)
    ckpt_path = _checkpoint(run)
    ckpt = _read_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    try:
        model = create_mim_model(cfg["model"])
        model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise MWMError(f"{ckpt_path}: cannot rebuild the run's model ({type(e).__name__}: {e})") from e
    model.eval().to(device)
    mean, std = _input_stats(model, run, cfg)
    size = int(cfg["model"]["size"])
    return ReconRun(path=run, model=model, size=size, resize=cfg.get("resize", "pad"), read=cfg.get("read") or {},
                    mean=mean.to(device), std=std.to(device), grid=tuple(model.grid(size)),
                    method=cfg["model"].get("method", "spark"), sha256=run_sha256(run),
                    norm_pix=bool(cfg["model"].get("norm_pix", True)), eps=float(cfg["model"].get("eps", 1e-6)))


def draw_keep(ids: list[str], masks: int, ratio: float, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``masks`` random keep-masks per image (exactly ``round(n·(1−ratio))`` visible cells each, as pretraining),
    image by image from a generator seeded by ``seed`` and the image id → bool ``(len(ids)·masks, 1, h, w)``,
    image-major (image i's masks are rows ``i·masks … (i+1)·masks − 1``)."""
    from ..masking.policies import random_keep
    from ..rois.manifest import image_seed

    out = []
    for image_id in ids:  # generators only: the model sees all images × masks at once
        g = torch.Generator().manual_seed(image_seed(seed, image_id))
        out.append(random_keep(masks, grid, ratio, generator=g))
    return torch.cat(out) if out else torch.zeros(0, 1, *grid, dtype=torch.bool)


def _targets(x: torch.Tensor, p: int, norm_pix: bool, eps: float) -> torch.Tensor:
    from ..mim.loss import patchify

    t = patchify(x.float(), p)
    if norm_pix:  # the loss's own target: per-patch mean/unbiased std (mim.loss)
        t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + eps).sqrt()
    return t


def patch_errors(x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor, norm_pix: bool = True,
                 eps: float = 1e-6) -> torch.Tensor:
    """The per-patch terms of :func:`mwm.mim.loss.masked_mse` → float ``(B, h, w)`` (every patch scored; the
    loss averages the masked ones: ``(err · ~keep).sum() / (~keep).sum()`` equals it)."""
    from ..mim.loss import patchify

    h, w = keep.shape[-2:]
    p = x.shape[-1] // w
    err = (patchify(pred.float(), p) - _targets(x, p, norm_pix, eps)).pow(2).mean(-1)
    return err.view(-1, h, w)


def pixel_errors(x: torch.Tensor, pred: torch.Tensor, keep: torch.Tensor, norm_pix: bool = True,
                 eps: float = 1e-6) -> torch.Tensor:
    """The squared error of each pixel in target space (channels averaged) → float ``(B, H, W)``: the terms whose
    patch means :func:`patch_errors` gives."""
    from ..mim.loss import patchify, unpatchify

    h, w = keep.shape[-2:]
    p = x.shape[-1] // w
    sq = (patchify(pred.float(), p) - _targets(x, p, norm_pix, eps)).pow(2)
    return unpatchify(sq, p, (h, w), x.shape[1]).mean(1)


@torch.no_grad()
def error_maps(run: ReconRun, images: torch.Tensor, ids: list[str], masks: int = 8, ratio: float = 0.6,
               seed: int = 0, level: Level = "patch", batch_size: int = 64) -> torch.Tensor:
    """Mean reconstruction error per location over the masks that hid it, upsampled to the image.

    Args:
        images: float ``(N, 3, S, S)`` in [0, 1] at the run's size (not normalized).
        ids: one id per image (seeds its masks).
        masks, ratio: how many random masks per image, and their mask ratio.
        level: ``patch`` (the loss per masked cell) or ``pixel`` (per pixel).
        batch_size: images × masks per forward pass.

    Returns:
        float ``(N, S, S)``; higher = harder to reconstruct.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use patch or pixel")
    n, _, s, _ = images.shape
    dev = run.mean.device
    per = max(1, batch_size // masks)  # images per pass; each is repeated `masks` times
    out = torch.empty(n, s, s)
    for a in range(0, n, per):
        x = images[a:a + per].to(dev, torch.float32)
        b = len(x)
        keep = draw_keep(ids[a:a + b], masks, ratio, run.grid, seed).to(dev)
        xx = ((x - run.mean) / run.std).repeat_interleave(masks, 0)
        kw = {}
        if run.method == "mae":
            from ..masking import n_keep

            kw["n_visible"] = int(n_keep(run.grid[0] * run.grid[1], ratio))
        pred = run.model(xx, keep, **kw)["pred"]
        if level == "patch":
            err, hid = patch_errors(xx, pred, keep, run.norm_pix, run.eps), (~keep[:, 0]).float()
        else:
            from ..mim import upsample_keep

            err = pixel_errors(xx, pred, keep, run.norm_pix, run.eps)
            hid = (~upsample_keep(keep, (s, s))[:, 0]).float()
        err, hid = err.view(b, masks, *err.shape[1:]), hid.view(b, masks, *hid.shape[1:])
        total, count = (err * hid).sum(1), hid.sum(1)
        mean = total / count.clamp_min(1)
        # a location no mask hid has no error of its own: give it the image's mean over the hidden ones
        img_mean = total.flatten(1).sum(1) / count.flatten(1).sum(1).clamp_min(1)
        mean = torch.where(count > 0, mean, img_mean.view(b, 1, 1))
        if mean.shape[-1] != s:
            mean = F.interpolate(mean[:, None], size=(s, s), mode="bilinear", align_corners=False)[:, 0]
        out[a:a + b] = mean.cpu()
    return out


def maps_to_boxes(maps: torch.Tensor, binarize: str = "quantile", quantile: float = 0.9, components: int = 1,
                  box_mode: str = "union", expand: float = 0.0) -> tuple[list[list[list[float]]], list[str]]:
    """Error maps ``(N, H, W)`` → (normalized boxes per image, status per image), by ``mwm localize``'s own
    postprocessing: binarize → the ``components`` largest components → boxes → margin. Status ``ok`` or
    ``empty_roi`` (nothing above the threshold, or a constant/NaN map).

    binarize: ``otsu`` / ``kmeans`` (:func:`mwm.localize.postprocess.binarize`; on scans with empty air these
    mostly split "anything" from "air", since air is trivially predictable) or ``quantile``: the hardest
    ``1 − quantile`` of each image's pixels (0.9: the top 10 %).
    """
    from ..rois.boxes import expand_boxes, largest_components, mask_to_boxes
    from .postprocess import binarize as binarize_maps

    if binarize == "quantile":
        flat = maps.flatten(1).double()
        fg, status = binarize_maps(maps, "kmeans")  # statuses (NaN / constant maps) by the shared rules
        thr = torch.quantile(torch.nan_to_num(flat), quantile, dim=1)
        fg = (flat > thr[:, None]).view_as(maps) & torch.tensor([s == "ok" for s in status]).view(-1, 1, 1)
    elif binarize in ("otsu", "kmeans"):
        fg, status = binarize_maps(maps, binarize)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown binarize method {binarize!r}; use otsu, kmeans or quantile")
    kept = largest_components(fg, components)
    boxes = mask_to_boxes(kept.mask, box_mode)  # type: ignore[arg-type]
    out, st = [], []
    for bx, s in zip(boxes, status):
        ok = s == "ok" and len(bx) > 0
        out.append(expand_boxes(bx, expand) if ok and expand > 0 else (bx if ok else []))
        st.append("ok" if ok else "empty_roi")
    return out, st


BINARIZE = ("otsu", "kmeans", "quantile")


def check_options(masks: int = 8, ratio: float = 0.6, level: str = "patch", binarize: str = "quantile",
                  quantile: float = 0.9, components: int = 1) -> None:
    """Raise :class:`DataError` naming the first bad reconstruction-error option (before any slow work)."""
    bad = ([f"masks must be >= 1 (got {masks})"] if masks < 1 else []) \
        + ([f"ratio must be in (0, 1) (got {ratio})"] if not 0 < ratio < 1 else []) \
        + ([f"level must be one of {', '.join(LEVELS)} (got {level!r})"] if level not in LEVELS else []) \
        + ([f"binarize must be one of {', '.join(BINARIZE)} (got {binarize!r})"] if binarize not in BINARIZE else []) \
        + ([f"quantile must be in (0, 1) (got {quantile})"] if not 0 < quantile < 1 else []) \
        + ([f"components must be >= 1 (got {components})"] if components < 1 else [])
    if bad:
        raise DataError("reconstruction-error: " + "; ".join(bad))


def recon_error_records(data, run: str | Path | ReconRun, *, masks: int = 8, ratio: float = 0.6, seed: int = 0,
                        level: Level = "patch", binarize: str = "quantile", quantile: float = 0.9,
                        components: int = 1, box_mode: str = "union", expand: float = 0.0,
                        indices: list[int] | None = None, batch_size: int = 64, device: str = "cpu",
                        maps_out: str | Path | None = None, chunk: int = 256) -> list[dict]:
    """One manifest record per image of ``data`` (or of ``indices``): the high-error boxes, in the frame of the
    image as read (the run's ``resize`` fit undone). ``maps_out``: also save the error maps (float16, at the
    run's size) with their ids to this ``.npz``."""
    from ..data import open_source
    from ..data.transforms import Fit, to_tensor

    check_options(masks, ratio, level, binarize, quantile, components)
    rr = run if isinstance(run, ReconRun) else load_run(run, device)
    src = open_source(data)
    idx = list(range(len(src.ids))) if indices is None else list(indices)
    recs: list[dict] = []
    all_maps, all_ids = [], []
    for a in range(0, len(idx), chunk):  # decode a chunk at a time: memory stays bounded on large data
        samples = list(src.iter_samples(idx[a:a + chunk]))
        if not samples:
            continue
        imgs = torch.stack([to_tensor(s.image, rr.size, 3, rr.resize) for s in samples])  # type: ignore[arg-type]
        ids = [s.id for s in samples]
        maps = error_maps(rr, imgs, ids, masks, ratio, seed, level, batch_size)
        boxes, status = maps_to_boxes(maps, binarize, quantile, components, box_mode, expand)
        for s, bx, st in zip(samples, boxes, status):
            h, w = s.image.shape[:2]
            fit = Fit.of(h, w, rr.size, rr.resize)  # type: ignore[arg-type]
            bx = [fit.unbox(b, h, w, rr.size) for b in bx]
            bx = [b for b in bx if b[2] > b[0] and b[3] > b[1]]
            recs.append({"image": s.id, "width": int(w), "height": int(h),
                         "boxes": [[round(float(v), 6) for v in b] for b in bx],
                         "prompt": "reconstruction-error", "status": st if bx or st != "ok" else "empty_roi"})
        if maps_out is not None:
            all_maps.append(maps.half().numpy())
            all_ids += ids
    if maps_out is not None:
        from ..io import atomic_path

        with atomic_path(Path(maps_out), suffix=".npz") as tmp:
            np.savez_compressed(tmp, ids=np.array(all_ids, dtype=str),
                                maps=np.concatenate(all_maps) if all_maps else np.zeros((0, rr.size, rr.size)))
    return recs
