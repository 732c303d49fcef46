"""`mwm finetune`: classification transfer of an encoder — a linear probe or full fine-tuning.

>>> from mwm.transfer.classify import FinetuneConfig, finetune
>>> cfg = FinetuneConfig(data="br35h.npz", out="ft/", weights="run/encoder.pth", mode="linear")
>>> m = finetune(cfg)     # {"accuracy": …, "balanced_accuracy": …, "macro_f1": …, "auroc": …, …}

Protocol: the model is selected on ``val`` (early stopping, best-on-val state restored) and reported once on
``test``. Inputs are the decoded uint8 images ``/ 255``, normalized with the mean/std pretraining used
(``encoder.json``), so the encoder sees what it was trained on.

``linear``: the encoder is frozen (eval mode: BatchNorm statistics as loaded, or with ``bn_stats: recompute``
replaced by their average over the train images — a fairer random-init baseline); its global-pooled features are
extracted once for train/val/test and cached in ``OUT/features.npz`` (reused while the weights file, the data
file, the size and the read options are unchanged — compared by path, size and modification time). The head is
a multinomial logistic regression in torch on features standardized with the train statistics, from zero
initialisation, trained full-batch by L-BFGS (strong-Wolfe line search) with an L2 penalty ``weight_decay / 2 ·
‖W‖²``, one iteration per "epoch" and early stopping on val. Why torch and not sklearn's ``LogisticRegression``
with a C sweep: the head then shares the loss (label smoothing, balanced class weights), the selection rule (val
macro-F1, ties broken by val loss), the device and the history format with full fine-tuning, and the early-stopped
L-BFGS path from zero plays the role of the C sweep (small-norm iterates first) without a second solver. Why
L-BFGS and not Adam: the problem is convex and full-batch, so a quasi-Newton method converges in tens of
iterations without a learning rate to tune; full-batch Adam on a few hundred standardized features oscillates for
hundreds of steps (measured on br35h), which noisy val early stopping then mistakes for convergence.
``epochs`` is then the number of L-BFGS iterations and ``lr`` its step length (1 with the line search).

``probe: sweep`` (the default since issue 11) is the standard linear-probe protocol instead (CLIP's evaluation,
Radford et al. 2021 §3.2: L-BFGS logistic regression with the L2 strength chosen on val): the head is trained to
convergence (up to ``epochs`` L-BFGS iterations) at each penalty of ``probe_grid``, from the strongest down,
warm-started from the previous solution, and the penalty with the best val score is kept. Measured on Br35H
pilot encoders, the early-stopped path (``probe: path``) gave 81.4 / 85.0 test accuracy for two pretraining
seeds of one arm, the sweep 84.6 / 84.6: stopping at a noisy val maximum along one path adds spread that
the converged, regularised fits do not have. One history row per penalty (``epoch`` = its index, from 1).

``full``: the timm model with a ``num_classes`` head, AdamW with layer-wise lr decay (timm's
``create_optimizer_v2(layer_decay=…)``: the head at ``lr``, each earlier block × ``layer_decay``), linear warmup
then cosine per step, label smoothing, optional balanced class weights ``n / (k · n_c)``, light batched
augmentation on the device (random resized crop of scale (0.8, 1) and a horizontal flip), on Lightning Fabric.

Both modes write ``OUT/model.pth``: a timm ``state_dict`` of ``timm.create_model(arch, num_classes=k,
**timm_kwargs)`` (for the linear probe the standardization is folded into the classifier, so the saved model
predicts exactly what the probe did), with ``OUT/model.json`` saying how to load and feed it; plus
``OUT/metrics.json``, ``OUT/history.csv`` (one row per epoch/step) and ``OUT/config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ..engine import Precision, build_scheduler, device_fabric, seed_all
from ..errors import DataError, MWMError
from .config import TransferConfig
from .results import TaskMetrics
from .selection import BestOnVal

__all__ = ["FinetuneConfig", "finetune", "MODE_DEFAULTS", "METRIC_KEYS", "extract_features", "classification_metrics",
           "stratified_subset"]

# Hyper-parameters left unset take the mode's value (the resolved values are what OUT/config.yaml records).
MODE_DEFAULTS: dict[str, dict] = {
    "linear": {"epochs": 300, "lr": 1.0, "weight_decay": 1e-4, "label_smoothing": 0.0, "patience": 50},
    "full": {"epochs": 30, "lr": 1e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "patience": 8},
}

METRIC_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "confusion_matrix", "val", "best_epoch",
               "n_train", "n_val", "n_test", "seconds", "mode", "weights")

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "lr")


class FinetuneConfig(TransferConfig):
    """Classification transfer: ``mode`` linear (frozen encoder, linear head on cached features) or full
    (everything trained). Unset ``epochs``/``lr``/``weight_decay``/``label_smoothing``/``patience`` take the
    mode's defaults (:data:`MODE_DEFAULTS`). Shared options: :class:`~mwm.transfer.config.TransferConfig`."""

    train_limit: int | None = Field(default=None, ge=1, description="only N training images, a seeded class-"
                                                                   "stratified subset (label-efficiency runs); "
                                                                   "val/test stay whole")
    mode: Literal["linear", "full"] = "linear"
    epochs: int | None = Field(default=None, ge=1, description="full: passes over train; linear: L-BFGS "
                                                              "iterations")
    lr: float | None = Field(default=None, gt=0, description="full: peak lr (the head's; earlier blocks get "
                                                            "lr × layer_decay^depth); linear: L-BFGS step length")
    weight_decay: float | None = Field(default=None, ge=0, description="full: AdamW's, not on biases/norms; "
                                                                      "linear: L2 penalty wd/2 · ‖W‖²")
    layer_decay: float = Field(default=0.75, gt=0, le=1, description="full: lr ratio per block towards the "
                                                                    "input (1: off)")
    warmup: float = Field(default=0.1, ge=0, lt=1, description="full: fraction of the steps in linear warmup "
                                                              "(then cosine to 0)")
    label_smoothing: float | None = Field(default=None, ge=0, lt=1)
    class_weights: Literal["none", "balanced"] = Field(default="none", description="balanced: w_c = n / (k · n_c) "
                                                                                   "from the train labels")
    augment: bool = Field(default=True, description="full: random resized crop (crop_scale) + horizontal flip")
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: float = Field(default=0.5, ge=0, le=1, description="probability of a horizontal flip (full)")
    monitor: Literal["macro_f1", "loss"] = Field(default="macro_f1", description="val selection: macro-F1 (ties "
                                                                                 "→ lower loss) or loss")
    probe: Literal["sweep", "path"] = Field(default="sweep", description="linear: 'sweep' = converged fits over "
                                            "probe_grid's L2 strengths, the best on val; 'path' = one L-BFGS "
                                            "path from zero at weight_decay, early-stopped on val")
    probe_grid: list[float] = Field(default_factory=lambda: [10.0 ** (e / 2) for e in range(2, -11, -1)],
                                    min_length=1, description="linear sweep: L2 strengths (wd/2 · ‖W‖² on the "
                                    "mean loss), tried from the largest; default 10 … 1e-5 in half decades")
    bn_stats: Literal["as_loaded", "recompute"] = Field(default="as_loaded", description="linear: the frozen "
                                                        "encoder's BatchNorm statistics as loaded, or recomputed "
                                                        "on the train images before features are extracted (no "
                                                        "weight changes; random init's untouched statistics, mean "
                                                        "0 / variance 1, mis-scale every layer)")
    precision: Precision = "32-true"

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (0 < v[0] <= v[1] <= 1):
            raise ValueError(f"need 0 < low <= high <= 1 (fractions of the image area), got {v}")
        return v

    @model_validator(mode="after")
    def _mode_defaults(self) -> "FinetuneConfig":
        if self.bn_stats == "recompute" and self.mode != "linear":
            raise ValueError("bn_stats recompute is for the frozen encoder of mode linear (full fine-tuning "
                             "trains the statistics anyway)")
        for k, v in MODE_DEFAULTS[self.mode].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        return self


