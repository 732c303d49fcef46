"""Pretraining data: decode once, join the ROI manifest by image id, augment image + boxes together, shard per rank.

* :func:`load_pretrain_data` decodes the source at the model's size with 3 channels (timm's default in_chans), picks
  the split, and maps every ROI box from the *original* image through the resize policy (:class:`mwm.data.Fit`).
  For the saliency strategies (:data:`mwm.masking.NEEDS_SALIENCY`) it also loads each record's saliency map
  (:func:`join_saliency`), placed on the decoded image by the same geometry, kept as uint8.
* :class:`EpochSampler` is DistributedSampler-style: one permutation per epoch from a generator re-seeded by
  (seed, epoch), the same on every rank; rank r takes every world-th index. It yields ``(index, aug_seed)`` pairs,
  so the augmentation of a sample depends only on (seed, epoch, sample) — not on DataLoader workers or on
  whether the run was resumed — which is what makes resume exact.
* :func:`collate` pads the ragged boxes to ``(B, M, 4)`` + validity ``(B, M)`` for the masker (and stacks the
  saliency maps to ``(B, S, S)`` when there are any).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import DataError, MWMError
from .augment import paired_crop_with_map, paired_random_resized_crop
from .config import AugmentConfig, PretrainConfig

__all__ = ["PretrainData", "load_pretrain_data", "join_rois", "join_saliency", "fit_saliency", "roi_share_check",
           "PretrainDataset", "EpochSampler", "collate", "micro_batches_per_epoch"]

CONTENT_SAMPLE = 64  # images whose pixels the resume fingerprint hashes


@dataclass
class PretrainData:
    """Decoded pretraining images. images: uint8 (N, 3, S, S); boxes[i]: float32 (M_i, 4) normalized to the S × S
    image (M_i = 0: no ROI); ``has_rois``: a manifest was joined (so ROI statistics are meaningful); saliency:
    uint8 (N, S, S) maps on the decoded images (all 0: no map), only for the saliency strategies."""

    ids: list[str]
    images: np.ndarray
    boxes: list[np.ndarray]
    has_rois: bool
    split: str
    skipped: int = 0
    roi_stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    saliency: np.ndarray | None = None
    saliency_stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """A short hash of the ids and the image array's shape: a resumed run checks it sees the same data."""
        h = hashlib.sha256()
        h.update(str(self.images.shape).encode())
        for i in self.ids:
            h.update(i.encode() + b"\0")
        return h.hexdigest()[:16]

    def content_fingerprint(self, n: int = CONTENT_SAMPLE) -> str:
        """A short hash of the decoded pixels of ``n`` images spread evenly over the dataset (always the first and
        the last): same ids with other pixels (re-exported or re-windowed scans) are caught on resume, at the cost
        of hashing ``n`` small arrays instead of the whole set."""
        idx = np.unique(np.linspace(0, len(self.ids) - 1, min(n, len(self.ids))).round().astype(np.int64))
        h = hashlib.sha256()
        for i in idx:
            h.update(np.ascontiguousarray(self.images[i]).tobytes())
        return h.hexdigest()[:16]


class _Limited:
    """A source seen through a fixed list of indices (all :func:`mwm.data.decode` asks of it)."""

    def __init__(self, src, idx: list[int]):
        self._src, self._idx = src, idx

    def __getattr__(self, name):
        return getattr(self._src, name)

    def indices(self, split=None) -> list[int]:
        return list(self._idx)


