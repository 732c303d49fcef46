"""Labelled data for transfer: images decoded once at the task size, labels, optional masks, and the
train/val/test split.

Every transfer task selects models on ``val`` and reports on ``test``. Sources with a ``split`` (our npz,
ImageFolder with split folders, MedMNIST) use it — the shared datasets hold near-duplicates across patients,
so a fresh random split would leak. Sources without one get a stratified, seeded 70/15/15 split and a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..data.arrays import ArrayDataset
from ..data.types import ReadOptions
from ..errors import DataError

__all__ = ["LabelledData", "load_labelled", "stratified_split"]

SPLITS = ("train", "val", "test")


@dataclass
class LabelledData(ArrayDataset):
    """An :class:`~mwm.data.arrays.ArrayDataset` decoded for transfer: images uint8 (N, 3, S, S); labels int64
    (N,) (-1: none); split str (N,), always train/val/test; masks uint8 (N, S, S) or None with mask_valid bool
    (N,); source: where it was read from, for messages."""

    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def indices(self, split: str, with_masks: bool = False) -> np.ndarray:
        """Indices (int64) of ``split``; ``with_masks``: only those with a valid mask."""
        keep = self.split == split
        if with_masks:
            if self.masks is None:
                raise DataError(f"{self.source}: no masks; segmentation/detection need a 'masks' key (npz) "
                                "or a mask folder")
            keep &= self.mask_valid
        return np.flatnonzero(keep)


def stratified_split(labels: np.ndarray, seed: int = 0, fracs=(0.7, 0.15, 0.15)) -> np.ndarray:
    """A seeded per-class split: str (N,) of train/val/test with the given fractions in every class."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr = int(round(fracs[0] * len(idx)))
        n_va = int(round(fracs[1] * len(idx)))
        out[idx[:n_tr]], out[idx[n_tr:n_tr + n_va]], out[idx[n_tr + n_va:]] = "train", "val", "test"
    return out.astype(str)


def load_labelled(data: str | Path, size: int, read: ReadOptions | None = None, resize: str = "pad",
                  need_labels: bool = True, need_masks: bool = False, seed: int = 0,
                  progress=None) -> LabelledData:
    """Decode ``data`` at ``size`` (3 channels) with labels/masks and a train/val/test split.

    Raises :class:`DataError` naming the source when labels/masks/splits are missing. With ``need_labels``, images
    without a class label (label < 0, e.g. -1 = unlabelled) are kept here but warned about once with their count:
    classification leaves them out.
    """
    from ..data import decode, open_source

    if not Path(data).exists():
        raise DataError(f"{data}: no such file or folder")
    src = open_source(data, read or ReadOptions())
    ds = decode(src, size, channels=3, policy=resize, progress=progress)  # type: ignore[arg-type]
    if len(ds) == 0:
        raise DataError(f"{data}: no readable images" + (f" ({len(src.skipped)} unreadable)" if src.skipped else ""))
    labels = np.asarray(ds.labels, dtype=np.int64)
    if need_labels and (not ds.label_names or (labels < 0).all()):
        raise DataError(f"{data}: no class labels; use an npz with 'labels', an ImageFolder (one folder per "
                        "class) or a CSV with a label column")
    n_unlabelled = int((labels < 0).sum())
    if need_labels and n_unlabelled:
        warnings.warn(f"{data}: {n_unlabelled} of {len(labels)} images have no class label (label < 0; -1 = "
                      "unlabelled); they are left out of classification", stacklevel=2)
    split = np.asarray(ds.split, dtype=str)
    present = {s for s in split if s}
    if not {"train", "test"} <= present:
        warnings.warn(f"{data}: no train/test split in the data; using a seeded stratified 70/15/15 split "
                      f"(seed {seed}). Near-duplicate images across patients leak through random splits: give "
                      "a split column/folders if you have patient ids.", stacklevel=2)
        split = stratified_split(labels, seed)
    elif "val" not in present:
        # carve val out of train (stratified) so model selection never touches test
        tr = np.flatnonzero(split == "train")
        sub = stratified_split(labels[tr], seed, fracs=(0.85, 0.15, 0.0))
        split = split.copy().astype(object)
        split[tr[sub == "val"]] = "val"
        split = split.astype(str)
    if need_masks and ds.masks is None:
        raise DataError(f"{data}: no masks; segmentation and detection need a 'masks' key (npz) or a mask folder")
    return LabelledData(**{f.name: getattr(ds, f.name) for f in fields(ds)} | {
        "ids": list(ds.ids), "labels": labels, "label_names": list(ds.label_names), "split": split,
        "source": str(data)})
