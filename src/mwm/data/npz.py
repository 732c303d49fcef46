"""npz files: our shared format and the MedMNIST format.

Shared format (see the project README): ``images`` uint8 (N, H, W[, 3]),
``labels`` int (N,), ``label_names`` str (C,), ``split`` str (N,), optional
``filenames``, ``masks`` uint8 (N, H, W) with ``mask_valid`` bool (N,), ``captions`` str (N,).

``mask_valid`` says which images are annotated. Without it every mask is an annotation: an empty mask means
"no lesion" (as in most segmentation datasets), not "not annotated". Labels < 0 mean unlabelled (read as -1).
Float images may hold NaN/inf: counted and warned about once when the file is opened, read as 0.

MedMNIST: ``{train,val,test}_images`` and ``{train,val,test}_labels`` (N, 1).
"""

from __future__ import annotations

import warnings
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
        names = z.get("filenames")
        if names is not None and len(names) == n and len(set(names.tolist())) == n:
            self._ids = [str(s) for s in names.tolist()]
        else:
            self._ids = [str(i) for i in range(n)]
        self._count_nonfinite()

    def _no_images(self, what: str) -> DataError:
        return DataError(f"{self.root}: no images ({what}); there is nothing to read. Check that the file was "
                         "written completely, or re-create it with `mwm data convert`")

    def _count_nonfinite(self) -> None:
        """Float images: count NaN/inf pixels of every image now (vectorised, in chunks to bound the memory of the
        boolean mask) and warn once."""
        if not np.issubdtype(self.images.dtype, np.floating):
            return
        per_image = np.zeros(len(self.images), np.int64)
        for a in range(0, len(self.images), 256):
            bad = ~np.isfinite(self.images[a:a + 256])
            if bad.ndim == 4:
                bad = bad.any(-1)
            per_image[a:a + 256] = bad.reshape(len(bad), -1).sum(axis=1)
        hit = np.flatnonzero(per_image)
        if len(hit) == 0:
            return
        self.nonfinite = {self._ids[i]: int(per_image[i]) for i in hit}
        self._warn_nonfinite(f"{len(hit)} of {len(per_image)} images have non-finite pixels (NaN/inf; "
                             f"{int(per_image.sum())} pixels in all, first: {self._ids[hit[0]]})")

    def _from_shared(self, z: dict[str, np.ndarray]) -> None:
        path = self.root
        self.images = z["images"]
        if self.images.ndim not in (3, 4) or (self.images.ndim == 4 and self.images.shape[-1] not in (1, 3)):
            raise DataError(f"{path}: 'images' must be (N, H, W) or (N, H, W, 3); got {self.images.shape}")
        n = len(self.images)
        if n == 0:
            raise self._no_images(f"'images' has shape {self.images.shape}")

        def check(key: str, shape0: int = n) -> np.ndarray | None:
            a = z.get(key)
            if a is not None and len(a) != shape0:
                raise DataError(f"{path}: '{key}' has {len(a)} entries but 'images' has {n}; the file is inconsistent")
            return a

        labels = check("labels")
        # any negative label means unlabelled; one value (-1) so counts of "unlabelled" add up
        self._labels = [max(int(v), -1) for v in labels.reshape(n, -1)[:, 0]] if labels is not None else [-1] * n
        if "label_names" in z:
            self.label_names = [str(s) for s in z["label_names"].tolist()]
        elif labels is not None:
            self.label_names = [str(k) for k in range(max(self._labels) + 1)]
        if self.label_names and max(self._labels, default=-1) >= len(self.label_names):
            raise DataError(f"{path}: a label is {max(self._labels)} but there are only {len(self.label_names)} label_names")
        split = check("split")
        self._splits = [str(s) for s in split.tolist()] if split is not None else [""] * n
        self.masks = check("masks")
        if self.masks is not None and self.masks.ndim == 4 and self.masks.shape[-1] == 1:
            self.masks = self.masks[..., 0]
        if self.masks is not None and self.masks.ndim != 3:
            raise DataError(f"{path}: 'masks' must be (N, H, W); got {self.masks.shape}")
        valid = check("mask_valid")
        if self.masks is not None and valid is None:
            # no mask_valid: every mask is an annotation, an empty one = "no lesion" (a negative example);
            # guessing "not annotated" from emptiness would drop every negative from segment/localize-eval
            valid = np.ones(n, dtype=bool)
        self.mask_valid = valid.astype(bool).reshape(n) if valid is not None else None
        captions = check("captions")
        self.captions = [str(c) for c in captions.tolist()] if captions is not None else None

    def _from_medmnist(self, z: dict[str, np.ndarray]) -> None:
        present = [s for s in MEDMNIST_SPLITS if f"{s}_images" in z]
        if sum(len(z[f"{s}_images"]) for s in present) == 0:
            raise self._no_images(", ".join(f"'{s}_images' has 0 entries" for s in present))
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
            labels.append(lab.reshape(len(lab), -1) if len(lab) else lab.reshape(0, 1))
            splits += [s] * len(im)
        lab = np.concatenate(labels)
        if lab.shape[1] != 1:
            # Multi-label (e.g. ChestMNIST): one class index per image does not exist.
            warnings.warn(f"{self.root}: multi-label MedMNIST labels ({lab.shape[1]} columns) are not used; "
                          "images are read unlabelled", stacklevel=3)
            self._labels = [-1] * len(lab)
        else:
            self._labels = [max(int(v), -1) for v in lab[:, 0]]
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
