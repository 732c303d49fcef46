"""The common interface of every reader: a random-access list of 2D images with ids."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
        return self._read(i)

    def indices(self, split: str | None = None) -> list[int]:
        """Indices of one split (``None``/"all": every image)."""
        if split in (None, "", "all"):
            return list(range(len(self)))
        return [i for i, s in enumerate(self._splits) if s == split]

    def iter_samples(self, indices: list[int] | None = None, strict: bool | None = None) -> Iterator[Sample]:
        """Yield decoded samples; unreadable ones are recorded in ``skipped`` (or raised when strict)."""
        strict = self.options.strict if strict is None else strict
        for i in range(len(self)) if indices is None else indices:
            try:
                yield self._read(i)
            except ReadError as e:
                if strict:
                    raise
                self.skipped.append(Skipped(e.path, e.reason))
                warnings.warn(str(e), stacklevel=2)

    def skip_summary(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped))