def load_pretrain_data(cfg: PretrainConfig, progress=None) -> PretrainData:
    """Decode ``cfg.data`` (split, limit) at ``cfg.model.size`` with 3 channels and join ``cfg.rois``.
    ``progress(n)`` is called per decoded image."""
    from ..data import decode, open_source, pick_split

    src = open_source(cfg.data, cfg.read)
    split = pick_split(src, cfg.split)
    if cfg.limit is not None:
        # decode only what is used
        view = _Limited(src, src.indices(None if split == "all" else split)[: cfg.limit])
        ds = decode(view, cfg.size, channels=3, policy=cfg.resize, progress=progress)  # type: ignore[arg-type]
    else:
        ds = decode(src, cfg.size, channels=3, policy=cfg.resize, split=None if split == "all" else split,
                    progress=progress)
    if len(ds) == 0:
        raise DataError(f"{cfg.data}: no readable images in split '{split}'"
                        + (f" ({len(src.skipped)} unreadable)" if src.skipped else ""))
    from ..masking import NEEDS_SALIENCY

    notes: list[str] = []
    saliency, sal_stats = None, {}
    if cfg.rois is not None:
        boxes, stats = join_rois(ds.ids, ds.orig_sizes, cfg.rois, cfg.size, cfg.resize, cfg.allow_missing_rois,
                                 data=cfg.data)
        # the maps also serve as the reconstruction target (model.target meijering, M&M reading (b))
        if cfg.masking.strategy in NEEDS_SALIENCY or getattr(cfg.model, "target", "pixels") != "pixels":
            saliency, sal_stats = join_saliency(ds.ids, ds.orig_sizes, cfg.rois, cfg.size, cfg.resize,
                                                strategy=cfg.masking.strategy)
        notes += roi_share_check(stats, cfg, sal_stats or None)
    else:
        boxes, stats = [np.zeros((0, 4), np.float32) for _ in ds.ids], {}
    return PretrainData(ids=list(ds.ids), images=ds.images, boxes=boxes, has_rois=cfg.rois is not None, split=split,
                        skipped=len(src.skipped), roi_stats=stats, warnings=notes, saliency=saliency,
                        saliency_stats=sal_stats)


def roi_share_check(stats: dict, cfg: PretrainConfig, saliency_stats: dict | None = None) -> list[str]:
    """Warnings about the joined ROIs (the caller shows and records them): ROI-guided masking where fewer than
    ``cfg.min_roi_share`` of the images have an ROI box (for the saliency strategies: a saliency map,
    ``saliency_stats`` from :func:`join_saliency`) — the rest are masked uniformly at ``ratio``, so the run is
    mostly random masking under another name — and ROIs given to a strategy that ignores them.

    Raises :class:`MWMError` instead for the share when ``cfg.read.strict`` (``--strict``)."""
    from ..masking import NEEDS_ROI

    out = []
    strategy = cfg.masking.strategy
    if strategy not in NEEDS_ROI and getattr(cfg.model, "target", "pixels") == "pixels":  # a map target reads them
        out.append(f"--masking {strategy} does not use ROIs: the boxes of {cfg.rois} only feed the in/out mask-ratio "
                   "statistics; pass --masking roi (or roi_overall, soft, topk) for ROI-guided masking")
        return out
    what, n_with = "an ROI box", stats["with_roi"]
    n = stats["with_roi"] + stats["without_roi"] + stats["missing"]
    share = stats["share"]
    if saliency_stats is not None:
        what, n_with, share = "a saliency map", saliency_stats["with_saliency"], saliency_stats["share"]
    if share < cfg.min_roi_share:
        msg = (f"{cfg.rois}: only {n_with} of {n} images ({share:.0%}) have {what}, fewer than "
               f"min_roi_share {cfg.min_roi_share:.0%}: --masking {strategy} masks the other {n - n_with} "
               f"uniformly at --ratio {cfg.masking.ratio:g}, i.e. mostly random masking. Check the manifest's status "
               "counts (`mwm localize` failures); when many scans truly show no finding, lower --min-roi-share "
               "to accept it")
        if cfg.read.strict:
            raise MWMError(msg + " (failing because of --strict)")
        out.append(msg)
    return out