# -- helpers -----------------------------------------------------------------------------------------------------

def _stat(path: Path) -> list:
    """Path, size and mtime of a file, or of every file under a folder (a cheap change detector)."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return [str(path.resolve()), h.hexdigest()]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _features_key(cfg: FinetuneConfig, spec) -> str:
    """Everything the cached features depend on, as a JSON string."""
    if spec.state_dict is not None:
        src = Path(spec.source)
        w = [_stat(src)] + ([_stat(src.with_name("encoder.json"))] if src.with_name("encoder.json").is_file() else [])
    else:
        w = [spec.source, cfg.seed]  # random init depends on the seed; hub weights on the arch
    key = {"version": 1, "weights": w, "arch": spec.arch, "timm_kwargs": spec.kwargs, "mean": list(spec.mean),
           "std": list(spec.std), "data": _stat(cfg.data), "size": cfg.size, "resize": cfg.resize,
           "read": cfg.read.model_dump(mode="json"), "train_limit": cfg.train_limit, "seed": cfg.seed,
           "precision": cfg.precision}
    if cfg.bn_stats != "as_loaded":
        key["bn_stats"] = cfg.bn_stats
    return json.dumps(key, sort_keys=True)


def _to_input(u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255.0 - mean) / std


def _batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield slice(i, min(n, i + batch))


def extract_features(model, images: torch.Tensor, fabric, mean, std, batch_size: int, progress=None,
                     split: str = "") -> torch.Tensor:
    """Global-pooled features (N, D) float32 on the CPU of uint8 ``images`` (N, 3, S, S): the frozen model in
    eval mode under ``no_grad`` (``forward_head(…, pre_logits=True)``: what a timm ``num_classes=0`` model
    returns), in batches."""
    model.eval()
    out = []
    with torch.no_grad():
        for i, sl in enumerate(_batches(len(images), batch_size)):
            x = _to_input(images[sl].to(fabric.device, non_blocking=True), mean, std)
            with fabric.autocast():
                f = model.forward_head(model.forward_features(x), pre_logits=True)
            out.append(f.float().flatten(1).cpu())
            if progress is not None:
                progress(split, i + 1)
    return torch.cat(out) if out else torch.zeros(0, 0)


def recompute_bn_stats(model, images: torch.Tensor, fabric, mean, std, batch_size: int) -> None:
    """Replace every BatchNorm's running statistics by the plain average over ``images`` (N, 3, S, S uint8):
    :func:`torch.optim.swa_utils.update_bn` (reset, momentum None, train-mode passes) under ``no_grad``, in the
    fixed image order; weights untouched, the model left in eval mode."""
    from torch.optim.swa_utils import update_bn

    inputs = (_to_input(images[sl].to(fabric.device, non_blocking=True), mean, std)
              for sl in _batches(len(images), batch_size))
    with torch.no_grad():
        update_bn(inputs, model)
    model.eval()


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """accuracy, balanced_accuracy (macro recall), macro_f1, auroc (one-vs-rest macro; the usual AUROC for two
    classes), confusion_matrix (rows: true, columns: predicted) and loss (plain cross-entropy) of ``logits``."""
    from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_auroc,
                                                        multiclass_confusion_matrix, multiclass_f1_score,
                                                        multiclass_recall)

    logits = logits.float()
    target = target.long()
    probs = logits.softmax(-1)
    k = num_classes
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(No positive samples|No negative samples).*")
        vals = {
            "accuracy": multiclass_accuracy(probs, target, k, average="micro"),
            "balanced_accuracy": multiclass_recall(probs, target, k, average="macro"),
            "macro_f1": multiclass_f1_score(probs, target, k, average="macro"),
            "auroc": multiclass_auroc(probs, target, k, average="macro"),
            "loss": F.cross_entropy(logits, target),
        }
    out = {key: float(v) for key, v in vals.items()}
    out["confusion_matrix"] = multiclass_confusion_matrix(probs, target, k).cpu().tolist()
    return out


def _val_scores(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """The per-epoch selection numbers (loss, accuracy, macro_f1): cheaper than :func:`classification_metrics`."""
    from torchmetrics.functional.classification import multiclass_f1_score

    logits = logits.float()
    pred = logits.argmax(-1)
    vals = torch.stack([F.cross_entropy(logits, target), (pred == target).float().mean(),
                        multiclass_f1_score(pred, target, num_classes, average="macro")]).tolist()  # one sync
    return {"loss": vals[0], "accuracy": vals[1], "macro_f1": vals[2]}


def _score(m: dict, monitor: str) -> tuple:
    return (m["macro_f1"], -m["loss"]) if monitor == "macro_f1" else (-m["loss"],)


def _class_weight(y: torch.Tensor, k: int, mode: str, device) -> torch.Tensor | None:
    if mode != "balanced":
        return None
    counts = torch.bincount(y.cpu(), minlength=k).double()
    w = torch.where(counts > 0, len(y) / (k * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float().to(device)


def _augment(x: torch.Tensor, scale: tuple[float, float], hflip: float, g: torch.Generator) -> torch.Tensor:
    """Batched random resized crop (area fraction in ``scale``, aspect in (3/4, 4/3), inside the image) and
    horizontal flip of float images (B, C, H, W): :func:`mwm.data.paired.paired_crop_flip` without a mask."""
    from ..data.paired import paired_crop_flip

    return paired_crop_flip(x, generator=g, scale=scale, ratio=(3 / 4, 4 / 3), hflip=hflip)[0]


def _write_history(path: Path, rows: list[dict]) -> None:
    from ..io import atomic_write_text

    cols = HISTORY_COLUMNS + (("weight_decay",) if any("weight_decay" in r for r in rows) else ())  # probe sweep
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else f"{r[c]:.8g}" if isinstance(r[c], float) else str(r[c])
                              for c in cols))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _save_model(model, out: Path, spec, cfg: FinetuneConfig, label_names: list[str]) -> Path:
    from ..io import atomic_path, atomic_write_text

    path = out / "model.pth"
    with atomic_path(path, suffix=".pth") as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    meta = {"arch": spec.arch, "num_classes": len(label_names), "label_names": label_names,
            "timm_kwargs": spec.kwargs, "size": cfg.size, "resize": cfg.resize, "mode": cfg.mode,
            "normalize": {"mean": list(spec.mean), "std": list(spec.std)}, "input": "uint8 / 255, then (x - mean) / std",
            "load": f"timm.create_model({spec.arch!r}, num_classes={len(label_names)}, **timm_kwargs)"
                    ".load_state_dict(torch.load('model.pth'))"}
    atomic_write_text(out / "model.json", json.dumps(meta, indent=2) + "\n")
    return path


def _build(spec, num_classes: int):
    """The timm model with a ``num_classes`` head and the spec's weights (a mismatch is an :class:`MWMError`)."""
    from ..weights import create_backbone

    return create_backbone(spec, num_classes=num_classes)


