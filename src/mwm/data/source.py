"""The common interface of every reader: a random-access list of 2D images with ids."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ReadError
from .types import ReadOptions, Sample


@dataclass
class Skipped:
    """A file (or one image inside it) that was left out, and why."""

    path: str
    reason: str


class ImageSource:
    """A dataset of 2D images. Subclasses fill ``_ids``, ``_labels``, ``_splits`` and ``_read``.

    Ids are stable: the path relative to the dataset root (``#…`` suffix for a
    frame or slice inside a file), or for npz files the stored filename / index.

    Non-finite pixels (NaN, ±inf; loaders hand them on as NaN) are set to 0, black — the low end of every
    window — so none reaches training; ``nonfinite`` counts them per image id and one warning per source says
    how many (after a full pass of :meth:`iter_samples`, or at the first such image read by :meth:`read`).
    """

    kind: str = "?"

    def __init__(self, root: Path, options: ReadOptions | None = None):
        self.root = Path(root)
        self.options = options or ReadOptions()
        self.label_names: list[str] = []
        self.skipped: list[Skipped] = []
        self.ignored_files: int = 0
        self._ids: list[str] = []
        self._labels: list[int] = []
        self._splits: list[str] = []
        self.nonfinite: dict[str, int] = {}  # image id -> pixels that were NaN/inf and are now 0
        self._nonfinite_warned = False

    # -- to be provided by readers -------------------------------------------------
    def _read(self, i: int) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def has_masks(self) -> bool:
        return False

    def has_captions(self) -> bool:
        return False

    # -- shared ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def splits(self) -> list[str]:
        return list(self._splits)

    def read(self, i: int) -> Sample:
        """Decode image ``i``; raises :class:`ReadError` naming the file when it cannot."""
        s = self._clean(self._read(i))
        if s.id in self.nonfinite and not self._nonfinite_warned:
            # random access has no end to report a total at: say it for the first image, count the rest
            self._warn_nonfinite(f"{s.id} has {self.nonfinite[s.id]} non-finite pixel(s) (NaN/inf)",
                                 " Later images like it are set to 0 without another warning "
                                 "(`mwm data inspect` counts them all).")
        return s

    def _clean(self, s: Sample) -> Sample:
        """Set non-finite pixels of ``s.image`` to 0 and count them under its id."""
        bad = ~np.isfinite(s.image)
        if bad.any():
            self.nonfinite[s.id] = int((bad.any(-1) if bad.ndim == 3 else bad).sum())
            s.image = np.where(bad, np.float32(0.0), s.image).astype(np.float32, copy=False)
        return s

    @property
    def where(self) -> str:
        """The dataset as messages name it (the folder, npz, CSV, or the one file)."""
        return str(self.root)

    def _warn_nonfinite(self, what: str, tail: str = "") -> None:
        self._nonfinite_warned = True
        warnings.warn(f"{self.where}: {what}; they are set to 0 (black, the low end of the intensity window).{tail}",
                      stacklevel=3)

    def nonfinite_summary(self) -> dict[str, int]:
        """``{"images": …, "pixels": …}`` with non-finite pixels among the images read so far (npz: all)."""
        return {"images": len(self.nonfinite), "pixels": int(sum(self.nonfinite.values()))}

    def indices(self, split: str | None = None) -> list[int]:
        """Indices of one split (``None``/"all": every image)."""
        if split in (None, "", "all"):
            return list(range(len(self)))
        return [i for i, s in enumerate(self._splits) if s == split]

    def iter_samples(self, indices: list[int] | None = None, strict: bool | None = None) -> Iterator[Sample]:
        """Yield decoded samples; unreadable ones are recorded in ``skipped`` (or raised when strict)."""
        strict = self.options.strict if strict is None else strict
        n, bad, pixels, first = 0, 0, 0, None
        for i in range(len(self)) if indices is None else indices:
            try:
                s = self._clean(self._read(i))
            except ReadError as e:
                if strict:
                    raise
                self.skipped.append(Skipped(e.path, e.reason))
                warnings.warn(str(e), stacklevel=2)
                continue
            n += 1
            if s.id in self.nonfinite:
                bad, pixels, first = bad + 1, pixels + self.nonfinite[s.id], first or s.id
            yield s
        if bad and not self._nonfinite_warned:
            self._warn_nonfinite(f"{bad} of {n} images have non-finite pixels (NaN/inf; {pixels} pixels in all, "
                                 f"first: {first})")

    def skip_summary(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))


def pick_split(src, split: str | None) -> str:
    """The split a whole-dataset job (pretraining, importance maps) takes: ``train`` when the data has one and no
    split is asked for (else ``all``); an asked-for split must exist (a :class:`DataError` lists those present)."""
    from ..errors import DataError

    present = sorted({s for s in src.splits if s})
    if split in (None, ""):
        return "train" if "train" in present else "all"
    if split != "all" and split not in present:
        raise DataError(f"{src.root}: no images in split '{split}'; the splits present are "
                        f"{', '.join(present) if present else 'none (use --split all)'}")
    return split