def join_rois(ids: list[str], orig_sizes: np.ndarray, manifest, size: int, policy: str,
              allow_missing: bool = False, data=None) -> tuple[list[np.ndarray], dict]:
    """ROI boxes per image id from a rois.jsonl, mapped from original-image coordinates to the ``size × size``
    decoded image (``Fit.of(h, w, size, policy).box``). Records with status != "ok" or no boxes mean "no ROI".

    Raises :class:`MWMError` when ids are missing from the manifest (naming the first few and the count) unless
    ``allow_missing``, and always when no id matches at all (a manifest of other data).
    Returns (boxes per image: float32 (M, 4), stats dict).
    """
    from ..data import Fit
    from ..rois.manifest import read_manifest, usable_boxes

    recs = {r["image"]: r for r in read_manifest(manifest)}
    missing = [i for i in ids if i not in recs]
    where = f" for {data}" if data is not None else ""
    if len(missing) == len(ids):
        raise MWMError(f"{manifest}: none of the {len(ids)} image ids{where} is in the manifest (data ids look like "
                       f"{ids[0]!r}, manifest ids like {next(iter(recs), '(empty manifest)')!r}). Run `mwm localize` "
                       "on the same data (same file or folder, so the ids match)")
    if missing and not allow_missing:
        first = ", ".join(repr(m) for m in missing[:5])
        raise MWMError(f"{manifest}: {len(missing)} of {len(ids)} images{where} have no record (first: {first}). "
                       "Localize them too (re-running `mwm localize` on the same data resumes and adds them), or "
                       "pass --allow-missing-rois to pretrain them without an ROI (masked uniformly at --ratio)")
    out, n_roi, n_noroi, mismatched = [], 0, 0, 0
    for i, sid in enumerate(ids):
        rec = recs.get(sid)
        h, w = (int(v) for v in orig_sizes[i])
        # an ROI is a finite box of positive area (the manifest's one rule, usable_boxes); a crop policy can
        # still cut a box off entirely below, and that image then has no ROI either
        raw = usable_boxes(rec) if rec is not None else []
        if not raw:
            out.append(np.zeros((0, 4), np.float32))
            n_noroi += rec is not None
            continue
        rw, rh = rec.get("width", 0), rec.get("height", 0)
        if rw and rh and abs(rw / rh - w / h) > 0.01 * (w / h):
            mismatched += 1  # normalized boxes only transfer between images of the same aspect ratio
        fit = Fit.of(h, w, size, policy)
        bb = np.array([fit.box(b, h, w, size) for b in raw], np.float32).reshape(-1, 4)
        bb = bb[(bb[:, 2] > bb[:, 0]) & (bb[:, 3] > bb[:, 1])]
        out.append(bb)
        n_roi += len(bb) > 0
        n_noroi += len(bb) == 0
    if mismatched:
        warnings.warn(f"{manifest}: {mismatched} records have a width/height whose aspect ratio differs from the "
                      "image as read; boxes are normalized to the localized image, so they may be misplaced "
                      "(localize the same files you pretrain on)", stacklevel=2)
    return out, {"with_roi": n_roi, "without_roi": n_noroi, "missing": len(missing),
                 "share": n_roi / max(1, len(ids))}


SALIENCY_FIX = ("run `mwm localize` with --save-saliency (into a new --out, or with --overwrite: a resumed run "
                "does not revisit the images it has done)")


def _localize_resize(manifest) -> str:
    """The ``--resize`` policy `mwm localize` fitted the scans with (meta.json's config beside the manifest): its
    saliency maps are drawn on that square. Without a meta.json, localize's default ``pad``."""
    meta = Path(manifest).parent / "meta.json"
    if not meta.is_file():
        return "pad"
    try:
        policy = (json.loads(meta.read_text(encoding="utf-8")).get("config") or {}).get("resize", "pad")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise MWMError(f"{meta}: not a `mwm localize` meta.json ({e}); it tells how the saliency maps of {manifest} "
                       "were fitted to the scans") from e
    if policy not in ("pad", "stretch", "crop"):
        raise MWMError(f"{meta}: unknown resize policy {policy!r} (pad, stretch or crop)")
    return policy