# -- the data -----------------------------------------------------------------------------------------------------

class _Split:
    """One split's uint8 images (CPU tensor) and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.x = torch.from_numpy(np.ascontiguousarray(images))
        self.y = torch.from_numpy(labels.astype(np.int64))


def _load(cfg: FinetuneConfig, progress) -> tuple[dict[str, _Split], list[str]]:
    from .data import load_labelled

    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("decode", done[0], None, {})

    # train_limit is applied here as a seeded class-stratified subset: "the first N" of a class-sorted file
    # (br35h is) would hold a single class
    d = load_labelled(cfg.data, cfg.size, read=cfg.read, resize=cfg.resize, seed=cfg.seed, progress=tick)
    if d.num_classes < 2:
        raise DataError(f"{cfg.data}: {d.num_classes} class(es) ({d.label_names}); classification needs two or more")
    splits = {}
    for s in ("train", "val", "test"):
        idx = d.indices(s)
        idx = idx[d.labels[idx] >= 0]
        if len(idx) == 0:
            raise DataError(f"{cfg.data}: no labelled '{s}' images; finetune selects on val and reports on test")
        if s == "train" and cfg.train_limit is not None:
            idx = stratified_subset(d.labels[idx], cfg.train_limit, cfg.seed, idx)
        splits[s] = _Split(d.images[idx], d.labels[idx])
    present = np.unique(splits["train"].y.numpy())
    if len(present) < 2:
        raise DataError(f"{cfg.data}: the train split holds only class {d.label_names[int(present[0])]!r}"
                        + (f" (with train_limit {cfg.train_limit})" if cfg.train_limit else "")
                        + "; a classifier needs two or more classes to train on")
    return splits, list(d.label_names)


def stratified_subset(labels: np.ndarray, n: int, seed: int, idx: np.ndarray | None = None) -> np.ndarray:
    """``n`` of ``idx`` (default: all positions), drawn per class in proportion to the class sizes (largest
    remainders; at least one of every class when ``n`` allows), seeded; returned in their original order."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if idx is None else np.asarray(idx)
    if n >= len(labels):
        return idx
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    if n >= len(classes):
        quota = np.maximum(quota, 1)
    while quota.sum() > n:  # the at-least-one rule overshot: take back from the largest quotas
        quota[np.argmax(quota)] -= 1
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):
        if quota.sum() >= n:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)])
    return idx[np.sort(keep)]


