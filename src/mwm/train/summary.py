"""`PretrainSummary`: what a finished pretraining run reports (RUN/summary.json, and what ``pretrain()`` returns).

The file keeps its keys (the bench and users read it as a dict); :func:`read_summary` gives readers the typed
record. Fields a method without a keep-mask cannot fill (``masking``, ``mask_grid``, ``mask_ratios``) are None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..io import atomic_write_text

__all__ = ["PretrainSummary", "read_summary"]


class PretrainSummary(BaseModel):
    """One run's summary; field order is summary.json's key order. Unknown keys (a newer writer) are kept."""

    model_config = ConfigDict(extra="allow")

    run: str
    epochs_done: int
    epochs: int
    steps: int
    resumed_from_epoch: int | None = None
    images: int
    split: str | None = None
    world_size: int = 1
    effective_batch: int
    lr: float
    lr_rule: str = ""
    optimizer: str
    precision: str
    masking: str | None = None  # the masking strategy (MIM methods)
    mask_grid: list[int] | None = None  # (h, w) cells the masker drew on
    roi_stats: dict[str, Any] | None = None
    init: dict[str, Any] | None = None
    saliency_stats: dict[str, Any] | None = None
    mask_ratios: dict[str, Any] | None = None
    warnings: list[str] = []
    notes: list[str] = []
    first_loss: float | None = None
    final_loss: float | None = None
    seconds: float
    seconds_per_epoch: float | None = None
    images_per_s: float | None = None
    encoder: str
    encoder_d2: str | None = None
    encoder_missing_keys: list[str] = []
    checkpoint: str
    metrics: str
    recon: list[str] = []

    def write(self, path: str | Path) -> Path:
        """summary.json, atomically."""
        atomic_write_text(path, json.dumps(self.model_dump(), indent=2) + "\n")
        return Path(path)


def read_summary(path: str | Path) -> PretrainSummary:
    """A run's summary.json (``path``: the file or the run folder) as a :class:`PretrainSummary`."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    return PretrainSummary.model_validate_json(path.read_text())
