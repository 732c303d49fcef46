"""Summaries of a dataset for `mwm data inspect`."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np

from .npz import NpzSource
from .source import ImageSource

_PIL_MODE_DTYPE = {"1": "bool", "L": "uint8", "P": "uint8", "RGB": "uint8", "RGBA": "uint8", "LA": "uint8",
                   "I;16": "uint16", "I;16B": "uint16", "I;16L": "uint16", "I": "int32", "F": "float32"}


@lru_cache(maxsize=4096)
def _file_dtype(path: str, loader: str) -> str:
    """The stored pixel type of a file, from its header only."""
    try:
        if loader == "image":
            from PIL import Image

            with Image.open(path) as im:
                return _PIL_MODE_DTYPE.get(im.mode, im.mode)
        if loader == "dicom":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return f"{'int' if int(getattr(ds, 'PixelRepresentation', 0)) else 'uint'}{int(ds.BitsAllocated)}"
        if loader == "nifti":
            import nibabel

            return str(nibabel.load(path).header.get_data_dtype())
    except Exception:  # the decode step reports unreadable files; here only the summary is affected
        return "unknown"
    return "unknown"


def _class_balance(labels: list[int], splits: list[str], names: list[str]) -> dict:
    out: dict[str, dict] = {}
    for s in sorted(set(splits), key=lambda x: ("train", "val", "test", "").index(x) if x in ("train", "val", "test", "") else 9):
        sel = [lab for lab, sp in zip(labels, splits) if sp == s]
        counts = Counter(sel)
        per_class = {(names[k] if 0 <= k < len(names) else ("unlabelled" if k < 0 else str(k))): counts[k]
                     for k in sorted(counts)}
        out[s or "none"] = {"count": len(sel), "per_class": per_class}
    return out


def inspect_source(src: ImageSource) -> dict:
    """count, sizes, channels, dtype, class balance per split, masks, captions, skipped files, and ``nonfinite``:
    images / pixels that were NaN or inf (read as 0)."""
    info: dict = {"path": str(src.root), "format": src.kind}
    if isinstance(src, NpzSource):
        imgs = src.images
        n = len(imgs)
        sizes = Counter({f"{imgs.shape[1]}x{imgs.shape[2]}": n})
        channels = Counter({str(imgs.shape[3] if imgs.ndim == 4 else 1): n})
        dtypes = Counter({str(imgs.dtype): n})
        valid = int(src.mask_valid.sum()) if src.mask_valid is not None else 0
        masks = {"present": src.masks is not None, "valid": valid}
        if src.masks is not None:
            masks["valid_per_split"] = dict(Counter(np.asarray(src.splits)[src.mask_valid].tolist()))
        ids_ok = list(range(n))
    else:
        sizes, channels, dtypes, ids_ok = _scan_files(src)
        masks = {"present": False, "valid": 0}
    labels = [src.labels[i] for i in ids_ok]
    splits = [src.splits[i] for i in ids_ok]
    info.update({
        "count": len(ids_ok),
        "sizes": dict(sizes.most_common(10)),
        "distinct_sizes": len(sizes),
        "channels": dict(channels),
        "dtype": dict(dtypes),
        "num_classes": len(src.label_names),
        "label_names": list(src.label_names),
        "splits": _class_balance(labels, splits, src.label_names),
        "masks": masks,
        "captions": src.has_captions(),
        "skipped_count": len(src.skipped),
        "skipped": [{"path": s.path, "reason": s.reason} for s in src.skipped[:50]],
        "ignored_files": src.ignored_files,
        "nonfinite": src.nonfinite_summary(),
    })
    return info


def _scan_files(src: ImageSource) -> tuple[Counter, Counter, Counter, list[int]]:
    """Decode every image once (the only way to be sure it is readable)."""
    from .source import Skipped
    from ..errors import ReadError

    sizes, channels, dtypes, ok = Counter(), Counter(), Counter(), []
    for i in range(len(src)):
        try:
            s = src.read(i)
        except ReadError as e:
            if src.options.strict:
                raise
            src.skipped.append(Skipped(e.path, e.reason))
            continue
        ok.append(i)
        h, w = s.image.shape[:2]
        sizes[f"{h}x{w}"] += 1
        channels[str(s.image.shape[2] if s.image.ndim == 3 else 1)] += 1
        item = src.items[i]
        dtypes[_file_dtype(str(item.path), item.loader.name)] += 1
    return sizes, channels, dtypes, ok
