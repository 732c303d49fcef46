"""``mwm detect``: detection and instance segmentation transfer with torchvision's Mask R-CNN (ResNet-FPN).

>>> from mwm.transfer.detect import DetectConfig, detect
>>> m = detect(DetectConfig(data="br35h.npz", out="det/", weights="run/encoder.pth", epochs=12))
>>> m["box_ap"], m["mask_ap75"]          # COCO AP as fractions in [0, 1]

The paper's Table 4 setting (Mask R-CNN, box AP / AP75 / mask AP on Br35H), scaled to small images:

* Backbone: a torchvision ResNet (``resnet18/34/50/101/152``, ``resnext*``, ``wide_resnet*``) into which the
  timm state dict from ``encoder.pth`` is loaded (timm and torchvision ResNets share their key names; only
  ``fc.*`` may be missing) and wrapped with torchvision's FPN extractor (P2–P5 + max-pooled P6).
* Normalization (``norm="auto"``): as torchvision's own ``maskrcnn_resnet50_fpn`` — :class:`FrozenBatchNorm2d`
  with ``trainable_layers=3`` (stem and layer1 frozen, like Detectron2's ``FREEZE_AT=2``) for pretrained
  weights, and trainable ``BatchNorm2d`` with every layer trainable for ``weights="none"`` (frozen statistics
  of a random init would be meaningless).
* Images stay at ``size`` (``min_size = max_size = size``: no upscaling to 800 px); anchors
  ``(8, 16, 32, 64, 128) × size / 128`` with ratios (0.5, 1, 2); inputs in [0, 1], normalized by the model with
  the encoder's mean/std. Fewer RPN proposals than the 800 px defaults (``proposals_train=500`` and
  ``proposals_test=300`` kept after NMS, instead of 2000/1000) and ``roi_batch_size=128`` sampled RoIs per image
  (instead of 512) keep the heads cheap on small images — at 128 px, 1/40 of an 800 px image's area, 32 / 200 /
  100 are still generous (they halve a CPU training step); at most
  ``detections_per_image=20`` detections per image are kept (COCO scores up to 100; a lesion image holds a
  handful, and every detection costs a mask-head pass on CPU).
* Targets: every valid mask is split into 8-connected components, one instance each (box = the component's
  pixel extent ``[x0, y0, x1, y1)`` with exclusive x1/y1, as COCO boxes of polygons and Detectron2's
  ``BitMasks.get_bounding_boxes``); components smaller than ``min_area`` pixels are dropped; a valid but empty
  mask is a negative image (no boxes). Images without a valid mask are not used.
* Optimizer: SGD (momentum 0.9, weight decay 1e-4, lr 0.02 × batch / 16: the Detectron2/torchvision reference)
  or AdamW; linear warmup from 0.001 × lr, then ×0.1 steps at 2/3 and 8/9 of training (the "1x" schedule's
  shape) or cosine (:func:`mwm.engine.schedules.lr_factor` with ``warmup_start=0.001``). Horizontal flips move
  image, boxes and masks together (:func:`mwm.data.paired.hflip_instances`).
* Runtime: one device through Lightning Fabric (:func:`mwm.engine.device_fabric`, fp32 ``32-true``), like the
  other tasks; ``device: auto`` picks CUDA when present, else the CPU (not MPS).
* Selection: box AP on ``val`` (images with masks) every ``eval_every`` epochs; the best weights are restored
  before testing; ``patience`` evaluations without improvement stop early.
* Metrics on ``test`` (images with masks): COCO box/mask AP, AP50, AP75 (torchmetrics ``MeanAveragePrecision``
  with the pycocotools backend), as fractions in [0, 1] (the paper's tables print ×100).

Writes OUT/config.yaml, OUT/metrics.json, OUT/examples.png and (``save_model``) OUT/model.pth.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from ..data.paired import hflip_instances
from ..engine import build_scheduler, device_fabric, lr_factor, seed_all
from ..errors import DataError, MWMError
from ..weights import BackboneSpec, resolve_weights
from .config import TransferConfig
from .results import TaskMetrics
from .selection import BestOnVal

__all__ = ["DetectConfig", "detect", "mask_to_instances", "resnet_backbone", "build_model", "detection_metrics",
           "SUPPORTED_ARCHS", "METRIC_KEYS"]

# timm and torchvision name these ResNets alike (conv1/bn1/layerN.M.convK/bnK/downsample.0/1/fc)
SUPPORTED_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                   "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
METRIC_KEYS = ("box_ap", "box_ap50", "box_ap75", "mask_ap", "mask_ap50", "mask_ap75")
ANCHORS_AT_128 = (8, 16, 32, 64, 128)


def _base_arch(arch: str) -> str:
    """``resnet50.a1_in1k`` → ``resnet50`` (timm's pretrained tag does not change the architecture)."""
    return arch.split(".", 1)[0].lower()


def check_arch(arch: str) -> str:
    """The torchvision constructor name for ``arch``, or an :class:`MWMError` saying which archs work."""
    base = _base_arch(arch)
    if base not in SUPPORTED_ARCHS:
        raise MWMError(f"detection needs a torchvision-style ResNet backbone (one of {', '.join(SUPPORTED_ARCHS)}); "
                       f"got '{arch}'. Pretrain such an encoder (`mwm pretrain --arch resnet50`) or pass --arch "
                       "with --weights none")
    return base


class DetectConfig(TransferConfig):
    """Mask R-CNN transfer (see the module docstring for the defaults' sources); shared options:
    :class:`~mwm.transfer.config.TransferConfig`."""

    weights: str = Field(default="none", description="RUN/encoder.pth, RUN/, none (random init) or timm (hub)")
    arch: str | None = Field(default=None, description="ResNet name; default: from encoder.json, else resnet18")
    size: int = Field(default=128, ge=32, le=2048, description="image side in pixels (the model keeps it)")
    batch_size: int = Field(default=8, ge=1)
    epochs: int = Field(default=12, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float | None = Field(default=None, gt=0, description="peak lr; default 0.02×batch/16 (sgd), 1e-4 (adamw)")
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_iters: int = Field(default=100, ge=0, description="linear warmup steps from 0.001×lr (capped at a "
                                                             "third of all steps)")
    schedule: Literal["step", "cosine"] = "step"
    lr_steps: tuple[float, ...] = Field(default=(2 / 3, 8 / 9), description="step schedule: fractions of all "
                                                                             "steps where lr drops ×0.1")
    clip_grad: float | None = Field(default=None, gt=0, description="max gradient norm (off by default)")
    norm: Literal["auto", "frozen_bn", "bn"] = Field(default="auto", description="backbone norm: auto = frozen BN "
                                                     "for pretrained weights, BN for weights=none")
    trainable_layers: int | None = Field(default=None, ge=0, le=5, description="trainable ResNet stages from the "
                                         "top (0–5); default 3 for pretrained weights, 5 for weights=none")
    min_area: int = Field(default=4, ge=1, description="instances smaller than this many pixels are dropped")
    roi_batch_size: int = Field(default=128, ge=16, description="RoIs sampled per image for the box/mask heads")
    proposals_train: int = Field(default=500, ge=16, description="RPN proposals kept after NMS per image (train)")
    proposals_test: int = Field(default=300, ge=16, description="RPN proposals kept after NMS per image (eval)")
    detections_per_image: int = Field(default=20, ge=1, le=100, description="kept detections per image (COCO "
                                      "scores up to 100; lesions are few, and each costs a mask-head pass)")
    eval_every: int = Field(default=1, ge=1, description="epochs between val evaluations")
    patience: int | None = Field(default=None, ge=1, description="stop after this many val evaluations without "
                                                                 "a better box AP (off by default)")
    val_limit: int | None = Field(default=None, ge=1, description="evaluate on the first N val images only")
    train_limit: int | None = Field(default=None, ge=1, description="train on the first N train images with masks")
    test_limit: int | None = Field(default=None, ge=1, description="quick runs: test on the first N test images "
                                                                   "only (not comparable to full-test numbers)")
    hflip: float = Field(default=0.5, ge=0, le=1, description="horizontal flip probability")
    score_thresh: float = Field(default=0.5, ge=0, le=1, description="examples.png: detections drawn above this")
    examples: int = Field(default=6, ge=0, description="test images in examples.png")
    save_model: bool = Field(default=True, description="write OUT/model.pth (the selected detector's state dict)")
    log_every: int = Field(default=10, ge=1, description="steps between progress updates")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                check_arch(v)
            except MWMError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("lr_steps")
    @classmethod
    def _steps(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s < 1 for s in v) or list(v) != sorted(v):
            raise ValueError(f"lr_steps are increasing fractions in (0, 1); got {v}")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "DetectConfig":
        if self.weights.lower() in ("none", "random", "timm") and self.arch is None:
            self.arch = "resnet18"
        return self

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.02 * self.batch_size / 16 if self.optimizer == "sgd" else 1e-4


# -- targets ----------------------------------------------------------------------------------------------------

def mask_to_instances(mask: np.ndarray, min_area: int = 1) -> dict[str, np.ndarray]:
    """A binary mask (H, W) → instances, one per 8-connected component of at least ``min_area`` pixels.

    Returns ``boxes`` float32 (K, 4) as ``[x0, y0, x1, y1]`` with exclusive x1/y1 (the component's pixel
    extent: a single pixel at (r, c) is ``[c, r, c+1, r+1]``, so every box has positive width, which torchvision
    requires), ``masks`` uint8 (K, H, W) and ``labels`` int64 (K,) of ones; K may be 0 (a negative image).
    Components are ordered by their first pixel in raster order.
    """
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W); got shape {m.shape}")
    lab, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    boxes, masks = [], []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab == i
        if int(comp.sum()) < min_area:
            continue
        ys, xs = sl
        boxes.append([xs.start, ys.start, xs.stop, ys.stop])
        masks.append(comp)
    h, w = m.shape
    return {"boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "masks": np.asarray(masks, dtype=np.uint8).reshape(-1, h, w),
            "labels": np.ones(len(boxes), dtype=np.int64)}


def _targets(masks: np.ndarray, idx: np.ndarray, min_area: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in idx:
        inst = mask_to_instances(masks[i], min_area)
        out.append({k: torch.from_numpy(v) for k, v in inst.items()})
    return out


_hflip = hflip_instances  # image, boxes and masks flipped together (mwm.data.paired)


# -- model ------------------------------------------------------------------------------------------------------

def _norm_layer(spec: BackboneSpec, norm: str):
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    pretrained = spec.state_dict is not None or spec.hub
    if norm == "auto":
        norm = "frozen_bn" if pretrained else "bn"
    return FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d


def resnet_backbone(spec: BackboneSpec, norm_layer=None) -> torch.nn.Module:
    """A torchvision ResNet for ``spec.arch`` holding the spec's weights (timm key names = torchvision's).

    Loading is strict except for ``fc.*`` (the classifier the encoder export drops); anything else missing or
    unexpected is an :class:`MWMError`. ``weights="timm"`` fetches timm's weights first (online only).
    """
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    name = check_arch(spec.arch)
    model = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer or FrozenBatchNorm2d)
    sd = spec.state_dict
    if sd is None and spec.hub:
        from ..weights import create_backbone

        sd = create_backbone(spec).state_dict()
    if sd is not None:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        bad_missing = [k for k in missing if not k.startswith("fc.")]
        # nn.BatchNorm2d keeps num_batches_tracked; FrozenBatchNorm2d drops it while loading
        bad_unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
        if bad_missing or bad_unexpected:
            raise MWMError(f"{spec.source} does not fit torchvision '{name}': missing {sorted(bad_missing)[:5]}, "
                           f"unexpected {sorted(bad_unexpected)[:5]}; was it exported for a different --arch?")
    return model


def build_model(spec: BackboneSpec, size: int, num_classes: int = 2, trainable_layers: int | None = None,
                norm: str = "auto", roi_batch_size: int = 128, detections_per_image: int = 100,
                proposals_train: int = 500, proposals_test: int = 300) -> torch.nn.Module:
    """torchvision ``MaskRCNN`` on a ResNet-FPN built from ``spec`` for ``size``×``size`` inputs in [0, 1]."""
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm_layer = _norm_layer(spec, norm)
    if trainable_layers is None:
        trainable_layers = 3 if norm_layer is FrozenBatchNorm2d else 5
    body = resnet_backbone(spec, norm_layer)
    backbone = _resnet_fpn_extractor(body, trainable_layers)
    sizes = tuple((max(2, int(round(a * size / 128))),) for a in ANCHORS_AT_128)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * len(sizes))
    model = MaskRCNN(backbone, num_classes=num_classes, min_size=size, max_size=size,
                     image_mean=list(spec.mean), image_std=list(spec.std), rpn_anchor_generator=anchors,
                     rpn_pre_nms_top_n_train=max(1000, proposals_train), rpn_post_nms_top_n_train=proposals_train,
                     rpn_pre_nms_top_n_test=max(600, proposals_test), rpn_post_nms_top_n_test=proposals_test,
                     box_batch_size_per_image=roi_batch_size, box_detections_per_img=detections_per_image)
    _init_predictors(model)
    return model