def _read_map(path: Path) -> np.ndarray:
    """A saliency PNG (``mwm localize`` writes 8-bit gray, 0–255 = saliency 0–1) → float32 (H, W) in [0, 1]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except OSError as e:
        raise MWMError(f"{path}: not a readable saliency map image ({e}); {SALIENCY_FIX}") from e
    if a.ndim == 3:  # an RGB(A) export of a gray map
        a = a[..., :3].mean(-1)
    scale = 65535.0 if a.dtype == np.uint16 else 255.0 if a.dtype == np.uint8 else max(1.0, float(a.max()))
    return (a.astype(np.float32) / scale).clip(0, 1)


def fit_saliency(smap: np.ndarray, h: int, w: int, map_policy: str, size: int, policy: str) -> torch.Tensor:
    """A saliency map drawn on the localizer's square (the ``h × w`` scan fitted by ``map_policy``) → float32
    ``(size, size)`` on the decoded training image (the scan fitted by ``policy``, as :func:`mwm.data.to_tensor`
    places the image).

    The map is first cut back to the scan's own frame (the localizer's padding dropped; with ``crop`` the parts
    of the scan it never saw are 0), then placed exactly as the image is. A non-square map is taken to cover the
    whole scan.
    """
    from ..data import Fit
    from ..data.transforms import _place  # the very placement mwm.data gives the image

    mh, mw = smap.shape
    frame = torch.from_numpy(np.ascontiguousarray(smap, dtype=np.float32))
    if mh == mw and (h, w) != (mh, mw):
        fit = Fit.of(h, w, mh, map_policy)
        oy, ox = int(round(fit.oy)), int(round(fit.ox))  # the offsets mwm.data placed the scan at
        frame = torch.zeros(fit.out_h, fit.out_w)  # the scan's frame, at the map's scale
        fy0, fx0 = max(0, -oy), max(0, -ox)
        my0, mx0 = max(0, oy), max(0, ox)
        hh, ww = min(fit.out_h - fy0, mh - my0), min(fit.out_w - fx0, mw - mx0)
        frame[fy0:fy0 + hh, fx0:fx0 + ww] = torch.from_numpy(np.ascontiguousarray(smap[my0:my0 + hh, mx0:mx0 + ww]))
    # the frame has the scan's content but not always its aspect (stretch): place it by the scan's own fit
    return _place(frame[None], Fit.of(h, w, size, policy), size, "bilinear")[0].clamp_(0, 1)


def join_saliency(ids: list[str], orig_sizes: np.ndarray, manifest, size: int, policy: str,
                  strategy: str = "saliency") -> tuple[np.ndarray, dict]:
    """The saliency map of every image (the records' ``saliency`` files, from ``mwm localize --save-saliency``),
    placed on the ``size × size`` decoded image (:func:`fit_saliency`). An image without one — no record, no
    ``saliency`` field, status ``nan_saliency``, or a constant map — gets an all-zero map, which the saliency
    maskers mask uniformly at ``ratio``.

    Raises :class:`MWMError` when no record names a map (the manifest was written without --save-saliency) and
    when a named file is missing (naming it).
    Returns (uint8 (N, size, size), stats: with_saliency, without_saliency, missing, share, resize).
    """
    from ..rois.manifest import read_manifest

    recs = {r["image"]: r for r in read_manifest(manifest)}
    if not any(r.get("saliency") for r in recs.values()):
        raise MWMError(f"{manifest}: no record names a saliency map, and --masking {strategy} masks by the "
                       f"per-image saliency maps; {SALIENCY_FIX}")
    map_policy = _localize_resize(manifest)
    root = Path(manifest).parent
    out = np.zeros((len(ids), size, size), np.uint8)
    n_map = n_without = n_missing = 0
    for i, sid in enumerate(ids):
        rec = recs.get(sid)
        if rec is None:
            n_missing += 1
            continue
        name = rec.get("saliency")
        if not name or rec.get("status") == "nan_saliency":  # localize writes a NaN map as zeros: not a map
            n_without += 1
            continue
        path = root / name
        if not path.is_file():
            raise MWMError(f"{manifest}: the saliency map of {sid!r}, {path}, does not exist (moved or deleted "
                           f"beside the manifest?); keep the `saliency/` folder next to the manifest, or "
                           f"{SALIENCY_FIX}")
        h, w = (int(v) for v in orig_sizes[i])
        m = fit_saliency(_read_map(path), h, w, map_policy, size, policy)
        if float(m.max() - m.min()) <= 0:
            n_without += 1  # constant: says nothing about where to mask
            continue
        out[i] = (m.numpy() * 255 + 0.5).astype(np.uint8)
        n_map += 1
    return out, {"with_saliency": n_map, "without_saliency": n_without, "missing": n_missing,
                 "share": n_map / max(1, len(ids)), "resize": map_policy}


class PretrainDataset(Dataset):
    """``dataset[(index, aug_seed)] → (img float32 (3, S, S) in [0, 1], boxes float32 (M, 4))``, plus the saliency
    map float32 (S, S) in [0, 1] as a third element when ``saliency`` (uint8 (N, S, S)) is given.

    The augmentation generator is seeded by ``aug_seed`` (drawn by :class:`EpochSampler`), so a sample's crop
    and flip are reproducible in any worker process; the map gets exactly the image's crop and flip."""

    def __init__(self, images: np.ndarray, boxes: list[np.ndarray], augment: AugmentConfig,
                 saliency: np.ndarray | None = None):
        self.images, self.boxes, self.augment, self.saliency = images, boxes, augment, saliency

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        i, seed = key if isinstance(key, tuple) else (key, None)
        img = torch.from_numpy(self.images[i]).float().div_(255.0)
        boxes = torch.from_numpy(self.boxes[i])
        smap = None if self.saliency is None else torch.from_numpy(self.saliency[i]).float().div_(255.0)
        if self.augment.enabled and seed is not None:
            g = torch.Generator().manual_seed(int(seed))
            a = self.augment
            if smap is None:
                img, boxes = paired_random_resized_crop(img, boxes, g, a.crop_scale, a.crop_ratio, a.hflip)
            else:
                img, boxes, smap = paired_crop_with_map(img, boxes, smap, g, a.crop_scale, a.crop_ratio, a.hflip)
        return (img, boxes) if smap is None else (img, boxes, smap)


def micro_batches_per_epoch(n: int, batch_size: int, accumulate: int, world_size: int) -> int:
    """Micro-batches each rank runs per epoch: whole optimizer steps only (the tail is dropped, different each
    epoch because the order is reshuffled)."""
    return (n // (batch_size * accumulate * world_size)) * accumulate


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x6D776D]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(Sampler):
    """DistributedSampler-style sharding with per-sample augmentation seeds.

    Every epoch: ``perm = randperm(n)`` and ``aug_seeds`` from a generator seeded by (seed, epoch) (identical on
    every rank); the first ``per_rank × world`` positions are used and rank r takes positions r, r + world, ….
    Yields ``(index, aug_seed)``. Its RNG state is (seed, epoch): :meth:`state_dict`; :meth:`use_epoch` picks the epoch.
    """

    def __init__(self, n: int, per_rank: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if per_rank * world_size > n:
            raise ValueError(f"{per_rank} samples × {world_size} ranks > {n} images")
        self.n, self.per_rank, self.world, self.rank, self.seed = n, per_rank, world_size, rank, seed
        self.epoch = 0

    def use_epoch(self, epoch: int) -> None:
        """Draw this epoch's order next. Deliberately not ``set_epoch``: Fabric's DataLoader wrapper calls
        ``sampler.set_epoch(k)`` with k = how many times *it* was iterated in this process, which restarts at 0
        after a resume and would replay epoch 0's order."""
        self.epoch = epoch

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))

    def order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (indices (per_rank,), aug_seeds (per_rank,)) for the current epoch."""
        g = self.generator()
        perm = torch.randperm(self.n, generator=g)
        seeds = torch.randint(0, 2 ** 62, (self.n,), generator=g)
        pos = torch.arange(self.rank, self.per_rank * self.world, self.world)
        return perm[pos], seeds[pos]

    def __iter__(self):
        idx, seeds = self.order()
        return iter(zip(idx.tolist(), seeds.tolist()))

    def __len__(self) -> int:
        return self.per_rank

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "generator": self.generator().get_state()}


def collate(items: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """[(img (C, S, S), boxes (M_i, 4))] → (x (B, C, S, S), boxes (B, M, 4), valid bool (B, M)), M = max(1, M_i);
    items with a saliency map (img, boxes, map (S, S)) add the stacked maps (B, S, S) as a fourth element."""
    x = torch.stack([it[0] for it in items])
    m = max(1, max(len(it[1]) for it in items))
    boxes = torch.zeros(len(items), m, 4)
    valid = torch.zeros(len(items), m, dtype=torch.bool)
    for i, it in enumerate(items):
        b = it[1]
        if len(b):
            boxes[i, : len(b)] = b
            valid[i, : len(b)] = True
    if len(items[0]) > 2:
        return x, boxes, valid, torch.stack([it[2] for it in items])
    return x, boxes, valid
