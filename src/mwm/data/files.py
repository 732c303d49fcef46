"""Readers over files on disk: folders (recursive), single files, ImageFolder trees, CSV lists.

Each file format is a *loader* with two functions (see :class:`Loader`):
``expand`` reads only the header and lists the 2D images inside the file
(one for a PNG, one per frame for multi-frame DICOM, one per slice for NIfTI),
``load`` decodes one of them to float32 in [0, 1].
"""

from __future__ import annotations

import csv
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError, ReadError
from .source import ImageSource, Skipped
from .types import ReadOptions, Sample

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
DICOM_EXTS = {".dcm", ".dicom", ".ima"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class Loader:
    """expand(path, options) -> list of (id suffix, key); load(path, key, options) -> float32 (H, W[, 3]) in [0, 1],
    NaN where the stored value is not finite (:class:`~mwm.data.source.ImageSource` counts and replaces those)."""

    name: str
    expand: Callable[[Path, ReadOptions], list[tuple[str, object]]]
    load: Callable[[Path, object, ReadOptions], np.ndarray]


@dataclass
class Item:
    id: str
    path: Path
    loader: Loader
    key: object = None
    label: int = -1
    split: str = ""


def _is_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def loader_for(path: Path) -> Loader | None:
    """The loader for a file by its name (and, for extension-less files, the DICOM magic)."""
    name = path.name.lower()
    suffix = path.suffix.lower()
    if name.endswith(NIFTI_SUFFIXES):
        module = "nifti"
    elif suffix in IMAGE_EXTS:
        module = "images"
    elif suffix in DICOM_EXTS or (suffix == "" and _is_dicom_magic(path)):
        module = "dicom"
    else:
        return None
    # imported on first use: each module pulls in its decoding library
    return importlib.import_module(f"{__package__}.{module}").LOADER


def _walk(root: Path) -> list[Path]:
    """Every non-hidden file under ``root``, sorted so ids and order are stable."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _rel_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


class FileSource(ImageSource):
    """Images from files; built by :func:`folder_source`, :func:`csv_source` or for one file."""

    def __init__(self, root: Path, items: list[Item], options: ReadOptions, kind: str, label_names: list[str] | None = None):
        super().__init__(root, options)
        self.kind = kind
        self.items = items
        self.label_names = list(label_names or [])
        self._ids = [it.id for it in items]
        self._labels = [it.label for it in items]
        self._splits = [it.split for it in items]

    @property
    def where(self) -> str:
        return str(self.items[0].path) if self.kind == "file" and self.items else str(self.root)

    def _read(self, i: int) -> Sample:
        it = self.items[i]
        try:
            img = it.loader.load(it.path, it.key, self.options)
        except ReadError:
            raise
        except Exception as e:  # decoding libraries raise many kinds; name the file
            raise ReadError(str(it.path), f"{type(e).__name__}: {e}") from e
        if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
            raise ReadError(str(it.path), f"decoded to an array of shape {img.shape}, not a 2D image")
        return Sample(id=it.id, image=img, label=it.label, split=it.split, source=str(it.path))


def _expand_files(files: list[tuple[Path, int, str]], root: Path, options: ReadOptions, kind: str,
                  label_names: list[str] | None = None) -> FileSource:
    """files: (path, label, split) → items, one per 2D image; bad headers are skipped (or raised)."""
    items: list[Item] = []
    skipped: list[Skipped] = []
    ignored = 0
    for path, label, split in files:
        loader = loader_for(path)
        if loader is None:
            ignored += 1
            continue
        base = _rel_id(path, root)
        try:
            parts = loader.expand(path, options)
        except Exception as e:
            err = e if isinstance(e, ReadError) else ReadError(str(path), f"{type(e).__name__}: {e}")
            if options.strict:
                raise err from e
            skipped.append(Skipped(err.path, err.reason))
            continue
        for suffix, key in parts:
            items.append(Item(id=base + suffix, path=path, loader=loader, key=key, label=label, split=split))
    src = FileSource(root, items, options, kind, label_names)
    src.skipped.extend(skipped)
    src.ignored_files = ignored
    if skipped:
        import warnings

        warnings.warn(f"skipped {len(skipped)} unreadable file(s) under {root}; first: {skipped[0].path} ({skipped[0].reason})",
                      stacklevel=2)
    return src


def folder_source(root: Path, options: ReadOptions) -> FileSource:
    """A folder, read recursively. With ``options.labels == "folders"`` it is an ImageFolder tree:
    ``root/<class>/…`` or ``root/<split>/<class>/…`` (split folders named train/val/test)."""
    root = Path(root)
    if options.labels == "none":
        files = [(p, -1, "") for p in _walk(root)]
        src = _expand_files(files, root, options, "folder")
        kind_msg = "images (PNG/JPG/TIFF/BMP), DICOM or NIfTI files"
    else:
        subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_ALIASES]
        if split_dirs and len(split_dirs) == len(subdirs):
            layout = [(SPLIT_ALIASES[d.name.lower()], d) for d in split_dirs]
        else:
            layout = [("", root)]
        class_names = sorted({c.name for _, d in layout for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")})
        if not class_names:
            raise DataError(f"{root}: --labels folders expects one subfolder per class (root/<class>/image.png "
                            "or root/<split>/<class>/image.png), but found no subfolders")
        index = {c: k for k, c in enumerate(class_names)}
        files = []
        for split, d in layout:
            for c in sorted(x for x in d.iterdir() if x.is_dir() and x.name in index):
                files.extend((p, index[c.name], split) for p in _walk(c))
        src = _expand_files(files, root, options, "imagefolder", class_names)
        kind_msg = "images inside class subfolders"
    if len(src) == 0:
        detail = f" ({len(src.skipped)} unreadable, {src.ignored_files} not images)" if src.skipped or src.ignored_files else ""
        raise DataError(f"{root}: no {kind_msg} found{detail}. Point mwm at a folder of scans, an npz, a CSV or a single file.")
    return src


def file_source(path: Path, options: ReadOptions) -> FileSource:
    """One image, DICOM or NIfTI file."""
    if loader_for(path) is None:
        raise DataError(f"{path}: unsupported file type; expected PNG/JPG/TIFF/BMP, DICOM (.dcm), NIfTI (.nii/.nii.gz), "
                        ".npz or .csv")
    src = _expand_files([(path, -1, "")], path.parent, options, "file")
    if len(src) == 0:
        reason = src.skipped[0].reason if src.skipped else "no 2D images inside"
        raise DataError(f"{path}: {reason}")
    return src


def csv_source(path: Path, options: ReadOptions) -> FileSource:
    """A CSV with columns ``path,label`` (and optionally ``split``); paths are relative to the CSV's folder.

    Labels may be class names (sorted to indices) or integers; a blank label or a negative integer means
    unlabelled (-1).
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if "path" not in cols:
        raise DataError(f"{path}: a labelled CSV needs a header with columns 'path,label' (optionally 'split'); found {cols}")
    if not rows:
        raise DataError(f"{path}: the CSV has a header but no rows")
    base = path.parent
    missing = [r["path"] for r in rows if not (base / r["path"]).is_file()]
    if missing:
        raise DataError(f"{path}: {len(missing)} of {len(rows)} listed files do not exist (relative to {base}), "
                        f"e.g. {missing[:3]}. Fix the paths or remove those rows.")
    raw = [r.get("label", "") for r in rows]
    given = [v for v in raw if v != ""]  # a blank cell is "unlabelled", never a class named ""
    if not given:
        names: list[str] = []
        labels = [-1] * len(rows)
    elif all(v.lstrip("-").isdigit() for v in given):
        labels = [max(int(v), -1) if v else -1 for v in raw]
        names = [str(k) for k in range(max(labels) + 1)]
    else:
        names = sorted(set(given))
        labels = [names.index(v) if v else -1 for v in raw]
    splits = []
    for r in rows:
        s = r.get("split", "")
        if s and s.lower() not in SPLIT_ALIASES:
            raise DataError(f"{path}: split '{s}' for {r['path']} is not one of train/val/test")
        splits.append(SPLIT_ALIASES.get(s.lower(), ""))
    files = [(base / r["path"], lab, s) for r, lab, s in zip(rows, labels, splits)]
    src = _expand_files(files, base, options, "csv", names)
    if len(src) == 0:
        raise DataError(f"{path}: none of the listed files could be read")
    return src