# -- entry point ----------------------------------------------------------------------------------------------------

def finetune(cfg: FinetuneConfig, progress=None) -> dict:
    """Train on train, select on val, report on test; returns the metrics (also OUT/metrics.json).

    progress(kind, done, total, info), kinds: ``decode`` (images), ``extract`` (batches; info: split),
    ``start`` (info: n_train/n_val/n_test, mode, epochs), ``epoch`` (info: the history row and best_epoch),
    ``end``.
    """
    from ..config import save_config
    from ..weights import resolve_weights

    t0 = time.perf_counter()
    if not Path(cfg.data).exists():
        raise DataError(f"{cfg.data}: no such file or folder")
    spec = resolve_weights(cfg.weights, cfg.arch)
    size = cfg.size or spec.size or 64
    vit_size = spec.kwargs.get("img_size")
    if vit_size is not None and int(vit_size if not isinstance(vit_size, (list, tuple)) else vit_size[0]) != size:
        raise MWMError(f"{spec.source} is a '{spec.arch}' pretrained at img_size {vit_size} (its position "
                       f"embeddings are that size); pass --size {vit_size}")
    cfg = cfg.model_copy(update={"size": size, "arch": spec.arch})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")

    emit = progress or (lambda *a: None)
    fabric = device_fabric(cfg.device, cfg.precision)
    device = fabric.device
    mean, std = spec.normalizer(device)

    features_status = None
    if cfg.mode == "linear":
        cache = out / "features.npz"
        key = _features_key(cfg, spec)
        # recomputed BatchNorm statistics live in the model it saves, not in the cache: extract again then
        feats = _read_cache(cache, key) if cfg.bn_stats == "as_loaded" else None
        if feats is not None:
            label_names = feats.pop("label_names")
            features_status = "cached"
        else:
            data, label_names = _load(cfg, progress)
        k = len(label_names)
        seed_all(cfg.seed)
        model = _build(spec, k)
        if feats is None:
            model = model.to(device)
            if cfg.bn_stats == "recompute":
                recompute_bn_stats(model, data["train"].x, fabric, mean, std, cfg.batch_size)
            feats = {}
            for s in ("train", "val", "test"):
                total = math.ceil(len(data[s].y) / cfg.batch_size)
                feats[s] = (extract_features(model, data[s].x, fabric, mean, std, cfg.batch_size,
                                             progress=lambda sp, i, t=total: emit("extract", i, t, {"split": sp}),
                                             split=s), data[s].y)
            _write_cache(cache, key, feats, label_names)
            features_status = "extracted"
            model = model.cpu()
        result = _linear(cfg, feats, k, fabric, emit)
        _fold_head(model, result.pop("head"), result.pop("feat_mean"), result.pop("feat_std"))
        n = {s: len(feats[s][1]) for s in ("train", "val", "test")}
    else:
        data, label_names = _load(cfg, progress)
        k = len(label_names)
        seed_all(cfg.seed)
        model = _build(spec, k)
        result = _full(cfg, model, data, k, fabric, mean, std, emit)
        n = {s: len(data[s].y) for s in ("train", "val", "test")}

    _write_history(out / "history.csv", result.pop("history"))
    model_path = _save_model(model.cpu(), out, spec, cfg, label_names)
    test, val = result["test"], result["val"]
    metrics = {
        "accuracy": test["accuracy"], "balanced_accuracy": test["balanced_accuracy"], "macro_f1": test["macro_f1"],
        "auroc": test["auroc"], "confusion_matrix": test["confusion_matrix"],
        "val": {kk: val[kk] for kk in ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "loss")},
        "best_epoch": result["best_epoch"], "n_train": n["train"], "n_val": n["val"], "n_test": n["test"],
        "seconds": time.perf_counter() - t0, "mode": cfg.mode, "weights": spec.source,
        "arch": spec.arch, "size": cfg.size, "label_names": label_names, "epochs_run": result["epochs_run"],
        "features": features_status, "model": str(model_path),
        **({"probe": cfg.probe, "probe_weight_decay": result["weight_decay"]}
           if cfg.mode == "linear" and cfg.probe == "sweep" else {}),
    }
    TaskMetrics.model_validate(metrics).save(out / "metrics.json")
    (out / "checkpoint.pt").unlink(missing_ok=True)  # full fine-tuning's resume state, no longer needed
    emit("end", result["epochs_run"], cfg.epochs, metrics)
    return metrics


