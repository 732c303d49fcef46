"""Decode a whole source once into fixed-size arrays (what `mwm data convert` and training use)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..io import atomic_path
from .source import ImageSource
from .transforms import ResizePolicy, mask_to_tensor, to_tensor


@dataclass
class ArrayDataset:
    """A dataset decoded to one size.

    images: uint8 (N, C, S, S) when quantized (C = 1 or 3), labels int64 (N,), split str (N,),
    masks uint8 (N, S, S) or None with mask_valid bool (N,), captions list or None.
    """

    ids: list[str]
    images: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    split: np.ndarray
    masks: np.ndarray | None = None
    mask_valid: np.ndarray | None = None
    captions: list[str] | None = None
    orig_sizes: np.ndarray | None = None  # int (N, 2): (height, width) as read
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def save_npz(self, path: str | Path, meta: dict | None = None) -> None:
        """Write our shared npz format atomically (tmp file + rename), so a killed run leaves no half file."""
        path = Path(path)
        imgs = self.images[:, 0] if self.images.shape[1] == 1 else self.images.transpose(0, 2, 3, 1)
        arrays: dict[str, np.ndarray] = {
            "images": imgs,
            "labels": self.labels.astype(np.int64),
            "label_names": np.array(self.label_names, dtype=str),
            "split": np.array(self.split, dtype=str),
            "filenames": np.array(self.ids, dtype=str),
        }
        if self.masks is not None:
            arrays["masks"] = self.masks
            arrays["mask_valid"] = self.mask_valid
        if self.captions is not None:
            arrays["captions"] = np.array(self.captions, dtype=str)
        if self.orig_sizes is not None:
            arrays["orig_sizes"] = self.orig_sizes
        if meta is not None:
            arrays["meta_json"] = np.array(json.dumps(meta))
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)


def decode(source: ImageSource, size: int, channels: int = 1, policy: ResizePolicy = "pad",
           split: str | None = None, progress=None) -> ArrayDataset:
    """Read every image of ``source`` (or one split) at ``size``; unreadable files are skipped and
    recorded in ``source.skipped`` (or raise when the source is strict). ``progress(n_done)`` is called per image."""
    idx = source.indices(split)
    ids, imgs, labels, splits, masks, valid, caps, sizes = [], [], [], [], [], [], [], []
    any_mask = source.has_masks()
    for s in source.iter_samples(idx):
        ids.append(s.id)
        imgs.append((to_tensor(s.image, size, channels, policy).numpy() * 255.0 + 0.5).astype(np.uint8))
        labels.append(s.label)
        splits.append(s.split)
        caps.append(s.caption)
        sizes.append(s.image.shape[:2])
        if any_mask:
            valid.append(s.mask is not None)
            masks.append(mask_to_tensor(s.mask, size, policy).numpy() if s.mask is not None
                         else np.zeros((size, size), np.uint8))
        if progress is not None:
            progress(1)
    n = len(ids)
    return ArrayDataset(
        ids=ids,
        images=np.stack(imgs) if n else np.zeros((0, channels, size, size), np.uint8),
        labels=np.array(labels, dtype=np.int64),
        label_names=list(source.label_names),
        split=np.array(splits, dtype=str),
        masks=np.stack(masks) if any_mask and n else None,
        mask_valid=np.array(valid, dtype=bool) if any_mask else None,
        captions=caps if source.has_captions() else None,
        orig_sizes=np.array(sizes, dtype=np.int64).reshape(n, 2),
    )