@torch.no_grad()
def _init_predictors(model) -> None:
    """Detectron2's initialization of the last layers: class scores N(0, 0.01), box deltas and mask logits
    N(0, 0.001), zero biases. torchvision's MaskRCNNPredictor draws the mask logits with Kaiming fan-out over
    2 outputs (std 1), which starts the mask loss near 3 instead of ln 2 and made from-scratch runs diverge."""
    from torch import nn

    box = model.roi_heads.box_predictor
    mask = model.roi_heads.mask_predictor.mask_fcn_logits
    for layer, std in ((box.cls_score, 0.01), (box.bbox_pred, 0.001), (mask, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


# -- metrics ----------------------------------------------------------------------------------------------------

def detection_metrics(preds: list[dict], targets: list[dict]) -> dict[str, float | None]:
    """COCO box and mask AP/AP50/AP75 (fractions; None where undefined, e.g. no ground-truth instance).

    preds: per image ``boxes`` (K, 4) xyxy, ``scores`` (K,), ``labels`` (K,), ``masks`` (K, H, W) bool or
    (K, 1, H, W) probabilities (thresholded at 0.5); targets: ``boxes``, ``labels``, ``masks`` (K, H, W).
    """
    from torchmetrics.detection import MeanAveragePrecision

    try:
        metric = MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools")
    except ModuleNotFoundError as e:  # torchmetrics raises this when the backend is absent
        raise MWMError(f"detection metrics need pycocotools ({e}); pip install pycocotools") from e

    def prep(d: dict, is_pred: bool) -> dict:
        m = d["masks"]
        if m.dim() == 4:
            m = m[:, 0]
        out = {"boxes": d["boxes"].detach().float().cpu(), "labels": d["labels"].detach().long().cpu(),
               "masks": (m > 0.5 if m.is_floating_point() else m.bool()).cpu()}
        if is_pred:
            out["scores"] = d["scores"].detach().float().cpu()
        return out

    metric.update([prep(p, True) for p in preds], [prep(t, False) for t in targets])
    r = metric.compute()
    names = {"box_ap": "bbox_map", "box_ap50": "bbox_map_50", "box_ap75": "bbox_map_75",
             "mask_ap": "segm_map", "mask_ap50": "segm_map_50", "mask_ap75": "segm_map_75"}
    out: dict[str, float | None] = {}
    for k, src in names.items():
        v = float(r[src])
        out[k] = None if v < 0 else v
    return out


# -- training ---------------------------------------------------------------------------------------------------

def _lr_factor(cfg: DetectConfig, step: int, total: int) -> float:
    """Detection's lr multiplier: linear warmup from 0.001 over ``warmup_iters`` (at most a third of the steps),
    then ×0.1 at each ``lr_steps`` fraction (``schedule: step``) or cosine to 0."""
    return lr_factor(step, total, min(cfg.warmup_iters, total // 3), **_schedule_variant(cfg))


def _schedule_variant(cfg: DetectConfig) -> dict:
    return {"warmup_start": 0.001, "decay": cfg.schedule, "milestones": cfg.lr_steps}


@torch.no_grad()
def _predict(model, images: np.ndarray, idx: np.ndarray, batch_size: int, device) -> list[dict]:
    model.eval()
    out = []
    for s in range(0, len(idx), batch_size):
        batch = [torch.from_numpy(images[i]).to(device).float().div_(255) for i in idx[s:s + batch_size]]
        for p in model(batch):
            out.append({"boxes": p["boxes"].cpu(), "labels": p["labels"].cpu(), "scores": p["scores"].cpu(),
                        "masks": (p["masks"][:, 0] > 0.5).cpu()})
    return out


def _examples(images: np.ndarray, idx: np.ndarray, targets: list[dict], preds: list[dict], thresh: float,
              path: Path) -> Path:
    """Rows of (image | ground truth | prediction ≥ thresh): masks tinted, boxes drawn."""
    from ..report.overlays import draw_boxes, gray_rgb, hstack, save_png, tint, upscale

    rows = []
    for i, t, p in zip(idx, targets, preds):
        base = gray_rgb(images[i].transpose(1, 2, 0).astype(np.float32) / 255)
        h, w = base.shape[:2]
        scale = np.array([w, h, w, h], np.float32)
        gt = tint(base, t["masks"].numpy().any(0)) if len(t["masks"]) else base
        gt = draw_boxes(gt, (t["boxes"].numpy() / scale).tolist())
        keep = p["scores"] >= thresh
        pm = p["masks"][keep].numpy()
        pr = tint(base, pm.any(0), color=(40, 120, 255)) if len(pm) else base
        pr = draw_boxes(pr, (p["boxes"][keep].numpy() / scale).tolist(), color=(255, 220, 0))
        rows.append(hstack([upscale(base), upscale(gt), upscale(pr)]))
    width = max(r.shape[1] for r in rows)
    gap = np.full((4, width, 3), 255, np.uint8)
    parts = []
    for r in rows:
        parts += [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))), gap]
    return save_png(np.concatenate(parts[:-1], axis=0), path)


def detect(cfg: DetectConfig, progress=None) -> dict:
    """Train Mask R-CNN on the train images with masks, select on val box AP, report COCO APs on test.

    progress(kind, done, total, info): ``start`` (n_train/n_val/n_test, steps), ``step`` (loss, lr),
    ``epoch`` (loss, val metrics when evaluated), ``test``, ``end``. Returns the metrics (also OUT/metrics.json).
    """
    from ..config import save_config
    from .data import load_labelled

    t0 = time.perf_counter()
    say = progress or (lambda *a: None)
    spec = resolve_weights(cfg.weights, cfg.arch)
    check_arch(spec.arch)
    # Fabric at 32-true on one device: .to(device) and backward() as before (detection runs in fp32); auto picks
    # cuda else cpu (torchvision's detection ops are not all on MPS)
    fabric = device_fabric(cfg.device, "32-true", auto="cuda_or_cpu")
    device = fabric.device
    data = load_labelled(cfg.data, cfg.size, read=cfg.read, resize=cfg.resize, need_labels=False, need_masks=True,
                         seed=cfg.seed)
    tr = data.indices("train", with_masks=True)[:cfg.train_limit]
    va = data.indices("val", with_masks=True)[:cfg.val_limit]
    te = data.indices("test", with_masks=True)[:cfg.test_limit]
    if len(tr) == 0:
        raise DataError(f"{cfg.data}: no train images with a valid mask; detection trains on annotated images")
    if len(te) == 0:
        raise DataError(f"{cfg.data}: no test images with a valid mask to report on")
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out / "config.yaml")

    seed_all(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tr_t = _targets(data.masks, tr, cfg.min_area)
    va_t = _targets(data.masks, va, cfg.min_area)
    te_t = _targets(data.masks, te, cfg.min_area)
    model = build_model(spec, cfg.size, trainable_layers=cfg.trainable_layers, norm=cfg.norm,
                        roi_batch_size=cfg.roi_batch_size, detections_per_image=cfg.detections_per_image,
                        proposals_train=cfg.proposals_train, proposals_test=cfg.proposals_test)
    raw = model
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.peak_lr()
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = build_scheduler(opt, total, min(cfg.warmup_iters, total // 3), **_schedule_variant(cfg))
    model, opt = fabric.setup(raw, opt)
    n_inst = sum(len(t["boxes"]) for t in tr_t)
    say("start", 0, total, {"n_train": len(tr), "n_val": len(va), "n_test": len(te), "instances": n_inst,
                            "steps_per_epoch": steps_per_epoch, "lr": lr, "device": str(device), "arch": spec.arch,
                            "weights": spec.source})

    keep, history, step, diverged = BestOnVal(cfg.patience, device="cpu"), [], 0, None
    epoch_seconds = []
    for epoch in range(1, cfg.epochs + 1):
        te0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        order = rng.permutation(len(tr))
        for s in range(0, len(tr), cfg.batch_size):
            ids = order[s:s + cfg.batch_size]
            imgs, tgts = [], []
            for j in ids:
                img = torch.from_numpy(data.images[tr[j]]).float().div_(255)
                tgt = tr_t[j]
                if rng.random() < cfg.hflip:
                    img, tgt = _hflip(img, tgt)
                imgs.append(img.to(device))
                tgts.append({k: v.to(device) for k, v in tgt.items()})
            losses = model(imgs, tgts)
            loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            sched.step()
            step += 1
            loss_sum += loss.detach()
            if step % cfg.log_every == 0 or s + cfg.batch_size >= len(tr):
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    msg = (f"the loss became {lv} at step {step} (epoch {epoch}); lower --lr (now {lr:g}) or "
                           "--set clip_grad=5")
                    if keep.state is None:
                        raise MWMError(msg)
                    warnings.warn(f"{msg}; stopping and keeping the best epoch so far ({keep.best_epoch})",
                                  stacklevel=2)
                    diverged = step
                    break
                say("step", step, total, {"loss": lv, "lr": opt.param_groups[0]["lr"], "epoch": epoch,
                                          **{k: float(v.detach()) for k, v in losses.items()}})
        if diverged:
            break
        row = {"epoch": epoch, "loss": float(loss_sum) / steps_per_epoch, "lr": opt.param_groups[0]["lr"],
               "train_seconds": time.perf_counter() - te0}
        epoch_seconds.append(row["train_seconds"])
        stop = False
        if len(va) and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            vm = detection_metrics(_predict(model, data.images, va, cfg.batch_size, device), va_t)
            row.update({f"val_{k}": v for k, v in vm.items()})
            keep.update(vm["box_ap"] if vm["box_ap"] is not None else -1.0, epoch, raw)
            stop = keep.should_stop
        row["seconds"] = time.perf_counter() - te0
        history.append(row)
        say("epoch", epoch, cfg.epochs, row)
        if stop:
            break
    epochs_done = epoch - 1 if diverged else epoch
    # no val images with masks: nothing was selected and the last epoch is the model
    best_epoch = keep.best_epoch if keep.restore(raw) else epochs_done

    preds = _predict(model, data.images, te, cfg.batch_size, device)
    metrics = detection_metrics(preds, te_t)
    say("test", len(te), len(te), metrics)
    ex = min(cfg.examples, len(te))
    if ex:
        _examples(data.images, te[:ex], te_t[:ex], preds[:ex], cfg.score_thresh, cfg.out / "examples.png")
    if cfg.save_model:
        from ..io import atomic_path

        with atomic_path(cfg.out / "model.pth", suffix=".pth") as tmp:
            torch.save({k: v.detach().cpu() for k, v in raw.state_dict().items()}, tmp)
    summary = {**metrics, "n_train": len(tr), "n_val": len(va), "n_test": len(te),
               "test_instances": sum(len(t["boxes"]) for t in te_t), "train_instances": n_inst,
               "best_epoch": best_epoch, "best_val_box_ap": keep.best if keep.state is not None and len(va) else None,
               "epochs_done": epochs_done, "diverged_at_step": diverged,
               "seconds_per_epoch": float(np.mean(epoch_seconds)),
               "seconds": time.perf_counter() - t0, "arch": spec.arch, "weights": spec.source,
               "norm": "frozen_bn" if _norm_layer(spec, cfg.norm).__name__ == "FrozenBatchNorm2d" else "bn",
               "device": str(device), "size": cfg.size, "out": str(cfg.out), "history": history}
    TaskMetrics.model_validate(summary).save(cfg.out / "metrics.json")
    say("end", epochs_done, cfg.epochs, summary)
    return summary