# -- linear probe ---------------------------------------------------------------------------------------------------

def _read_cache(path: Path, key: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            out: dict = {s: (torch.from_numpy(z[f"{s}_x"]), torch.from_numpy(z[f"{s}_y"]))
                         for s in ("train", "val", "test")}
            out["label_names"] = [str(s) for s in z["label_names"]]
            return out
    except Exception:  # a damaged or old-format cache is simply rebuilt
        return None


def _write_cache(path: Path, key: str, feats: dict, label_names: list[str]) -> None:
    from ..io import atomic_path

    arrays = {"key": np.array(key), "label_names": np.array(label_names, dtype=str)}
    for s in ("train", "val", "test"):
        arrays[f"{s}_x"] = feats[s][0].numpy().astype(np.float32)
        arrays[f"{s}_y"] = feats[s][1].numpy().astype(np.int64)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _probe_inputs(feats: dict, k: int, device) -> tuple[dict, dict, torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """Features standardized with the train statistics (x, y per split), those statistics (mu, sd) and a
    zero-initialised linear head on ``device``."""
    raw = feats["train"][0].to(device)
    mu = raw.mean(0)
    sd = raw.std(0, unbiased=False).clamp(min=1e-6)
    x = {s: ((feats[s][0].to(device) - mu) / sd) for s in ("train", "val", "test")}
    y = {s: feats[s][1].to(device) for s in ("train", "val", "test")}
    head = torch.nn.Linear(raw.shape[1], k).to(device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return x, y, mu, sd, head


def _linear(cfg: FinetuneConfig, feats: dict, k: int, fabric, emit) -> dict:
    """The linear probe on cached features: :func:`_probe_sweep` or the early-stopped L-BFGS path."""
    if cfg.probe == "sweep":
        return _probe_sweep(cfg, feats, k, fabric, emit)
    x, y, mu, sd, head = _probe_inputs(feats, k, fabric.device)
    xtr, ytr = x["train"], y["train"]
    # one L-BFGS iteration (with its strong-Wolfe line search) per "epoch", so early stopping sees every iterate
    opt = torch.optim.LBFGS(head.parameters(), lr=cfg.lr, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    w = _class_weight(ytr, k, cfg.class_weights, fabric.device)
    emit("start", 0, cfg.epochs, {"mode": "linear", "n_train": len(ytr), "n_val": len(y["val"]),
                                  "n_test": len(y["test"]), "epochs": cfg.epochs, "dim": xtr.shape[1]})
    keep = BestOnVal(cfg.patience)
    history = []
    epoch = 0
    data_loss: list[torch.Tensor] = []

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(x["train"]), y["train"], weight=w, label_smoothing=cfg.label_smoothing)
        data_loss.append(loss.detach())
        total = loss + 0.5 * cfg.weight_decay * head.weight.pow(2).sum()
        total.backward()
        return total

    for epoch in range(1, cfg.epochs + 1):
        head.train()
        data_loss.clear()
        opt.step(closure)
        loss = data_loss[0]  # at the iterate the step started from, as a training epoch's mean loss would be
        with torch.no_grad():
            vm = _val_scores(head(x["val"]), y["val"], k)
        row = {"epoch": epoch, "train_loss": float(loss.detach()), "val_loss": vm["loss"],
               "val_accuracy": vm["accuracy"], "val_macro_f1": vm["macro_f1"], "lr": cfg.lr}
        history.append(row)
        keep.update(_score(vm, cfg.monitor), epoch, head)
        emit("epoch", epoch, cfg.epochs, {**row, "best_epoch": keep.best_epoch})
        if keep.should_stop:
            break
    keep.restore(head)
    head.eval()
    with torch.no_grad():
        val = classification_metrics(head(x["val"]), y["val"], k)
        test = classification_metrics(head(x["test"]), y["test"], k)
    return {"val": val, "test": test, "best_epoch": keep.best_epoch, "epochs_run": epoch, "history": history,
            "head": head.cpu(), "feat_mean": mu.cpu(), "feat_std": sd.cpu()}


def _probe_sweep(cfg: FinetuneConfig, feats: dict, k: int, fabric, emit) -> dict:
    """Converged L2-regularised logistic regression at every strength of ``cfg.probe_grid`` (largest first, each
    warm-started from the previous solution); the strength with the best val score (``cfg.monitor``) is kept.

    Returns the same dict as the path probe; ``best_epoch`` is the chosen strength's index (from 1) and
    ``weight_decay`` the strength itself.
    """
    x, y, mu, sd, head = _probe_inputs(feats, k, fabric.device)
    xtr, ytr = x["train"], y["train"]
    w = _class_weight(ytr, k, cfg.class_weights, fabric.device)
    grid = sorted(cfg.probe_grid, reverse=True)
    emit("start", 0, len(grid), {"mode": "linear", "n_train": len(ytr), "n_val": len(y["val"]),
                                 "n_test": len(y["test"]), "epochs": len(grid), "dim": xtr.shape[1]})
    keep, history = BestOnVal(None), []
    for i, wd in enumerate(grid, 1):
        opt = torch.optim.LBFGS(head.parameters(), lr=cfg.lr, max_iter=cfg.epochs, history_size=20,
                                tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(head(x["train"]), y["train"], weight=w, label_smoothing=cfg.label_smoothing)
            (loss + 0.5 * wd * head.weight.pow(2).sum()).backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            train_loss = F.cross_entropy(head(x["train"]), y["train"], weight=w).item()
            vm = _val_scores(head(x["val"]), y["val"], k)
        row = {"epoch": i, "train_loss": train_loss, "val_loss": vm["loss"], "val_accuracy": vm["accuracy"],
               "val_macro_f1": vm["macro_f1"], "lr": cfg.lr, "weight_decay": wd}
        history.append(row)
        keep.update(_score(vm, cfg.monitor), i, head)
        emit("epoch", i, len(grid), {**row, "best_epoch": keep.best_epoch})
    keep.restore(head)
    head.eval()
    with torch.no_grad():
        val = classification_metrics(head(x["val"]), y["val"], k)
        test = classification_metrics(head(x["test"]), y["test"], k)
    return {"val": val, "test": test, "best_epoch": keep.best_epoch, "epochs_run": len(grid), "history": history,
            "head": head.cpu(), "feat_mean": mu.cpu(), "feat_std": sd.cpu(),
            "weight_decay": grid[keep.best_epoch - 1]}


def _fold_head(model, head: torch.nn.Linear, mu: torch.Tensor, sd: torch.Tensor) -> None:
    """Put ``head((f − mu) / sd)`` into the timm model's classifier: W' = W / sd, b' = b − W' · mu."""
    fc = model.get_classifier()
    if not isinstance(fc, torch.nn.Linear) or fc.weight.shape != head.weight.shape:
        raise MWMError(f"cannot fold the linear probe into {type(model).__name__}'s classifier ({fc})")
    with torch.no_grad():
        wt = head.weight / sd
        fc.weight.copy_(wt)
        fc.bias.copy_(head.bias - wt @ mu)


# -- full fine-tuning -----------------------------------------------------------------------------------------------

def _predict(model, split: _Split, fabric, mean, std, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for sl in _batches(len(split.y), batch_size):
            x = _to_input(split.x[sl].to(fabric.device, non_blocking=True), mean, std)
            with fabric.autocast():
                out.append(model(x).float())
    return torch.cat(out)


_RESUME_IGNORED = ("out", "device")  # settings a resumed fine-tuning may change: they cannot change its results


def _resume_key(cfg: FinetuneConfig) -> dict:
    return cfg.model_dump(mode="json", exclude=set(_RESUME_IGNORED))


def _save_full_state(path: Path, cfg: FinetuneConfig, epoch: int, raw, opt, sched, gens, keep: BestOnVal,
                     history: list[dict], fabric) -> None:
    """Everything a killed full fine-tuning needs to continue after ``epoch`` exactly as if uninterrupted (written
    atomically; removed when the run finishes)."""
    from ..io import atomic_path

    state = {"config": _resume_key(cfg), "epoch": epoch, "model": raw.state_dict(), "opt": opt.state_dict(),
             "sched": sched.state_dict(), "gens": [g.get_state() for g in gens], "history": history,
             "keep": {"best": keep.best, "best_epoch": keep.best_epoch, "bad": keep.bad, "state": keep.state},
             "precision": fabric.strategy.precision.state_dict()}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load_full_state(path: Path, cfg: FinetuneConfig, raw, opt, sched, gens, keep: BestOnVal, fabric
                     ) -> tuple[int, list[dict]]:
    """Restore a checkpoint of this configuration: (epochs done, history); (0, []) when there is none. A
    checkpoint of other settings is an error naming them (delete it, or the folder, to start over)."""
    if not path.is_file():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    now = _resume_key(cfg)
    diff = sorted(k for k in now.keys() | state["config"].keys() if now.get(k) != state["config"].get(k))
    if diff:
        raise MWMError(f"{path} is a fine-tuning run with other settings ({', '.join(diff)}); use another --out, "
                       f"or delete {path} to start this one over")
    raw.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    for g, st in zip(gens, state["gens"]):
        g.set_state(st)
    keep.best, keep.best_epoch, keep.bad, keep.state = (state["keep"][k] for k in ("best", "best_epoch", "bad",
                                                                                  "state"))
    fabric.strategy.precision.load_state_dict(state.get("precision") or {})
    return state["epoch"], state["history"]


def _full(cfg: FinetuneConfig, raw, data: dict[str, _Split], k: int, fabric, mean, std, emit) -> dict:
    from timm.optim import create_optimizer_v2

    device = fabric.device
    tr = data["train"]
    n = len(tr.y)
    bs = min(cfg.batch_size, n)
    # drop the last partial batch (BatchNorm cannot train on one image; a runt batch also skews the step size)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * cfg.epochs
    opt = create_optimizer_v2(raw, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                              layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None)
    for g in opt.param_groups:  # timm's own schedulers apply lr_scale; ours is a plain LambdaLR
        g["lr"] = cfg.lr * g.get("lr_scale", 1.0)
    sched = build_scheduler(opt, total, int(round(cfg.warmup * total)))
    model, opt = fabric.setup(raw, opt)
    w = _class_weight(tr.y, k, cfg.class_weights, device)
    y_val = data["val"].y.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    emit("start", 0, cfg.epochs, {"mode": "full", "n_train": n, "n_val": len(y_val), "n_test": len(data["test"].y),
                                  "epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch})
    keep = BestOnVal(cfg.patience)
    ckpt = Path(cfg.out) / "checkpoint.pt"  # one per epoch: a killed run continues where it stopped
    done, history = _load_full_state(ckpt, cfg, raw, opt, sched, (gen, aug_gen), keep, fabric)
    epoch = done
    last = done if keep.should_stop else cfg.epochs  # resumed after the epoch that stopped it: nothing left to run
    for epoch in range(done + 1, last + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        run_loss = torch.zeros((), device=device)
        lr_used = sched.get_last_lr()[-1]
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            x = tr.x[idx].to(device, non_blocking=True).float() / 255.0
            yb = tr.y[idx].to(device, non_blocking=True)
            if cfg.augment:
                x = _augment(x, cfg.crop_scale, cfg.hflip, aug_gen)
            x = (x - mean) / std
            logits = model(x)
            loss = F.cross_entropy(logits.float(), yb, weight=w, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            fabric.backward(loss)
            opt.step()
            sched.step()
            run_loss += loss.detach()
        vm = _val_scores(_predict(model, data["val"], fabric, mean, std, cfg.batch_size), y_val, k)
        train_loss = float(run_loss) / steps_per_epoch  # one host sync per epoch
        if not math.isfinite(train_loss):
            raise MWMError(f"the loss became {train_loss} in epoch {epoch}; lower --lr or use --precision 32-true")
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": vm["loss"], "val_accuracy": vm["accuracy"],
               "val_macro_f1": vm["macro_f1"], "lr": lr_used}
        history.append(row)
        keep.update(_score(vm, cfg.monitor), epoch, raw)
        _save_full_state(ckpt, cfg, epoch, raw, opt, sched, (gen, aug_gen), keep, history, fabric)
        _write_history(Path(cfg.out) / "history.csv", history)  # progress to look at while it runs
        emit("epoch", epoch, cfg.epochs, {**row, "best_epoch": keep.best_epoch})
        if keep.should_stop:
            break
    keep.restore(raw)
    val = classification_metrics(_predict(model, data["val"], fabric, mean, std, cfg.batch_size), y_val, k)
    test = classification_metrics(_predict(model, data["test"], fabric, mean, std, cfg.batch_size),
                                  data["test"].y.to(device), k)
    return {"val": val, "test": test, "best_epoch": keep.best_epoch, "epochs_run": epoch, "history": history}
