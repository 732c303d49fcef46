"""npz files: our shared format and the MedMNIST format.

Shared format (see the project README): ``images`` uint8 (N, H, W[, 3]),
``labels`` int (N,), ``label_names`` str (C,), ``split`` str (N,), optional
``filenames``, ``masks`` uint8 (N, H, W) with ``mask_valid`` bool (N,), ``captions`` str (N,).

MedMNIST: ``{train,val,test}_images`` and ``{train,val,test}_labels`` (N, 1).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .intensity import scale_integer_image
from .source import ImageSource
from .types import ReadOptions, Sample

MEDMNIST_SPLITS = ("train", "val", "test")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):  # else np.load tries to unpickle it and blames pickling
        raise DataError(f"{path}: not a readable .npz file (not a zip archive). Re-create it with `mwm data convert`.")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}). Re-create it with `mwm data convert`.") from e
    except ValueError as e:
        raise DataError(f"{path}: holds pickled objects, which mwm does not load; save plain arrays "
                        f"(strings as numpy unicode arrays) ({e})") from e


class NpzSource(ImageSource):
    """In-memory arrays from an npz file; ids are ``filenames`` when unique, else the index."""

    kind = "npz"

    def __init__(self, path: Path, options: ReadOptions | None = None):
        super().__init__(Path(path), options)
        z = _load_npz(self.root)
        if "images" in z:
            self._from_shared(z)
        elif any(f"{s}_images" in z for s in MEDMNIST_SPLITS):
            self._from_medmnist(z)
        else:
            raise DataError(f"{path}: an npz needs an 'images' array (our format: images, labels, label_names, split) "
                            f"or MedMNIST keys (train_images, train_labels, ...); found keys {sorted(z)}")
        n = len(self.images)
        if n == 0:
            raise DataError(f"{path}: 'images' is empty")
        names = z.get("filenames")
        if names is not None and len(names) == n and len(set(names.tolist())) == n:
            self._ids = [str(s) for s in names.tolist()]
        else:
            self._ids = [str(i) for i in range(n)]

    def _from_shared(self, z: dict[str, np.ndarray]) -> None:
        path = self.root
        self.images = z["images"]
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] not in (1, 3)):
            raise DataError(f"{path}: 'images' must be (N, H, W) or (N, H, W, 3); got {self.images.shape}")
        n = len(self.images)

        def check(key: str, shape0: int = n) -> np.ndarray | None:
            a = z.get(key)
            if a is not None and len(a) != shape0:
                raise DataError(f"{path}: '{key}' has {len(a)} entries but 'images' has {n}; the file is inconsistent")
            return a

        labels = check("labels")
        self._labels = [int(v) for v in labels.reshape(n, -1)[:, 0]] if labels is not None else [-1] * n
        if "label_names" in z:
            self.label_names = [str(s) for s in z["label_names"].tolist()]
        elif labels is not None:
            self.label_names = [str(k) for k in range(max(self._labels) + 1)]
        if self.label_names and max(self._labels, default=-1) >= len(self.label_names):
            raise DataError(f"{path}: a label is {max(self._labels)} but there are only {len(self.label_names)} label_names")
        split = check("split")
        self._splits = [str(s) for s in split.tolist()] if split is not None else [""] * n
        self.masks = check("masks")
        valid = check("mask_valid")
        if self.masks is not None and valid is None:
            valid = self.masks.reshape(n, -1).any(axis=1)
        self.mask_valid = valid.astype(bool) if valid is not None else None
        captions = check("captions")
        self.captions = [str(c) for c in captions.tolist()] if captions is not None else None

    def _from_medmnist(self, z: dict[str, np.ndarray]) -> None:
        imgs, labels, splits = [], [], []
        for s in MEDMNIST_SPLITS:
            if f"{s}_images" not in z:
                continue
            if f"{s}_labels" not in z:
                raise DataError(f"{self.root}: MedMNIST file has '{s}_images' but no '{s}_labels'")
            im, lab = z[f"{s}_images"], z[f"{s}_labels"]
            if len(im) != len(lab):
                raise DataError(f"{self.root}: '{s}_images' has {len(im)} entries but '{s}_labels' has {len(lab)}")
            imgs.append(im)
            labels.append(lab.reshape(len(lab), -1))
            splits += [s] * len(im)
        lab = np.concatenate(labels)
        if lab.shape[1] != 1:
            # Multi-label (e.g. ChestMNIST): one class index per image does not exist.
            import warnings

            warnings.warn(f"{self.root}: multi-label MedMNIST labels ({lab.shape[1]} columns) are not used; "
                          "images are read unlabelled", stacklevel=3)
            self._labels = [-1] * len(lab)
        else:
            self._labels = [int(v) for v in lab[:, 0]]
            self.label_names = [str(k) for k in range(max(self._labels) + 1)]
        self.images = np.concatenate(imgs)
        self._splits = splits
        self.masks, self.mask_valid, self.captions = None, None, None
        self.kind = "medmnist"

    def has_masks(self) -> bool:
        return self.masks is not None and bool(self.mask_valid.any())

    def has_captions(self) -> bool:
        return self.captions is not None

    def _read(self, i: int) -> Sample:
        img = self.images[i]
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        mask = None
        if self.masks is not None and self.mask_valid[i]:
            mask = (self.masks[i] > 0).astype(np.uint8)
        return Sample(id=self._ids[i], image=scale_integer_image(img), label=self._labels[i], split=self._splits[i],
                      mask=mask, caption=self.captions[i] if self.captions is not None else None,
                      source=f"{self.root}[{i}]")
