"""``mwm segment``: segmentation transfer — a UNet decoder on the pretrained encoder's timm feature pyramid.

>>> from mwm.transfer.segment import SegmentConfig, segment
>>> m = segment(SegmentConfig(data="br35h.npz", out="seg/", weights="run/encoder.pth", size=64, epochs=30))
>>> m["dice"], m["iou"]                     # mean per-image Dice / IoU on the test images with a valid mask

Model: ``create_backbone(spec, features_only=True)`` gives every level timm exposes (ResNets: the stride-2 stem
and strides 4…32; ConvNeXt: strides 4…32; ViTs: several stride-16 maps); :class:`UNetDecoder` goes from the
coarsest level up, each block = nearest upsampling to the next skip's size → concatenation of the skip →
2 × (3×3 conv, BN, ReLU); once the skips run out it keeps doubling (blocks without a skip) up to the input size,
and a 3×3 conv gives one logit per pixel (binary: mask > 0 is foreground).

Training (Lightning Fabric, one device): AdamW, linear warmup + cosine per step, the encoder at
``encoder_lr_scale × lr`` (or frozen), loss = soft Dice (pooled over the batch) + BCE, paired augmentation on
the device (the same random resized crop and flip for an image and its mask, one ``grid_sample`` per batch).
The model with the best mean validation Dice is restored before the test evaluation (early stopping after
``patience`` epochs without improvement).

Metrics (:func:`overlap_counts`, :func:`summarize`) on the ``test`` images with a valid mask, prediction =
``sigmoid(logit) > threshold``: per image ``Dice = 2|P∩G| / (|P| + |G|)`` and ``IoU = |P∩G| / |P∪G|``,
**defined as 1 when both the ground truth and the prediction are empty** (and 0 when only one of them is);
``dice``/``iou`` are their means over images, ``dice_pooled``/``iou_pooled`` the same formulas on the pixel counts
summed over all test images (dataset level), ``dice_fg`` the mean Dice over the test images whose mask is not
empty.

Outputs: OUT/metrics.json, OUT/config.yaml, OUT/examples.png (test images | ground truth in green | prediction in
red), OUT/model.pt (reload with :func:`load_segmenter`).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..data.paired import paired_crop_flip
from ..engine import Precision, build_scheduler, device_fabric, seed_all
from ..errors import DataError, MWMError
from ..data.paired import AugmentConfig
from ..weights import BackboneSpec, create_backbone, resolve_weights
from .config import TransferConfig
from .results import TaskMetrics
from .selection import BestOnVal

__all__ = ["SegmentConfig", "segment", "UNetDecoder", "SegmentationModel", "build_model", "load_segmenter",
           "segmentation_loss", "overlap_counts", "summarize", "paired_augment", "EMPTY_RULE"]

EMPTY_RULE = "per-image Dice/IoU = 1 when ground truth and prediction are both empty, 0 when only one is"


class SegmentConfig(TransferConfig):
    """Everything ``mwm segment`` does, typed and validated (``extra="forbid"``); shared options:
    :class:`~mwm.transfer.config.TransferConfig`."""

    # -- data --------------------------------------------------------------------------------------------------
    size: int | None = Field(default=None, ge=16, description="input side in pixels; default: the encoder's "
                                                              "pretraining size (encoder.json), else 64")
    include_empty: bool = Field(default=True, description="train also on images whose (valid) mask is empty")
    train_limit: int | None = Field(default=None, ge=2, description="train on the first N training images with a "
                                                                    "valid mask (label-efficiency runs)")
    augment: AugmentConfig = AugmentConfig()
    # -- model -------------------------------------------------------------------------------------------------
    decoder_channels: int = Field(default=256, ge=8, description="width of the coarsest decoder block; halves per "
                                                                 "block, down to 16")
    freeze_encoder: bool = Field(default=False, description="train the decoder only (encoder weights and BN "
                                                            "statistics fixed)")
    # -- optimisation ------------------------------------------------------------------------------------------
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=1e-3, gt=0, description="peak lr of the decoder (AdamW)")
    encoder_lr_scale: float | None = Field(default=None, ge=0, description="encoder lr = lr × this; default 0.1 "
                                                                           "for pretrained weights, 1 for random init")
    weight_decay: float = Field(default=1e-4, ge=0, description="not applied to biases and norms")
    warmup_epochs: float = Field(default=1.0, ge=0)
    loss: Literal["dice_bce", "dice", "bce"] = "dice_bce"
    threshold: float = Field(default=0.5, gt=0, lt=1, description="foreground when sigmoid(logit) > threshold")
    patience: int | None = Field(default=10, ge=0, description="stop after this many epochs without a better "
                                                               "val Dice (0 or None: run all epochs)")
    # -- hardware and bookkeeping ------------------------------------------------------------------------------
    precision: Precision = "32-true"
    examples: int = Field(default=6, ge=0, description="test images in examples.png (0: none)")
    save_model: bool = Field(default=True, description="write OUT/model.pt (the best model)")


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------

class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _UpBlock(nn.Module):
    """Nearest upsampling to ``size`` → concat the skip (if any) → 2 × conv-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(_ConvBNReLU(cin + cskip, cout), _ConvBNReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv(x)


class UNetDecoder(nn.Module):
    """UNet decoder over a feature pyramid. ``forward(features, size) → logits (B, out_chans, *size)``.

    channels/reductions: per encoder level, finest first (``feature_info.channels()/.reduction()``); reductions
    must not decrease. One block per skip level (coarsest first), then blocks without a skip halving the stride
    down to 1 (the last one lands exactly on ``size``). Block widths: ``width, width/2, …`` floored at
    ``min_width``.
    """

    def __init__(self, channels: list[int], reductions: list[int], width: int = 256, min_width: int = 16,
                 out_chans: int = 1):
        super().__init__()
        if len(channels) != len(reductions) or not channels:
            raise ValueError(f"need one channel count per level, got {channels} and {reductions}")
        if any(b < a for a, b in zip(reductions[:-1], reductions[1:])):
            raise ValueError(f"feature levels must go from fine to coarse, got strides {reductions}")
        skips = list(zip(channels[:-1], reductions[:-1]))[::-1]  # coarsest skip first
        plan = [(c, r) for c, r in skips]
        r = min(reductions)
        while r > 1:
            r = max(1, r // 2)
            plan.append((0, r))
        if not plan:  # a stride-1 single level: one block to mix it
            plan.append((0, 1))
        self.strides = [r for _, r in plan]
        self.n_skips = len(skips)
        widths = [max(min(min_width, width), width // 2 ** i) for i in range(len(plan))]
        cin = channels[-1]
        self.blocks = nn.ModuleList()
        for (cskip, _), w in zip(plan, widths):
            self.blocks.append(_UpBlock(cin, cskip, w))
            cin = w
        self.head = nn.Conv2d(cin, out_chans, 3, padding=1)

    def forward(self, features: list[torch.Tensor], size) -> torch.Tensor:
        H, W = int(size[0]), int(size[1])
        x = features[-1]
        skips = features[:-1][::-1]
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if i < self.n_skips:
                x = blk(x, skips[i], skips[i].shape[-2:])
            else:
                r = self.strides[i]
                target = (H, W) if i == last else (math.ceil(H / r), math.ceil(W / r))
                x = blk(x, None, target)
        if tuple(x.shape[-2:]) != (H, W):  # only when the last block had a skip (a stride-1 encoder level)
            x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
        return self.head(x)


class SegmentationModel(nn.Module):
    """``encoder`` (timm ``features_only``) + ``decoder`` (:class:`UNetDecoder`). ``forward(x)``: normalized
    images (B, 3, H, W) → logits (B, 1, H, W)."""

    def __init__(self, encoder: nn.Module, decoder: UNetDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x), x.shape[-2:])


def _is_vit(arch: str) -> bool:
    return arch.lower().startswith(("vit", "deit", "eva", "beit"))


def build_model(spec: BackboneSpec, decoder_channels: int = 256, size: int | None = None) -> SegmentationModel:
    """The timm feature pyramid of ``spec`` (its weights loaded, keys checked) + a :class:`UNetDecoder`."""
    extra = {}
    if _is_vit(spec.arch) and "img_size" not in spec.kwargs and size:
        extra["img_size"] = size  # a ViT's position embedding is built for one input size
    encoder = create_backbone(spec, features_only=True, **extra)
    info = encoder.feature_info
    try:
        decoder = UNetDecoder(info.channels(), info.reduction(), width=decoder_channels)
    except ValueError as e:
        raise MWMError(f"cannot put a UNet decoder on timm '{spec.arch}': {e}") from e
    return SegmentationModel(encoder, decoder)


def load_segmenter(path: str | Path, map_location="cpu") -> tuple[SegmentationModel, dict]:
    """Reload OUT/model.pt → (model in eval mode, meta: arch, size, mean, std, threshold, …)."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    meta = {k: v for k, v in ck.items() if k != "state_dict"}
    spec = BackboneSpec(arch=meta["arch"], kwargs=dict(meta.get("timm_kwargs") or {}))
    model = build_model(spec, meta["decoder_channels"], meta.get("size"))
    model.load_state_dict(ck["state_dict"])
    return model.eval(), meta


# ------------------------------------------------------------------------------------------------------------
# loss, metrics, augmentation
# ------------------------------------------------------------------------------------------------------------

def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice_bce",
                      smooth: float = 1.0) -> torch.Tensor:
    """logits, target (B, 1, H, W) (target in {0, 1}). Soft Dice over the whole batch (stable when some images
    have empty masks) and/or mean BCE; ``dice_bce`` is their sum."""
    logits, target = logits.float(), target.float()
    loss = logits.new_zeros(())
    if "bce" in kind:
        loss = loss + F.binary_cross_entropy_with_logits(logits, target)
    if "dice" in kind:
        p = torch.sigmoid(logits)
        inter = (p * target).sum()
        loss = loss + 1 - (2 * inter + smooth) / (p.sum() + target.sum() + smooth)
    return loss


def overlap_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary pred, target (N, H, W) (or (N, 1, H, W)) → float64 (N, 3): |P∩G|, |P|, |G| per image."""
    p = pred.reshape(pred.shape[0], -1).bool()
    g = target.reshape(target.shape[0], -1).bool()
    return torch.stack([(p & g).sum(1), p.sum(1), g.sum(1)], dim=1).double()


def summarize(counts: torch.Tensor) -> dict:
    """(N, 3) counts from :func:`overlap_counts` → dice, iou (means over images), dice_pooled, iou_pooled
    (summed counts), dice_fg (mean over images with a non-empty ground truth; None when there is none), n,
    n_empty. Empty ground truth and empty prediction: Dice = IoU = 1 (see :data:`EMPTY_RULE`)."""
    c = counts.double().cpu()
    inter, ps, gs = c[:, 0], c[:, 1], c[:, 2]
    denom, union = ps + gs, ps + gs - inter
    dice = torch.where(denom > 0, 2 * inter / denom.clamp(min=1), torch.ones_like(denom))
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    I, P, G = float(inter.sum()), float(ps.sum()), float(gs.sum())
    fg = gs > 0
    return {"dice": float(dice.mean()) if len(c) else float("nan"),
            "iou": float(iou.mean()) if len(c) else float("nan"),
            "dice_pooled": 2 * I / (P + G) if P + G > 0 else 1.0,
            "iou_pooled": I / (P + G - I) if P + G - I > 0 else 1.0,
            "dice_fg": float(dice[fg].mean()) if bool(fg.any()) else None,
            "n": int(len(c)), "n_empty": int((~fg).sum())}


def paired_augment(x: torch.Tensor, m: torch.Tensor, generator: torch.Generator | None = None,
                   scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   hflip: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random resized crop (+ horizontal flip) for each image (B, C, H, W) and its mask (B, 1, H, W):
    :func:`mwm.data.paired.paired_crop_flip` (bilinear for x, nearest for m, so masks stay binary)."""
    x, m, _, _ = paired_crop_flip(x, m, generator=generator, scale=scale, ratio=ratio, hflip=hflip)
    return x, m


def _param_groups(model: SegmentationModel, lr: float, enc_scale: float, weight_decay: float) -> list[dict]:
    groups = []
    for part, scale in ((model.decoder, 1.0), (model.encoder, enc_scale)):
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr * scale, "weight_decay": wd})
    return groups


# ------------------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------------------

def _splits(data, cfg: SegmentConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices of images with a valid mask, and the per-image foreground flag."""
    if data.mask_valid is None or not data.mask_valid.any():
        raise DataError(f"{cfg.data}: no image has a valid mask ('mask_valid' is all false); segmentation needs "
                        "ground-truth masks")
    fg = data.masks.reshape(len(data), -1).max(axis=1) > 0
    tr, va, te = (data.indices(s, with_masks=True) for s in ("train", "val", "test"))
    if len(va) == 0 and len(tr) >= 4:
        rng = np.random.default_rng(cfg.seed)
        perm = rng.permutation(tr)
        n_va = max(1, round(0.15 * len(tr)))
        va, tr = np.sort(perm[:n_va]), np.sort(perm[n_va:])
        warnings.warn(f"{cfg.data}: no validation images with masks; using {n_va} of the training images with "
                      f"masks (seed {cfg.seed}) for model selection", stacklevel=3)
    if not cfg.include_empty:
        tr = tr[fg[tr]]
    if cfg.train_limit is not None:
        tr = tr[:cfg.train_limit]
    for name, idx, need in (("train", tr, 2), ("val", va, 1), ("test", te, 1)):
        if len(idx) < need:
            raise DataError(f"{cfg.data}: {len(idx)} '{name}' image(s) with a valid mask"
                            + (" and a non-empty mask" if name == "train" and not cfg.include_empty else "")
                            + f"; segmentation needs at least {need} (masks: {int(data.mask_valid.sum())} valid of "
                            f"{len(data)}, splits: {dict(zip(*np.unique(data.split, return_counts=True)))})")
    return tr, va, te, fg


def segment(cfg: SegmentConfig, progress=None) -> dict:
    """Train the segmenter, select it on val, evaluate it on test; returns the metrics (also OUT/metrics.json).

    progress(kind, done, total, info): "decode" (images decoded so far), "start" (info: n_train, n_val, n_test,
    size, arch, steps_per_epoch, encoder_lr_scale), "step" (every optimizer step; no values, so no device sync),
    "epoch" (info: epoch, epochs, loss, val_dice, best_epoch, seconds), "end" (info = the metrics).
    """
    from ..config import save_config
    from .data import load_labelled

    t0 = time.perf_counter()

    def emit(kind, done=0, total=None, info=None):
        if progress is not None:
            progress(kind, done, total, info or {})

    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: no such file or folder")
    spec = resolve_weights(cfg.weights, cfg.arch)  # a wrong path fails before any decoding
    size = int(cfg.size or spec.size or 64)
    pretrained = spec.state_dict is not None or spec.hub
    enc_scale = 0.0 if cfg.freeze_encoder else (cfg.encoder_lr_scale if cfg.encoder_lr_scale is not None
                                                 else (0.1 if pretrained else 1.0))
    fabric = device_fabric(cfg.device, cfg.precision)
    dev = fabric.device
    seed_all(cfg.seed)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg.model_copy(update={"size": size}), out / "config.yaml")

    decoded = [0]

    def on_decode(n):
        decoded[0] += n
        emit("decode", decoded[0])

    data = load_labelled(cfg.data, size, cfg.read, cfg.resize, need_labels=False, need_masks=True, seed=cfg.seed,
                         progress=on_decode)
    tr, va, te, fg = _splits(data, cfg)

    # -- model, optimizer, schedule ----------------------------------------------------------------------------
    net = build_model(spec, cfg.decoder_channels, size)
    if cfg.freeze_encoder:
        net.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(_param_groups(net, cfg.lr, enc_scale, cfg.weight_decay), lr=cfg.lr)
    bs = min(cfg.batch_size, len(tr))
    steps_per_epoch = len(tr) // bs  # the last partial batch is dropped (a batch of 1 breaks BatchNorm)
    total_steps = steps_per_epoch * cfg.epochs
    sched = build_scheduler(opt, total_steps, min(round(cfg.warmup_epochs * steps_per_epoch), total_steps - 1))
    model, opt = fabric.setup(net, opt)
    mean, std = spec.normalizer(dev)

    images = torch.from_numpy(np.ascontiguousarray(data.images))  # uint8 (N, 3, S, S), on the host
    masks = torch.from_numpy(np.ascontiguousarray(data.masks > 0))  # bool (N, S, S)
    gen = torch.Generator().manual_seed(cfg.seed)
    thr_logit = math.log(cfg.threshold / (1 - cfg.threshold))

    def batch(idx: np.ndarray, augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ii = torch.from_numpy(idx)
        x = images[ii].to(dev, non_blocking=True).float().div_(255)
        y = masks[ii].to(dev, non_blocking=True).unsqueeze(1).float()
        if augment and cfg.augment.enabled:
            x, y = paired_augment(x, y, gen, cfg.augment.crop_scale, cfg.augment.crop_ratio, cfg.augment.hflip)
        return (x - mean) / std, y

    @torch.no_grad()
    def counts(idx: np.ndarray) -> torch.Tensor:
        """(len(idx), 3) overlap counts on the device (eval mode, no augmentation)."""
        model.eval()
        rows = []
        for s in range(0, len(idx), 2 * cfg.batch_size):
            x, y = batch(idx[s:s + 2 * cfg.batch_size], augment=False)
            rows.append(overlap_counts(model(x).float() > thr_logit, y > 0.5))
        return torch.cat(rows)

    def mean_dice(c: torch.Tensor) -> torch.Tensor:  # on the device; read back once per epoch
        denom = c[:, 1] + c[:, 2]
        return torch.where(denom > 0, 2 * c[:, 0] / denom.clamp(min=1), torch.ones_like(denom)).mean()

    emit("start", 0, total_steps, {"n_train": len(tr), "n_val": len(va), "n_test": len(te), "size": size,
                                   "arch": spec.arch, "weights": spec.source, "steps_per_epoch": steps_per_epoch,
                                   "encoder_lr_scale": enc_scale, "device": str(dev)})

    # -- training ----------------------------------------------------------------------------------------------
    t_train = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    history: list[dict] = []
    keep, step = BestOnVal(cfg.patience, device="cpu"), 0
    for epoch in range(cfg.epochs):
        te0 = time.perf_counter()
        model.train()
        if cfg.freeze_encoder:
            net.encoder.eval()
        perm = rng.permutation(tr)
        loss_sum = torch.zeros((), device=dev)
        for s in range(steps_per_epoch):
            x, y = batch(perm[s * bs:(s + 1) * bs], augment=True)
            loss = segmentation_loss(model(x), y, cfg.loss)
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            step += 1
            emit("step", step, total_steps, {"epoch": epoch + 1})
        val_dice = float(mean_dice(counts(va)))  # the epoch's one read-back, with the loss below
        ep_loss = float(loss_sum) / steps_per_epoch
        keep.update(val_dice, epoch + 1, net)
        row = {"epoch": epoch + 1, "loss": ep_loss, "val_dice": val_dice}
        history.append(row)
        emit("epoch", epoch + 1, cfg.epochs, {**row, "epochs": cfg.epochs, "best_epoch": keep.best_epoch,
                                              "best_val_dice": keep.best, "seconds": time.perf_counter() - te0})
        if keep.should_stop:
            break
    train_seconds = time.perf_counter() - t_train
    keep.restore(net)

    # -- evaluation and outputs --------------------------------------------------------------------------------
    test = summarize(counts(te))
    train_dice = summarize(counts(tr))["dice"]
    metrics = {
        "dice": test["dice"], "iou": test["iou"], "dice_pooled": test["dice_pooled"],
        "iou_pooled": test["iou_pooled"], "dice_fg": test["dice_fg"], "n_test": test["n"],
        "n_test_empty": test["n_empty"], "n_train": int(len(tr)), "n_val": int(len(va)),
        "best_epoch": keep.best_epoch, "epochs_done": len(history), "val_dice": keep.best, "train_dice": train_dice,
        "arch": spec.arch, "weights": spec.source, "size": size, "encoder_lr_scale": enc_scale,
        "freeze_encoder": cfg.freeze_encoder, "threshold": cfg.threshold, "empty_rule": EMPTY_RULE,
        "train_seconds": train_seconds, "seconds": time.perf_counter() - t0, "history": history,
    }
    files = {"metrics": str(out / "metrics.json"), "config": str(out / "config.yaml")}
    if cfg.examples > 0:
        files["examples"] = str(_save_examples(out / "examples.png", model, batch, te, fg, data, cfg.examples,
                                               thr_logit))
    if cfg.save_model:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "arch": spec.arch,
                    "timm_kwargs": dict(spec.kwargs), "decoder_channels": cfg.decoder_channels, "size": size,
                    "mean": list(spec.mean), "std": list(spec.std), "threshold": cfg.threshold,
                    "resize": cfg.resize}, out / "model.pt")
        files["model"] = str(out / "model.pt")
    metrics["files"] = files
    metrics["seconds"] = time.perf_counter() - t0
    TaskMetrics.model_validate(metrics).save(out / "metrics.json")
    emit("end", 0, None, metrics)
    return metrics


@torch.no_grad()
def _save_examples(path: Path, model, batch, te: np.ndarray, fg: np.ndarray, data, k: int, thr_logit: float) -> Path:
    """A row per test image: the image | ground truth (green) | prediction (red); images with a non-empty mask
    first, evenly spaced through the test split."""
    from ..report.overlays import gray_rgb, hstack, save_png, tint, upscale
    from ..report.overlays import vstack

    pos, neg = te[fg[te]], te[~fg[te]]
    pick = [int(pos[j]) for j in np.linspace(0, len(pos) - 1, min(k, len(pos))).round().astype(int)] if len(pos) else []
    pick += [int(i) for i in neg[:k - len(pick)]]
    idx = np.asarray(pick, dtype=np.int64)
    model.eval()
    x, y = batch(idx, augment=False)
    pred = (model(x).float() > thr_logit)[:, 0].cpu().numpy()
    gt = y[:, 0].cpu().numpy() > 0.5
    rows = []
    for j, i in enumerate(idx):
        base = gray_rgb(data.images[i].astype(np.float32).mean(0) / 255)
        rows.append(hstack([upscale(base, 128), upscale(tint(base, gt[j], color=(40, 220, 40)), 128),
                            upscale(tint(base, pred[j], color=(255, 40, 40)), 128)]))
    return save_png(vstack(rows), path)
