"""A bench's results archive: the small, committable record of every finished part.

Why it exists: a bench's run folder holds encoders and optimizer checkpoints (≈ 180 MB per resnet18 arm × seed)
that do not belong in version control, yet a long protocol spans sessions and machines whose scratch space is
not kept. With ``archive: DIR`` in the bench YAML every finished part also writes one JSON file,
``DIR/<arm>/seed<k>/<part>.json`` (``pretrain`` or the task's label), holding the part's identity and hash
(:mod:`mwm.bench.parts`) and what the tables need: a pretraining run's ``summary.json``, its realised mask
ratios and the SHA-256 of its encoder's tensors; a task's ``metrics.json``.

An arm × seed whose parts are *all* archived under the identities asked for now is tabulated from the archive
and not run again, even when ``OUT`` is empty. When any is missing, the arm × seed runs as usual; a task found
in the archive under the encoder it would now read is still not rerun. A re-pretrained encoder with other values
(another device, another library version) has another hash, so its tasks get another identity and are run for
it — archived numbers are never attached to an encoder they were not measured on.

``DIR`` also receives a copy of ``results.csv`` and ``results.md`` each time the tables are written.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text
from .parts import Part, same_settings

__all__ = ["Archive"]

FORMAT = "mwm.bench-archive/1"


class Archive:
    """The archive folder of one bench (``root``); files are written atomically, one per part, so the shards of a
    bench share it without locks."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, arm: str, seed: int, label: str) -> Path:
        """``ROOT/<arm>/seed<k>/<label>.json``."""
        return self.root / arm / f"seed{seed}" / f"{label}.json"

    def _read(self, path: Path) -> dict | None:
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) and rec.get("format") == FORMAT else None

    def get(self, part: Part, arm: str, seed: int, label: str) -> dict | None:
        """The archived payload of ``part`` when its record's identity equals the one asked for (the same hash, or
        the same settings with options added since at their defaults), else None."""
        rec = self._read(self.path(arm, seed, label))
        if rec is None:
            return None
        if rec.get("hash") != part.hash and not same_settings(rec.get("identity"), part.identity, part.config):
            return None
        return rec.get("payload")

    def put(self, part: Part, arm: str, seed: int, label: str, payload: dict) -> None:
        """Record a finished part (rewritten only when its identity or payload changed)."""
        rec = {"format": FORMAT, "part": part.label, "hash": part.hash, "identity": part.identity,
               "payload": payload}
        text = json.dumps(rec, indent=1, sort_keys=True, default=str) + "\n"
        path = self.path(arm, seed, label)
        try:
            if path.read_text(encoding="utf-8") == text:
                return
        except OSError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)

    def copy_tables(self, out: Path) -> None:
        """Copy ``OUT/results.csv`` and ``OUT/results.md`` into the archive root."""
        for name in ("results.csv", "results.md"):
            src = Path(out) / name
            if src.is_file():
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.root / name, src.read_text(encoding="utf-8"))
